"""The storage heartbeat as a RADOS object in an RBD pool's Ceph pool (a real single-node Ceph): written by one
host, read by another, a missing one is None and a pool the client cannot reach is an error, not a stale heartbeat."""

from __future__ import annotations

import asyncio

import pytest

from controllers.api.v1alpha1.host import HeartbeatPool
from hostagent.drivers.storage.rbd import RbdAccess, RbdStorageDriver
from hostagent.storageheartbeat import HeartbeatError, RadosHeartbeatStore

pytest_plugins = ["conftest_ceph"]
pytestmark = pytest.mark.timeout(180)


def test_rados_heartbeat_round_trip(ceph_pool) -> None:
    access = RbdAccess(monitors=(ceph_pool.monitor,), pool=ceph_pool.name, user=ceph_pool.user, key=ceph_pool.key)
    writer_driver = RbdStorageDriver(access, host="h1")
    reader_driver = RbdStorageDriver(access, host="h2")
    wrong = RbdStorageDriver(RbdAccess(monitors=(ceph_pool.monitor,), pool="no-such-pool", user=ceph_pool.user,
                                       key=ceph_pool.key), host="h2")
    pool = HeartbeatPool(name="rbd1", type="RBD", path=ceph_pool.name)
    def drivers(driver):
        async def get(name: str):
            return driver if name == "rbd1" else None
        return get

    writer, reader, broken = (RadosHeartbeatStore(drivers(d)) for d in (writer_driver, reader_driver, wrong))

    async def scenario() -> None:
        try:
            assert await reader.read(pool, "h1") is None
            await writer.write(pool, "h1", 1234.5)
            assert await reader.read(pool, "h1") == 1234.5
            await writer.write(pool, "h1", 1240.0)
            assert await reader.read(pool, "h1") == 1240.0
            with pytest.raises(HeartbeatError, match="does not exist"):
                await broken.read(pool, "h1")
            with pytest.raises(HeartbeatError, match="no RBD driver"):
                await writer.write(HeartbeatPool(name="other", type="RBD", path="x"), "h1", 1.0)
        finally:
            for driver in (writer_driver, reader_driver, wrong):
                await driver.close()

    asyncio.run(scenario())
