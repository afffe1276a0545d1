"""Pure parts of the tiny guest builder (cumulo/guestimage.py); booting it is tests/e2e/test_tiny_guest.py."""

from __future__ import annotations

import gzip
import io
import json
import re
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from cumulo import guestimage as gi

# What depmod writes: every line lists the module's whole dependency closure.
DEPMOD_SAMPLE = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/cdrom/cdrom.ko:
kernel/drivers/scsi/sr_mod.ko: kernel/drivers/cdrom/cdrom.ko kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/fs/isofs/isofs.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
"""

# What modules_dep_from_tree writes from .modinfo: direct dependencies only.
DIRECT_SAMPLE = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def assert_dependencies_first(order: list[str], deps: dict[str, list[str]]) -> None:
    for index, path in enumerate(order):
        for dep in deps[path]:
            assert dep in order[:index], f"{dep} must load before {path}"


def test_module_name_normalises():
    assert gi.module_name("kernel/drivers/block/virtio_blk.ko") == "virtio_blk"
    assert gi.module_name("kernel/arch/x86/crypto/crc32c-intel.ko") == "crc32c_intel"
    assert gi.module_name("kernel/fs/isofs/isofs.ko.xz") == "isofs"


def test_parse_modules_dep():
    deps = gi.parse_modules_dep(DEPMOD_SAMPLE + "\n# comment\n")
    assert deps["kernel/fs/isofs/isofs.ko"] == []
    assert deps["kernel/drivers/net/net_failover.ko"] == ["kernel/net/core/failover.ko"]
    assert len(deps) == DEPMOD_SAMPLE.count("\n")


@pytest.mark.parametrize("sample", [DEPMOD_SAMPLE, DIRECT_SAMPLE], ids=["transitive", "direct"])
def test_resolve_orders_dependencies_first(sample):
    deps = gi.parse_modules_dep(sample)
    order = gi.resolve_modules(deps, ["virtio_blk", "virtio-net"])
    assert order[-1] == "kernel/drivers/net/virtio_net.ko"
    assert {gi.module_name(path) for path in order} == {
        "virtio", "virtio_ring", "virtio_blk", "failover", "net_failover", "virtio_net"}
    assert len(order) == len(set(order))
    assert_dependencies_first(order, deps)


def test_resolve_full_wanted_list_from_depmod_sample():
    deps = gi.parse_modules_dep(DEPMOD_SAMPLE)
    order = gi.resolve_modules(deps, ["virtio_pci", "virtio_blk", "virtio_net", "sr_mod", "isofs", "crc32c_intel"])
    assert_dependencies_first(order, deps)
    names = [gi.module_name(path) for path in order]
    assert names.index("virtio_pci") < names.index("virtio_blk")  # wanted order kept where deps allow
    assert names.index("scsi_common") < names.index("scsi_mod") < names.index("sr_mod")
    assert "crc32c_intel" in names


def test_resolve_unknown_module_and_cycle():
    deps = gi.parse_modules_dep(DIRECT_SAMPLE)
    with pytest.raises(KeyError, match="ext4"):
        gi.resolve_modules(deps, ["ext4"])  # built into the cloud kernel: no .ko
    with pytest.raises(ValueError, match="cycle"):
        gi.resolve_modules({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a"])


def test_load_order_text_carries_params():
    text = gi.load_order_text(["kernel/drivers/scsi/scsi_common.ko", "kernel/drivers/scsi/scsi_mod.ko"])
    assert text == "scsi_common.ko\nscsi_mod.ko scan=sync\n"


def fake_ko(modinfo: bytes) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo and a .shstrtab section."""
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_offset = 64
    modinfo_offset, strtab_offset = body_offset, body_offset + len(modinfo)
    shoff = strtab_offset + len(shstrtab)
    shoff += -shoff % 8
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    data = bytearray(header + modinfo + shstrtab)
    data += b"\0" * (shoff - len(data))

    def section(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    data += section(0, 0, 0, 0) + section(1, 1, modinfo_offset, len(modinfo)) + section(10, 3, strtab_offset,
                                                                                         len(shstrtab))
    return bytes(data)


def test_modinfo_reads_depends_from_elf():
    ko = fake_ko(b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0vermagic=6.1.0 SMP mod_unload\0")
    info = gi.modinfo(ko)
    assert info["depends"] == "virtio,virtio_ring" and info["name"] == "virtio_blk"
    assert gi.elf_section(ko, ".missing") is None
    with pytest.raises(ValueError):
        gi.modinfo(b"not an elf file at all, sorry")


def test_modules_dep_from_tree(tmp_path):
    for path, depends in (("kernel/drivers/virtio/virtio.ko", ""), ("kernel/drivers/virtio/virtio_ring.ko", ""),
                          ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
                          ("kernel/arch/x86/crypto/crc32c-intel.ko", ""),
                          ("kernel/lib/uses_crc.ko", "crc32c-intel")):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(fake_ko(f"depends={depends}\0".encode()))
    deps = gi.parse_modules_dep(gi.modules_dep_from_tree(tmp_path))
    assert deps["kernel/drivers/block/virtio_blk.ko"] == ["kernel/drivers/virtio/virtio.ko",
                                                         "kernel/drivers/virtio/virtio_ring.ko"]
    assert deps["kernel/lib/uses_crc.ko"] == ["kernel/arch/x86/crypto/crc32c-intel.ko"]
    (tmp_path / "modules.dep").write_text("shipped.ko:\n")
    assert gi.modules_dep_from_tree(tmp_path) == "shipped.ko:\n"  # a shipped modules.dep wins


def test_kernel_package_from_apt_cache_depends():
    output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert gi.kernel_package_from_depends(output) == "linux-image-6.1.0-56-cloud-amd64"
    assert gi.kernel_package_from_depends("linux-image-cloud-amd64\n  Depends: <linux-image-x>\n") is None


def test_cpio_round_trip_and_alignment():
    out = io.BytesIO()
    cpio = gi.CpioWriter(out)
    cpio.file("a/b/c.txt", b"hello")
    cpio.symlink("bin/sh", "busybox")
    cpio.char_device("dev/console", 5, 1)
    cpio.close()
    data = out.getvalue()
    assert len(data) % 4 == 0 and data.startswith(b"070701")
    entries = gi.read_cpio(data)
    assert list(entries) == ["a", "a/b", "a/b/c.txt", "bin", "bin/sh", "dev", "dev/console"]
    assert entries["a/b/c.txt"] == (stat.S_IFREG | 0o644, b"hello")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0])
    rdev = data[data.index(b"dev/console\0") - 110:][:110]
    assert int(rdev[78:86], 16) == 5 and int(rdev[86:94], 16) == 1  # rdevmajor, rdevminor


