"""Agent metrics: driver operations are timed and their failures counted per host, domains per state follow a
listing, the heartbeat's renewals are timed, and the host workers' reports are exported at scrape time."""

from __future__ import annotations

import asyncio
import types

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controllers.api.v1alpha1.network import Segment
from hostagent import metrics
from hostagent.drivers.hypervisor import DomainDescription, DomainOwner, HostFacts, HypervisorDriver, HypervisorError
from hostagent.drivers.hypervisor.simulator import SimulatedCapacity, SimulatorDriver
from hostagent.drivers.network.simulator import SimulatorNetworkDriver
from hostagent.drivers.storage.simulator import SimulatorStorageDriver
from hostagent.faults import Fault, FaultInjector


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(all_samples, metric: str, /, **labels: str) -> float:
    return all_samples.get((metric, tuple(sorted(labels.items()))), 0.0)


class FakeHeartbeat:
    def __init__(self, host: str, outcomes: list[bool]):
        self.host, self.outcomes, self._state = host, outcomes, "starting"

    async def renew(self) -> bool:
        fresh = self.outcomes.pop(0)
        self._state = "ok" if fresh else "unreachable"
        return fresh


def simulated_agent(hosts: list[str]) -> types.SimpleNamespace:
    network = SimulatorNetworkDriver()  # shared by every simulated host, as build_workers does
    workers = {}
    for host in hosts:
        faults = FaultInjector()
        workers[host] = types.SimpleNamespace(
            name=host, faults=faults,
            hypervisor=SimulatorDriver(SimulatedCapacity(cpus=4, memory_mib=2048), faults, version="1"),
            storage=SimulatorStorageDriver(faults, capacity_bytes=2**40), network=network,
            heartbeat=FakeHeartbeat(host, [True, False, True]), reported=None, facts=None)
    return types.SimpleNamespace(workers=workers, config=types.SimpleNamespace(call_timeout=5.0), routers=None)


def description(uid: str, host: str) -> DomainDescription:
    owner = DomainOwner(namespace="demo", name=f"vm-{uid}", uid=uid, host=host)
    return DomainDescription(uuid=uid, name=f"demo_vm-{uid}", owner=owner, cpus=1, memory_mib=128, cpu_shares=1024)


def test_driver_operations_heartbeats_and_domains_are_measured_per_host():
    agent = simulated_agent(["sim-0", "sim-1"])
    before = samples()
    loops = metrics.instrument(agent)
    for loop in metrics.instrument(agent):  # idempotent: nothing is timed twice
        loop.close()
    first = agent.workers["sim-0"]
    assert isinstance(first.hypervisor, HypervisorDriver) and isinstance(first.network, SimulatorNetworkDriver)

    async def scenario():
        await first.hypervisor.start(description("u1", "sim-0"))
        await first.hypervisor.start(description("u2", "sim-0"))
        first.faults.configure({"start": Fault(fail=True, message="simulated: no memory")})
        with pytest.raises(HypervisorError):
            await first.hypervisor.start(description("u3", "sim-0"))
        await first.storage.create_disk("/sim/pool/d1.qcow2", 2**30)
        await first.network.ensure_segment(Segment(bridge="brvx-100", traffic_label="cloudbr0",
                                                   broadcast_uri="vxlan://100"))
        for _ in range(3):
            await first.heartbeat.renew()
        # The refresh loop lists every host's domains once, then sleeps.
        refresh = asyncio.create_task(loops[0])
        await asyncio.sleep(0.05)
        refresh.cancel()
        await asyncio.gather(refresh, return_exceptions=True)

    asyncio.run(scenario())
    after = samples()

    def grew(metric, /, **labels):
        return value(after, metric, **labels) - value(before, metric, **labels)

    duration = "cumulo_agent_driver_operation_duration_seconds_count"
    assert grew(duration, host="sim-0", driver="hypervisor", operation="start") == 3
    assert grew("cumulo_agent_driver_operation_failures_total", host="sim-0", driver="hypervisor", operation="start",
                error="HypervisorError") == 1
    assert grew(duration, host="sim-0", driver="storage", operation="create_disk") == 1
    assert grew(duration, host="shared", driver="network", operation="ensure_segment") == 1
    assert grew(duration, host="sim-1", driver="hypervisor", operation="domains") == 1
    assert value(after, "cumulo_agent_domains", host="sim-0", state="running") == 2
    assert value(after, "cumulo_agent_domains", host="sim-1", state="running") == 0
    assert grew("cumulo_agent_heartbeat_renew_duration_seconds_count", host="sim-0") == 3
    assert grew("cumulo_agent_heartbeat_failures_total", host="sim-0", reason="unreachable") == 1
    assert value(after, "cumulo_agent_heartbeat_last_success_timestamp_seconds", host="sim-0") > 0


def test_host_reports_are_exported_at_scrape_time():
    agent = simulated_agent(["h1"])
    worker = agent.workers["h1"]
    metrics.watch_agent(agent)
    worker.facts = HostFacts(hypervisor_type="Simulator", cpu_cores=8, cpu_speed_mhz=2400, memory_mib=4096)
    worker.reported = {
        "hypervisorHealthy": True,
        "storagePools": {"h1-local": {"reachable": True, "capacityBytes": 100, "usedBytes": 40}},
        "imageStores": {"images": {"reachable": False, "message": "no such directory"}},
        "bridges": {"cloudbr0": True, "cloudbr1": False},
    }
    now = samples()
    assert value(now, "cumulo_agent_hosts") == 1
    assert value(now, "cumulo_agent_hypervisor_healthy", host="h1") == 1
    assert value(now, "cumulo_agent_host_cpu_cores", host="h1") == 8
    assert value(now, "cumulo_agent_host_memory_bytes", host="h1") == 4096 * 2**20
    assert value(now, "cumulo_agent_storage_reachable", host="h1", type="pool", name="h1-local") == 1
    assert value(now, "cumulo_agent_storage_used_bytes", host="h1", type="pool", name="h1-local") == 40
    assert ("cumulo_agent_storage_reachable", (("host", "h1"), ("name", "images"), ("type", "imagestore"))) in now
    assert value(now, "cumulo_agent_storage_reachable", host="h1", type="imagestore", name="images") == 0
    assert value(now, "cumulo_agent_bridge_present", host="h1", label="cloudbr1") == 0
    worker.reported["hypervisorHealthy"] = False
    assert value(samples(), "cumulo_agent_hypervisor_healthy", host="h1") == 0


def test_the_agent_takes_a_metrics_port():
    from hostagent.main import parser

    assert parser().parse_args([]).metrics_port == metrics.DEFAULT_PORT == 9180
    assert parser().parse_args(["--metrics-port", "0"]).metrics_port == 0
    assert metrics.serve(0) is None
