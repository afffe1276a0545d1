"""Cross-object admission rules (pure: no kopf, no I/O), answered by the validating webhook.

CRD schemas and CEL catch what is wrong with one object; these rules catch what is wrong between
objects, the way CloudStack's API refuses a deployVirtualMachine naming a template the caller may not
see: a template of another namespace that is not public, a network not shared with the namespace, an
unknown or disabled offering, an unknown zone, a rule on another namespace's address, a quota a
create would break. Every refusal names its rule (``TemplateNotVisible: ...``), the same reasons the
reconcilers put in conditions, which remain the second line for whatever reaches the API another way
(the webhook down, objects older than the rule).

The rules read a :class:`World` (the controller's primed store). Creates are checked in full; an
update only for what it changes (a finalizer or label write never trips over a template deleted
since), and nothing is checked once the object is being deleted.
"""

from __future__ import annotations

import dataclasses
import math
import typing as t

from controllers import quota

GIB = 1024**3


class World(t.Protocol):
    def get(self, plural: str, name: str | None, namespace: str | None = None) -> t.Any | None: ...


@dataclasses.dataclass(frozen=True)
class Refused(Exception):
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def _refuse(reason: str, message: str) -> t.NoReturn:
    raise Refused(reason, message)


def _changed(old: t.Any, new: t.Any, *fields: str) -> bool:
    """Whether a create (no ``old``) or an update touches any of the spec ``fields``."""
    if old is None:
        return True
    return any(getattr(old.spec, f) != getattr(new.spec, f) for f in fields)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def check_zone(world: World, zone: str) -> None:
    if world.get("zones", zone) is None:
        _refuse("ZoneNotFound", f"Zone {zone} does not exist")


def check_service_offering(world: World, name: str) -> t.Any:
    offering = world.get("serviceofferings", name)
    if offering is None:
        _refuse("ServiceOfferingNotFound", f"ServiceOffering {name} does not exist")
    if not offering.spec.enabled:
        _refuse("ServiceOfferingDisabled", f"ServiceOffering {name} is disabled")
    return offering


def check_disk_offering(world: World, name: str) -> t.Any:
    offering = world.get("diskofferings", name)
    if offering is None:
        _refuse("DiskOfferingNotFound", f"DiskOffering {name} does not exist")
    if not offering.spec.enabled:
        _refuse("DiskOfferingDisabled", f"DiskOffering {name} is disabled")
    return offering


def check_template(world: World, namespace: str, ref: t.Any) -> t.Any:
    """A namespace may use its own templates and public ones."""
    owner = ref.namespace or namespace
    template = world.get("templates", ref.name, owner)
    if template is None:
        _refuse("TemplateNotFound", f"Template {owner}/{ref.name} does not exist")
    if owner != namespace and not template.spec.public:
        _refuse("TemplateNotVisible", f"Template {owner}/{ref.name} is private to namespace {owner}; only public "
                                      "templates can be used from other namespaces")
    return template


def network_visible(network: t.Any, offering: t.Any, namespace: str) -> bool:
    """A namespace may use its own networks and shared networks opened to it."""
    if network.metadata.namespace == namespace:
        return True
    shared = network.spec.shared_with
    return offering is not None and offering.spec.guest_ip_type.value == "Shared" and shared is not None and (
        shared.all_namespaces or namespace in shared.namespaces)


def check_network(world: World, namespace: str, ref: t.Any) -> t.Any:
    owner = ref.namespace or namespace
    network = world.get("networks", ref.name, owner)
    if network is None or network.metadata.deletion_timestamp is not None:
        _refuse("NetworkNotFound", f"Network {owner}/{ref.name} does not exist")
    offering = world.get("networkofferings", network.spec.network_offering)
    if not network_visible(network, offering, namespace):
        _refuse("NetworkNotVisible", f"Network {owner}/{ref.name} is not shared with namespace {namespace}")
    return network


def _same_namespace(world: World, plural: str, kind: str, name: str, namespace: str) -> t.Any:
    obj = world.get(plural, name, namespace)
    if obj is None:
        _refuse(f"{kind}NotFound", f"{kind} {namespace}/{name} does not exist (rules may only use objects of "
                                   "their own namespace)")
    return obj


# ---------------------------------------------------------------------------------------------
# Per kind
# ---------------------------------------------------------------------------------------------


