"""Builds the tiny real guest that tests and the demo boot: a Debian cloud kernel, a busybox initramfs, a root disk.

Nothing is downloaded but Debian packages, through apt (``apt-get download`` + ``dpkg-deb -x``: the kernel is
never installed and /boot is never touched). The result is cached under ``toolchain.cache_root()``, in a directory
keyed by ``GUEST_FORMAT_VERSION`` and a digest of everything that shapes the artefacts, so only the first run
pays (a few seconds). ``python -m cumulo.guestimage`` builds it and prints the paths.

The guest (direct-kernel boot: ``kernel``, ``initrd``, ``cmdline``; root disk on the first virtio disk):

* ``/init`` (PID 1, a busybox ash script) loads the virtio, SCSI/IDE-CD, isofs and ACPI-button modules,
  starts busybox ``acpid`` and prints ``BOOT_MARKER`` on the serial console (ttyS0).
* mounts the root disk (``root=`` of the cmdline, default ``/dev/vda``; ext4, rw) on /mnt, increments
  ``/cumulo/boot-count`` on it and prints ``CUMULO boot-count=<n>``.
* looks for a NoCloud config drive (an iso9660 filesystem labelled ``cidata``/``CIDATA``, as a CD or a
  disk) and prints ``CUMULO userdata-sha256=<hex>``, ``CUMULO instance-id=<id>`` and
  ``CUMULO local-hostname=<name>`` (sets the hostname), or ``CUMULO no-config-drive``.
* brings up lo and eth0, runs ``udhcpc`` in the background, which prints ``CUMULO ip eth0 <address>`` once
  bound or ``CUMULO no-ip eth0`` after ~5 s without a lease (it keeps trying), and serves HTTP on port 80
  with busybox httpd: ``/`` holds the hostname, instance id and boot count, ``/cgi-bin/status`` adds uptime.
* prints ``CUMULO ready`` once acpid and httpd run.
* on an ACPI power-button event (libvirt's ``shutdown``, QEMU's ``system_powerdown``) prints
  ``CUMULO powering-off``, unmounts the disks and powers the machine off.
* then loops forever, printing ``CUMULO disks vda=<sectors> ...`` (512-byte sectors from
  ``/sys/block/*/size``) whenever the set or sizes of vd*/sd*/sr* block devices change (checked every 1 s).

What the hypervisor side must know:

* Memory >= ``MIN_MEMORY_MIB`` (96 MiB) under TCG; it reaches ``BOOT_MARKER`` in 3-6 s on TCG.
* The root disk must be the guest's first virtio disk (``/dev/vda``: the guest numbers virtio disks in PCI
  order, whatever libvirt's ``<target dev=...>`` says), or boot with ``CMDLINE_ROOT_BY_LABEL``.
* The Debian cloud kernel has no AHCI driver: a config drive CD must be on IDE (``pc`` machine) or on a
  virtio-scsi controller (``sr0``), or the ISO be attached as a (read-only) virtio disk. It is found by its iso9660
  label (``cidata``/``CIDATA``); its files must carry Rock Ridge or Joliet names (``user-data``, ``meta-data``).
* A power-button press is acted on once acpid runs (started just before ``BOOT_MARKER``; surely by ``READY_MARKER``);
  an earlier ACPI shutdown request is lost, so retry it or fall back to a hard stop.
* On q35, hot-plugged virtio disks need a free PCIe root port (libvirt adds spare ones); detach takes ~1 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from cumulo import toolchain

# Bump when the way the artefacts are built changes in a way the digest below does not capture.
GUEST_FORMAT_VERSION = "1"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Exact lines (or line prefixes) the guest prints on its serial console.
BOOT_MARKER = "CUMULO-TINY-GUEST BOOTED"
BOOT_COUNT_PREFIX = "CUMULO boot-count="          # + decimal count, 1 on the first boot of a disk
NO_ROOT_DISK_MARKER = "CUMULO no-root-disk"        # + device: root disk missing or not mountable
USERDATA_SHA256_PREFIX = "CUMULO userdata-sha256="  # + hex sha256 of the config drive's user-data ("none" if absent)
INSTANCE_ID_PREFIX = "CUMULO instance-id="         # + instance-id from meta-data
LOCAL_HOSTNAME_PREFIX = "CUMULO local-hostname="   # + local-hostname from meta-data
NO_CONFIG_DRIVE_MARKER = "CUMULO no-config-drive"
IP_PREFIX = "CUMULO ip "                           # + "<iface> <address>", e.g. "CUMULO ip eth0 10.0.2.15"
NO_IP_MARKER = "CUMULO no-ip"                      # + " <iface>", printed once; DHCP keeps trying
READY_MARKER = "CUMULO ready"                      # acpid and httpd are running
POWEROFF_MARKER = "CUMULO powering-off"
DISKS_PREFIX = "CUMULO disks"                      # + " vda=<sectors> vdb=<sectors> ..." on every change
INSMOD_FAILED_PREFIX = "CUMULO insmod-failed "     # + module file: a bug in the image

HTTP_PORT = 80
MIN_MEMORY_MIB = 96          # less and the kernel + initramfs do not fit (TCG)
RECOMMENDED_MEMORY_MIB = 128
ROOT_DEVICE = "/dev/vda"
ROOT_LABEL = "cumulo-root"
ROOT_UUID = "c0a1c0a1-7e57-4c0a-9e57-000000000001"  # the same in every build (reproducible disk image)
CONFIG_DRIVE_LABEL = "cidata"
DISK_SIZE_MIB = 64
DEFAULT_HOSTNAME = "cumulo-tiny"
CMDLINE = f"console=ttyS0 root={ROOT_DEVICE} rw quiet"
# The same, robust to the disk order (the guest names virtio disks vda, vdb... in PCI order, not by libvirt's
# <target dev=...>): /init resolves root=LABEL=... with busybox findfs.
CMDLINE_ROOT_BY_LABEL = f"console=ttyS0 root=LABEL={ROOT_LABEL} rw quiet"
MARKER_FILE = "cumulo/marker"      # on the root disk
BOOT_COUNT_FILE = "cumulo/boot-count"
MARKER_TEXT = "cumulo tiny guest root disk\n"

# Modules the guest loads (by module name, "-" and "_" alike); their dependencies are added from the kernel
# package, and each lands before its users. Controllers come before sd_mod/sr_mod so those bind what they found.
WANTED_MODULES = (
    "virtio_pci",     # every virtio device (q35 modern and pc legacy)
    "virtio_blk",     # vda, vdb, ... (root disk, data volumes, a config drive attached as a disk)
    "virtio_net",     # eth0 (pulls net_failover, failover)
    "virtio_scsi",    # sdX / sr0 on a virtio-scsi controller
    "ata_piix",       # IDE disks and CDs on the pc (i440FX) machine
    "sd_mod",
    "sr_mod",         # CD-ROMs (pulls cdrom)
    "isofs",          # iso9660 config drives
    "button",         # the ACPI power button ...
    "evdev",          # ... as /dev/input/event*, which busybox acpid reads
)
# Module parameters: probe SCSI buses synchronously so sr0/sda exist when insmod returns.
MODULE_PARAMS = {"scsi_mod": "scan=sync"}

# The DHCP client's hook (busybox udhcpc calls it with deconfig|bound|renew|leasefail|nak).
UDHCPC_SCRIPT = r"""#!/bin/sh
# busybox udhcpc hook of the Cumulo tiny guest: configures the interface and reports on the console.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    rm -f "/run/ip.$interface"
    ;;
