"""The agent's keyed work queue (hostagent.workqueue)."""

from __future__ import annotations

import asyncio

from hostagent.workqueue import WorkQueue


async def drive(queue: WorkQueue, seconds: float) -> None:
    task = asyncio.create_task(queue.run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_key_queued_twice_runs_once():
    seen: list[str] = []

    async def handler(key: str) -> None:
        seen.append(key)

    async def main() -> None:
        queue = WorkQueue("t", handler)
        for key in ("a", "b", "a", "a"):
            queue.add(key)
        await drive(queue, 0.05)

    asyncio.run(main())
    assert sorted(seen) == ["a", "b"]


def test_a_key_added_while_it_runs_runs_again_afterwards_never_concurrently():
    running: set[str] = set()
    overlaps: list[str] = []
    runs: list[str] = []

    async def main() -> None:
        queue: WorkQueue

        async def handler(key: str) -> None:
            if key in running:
                overlaps.append(key)
            running.add(key)
            runs.append(key)
            if len(runs) == 1:
                queue.add("a")  # an event arrives while "a" is being reconciled
            await asyncio.sleep(0.01)
            running.discard(key)

        queue = WorkQueue("t", handler, concurrency=4)
        queue.add("a")
        await drive(queue, 0.1)

    asyncio.run(main())
    assert runs == ["a", "a"] and overlaps == []


def test_requeue_after_the_returned_delay_and_earlier_adds_win():
    times: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def handler(key: str) -> float | None:
            times.append(loop.time() - start)
            return 0.05 if len(times) == 1 else None

        queue = WorkQueue("t", handler)
        queue.add("k", 0.5)
        queue.add("k", 0.0)  # sooner wins
        await drive(queue, 0.2)

    asyncio.run(main())
    assert len(times) == 2 and times[0] < 0.05 and 0.04 < times[1] - times[0] < 0.15


def test_failures_back_off_and_are_logged_once(caplog):
    calls: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handler(key: str) -> None:
            calls.append(loop.time())
            raise RuntimeError("boom")

        queue = WorkQueue("t", handler, backoff_initial=0.05, backoff_max=0.1)
        queue.add("k")
        await drive(queue, 0.35)

    asyncio.run(main())
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert 3 <= len(calls) <= 6
    assert all(gap >= 0.045 for gap in gaps)  # never a hot loop
    assert sum("reconcile failed; retrying with backoff" in r.getMessage() for r in caplog.records) == 1


def test_backoff_grows_and_resets():
    queue = WorkQueue("t", lambda key: None, backoff_initial=1, backoff_max=8)
    delays = [queue.backoff("k") for _ in range(6)]
    assert 0.75 <= delays[0] <= 1 and 1.5 <= delays[1] <= 2 and 6 <= delays[3] <= 8 and delays[5] <= 8
    queue.forget("k")
    assert queue.backoff("k") <= 1