def virtual_machine(world: World, vm: t.Any, old: t.Any | None) -> None:
    namespace = vm.metadata.namespace
    if _changed(old, vm, "zone"):
        check_zone(world, vm.spec.zone)
    if _changed(old, vm, "service_offering"):
        check_service_offering(world, vm.spec.service_offering)
    if _changed(old, vm, "template"):
        template = check_template(world, namespace, vm.spec.template)
        if template.spec.zone and template.spec.zone != vm.spec.zone:
            _refuse("TemplateNotInZone", f"Template {template.metadata.namespace}/{template.metadata.name} is "
                                         f"registered in zone {template.spec.zone}, not {vm.spec.zone}")
    if _changed(old, vm, "nics"):
        before = {(n.network.namespace or namespace, n.network.name) for n in old.spec.nics} if old else set()
        for nic in vm.spec.nics:
            if (nic.network.namespace or namespace, nic.network.name) in before:
                continue
            network = check_network(world, namespace, nic.network)
            if network.spec.zone != vm.spec.zone:
                _refuse("NetworkInOtherZone", f"Network {network.metadata.namespace}/{network.metadata.name} is in "
                                              f"zone {network.spec.zone}, the guest in {vm.spec.zone}")


def volume(world: World, vol: t.Any, old: t.Any | None) -> None:
    if old is None:
        check_zone(world, vol.spec.zone)
        if vol.spec.disk_offering:
            check_disk_offering(world, vol.spec.disk_offering)
        if vol.spec.from_template and vol.spec.type.value != "ROOT":
            check_template(world, vol.metadata.namespace, vol.spec.from_template)
    if _changed(old, vol, "virtual_machine") and vol.spec.virtual_machine:
        _same_namespace(world, "virtualmachines", "VirtualMachine", vol.spec.virtual_machine.name,
                        vol.metadata.namespace)


def public_ip(world: World, ip: t.Any, old: t.Any | None) -> None:
    namespace = ip.metadata.namespace
    if old is None:
        check_zone(world, ip.spec.zone)
        network = _same_namespace(world, "networks", "Network", ip.spec.network, namespace)
        offering = world.get("networkofferings", network.spec.network_offering)
        kind = offering.spec.guest_ip_type.value if offering else "unknown"
        if kind != "Isolated":
            _refuse("NetworkNotIsolated", f"Network {namespace}/{ip.spec.network} is {kind}; public IP addresses "
                                          "serve isolated networks")
    if _changed(old, ip, "static_nat") and ip.spec.static_nat:
        _same_namespace(world, "virtualmachines", "VirtualMachine", ip.spec.static_nat.virtual_machine.name, namespace)


def _rule_address(world: World, rule: t.Any, old: t.Any | None) -> None:
    if _changed(old, rule, "public_ip_address") and rule.spec.public_ip_address:
        _same_namespace(world, "publicipaddresses", "PublicIPAddress", rule.spec.public_ip_address,
                        rule.metadata.namespace)


def port_forwarding_rule(world: World, rule: t.Any, old: t.Any | None) -> None:
    _rule_address(world, rule, old)
    if _changed(old, rule, "virtual_machine"):
        _same_namespace(world, "virtualmachines", "VirtualMachine", rule.spec.virtual_machine.name,
                        rule.metadata.namespace)


def load_balancer_rule(world: World, rule: t.Any, old: t.Any | None) -> None:
    _rule_address(world, rule, old)


def firewall_rule(world: World, rule: t.Any, old: t.Any | None) -> None:
    _rule_address(world, rule, old)
    if _changed(old, rule, "network") and rule.spec.network:
        _same_namespace(world, "networks", "Network", rule.spec.network, rule.metadata.namespace)


def snapshot(world: World, snap: t.Any, old: t.Any | None) -> None:
    if old is None:
        _same_namespace(world, "volumes", "Volume", snap.spec.volume.name, snap.metadata.namespace)


def network(world: World, net: t.Any, old: t.Any | None) -> None:
    if old is None:
        check_zone(world, net.spec.zone)
        offering = world.get("networkofferings", net.spec.network_offering)
        if offering is None:
            _refuse("NetworkOfferingNotFound", f"NetworkOffering {net.spec.network_offering} does not exist")