bound|renew)
    if [ "$(cat "/run/ip.$interface" 2>/dev/null)" != "$ip/${mask:-24}" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        echo "$ip/${mask:-24}" > "/run/ip.$interface"
        echo "CUMULO ip $interface $ip" > /dev/console
    fi
    if [ -n "$router" ]; then
        ip route replace default via "${router%% *}" dev "$interface"
    fi
    : > /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    ;;
leasefail|nak)
    if [ ! -e "/run/ip.$interface" ] && [ ! -e "/run/noip.$interface" ]; then
        : > "/run/noip.$interface"
        echo "CUMULO no-ip $interface" > /dev/console
    fi
    ;;
esac
exit 0
"""

# What acpid runs on a power-button press: /etc/acpi/<ACTION>/<PARAMETER> for busybox acpid's "PWRF/00000080".
POWEROFF_SCRIPT = r"""#!/bin/sh
echo "CUMULO powering-off" > /dev/console
killall httpd udhcpc 2>/dev/null
sync
umount /cidata 2>/dev/null
umount /mnt 2>/dev/null || mount -o remount,ro /mnt 2>/dev/null
sync
poweroff -f
"""

STATUS_CGI = r"""#!/bin/sh
echo "Content-Type: text/plain"
echo
cat /www/index.html
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
"""

INIT_SCRIPT = r"""#!/bin/sh
# /init of the Cumulo tiny guest (PID 1); built by cumulo/guestimage.py, which documents the console markers.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox mkdir -p /proc /sys /dev /mnt /cidata /run /tmp /var/run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

