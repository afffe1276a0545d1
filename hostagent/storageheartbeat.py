"""The storage heartbeat (CloudStack's kvmheartbeat.sh), the investigation of neighbours, and self-fencing.

* Writing: every interval the agent writes a timestamp (its wall clock) for its host on each shared primary pool
  the host reaches (SharedMountPoint: ``<path>/.cumulo-heartbeat/<host>``; simulated hosts: an in-memory pool
  shared by the hosts of one process). Writing on every shared pool the host reaches, not only those its guests
  use, also proves a host without guests alive.
* Investigating: when the controller asks (annotation ``investigate.cumulo.io/<suspect>`` on this agent's own
  Host), the agent reads the suspect's heartbeat on the listed pools and answers in ``status.node.investigations``:
  readable or not, fresh (written within ``staleAfterSeconds``) or stale. The answer changes, and is written, only
  when that verdict changes, so a long investigation costs no steady writes.
* Self-fencing: when the host has renewed neither its Lease nor its storage heartbeat for ``fence_after`` seconds
  (and has somewhere to write one), the agent destroys the domains of its HA guests on shared storage and starts
  none until its Lease renews again; after that, each start first confirms the placement with a direct GET (the
  controller may have restarted the guest elsewhere meanwhile). So does an agent whose Lease merely lapsed (a
  paused process cannot fence; :meth:`hostagent.heartbeat.Heartbeat.lapsed`). The controller's Down threshold is longer (see
  controllers/hainvestigation.py), so a host found Down has no HA guest running.

Heartbeat stores sit behind :class:`HeartbeatStore`: files (:class:`FileHeartbeatStore`), memory (simulated hosts)
and RADOS objects ``cumulo-heartbeat.<host>`` in an RBD pool's Ceph pool (:class:`RadosHeartbeatStore`, through the
pool's RBD storage driver); :class:`PoolTypeHeartbeatStore` picks one by pool type.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import tempfile
import time
import typing as t

from controllers.api.v1alpha1.host import INVESTIGATE_PREFIX, HeartbeatPool, InvestigationRequest, PeerHeartbeat

from .faults import FaultInjector, InjectedFailure

if t.TYPE_CHECKING:
    from .agent import HostWorker

log = logging.getLogger(__name__)

HEARTBEAT_DIR = ".cumulo-heartbeat"
IO_TIMEOUT = 10.0
"""A hung mount (NFS) must not hang the loop: a write or read that takes longer fails."""


class HeartbeatError(Exception):
    """The pool cannot be read or written; the message is reported."""


class HeartbeatStore(t.Protocol):
    async def write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        """Record ``stamp`` (seconds since the epoch) as the host's heartbeat on the pool."""
        ...

    async def read(self, pool: HeartbeatPool, host: str) -> float | None:
        """The host's last stamp on the pool (None: it never wrote one). Raises HeartbeatError when the pool
        cannot be read."""
        ...


class FileHeartbeatStore:
    """A file per host under the mount point of a SharedMountPoint pool."""

    @staticmethod
    def path(pool: HeartbeatPool, host: str) -> str:
        return os.path.join(pool.path, HEARTBEAT_DIR, host)

    def _write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        if not os.path.isdir(pool.path):
            raise HeartbeatError(f"{pool.path} is not a directory (not mounted?)")
        directory = os.path.join(pool.path, HEARTBEAT_DIR)
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{host}.")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(f"{stamp:.3f}\n")
            os.replace(temporary, self.path(pool, host))
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def _read(self, pool: HeartbeatPool, host: str) -> float | None:
        if not os.path.isdir(pool.path):
            raise HeartbeatError(f"{pool.path} is not a directory (not mounted?)")
        try:
            with open(self.path(pool, host)) as file:
                text = file.read().strip()
        except FileNotFoundError:
            return None
        try:
            return float(text)
        except ValueError:
            raise HeartbeatError(f"{self.path(pool, host)} holds no timestamp") from None

    async def write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._write, pool, host, stamp), IO_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise HeartbeatError(f"cannot write {self.path(pool, host)}: {error or 'timed out'}") from None

    async def read(self, pool: HeartbeatPool, host: str) -> float | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._read, pool, host), IO_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise HeartbeatError(f"cannot read {self.path(pool, host)}: {error or 'timed out'}") from None

    async def modified(self, paths: list[str]) -> dict[str, float]:
        """Modification times of the files that exist (the VM activity check)."""
        def stat() -> dict[str, float]:
            found = {}
            for path in paths:
                try:
                    found[path] = os.stat(path).st_mtime
                except OSError:
                    continue
            return found

        try:
            return await asyncio.wait_for(asyncio.to_thread(stat), IO_TIMEOUT)
        except TimeoutError:
            return {}


