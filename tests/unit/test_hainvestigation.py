"""HA investigation (pure logic), the agent's storage heartbeat stores and its self-fencing rule."""

import asyncio
import json

import pytest

from controllers import hainvestigation as ha
from controllers.api.v1alpha1.host import HeartbeatPool, InvestigationRequest, PeerHeartbeat, investigate_annotation
from hostagent.faults import Fault, FaultInjector
from hostagent.storageheartbeat import (
    FileHeartbeatStore,
    HeartbeatError,
    MemoryHeartbeatStore,
    PoolTypeHeartbeatStore,
    guest_activity,
    peer_heartbeat,
    requests_of,
    should_fence,
)

P1 = HeartbeatPool(name="nfs1", type="SharedMountPoint", path="/mnt/nfs1")
P2 = HeartbeatPool(name="nfs2", type="SharedMountPoint", path="/mnt/nfs2")
FRESH = PeerHeartbeat(readable=True, fresh=True)
STALE = PeerHeartbeat(readable=True, fresh=False)
UNREADABLE = PeerHeartbeat(readable=False, message="not mounted")


def test_neighbours_are_up_hosts_reaching_a_pool_never_the_suspect():
    candidates = [ha.Neighbour("h0", True, frozenset({"nfs1"})), ha.Neighbour("h1", False, frozenset({"nfs1"})),
                  ha.Neighbour("h2", True, frozenset({"local"})), ha.Neighbour("h3", True, frozenset({"nfs1", "nfs2"})),
                  ha.Neighbour("h4", True, frozenset({"nfs2"})), ha.Neighbour("h5", True, frozenset({"nfs1"}))]
    chosen = ha.choose_neighbours("h0", [P1, P2], candidates, limit=2)
    assert chosen == {"h3": [P1, P2], "h4": [P2]}


def test_fresh_heartbeat_means_alive_whatever_the_others_say():
    verdict = ha.verdict("h0", [P1], {"h1": [P1], "h2": [P1]}, {"h1": {"nfs1": STALE}, "h2": {"nfs1": FRESH}},
                         lease_age=1000, down_after=30)
    assert verdict.outcome == ha.Outcome.ALIVE
    assert verdict.check.reason == "StorageHeartbeatFresh" and "h2" in verdict.check.message


def test_dead_needs_every_pool_read_stale_and_the_lease_silent_long_enough():
    asked = {"h1": [P1, P2]}
    one_pool = ha.verdict("h0", [P1, P2], asked, {"h1": {"nfs1": STALE}}, lease_age=100, down_after=30)
    assert one_pool.outcome == ha.Outcome.PENDING
    early = ha.verdict("h0", [P1, P2], asked, {"h1": {"nfs1": STALE, "nfs2": STALE}}, lease_age=20, down_after=30)
    assert early.outcome == ha.Outcome.PENDING and "waiting" in early.check.message
    dead = ha.verdict("h0", [P1, P2], asked, {"h1": {"nfs1": STALE, "nfs2": STALE}}, lease_age=31, down_after=30)
    assert dead.outcome == ha.Outcome.DEAD and dead.check.reason == "Fenced"
    assert "nfs1 (read by h1)" in dead.check.message


def test_a_pool_nobody_can_read_is_never_taken_for_stale():
    asked = {"h1": [P1], "h2": [P1]}
    answers = {"h1": {"nfs1": UNREADABLE}, "h2": {"nfs1": UNREADABLE}}
    blind = ha.verdict("h0", [P1], asked, answers, lease_age=1000, down_after=30)
    assert blind.outcome == ha.Outcome.BLIND and "not mounted" in blind.check.message
    # One neighbour still to answer: not blind yet, not dead either.
    assert ha.verdict("h0", [P1], asked, {"h1": {"nfs1": UNREADABLE}}, 1000, 30).outcome == ha.Outcome.PENDING
    # One reads it stale: dead (the other's mount problem does not matter).
    answers["h2"] = {"nfs1": STALE}
    assert ha.verdict("h0", [P1], asked, answers, 1000, 30).outcome == ha.Outcome.DEAD


def test_nothing_to_read_or_nobody_to_ask_is_blind():
    assert ha.verdict("h0", [], {}, {}, 1000, 30).outcome == ha.Outcome.BLIND
    nobody = ha.verdict("h0", [P1], {}, {}, 1000, 30)
    assert nobody.outcome == ha.Outcome.BLIND and "no Up host" in nobody.check.message
    assert ha.verdict("h0", [P1], {"h1": [P1]}, {}, 1000, 30).outcome == ha.Outcome.PENDING


def test_guests_of_a_down_host():
    action, check = ha.on_down_host("h0", ha=True, pool="nfs1", local=False)
    assert action == ha.DownAction.RESTART
    action, check = ha.on_down_host("h0", ha=True, pool="local-h0", local=True)
    assert action == ha.DownAction.KEEP and check.reason == "LocalStorage" and "h0" in check.message
    action, check = ha.on_down_host("h0", ha=False, pool="nfs1", local=False)
    assert action == ha.DownAction.KEEP and check.reason == "HostDown" and "h0" in check.message


def test_self_fencing_needs_both_heartbeats_silent_and_a_pool():
    assert should_fence(100.0, lease_ok_at=30.0, storage_ok_at=35.0, fence_after=60.0, has_pools=True)
    assert not should_fence(100.0, lease_ok_at=30.0, storage_ok_at=50.0, fence_after=60.0, has_pools=True)
    assert not should_fence(100.0, lease_ok_at=50.0, storage_ok_at=30.0, fence_after=60.0, has_pools=True)
    assert not should_fence(100.0, lease_ok_at=30.0, storage_ok_at=30.0, fence_after=60.0, has_pools=False)


