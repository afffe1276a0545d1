"""Firewall, port forwarding and load balancer rules, and security groups.

A rule is not applied by its own reconciler: the Network reconciler folds every rule of the network's
public addresses into the VirtualRouter's configuration. Here each rule's references are checked and its
``Ready`` condition says whether the network's router carries it: ``Applied`` once the router runs the
configuration holding it, a reason otherwise (a missing address, a guest not on the network, a network that
is shut down and applies its rules when it is implemented again).
"""

from __future__ import annotations

import typing as t

from controllers import inventory, kinds
from controllers.api.v1alpha1.firewallrule import Direction
from controllers.api.v1alpha1.loadbalancerrule import LoadBalancerRuleStatus, MemberState
from controllers.api.v1alpha1.securitygroup import SecurityGroupStatus
from controllers.conditions import Check, first_failure, merge
from controllers.reconcilers.base import InventoryReconciler
from controllers.reconcilers.network import network_key
from controllers.runtime import utcnow


def nic_address(vm: t.Any, network: str) -> str | None:
    return next((n.ip_address for n in vm.status.nics if n.network == network and n.ip_address), None)


class RuleReconciler(InventoryReconciler):
    """Common to the three rule kinds: the public address (or network) the rule hangs on, and whether the
    network's router applies it."""

    def setup(self) -> None:
        super().setup()
        self.index(self.kind.plural, "public-ip", lambda r: [network_key(r.metadata.namespace,
                                                                          r.spec.public_ip_address)]
                   if r.spec.public_ip_address else [])

    def watch_map(self):
        plural = self.kind.plural

        def by_ip(ip):
            return [self.key(r.metadata.name, r.metadata.namespace)
                    for r in self.store.by(plural, "public-ip", network_key(ip.metadata.namespace, ip.metadata.name))]

        def by_network(network):
            rules = [r for ip in self.store.list("publicipaddresses")
                     if ip.metadata.namespace == network.metadata.namespace and ip.spec.network == network.metadata.name
                     for r in self.store.by(plural, "public-ip", network_key(ip.metadata.namespace, ip.metadata.name))]
            rules += [r for r in self.store.list(plural) if getattr(r.spec, "network", None) == network.metadata.name
                      and r.metadata.namespace == network.metadata.namespace]
            return [self.key(r.metadata.name, r.metadata.namespace) for r in rules]

        return {"publicipaddresses": by_ip, "networks": by_network,
                "virtualrouters": lambda router: by_network(self.store.get("networks", router.spec.network,
                                                                           router.metadata.namespace))
                if self.store.get("networks", router.spec.network, router.metadata.namespace) else [],
                "virtualmachines": lambda vm: [self.key(r.metadata.name, r.metadata.namespace)
                                               for r in self.store.list(plural)
                                               if r.metadata.namespace == vm.metadata.namespace]}

    def network_of(self, rule: t.Any) -> tuple[t.Any, Check]:
        namespace = rule.metadata.namespace
        network_name = getattr(rule.spec, "network", None)
        if rule.spec.public_ip_address:
            ip = self.store.get("publicipaddresses", rule.spec.public_ip_address, namespace)
            if ip is None:
                return None, Check.failed("PublicIPAddressNotFound",
                                          f"PublicIPAddress {rule.spec.public_ip_address} does not exist")
            if not ip.status.ip_address:
                return None, Check.failed("PublicIPAddressNotAllocated",
                                          f"PublicIPAddress {rule.spec.public_ip_address} has no address yet")
            network_name = ip.spec.network
        network = self.store.get("networks", network_name, namespace)
        if network is None:
            return None, Check.failed("NetworkNotFound", f"Network {network_name} does not exist")
        return network, Check.passed()

    def applied(self, network: t.Any) -> Check:
        router = self.store.get("virtualrouters", network.metadata.name, network.metadata.namespace)
        if network.status.phase != "Implemented" or router is None:
            return Check.failed("NetworkNotImplemented", f"Network {network.metadata.name} is "
                                                         f"{network.status.phase or 'Allocated'}; its rules are "
                                                         "applied when a guest on it starts")
        node = router.status.node
        if node is None or node.applied_generation != router.metadata.generation:
            return Check.failed("Applying", f"the virtual router on {router.spec.host} is applying the rules")
        return Check.passed("Applied", f"applied by the virtual router on {router.spec.host}")

    def targets(self, rule: t.Any, network: t.Any) -> Check:
        return Check.passed()

    def derive(self, rule: t.Any, ctx: inventory.Context) -> t.Any:
        status = rule.status.model_copy(deep=True)
        status.observed_generation = rule.metadata.generation
        network, found = self.network_of(rule)
        ready = first_failure(found, self.targets(rule, network) if network else Check.passed())
        if ready.ok:
            ready = self.applied(network)
        status.phase = inventory.phase(ctx, ready, "Applied") if ready.ok or ctx.deleting else \
            ("Pending" if ready.reason in ("NetworkNotImplemented", "Applying") else "Error")
        status.conditions = inventory.conditions(rule.status.conditions, rule.metadata.generation, ctx, ready)
        return self.extra(rule, network, status)

    def extra(self, rule: t.Any, network: t.Any, status: t.Any) -> t.Any:
        return status


