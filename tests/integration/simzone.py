"""A zone of simulated hosts for the integration tests that run the simulator hypervisor: the zone's objects (Zone,
HostPod, Simulator Cluster, a Host-scoped pool per host, an image store; the hosts register themselves when their
agent starts), the wait for those hosts, and a tenant namespace's objects.

A helper module, not a test module: test modules import it (never each other)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from conftest_libvirt import Cloud, unique, wait_for
from libvirtcloud import Namespaced


def create_sim_zone(cloud: Cloud, hosts: Iterable[str], subnet: str) -> tuple[str, str]:
    """The zone's objects, its pod on ``subnet``.0/24 (e.g. "10.252.0"), a local pool for each of ``hosts``:
    (zone, cluster). Start the agent with ``--register-cluster <cluster>``."""
    zone, pod, cluster = unique("zone"), unique("pod"), unique("sim")
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53", "localStorageEnabled": True})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": f"{subnet}.0/24", "gateway": f"{subnet}.1",
                                   "startIp": f"{subnet}.10", "endIp": f"{subnet}.20"})
    cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "Simulator"})
    for host in hosts:
        cloud.create("storagepools", f"{host}-local", {"zone": zone, "scope": "Host", "type": "Filesystem",
                                                       "host": host, "path": f"/sim/{host}"})
    cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": "/sim/images"})
    return zone, cluster


def wait_hosts_up(cloud: Cloud, hosts: Iterable[str], timeout: float = 30, what: str = "hosts Up") -> None:
    hosts = list(hosts)
    wait_for(lambda: all((cloud.get("hosts", h).get("status") or {}).get("state") == "Up" for h in hosts),
             timeout=timeout, what=what)


class Tenant(Namespaced):
    """A tenant namespace's objects, as the simulator tests use them: ``patch`` takes the spec's changes."""

    def patch(self, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return super().patch(plural, name, {"spec": spec})

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status("virtualmachines", name).get("conditions", []) if c["type"] == type_), {})


def ready_template(tenant: Tenant, zone: str, name: str = "img") -> None:
    """A simulated template (its URL is never fetched), Ready."""
    tenant.create("templates", "Template", name, {"url": f"file:///sim/images/{name}.qcow2", "zone": zone,
                                                 "hypervisor": "Simulator"})
    wait_for(lambda: tenant.status("templates", name).get("state") == "Ready", timeout=30, what="template Ready")