RULES: dict[str, t.Callable[[World, t.Any, t.Any | None], None]] = {
    "virtualmachines": virtual_machine,
    "volumes": volume,
    "snapshots": snapshot,
    "networks": network,
    "publicipaddresses": public_ip,
    "portforwardingrules": port_forwarding_rule,
    "loadbalancerrules": load_balancer_rule,
    "firewallrules": firewall_rule,
}
"""Kinds the webhook validates (tenant kinds; infrastructure is admin-made and checked by conditions)."""


# ---------------------------------------------------------------------------------------------
# Quota charges
# ---------------------------------------------------------------------------------------------


def _gib(size_bytes: int | None) -> int:
    return math.ceil((size_bytes or 0) / GIB)


def charge(world: World, plural: str, obj: t.Any) -> quota.Amounts:
    """What ``obj`` charges against its namespace's Quota. A guest carries its root disk (one volume
    and its size), so its root Volume, made by the controller, charges nothing of its own."""
    if plural == "virtualmachines":
        launch = obj.status.launch
        offering = world.get("serviceofferings", obj.spec.service_offering)
        cpus = offering.spec.cpu_number if offering else (launch.cpu_number if launch else 0)
        memory = offering.spec.memory_mib if offering else (launch.memory_mib if launch else 0)
        if launch is not None and obj.status.placement is not None:  # a placed guest holds what it got
            cpus, memory = max(cpus, launch.cpu_number), max(memory, launch.memory_mib)
        template = world.get("templates", obj.spec.template.name, obj.spec.template.namespace or
                             obj.metadata.namespace)
        root = obj.spec.root_disk_size_gib or (offering.spec.root_disk_size_gib if offering else None) or \
            _gib(template.status.virtual_size_bytes if template else 0)
        return {k: v for k, v in {"virtualMachines": 1, "cpus": cpus, "memoryMiB": memory, "volumes": 1,
                                  "primaryStorageGiB": root}.items() if v}
    if plural == "volumes":
        if obj.spec.type.value == "ROOT" and obj.spec.virtual_machine is not None:
            return {}
        size = obj.spec.size_gib
        if size is None and obj.spec.disk_offering:
            offering = world.get("diskofferings", obj.spec.disk_offering)
            size = offering.spec.disk_size_gib if offering else None
        size = max(size or 0, _gib(obj.status.size_bytes))
        return {k: v for k, v in {"volumes": 1, "primaryStorageGiB": size}.items() if v}
    return {{"snapshots": "snapshots", "networks": "networks", "publicipaddresses": "publicIPs"}[plural]: 1}


CHARGED = ("virtualmachines", "volumes", "snapshots", "networks", "publicipaddresses")
KIND_OF = {"virtualmachines": "VirtualMachine", "volumes": "Volume", "snapshots": "Snapshot", "networks": "Network",
           "publicipaddresses": "PublicIPAddress"}


def quota_key(plural: str, name: str) -> str:
    return f"{KIND_OF[plural]}/{name}"


def holds(plural: str, obj: t.Any) -> bool:
    """The object already holds resources the controller gave it: it counts whatever the limits say."""
    if plural == "virtualmachines":
        node = obj.status.node
        return bool((obj.status.placement and obj.status.placement.host) or (node and node.domain_state == "running"))
    if plural == "volumes":
        return bool(obj.status.storage_pool)
    return False


def check_quota(ledger: quota.QuotaLedger, world: World, plural: str, obj: t.Any, old: t.Any | None,
                limits: t.Mapping[str, int | None] | None, now: float, dry_run: bool = False) -> None:
    """Refuse a create or a growth the namespace's Quota cannot take; otherwise reserve it in the ledger
    (not for a dry run), so concurrent requests see each other."""
    if plural not in CHARGED or limits is None:
        return
    wanted = charge(world, plural, obj)
    if old is not None and not quota.grows(charge(world, plural, old), wanted):
        return  # nothing grows
    namespace = obj.metadata.namespace
    key = quota_key(plural, obj.metadata.name)
    order = (obj.metadata.creation_timestamp.isoformat() if obj.metadata.creation_timestamp else "",
             obj.metadata.uid or "")
    if dry_run:
        current = ledger.entries(namespace).get(key)
        problems = quota.excess(ledger.used(namespace), wanted, limits, current.charge if current else None)
        if problems:
            _refuse("QuotaExceeded", f"namespace {namespace}: " + "; ".join(problems))
        return
    refusal = ledger.admit(namespace, key, wanted, order, now, limits)
    if refusal is not None:
        _refuse(refusal.reason, refusal.message)