# 1. modules, acpid, marker
while read -r module params; do
    insmod "/lib/modules/$module" $params 2>/dev/null || echo "CUMULO insmod-failed $module"
done < /lib/modules/load-order
i=0
while ! ls /dev/input/event* >/dev/null 2>&1 && [ $i -lt 20 ]; do usleep 100000; i=$((i + 1)); done
acpid -d -c /etc/acpi >/run/acpid.log 2>&1 &
echo  # the firmware's escape sequences may still be on the current console line
echo "CUMULO-TINY-GUEST BOOTED"

# 2. root disk and boot counter
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
case "$root" in LABEL=*|UUID=*) root="$(findfs "$root" 2>/dev/null || echo "$root")" ;; esac
i=0
while [ ! -b "$root" ] && [ $i -lt 30 ]; do usleep 100000; i=$((i + 1)); done
count=0
if mount -t ext4 -o rw "$root" /mnt 2>/dev/null; then
    mkdir -p /mnt/cumulo
    count="$(cat /mnt/cumulo/boot-count 2>/dev/null)"
    case "$count" in ''|*[!0-9]*) count=0 ;; esac
    count=$((count + 1))
    echo "$count" > /mnt/cumulo/boot-count
    sync
    echo "CUMULO boot-count=$count"
else
    echo "CUMULO no-root-disk $root"
fi

# 3. NoCloud config drive
metadata() {  # a key of meta-data, YAML ("key: value") or JSON ({"key": "value", ...})
    sed -n -e "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" -e t \
        -e "s/^[[:space:]]*$1[[:space:]]*:[[:space:]]*[\"']\{0,1\}\([^\"']*\)[\"']\{0,1\}[[:space:]]*\$/\1/p" \
        /cidata/meta-data 2>/dev/null | head -n 1
}
hostname="__DEFAULT_HOSTNAME__"
instance_id=""
# The iso9660 primary volume descriptor is sector 16 (2048-byte sectors): "CD001" at byte 1, the label at 40..71.
# Read it directly: busybox findfs did not find a 66 KiB pycdlib ISO (it found a 366 KiB genisoimage one).
drive=""
for dev in /dev/sr* /dev/vd* /dev/sd* /dev/hd*; do
    [ -b "$dev" ] && [ "$dev" != "$root" ] || continue
    [ "$(dd if="$dev" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
    case "$(dd if="$dev" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')" in
        cidata|CIDATA) drive="$dev"; break ;;
    esac
