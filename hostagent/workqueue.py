"""A keyed work queue for level-based reconciles (client-go's workqueue, on asyncio).

* A key is queued at most once; adding a queued key again only brings it forward.
* A key is processed by one worker at a time; a key added while it is processed runs again afterwards
  (its handler reads the current state then, so no change is lost and none is handled twice at once).
* At most ``concurrency`` keys are processed at a time.
* The handler returns None (done) or a delay after which to run again (polling a slow operation). An
  exception is logged (once per failure streak of a key) and the key retried with exponential backoff;
  :meth:`backoff` gives handlers the same backoff for errors they handle themselves.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
import time
import typing as t

log = logging.getLogger(__name__)

Handler = t.Callable[[str], t.Awaitable[float | None]]

MIN_RETRY_AFTER_FAILURE = 1.0
"""A key that just failed is not run again sooner than this, whatever events arrive: no hot loop."""


class WorkQueue:
    def __init__(self, name: str, handler: Handler, *, concurrency: int = 4, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0) -> None:
        self.name = name
        self.handler = handler
        self.concurrency = concurrency
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._active: set[str] = set()
        self._dirty: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._crashes: dict[str, int] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: str, delay: float = 0.0) -> None:
        """Run ``key`` in ``delay`` seconds (or sooner, if it is already due sooner)."""
        due = time.monotonic() + max(0.0, delay)
        if key in self._active:
            self._dirty[key] = min(self._dirty.get(key, math.inf), due)
            return
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._wake.set()

    def backoff(self, key: str) -> float:
        """The next retry delay of a failing ``key``: exponential, with jitter, up to ``backoff_max``."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self.backoff_max, self.backoff_initial * 2 ** failures)
        return random.uniform(delay * 0.75, delay)

    def forget(self, key: str) -> None:
        """``key`` succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    async def _next(self) -> str:
        while True:
            self._wake.clear()  # before looking: an add() from now on wakes us
            now = time.monotonic()
            while self._heap:
                due, _, key = self._heap[0]
                if self._due.get(key) != due:
                    heapq.heappop(self._heap)  # superseded by an earlier entry
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                del self._due[key]
                return key
            timeout = self._heap[0][0] - now if self._heap else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _worker(self) -> None:
        while True:
            key = await self._next()
            self._active.add(key)
            delay: float | None
            failed = False
            try:
                delay = await self.handler(key)
                self._crashes.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception:
                failed = True
                crashes = self._crashes[key] = self._crashes.get(key, 0) + 1
                if crashes == 1:
                    log.exception("reconcile failed; retrying with backoff", extra={"queue": self.name, "key": key})
                else:
                    log.debug("reconcile failed again", exc_info=True, extra={"queue": self.name, "key": key})
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (crashes - 1))
            finally:
                self._active.discard(key)
            dirty = self._dirty.pop(key, None)
            if dirty is not None:
                soonest = time.monotonic() + (MIN_RETRY_AFTER_FAILURE if failed else 0.0)
                self.add(key, max(dirty, soonest) - time.monotonic())
            if delay is not None:
                self.add(key, delay)

    async def run(self) -> None:
        workers = [asyncio.create_task(self._worker(), name=f"{self.name}-{index}")
                   for index in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
