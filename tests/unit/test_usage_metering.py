"""Usage metering: hourly records from the timestamps on the objects (pure)."""

from __future__ import annotations

import datetime

from controllers import usage

T0 = datetime.datetime(2026, 3, 1, 10, 0, tzinfo=datetime.UTC)


def at(minutes: float) -> datetime.datetime:
    return T0 + datetime.timedelta(minutes=minutes)


def vm(run=None, created=at(-30), ended=None):
    return usage.Meter("VirtualMachine", "g1", "0123456789ab", created, ended, offering="small", run=run)


def test_a_run_across_an_hour_is_split_between_the_periods():
    meter = vm(run=(at(50), at(70)))
    due = usage.due_periods(meter, None, now=at(70))
    assert due == [at(-60), at(0), at(60)]
    first = usage.record_status(meter, at(0), now=at(70))
    second = usage.record_status(meter, at(60), now=at(70))
    assert first["runningHours"] == round(10 / 60, 6) and second["runningHours"] == round(10 / 60, 6)
    assert first["allocatedHours"] == 1.0 and second["allocatedHours"] == round(10 / 60, 6)
    assert first["meteredUntil"] == "2026-03-01T11:00:00Z" and second["meteredUntil"] == "2026-03-01T11:10:00Z"
    assert usage.record_name(meter, at(60)) == "vm-g1-01234567-2026030111"


def test_metering_again_never_counts_twice_and_a_longer_look_extends_the_run():
    first = usage.record_status(vm(run=(at(5), at(10))), at(0), now=at(10))
    previous = [(usage.parse_time(i["start"]), usage.parse_time(i["end"])) for i in first["running"]]
    again = usage.record_status(vm(run=(at(5), at(10))), at(0), now=at(10), previous_running=previous)
    assert again == first
    # After a controller restart: the domain still runs with the same start; the run is counted whole.
    later = usage.record_status(vm(run=(at(5), at(40))), at(0), now=at(40), previous_running=previous)
    assert later["runningHours"] == round(35 / 60, 6)
    assert later["running"] == [{"start": "2026-03-01T10:05:00Z", "end": "2026-03-01T10:40:00Z"}]
    # A second run in the same hour adds to the first.
    previous = [(usage.parse_time(i["start"]), usage.parse_time(i["end"])) for i in later["running"]]
    both = usage.record_status(vm(run=(at(50), at(55))), at(0), now=at(55), previous_running=previous)
    assert both["runningHours"] == round(40 / 60, 6) and len(both["running"]) == 2


def test_allocated_hours_end_when_the_guest_is_destroyed_and_volumes_count_gib_hours():
    destroyed = vm(created=at(10), ended=at(40))
    assert usage.record_status(destroyed, at(0), now=at(59))["allocatedHours"] == 0.5
    volume = usage.Meter("Volume", "data", "abcdef123456", at(30), None, size_gib=10)
    status = usage.record_status(volume, at(0), now=at(60))
    assert status["gibHours"] == 5.0 and status["sizeGiB"] == 10 and "runningHours" not in status


def test_due_periods_start_at_the_last_metered_hour():
    meter = vm(created=at(-600))
    assert usage.due_periods(meter, at(-30), now=at(10)) == [at(-60), at(0)]
    assert len(usage.due_periods(meter, None, now=at(10))) == 11