done
if [ -n "$drive" ] && mount -t iso9660 -o ro "$drive" /cidata 2>/dev/null; then
    userdata=none
    [ -f /cidata/user-data ] && userdata="$(sha256sum < /cidata/user-data | cut -d' ' -f1)"
    instance_id="$(metadata instance-id)"
    name="$(metadata local-hostname)"
    [ -n "$name" ] && hostname="$name"
    echo "CUMULO userdata-sha256=$userdata"
    echo "CUMULO instance-id=$instance_id"
    echo "CUMULO local-hostname=$name"
else
    echo "CUMULO no-config-drive"
fi
hostname "$hostname"

# 4. network and httpd
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -f -t 5 -T 1 -A 5 -x "hostname:$hostname" -s /etc/udhcpc.script >/dev/null 2>&1 &
else
    echo "CUMULO no-ip eth0"
fi
mkdir -p /www/cgi-bin
echo "cumulo-tiny-guest hostname=$hostname boot-count=$count instance-id=$instance_id" > /www/index.html
cp /etc/status.cgi /www/cgi-bin/status
chmod 755 /www/cgi-bin/status
httpd -p __HTTP_PORT__ -h /www

# 5. acpid started above; say everything is up
echo "CUMULO ready"

# 6. watch the block devices
last=""
while :; do
    disks=""
    for dev in /sys/block/vd* /sys/block/sd* /sys/block/sr*; do
        [ -e "$dev/size" ] && disks="$disks ${dev##*/}=$(cat "$dev/size")"
    done
    if [ "$disks" != "$last" ]; then
        echo "CUMULO disks$disks"
        last="$disks"
    fi
    sleep 1
done
""".replace("__DEFAULT_HOSTNAME__", DEFAULT_HOSTNAME).replace("__HTTP_PORT__", str(HTTP_PORT))


@dataclasses.dataclass(frozen=True)
class TinyGuest:
    """The built artefacts (in the cache; treat them as read-only: boot the disk through an overlay)."""

    kernel: Path
    initrd: Path
    disk: Path
    kernel_sha256: str
    initrd_sha256: str
    disk_sha256: str
    kernel_package: str          # e.g. linux-image-6.1.0-56-cloud-amd64
    kernel_package_version: str  # Debian version, e.g. 6.1.192-2
    kernel_release: str          # uname -r
    busybox_version: str
    modules: tuple[str, ...]     # module files in load order
    cmdline: str = CMDLINE
    disk_format: str = "qcow2"
    disk_virtual_size: int = DISK_SIZE_MIB * 1024 * 1024
    min_memory_mib: int = MIN_MEMORY_MIB
    http_port: int = HTTP_PORT
    boot_marker: str = BOOT_MARKER
    ready_marker: str = READY_MARKER
    poweroff_marker: str = POWEROFF_MARKER

    @property
    def directory(self) -> Path:
        return self.kernel.parent

    def as_dict(self) -> dict:
        return {key: (str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value)
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> TinyGuest:
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        for key in ("kernel", "initrd", "disk"):
            values[key] = Path(values[key])
        values["modules"] = tuple(values["modules"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Kernel modules: dependency metadata and resolution (pure)

def module_name(path: str) -> str:
    """``kernel/drivers/block/virtio_blk.ko`` -> ``virtio_blk`` (``-`` and ``_`` are the same to the kernel)."""
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse depmod's ``modules.dep`` (``path: dep-path dep-path ...``) into {path: [dep paths]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def resolve_modules(modules_dep: Mapping[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """The module paths to load, in order (dependencies first), for the wanted module names.

    Works whether ``modules_dep`` lists direct dependencies (what ``modules_dep_from_tree`` writes) or the
    full transitive list (what depmod writes). An unknown wanted module raises KeyError.
    """
    by_name = {module_name(path): path for path in modules_dep}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise ValueError(f"module dependency cycle through {path}")
        visiting.add(path)
        for dep in modules_dep.get(path, []):
            visit(by_name.get(module_name(dep), dep))
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise KeyError(f"kernel module {name!r} is not in the kernel package (built in, or absent)")
        visit(by_name[key])
    return order


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of a named section of a 64-bit little-endian ELF file (a .ko), or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, strtab_offset, strtab_size = header(shstrndx)
    strtab = data[strtab_offset:strtab_offset + strtab_size]
    for index in range(shnum):
        name, offset, size = header(index)
        end = strtab.index(b"\0", name)
        if strtab[name:end].decode() == wanted:
            return data[offset:offset + size]
    return None


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's .modinfo section (the last value wins for repeated keys)."""
    section = elf_section(data, ".modinfo") or b""
    info: dict[str, str] = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def modules_dep_from_tree(modules_dir: Path) -> str:
    """A ``modules.dep`` text for an unpacked ``lib/modules/<release>`` tree (Debian ships none: depmod runs at
    install time). Each line lists the module's direct dependencies, read from its .modinfo ``depends=``."""
    shipped = modules_dir / "modules.dep"
    if shipped.exists():
        return shipped.read_text()
    paths = sorted(str(p.relative_to(modules_dir)) for p in modules_dir.rglob("*.ko"))
    by_name = {module_name(path): path for path in paths}
    lines = []
    for path in paths:
        depends = modinfo((modules_dir / path).read_bytes()).get("depends", "")
        deps = [by_name[name.replace("-", "_")] for name in depends.split(",") if name]
        lines.append(f"{path}: {' '.join(deps)}".rstrip())
    return "\n".join(lines) + "\n"


