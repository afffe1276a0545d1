"""A private libvirtd: real libvirtd + QEMU driver, isolated from the machine's own.

The local cloud (``make up``) runs one per host (the "hypervisor" of host1, host2, ...); the
integration tests start one per test. Each instance runs in its own mount namespace
(``unshare --mount``) with private directories bind-mounted over the system paths libvirtd running as
root always uses (/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt);
its sockets live in its work directory, reached as ``qemu:///system?socket=<workdir>/libvirt-sock``.
Nothing is shared between instances or with a system libvirtd.

``netns``: a simulated host (a network namespace, :mod:`cumulo.netlab`) gets its libvirtd started inside that
namespace (``ip netns exec``), so QEMU's taps are made there and plug into the host's bridges; the sockets are
files in the work directory, reached from any namespace.

``listen``: an address of the namespace (a lab host's underlay address) on which this libvirtd accepts peers for live
migration: ``listen_tcp`` there with ``auth_tcp = "none"`` (tests only; production uses TLS), its own ``host_uuid``
(two daemons of one machine would otherwise share the SMBIOS UUID and libvirt refuses to migrate to "the same
host"), and ``migration_host`` set to the address (else the source's QEMU connects to the hostname, which resolves
to 127.0.0.1).

Two modes, like :mod:`cumulo.envtest`:

* attached (``start()``, or a context manager): libvirtd dies with the Python process, even when that
  is SIGKILLed (PR_SET_PDEATHSIG), and nothing outlives :meth:`PrivateLibvirtd.stop`.
* detached (``start(detach=True)``, for ``make up``): libvirtd outlives Python; its PID, start time and
  paths are kept in ``<workdir>/state.json``, :meth:`PrivateLibvirtd.attach` finds it again, a second
  ``start(detach=True)`` in the same work directory reuses it, and :meth:`PrivateLibvirtd.stop` destroys
  its guests and ends it. Guests (QEMU processes) are libvirtd's children but outlive it, so a libvirtd
  that died on its own is reconnected to them by the next start (their status stays in ``<workdir>/run``);
  ``stop()`` kills those a dead libvirtd left behind.

Facts of these machines the setup relies on:

* The QEMU driver refuses to start unless the ``libvirt-qemu`` user and group exist (Debian's
  compiled-in default), even with ``user = "root"`` in qemu.conf. The namespace gets private copies
  of /etc/passwd and /etc/group with those entries added, so the machine's files stay untouched.
* There is no systemd and no virtlogd: ``stdio_handler = "file"`` writes guest consoles to files.
* The bind mounts need their mount points: the five libvirt directories above are created
  (empty) if missing, as the libvirt-daemon-system package would.
* KVM is not usable (no vmx/svm): guests run under TCG (domain type ``qemu``).
* A fresh libvirtd probes the QEMU binary for ~8 s before answering. The probe results
  (/var/cache/libvirt/qemu/capabilities) are kept in ``<CUMULO_CACHE>/libvirt-qemu-capabilities``
  and seeded into each instance, which then starts in ~0.1 s; libvirt itself checks that a cached
  entry still matches the QEMU binary, libvirt version, kernel and CPU, and re-probes if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cumulo import processes

SYSTEM_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
QEMU_USER = "libvirt-qemu"
CAPABILITIES = Path("qemu") / "capabilities"
STATE_FILE = "state.json"
_SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL
_SOCKETS = ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock")


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


class PrivateLibvirtd:
    """One private libvirtd. Use as a context manager, or start()/stop()."""

    def __init__(self, workdir: Path | str | None = None, *, cache_dir: Path | None = None,
                 netns: str | None = None, listen: str | None = None) -> None:
        # A short path: the socket path must fit in sun_path (108 bytes).
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cumulo-lv-")).absolute()
        self.proc: subprocess.Popen[bytes] | None = None
        self.record: processes.Record | None = None  # the running libvirtd (attached or detached)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.startup_seconds: float | None = None  # None when start() found one running
        # A simulated host's network namespace: libvirtd (and so QEMU and its taps) runs inside it.
        self.netns = netns
        self.listen = listen  # TCP address for live migration peers (see the module docstring)

    @property
    def socket(self) -> Path:
        return self.workdir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "libvirtd.log"

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    @property
    def pid(self) -> int | None:
        return self.record.pid if self.record is not None else None

    @property
    def running(self) -> bool:
        return self.record is not None and self.record.alive

    def __enter__(self) -> PrivateLibvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, workdir: Path | str, *, cache_dir: Path | None = None) -> PrivateLibvirtd | None:
        """The detached libvirtd running in ``workdir`` (from its state.json), or None if none runs there."""
        daemon = cls(workdir, cache_dir=cache_dir)
        record = processes.Record.from_json(processes.read_json(daemon.state_path))
        if record is None or not record.alive:
            return None
        daemon.record = record
        return daemon

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
            + (f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.listen}"\nauth_tcp = "none"\n'
               f'host_uuid = "{uuid.uuid5(uuid.NAMESPACE_URL, str(self.workdir))}"\n' if self.listen else "")
        )
        (etc / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            'dynamic_ownership = 0\n'
            'remember_owner = 0\n'
            'stdio_handler = "file"\n'  # no virtlogd
            'security_driver = "none"\n'  # no AppArmor/SELinux here
            + (f'migration_host = "{self.listen}"\nmigration_address = "{self.listen}"\n' if self.listen else "")
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
            f"\nexec libvirtd {'--listen ' if self.listen else ''}--config {self.workdir / 'etc' / 'libvirtd.conf'} "
            f"--pid-file {self.workdir / 'libvirtd.pid'}\n")

    def start(self, timeout: float = 60.0, *, detach: bool = False) -> PrivateLibvirtd:
        """Start libvirtd and wait until its QEMU driver answers.

        With ``detach=True`` libvirtd outlives this Python process and is recorded in
        ``<workdir>/state.json``; if the work directory already holds a live one, it is reused
        (idempotent). Needs an explicit work directory then.
        """
        if self.running:
            return self
        reason = unavailable_reason()
        if reason is not None:
            raise LibvirtUnavailable(reason)
        if detach and self._owns_workdir:
            raise ValueError("a detached libvirtd needs a work directory to be found again")
        longest = max(len(str(self.workdir / name).encode()) for name in _SOCKETS)
        if longest > _SUN_PATH_MAX:
            raise LibvirtUnavailable(f"the work directory {self.workdir} is too long for libvirtd's sockets "
                                     f"({longest} > {_SUN_PATH_MAX} bytes); use a shorter path")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Two starters in one work directory: the second waits, then finds the first one's libvirtd.
        with (self.workdir / "start.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked(timeout, detach)

    def _start_locked(self, timeout: float, detach: bool) -> PrivateLibvirtd:
        import libvirt

        recorded = processes.Record.from_json(processes.read_json(self.state_path))
        if recorded is not None and recorded.alive:
            if not detach:
                raise LibvirtUnavailable(f"a libvirtd already runs in {self.workdir}; use PrivateLibvirtd.attach()")
            self.record, self._owns_workdir = recorded, False
            return self
        self.state_path.unlink(missing_ok=True)
        for name in _SOCKETS:  # a dead libvirtd's sockets
            (self.workdir / name).unlink(missing_ok=True)
        started = time.monotonic()
        self._write_config()
        for target in SYSTEM_DIRS.values():
            os.makedirs(target, exist_ok=True)  # mount points only; see the module docstring
        offset = processes.size(self.log_path)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} libvirtd{' (detached)' if detach else ''}\n"
                      .encode())
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = processes.spawn(
            [*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c", self._script()], self.log_path,
            detach=detach, banner=False)
        # ip netns exec, unshare and sh exec, so the PID is libvirtd's own.
        self.record = processes.Record.of(self.proc.pid)
        if detach:  # recorded at once, so that even an interrupted start can be stopped later
            processes.write_json(self.state_path, self._state())
        deadline = time.monotonic() + timeout
        libvirt.registerErrorHandler(lambda *_: None, None)
        last = ""
        while True:
            if self.proc.poll() is not None:
                code, self.proc, self.record = self.proc.returncode, None, None
                self.state_path.unlink(missing_ok=True)
                raise LibvirtUnavailable(f"libvirtd exited with {code}; {self.log_path}:\n"
                                         f"{processes.tail(self.log_path, offset, 30)}")
            if self.socket.exists():
                try:
                    connection = libvirt.open(self.uri)
                    try:
                        connection.getVersion()  # the QEMU driver is initialised
                        break
                    finally:
                        connection.close()
                except libvirt.libvirtError as error:
                    last = str(error)
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtUnavailable(f"libvirtd not answering after {timeout:.0f}s ({last}); {self.log_path}:\n"
                                         f"{processes.tail(self.log_path, offset, 30)}")
            time.sleep(0.05)
        self._save_capabilities()
        self.startup_seconds = time.monotonic() - started
        if detach:
            self._owns_workdir = False
        return self

    def _state(self) -> dict[str, Any]:
        assert self.record is not None
        return {"version": 1, **self.record.to_json(), "workdir": str(self.workdir), "uri": self.uri,
                "socket": str(self.socket), "log": str(self.log_path)}

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

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Destroy any guests left behind, then stop libvirtd (SIGTERM, then SIGKILL). Idempotent.

        Also stops a detached libvirtd recorded in the work directory that this object did not start,
        and kills guests a dead libvirtd left running. Returns the names of the guests it destroyed.
        """
        proc, self.proc = self.proc, None
        record = self.record or processes.Record.from_json(processes.read_json(self.state_path))
        self.record = None
        destroyed: list[str] = []
        if proc is not None and proc.poll() is None:
            destroyed = self._destroy_domains()
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        elif record is not None and record.alive:
            destroyed = self._destroy_domains()
            record.terminate(timeout)
        destroyed += self._kill_orphan_guests()
        self.state_path.unlink(missing_ok=True)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return destroyed

    def _destroy_domains(self) -> list[str]:
        import libvirt

        destroyed = []
        with contextlib.suppress(libvirt.libvirtError):
            connection = libvirt.open(self.uri)
            try:
                for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
                        destroyed.append(domain.name())
            finally:
                connection.close()
        return destroyed

    def _kill_orphan_guests(self) -> list[str]:
        """SIGKILL the QEMU processes of guests whose libvirtd is gone (their PID files stay in
        ``<workdir>/run/qemu``); a PID is only killed if it still is that guest's QEMU."""
        killed = []
        for pid_file in (self.workdir / "run" / "qemu").glob("*.pid"):
            name = pid_file.stem
            try:
                pid = int(pid_file.read_text().strip())
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            parts = {part for arg in argv for part in arg.split(b",")}
            if b"qemu" not in Path(os.fsdecode(argv[0])).name.encode() or f"guest={name}".encode() not in parts:
                continue  # a recycled PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
        return killed
