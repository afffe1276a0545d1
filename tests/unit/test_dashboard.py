"""The Grafana dashboard shipped in the chart: valid JSON, and every metric its queries use is one the controller or
the agent exports (so a renamed metric cannot leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fakeapi import FakeApi

from controllers import kinds, metrics as controller_metrics, reconcilers
from controllers.runtime import Runtime
from hostagent import metrics as agent_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "cumulo" / "dashboards" / "cumulo.json"
METRIC = re.compile(r"\b(cumulo_[a-z0-9_]+)")


def exported(registry) -> set[str]:
    """Sample names a scrape can show, from every family the registry's collectors declare."""
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "summary": ("_count", "_sum", "")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def expressions(dashboard: dict) -> list[str]:
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [variable["query"]["query"] for variable in dashboard["templating"]["list"]
              if isinstance(variable.get("query"), dict)]
    return found


def test_every_metric_in_the_dashboard_is_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    # The state collectors declare their families even before the runtime/agent has anything to report.
    controller_metrics.watch_runtime(Runtime(FakeApi(), kinds.ALL, reconcilers.ALL))
    agent_metrics.watch_agent(type("Agent", (), {"workers": {}})())
    known = exported(controller_metrics.REGISTRY) | exported(agent_metrics.REGISTRY)
    used = {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    assert used, "no metric found in the dashboard's queries"
    assert not used - known, f"the dashboard queries metrics nobody exports: {sorted(used - known)}"
    # Every panel family is covered: reconciles, queue, objects, placements, capacity, hosts, agents.
    for name in ("cumulo_reconcile_duration_seconds_bucket", "cumulo_reconcile_errors_total", "cumulo_workqueue_depth",
                 "cumulo_objects", "cumulo_placement_duration_seconds_bucket", "cumulo_placement_failures_total",
                 "cumulo_host_cpu_capacity_cores", "cumulo_host_memory_allocated_bytes", "cumulo_hosts",
                 "cumulo_agent_driver_operation_duration_seconds_bucket",
                 "cumulo_agent_driver_operation_failures_total", "cumulo_agent_domains"):
        assert name in used, name


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"] == "Cumulo"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
