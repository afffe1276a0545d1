"""End-to-end tier helpers: the tiny real guest (built once per session) and QEMU processes driven over QMP.

``tiny_guest`` builds (or finds in the cache) the guest of ``cumulo.guestimage``; ``qemu_vm`` starts guests
directly with ``qemu-system-x86_64`` (TCG), serial console captured to a file, and kills whatever is left at
teardown. The ``make_overlay`` and ``make_nocloud_iso`` fixtures return helper functions.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cumulo import guestimage

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def tiny_guest() -> guestimage.TinyGuest:
    """The tiny guest's kernel, initrd and root disk; skips the tests only when QEMU is not installed."""
    for tool, package in ((QEMU, "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"{tool} is not installed (Debian package {package}, listed in hack/system-packages.txt; "
                        "run hack/install-system-deps)")
    started = time.monotonic()
    guest = guestimage.ensure_tiny_guest(log=lambda message: print(f"[tiny guest] {message}"))
    print(f"[tiny guest] ready in {time.monotonic() - started:.1f}s: {guest.directory}")
    return guest


class QMP:
    """A minimal QEMU Machine Protocol client (one command at a time; events are kept in ``events``)."""

    def __init__(self, path: Path, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.settimeout(timeout)
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._file = self._sock.makefile("rw")
        self.events: list[dict] = []
        json.loads(self._file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments) -> object:
        self._file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError(f"QMP closed while waiting for {command}")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            else:
                return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class QemuVM:
    """One ``qemu-system-x86_64 -accel tcg`` process booting the tiny guest by direct kernel boot."""

    def __init__(self, guest: guestimage.TinyGuest, workdir: Path, name: str, *, disk: Path,
                 memory_mib: int = guestimage.RECOMMENDED_MEMORY_MIB, machine: str = "q35",
                 extra_args: list[str] | None = None):
        self.name, self.workdir = name, workdir
        self.console_path = workdir / f"{name}.console.log"
        self.qmp_path = workdir / f"{name}.qmp"
        self.argv = [
            QEMU, "-machine", machine, "-accel", "tcg", "-m", str(memory_mib), "-smp", "1",
            "-nographic", "-nodefaults", "-no-user-config",
            "-serial", f"file:{self.console_path}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline,
            "-drive", f"file={disk},format=qcow2,if=virtio",
            *(extra_args or []),
        ]
        self.popen: subprocess.Popen | None = None
        self.started_at = 0.0
        self._qmp: QMP | None = None

    def start(self) -> QemuVM:
        self.console_path.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        self._stderr = (self.workdir / f"{self.name}.qemu.log").open("wb")
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = QMP(self.qmp_path)
        return self._qmp

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float = 60.0, after: int = 0) -> re.Match:
        """Wait until the console (from offset ``after``) matches the regular expression ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            match = regex.search(self.console(), after)
            if match:
                return match
            if not self.running():
                raise AssertionError(f"{self.name}: QEMU exited ({self.popen.returncode}) before {pattern!r}; "
                                     f"console:\n{self.console()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout:.0f}s; "
                                     f"console:\n{self.console()[-3000:]}")
            time.sleep(0.1)

    def wait_line(self, line: str, timeout: float = 60.0, after: int = 0) -> re.Match:
        """Wait for an exact console line."""
        return self.wait_for(rf"^{re.escape(line)}\r?$", timeout, after)

    def wait_exit(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.running():
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)
            self._stderr.close()


@pytest.fixture(scope="module")
def qemu_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QemuVM]]:
    """Factory: ``qemu_vm(guest, name, disk=..., ...)`` starts a VM; whatever still runs is killed at the end of
    the module (module scope, so a boot can be shared by several tests)."""
    vms: list[QemuVM] = []
    workdir = tmp_path_factory.mktemp("qemu")

    def start(guest: guestimage.TinyGuest, name: str, **kwargs) -> QemuVM:
        vm = QemuVM(guest, workdir, name, **kwargs).start()
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.kill()


def _make_overlay(base: Path, path: Path) -> Path:
    """A qcow2 overlay over a (read-only) base image, as a VM's root disk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
                   check=True)
    return path


def _make_nocloud_iso(path: Path, user_data: bytes, meta_data: bytes) -> Path:
    """A cloud-init NoCloud config drive (iso9660, label ``cidata``, Joliet + Rock Ridge names), made with
    pycdlib when the virtualenv has it, else genisoimage or xorriso."""
    files = {"user-data": user_data, "meta-data": meta_data}
    try:
        import pycdlib
    except ImportError:
        pycdlib = None
    if pycdlib is not None:
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=guestimage.CONFIG_DRIVE_LABEL)
        for name, data in files.items():
            iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
        iso.write(str(path))
        iso.close()
        return path
    source = path.with_suffix(".d")
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    label = guestimage.CONFIG_DRIVE_LABEL
    if shutil.which("genisoimage"):
        argv = ["genisoimage", "-quiet", "-output", str(path), "-volid", label, "-joliet", "-rock", str(source)]
    elif shutil.which("xorriso"):
        argv = ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(path), "-volid", label, "-joliet",
                "-rock", str(source)]
    else:
        pytest.skip(reason="no way to make a NoCloud ISO: pycdlib is not in the virtualenv and neither genisoimage nor "
                    "xorriso is installed (hack/system-packages.txt lists genisoimage)")
    subprocess.run(argv, check=True)
    return path


# Helpers as fixtures: test modules cannot import this conftest (the tiers' conftests share the module name).

@pytest.fixture(scope="session")
def make_overlay() -> Callable[[Path, Path], Path]:
    """``make_overlay(base, path)``: a qcow2 overlay over a read-only base image."""
    return _make_overlay


@pytest.fixture(scope="session")
def make_nocloud_iso() -> Callable[[Path, bytes, bytes], Path]:
    """``make_nocloud_iso(path, user_data, meta_data)``: a NoCloud config drive ISO."""
    return _make_nocloud_iso