def test_initramfs_contents():
    image = gi.build_initramfs(b"BUSYBOX", "6.1.0-test", {"virtio.ko": b"KO"}, "virtio.ko\n")
    assert image == gi.build_initramfs(b"BUSYBOX", "6.1.0-test", {"virtio.ko": b"KO"}, "virtio.ko\n")  # reproducible
    entries = gi.read_cpio(gzip.decompress(image))
    assert entries["init"] == (stat.S_IFREG | 0o755, gi.INIT_SCRIPT.encode())
    assert entries["bin/busybox"][1] == b"BUSYBOX" and entries["bin/sh"][1] == b"busybox"
    assert entries["lib/modules/virtio.ko"][1] == b"KO"
    assert entries["lib/modules/load-order"][1] == b"virtio.ko\n"
    assert entries["etc/acpi/PWRF/00000080"][0] & 0o111  # busybox acpid runs it on a power-button press
    assert stat.S_ISCHR(entries["dev/console"][0])


def test_markers_and_cmdline():
    assert gi.BOOT_MARKER == "CUMULO-TINY-GUEST BOOTED"
    assert gi.POWEROFF_MARKER == "CUMULO powering-off"
    assert gi.NO_CONFIG_DRIVE_MARKER == "CUMULO no-config-drive"
    assert gi.NO_IP_MARKER == "CUMULO no-ip"
    assert gi.CMDLINE.split() == ["console=ttyS0", "root=/dev/vda", "rw", "quiet"]
    assert gi.CMDLINE_ROOT_BY_LABEL.split()[1] == f"root=LABEL={gi.ROOT_LABEL}"
    assert gi.MIN_MEMORY_MIB == 96
    scripts = gi.INIT_SCRIPT + gi.POWEROFF_SCRIPT + gi.UDHCPC_SCRIPT
    for marker in (gi.BOOT_MARKER, gi.BOOT_COUNT_PREFIX, gi.USERDATA_SHA256_PREFIX, gi.INSTANCE_ID_PREFIX,
                   gi.LOCAL_HOSTNAME_PREFIX, gi.NO_CONFIG_DRIVE_MARKER, gi.IP_PREFIX, gi.NO_IP_MARKER,
                   gi.READY_MARKER, gi.POWEROFF_MARKER, gi.DISKS_PREFIX, gi.NO_ROOT_DISK_MARKER,
                   gi.INSMOD_FAILED_PREFIX):
        assert marker in scripts, marker
    assert "acpid" in gi.INIT_SCRIPT and "httpd -p 80" in gi.INIT_SCRIPT and "__" not in gi.INIT_SCRIPT
    assert {"virtio_pci", "virtio_blk", "virtio_net", "sr_mod", "isofs", "button", "evdev"} <= set(gi.WANTED_MODULES)


