"""The one way the agent runs host commands (``qemu-img`` today): a small Protocol and a subprocess implementation.

Every shell-out goes through an :class:`Executor`, so tests replace it with a fake that records the argv and
answers with canned output, and so the agent bounds how many commands run at once (qemu-img on a slow disk
must not pile up). Commands never go through a shell: argv lists only.

:class:`QemuImg` wraps the few ``qemu-img`` calls the agent makes and turns failures into :class:`CommandError`
with a stable, short message (the last line of stderr), fit for a status field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import typing as t
from collections.abc import Mapping, Sequence

DEFAULT_TIMEOUT = 120.0
COPY_TIMEOUT = 3600.0
"""Whole-disk copies (snapshots, backups, migrations) take as long as the disk is big."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """A command failed, timed out or could not be started; the message is stable (no durations, no pids)."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@t.runtime_checkable
class Executor(t.Protocol):
    async def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        """Run ``argv`` (no shell) to completion; the result whatever the exit status. Raises
        :class:`CommandError` only when the command cannot be started or outlives ``timeout``."""
        ...


def _summary(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check(result: CommandResult, what: str | None = None) -> CommandResult:
    """``result`` if the command succeeded, else :class:`CommandError` saying why."""
    if result.returncode == 0:
        return result
    name = what or os.path.basename(result.argv[0])
    detail = _summary(result.stderr) or _summary(result.stdout) or "no output"
    raise CommandError(f"{name} failed (exit {result.returncode}): {detail}", result)


class SubprocessExecutor:
    """Runs commands as child processes, at most ``concurrency`` at a time. A command that outlives its
    timeout is killed with its whole process group."""

    def __init__(self, concurrency: int = 4, environment: Mapping[str, str] | None = None) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        # A fixed locale: messages parsed or reported must not change with the machine's language.
        self._env = {**os.environ, "LC_ALL": "C", **(environment or {})}

    async def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        argv = tuple(str(arg) for arg in argv)
        async with self._slots:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=self._env, start_new_session=True)
            except OSError as error:
                raise CommandError(f"cannot run {argv[0]}: {error.strerror or error}") from None
            try:
                stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
            except (TimeoutError, asyncio.CancelledError) as error:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await process.wait()
                if isinstance(error, asyncio.CancelledError):
                    raise
                raise CommandError(f"{os.path.basename(argv[0])} did not finish within {timeout:g}s") from None
        return CommandResult(argv, process.returncode if process.returncode is not None else -1,
                             stdout.decode(errors="replace"), stderr.decode(errors="replace"))


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about an image file."""

    format: str               # qemu's driver name: qcow2, raw, vmdk...
    virtual_size: int
    actual_size: int | None   # bytes the file takes on disk
    backing_file: str | None
    backing_format: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, t.Any]) -> ImageInfo:
        return cls(format=str(data.get("format", "")), virtual_size=int(data.get("virtual-size", 0)),
                   actual_size=int(data["actual-size"]) if data.get("actual-size") is not None else None,
                   backing_file=data.get("full-backing-filename") or data.get("backing-filename"),
                   backing_format=data.get("backing-filename-format"))


class QemuImg:
    """The ``qemu-img`` calls of the agent, through an :class:`Executor`."""

    def __init__(self, executor: Executor, binary: str = "qemu-img", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.executor = executor
        self.binary = binary
        self.timeout = timeout

    async def info(self, path: str, *, force_share: bool = True) -> ImageInfo:
        """Probe ``path`` (the format is detected, never given: an untrusted image is not taken at its word).
        ``force_share`` (-U) reads images a running guest holds locked."""
        argv = [self.binary, "info", "--output=json"]
        if force_share:
            argv.append("-U")
        argv.append(path)
        result = check(await self.executor.run(argv, timeout=self.timeout), "qemu-img info")
        try:
            data = json.loads(result.stdout)
        except ValueError:
            raise CommandError("qemu-img info printed no JSON", result) from None
        if not isinstance(data, dict):
            raise CommandError("qemu-img info printed unexpected JSON", result)
        return ImageInfo.from_json(data)

    async def create(self, path: str, size_bytes: int, *, backing: str | None = None,
                     backing_format: str | None = None) -> None:
        argv = [self.binary, "create", "-q", "-f", "qcow2"]
        if backing is not None:
            argv += ["-F", backing_format or "qcow2", "-b", backing]
        argv += [path, str(size_bytes)]
        check(await self.executor.run(argv, timeout=self.timeout), "qemu-img create")

    async def resize(self, path: str, size_bytes: int, *, image_format: str = "qcow2") -> None:
        argv = [self.binary, "resize", "-q", "-f", image_format, path, str(size_bytes)]
        check(await self.executor.run(argv, timeout=self.timeout), "qemu-img resize")

    async def convert(self, source: str, target: str, *, output_format: str = "qcow2", compress: bool = False,
                      timeout: float | None = None) -> None:
        """Write ``source``'s guest-visible content (its backing chain flattened) to a new image ``target``.
        -U reads an image a guest holds open (only ever a copy the guest does not write)."""
        argv = [self.binary, "convert", "-q", "-U", "-O", output_format]
        if compress:
            argv.append("-c")
        argv += [source, target]
        check(await self.executor.run(argv, timeout=timeout or COPY_TIMEOUT), "qemu-img convert")

    async def compare(self, first: str, second: str, *, timeout: float | None = None) -> bool:
        """Whether both images show the guest the same content (``qemu-img compare`` reads both whole; areas
        allocated in one and unallocated in the other compare equal when they read as zeros; sizes: see
        :meth:`info`)."""
        argv = [self.binary, "compare", "-q", "-U", first, second]
        result = await self.executor.run(argv, timeout=timeout or COPY_TIMEOUT)
        if result.returncode in (0, 1):
            return result.returncode == 0
        check(result, "qemu-img compare")
        return False
