"""The storage driver interface: can this host use a primary pool or image store directory?

Implementations: :mod:`.filesystem` (a real directory: exists, writable, statvfs) and
:mod:`.simulator` (configured capacity, ``storage`` fault injection). RBD comes with a later issue.
"""

from __future__ import annotations

import typing as t

from controllers.api.v1alpha1.host import StorageReport


@t.runtime_checkable
class StorageDriver(t.Protocol):
    async def check(self, path: str, *, create: bool, writable: bool = True) -> StorageReport:
        """Check the directory ``path``: create it first when ``create`` (local storage the host
        owns), require write access when ``writable``. Never raises for an unusable directory: the
        report says why (``reachable=False`` with a message)."""
        ...

    async def close(self) -> None:
        ...
