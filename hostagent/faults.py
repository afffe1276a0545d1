"""Fault injection for the simulator: CloudStack's per-operation simulator mocks, settable at run time.

A fault is configured per operation name from the Host annotation ``cumulo.io/simulator-faults`` or from
the command line (``--fault op=JSON``). Operations:

* ``facts`` (host facts), ``heartbeat`` (Lease renewal), ``storage`` (pool and image-store checks);
* ``start`` (starting a domain), ``stop`` (ACPI shutdown and destroy), ``attach`` (disk hot-plug and
  unplug), ``resize`` (growing a disk, live or offline), ``migrate`` (a live migration, on its source);
* ``download`` (a template download), ``create-volume`` (creating a volume's disk), ``snapshot`` (taking or
  backing up a snapshot). Driver methods call :meth:`FaultInjector.inject` with their
operation name before doing their work; the injector adds latency, hangs until the caller's
deadline (``timeout``) or raises (``fail``), optionally only the first ``times`` calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import typing as t
from collections.abc import Mapping

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 30.0
"""How long an operation with a ``timeout`` fault hangs when its caller gives no deadline, in seconds."""


class InjectedFailure(Exception):
    """An operation failed because a fault told it to."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation


class InjectedTimeout(InjectedFailure, TimeoutError):
    """An operation hung until its deadline because a fault told it to."""


class FaultConfigError(ValueError):
    """A fault configuration that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do to one operation. Field names on the wire are camelCase (``latencySeconds``)."""

    fail: bool = False
    message: str = ""
    latency_seconds: float = 0.0
    timeout: bool = False
    times: int | None = None
    """Apply only to the first ``times`` calls (per host), then behave; None: always."""

    @classmethod
    def from_json(cls, operation: str, value: t.Any) -> Fault:
        if not isinstance(value, Mapping):
            raise FaultConfigError(f"fault for {operation!r} must be an object, got {type(value).__name__}")
        known = {"fail", "message", "latencySeconds", "timeout", "times"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise FaultConfigError(f"fault for {operation!r}: unknown field(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(sorted(known))}")
        fail, timeout = value.get("fail", False), value.get("timeout", False)
        message, latency, times = value.get("message", ""), value.get("latencySeconds", 0), value.get("times")
        if not isinstance(fail, bool) or not isinstance(timeout, bool):
            raise FaultConfigError(f"fault for {operation!r}: fail and timeout must be booleans")
        if not isinstance(message, str):
            raise FaultConfigError(f"fault for {operation!r}: message must be a string")
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
            raise FaultConfigError(f"fault for {operation!r}: latencySeconds must be a number >= 0")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 0):
            raise FaultConfigError(f"fault for {operation!r}: times must be an integer >= 0 or null")
        return cls(fail=fail, message=message, latency_seconds=float(latency), timeout=timeout, times=times)


def parse_faults(text: str | None) -> dict[str, Fault]:
    """Parse the annotation's JSON ``{operation: fault}``; empty or missing text means no faults."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise FaultConfigError(f"not valid JSON: {error}") from None
    if not isinstance(value, Mapping):
        raise FaultConfigError("must be a JSON object {operation: fault}")
    return {str(operation): Fault.from_json(str(operation), fault) for operation, fault in value.items()}


def parse_fault_option(option: str) -> tuple[str, Fault]:
    """Parse a command-line ``--fault op=JSON``."""
    operation, sep, text = option.partition("=")
    if not sep or not operation.strip():
        raise FaultConfigError(f"--fault {option!r}: expected OPERATION=JSON, e.g. facts='{{\"fail\": true}}'")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise FaultConfigError(f"--fault {option!r}: not valid JSON: {error}") from None
    return operation.strip(), Fault.from_json(operation.strip(), value)


class FaultInjector:
    """The faults of one host. ``times`` counts per host and per operation.

    Base faults (command line) apply unless the run-time configuration (the Host annotation) has an
    entry for the same operation. Re-applying an unchanged configuration keeps the counters, so a
    watch relist does not re-arm a ``times`` fault; changing an operation's fault re-arms it.
    """

    def __init__(self, base: Mapping[str, Fault] | None = None) -> None:
        self._base = dict(base or {})
        self._runtime: dict[str, Fault] = {}
        self._counts: dict[str, int] = {}

    def configure(self, faults: Mapping[str, Fault]) -> None:
        """Replace the run-time faults (from the annotation)."""
        before = {op: self.fault(op) for op in set(self._runtime) | set(faults) | set(self._base)}
        self._runtime = dict(faults)
        for operation, old in before.items():
            if self.fault(operation) != old:
                self._counts.pop(operation, None)

    def fault(self, operation: str) -> Fault | None:
        """The fault currently configured for ``operation``, if any."""
        return self._runtime.get(operation, self._base.get(operation))

    def active(self, operation: str) -> Fault | None:
        """The fault the next call of ``operation`` would get (None once ``times`` is used up)."""
        fault = self.fault(operation)
        if fault is None or (fault.times is not None and self._counts.get(operation, 0) >= fault.times):
            return None
        return fault

    async def inject(self, operation: str, deadline: float | None = None) -> None:
        """Apply the fault of ``operation``, if any: sleep, hang until ``deadline`` seconds, or raise."""
        fault = self.active(operation)
        if fault is None:
            return
        self._counts[operation] = self._counts.get(operation, 0) + 1
        if fault.latency_seconds:
            await asyncio.sleep(fault.latency_seconds)
        if fault.timeout:
            wait = DEFAULT_DEADLINE if deadline is None else deadline
            await asyncio.sleep(wait)
            raise InjectedTimeout(operation, fault.message or f"{operation} timed out after {wait:g}s (injected)")
        if fault.fail:
            raise InjectedFailure(operation, fault.message or f"{operation} failed (injected)")
