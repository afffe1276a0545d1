"""Controller metrics: the runtime collector reads the Store (objects per phase, hosts, capacity, queue), and the
reconcile, placement and host-monitor hooks count what happens, through the in-memory API of the reconciler tests."""

from __future__ import annotations

import asyncio
import logging
import json
import types
import urllib.request

import pytest
from fakeapi import FakeApi
from prometheus_client.parser import text_string_to_metric_families
from test_vm_reconciler import add_hosts, agent_downloads, agent_runs, obj, settle, start, world

from controllers import kinds, log as controller_log, metrics
from controllers.runtime import Kind, Runtime

GIB = 2**30


def samples(registry=metrics.REGISTRY) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, through the text exposition (what Prometheus scrapes)."""
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(all_samples, name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(all_samples, name: str, **labels: str) -> float:
    """Sum over the series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in all_samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_the_collector_reports_objects_hosts_capacity_and_placements():
    async def scenario():
        api = FakeApi()
        world(api, hosts=("h1",), cpus=2, memory=1024)
        before = samples()
        runtime = await start(api)
        metrics.watch_runtime(runtime)
        agent_downloads(api)
        await settle(runtime)
        for name in ("vm1", "vm2", "vm3"):
            api.put("virtualmachines", obj("VirtualMachine", name, {"serviceOffering": "small",
                                                                    "template": {"name": "tiny"}, "zone": "z1"},
                                           namespace="demo"))
        await settle(runtime)
        # Two fit on h1 (2 vCPUs); the third waits for capacity.
        for name in ("vm1", "vm2"):
            root = api.get("volumes", f"{name}-root", "demo")
            root["status"]["node"] = {"exists": True, "sizeBytes": root["status"]["sizeBytes"]}
            api.put("volumes", root)
        await settle(runtime)
        agent_runs(api, "vm1")
        await settle(runtime)
        after = samples()

        phases = {vm: api.get("virtualmachines", vm, "demo")["status"]["phase"] for vm in ("vm1", "vm2", "vm3")}
        assert phases == {"vm1": "Running", "vm2": "Starting", "vm3": "Starting"}
        assert value(after, "cumulo_objects", kind="VirtualMachine", phase="Running") == 1
        assert value(after, "cumulo_objects", kind="VirtualMachine", phase="Starting") == 2
        assert value(after, "cumulo_objects", kind="Zone", phase="Ready") == 1
        # vm2's root disk exists, but stays Creating until vm2's domain runs (then Attached in one write).
        assert value(after, "cumulo_objects", kind="Volume", phase="Attached") == 1
        assert value(after, "cumulo_objects", kind="Volume", phase="Creating") == 1
        assert value(after, "cumulo_objects_not_ready", kind="VirtualMachine", reason="InsufficientCapacity") == 1
        assert value(after, "cumulo_virtualmachines_unscheduled", zone="z1", reason="InsufficientCapacity") == 1

        location = {"zone": "z1", "pod": "p1", "cluster": "c1", "host": "h1"}
        assert value(after, "cumulo_hosts", zone="z1", cluster="c1", state="Up", resource_state="Enabled") == 1
        assert value(after, "cumulo_host_cpu_capacity_cores", **location) == 2
        assert value(after, "cumulo_host_cpu_allocated_cores", **location) == 2
        assert value(after, "cumulo_host_memory_capacity_bytes", **location) == 1024 * 2**20
        assert value(after, "cumulo_host_memory_allocated_bytes", **location) == 1024 * 2**20
        assert value(after, "cumulo_host_virtual_machines", **location) == 2
        assert value(after, "cumulo_storagepool_capacity_bytes", zone="z1", scope="Host", pool="h1-local") == 100 * GIB
        assert value(after, "cumulo_storagepool_allocated_bytes", zone="z1", scope="Host", pool="h1-local") == 2 * GIB

        assert value(after, "cumulo_workqueue_depth") == 0 and value(after, "cumulo_reconcile_workers") == 2
        # Reconciles are counted per kind; two placements observed, one failure at least.
        grew = value(after, "cumulo_reconcile_duration_seconds_count", kind="VirtualMachine") - \
            value(before, "cumulo_reconcile_duration_seconds_count", kind="VirtualMachine")
        assert grew >= 6
        assert value(after, "cumulo_placement_duration_seconds_count", zone="z1") - \
            value(before, "cumulo_placement_duration_seconds_count", zone="z1") == 2
        assert value(after, "cumulo_placement_failures_total", zone="z1", reason="InsufficientCapacity") > \
            value(before, "cumulo_placement_failures_total", zone="z1", reason="InsufficientCapacity")
        # Each host went Connecting -> Up once.
        assert total(after, "cumulo_host_state_transitions_total", to_state="Up") > \
            total(before, "cumulo_host_state_transitions_total", to_state="Up")

        # Capacity appears: the waiting guest is placed, and its wait observed.
        add_hosts(api, ("h2",), cpus=2)
        await settle(runtime)
        later = samples()
        assert value(later, "cumulo_placement_duration_seconds_count", zone="z1") - \
            value(before, "cumulo_placement_duration_seconds_count", zone="z1") == 3
        assert value(later, "cumulo_virtualmachines_unscheduled", zone="z1", reason="InsufficientCapacity") == 0
        assert total(later, "cumulo_hosts", state="Up") == 2
        await runtime.stop()

    asyncio.run(scenario())