class FirewallRuleReconciler(RuleReconciler):
    kind = kinds.FIREWALLRULES

    def targets(self, rule, network) -> Check:
        if rule.spec.direction == Direction.EGRESS and rule.spec.public_ip_address:
            return Check.failed("InvalidRule", "an Egress rule names a network, not a public address")
        return Check.passed()


class PortForwardingRuleReconciler(RuleReconciler):
    kind = kinds.PORTFORWARDINGRULES

    def targets(self, rule, network) -> Check:
        vm = self.store.get("virtualmachines", rule.spec.virtual_machine.name, rule.metadata.namespace)
        if vm is None:
            return Check.failed("VirtualMachineNotFound", f"VirtualMachine {rule.spec.virtual_machine.name} does not "
                                                          "exist")
        if rule.spec.vm_ip_address is None and nic_address(vm, network_key(network.metadata.namespace,
                                                                            network.metadata.name)) is None:
            return Check.failed("VirtualMachineNotOnNetwork", f"VirtualMachine {vm.metadata.name} has no address on "
                                                              f"network {network.metadata.name}")
        return Check.passed()


class LoadBalancerRuleReconciler(RuleReconciler):
    kind = kinds.LOADBALANCERRULES

    def _members(self, rule, network) -> list[MemberState]:
        key = network_key(network.metadata.namespace, network.metadata.name)
        members = []
        for member in rule.spec.members:
            vm = self.store.get("virtualmachines", member.name, rule.metadata.namespace)
            members.append(MemberState(name=member.name, ip_address=nic_address(vm, key) if vm else None))
        return members

    def targets(self, rule, network) -> Check:
        missing = [m.name for m in self._members(rule, network) if m.ip_address is None]
        if missing:
            return Check.failed("MemberNotOnNetwork", f"members without an address on network "
                                                      f"{network.metadata.name}: {', '.join(missing)}")
        return Check.passed()

    def extra(self, rule, network, status: LoadBalancerRuleStatus) -> LoadBalancerRuleStatus:
        status.members = self._members(rule, network) if network is not None else []
        # Said, not hidden: the router balances over every member; it does not probe them yet, and nftables
        # cannot count connections per member.
        gaps = []
        if rule.spec.health_check is not None:
            gaps.append("health checks are not implemented yet: every member gets connections")
        if rule.spec.algorithm.value == "LeastConn":
            gaps.append("LeastConn is balanced round robin (the router's nftables cannot count connections)")
        limitation = Check.failed("NotImplemented", "; ".join(gaps)) if gaps else None
        status.conditions = merge(status.conditions, {"Limitations": limitation}, rule.metadata.generation, utcnow())
        return status


class SecurityGroupReconciler(InventoryReconciler):
    kind = kinds.SECURITYGROUPS

    def setup(self) -> None:
        super().setup()
        self.index("virtualmachines", "security-group", lambda vm: [network_key(vm.metadata.namespace, g)
                                                                     for g in vm.spec.security_groups])

    def watch_map(self):
        return {"virtualmachines": lambda vm: [self.key(g, vm.metadata.namespace) for g in vm.spec.security_groups]}

    def blocked_by(self, group: t.Any) -> list[str]:
        return [f"VirtualMachine {vm.metadata.namespace}/{vm.metadata.name}" for vm in self.store.by(
            "virtualmachines", "security-group", network_key(group.metadata.namespace, group.metadata.name))]

    def derive(self, group: t.Any, ctx: inventory.Context) -> SecurityGroupStatus:
        members = self.store.by("virtualmachines", "security-group",
                                network_key(group.metadata.namespace, group.metadata.name))
        missing = sorted({name for rule in [*group.spec.ingress, *group.spec.egress] for name in rule.security_groups
                          if self.store.get("securitygroups", name, group.metadata.namespace) is None})
        ready = Check.failed("SecurityGroupNotFound", f"rules name missing SecurityGroups: {', '.join(missing)}") \
            if missing else Check.passed("Ready", f"{len(members)} members")
        return SecurityGroupStatus(
            observed_generation=group.metadata.generation, phase=inventory.phase(ctx, ready), members=len(members),
            conditions=inventory.conditions(group.status.conditions, group.metadata.generation, ctx, ready))

