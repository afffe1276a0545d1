"""Usage metering (pure: no kopf, no I/O): what each hourly UsageRecord of a resource should say.

Amounts are derived from timestamps recorded on the objects, not from when the controller happened
to look, so a controller that was down for a while still meters correctly:

- allocated hours: from the object's ``creationTimestamp`` to its end (a guest's ``destroyedAt``, else
  the ``deletionTimestamp``), or to now while it lasts;
- running hours of a guest: from the domain's start as its agent recorded it (``status.node.startedAt``)
  to now while it runs. Each period's record keeps the run intervals it saw; a new look merges the
  current run into them (same start: the interval grows), so metering twice, or again after a
  restart, never counts twice, and a run that went on through a controller outage is counted whole.
  The end of a run is the time the controller saw the domain stopped (an agent-recorded stop time
  would make it exact; a guest that stops while the controller is down is counted up to the last
  time its record was written, at most a checkpoint interval (an hour) short).
"""

from __future__ import annotations

import dataclasses
import datetime
import typing as t

HOUR = datetime.timedelta(hours=1)
GIB = 1024**3


def hour_floor(when: datetime.datetime) -> datetime.datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def periods(start: datetime.datetime, end: datetime.datetime) -> list[datetime.datetime]:
    """Starts of the hours overlapping [start, end] (at least the hour of ``start``)."""
    current, out = hour_floor(start), []
    while True:
        out.append(current)
        current += HOUR
        if current >= end:
            return out


def overlap(start: datetime.datetime, end: datetime.datetime, period: datetime.datetime) -> float:
    """Seconds of [start, end) inside the hour starting at ``period``."""
    return max((min(end, period + HOUR) - max(start, period)).total_seconds(), 0.0)


Interval = tuple[datetime.datetime, datetime.datetime]


def merge(intervals: t.Iterable[Interval]) -> list[Interval]:
    """Union of intervals, sorted; touching or overlapping ones join."""
    out: list[list[datetime.datetime]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


@dataclasses.dataclass(frozen=True)
class Meter:
    """One resource as metered now."""

    kind: str  # VirtualMachine, Volume, PublicIPAddress
    name: str
    uid: str
    created: datetime.datetime
    ended: datetime.datetime | None  # destroyed or deleted
    offering: str | None = None
    run: Interval | None = None  # the current (or just finished) run of a guest
    size_gib: float | None = None


def record_name(meter: Meter, period: datetime.datetime) -> str:
    prefix = {"VirtualMachine": "vm", "Volume": "vol", "PublicIPAddress": "ip"}[meter.kind]
    return f"{prefix}-{meter.name[:200]}-{meter.uid[:8]}-{period:%Y%m%d%H}"


def record_status(meter: Meter, period: datetime.datetime, now: datetime.datetime,
                  previous_running: t.Sequence[Interval] = ()) -> dict[str, t.Any]:
    """The status (wire names) the record of ``period`` should have."""
    end = min(meter.ended or now, now)
    allocated = overlap(meter.created, end, period)
    status: dict[str, t.Any] = {"allocatedHours": round(allocated / 3600, 6)}
    if meter.offering:
        status["offering"] = meter.offering
    if meter.kind == "VirtualMachine":
        runs = list(previous_running)
        if meter.run is not None:
            start, stop = max(meter.run[0], period), min(meter.run[1], period + HOUR, now)
            if stop > start:
                runs.append((start, stop))
        runs = merge(runs)
        status["running"] = [{"start": _iso(s), "end": _iso(e)} for s, e in runs]
        status["runningHours"] = round(sum((e - s).total_seconds() for s, e in runs) / 3600, 6)
    if meter.size_gib is not None:
        status["sizeGiB"] = round(meter.size_gib, 3)
        status["gibHours"] = round(meter.size_gib * allocated / 3600, 6)
    status["meteredUntil"] = _iso(min(now, period + HOUR))
    status["phase"] = "Closed" if now >= period + HOUR or (meter.ended and meter.ended <= now) else "Open"
    return status


def record_spec(meter: Meter, period: datetime.datetime) -> dict[str, t.Any]:
    return {"kind": meter.kind, "resource": meter.name, "resourceUid": meter.uid, "periodStart": _iso(period),
            "periodEnd": _iso(period + HOUR)}


def due_periods(meter: Meter, metered_until: datetime.datetime | None, now: datetime.datetime) -> list[datetime.datetime]:
    """The periods whose records may change now: from the last metered hour (or the creation) on."""
    start = max(meter.created, hour_floor(metered_until)) if metered_until else meter.created
    if meter.run is not None:
        start = min(start, max(meter.run[0], hour_floor(metered_until) if metered_until else meter.run[0]))
    end = min(meter.ended or now, now)
    if meter.run is not None:
        end = max(end, min(meter.run[1], now))
    return periods(start, max(end, start))


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: t.Any) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