def load_order_text(module_paths: Iterable[str], params: Mapping[str, str] = MODULE_PARAMS) -> str:
    """The initramfs's /lib/modules/load-order: one ``<file> [params]`` line per module, in load order."""
    lines = []
    for path in module_paths:
        name = module_name(path)
        lines.append(f"{name}.ko {params[name]}" if name in params else f"{name}.ko")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# cpio (newc) writer (pure)

class CpioWriter:
    """Writes a ``newc`` cpio archive, the format the kernel unpacks an initramfs from. Timestamps are 0 so the
    same inputs give the same bytes."""

    def __init__(self, out: io.BufferedIOBase):
        self._out = out
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> str:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        return name

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(self._parent(name), stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(name), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a newc archive (used by the tests to check what the builder wrote)."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        if data[offset:offset + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {offset}")
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start:data_start + filesize])
        offset = data_start + filesize + (-filesize % 4)


def build_initramfs(busybox: bytes, kernel_release: str, modules: Mapping[str, bytes], load_order: str) -> bytes:
    """The gzip-compressed initramfs: busybox, /init, the hooks, the modules (file name -> contents)."""
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for directory in ("dev", "proc", "sys", "mnt", "cidata", "run", "tmp", "sbin", "usr/bin", "usr/sbin",
                      "etc/acpi/PWRF", "www/cgi-bin"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    cpio.file("etc/acpi/PWRF/00000080", POWEROFF_SCRIPT.encode(), 0o755)
    cpio.file("etc/status.cgi", STATUS_CGI.encode(), 0o755)
    cpio.file("etc/hostname", f"{DEFAULT_HOSTNAME}\n".encode())
    cpio.file("etc/cumulo-kernel-release", f"{kernel_release}\n".encode())
    cpio.file("lib/modules/load-order", load_order.encode())
    for name, data in modules.items():
        cpio.file(f"lib/modules/{name}", data)
    cpio.close()
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


# ---------------------------------------------------------------------------------------------------------------
# The build

def cache_key() -> str:
    """The cache directory name: format version + a digest of everything in this file that shapes the guest."""
    digest = hashlib.sha256()
    for part in (INIT_SCRIPT, UDHCPC_SCRIPT, POWEROFF_SCRIPT, STATUS_CGI, CMDLINE, repr(WANTED_MODULES),
                 repr(sorted(MODULE_PARAMS.items())), str(DISK_SIZE_MIB), MARKER_TEXT, ROOT_LABEL,
                 ROOT_UUID):
        digest.update(part.encode() + b"\0")
    return f"tiny-guest-v{GUEST_FORMAT_VERSION}-{digest.hexdigest()[:12]}"


def guest_dir() -> Path:
    return toolchain.cache_root() / cache_key()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


REQUIRED_TOOLS = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "mke2fs": "e2fsprogs",
                  "debugfs": "e2fsprogs", "qemu-img": "qemu-utils"}


