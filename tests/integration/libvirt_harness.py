"""A private libvirtd for tests: real libvirtd + QEMU driver, isolated from the machine's own.

libvirtd running as root always uses the system paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /var/cache/libvirt), so each instance runs in its own mount namespace
(``unshare --mount``) with private directories bind-mounted over those paths; its sockets live in
its work directory, reached as ``qemu:///system?socket=<workdir>/libvirt-sock``. Nothing is shared
between instances or with a system libvirtd, and nothing outlives :meth:`PrivateLibvirtd.stop`.

Facts of these machines the setup relies on:

* The QEMU driver refuses to start unless the ``libvirt-qemu`` user and group exist (Debian's
  compiled-in default), even with ``user = "root"`` in qemu.conf. The namespace gets private copies
  of /etc/passwd and /etc/group with those entries added, so the machine's files stay untouched.
* There is no systemd and no virtlogd: ``stdio_handler = "file"`` writes guest consoles to files.
* The bind mounts need their mount points: the five libvirt directories above are created
  (empty) if missing, as the libvirt-daemon-system package would.
* KVM is not usable (no vmx/svm): tests use TCG (domain type ``qemu``).
* A fresh libvirtd probes the QEMU binary for ~8 s before answering. The probe results
  (/var/cache/libvirt/qemu/capabilities) are kept in ``<CUMULO_CACHE>/libvirt-qemu-capabilities``
  and seeded into each instance, which then starts in ~0.1 s; libvirt itself checks that a cached
  entry still matches the QEMU binary, libvirt version, kernel and CPU, and re-probes if not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
QEMU_USER = "libvirt-qemu"
CAPABILITIES = Path("qemu") / "capabilities"


def default_cache_dir() -> Path:
    from cumulo import toolchain

    return toolchain.cache_root() / "libvirt-qemu-capabilities"


class LibvirtUnavailable(RuntimeError):
    """This machine cannot run a private libvirtd; the message says why (tests skip with it)."""


def unavailable_reason() -> str | None:
    """Why a private libvirtd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount namespace and bind mounts)"
    for binary, package in (("libvirtd", "libvirt-daemon"), ("unshare", "util-linux"),
                            ("qemu-system-x86_64", "qemu-system-x86")):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package {package}; run hack/install-system-deps)"
    if not list(Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_qemu.so")):
        return "the libvirt QEMU driver is not installed (Debian package libvirt-daemon-driver-qemu)"
    try:
        import libvirt  # noqa: F401
    except ImportError as error:
        return f"libvirt-python is not importable: {error}"
    return None


def _pdeathsig() -> None:
    # libvirtd dies with the test process even when that is SIGKILLed (see cumulo.envtest).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class PrivateLibvirtd:
    """One private libvirtd. Use as a context manager, or start()/stop()."""

    def __init__(self, workdir: Path | str | None = None, *, cache_dir: Path | None = None) -> None:
        # A short path: the socket path must fit in sun_path (108 bytes).
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cumulo-lv-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()

    @property
    def socket(self) -> Path:
        return self.workdir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "libvirtd.log"

    def __enter__(self) -> PrivateLibvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_config(self) -> None:
        for name in SYSTEM_DIRS:
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        etc = self.workdir / "etc"
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.workdir}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'unix_sock_ro_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            'log_outputs = "3:stderr"\n'  # warnings and errors, into libvirtd.log
        )
        (etc / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            'dynamic_ownership = 0\n'
            'remember_owner = 0\n'
            'stdio_handler = "file"\n'  # no virtlogd
            'security_driver = "none"\n'  # no AppArmor/SELinux here
        )
        cache = self.workdir / "cache" / CAPABILITIES
        cache.mkdir(parents=True, exist_ok=True)
        if self.cache_dir.is_dir():
            for entry in self.cache_dir.glob("*.xml"):
                shutil.copy2(entry, cache / entry.name)
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        if not any(line.startswith(f"{QEMU_USER}:") for line in passwd.splitlines()):
            passwd += f"{QEMU_USER}:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        if not any(line.startswith(f"{QEMU_USER}:") for line in group.splitlines()):
            group += f"{QEMU_USER}:x:64055:\n"
        (self.workdir / "passwd").write_text(passwd)
        (self.workdir / "group").write_text(group)

    def _script(self) -> str:
        mounts = [f"mount --bind {self.workdir / 'passwd'} /etc/passwd",
                  f"mount --bind {self.workdir / 'group'} /etc/group"]
        mounts += [f"mount --bind {self.workdir / name} {target}" for name, target in SYSTEM_DIRS.items()]
        return "set -e\n" + "\n".join(mounts) + (
            f"\nexec libvirtd --config {self.workdir / 'etc' / 'libvirtd.conf'} "
            f"--pid-file {self.workdir / 'libvirtd.pid'}\n")

    def start(self, timeout: float = 60.0) -> PrivateLibvirtd:
        reason = unavailable_reason()
        if reason is not None:
            raise LibvirtUnavailable(reason)
        import libvirt

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        for target in SYSTEM_DIRS.values():
            os.makedirs(target, exist_ok=True)  # mount points only; see the module docstring
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", self._script()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_pdeathsig)
        deadline = time.monotonic() + timeout
        libvirt.registerErrorHandler(lambda *_: None, None)
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise LibvirtUnavailable(f"libvirtd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    connection = libvirt.open(self.uri)
                    try:
                        connection.getVersion()  # the QEMU driver is initialised
                        self._save_capabilities()
                        return self
                    finally:
                        connection.close()
                except libvirt.libvirtError as error:
                    last = str(error)
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtUnavailable(f"libvirtd not answering after {timeout:.0f}s ({last}):\n{self.log_tail()}")
            time.sleep(0.05)

    def _save_capabilities(self) -> None:
        """Keep new probe results for the next instance (written to a temporary name, then renamed,
        so a concurrent reader never sees half a file)."""
        with contextlib.suppress(OSError):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for entry in (self.workdir / "cache" / CAPABILITIES).glob("*.xml"):
                target = self.cache_dir / entry.name
                if not target.exists() or target.stat().st_mtime < entry.stat().st_mtime:
                    partial = target.with_suffix(f".{os.getpid()}.tmp")
                    shutil.copy2(entry, partial)
                    partial.replace(target)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Destroy any guests left behind, then stop libvirtd (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._destroy_domains()
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _destroy_domains(self) -> None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            connection = libvirt.open(self.uri)
            try:
                for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
            finally:
                connection.close()