@pytest.mark.parametrize("script", ["INIT_SCRIPT", "UDHCPC_SCRIPT", "POWEROFF_SCRIPT", "STATUS_CGI"])
def test_scripts_parse(script):
    subprocess.run(["sh", "-n"], input=getattr(gi, script), text=True, check=True)


@pytest.mark.parametrize("meta_data", [
    "instance-id: iid-1\nlocal-hostname: vm-1\n",
    '{"instance-id": "iid-1", "local-hostname": "vm-1"}\n',
    '{\n  "local-hostname": "vm-1",\n  "instance-id": "iid-1"\n}\n',
    "instance-id: 'iid-1'\nlocal-hostname: \"vm-1\"\n",
])
def test_meta_data_parsing(tmp_path, meta_data):
    function = re.search(r"^metadata\(\) \{.*?^\}", gi.INIT_SCRIPT, re.M | re.S).group(0)
    (tmp_path / "meta-data").write_text(meta_data)
    script = function.replace("/cidata/meta-data", str(tmp_path / "meta-data"))
    script += '\necho "$(metadata instance-id)|$(metadata local-hostname)|$(metadata absent)"\n'
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout == "iid-1|vm-1|\n"


def test_cache_key_tracks_the_init_script(monkeypatch, tmp_path):
    key = gi.cache_key()
    assert re.fullmatch(rf"tiny-guest-v{gi.GUEST_FORMAT_VERSION}-[0-9a-f]{{12}}", key)
    monkeypatch.setenv("CUMULO_CACHE", str(tmp_path))
    assert gi.guest_dir() == tmp_path / key
    monkeypatch.setattr(gi, "INIT_SCRIPT", gi.INIT_SCRIPT + "# changed\n")
    assert gi.cache_key() != key


def test_tiny_guest_round_trips_through_the_manifest(tmp_path):
    guest = gi.TinyGuest(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", disk=tmp_path / "disk.qcow2",
                         kernel_sha256="a", initrd_sha256="b", disk_sha256="c", kernel_package="linux-image-x",
                         kernel_package_version="1", kernel_release="6.1.0-x", busybox_version="1.35",
                         modules=("virtio.ko",))
    assert gi.TinyGuest.from_dict({**guest.as_dict(), "extra": 1}) == guest
    assert guest.directory == tmp_path and guest.boot_marker == gi.BOOT_MARKER
    assert gi.load(tmp_path) is None  # no manifest
    (tmp_path / "manifest.json").write_text(json.dumps(guest.as_dict()))
    assert gi.load(tmp_path) is None  # artefacts missing
    for path in (guest.kernel, guest.initrd, guest.disk):
        Path(path).write_bytes(b"")
    assert gi.load(tmp_path) == guest
