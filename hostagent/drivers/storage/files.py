"""Files the storage drivers write on a directory (a pool or the image store): whole copies are written under a
temporary name, flushed, then renamed, so a crash never leaves a half copy under the real name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import typing as t

from ...executor import CommandError
from . import StorageError

COPYING_SUFFIX = ".copying"


def fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def unlink_all(names: t.Iterable[str]) -> None:
    """Remove each file; one already gone is fine."""
    for name in names:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StorageError(f"cannot delete {name}: {error.strerror or error}") from None


async def write_then_rename(target: str, write: t.Callable[[str], t.Awaitable[object]]) -> None:
    """``write(temporary)`` makes the file at ``<target>.copying`` (a crash's leftover there is removed first); it
    is then flushed and renamed to ``target``. On failure the temporary file goes and :class:`StorageError` says
    why."""
    temporary = target + COPYING_SUFFIX
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    except OSError as error:
        raise StorageError(f"cannot prepare {target}: {error.strerror or error}") from None
    try:
        await write(temporary)
        await asyncio.to_thread(fsync, temporary)
        os.replace(temporary, target)
    except (StorageError, CommandError, OSError) as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise StorageError(str(error)) from None
