import datetime

from controllers.api.v1alpha1.common import ConditionStatus
from controllers.conditions import Check, find, first_failure, is_true, merge

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def test_transition_time_moves_only_when_status_flips():
    first = merge([], {"Ready": Check.failed("ZoneNotFound", "no zone")}, 1, T0)
    same = merge(first, {"Ready": Check.failed("ZoneDisabled", "disabled")}, 2, T1)
    assert find(same, "Ready").last_transition_time == T0
    assert find(same, "Ready").reason == "ZoneDisabled"
    flipped = merge(same, {"Ready": Check.passed("Ready")}, 2, T1)
    assert find(flipped, "Ready").last_transition_time == T1
    assert find(flipped, "Ready").status == ConditionStatus.TRUE and is_true(flipped, "Ready")


def test_unchanged_world_gives_an_equal_list_and_none_removes():
    wanted = {"Ready": Check.passed(), "DeletionBlocked": Check(True, "DependentsExist", "HostPod pod1")}
    first = merge([], wanted, 1, T0)
    assert merge(first, wanted, 1, T1) == first
    assert [c.type for c in first] == ["Ready", "DeletionBlocked"]
    assert [c.type for c in merge(first, {"DeletionBlocked": None}, 1, T1)] == ["Ready"]


def test_first_failure_reports_the_first_failed_check():
    assert first_failure(Check.passed(), Check.failed("A", "a"), Check.failed("B", "b")).reason == "A"
    assert first_failure(Check.passed(), Check.passed()).ok