def _require_tools() -> None:
    missing = [f"{tool} (Debian package {package})" for tool, package in REQUIRED_TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        raise RuntimeError("building the tiny guest needs " + ", ".join(missing) + "; see hack/system-packages.txt")


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{' '.join(argv)} failed ({error.returncode}): {error.stderr.strip()}") from error


def kernel_package_from_depends(text: str) -> str | None:
    """The concrete kernel package in ``apt-cache depends linux-image-cloud-amd64`` output."""
    match = re.search(r"^\s*\|?Depends:\s*(linux-image-[0-9][^\s<>]*-cloud-amd64)\s*$", text, re.M)
    return match.group(1) if match else None


def resolve_kernel_package(log=print) -> str:
    def lookup() -> str | None:
        done = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True)
        return kernel_package_from_depends(done.stdout) if done.returncode == 0 else None

    package = lookup()
    if package is None and os.geteuid() == 0:
        log("apt has no package lists yet; running apt-get update")
        _run(["apt-get", "update", "-qq"])
        package = lookup()
    if package is None:
        raise RuntimeError(f"apt-cache cannot resolve {KERNEL_META_PACKAGE} to a kernel package "
                           "(run 'apt-get update' as root)")
    return package


def _download(packages: list[str], directory: Path) -> dict[str, Path]:
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages], cwd=directory)
    found = {}
    for package in packages:
        debs = sorted(directory.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} left no .deb in {directory}")
        found[package] = debs[-1]
    return found


def _deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()


def _make_disk(work: Path, target: Path) -> None:
    tree = work / "rootfs"
    (tree / "cumulo").mkdir(parents=True)
    (tree / MARKER_FILE).write_text(MARKER_TEXT)
    (tree / "README").write_text("Root disk of the Cumulo tiny guest (cumulo/guestimage.py); its /init keeps "
                                 f"a boot counter in /{BOOT_COUNT_FILE}.\n")
    for path in (tree / "cumulo", tree / MARKER_FILE, tree / "README", tree):
        os.utime(path, (0, 0))
    raw = work / "disk.raw"
    with raw.open("wb") as handle:
        handle.truncate(DISK_SIZE_MIB * 1024 * 1024)
    # Fixed UUIDs, hash seed and clock: the same e2fsprogs makes the same bytes.
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-U", ROOT_UUID,
          "-E", f"root_owner=0:0,hash_seed={ROOT_UUID}", "-d", str(tree), str(raw)],
         env={**os.environ, "E2FSPROGS_FAKE_TIME": "1"})
    # -d copies each file's ctime, which cannot be set on the source files: zero them in the image.
    script = "".join(f"set_inode_field {path} ctime 0\n" for path in ("/", "/cumulo", f"/{MARKER_FILE}", "/README"))
    _run(["debugfs", "-w", "-f", "-", str(raw)], input=script, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1"})
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(target)])


