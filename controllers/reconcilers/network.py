"""Network reconciler: CloudStack's network lifecycle (Allocated → Implementing → Implemented → Shutdown) as a
level-based reconcile, and the network's virtual router.

A network is implemented while a guest on it is placed or running (CloudStack implements a network when
its first VM starts and shuts it down after the last one stops): a VLAN ID or VNI is taken from the
physical network, the router is placed on a host, and its whole configuration (the segments, DHCP leases
from IPAM, NAT, port forwarding, firewall, egress and load balancing, all resolved to addresses) is written
into a VirtualRouter object that the agent of that host runs. When no guest needs the network any more the
router goes and the VLAN/VNI is released; the CIDR, the gateway, the guests' addresses and the source NAT
address stay, so the next start brings the same network back.

IPAM lives here (one :class:`~controllers.ipam.AddressPool` per network, rebuilt on start from the
addresses the VirtualMachines record); the VirtualMachine reconciler draws its NICs' addresses from it.
"""

from __future__ import annotations

import ipaddress
import typing as t

from controllers import inventory, ipam, kinds
from controllers.api.v1alpha1 import Network, VirtualRouter
from controllers.api.v1alpha1.common import API_VERSION, AllocationState
from controllers.api.v1alpha1.firewallrule import Direction
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.network import (
    NetworkPhase,
    NetworkStatus,
    RouterInfo,
    Segment,
    TrafficRule,
    broadcast_uri,
    guest_bridge,
    parse_broadcast_uri,
)
from controllers.api.v1alpha1.networkoffering import GuestIpType, NetworkService, ServiceProvider
from controllers.api.v1alpha1.physicalnetwork import IsolationMethod, TrafficType
from controllers.api.v1alpha1.virtualrouter import (
    DhcpLease,
    IngressRule,
    LoadBalancer,
    PortForward,
    RouterInterface,
    StaticNatEntry,
    VirtualRouterSpec,
)
from controllers.conditions import Check, first_failure
from controllers.reconcilers.base import InventoryReconciler
from controllers.runtime import Key, Result, deleting, merge_patch, utcnow

IMPLEMENTED = "Implemented"
ROUTER_OWNER = "router"
"""IPAM owner of the router's own address on networks whose gateway is not the router (shared networks)."""
VXLAN_OVERHEAD = 50
DEFAULT_DOMAIN = "cloud.internal"


def network_key(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}"


def nic_networks(vm: t.Any) -> list[str]:
    """Keys of the networks a VirtualMachine has NICs on."""
    return [network_key(nic.network.namespace or vm.metadata.namespace, nic.network.name) for nic in vm.spec.nics]


def nic_owner(vm: t.Any) -> str:
    """IPAM owner of a guest's NIC on a network (one NIC per network and guest)."""
    return f"vm:{vm.metadata.namespace}/{vm.metadata.name}"


def source_nat_name(network: str) -> str:
    return f"{network}-source-nat"


def traffic_rule(rule: t.Any) -> TrafficRule:
    return TrafficRule(protocol=rule.protocol.value, port_start=rule.ports.start if rule.ports else None,
                       port_end=rule.ports.end if rule.ports else None, icmp_type=rule.icmp_type,
                       icmp_code=rule.icmp_code, cidrs=list(rule.cidrs))


def guest_segment(pnet: t.Any, uri: str | None) -> Segment | None:
    label = next((tt.label for tt in pnet.spec.traffic_types if tt.type == TrafficType.GUEST), None)
    if label is None:
        return None
    vswitch = pnet.spec.vswitch.value
    isolation, _ = parse_broadcast_uri(uri)
    mtu = pnet.spec.mtu - (VXLAN_OVERHEAD if isolation == "VXLAN" else 0)
    return Segment(vswitch=vswitch, traffic_label=label, broadcast_uri=uri, bridge=guest_bridge(vswitch, label, uri),
                   mtu=mtu)