class MemoryHeartbeatStore:
    """Simulated hosts: one in-memory "pool" per pool name, shared by every simulated host of the process.
    The writer's fault ``storage-heartbeat`` stops its writes (a host cut off from its storage)."""

    shared: t.ClassVar[dict[tuple[str, str], float]] = {}

    def __init__(self, faults: FaultInjector | None = None) -> None:
        self.faults = faults

    async def write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        if self.faults is not None:
            try:
                await self.faults.inject("storage-heartbeat", deadline=1.0)
            except InjectedFailure as error:
                raise HeartbeatError(str(error)) from None
        self.shared[(pool.name, host)] = stamp

    async def read(self, pool: HeartbeatPool, host: str) -> float | None:
        return self.shared.get((pool.name, host))


class RadosHeartbeatStore:
    """An object ``cumulo-heartbeat.<host>`` per host in the Ceph pool of an RBD StoragePool, written and read
    through that pool's :class:`~hostagent.drivers.storage.rbd.RbdStorageDriver` (its connection and threads).
    ``drivers``: the pool's driver by StoragePool name (async; None when the agent has none for it)."""

    OBJECT = "cumulo-heartbeat.{host}"

    def __init__(self, drivers: t.Callable[[str], t.Awaitable[t.Any]]) -> None:
        self.drivers = drivers

    async def _run(self, pool: HeartbeatPool, function: t.Callable[[t.Any], t.Any]) -> t.Any:
        from .drivers.storage import StorageError  # the RBD driver's errors

        try:
            driver = await self.drivers(pool.name)
        except StorageError as error:  # the key's Secret
            raise HeartbeatError(str(error)) from None
        if driver is None:
            raise HeartbeatError(f"no RBD driver for pool {pool.name}")

        def call() -> t.Any:
            with driver.ioctx() as ioctx:
                return function(ioctx)

        try:
            return await asyncio.wait_for(asyncio.to_thread(call), IO_TIMEOUT)
        except StorageError as error:
            raise HeartbeatError(str(error)) from None
        except TimeoutError:
            raise HeartbeatError(f"Ceph pool {pool.path}: no answer within {IO_TIMEOUT:g}s") from None
        except Exception as error:  # rados.Error and its kin, without importing rados here
            raise HeartbeatError(f"Ceph pool {pool.path}: {error}") from None

    async def write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        data = f"{stamp:.3f}\n".encode()
        await self._run(pool, lambda ioctx: ioctx.write_full(self.OBJECT.format(host=host), data))

    async def read(self, pool: HeartbeatPool, host: str) -> float | None:
        def read(ioctx: t.Any) -> bytes | None:
            import rados

            try:
                return ioctx.read(self.OBJECT.format(host=host), 64)
            except rados.ObjectNotFound:
                return None

        data = await self._run(pool, read)
        if data is None:
            return None
        try:
            return float(data.decode().strip())
        except ValueError:
            raise HeartbeatError(f"Ceph pool {pool.path}: {self.OBJECT.format(host=host)} holds no timestamp") from None


class PoolTypeHeartbeatStore:
    """Files on SharedMountPoint pools, RADOS objects on RBD pools."""

    def __init__(self, files: FileHeartbeatStore, rados: RadosHeartbeatStore | None) -> None:
        self.files, self.rados = files, rados

    def _store(self, pool: HeartbeatPool) -> t.Any:
        if pool.type == "RBD":
            if self.rados is None:
                raise HeartbeatError(f"pool {pool.name}: this agent has no RBD access")
            return self.rados
        return self.files

    async def write(self, pool: HeartbeatPool, host: str, stamp: float) -> None:
        await self._store(pool).write(pool, host, stamp)

    async def read(self, pool: HeartbeatPool, host: str) -> float | None:
        return await self._store(pool).read(pool, host)

    async def modified(self, paths: list[str]) -> dict[str, float]:
        return await self.files.modified(paths)


def should_fence(now: float, lease_ok_at: float, storage_ok_at: float, fence_after: float, has_pools: bool) -> bool:
    """Whether the host must fence itself: neither heartbeat succeeded for ``fence_after`` seconds (monotonic
    clock). A host with no shared pool never fences: nobody could find it Down, so nobody restarts its guests."""
    return has_pools and now - lease_ok_at > fence_after and now - storage_ok_at > fence_after


def peer_heartbeat(stamp: float | None, now: float, stale_after: float) -> PeerHeartbeat:
    """A neighbour's reading of a suspect's heartbeat stamp. A fresh heartbeat reports no time, so a live
    suspect's writes do not change the answer (and cause no status writes)."""
    if stamp is None:
        return PeerHeartbeat(readable=True, fresh=False, message="no heartbeat written")
    age = now - stamp
    if age <= stale_after:
        return PeerHeartbeat(readable=True, fresh=True, message=f"written within {stale_after:g}s")
    return PeerHeartbeat(readable=True, fresh=False,
                         last_write=datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc),
                         message=f"not written for more than {stale_after:g}s")


