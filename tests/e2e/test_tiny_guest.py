"""The tiny real guest (cumulo/guestimage.py) boots under QEMU/TCG and does what its console markers say.

Three boots, shared by the tests of this module, in file order:
  A. q35, 128 MiB, fresh overlay, NoCloud ISO on a virtio-scsi CD, user-mode network with a host port forward:
     marker + boot time, boot-count=1, config drive, DHCP, HTTP, then ACPI power-down.
  B. q35, 96 MiB (the documented minimum), the same overlay, no config drive, no NIC: boot-count=2 (root-disk
     writes survive power-off), hot-attach / resize / detach of a virtio disk on a PCIe root port.
  C. fresh overlays, the config drive on an IDE CD of a pc (i440FX) machine, then as a read-only virtio disk on
     q35 (the Debian cloud kernel has no AHCI, so q35's SATA CDs are invisible to it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess
import time
import urllib.request

import pytest

from cumulo import guestimage as gi


pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

USER_DATA = b"#cloud-config\nhostname: ignored-by-the-tiny-guest\nruncmd:\n  - echo hello\n"
META_DATA = b"instance-id: iid-tiny-0001\nlocal-hostname: tiny-a\n"
BOOT_TIMEOUT = 60
C_USER_DATA = b"#!/bin/sh\necho c\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-guest")


@pytest.fixture(scope="module")
def root_overlay(tiny_guest, workdir, make_overlay):
    return make_overlay(tiny_guest.disk, workdir / "root-a.qcow2")


@pytest.fixture(scope="module")
def boot_a(tiny_guest, workdir, root_overlay, qemu_vm, make_nocloud_iso):
    iso = make_nocloud_iso(workdir / "seed-a.iso", USER_DATA, META_DATA)
    port = free_port()
    vm = qemu_vm(tiny_guest, "boot-a", disk=root_overlay, extra_args=[
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", f"file={iso},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
        "-device", "scsi-cd,drive=cd0,bus=scsi0.0",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:{gi.HTTP_PORT}",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
    ])
    vm.http_port = port
    return vm


def test_artifacts(tiny_guest):
    assert tiny_guest.directory.name == gi.cache_key()
    for path, digest in ((tiny_guest.kernel, tiny_guest.kernel_sha256), (tiny_guest.initrd, tiny_guest.initrd_sha256),
                         (tiny_guest.disk, tiny_guest.disk_sha256)):
        assert gi.sha256_file(path) == digest, path
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tiny_guest.disk)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == gi.DISK_SIZE_MIB * 1024 * 1024
    initramfs = gi.read_cpio(gzip.decompress(tiny_guest.initrd.read_bytes()))
    assert {"init", "bin/busybox", "dev/console", "etc/acpi/PWRF/00000080"} <= initramfs.keys()
    for module in ("virtio_blk.ko", "virtio_net.ko", "net_failover.ko", "sr_mod.ko", "isofs.ko", "button.ko"):
        assert f"lib/modules/{module}" in initramfs
    assert gi.ensure_tiny_guest(log=lambda message: pytest.fail(f"rebuilt a cached guest: {message}")) == tiny_guest


def test_boots_to_marker(boot_a):
    boot_a.wait_line(gi.BOOT_MARKER, BOOT_TIMEOUT)
    seconds = time.monotonic() - boot_a.started_at
    print(f"boot to {gi.BOOT_MARKER!r}: {seconds:.1f}s (TCG)")
    assert seconds < BOOT_TIMEOUT
    assert gi.INSMOD_FAILED_PREFIX not in boot_a.console()


def test_first_boot_count(boot_a):
    boot_a.wait_line(f"{gi.BOOT_COUNT_PREFIX}1", BOOT_TIMEOUT)


def test_config_drive(boot_a):
    boot_a.wait_line(f"{gi.USERDATA_SHA256_PREFIX}{hashlib.sha256(USER_DATA).hexdigest()}", BOOT_TIMEOUT)
    boot_a.wait_line(f"{gi.INSTANCE_ID_PREFIX}iid-tiny-0001", 10)
    boot_a.wait_line(f"{gi.LOCAL_HOSTNAME_PREFIX}tiny-a", 10)


def test_dhcp_and_http(boot_a):
    boot_a.wait_line(f"{gi.IP_PREFIX}eth0 10.0.2.15", BOOT_TIMEOUT)
    boot_a.wait_line(gi.READY_MARKER, BOOT_TIMEOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{boot_a.http_port}/", timeout=5) as response:
                page = response.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert "hostname=tiny-a" in page and "boot-count=1" in page and "instance-id=iid-tiny-0001" in page
    with urllib.request.urlopen(f"http://127.0.0.1:{boot_a.http_port}/cgi-bin/status", timeout=5) as response:
        assert "uptime=" in response.read().decode()


def test_disks_reported(boot_a):
    boot_a.wait_for(rf"^{gi.DISKS_PREFIX} vda=131072 sr0=\d+\r?$", BOOT_TIMEOUT)


def test_acpi_powerdown(boot_a):
    boot_a.wait_line(gi.READY_MARKER, BOOT_TIMEOUT)  # acpid runs: a press before this would be lost
    started = time.monotonic()
    boot_a.qmp.execute("system_powerdown")
    boot_a.wait_line(gi.POWEROFF_MARKER, 30)
    assert boot_a.wait_exit(30) == 0  # QEMU exits on its own once the guest powers off
    print(f"ACPI power-down to QEMU exit: {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="module")
def boot_b(tiny_guest, workdir, root_overlay, boot_a, qemu_vm):
    if boot_a.running():  # test_acpi_powerdown was deselected
        boot_a.qmp.execute("system_powerdown")
        boot_a.wait_exit(60)
    return qemu_vm(tiny_guest, "boot-b", disk=root_overlay, memory_mib=gi.MIN_MEMORY_MIB, extra_args=[
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1",
    ])


def test_second_boot_keeps_root_disk_writes(boot_b):
    boot_b.wait_line(gi.BOOT_MARKER, BOOT_TIMEOUT)
    boot_b.wait_line(f"{gi.BOOT_COUNT_PREFIX}2", 10)
    boot_b.wait_line(gi.NO_CONFIG_DRIVE_MARKER, 10)
    boot_b.wait_line(f"{gi.NO_IP_MARKER} eth0", 10)  # no NIC at all
    boot_b.wait_line(gi.READY_MARKER, 10)


def test_hot_attach_resize_detach(boot_b, workdir):
    first = boot_b.wait_line(f"{gi.DISKS_PREFIX} vda=131072", BOOT_TIMEOUT)
    data = workdir / "data-b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "1G"], check=True)
    boot_b.qmp.execute("blockdev-add", **{"node-name": "data1", "driver": "qcow2",
                                          "file": {"driver": "file", "filename": str(data)}})
    boot_b.qmp.execute("device_add", driver="virtio-blk-pci", id="disk1", drive="data1", bus="rp1")
    attached = boot_b.wait_line(f"{gi.DISKS_PREFIX} vda=131072 vdb=2097152", 30, after=first.end())
    boot_b.qmp.execute("block_resize", **{"node-name": "data1", "size": 2 * 1024**3})
    resized = boot_b.wait_line(f"{gi.DISKS_PREFIX} vda=131072 vdb=4194304", 30, after=attached.end())
    started = time.monotonic()
    boot_b.qmp.execute("device_del", id="disk1")  # PCIe hot-unplug: the guest waits ~5 s (attention button)
    boot_b.wait_line(f"{gi.DISKS_PREFIX} vda=131072", 30, after=resized.end())
    print(f"PCIe hot-unplug seen by the guest after {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("machine, attach", [
    ("pc", "if=ide,media=cdrom"),      # libvirt's default CD on pc: <target dev='hdc' bus='ide'/>
    ("q35", "if=virtio,media=disk"),  # a read-only virtio disk: <disk device='disk'><target bus='virtio'/>
], ids=["ide-cd-on-pc", "virtio-disk-on-q35"])
def test_config_drive_attachments(tiny_guest, workdir, qemu_vm, make_overlay, make_nocloud_iso, machine, attach):
    name = f"boot-c-{machine}"
    iso = make_nocloud_iso(workdir / f"seed-{name}.iso", C_USER_DATA,
                           b'{"instance-id": "iid-c", "local-hostname": "tiny-c"}\n')
    vm = qemu_vm(tiny_guest, name, disk=make_overlay(tiny_guest.disk, workdir / f"root-{name}.qcow2"),
                 machine=machine, extra_args=["-drive", f"file={iso},format=raw,{attach},readonly=on"])
    vm.wait_line(gi.BOOT_MARKER, BOOT_TIMEOUT)
    print(f"boot to marker on {machine}: {time.monotonic() - vm.started_at:.1f}s")
    vm.wait_line(f"{gi.BOOT_COUNT_PREFIX}1", 10)
    vm.wait_line(f"{gi.USERDATA_SHA256_PREFIX}{hashlib.sha256(C_USER_DATA).hexdigest()}", 10)
    vm.wait_line(f"{gi.INSTANCE_ID_PREFIX}iid-c", 10)
    vm.wait_line(f"{gi.LOCAL_HOSTNAME_PREFIX}tiny-c", 10)
    vm.kill()