def has_router(offering: t.Any) -> bool:
    return offering.spec.guest_ip_type != GuestIpType.L2 and any(
        s.provider == ServiceProvider.VIRTUAL_ROUTER for s in offering.spec.services)


def offers(offering: t.Any, service: NetworkService) -> bool:
    return any(s.name == service for s in offering.spec.services)


def choose_router_host(candidates: list[str], load: dict[str, int], current: str | None) -> str | None:
    """Keep the router where it is while that host can run it; else the least loaded usable host (by name
    on a tie, so two controllers would agree)."""
    if current in candidates:
        return current
    return min(candidates, key=lambda host: (load.get(host, 0), host), default=None)


class NetworkReconciler(InventoryReconciler):
    kind = kinds.NETWORKS

    def setup(self) -> None:
        super().setup()
        self.addresses: dict[str, ipam.AddressPool] = {}
        self.vnets: dict[str, ipam.Pool] = {}
        self.index("virtualmachines", "nic-network", nic_networks)
        self.index("networks", ".spec.zone", lambda n: [n.spec.zone])
        self.index("networks", ".spec.networkOffering", lambda n: [n.spec.network_offering])
        self.index("networks", "router-host", lambda n: [n.status.router.host] if n.status.router and
                   n.status.router.host else [])
        self.index("publicipaddresses", "network", lambda ip: [network_key(ip.metadata.namespace, ip.spec.network)])
        self.index("firewallrules", "public-ip", lambda r: [network_key(r.metadata.namespace, r.spec.public_ip_address)]
                   if r.spec.public_ip_address else [])
        self.index("firewallrules", "network", lambda r: [network_key(r.metadata.namespace, r.spec.network)]
                   if r.spec.network else [])
        for plural in ("portforwardingrules", "loadbalancerrules"):
            self.index(plural, "public-ip", lambda r: [network_key(r.metadata.namespace, r.spec.public_ip_address)])
        self.index("virtualrouters", ".spec.host", lambda r: [r.spec.host])
        self.index("physicalnetworks", ".spec.zone", lambda p: [p.spec.zone])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])

    # -- rebuilt state ---------------------------------------------------------------------------

    def primed(self) -> None:
        """Rebuild IPAM and the VLAN/VNI pools from what the objects record."""
        for network in self.store.list("networks"):
            pool = self.address_pool(network)
            if pool is not None and network.status.router and network.status.router.guest_ip and \
                    network.status.router.guest_ip != network.status.gateway:
                pool.record_address(ROUTER_OWNER, network.status.router.guest_ip)
            _, vnet = parse_broadcast_uri(network.status.broadcast_uri)
            pnet = self.store.get("physicalnetworks", network.status.physical_network)
            if vnet is not None and pnet is not None and network.spec.vlan is None:
                self._vnet_pool(pnet).record(self._key(network), vnet)
        for vm in self.store.list("virtualmachines"):
            for nic in vm.status.nics:
                network = self._network_by_key(nic.network)
                pool = self.address_pool(network) if network is not None else None
                if pool is not None and nic.ip_address:
                    pool.record_address(nic_owner(vm), nic.ip_address)

    def _key(self, network: t.Any) -> str:
        return network_key(network.metadata.namespace, network.metadata.name)

    def _network_by_key(self, key: str) -> t.Any:
        namespace, _, name = key.partition("/")
        return self.store.get("networks", name, namespace)

    def subnet(self, network: t.Any) -> ipam.Subnet | None:
        """The network's addressing, from its spec, else what it was given, else the zone's guest CIDR."""
        offering = self.store.get("networkofferings", network.spec.network_offering)
        if offering is None or offering.spec.guest_ip_type == GuestIpType.L2:
            return None
        cidr = network.spec.cidr or network.status.cidr
        if cidr is None:
            zone = self.store.get("zones", network.spec.zone)
            if zone is None or offering.spec.guest_ip_type != GuestIpType.ISOLATED:
                return None
            cidr = zone.spec.guest_cidr
        gateway = network.spec.gateway or network.status.gateway or ipam.first_host(cidr)
        return ipam.Subnet(cidr, gateway, network.spec.start_ip, network.spec.end_ip)

    def address_pool(self, network: t.Any) -> ipam.AddressPool | None:
        """IPAM of a network (None: it has no addressing, an L2 network or one with bad references)."""
        key = self._key(network)
        subnet = self.subnet(network)
        pool = self.addresses.get(key)
        if subnet is None:
            return pool
        if pool is None or pool.subnet != subnet:
            previous = pool.owners() if pool else {}
            pool = self.addresses[key] = subnet.pool()
            for owner, value in previous.items():
                pool.record(owner, value)
        return pool

    def _vnet_pool(self, pnet: t.Any) -> ipam.Pool:
        ranges = [(r.start, r.end) for r in pnet.spec.vnet_ranges]
        pool = self.vnets.get(pnet.metadata.name)
        if pool is None or pool.ranges != sorted(ranges):
            previous = pool.owners() if pool else {}
            pool = self.vnets[pnet.metadata.name] = ipam.Pool(ranges)
            for owner, value in previous.items():
                pool.record(owner, value)
        return pool

    def forget(self, key: Key) -> None:
        owner = network_key(key[1], key[2])
        self.addresses.pop(owner, None)
        for pool in self.vnets.values():
            pool.release(owner)

    # -- watches ---------------------------------------------------------------------------------

    def _networks(self, index: str, value: str | None) -> list[Key]:
        return [self.key(n.metadata.name, n.metadata.namespace) for n in self.store.by("networks", index, value)]

    def _by_key(self, key: str) -> list[Key]:
        namespace, _, name = key.partition("/")
        return [self.key(name, namespace)]

    def _of_public_ip(self, namespace: str, name: str | None) -> list[Key]:
        ip = self.store.get("publicipaddresses", name, namespace) if name else None
        return [self.key(ip.spec.network, namespace)] if ip is not None else []

    def watch_map(self):
        def rule(r):
            keys = self._of_public_ip(r.metadata.namespace, r.spec.public_ip_address)
            network = getattr(r.spec, "network", None)
            return keys + ([self.key(network, r.metadata.namespace)] if network else [])

        return {
            "virtualmachines": lambda vm: [k for key in nic_networks(vm) for k in self._by_key(key)],
            "publicipaddresses": lambda ip: [self.key(ip.spec.network, ip.metadata.namespace)],
            "firewallrules": rule, "portforwardingrules": rule, "loadbalancerrules": rule,
            "virtualrouters": lambda r: [self.key(r.spec.network, r.metadata.namespace)],
            "hosts": lambda host: [k for zone in [host.status.zone] if zone for k in self._networks(".spec.zone", zone)],
            "zones": lambda zone: self._networks(".spec.zone", zone.metadata.name),
            "networkofferings": lambda o: self._networks(".spec.networkOffering", o.metadata.name),
            "physicalnetworks": lambda p: self._networks(".spec.zone", p.spec.zone),
        }

    # -- derive ----------------------------------------------------------------------------------

    def users(self, network: t.Any) -> list[t.Any]:
        return self.store.by("virtualmachines", "nic-network", self._key(network))

    def blocked_by(self, network: t.Any) -> list[str]:
        names = [f"VirtualMachine {vm.metadata.namespace}/{vm.metadata.name}" for vm in self.users(network)]
        names += [f"PublicIPAddress {network.metadata.namespace}/{ip.metadata.name}"
                  for ip in self.store.by("publicipaddresses", "network", self._key(network)) if not ip.spec.source_nat]
        return names

    def _needed(self, network: t.Any) -> bool:
        """A guest on the network is placed or running: the network must be implemented."""
        return any((vm.status.placement and vm.status.placement.host) or
                   (vm.status.node and vm.status.node.domain_state not in (None, "", "shutoff", "gone"))
                   for vm in self.users(network))

    def _physical_network(self, network: t.Any) -> tuple[t.Any, Check]:
        name = network.spec.physical_network or network.status.physical_network
        if name:
            pnet = self.store.get("physicalnetworks", name)
            if pnet is None:
                return None, Check.failed("PhysicalNetworkNotFound", f"PhysicalNetwork {name} does not exist")
        else:
            candidates = sorted((p for p in self.store.by("physicalnetworks", ".spec.zone", network.spec.zone)
                                 if any(tt.type == TrafficType.GUEST for tt in p.spec.traffic_types)),
                                key=lambda p: p.metadata.name)
            if not candidates:
                return None, Check.failed("NoGuestPhysicalNetwork", f"zone {network.spec.zone} has no PhysicalNetwork "
                                                                   "carrying Guest traffic")
            pnet = candidates[0]
        if pnet.spec.zone != network.spec.zone:
            return None, Check.failed("PhysicalNetworkInOtherZone",
                                      f"PhysicalNetwork {pnet.metadata.name} is in zone {pnet.spec.zone}")
        return pnet, Check.passed()

    def _router_hosts(self, zone: str, labels: list[str]) -> list[str]:
        hosts = []
        for host in self.store.by("hosts", ".status.zone", zone):
            status = host.status
            bridges = status.node.bridges if status.node else {}
            if status.state == HostState.UP and status.effective_allocation_state == AllocationState.ENABLED and \
                    all(bridges.get(label) for label in labels):
                hosts.append(host.metadata.name)
        return hosts

    def _keeps_router(self, name: str) -> bool:
        """A router stays on its host until the host is declared Alert or Down (or goes): a host merely
        Disconnected from the control plane may still be forwarding, and two routers with one address and MAC
        on a segment would be worse than a pause in reconfiguration."""
        host = self.store.get("hosts", name)
        return host is not None and host.status.state not in (HostState.ALERT, HostState.DOWN)

    def derive(self, network: Network, ctx: inventory.Context) -> NetworkStatus:
        previous = network.status
        status = previous.model_copy(deep=True)
        status.observed_generation = network.metadata.generation
        offering = self.store.get("networkofferings", network.spec.network_offering)
        zone = self.store.get("zones", network.spec.zone)
        pnet, pnet_ok = self._physical_network(network)
        references = first_failure(
            Check.passed() if zone else Check.failed("ZoneNotFound", f"Zone {network.spec.zone} does not exist"),
            Check.passed() if offering else Check.failed("NetworkOfferingNotFound",
                                                         f"NetworkOffering {network.spec.network_offering} does not "
                                                         "exist"),
            pnet_ok)
        checks: dict[str, Check | None] = {}
        if not references.ok:
            status.phase = NetworkPhase.ALLOCATED.value if not previous.phase else previous.phase
            status.conditions = inventory.conditions(previous.conditions, network.metadata.generation, ctx,
                                                      references, **{IMPLEMENTED: None})
            return status
        status.guest_ip_type = offering.spec.guest_ip_type.value
        status.physical_network = pnet.metadata.name
        subnet = self.subnet(network)
        addressing = Check.passed()
        if subnet is None and offering.spec.guest_ip_type == GuestIpType.SHARED:
            addressing = Check.failed("CidrRequired", "a Shared network needs cidr and gateway")
        status.cidr, status.gateway = (subnet.cidr, subnet.gateway) if subnet else (None, None)
        pool = self.address_pool(network)
        needed = self._needed(network) and not ctx.deleting and addressing.ok
        if needed:
            implemented = self._implement(network, status, offering, pnet, pool)
        else:
            self._shut_down(network, status, pnet, pool)
            implemented = Check.failed("NotNeeded", "no guest on the network is starting or running")
        if needed and implemented.ok:
            phase = NetworkPhase.IMPLEMENTED
        elif needed:
            phase = NetworkPhase.IMPLEMENTING
        elif previous.phase in (NetworkPhase.IMPLEMENTED, NetworkPhase.IMPLEMENTING, NetworkPhase.SHUTDOWN):
            phase = NetworkPhase.SHUTDOWN
        else:
            phase = NetworkPhase.ALLOCATED
        if ctx.deleting:
            phase = NetworkPhase.DESTROYED
        status.phase = phase.value
        status.ips_total = pool.size if pool else None
        status.ips_allocated = pool.used if pool else None
        checks[IMPLEMENTED] = implemented
        # A network is Ready when it can take guests: addressed and its references whole; implementation
        # follows the guests.
        ready = first_failure(addressing, implemented if needed else Check.passed("Ready", f"network is {phase.value}"))
        status.conditions = inventory.conditions(previous.conditions, network.metadata.generation, ctx, ready, **checks)
        return status

    def _implement(self, network, status, offering, pnet, pool) -> Check:
        isolation = pnet.spec.isolation_method.value
        vnet: int | None = network.spec.vlan
        if vnet is None and offering.spec.guest_ip_type != GuestIpType.SHARED:
            try:
                vnet = self._vnet_pool(pnet).allocate(self._key(network))
            except ipam.AllocationError:
                status.broadcast_uri = None
                return Check.failed("InsufficientVnetCapacity",
                                    f"PhysicalNetwork {pnet.metadata.name} has no free "
                                    f"{'VNI' if isolation == IsolationMethod.VXLAN else 'VLAN ID'}")
        status.broadcast_uri = broadcast_uri(isolation, vnet)
        segment = guest_segment(pnet, status.broadcast_uri)
        if segment is None:
            return Check.failed("NoGuestTrafficLabel", f"PhysicalNetwork {pnet.metadata.name} carries no Guest traffic")
        if not has_router(offering):
            status.router = None
            return Check.passed(IMPLEMENTED, f"implemented on {status.broadcast_uri or 'the untagged guest network'}")
        labels = [segment.traffic_label]
        if offers(offering, NetworkService.SOURCE_NAT):
            public_label = next((tt.label for tt in pnet.spec.traffic_types if tt.type == TrafficType.PUBLIC), None)
            if public_label is None:
                return Check.failed("NoPublicTrafficLabel", f"PhysicalNetwork {pnet.metadata.name} carries no Public "
                                                            "traffic, which source NAT needs")
            labels.append(public_label)
            source_nat = self.store.get("publicipaddresses", source_nat_name(network.metadata.name),
                                        network.metadata.namespace)
            status.source_nat_ip = source_nat.status.ip_address if source_nat else None
            if not status.source_nat_ip:
                return Check.failed("AcquiringSourceNatIp", "waiting for the source NAT public address")
        guest_ip = status.gateway
        if offering.spec.guest_ip_type == GuestIpType.SHARED and pool is not None:
            try:
                guest_ip = pool.allocate_address(ROUTER_OWNER)
            except ipam.AllocationError as error:
                return Check.failed("InsufficientAddressCapacity", f"no address for the router: {error.message}")
        current = status.router.host if status.router else None
        load = {host: len(self.store.by("virtualrouters", ".spec.host", host)) for host in
                self._router_hosts(network.spec.zone, labels)}
        if current is not None and self._keeps_router(current):
            load.setdefault(current, 0)
        host = choose_router_host(sorted(load), load, current)
        if host is None:
            status.router = RouterInfo(guest_ip=guest_ip, public_ip=status.source_nat_ip, state="Pending")
            return Check.failed("NoRouterHost", f"no Up host in zone {network.spec.zone} has the bridges "
                                                f"{', '.join(labels)} for the virtual router")
        router = self.store.get("virtualrouters", network.metadata.name, network.metadata.namespace)
        node = router.status.node if router is not None else None
        running = router is not None and router.spec.host == host and node is not None and node.host == host and \
            node.state == "Running" and node.applied_generation == router.metadata.generation
        status.router = RouterInfo(host=host, namespace=node.namespace if node else None, guest_ip=guest_ip,
                                   public_ip=status.source_nat_ip,
                                   state="Running" if running else (node.state if node and node.state == "Error"
                                                                    else "Starting"))
        if not running:
            if node is not None and node.state == "Error" and node.host == host:
                return Check.failed("RouterError", f"the virtual router on {host} failed: {node.message}")
            return Check.failed("StartingRouter", f"the virtual router is starting on host {host}")
        return Check.passed(IMPLEMENTED, f"implemented on {status.broadcast_uri or 'the untagged guest network'}; "
                                         f"virtual router on {host}")

    def _shut_down(self, network, status, pnet, pool) -> None:
        if network.spec.vlan is None and pnet is not None:
            self._vnet_pool(pnet).release(self._key(network))
        if pool is not None and status.router and status.router.guest_ip != status.gateway:
            pool.release(ROUTER_OWNER)
        status.broadcast_uri = None
        status.router = None

    # -- the router's configuration --------------------------------------------------------------

    def router_spec(self, network: Network, status: NetworkStatus) -> VirtualRouterSpec | None:
        offering = self.store.get("networkofferings", network.spec.network_offering)
        pnet = self.store.get("physicalnetworks", status.physical_network)
        zone = self.store.get("zones", network.spec.zone)
        if status.router is None or status.router.host is None or offering is None or pnet is None:
            return None
        segment = guest_segment(pnet, status.broadcast_uri)
        prefix = ipaddress.IPv4Network(status.cidr).prefixlen
        namespace, key = network.metadata.namespace, self._key(network)
        isolated = offering.spec.guest_ip_type == GuestIpType.ISOLATED
        leases, addresses = [], {}  # addresses: guest name → its address on this network
        for vm in sorted(self.users(network), key=lambda v: (v.metadata.namespace, v.metadata.name)):
            nic = next((n for n in vm.status.nics if n.network == key), None)
            if nic is None or not nic.ip_address:
                continue
            addresses[(vm.metadata.namespace, vm.metadata.name)] = nic.ip_address
            default = next((n for n in vm.spec.nics if n.default), vm.spec.nics[0] if vm.spec.nics else None)
            is_default = default is not None and network_key(default.network.namespace or vm.metadata.namespace,
                                                             default.network.name) == key
            leases.append(DhcpLease(mac_address=nic.mac_address, ip_address=nic.ip_address,
                                    hostname=vm.spec.hostname or vm.metadata.name, default=is_default))
        spec = VirtualRouterSpec(
            network=network.metadata.name, network_uid=network.metadata.uid or "", host=status.router.host,
            guest=RouterInterface(segment=segment, mac_address=ipam.mac_address(f"{network.metadata.uid}/router"),
                                  addresses=[f"{status.router.guest_ip}/{prefix}"]),
            gateway=status.gateway, dhcp=offers(offering, NetworkService.DHCP),
            dns=offers(offering, NetworkService.DNS),
            domain=network.spec.network_domain or (zone.spec.network_domain if zone else None) or DEFAULT_DOMAIN,
            dns_servers=[s for s in ((zone.spec.internal_dns1 or zone.spec.dns1, zone.spec.dns2) if zone else ())
                         if s],
            leases=leases,
            egress_default_allow=offering.spec.egress_default_policy.value == "Allow",
        )
        if not isolated or not status.source_nat_ip:
            return spec
        public_label = next(tt.label for tt in pnet.spec.traffic_types if tt.type == TrafficType.PUBLIC)
        ips = [ip for ip in self.store.by("publicipaddresses", "network", key) if ip.status.ip_address]
        public_ranges = {r.cidr: r for r in pnet.spec.public_ip_ranges}

        def range_of(address: str):
            return next((r for cidr, r in public_ranges.items()
                         if ipaddress.IPv4Address(address) in ipaddress.IPv4Network(cidr)), None)

        snat_range = range_of(status.source_nat_ip)
        vlan = snat_range.vlan if snat_range else None
        public_uri = broadcast_uri("VLAN", vlan)
        public_segment = Segment(vswitch=pnet.spec.vswitch.value, traffic_label=public_label, broadcast_uri=public_uri,
                                 bridge=guest_bridge(pnet.spec.vswitch.value, public_label, public_uri),
                                 mtu=pnet.spec.mtu)
        public_addresses = [f"{status.source_nat_ip}/{ipaddress.IPv4Network(snat_range.cidr).prefixlen}"
                            if snat_range else f"{status.source_nat_ip}/32"]
        for ip in sorted(ips, key=lambda i: i.status.ip_address):
            if ip.status.ip_address != status.source_nat_ip:
                r = range_of(ip.status.ip_address)
                public_addresses.append(f"{ip.status.ip_address}/{ipaddress.IPv4Network(r.cidr).prefixlen if r else 32}")
        spec.public = RouterInterface(segment=public_segment,
                                      mac_address=ipam.mac_address(f"{network.metadata.uid}/router-public"),
                                      addresses=public_addresses)
        spec.public_gateway = snat_range.gateway if snat_range else None
        spec.source_nat_ip = status.source_nat_ip
        by_name = {ip.metadata.name: ip.status.ip_address for ip in ips}
        for ip in ips:
            if ip.spec.static_nat and not ip.spec.source_nat:
                target = ip.spec.static_nat.vm_ip_address or addresses.get((namespace,
                                                                            ip.spec.static_nat.virtual_machine.name))
                if target:
                    spec.static_nats.append(StaticNatEntry(public_ip=ip.status.ip_address, private_ip=target))
        for ip_name, address in sorted(by_name.items()):
            ip_key = network_key(namespace, ip_name)
            for rule in sorted(self.store.by("firewallrules", "public-ip", ip_key), key=lambda r: r.metadata.name):
                if rule.spec.direction == Direction.INGRESS:
                    spec.firewall.append(IngressRule(public_ip=address, **traffic_rule(rule.spec).model_dump()))
            for rule in sorted(self.store.by("portforwardingrules", "public-ip", ip_key), key=lambda r: r.metadata.name):
                target = rule.spec.vm_ip_address or addresses.get((namespace, rule.spec.virtual_machine.name))
                if target:
                    spec.port_forwards.append(PortForward(
                        name=rule.metadata.name, public_ip=address, protocol=rule.spec.protocol.value,
                        public_port_start=rule.spec.public_ports.start, public_port_end=rule.spec.public_ports.end,
                        private_ip=target, private_port_start=rule.spec.private_ports.start,
                        source_cidrs=list(rule.spec.source_cidrs)))
            for rule in sorted(self.store.by("loadbalancerrules", "public-ip", ip_key), key=lambda r: r.metadata.name):
                members = [addresses[(namespace, m.name)] for m in rule.spec.members if (namespace, m.name) in addresses]
                spec.load_balancers.append(LoadBalancer(
                    name=rule.metadata.name, public_ip=address, protocol=rule.spec.protocol.value,
                    public_port=rule.spec.public_port, private_port=rule.spec.private_port,
                    algorithm=rule.spec.algorithm.value, members=members, source_cidrs=list(rule.spec.source_cidrs)))
        for rule in sorted(self.store.by("firewallrules", "network", key), key=lambda r: r.metadata.name):
            if rule.spec.direction == Direction.EGRESS:
                spec.egress.append(traffic_rule(rule.spec))
        return spec

    # -- actions ---------------------------------------------------------------------------------

    async def act(self, network: Network, status: NetworkStatus) -> None:
        api = self.runtime.api
        name, namespace = network.metadata.name, network.metadata.namespace
        offering = self.store.get("networkofferings", network.spec.network_offering)
        if offering is not None and offering.spec.guest_ip_type == GuestIpType.ISOLATED and \
                offers(offering, NetworkService.SOURCE_NAT) and \
                self.store.get("publicipaddresses", source_nat_name(name), namespace) is None:
            await api.create(kinds.PUBLICIPADDRESSES, {
                "apiVersion": API_VERSION, "kind": "PublicIPAddress",
                "metadata": {"name": source_nat_name(name), "namespace": namespace,
                             "ownerReferences": [self._owner(network)]},
                "spec": {"zone": network.spec.zone, "network": name, "sourceNat": True},
            })
        await self._sync_router(network, status)

    def _owner(self, network: Network) -> dict:
        return {"apiVersion": API_VERSION, "kind": "Network", "name": network.metadata.name,
                "uid": network.metadata.uid, "controller": True, "blockOwnerDeletion": True}

    async def _sync_router(self, network: Network, status: NetworkStatus) -> None:
        api = self.runtime.api
        name, namespace = network.metadata.name, network.metadata.namespace
        router = self.store.get("virtualrouters", name, namespace)
        spec = self.router_spec(network, status) if status.phase in (NetworkPhase.IMPLEMENTING,
                                                                     NetworkPhase.IMPLEMENTED) else None
        if spec is None:
            if router is not None and router.metadata.deletion_timestamp is None:
                await api.delete(kinds.VIRTUALROUTERS, name, namespace)
            return
        wanted = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
        if router is None:
            await api.create(kinds.VIRTUALROUTERS, {
                "apiVersion": API_VERSION, "kind": "VirtualRouter",
                "metadata": {"name": name, "namespace": namespace, "labels": {HOST_LABEL: spec.host},
                             "ownerReferences": [self._owner(network)]},
                "spec": wanted,
            })
            return
        patch = merge_patch(router.spec.model_dump(by_alias=True, mode="json", exclude_none=True), wanted)
        if patch is not None or router.metadata.labels.get(HOST_LABEL) != spec.host:
            await api.patch(kinds.VIRTUALROUTERS, name, namespace,
                            {"metadata": {"labels": {HOST_LABEL: spec.host}}, "spec": patch or {}})

    async def finalize(self, network: Network) -> bool:
        api = self.runtime.api
        name, namespace = network.metadata.name, network.metadata.namespace
        if self.store.get("virtualrouters", name, namespace) is not None:
            await api.delete(kinds.VIRTUALROUTERS, name, namespace)
            return False
        source_nat = self.store.get("publicipaddresses", source_nat_name(name), namespace)
        if source_nat is not None:
            if source_nat.metadata.deletion_timestamp is None:
                await api.delete(kinds.PUBLICIPADDRESSES, source_nat.metadata.name, namespace)
            return False
        self.forget(self.key(name, namespace))
        return True


