"""PublicIPAddress reconciler: an address from the zone's public ranges for an isolated network (its source
NAT address, made by the Network reconciler, or one a user acquires for static NAT, port forwarding or load
balancing). The allocation is recorded in ``status.ipAddress`` and rebuilt from it on start."""

from __future__ import annotations

import typing as t

from controllers import inventory, ipam, kinds
from controllers.api.v1alpha1 import PublicIPAddress
from controllers.api.v1alpha1.networkoffering import GuestIpType
from controllers.api.v1alpha1.physicalnetwork import TrafficType
from controllers.api.v1alpha1.publicipaddress import PublicIPAddressStatus
from controllers.conditions import Check, first_failure
from controllers.reconcilers.base import InventoryReconciler
from controllers.reconcilers.network import network_key
from controllers.runtime import Key


def ip_key(ip: t.Any) -> str:
    return network_key(ip.metadata.namespace, ip.metadata.name)


class PublicIPAddressReconciler(InventoryReconciler):
    kind = kinds.PUBLICIPADDRESSES

    def setup(self) -> None:
        super().setup()
        self.pools: dict[str, ipam.Pool] = {}
        for plural in ("firewallrules", "portforwardingrules", "loadbalancerrules"):
            self.index(plural, "public-ip", lambda r: [network_key(r.metadata.namespace, r.spec.public_ip_address)]
                       if r.spec.public_ip_address else [])
        self.index("physicalnetworks", ".spec.zone", lambda p: [p.spec.zone])

    def primed(self) -> None:
        for ip in self.store.list("publicipaddresses"):
            pnet = self.store.get("physicalnetworks", ip.status.physical_network)
            if pnet is not None and ip.status.ip_address:
                holder = self._pool(pnet).record(ip_key(ip), ipam.ip_int(ip.status.ip_address))
                if holder is not None:
                    raise RuntimeError(f"{ip.status.ip_address} is recorded by both {holder} and {ip_key(ip)}")

    def _pool(self, pnet: t.Any) -> ipam.Pool:
        ranges = [(r.start_ip, r.end_ip, r.gateway) for r in pnet.spec.public_ip_ranges]
        pool = self.pools.get(pnet.metadata.name)
        fresh = ipam.public_pool(ranges)
        if pool is None or pool.ranges != fresh.ranges:
            for owner, value in (pool.owners() if pool else {}).items():
                fresh.record(owner, value)
            pool = self.pools[pnet.metadata.name] = fresh
        return pool

    def forget(self, key: Key) -> None:
        for pool in self.pools.values():
            pool.release(network_key(key[1], key[2]))

    def watch_map(self):
        def of_rule(rule):
            return [self.key(rule.spec.public_ip_address, rule.metadata.namespace)] if rule.spec.public_ip_address \
                else []

        def of_network(network):
            return [self.key(ip.metadata.name, ip.metadata.namespace) for ip in self.store.by(
                "publicipaddresses", "network", network_key(network.metadata.namespace, network.metadata.name))]

        return {"firewallrules": of_rule, "portforwardingrules": of_rule, "loadbalancerrules": of_rule,
                "networks": of_network,
                "physicalnetworks": lambda p: [self.key(ip.metadata.name, ip.metadata.namespace)
                                               for ip in self.store.list("publicipaddresses") if not ip.status.ip_address]}

    def blocked_by(self, ip: PublicIPAddress) -> list[str]:
        names = [f"{self.store.kinds[plural].kind} {ip.metadata.namespace}/{rule.metadata.name}"
                 for plural in ("firewallrules", "portforwardingrules", "loadbalancerrules")
                 for rule in self.store.by(plural, "public-ip", ip_key(ip))]
        network = self.store.get("networks", ip.spec.network, ip.metadata.namespace)
        if ip.spec.source_nat and network is not None and network.metadata.deletion_timestamp is None:
            names.append(f"Network {ip.metadata.namespace}/{ip.spec.network} (its source NAT address goes with it)")
        return names

    def _physical_network(self, ip: PublicIPAddress, network: t.Any) -> t.Any:
        candidates = [network.status.physical_network] if network and network.status.physical_network else []
        candidates += sorted(p.metadata.name for p in self.store.by("physicalnetworks", ".spec.zone", ip.spec.zone))
        for name in candidates:
            pnet = self.store.get("physicalnetworks", name)
            if pnet is not None and pnet.spec.public_ip_ranges and \
                    any(tt.type == TrafficType.PUBLIC for tt in pnet.spec.traffic_types):
                return pnet
        return None

    def derive(self, ip: PublicIPAddress, ctx: inventory.Context) -> PublicIPAddressStatus:
        previous = ip.status
        status = previous.model_copy(deep=True)
        status.observed_generation = ip.metadata.generation
        network = self.store.get("networks", ip.spec.network, ip.metadata.namespace)
        offering = self.store.get("networkofferings", network.spec.network_offering) if network else None
        pnet = self._physical_network(ip, network)
        allocation = Check.passed()
        if network is None:
            allocation = Check.failed("NetworkNotFound", f"Network {ip.spec.network} does not exist")
        elif offering is not None and offering.spec.guest_ip_type != GuestIpType.ISOLATED:
            allocation = Check.failed("NetworkNotIsolated", f"Network {ip.spec.network} is "
                                                            f"{offering.spec.guest_ip_type.value}; public addresses "
                                                            "serve Isolated networks")
        elif network.spec.zone != ip.spec.zone:
            allocation = Check.failed("ZoneMismatch", f"Network {ip.spec.network} is in zone {network.spec.zone}")
        elif pnet is None:
            allocation = Check.failed("NoPublicIpRange", f"zone {ip.spec.zone} has no public IP ranges")
        if allocation.ok and not status.ip_address and not ctx.deleting:
            try:
                value = self._pool(pnet).allocate(ip_key(ip), ipam.ip_int(ip.spec.ip_address)
                                                  if ip.spec.ip_address else None)
            except ipam.AllocationError as error:
                reason = "InsufficientAddressCapacity" if error.reason == "Exhausted" else f"Address{error.reason}"
                allocation = Check.failed(reason, f"no public address for {ip.metadata.name}: {error.message}")
            else:
                status.ip_address = ipam.ip_str(value)
                status.physical_network = pnet.metadata.name
                span = next((r for r in pnet.spec.public_ip_ranges
                             if ipam.ip_int(r.start_ip) <= value <= ipam.ip_int(r.end_ip)), None)
                status.vlan = span.vlan if span else None
        nat = Check.passed()
        if ip.spec.static_nat is not None and network is not None:
            vm = self.store.get("virtualmachines", ip.spec.static_nat.virtual_machine.name, ip.metadata.namespace)
            key = network_key(ip.metadata.namespace, ip.spec.network)
            if vm is None:
                nat = Check.failed("VirtualMachineNotFound",
                                   f"VirtualMachine {ip.spec.static_nat.virtual_machine.name} does not exist")
            elif not any(n.network == key and n.ip_address for n in vm.status.nics):
                nat = Check.failed("VirtualMachineNotOnNetwork", f"VirtualMachine {vm.metadata.name} has no address "
                                                                 f"on network {ip.spec.network}")
        ready = first_failure(allocation, nat)
        if ready.ok:
            ready = Check.passed("Allocated", f"{status.ip_address} for network {ip.spec.network}")
        status.phase = "Releasing" if ctx.deleting else ("Allocated" if status.ip_address else "Allocating")
        status.conditions = inventory.conditions(previous.conditions, ip.metadata.generation, ctx, ready)
        return status

    async def finalize(self, ip: PublicIPAddress) -> bool:
        self.forget(self.key(ip.metadata.name, ip.metadata.namespace))
        return True