def test_peer_reading_of_a_stamp():
    assert peer_heartbeat(None, 1000.0, 30).fresh is False
    fresh = peer_heartbeat(990.0, 1000.0, 30)
    assert fresh.fresh and fresh.last_write is None  # a live suspect's writes do not change the answer
    stale = peer_heartbeat(900.0, 1000.0, 30)
    assert stale.fresh is False and stale.last_write is not None


def test_file_store_round_trip_and_unmounted_pool(tmp_path):
    pool = HeartbeatPool(name="nfs", type="SharedMountPoint", path=str(tmp_path))
    store = FileHeartbeatStore()
    assert asyncio.run(store.read(pool, "h0")) is None
    asyncio.run(store.write(pool, "h0", 1234.5))
    assert (tmp_path / ".cumulo-heartbeat" / "h0").read_text() == "1234.500\n"
    assert asyncio.run(store.read(pool, "h0")) == 1234.5
    gone = HeartbeatPool(name="nfs", type="SharedMountPoint", path=str(tmp_path / "missing"))
    with pytest.raises(HeartbeatError, match="not a directory"):
        asyncio.run(store.write(gone, "h0", 1.0))
    with pytest.raises(HeartbeatError):
        asyncio.run(store.read(gone, "h0"))


def test_memory_store_is_shared_and_the_fault_stops_writes():
    faults = FaultInjector()
    writer, reader = MemoryHeartbeatStore(faults), MemoryHeartbeatStore()
    asyncio.run(writer.write(P1, "sim-unit-h0", 5.0))
    assert asyncio.run(reader.read(P1, "sim-unit-h0")) == 5.0
    faults.configure({"storage-heartbeat": Fault(fail=True)})
    with pytest.raises(HeartbeatError):
        asyncio.run(writer.write(P1, "sim-unit-h0", 6.0))
    assert asyncio.run(reader.read(P1, "sim-unit-h0")) == 5.0


def test_requests_come_from_the_hosts_own_annotations():
    request = InvestigationRequest(host="h0", stale_after_seconds=30, pools=[P1])
    host = {"metadata": {"annotations": {
        investigate_annotation("h0"): json.dumps(request.model_dump(by_alias=True, mode="json")),
        investigate_annotation("bad"): "not json", "other": "x"}}}
    assert requests_of(host) == {"h0": request}
    long_name = "h" * 100
    assert len(investigate_annotation(long_name).split("/", 1)[1]) <= 63


def test_guest_activity_after_the_fencing_bound_means_alive():
    # Last heartbeat at 1000; fencing must be done by 1000 + 60 + 2 × 10 = 1080.
    assert guest_activity(1000.0, {"/p/a.qcow2": 1079.0}, fence_after=60, interval=10) is None
    active = guest_activity(1000.0, {"/p/a.qcow2": 1079.0, "/p/b.qcow2": 1090.0}, fence_after=60, interval=10)
    assert active is not None and "/p/b.qcow2" in active
    assert guest_activity(None, {"/p/a.qcow2": 5000.0}, fence_after=60, interval=10) is None
    answers = {"h1": {"nfs1": PeerHeartbeat(readable=True, fresh=False, guest_activity=active)}}
    verdict = ha.verdict("h0", [P1], {"h1": [P1]}, answers, lease_age=1000, down_after=30)
    assert verdict.outcome == ha.Outcome.ALIVE and verdict.check.reason == "GuestActivity"


def test_activity_disks_are_the_shared_files_of_each_pool():
    pools = ha.with_activity_disks([P1, P2], [("nfs1", "SharedMountPoint", "/mnt/nfs1/b"),
                                              ("nfs1", "SharedMountPoint", "/mnt/nfs1/a"),
                                              ("local", "Filesystem", "/var/x"), ("nfs2", "RBD", "pool/img")])
    assert [p.disks for p in pools] == [["/mnt/nfs1/a", "/mnt/nfs1/b"], []]


def test_file_store_modification_times(tmp_path):
    disk = tmp_path / "disk.qcow2"
    disk.write_text("x")
    found = asyncio.run(FileHeartbeatStore().modified([str(disk), str(tmp_path / "missing")]))
    assert list(found) == [str(disk)]


def test_heartbeat_store_by_pool_type(tmp_path):
    class Rados:
        def __init__(self):
            self.written = []

        async def write(self, pool, host, stamp):
            self.written.append((pool.name, host, stamp))

    rados = Rados()
    store = PoolTypeHeartbeatStore(FileHeartbeatStore(), rados)
    asyncio.run(store.write(HeartbeatPool(name="rbd", type="RBD", path="cephpool"), "h0", 7.0))
    asyncio.run(store.write(HeartbeatPool(name="smp", type="SharedMountPoint", path=str(tmp_path)), "h0", 8.0))
    assert rados.written == [("rbd", "h0", 7.0)] and (tmp_path / ".cumulo-heartbeat" / "h0").exists()
    with pytest.raises(HeartbeatError, match="no RBD access"):
        asyncio.run(PoolTypeHeartbeatStore(FileHeartbeatStore(), None).write(
            HeartbeatPool(name="rbd", type="RBD", path="cephpool"), "h0", 1.0))
