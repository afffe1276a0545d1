"""Snapshot policy schedules (controllers/snapshotpolicy.py): due times in time zones, DST, retention."""

from __future__ import annotations

import datetime

import pytest

from controllers import snapshotpolicy as sp

UTC = datetime.timezone.utc


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).astimezone(UTC)


def test_hourly_is_due_at_the_minute_every_hour():
    schedule = sp.parse("Hourly", "15")
    assert sp.previous_due(schedule, at("2026-11-21T10:20:00+00:00")) == at("2026-11-21T10:15:00+00:00")
    assert sp.next_due(schedule, at("2026-11-21T10:20:00+00:00")) == at("2026-11-21T11:15:00+00:00")
    # At the due instant itself: that one is the previous, the next is an hour on.
    assert sp.previous_due(schedule, at("2026-11-21T10:15:00+00:00")) == at("2026-11-21T10:15:00+00:00")
    assert sp.next_due(schedule, at("2026-11-21T10:15:00+00:00")) == at("2026-11-21T11:15:00+00:00")


def test_hourly_minute_is_local_in_a_half_hour_zone():
    schedule = sp.parse("Hourly", "00", "Asia/Kolkata")  # +05:30
    assert sp.next_due(schedule, at("2026-11-21T10:05:00+00:00")) == at("2026-11-21T10:30:00+00:00")


def test_daily_in_a_time_zone():
    schedule = sp.parse("Daily", "02:30", "America/New_York")  # EST, UTC-5 in November
    assert sp.next_due(schedule, at("2026-11-21T06:00:00+00:00")) == at("2026-11-21T07:30:00+00:00")
    assert sp.previous_due(schedule, at("2026-11-21T06:00:00+00:00")) == at("2026-11-20T07:30:00+00:00")


def test_weekly_day_one_is_sunday():
    schedule = sp.parse("Weekly", "08:00:1")
    # 2026-11-21 is a Saturday.
    assert sp.next_due(schedule, at("2026-11-21T12:00:00+00:00")) == at("2026-11-22T08:00:00+00:00")
    assert sp.previous_due(schedule, at("2026-11-21T12:00:00+00:00")) == at("2026-11-15T08:00:00+00:00")


def test_monthly_day_31_is_each_months_last_day():
    schedule = sp.parse("Monthly", "23:00:31")
    assert sp.next_due(schedule, at("2026-02-01T00:00:00+00:00")) == at("2026-02-28T23:00:00+00:00")
    assert sp.next_due(schedule, at("2026-03-01T00:00:00+00:00")) == at("2026-03-31T23:00:00+00:00")
    assert sp.previous_due(schedule, at("2026-04-15T00:00:00+00:00")) == at("2026-03-31T23:00:00+00:00")


def test_daylight_saving_gap_and_repeat():
    schedule = sp.parse("Daily", "02:30", "Europe/Berlin")
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist and is taken an hour later, 03:30 CEST.
    assert sp.next_due(schedule, at("2026-03-29T00:00:00+00:00")) == at("2026-03-29T01:30:00+00:00")
    # 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice and is due once, the first time.
    first = sp.next_due(schedule, at("2026-10-25T00:00:00+00:00"))
    assert first == at("2026-10-25T00:30:00+00:00")
    assert sp.next_due(schedule, first) == at("2026-10-26T01:30:00+00:00")


@pytest.mark.parametrize("interval, schedule, timezone, message", [
    ("Hourly", "60", "UTC", "minute 0-59"),
    ("Daily", "30", "UTC", "Daily schedules are HH:MM"),
    ("Weekly", "10:00:8", "UTC", "1 (Sunday) to 7"),
    ("Monthly", "10:00:0", "UTC", "1 to 31"),
    ("Daily", "10:00", "Mars/Olympus", "unknown time zone"),
])
def test_bad_schedules_say_why(interval, schedule, timezone, message):
    with pytest.raises(sp.ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sp.parse(interval, schedule, timezone)


def test_retention_deletes_the_oldest_beyond_the_maximum():
    created = [("b", at("2026-11-21T02:00:00+00:00")), ("a", at("2026-11-21T01:00:00+00:00")),
               ("c", at("2026-11-21T03:00:00+00:00"))]
    assert sp.to_delete(created, 2) == ["a"]
    assert sp.to_delete(created, 5) == []


def test_snapshot_names_are_deterministic_per_due_time():
    due = at("2026-11-21T10:15:00+00:00")
    assert sp.snapshot_name("data", "Hourly", due) == "data-hourly-202611211015"


def test_a_scaled_clock_runs_faster_from_its_origin():
    moments = iter([at("2026-11-21T10:00:00+00:00"), at("2026-11-21T10:00:10+00:00"),
                    at("2026-11-21T10:00:10+00:00")])
    clock = sp.ScaledClock(360, now=lambda: next(moments))
    assert clock.now() == at("2026-11-21T11:00:00+00:00")  # 10 s × 360 = 1 h
    assert clock.real_seconds(at("2026-11-21T12:00:00+00:00")) == pytest.approx(10.0)