def guest_activity(stamp: float | None, modified: t.Mapping[str, float], fence_after: float,
                   interval: float) -> str | None:
    """A disk file written after the suspect should have fenced itself (its last heartbeat stamp + fence_after + two
    intervals): the path, else None. No stamp: nothing to measure against."""
    if stamp is None:
        return None
    bound = stamp + fence_after + 2 * interval
    late = sorted(path for path, mtime in modified.items() if mtime > bound)
    return f"{late[0]} written after the host should have fenced itself" if late else None


def requests_of(host: t.Mapping[str, t.Any] | None) -> dict[str, InvestigationRequest]:
    """The investigations the controller asks of this host (its Host's annotations), by suspect."""
    found: dict[str, InvestigationRequest] = {}
    annotations = (((host or {}).get("metadata") or {}).get("annotations") or {})
    for key, value in sorted(annotations.items()):
        if not key.startswith(INVESTIGATE_PREFIX):
            continue
        try:
            request = InvestigationRequest.model_validate(json.loads(value))
        except ValueError as error:
            log.warning("ignoring an unreadable investigation request", extra={"annotation": key,
                                                                               "error": str(error)[:200]})
            continue
        found[request.host] = request
    return found


class StorageHeartbeat:
    """One host's storage heartbeat, its investigations of neighbours and its self-fencing."""

    def __init__(self, worker: HostWorker, store: HeartbeatStore, *, interval: float, fence_after: float) -> None:
        self.worker = worker
        self.store = store
        self.interval = interval
        self.fence_after = fence_after
        self.pools: list[HeartbeatPool] = []
        self.storage_ok_at = time.monotonic()
        self.fenced = False
        self.confirm_starts = False
        """Set once the host fenced itself: every later start confirms the placement with a direct GET."""
        self.requests: dict[str, InvestigationRequest] = {}
        self.answers: dict[str, dict[str, dict[str, t.Any]]] = {}
        self._wake = asyncio.Event()
        self._state = ""

    def observe(self, host: t.Mapping[str, t.Any] | None) -> None:
        requests = requests_of(host)
        if requests != self.requests:
            self.requests = requests
            self._wake.set()

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._beat()
                await self._investigate()
                await self._fence_check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storage heartbeat round failed", extra={"host": self.worker.name})
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, started + self.interval - time.monotonic()))
            except TimeoutError:
                pass
            self._wake.clear()

    async def _beat(self) -> None:
        if not self.pools:
            return
        stamp = time.time()
        errors = []
        for pool in self.pools:
            try:
                await self.store.write(pool, self.worker.name, stamp)
            except HeartbeatError as error:
                errors.append(f"{pool.name}: {error}")
        if len(errors) < len(self.pools):
            self.storage_ok_at = time.monotonic()
        state = "failing" if len(errors) == len(self.pools) else "ok"
        if state != self._state:
            self._state = state
            log.log(logging.WARNING if errors else logging.INFO,
                    "storage heartbeat failing" if errors else "storage heartbeat written",
                    extra={"host": self.worker.name, "pools": [p.name for p in self.pools], "errors": errors})

    async def _investigate(self) -> None:
        answers: dict[str, dict[str, dict[str, t.Any]]] = {}
        for suspect, request in self.requests.items():
            answer = answers.setdefault(suspect, {})
            for pool in request.pools:
                try:
                    stamp = await self.store.read(pool, suspect)
                except HeartbeatError as error:
                    reading = PeerHeartbeat(readable=False, message=str(error))
                else:
                    reading = peer_heartbeat(stamp, time.time(), request.stale_after_seconds)
                    modified = getattr(self.store, "modified", None)
                    if not reading.fresh and pool.disks and modified is not None:
                        active = guest_activity(stamp, await modified(pool.disks), self.fence_after, self.interval)
                        if active is not None:
                            reading = reading.model_copy(update={"guest_activity": active})
                answer[pool.name] = reading.model_dump(by_alias=True, mode="json", exclude_none=True)
        if answers != self.answers:
            if answers:
                log.info("investigation answers", extra={"host": self.worker.name, "answers": answers})
            self.answers = answers
            self.worker.wake()  # the next report carries them

    async def _fence_check(self) -> None:
        now = time.monotonic()
        lease_ok_at = self.worker.heartbeat.last_ok
        if self.fenced:
            if lease_ok_at > self._fenced_at:
                self.fenced = False
                log.warning("heartbeat renewed after fencing: starting guests again, each after a direct GET confirms "
                            "it is still placed here", extra={"host": self.worker.name})
            return
        if should_fence(now, lease_ok_at, self.storage_ok_at, self.fence_after, bool(self.pools)):
            self.fenced = self.confirm_starts = True
            self._fenced_at = now
            log.error("fencing: neither the heartbeat Lease nor the storage heartbeat could be written; destroying "
                      "the domains of HA guests", extra={"host": self.worker.name, "fence_after": self.fence_after})
            await self.worker.agent.vms.fence(self.worker)
