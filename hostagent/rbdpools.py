"""The agent's RBD pools: one :class:`~hostagent.drivers.storage.rbd.RbdStorageDriver` (and so one Ceph
connection) per StoragePool, made on first use and kept while the pool's monitors, Ceph pool, client and key
stay the same; closed when they change and at shutdown.

The key comes from the Secret the pool's ``spec.rbd.secretRef`` names, read (GET by name, like a guest's user
data) each time a driver is asked for, at most once per :data:`KEY_TTL` seconds: a rotated key reaches the agent
within that time, a wrong one makes the pool unreachable with Ceph's own message. Errors are
:class:`~hostagent.drivers.storage.StorageError` with a message fit for a status field (naming the Secret,
never its data).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import typing as t

from .drivers.storage import StorageError
from .kube import AsyncKube, KubeError, resource_path

log = logging.getLogger(__name__)

KEY_TTL = 30.0


def access_of(rbd: t.Mapping[str, t.Any], key: str) -> t.Any:
    from .drivers.storage.rbd import RbdAccess

    return RbdAccess(monitors=tuple(rbd.get("monitors") or ()), pool=str(rbd.get("pool", "")),
                     user=str(rbd.get("user") or "admin"), key=key)


class RbdPools:
    def __init__(self, api: AsyncKube, host: str) -> None:
        self.api = api
        self.host = host
        self._drivers: dict[str, t.Any] = {}
        self._keys: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._lock = asyncio.Lock()

    async def key(self, rbd: t.Mapping[str, t.Any]) -> str:
        ref = rbd.get("secretRef") or {}
        namespace, name, field = str(ref.get("namespace", "")), str(ref.get("name", "")), str(ref.get("key", ""))
        cached = self._keys.get((namespace, name, field))
        if cached is not None and time.monotonic() - cached[0] < KEY_TTL:
            return cached[1]
        where = f"Ceph key Secret {namespace}/{name}"
        try:
            secret = await self.api.request("GET", resource_path("", "v1", "secrets", name, namespace=namespace))
        except KubeError as error:
            if error.status == 404:
                raise StorageError(f"{where} does not exist") from None
            if error.status == 403:
                raise StorageError(f"{where} cannot be read by the agent: {error.message}") from None
            raise StorageError(f"{where} cannot be read: {error.reason or error.status}") from None
        encoded = (secret.get("data") or {}).get(field)
        if encoded is None:
            raise StorageError(f"{where} has no key '{field}'")
        try:
            key = base64.b64decode(encoded, validate=True).decode().strip()
        except (binascii.Error, ValueError):
            raise StorageError(f"{where}: key '{field}' is not valid base64 text") from None
        self._keys[(namespace, name, field)] = (time.monotonic(), key)
        return key

    async def driver(self, pool: str, rbd: t.Mapping[str, t.Any]) -> t.Any:
        """The driver of StoragePool ``pool`` (its ``spec.rbd``). Raises StorageError."""
        from .drivers.storage.rbdcopies import RbdCopiesDriver

        access = access_of(rbd, await self.key(rbd))
        async with self._lock:
            current = self._drivers.get(pool)
            if current is not None and current.access == access:
                return current
            if current is not None:
                log.info("RBD pool access changed; reconnecting", extra={"pool": pool})
                await current.close()
            self._drivers[pool] = driver = RbdCopiesDriver(access, host=self.host)
            return driver

    async def close(self) -> None:
        drivers, self._drivers = list(self._drivers.values()), {}
        for driver in drivers:
            try:
                await driver.close()
            except Exception:
                log.exception("closing an RBD driver failed")