def build(target: Path, log=print) -> TinyGuest:
    """Build the three artefacts and manifest.json into ``target`` (which must not exist yet)."""
    _require_tools()
    started = time.monotonic()
    kernel_package = resolve_kernel_package(log)
    log(f"building the tiny guest from {kernel_package} and {BUSYBOX_PACKAGE} into {target}")
    with tempfile.TemporaryDirectory(prefix="cumulo-tiny-guest-") as tmp:
        work = Path(tmp)
        debs = _download([kernel_package, BUSYBOX_PACKAGE], work)
        kernel_root, busybox_root = work / "kernel", work / "busybox"
        _run(["dpkg-deb", "-x", str(debs[kernel_package]), str(kernel_root)])
        _run(["dpkg-deb", "-x", str(debs[BUSYBOX_PACKAGE]), str(busybox_root)])

        module_roots = [p for base in ("lib/modules", "usr/lib/modules") for p in (kernel_root / base).glob("*")
                        if p.is_dir()]
        if len(module_roots) != 1:
            raise RuntimeError(f"expected one lib/modules/<release> in {kernel_package}, found {module_roots}")
        modules_dir = module_roots[0]
        release = modules_dir.name
        vmlinuz = next((p for base in ("boot", "usr/lib/linux") for p in [kernel_root / base / f"vmlinuz-{release}"]
                        if p.exists()), None)
        if vmlinuz is None:
            raise RuntimeError(f"no vmlinuz-{release} in {kernel_package}")
        busybox_bin = next((p for p in (busybox_root / "bin/busybox", busybox_root / "usr/bin/busybox")
                            if p.exists()), None)
        if busybox_bin is None:
            raise RuntimeError(f"no bin/busybox in {BUSYBOX_PACKAGE}")

        order = resolve_modules(parse_modules_dep(modules_dep_from_tree(modules_dir)), WANTED_MODULES)
        module_files = {}
        for path in order:
            data = (modules_dir / path).read_bytes()
            if path.endswith((".xz", ".gz", ".zst")):
                # Debian 12 ships them uncompressed; a later kernel that compresses them needs decompression here.
                raise RuntimeError(f"{path} is compressed; the tiny guest's busybox insmod needs plain .ko files")
            module_files[f"{module_name(path)}.ko"] = data
        initramfs = build_initramfs(busybox_bin.read_bytes(), release, module_files, load_order_text(order))

        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        (staging / "initrd.img").write_bytes(initramfs)
        _make_disk(work, staging / "disk.qcow2")

        guest = TinyGuest(
            kernel=target / "vmlinuz", initrd=target / "initrd.img", disk=target / "disk.qcow2",
            kernel_sha256=sha256_file(staging / "vmlinuz"), initrd_sha256=sha256_file(staging / "initrd.img"),
            disk_sha256=sha256_file(staging / "disk.qcow2"),
            kernel_package=kernel_package, kernel_package_version=_deb_version(debs[kernel_package]),
            kernel_release=release, busybox_version=_deb_version(debs[BUSYBOX_PACKAGE]),
            modules=tuple(f"{module_name(path)}.ko" for path in order),
        )
        manifest = {**guest.as_dict(), "cache_key": cache_key(), "built_at": time.time(),
                    "build_seconds": round(time.monotonic() - started, 1)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(target)
    log(f"built the tiny guest ({kernel_package} {guest.kernel_package_version}, {len(order)} modules) "
        f"in {time.monotonic() - started:.1f}s")
    return guest


def load(target: Path) -> TinyGuest | None:
    """The cached guest in ``target``, or None if it is not (completely) built."""
    try:
        guest = TinyGuest.from_dict(json.loads((target / "manifest.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if not all(path.exists() for path in (guest.kernel, guest.initrd, guest.disk)):
        return None
    return guest


def ensure_tiny_guest(log=print) -> TinyGuest:
    """Build the tiny guest unless the cache has it (safe against concurrent callers); return it."""
    target = guest_dir()
    guest = load(target)
    if guest is not None:
        return guest
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "tiny-guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        guest = load(target)
        if guest is not None:
            return guest
        if target.exists():  # a broken earlier build
            shutil.rmtree(target)
        return build(target, log)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    guest = ensure_tiny_guest(lambda message: print(message, file=sys.stderr))
    if "--json" in args:
        print(json.dumps(guest.as_dict(), indent=2))
    else:
        for key in ("kernel", "initrd", "disk", "cmdline", "kernel_sha256", "initrd_sha256", "disk_sha256",
                    "kernel_package", "kernel_package_version", "kernel_release", "min_memory_mib"):
            print(f"{key}={getattr(guest, key)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
