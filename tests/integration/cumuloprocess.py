"""A Cumulo process a test starts itself (a controller under test), with its log; importable by a unique name
(``conftest`` is ambiguous when the whole suite runs, tests/e2e has one too)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def console_script(name: str) -> str:
    """A console script of this virtualenv (cumulo-controller, cumulo-agent)."""
    return str(Path(sys.executable).with_name(name))


class CumuloProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self, kill: bool = True) -> None:
        """Stop (SIGKILL by default: a crash) and start the same command again."""
        self.stop(kill=kill)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {text!r} within {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean stop) or SIGKILL (a crash); reaped either way."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def free_port() -> int:
    """A TCP port free on loopback right now (metrics, health and webhook ports of processes under test)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
