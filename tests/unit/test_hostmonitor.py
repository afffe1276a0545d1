from controllers.api.v1alpha1.host import HostState
from controllers.hostmonitor import HostMonitor, Lease, connection_state

LEASE = Lease("host-h1", "cumulo-system", "h1", "2026-01-01T00:00:00.000000Z", 40)


def state_at(monitor, now, reported=True, lease=LEASE):
    return connection_state(monitor.last_seen("h1"), lease, reported, now, alert_after=300)


def test_no_lease_is_connecting():
    state, check, next_check = state_at(HostMonitor(), 0.0, lease=None)
    assert state == HostState.CONNECTING and check.reason == "NoHeartbeat" and next_check is None


def test_up_then_disconnected_then_alert_then_up_again():
    monitor = HostMonitor()
    monitor.observe("h1", LEASE, now=100.0)
    state, check, next_check = state_at(monitor, 120.0)
    assert state == HostState.UP and check.ok and 19 < next_check < 21
    state, check, next_check = state_at(monitor, 141.0)
    assert state == HostState.DISCONNECTED and check.reason == "HeartbeatLost" and 298 < next_check < 300
    state, check, _ = state_at(monitor, 441.0)
    assert state == HostState.ALERT and check.reason == "HeartbeatLostLong"
    renewed = Lease("host-h1", "cumulo-system", "h1", "2026-01-01T00:07:21.000000Z", 40)
    monitor.observe("h1", renewed, now=442.0)
    assert state_at(monitor, 443.0)[0] == HostState.UP


def test_a_renewal_counts_from_when_the_controller_sees_it_not_the_agents_clock():
    monitor = HostMonitor()
    monitor.observe("h1", LEASE, now=100.0)
    monitor.observe("h1", LEASE, now=200.0)  # same renewTime seen again: no renewal
    assert state_at(monitor, 150.0)[0] == HostState.DISCONNECTED


def test_fresh_lease_without_facts_is_still_connecting():
    monitor = HostMonitor()
    monitor.observe("h1", LEASE, now=0.0)
    assert state_at(monitor, 1.0, reported=False)[0] == HostState.CONNECTING
