"""The controller's start-up outlasts an apiserver that is away (controllers.main.until_done)."""

from __future__ import annotations

import asyncio

import pytest

from controllers.main import until_done


def test_start_up_retries_with_a_short_growing_backoff_not_kopfs_minute():
    """Found by the crash harness (benchmarks/chaos.py seed 1): a controller restarted just before kube-apiserver
    was killed failed its start-up LISTs and, left to kopf, reconciled nothing for 60 s."""
    attempts, pauses = [], []

    async def step():
        attempts.append(1)
        if len(attempts) < 7:
            raise ConnectionRefusedError("apiserver away")
        return "loaded"

    async def sleep(seconds):
        pauses.append(seconds)

    assert asyncio.run(until_done(step, "loading the store", sleep=sleep)) == "loaded"
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_start_up_is_not_retried_once_done():
    async def sleep(seconds):
        pytest.fail("no pause after a success")

    async def step():
        return 3

    assert asyncio.run(until_done(step, "x", sleep=sleep)) == 3
