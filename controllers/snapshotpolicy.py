"""Recurring snapshot schedules (CloudStack's snapshot policies): when a policy is due, pure (no kopf, no I/O).

A policy's ``schedule`` is read in its IANA ``timezone``:

* Hourly ``MM``: every hour at minute MM (local minute: a +05:30 zone shifts it by half an hour in UTC);
* Daily ``HH:MM``; Weekly ``HH:MM:D`` with D 1-7, 1 being Sunday (as CloudStack); Monthly ``HH:MM:DD`` with
  DD 1-31, clamped to the month's last day (the 31st is the last day of every month).

Local times that a daylight-saving change skips are taken at the same wall time after the change (one hour
later); those it repeats, once (the first). :func:`previous_due` and :func:`next_due` bracket an instant; the
controller creates the snapshot of the latest due time it has not made yet and requeues at the next one.

The controller's clock is injectable (:class:`ScaledClock`), so a test can run an Hourly policy in seconds.
"""

from __future__ import annotations

import dataclasses
import datetime
import typing as t
import zoneinfo

UTC = datetime.timezone.utc
HOUR = datetime.timedelta(hours=1)
SPAN_DAYS = 40  # every Daily/Weekly/Monthly schedule is due at least once within this many days either side


class ScheduleError(ValueError):
    """A schedule or time zone that cannot be read; the message is fit for a condition."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    interval: str  # Hourly, Daily, Weekly, Monthly
    minute: int
    hour: int = 0
    day: int = 0  # weekday 1-7 (1 = Sunday) or day of month 1-31
    zone: datetime.tzinfo = UTC


def parse(interval: str, schedule: str, timezone: str = "UTC") -> Schedule:
    try:
        zone: datetime.tzinfo = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {timezone!r}") from None
    parts = schedule.split(":")
    expected = {"Hourly": 1, "Daily": 2, "Weekly": 3, "Monthly": 3}.get(interval)
    formats = {"Hourly": "MM", "Daily": "HH:MM", "Weekly": "HH:MM:D", "Monthly": "HH:MM:DD"}
    if expected is None:
        raise ScheduleError(f"unknown interval type {interval!r}")
    if len(parts) != expected or not all(p.isdigit() for p in parts):
        raise ScheduleError(f"{interval} schedules are {formats[interval]}, not {schedule!r}")
    numbers = [int(p) for p in parts]
    if interval == "Hourly":
        minute, hour, day = numbers[0], 0, 0
    else:
        hour, minute = numbers[0], numbers[1]
        day = numbers[2] if len(numbers) == 3 else 0
    if not 0 <= minute <= 59 or not 0 <= hour <= 23:
        raise ScheduleError(f"{schedule!r}: hour 0-23 and minute 0-59")
    if interval == "Weekly" and not 1 <= day <= 7:
        raise ScheduleError(f"{schedule!r}: the day of the week is 1 (Sunday) to 7 (Saturday)")
    if interval == "Monthly" and not 1 <= day <= 31:
        raise ScheduleError(f"{schedule!r}: the day of the month is 1 to 31")
    return Schedule(interval, minute, hour, day, zone)


def _local(day: datetime.date, schedule: Schedule) -> datetime.datetime:
    """The instant of ``schedule``'s wall time on ``day``: fold=0 is the first of a repeated wall time and, for a
    skipped one, the instant an hour later in wall time (PEP 495)."""
    naive = datetime.datetime.combine(day, datetime.time(schedule.hour, schedule.minute))
    return naive.replace(tzinfo=schedule.zone, fold=0).astimezone(UTC)


def _matches(day: datetime.date, schedule: Schedule) -> bool:
    if schedule.interval == "Daily":
        return True
    if schedule.interval == "Weekly":
        return (day.isoweekday() % 7) + 1 == schedule.day  # isoweekday: Monday 1 … Sunday 7
    following = day + datetime.timedelta(days=1)
    last = following.month != day.month
    return day.day == schedule.day or (last and day.day < schedule.day)


def _candidates(schedule: Schedule, at: datetime.datetime) -> t.Iterator[datetime.datetime]:
    if schedule.interval == "Hourly":
        local = at.astimezone(schedule.zone)
        base = local.replace(minute=schedule.minute, second=0, microsecond=0).astimezone(UTC)
        for step in range(-2, 3):
            yield base + step * HOUR
        return
    today = at.astimezone(schedule.zone).date()
    for offset in range(-SPAN_DAYS, SPAN_DAYS + 1):
        day = today + datetime.timedelta(days=offset)
        if _matches(day, schedule):
            yield _local(day, schedule)


def previous_due(schedule: Schedule, at: datetime.datetime) -> datetime.datetime:
    """The latest due instant at or before ``at`` (UTC)."""
    return max(c for c in _candidates(schedule, at) if c <= at)


def next_due(schedule: Schedule, at: datetime.datetime) -> datetime.datetime:
    """The earliest due instant after ``at`` (UTC)."""
    return min(c for c in _candidates(schedule, at) if c > at)


def period(schedule: Schedule) -> datetime.timedelta:
    return {"Hourly": HOUR, "Daily": 24 * HOUR, "Weekly": 7 * 24 * HOUR}.get(schedule.interval, 28 * 24 * HOUR)


def snapshot_name(volume: str, interval: str, due: datetime.datetime) -> str:
    """The Snapshot a policy makes for one due time: deterministic, so a retried create cannot make two."""
    return f"{volume[:200]}-{interval.lower()}-{due.astimezone(UTC):%Y%m%d%H%M}"


def to_delete(snapshots: t.Sequence[tuple[str, datetime.datetime]], keep: int) -> list[str]:
    """The names of the oldest snapshots beyond ``keep`` (``snapshots``: name and creation time)."""
    ordered = sorted(snapshots, key=lambda entry: (entry[1], entry[0]))
    return [name for name, _ in ordered[:max(0, len(ordered) - keep)]]


class ScaledClock:
    """The policy clock: real time, or (tests) time running ``scale`` times faster from the controller's start."""

    def __init__(self, scale: float = 1.0, now: t.Callable[[], datetime.datetime] | None = None) -> None:
        self.scale = scale
        self._real = now or (lambda: datetime.datetime.now(UTC))
        self._origin = self._real()

    def now(self) -> datetime.datetime:
        real = self._real()
        return self._origin + (real - self._origin) * self.scale

    def real_seconds(self, until: datetime.datetime) -> float:
        """Real seconds until the policy clock shows ``until``."""
        return max(0.0, (until - self.now()).total_seconds() / self.scale)
