"""Local processes of Cumulo's tooling (envtest, private libvirtds, ``make up``): started either tied to
their parent or detached, recorded in JSON state files and found again later by PID *and* start time.

* :func:`spawn` starts a child in its own session (a terminal's Ctrl-C does not hit it half-way). Unless
  detached, it also gets ``PR_SET_PDEATHSIG`` (SIGKILL), so it dies with the Python process even when
  that is SIGKILLed. Linux delivers the signal when the *thread* that forked the child exits, so start
  non-detached children from a long-lived thread (normally the main thread).
* :class:`Record` is what a state file keeps of a detached process: its PID and the kernel's start time
  of that PID, so a recycled PID in a stale state file is never mistaken for (or killed as) the process.
* :func:`terminate` ends a recorded process: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_INTERVAL = 0.05  # seconds between polls of a process or a readiness check
_PR_SET_PDEATHSIG = 1


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` runs and (if ``start_time`` is given) is still the process that was recorded."""
    current = proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def reap(pid: int) -> None:
    """Collect ``pid`` if it is an exited child of ours (it would otherwise linger as a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pid: int, start_time: int | None, timeout: float, *, kill_timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; only if the PID is still the same process."""
    if not alive(pid, start_time):
        reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(pid)
        if not alive(pid, start_time):
            return
        time.sleep(POLL_INTERVAL / 2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + kill_timeout
    while alive(pid, start_time) and time.monotonic() < deadline:
        reap(pid)
        time.sleep(POLL_INTERVAL / 2)


def terminate_all(records: Sequence[tuple[int, int | None]], timeout: float, *, kill_timeout: float = 5.0) -> None:
    """:func:`terminate` for several processes at once: all get SIGTERM together, then one grace period."""
    running = [(pid, start) for pid, start in records if alive(pid, start)]
    for pid, _ in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        for pid, _ in running:
            reap(pid)
        running = [(pid, start) for pid, start in running if alive(pid, start)]
        if running:
            time.sleep(POLL_INTERVAL / 2)
    for pid, start in running:
        terminate(pid, start, 0, kill_timeout=kill_timeout)  # SIGKILL


def pdeathsig_hook(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGKILL the child when its parent goes away.

    SIGKILL, not SIGTERM: a SIGTERMed kube-apiserver whose etcd is shutting down hangs in its shutdown
    hooks (still alive after 30 s in a trial) while etcd waits 5 s for the apiserver's streams. The
    children this is used for are crash-safe, and an orphan's data is throw-away anyway.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def spawn(argv: Sequence[str], log: Path, *, detach: bool, cwd: Path | str | None = None,
          env: Mapping[str, str] | None = None, banner: bool = True) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log``.

    ``detach=False`` ties the child's life to this process (PR_SET_PDEATHSIG); ``detach=True`` lets it
    outlive Python (record it with :meth:`Record.of` to find it again). ``banner`` writes a dated line
    with the command first, so a log that several runs append to says where each run starts.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        if banner:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            env=None if env is None else dict(env), start_new_session=True,
            preexec_fn=None if detach else pdeathsig_hook(os.getpid()))


def size(path: Path) -> int:
    """The size of a file, 0 if missing (an offset to read a log from)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, from byte ``offset`` on."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError:
        return f"({path} missing)"
    return "\n".join(text.splitlines()[-lines:])


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a state file; None if missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a state file atomically (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


@dataclass(frozen=True)
class Record:
    """A detached process as a state file keeps it: its PID and that PID's start time."""

    pid: int
    start_time: int | None

    @classmethod
    def of(cls, pid: int) -> Record:
        return cls(pid, proc_start_time(pid))

    @classmethod
    def from_json(cls, data: Any) -> Record | None:
        """The record in a state file's entry (a mapping with ``pid`` and ``start_time``), None if malformed."""
        try:
            pid, start_time = data["pid"], data.get("start_time")
        except (KeyError, TypeError, AttributeError):
            return None
        if not isinstance(pid, int) or not (start_time is None or isinstance(start_time, int)):
            return None
        return cls(pid, start_time)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time}

    @property
    def alive(self) -> bool:
        return alive(self.pid, self.start_time)

    def terminate(self, timeout: float = 10.0) -> None:
        terminate(self.pid, self.start_time, timeout)
