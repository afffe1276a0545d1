"""Fault injection semantics of the simulator (hostagent.faults)."""

from __future__ import annotations

import asyncio
import time

import pytest

from hostagent.faults import (
    Fault,
    FaultConfigError,
    FaultInjector,
    InjectedFailure,
    InjectedTimeout,
    parse_fault_option,
    parse_faults,
)


def run(coroutine):
    return asyncio.run(coroutine)


async def outcomes(injector: FaultInjector, operation: str, calls: int) -> list[str]:
    results = []
    for _ in range(calls):
        try:
            await injector.inject(operation)
            results.append("ok")
        except InjectedFailure as error:
            results.append(str(error))
    return results


def test_no_fault_is_a_no_op():
    injector = FaultInjector()
    assert run(outcomes(injector, "facts", 2)) == ["ok", "ok"]


def test_fail_raises_with_the_message_for_that_operation_only():
    injector = FaultInjector()
    injector.configure({"facts": Fault(fail=True, message="libvirtd is gone")})
    assert run(outcomes(injector, "facts", 2)) == ["libvirtd is gone", "libvirtd is gone"]
    assert run(outcomes(injector, "heartbeat", 1)) == ["ok"]


def test_fail_without_message_names_the_operation():
    injector = FaultInjector({"storage": Fault(fail=True)})
    with pytest.raises(InjectedFailure, match="storage failed") as caught:
        run(injector.inject("storage"))
    assert caught.value.operation == "storage"


def test_times_fails_only_n_times_then_behaves():
    injector = FaultInjector()
    injector.configure({"facts": Fault(fail=True, message="boom", times=2)})
    assert run(outcomes(injector, "facts", 4)) == ["boom", "boom", "ok", "ok"]


def test_times_counts_per_injector_that_is_per_host():
    faults = {"facts": Fault(fail=True, message="boom", times=1)}
    first, second = FaultInjector(), FaultInjector()
    first.configure(faults)
    second.configure(faults)
    assert run(outcomes(first, "facts", 2)) == ["boom", "ok"]
    assert run(outcomes(second, "facts", 2)) == ["boom", "ok"]


def test_reapplying_the_same_configuration_keeps_the_count():
    faults = {"facts": Fault(fail=True, message="boom", times=1)}
    injector = FaultInjector()
    injector.configure(faults)
    assert run(outcomes(injector, "facts", 1)) == ["boom"]
    injector.configure(dict(faults))  # a watch relist delivers the same annotation again
    assert run(outcomes(injector, "facts", 1)) == ["ok"]


def test_changing_the_fault_rearms_it():
    injector = FaultInjector()
    injector.configure({"facts": Fault(fail=True, message="boom", times=1)})
    assert run(outcomes(injector, "facts", 2)) == ["boom", "ok"]
    injector.configure({"facts": Fault(fail=True, message="again", times=1)})
    assert run(outcomes(injector, "facts", 2)) == ["again", "ok"]


def test_removing_the_annotation_clears_the_fault():
    injector = FaultInjector()
    injector.configure({"facts": Fault(fail=True)})
    injector.configure({})
    assert run(outcomes(injector, "facts", 1)) == ["ok"]


def test_annotation_overrides_command_line_per_operation():
    injector = FaultInjector({"facts": Fault(fail=True, message="cli"), "storage": Fault(fail=True, message="cli")})
    injector.configure({"facts": Fault(latency_seconds=0)})
    assert run(outcomes(injector, "facts", 1)) == ["ok"]
    assert run(outcomes(injector, "storage", 1)) == ["cli"]


def test_latency_delays_then_succeeds():
    injector = FaultInjector({"start": Fault(latency_seconds=0.2)})
    started = time.monotonic()
    run(injector.inject("start"))
    assert 0.2 <= time.monotonic() - started < 1.0


def test_latency_and_fail_combine():
    injector = FaultInjector({"stop": Fault(latency_seconds=0.1, fail=True, message="late failure")})
    started = time.monotonic()
    with pytest.raises(InjectedFailure, match="late failure"):
        run(injector.inject("stop"))
    assert time.monotonic() - started >= 0.1


def test_timeout_hangs_until_the_callers_deadline():
    injector = FaultInjector({"migrate": Fault(timeout=True)})
    started = time.monotonic()
    with pytest.raises(InjectedTimeout, match="migrate timed out after 0.3s"):
        run(injector.inject("migrate", deadline=0.3))
    assert 0.3 <= time.monotonic() - started < 1.0
    assert isinstance(InjectedTimeout("x", "y"), TimeoutError)


def test_parse_annotation():
    faults = parse_faults('{"facts": {"fail": true, "message": "m", "times": 3}, "heartbeat": {"latencySeconds": 1.5}}')
    assert faults == {"facts": Fault(fail=True, message="m", times=3), "heartbeat": Fault(latency_seconds=1.5)}
    assert parse_faults(None) == {} and parse_faults("  ") == {}


@pytest.mark.parametrize("text, error", [
    ("not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"facts": true}', "must be an object"),
    ('{"facts": {"fial": true}}', "unknown field"),
    ('{"facts": {"fail": "yes"}}', "booleans"),
    ('{"facts": {"latencySeconds": -1}}', "latencySeconds"),
    ('{"facts": {"times": 1.5}}', "times"),
    ('{"facts": {"message": 3}}', "message"),
])
def test_parse_annotation_errors(text, error):
    with pytest.raises(FaultConfigError, match=error):
        parse_faults(text)


def test_parse_command_line_option():
    assert parse_fault_option('facts={"fail": true}') == ("facts", Fault(fail=True))
    with pytest.raises(FaultConfigError, match="OPERATION=JSON"):
        parse_fault_option("facts")
    with pytest.raises(FaultConfigError, match="not valid JSON"):
        parse_fault_option("facts={")
