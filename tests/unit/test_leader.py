"""Leader election: the pure decisions, and the elector against an in-memory Lease with optimistic concurrency."""

from __future__ import annotations

import asyncio
import copy
import functools

import pytest

from controllers import leader
from controllers.leader import Action, LeaseRecord, Observation, decide, lease_body, lost, observe


def synchronous(test):
    """Run an async test in its own event loop (the suite has no asyncio plugin)."""
    @functools.wraps(test)
    def wrapper():
        asyncio.run(test())
    return wrapper


def record(holder: str | None = "a", renew: str = "t1", version: str = "1", duration: int = 15,
           transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, duration, "t0", renew, transitions, version)


def test_no_lease_is_created():
    assert decide("me", None, 100.0, 15).action is Action.CREATE


def test_own_lease_is_renewed():
    assert decide("me", Observation(record("me"), 0.0), 1000.0, 15).action is Action.RENEW


def test_released_lease_is_taken_at_once():
    assert decide("me", Observation(record(None), 100.0), 100.0, 15).action is Action.ACQUIRE


def test_a_live_holder_is_waited_for_by_the_candidates_own_clock():
    seen = Observation(record("other"), 100.0)
    decision = decide("me", seen, 110.0, 15)
    assert decision.action is Action.WAIT and decision.wait_seconds == pytest.approx(5.0)
    assert decide("me", seen, 115.0, 15).action is Action.ACQUIRE


def test_the_leases_own_duration_wins_over_the_candidates():
    assert decide("me", Observation(record("other", duration=60), 0.0), 30.0, 15).action is Action.WAIT


def test_a_renewal_restarts_the_holders_time():
    first = observe(None, record("other", renew="t1", version="1"), 100.0)
    same = observe(first, record("other", renew="t1", version="1"), 112.0)
    assert same.seen_at == 100.0
    renewed = observe(same, record("other", renew="t2", version="2"), 112.0)
    assert renewed.seen_at == 112.0
    assert decide("me", renewed, 120.0, 15).action is Action.WAIT
    assert observe(renewed, None, 130.0) is None


def test_a_takeover_counts_a_transition_and_a_renewal_keeps_acquire_time():
    other = record("other", transitions=3)
    taken = lease_body("me", Action.ACQUIRE, other, 15)
    assert taken["holderIdentity"] == "me" and taken["leaseTransitions"] == 4
    assert taken["acquireTime"] == taken["renewTime"]
    mine = LeaseRecord("me", 15, "t-acquired", "t-old", 4, "9")
    renewed = lease_body("me", Action.RENEW, mine, 15)
    assert renewed["acquireTime"] == "t-acquired" and renewed["leaseTransitions"] == 4
    released = lease_body("me", Action.RENEW, mine, 15, release=True)
    assert released["holderIdentity"] is None and released["leaseDurationSeconds"] == 1


def test_a_leader_that_cannot_renew_steps_down_before_the_duration():
    assert not lost(100.0, 105.0, 10.0)
    assert lost(100.0, 110.0, 10.0)
    assert lost(None, 0.0, 10.0)


class MemoryLease:
    """A Lease object with resourceVersion checks, as the apiserver does them."""

    def __init__(self) -> None:
        self.raw: dict | None = None
        self.version = 0
        self.fail = False

    def _store(self, spec: dict) -> dict:
        self.version += 1
        self.raw = {"metadata": {"name": "cumulo-controller", "resourceVersion": str(self.version)},
                    "spec": copy.deepcopy(spec)}
        return copy.deepcopy(self.raw)

    async def read(self) -> dict | None:
        if self.fail:
            raise ConnectionError("apiserver down")
        return copy.deepcopy(self.raw)

    async def create(self, spec: dict) -> dict:
        if self.raw is not None:
            raise leader.LeaseConflict("409 AlreadyExists")
        return self._store(spec)

    async def replace(self, resource_version: str, spec: dict) -> dict:
        if self.fail:
            raise ConnectionError("apiserver down")
        if self.raw is None or self.raw["metadata"]["resourceVersion"] != resource_version:
            raise leader.LeaseConflict("409 Conflict")
        return self._store(spec)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: MemoryLease, identity: str, clock: Clock) -> leader.LeaderElector:
    return leader.LeaderElector(api, identity, lease_duration=15, renew_deadline=10, retry_period=2, clock=clock)


@synchronous
async def test_one_leader_and_a_standby_that_takes_over_after_the_duration():
    api, clock = MemoryLease(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_once()
    assert not await b.try_once()  # first sight of a's lease
    clock.now += 2
    assert await a.try_once()      # a renews
    assert not await b.try_once()  # b sees the renewal: its view of a restarts now
    clock.now += 14
    assert not await b.try_once()
    clock.now += 2                 # 16 s without a change seen by b: a is gone
    assert await b.try_once()
    assert api.raw["spec"]["holderIdentity"] == "b" and api.raw["spec"]["leaseTransitions"] == 1
    assert not await a.try_once()  # a sees b hold it


@synchronous
async def test_two_candidates_racing_for_an_expired_lease_cannot_both_win():
    api, clock = MemoryLease(), Clock()
    api._store({"holderIdentity": None, "leaseDurationSeconds": 1})
    b, c = elector(api, "b", clock), elector(api, "c", clock)
    stale = await api.read()
    assert await b.try_once()
    with pytest.raises(leader.LeaseConflict):  # c's write, computed from the version b replaced
        await api.replace(stale["metadata"]["resourceVersion"], lease_body("c", Action.ACQUIRE, None, 15))
    assert not await c.try_once()
    assert api.raw["spec"]["holderIdentity"] == "b"


@synchronous
async def test_run_leads_then_steps_down_when_the_lease_is_taken():
    api = MemoryLease()
    a = leader.LeaderElector(api, "a", lease_duration=0.6, renew_deadline=0.4, retry_period=0.05)
    task = asyncio.create_task(a.run())
    await asyncio.wait_for(a.leading.wait(), 2)
    api._store({**api.raw["spec"], "holderIdentity": "intruder"})  # someone took it (a clock jump, a bug)
    await asyncio.wait_for(a.lost.wait(), 2)
    assert not a.leading.is_set()
    await task


@synchronous
async def test_run_steps_down_when_renewals_fail_for_the_renew_deadline():
    api = MemoryLease()
    a = leader.LeaderElector(api, "a", lease_duration=0.6, renew_deadline=0.3, retry_period=0.05)
    task = asyncio.create_task(a.run())
    await asyncio.wait_for(a.leading.wait(), 2)
    api.fail = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(a.lost.wait(), 2)
    assert loop.time() - started < 0.6  # before anyone else may take it over
    await task


@synchronous
async def test_cancelling_a_leader_releases_the_lease():
    api = MemoryLease()
    a = leader.LeaderElector(api, "a", lease_duration=0.6, renew_deadline=0.4, retry_period=0.05)
    task = asyncio.create_task(a.run())
    await asyncio.wait_for(a.leading.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert api.raw["spec"]["holderIdentity"] is None
    b = elector(api, "b", Clock())
    assert await b.try_once()  # no wait for a released lease


def test_timings_must_nest():
    with pytest.raises(ValueError):
        leader.LeaderElector(MemoryLease(), "a", lease_duration=10, renew_deadline=10, retry_period=2)