def test_reconcile_errors_and_conflicts_are_counted_per_kind():
    from controllers.runtime import Conflict, Reconciler, Result

    def parse(raw):
        meta = types.SimpleNamespace(name=raw["metadata"]["name"], namespace=None)
        return types.SimpleNamespace(metadata=meta)

    widgets = Kind("widgets", "example.com", "v1", False, parse, "Widget")

    class Fail(Reconciler):
        kind = widgets
        outcomes = [ValueError("boom"), Conflict("changed"), None]

        async def reconcile(self, obj):
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return Result()

    class Api:
        async def list(self, kind):
            return [{"metadata": {"name": "w1", "resourceVersion": "1"}}]

    async def scenario():
        before = samples()
        runtime = Runtime(Api(), [widgets], [Fail], workers=1)
        runtime._backoff[("widgets", None, "w1")] = 0.005  # retry at once
        await runtime.start()
        for _ in range(400):
            if not Fail.outcomes:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await runtime.stop()
        after = samples()
        assert value(after, "cumulo_reconcile_errors_total", kind="Widget", error="ValueError") - \
            value(before, "cumulo_reconcile_errors_total", kind="Widget", error="ValueError") == 1
        assert value(after, "cumulo_reconcile_conflicts_total", kind="Widget") - \
            value(before, "cumulo_reconcile_conflicts_total", kind="Widget") == 1
        assert value(after, "cumulo_reconcile_duration_seconds_count", kind="Widget") - \
            value(before, "cumulo_reconcile_duration_seconds_count", kind="Widget") == 3

    logging.getLogger("controllers.runtime").disabled = True
    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("controllers.runtime").disabled = False


def test_metrics_declared_twice_are_the_same_and_a_clash_is_refused():
    first = metrics.counter("test_things_total", "Things.", ["a"])
    assert metrics.counter("test_things", "Things.", ["a"]) is first
    with pytest.raises(ValueError):
        metrics.gauge("test_things", "Things.", ["a"])


def test_the_registry_is_served_over_http():
    server = metrics.serve(0)
    assert server is None  # port 0: no server
    from prometheus_client import start_http_server

    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "# TYPE cumulo_reconcile_duration_seconds histogram" in body
        assert "process_cpu_seconds_total" in body
    finally:
        server.shutdown()
        server.server_close()


def test_the_controller_json_log_has_the_agents_shape(capsys):
    controller_log.setup("INFO", "json")
    try:
        logging.getLogger("cumulo.controller").info("primed %d kinds", 3, extra={"workers": 4})
        # kopf's per-object records carry the object in k8s_ref.
        logging.getLogger("kopf.objects").warning("handler failed", extra={
            "k8s_skip": False, "k8s_ref": {"kind": "Zone", "name": "z1", "namespace": None},
            # kopf's own event-posting handler (installed when another test ran kopf) reads this: never post.
            "settings": types.SimpleNamespace(posting=types.SimpleNamespace(level=logging.CRITICAL + 1, enabled=False,
                                                                         loggers=False))})
    finally:
        logging.getLogger().handlers[:] = []
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "primed 3 kinds" and lines[0]["level"] == "info" and lines[0]["workers"] == 4
    assert lines[0]["logger"] == "cumulo.controller" and lines[0]["time"].endswith("Z")
    assert lines[1]["object"] == "z1" and lines[1]["kind"] == "Zone" and "settings" not in lines[1]
    assert set(lines[1]) == {"time", "level", "logger", "msg", "object", "kind"}


def test_every_kind_the_controller_watches_has_a_kind_name():
    assert all(kind.kind for kind in kinds.ALL)