class VirtualRouterReconciler(InventoryReconciler):
    """Ready and phase of a VirtualRouter from what its agent reports. The Network reconciler owns the object
    (spec, lifecycle); no finalizer here: the agent tears the router down when the object goes."""

    kind = kinds.VIRTUALROUTERS
    agent_status_keys = ("node",)

    async def reconcile(self, router: t.Any) -> Result:
        status = self.derive(router, inventory.Context(now=utcnow(), deleting=deleting(router)))
        await self.write_status(router, status)
        return Result()

    def derive(self, router: VirtualRouter, ctx: inventory.Context) -> t.Any:
        node = router.status.node
        spec = router.spec
        if node is None or node.host != spec.host:
            ready, phase = Check.failed("Starting", f"waiting for the agent of {spec.host}"), "Starting"
        elif node.state == "Error":
            ready, phase = Check.failed("RouterError", node.message or "the agent reports an error"), "Error"
        elif node.applied_generation != router.metadata.generation:
            ready, phase = Check.failed("Applying", f"the agent of {spec.host} is applying the configuration"), \
                "Starting"
        else:
            ready, phase = Check.passed("Running", f"running in {node.namespace} on {spec.host}"), "Running"
        status = router.status.model_copy(deep=True)
        status.observed_generation = router.metadata.generation
        status.phase = phase
        status.conditions = inventory.conditions(router.status.conditions, router.metadata.generation, ctx, ready)
        return status
