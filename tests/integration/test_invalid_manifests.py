"""Bad manifests are refused at ``kubectl apply`` time by the real apiserver, each with its own message.

Every row starts from a valid base manifest of its kind (``test_base_manifests_are_valid`` proves
they are accepted) and changes one thing, so a rejection can only come from that change. Rows
about immutable fields, shrinking and transition rules first apply a valid ``setup`` object and
then the changed one under the same name.
"""

from __future__ import annotations

import copy
import dataclasses
import typing as t
import uuid

import pytest
import yaml

from cumulo import envtest

SUFFIX = uuid.uuid4().hex[:6]
NAMESPACE = f"invalid-manifests-{SUFFIX}"
API_VERSION = "cumulo.io/v1alpha1"
NAMESPACED_KINDS = {
    "AffinityGroup", "FirewallRule", "LoadBalancerRule", "Network", "PortForwardingRule", "PublicIPAddress",
    "Quota", "SecurityGroup", "Snapshot", "Template", "VirtualMachine", "Volume",
}
DROP = object()
"""A value in ``changes`` that removes the key."""


# --------------------------------------------------------------------------------------------
# Valid base specs, one per kind; each row changes one thing
# --------------------------------------------------------------------------------------------

PUBLIC_RANGE = {"cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "startIp": "203.0.113.10",
                "endIp": "203.0.113.20"}
TCP22 = {"protocol": "TCP", "ports": {"start": 22, "end": 22}, "cidrs": ["0.0.0.0/0"]}

BASES: dict[str, dict[str, t.Any]] = {
    "Zone": {"networkType": "Advanced", "dns1": "192.0.2.53"},
    "HostPod": {"zone": "zone1", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1", "startIp": "10.0.0.10",
                "endIp": "10.0.0.20"},
    "Cluster": {"pod": "pod1", "hypervisorType": "KVM"},
    "StoragePool": {"zone": "zone1", "scope": "Host", "type": "Filesystem", "host": "host1",
                    "path": "/var/lib/cumulo/pools/p"},
    "PhysicalNetwork": {"zone": "zone1", "isolationMethod": "VLAN", "vnetRanges": [{"start": 100, "end": 199}],
                        "trafficTypes": [{"type": "Guest", "label": "cloudbr0"},
                                         {"type": "Public", "label": "cloudbr1"}],
                        "publicIpRanges": [PUBLIC_RANGE]},
    "ServiceOffering": {"cpuNumber": 1, "memoryMiB": 128},
    "DiskOffering": {"diskSizeGiB": 5},
    "NetworkOffering": {"guestIpType": "Isolated", "services": [{"name": "Dhcp"}, {"name": "SourceNat"}]},
    "Template": {"url": "file:///var/lib/cumulo/seed/tiny-guest.qcow2"},
    "Network": {"networkOffering": "shared", "zone": "zone1", "cidr": "10.2.0.0/24", "gateway": "10.2.0.1",
                "startIp": "10.2.0.10", "endIp": "10.2.0.100"},
    "VirtualMachine": {"serviceOffering": "small", "template": {"name": "tiny-guest"}, "zone": "zone1",
                       "nics": [{"network": {"name": "net1"}}]},
    "Volume": {"zone": "zone1", "sizeGiB": 10},
    "PortForwardingRule": {"publicIpAddress": "ip1", "publicPorts": {"start": 8080, "end": 8081},
                           "privatePorts": {"start": 80, "end": 81}, "virtualMachine": {"name": "vm1"}},
    "FirewallRule": {"direction": "Ingress", "publicIpAddress": "ip1", **TCP22},
    "SecurityGroup": {"ingress": [TCP22]},
    "LoadBalancerRule": {"publicIpAddress": "ip1", "publicPort": 80, "privatePort": 8080,
                         "members": [{"name": "vm1"}]},
    "Quota": {"limits": {"virtualMachines": 10}},
    "AffinityGroup": {"type": "HostAntiAffinity"},
}


def manifest(kind: str, name: str, spec: dict[str, t.Any]) -> dict[str, t.Any]:
    metadata = {"name": name}
    if kind in NAMESPACED_KINDS:
        metadata["namespace"] = NAMESPACE
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def spec(kind: str, **changes: t.Any) -> dict[str, t.Any]:
    """The base spec of ``kind`` with top-level ``changes`` (``DROP`` removes a key)."""
    result = copy.deepcopy(BASES[kind])
    for key, value in changes.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    kind: str
    spec: dict[str, t.Any]
    expect: tuple[str, ...]
    """Substrings that must all be in kubectl's stderr."""
    setup: dict[str, t.Any] | None = None
    """A valid spec applied first under the same name (for immutability and transition rules)."""
    name: str | None = None
    """Object name, when the row is about the name itself."""

    @property
    def object_name(self) -> str:
        return self.name or f"{self.id}-{SUFFIX}"


def case(id: str, kind: str, spec: dict[str, t.Any], *expect: str, setup: dict[str, t.Any] | None = None,
         name: str | None = None, marks: t.Any = ()) -> t.Any:
    return pytest.param(Case(id, kind, spec, expect, setup, name), id=id, marks=marks)


def services(*names: str, **providers: str) -> list[dict[str, str]]:
    return [{"name": name, "provider": providers.get(name, "VirtualRouter")} for name in names]


def nic(network: str, **extra: t.Any) -> dict[str, t.Any]:
    return {"network": {"name": network}, **extra}


CASES = [
    # --- enums, addresses, CIDRs -----------------------------------------------------------------
    case("zone-enum", "Zone", spec("Zone", networkType="Hybrid"),
         'spec.networkType: Unsupported value: "Hybrid"', '"Basic", "Advanced"'),
    case("zone-dns-not-ip", "Zone", spec("Zone", dns1="dns.example.com"),
         "spec.dns1", "must be an IPv4 address such as 10.1.1.1"),
    case("zone-advanced-sg", "Zone", spec("Zone", securityGroupsEnabled=True),
         "spec.securityGroupsEnabled", "security groups are the isolation of basic zones"),
    case("zone-missing-dns1", "Zone", spec("Zone", dns1=DROP), "spec.dns1: Required value"),
    case("zone-unknown-field", "Zone", spec("Zone", foo="bar"), 'unknown field "spec.foo"'),
    case("pod-cidr-host-bits", "HostPod", spec("HostPod", cidr="10.0.0.1/24"),
         "spec.cidr", "must be an IPv4 network in CIDR notation with no host bits set"),
    case("pod-cidr-not-cidr", "HostPod", spec("HostPod", cidr="10.0.0.300/24"),
         "spec.cidr", "must be an IPv4 network in CIDR notation"),
    case("pod-gateway-outside", "HostPod", spec("HostPod", gateway="10.9.9.1"),
         "spec.gateway", "gateway must be inside cidr"),
    case("pod-start-after-end", "HostPod", spec("HostPod", startIp="10.0.0.30"),
         "spec.startIp", "startIp must not be after endIp"),
    case("pod-enum-allocation", "HostPod", spec("HostPod", allocationState="Off"),
         'spec.allocationState: Unsupported value: "Off"'),
    # --- physical networks -----------------------------------------------------------------------
    case("pnet-public-start-after-end", "PhysicalNetwork",
         spec("PhysicalNetwork", publicIpRanges=[{**PUBLIC_RANGE, "startIp": "203.0.113.50"}]),
         "spec.publicIpRanges[0].startIp", "startIp must not be after endIp"),
    case("pnet-public-gateway-outside", "PhysicalNetwork",
         spec("PhysicalNetwork", publicIpRanges=[{**PUBLIC_RANGE, "gateway": "198.51.100.1"}]),
         "spec.publicIpRanges[0].gateway", "gateway must be inside cidr"),
    case("pnet-vnet-start-after-end", "PhysicalNetwork",
         spec("PhysicalNetwork", vnetRanges=[{"start": 300, "end": 200}]),
         "spec.vnetRanges[0]", "start must not exceed end"),
    case("pnet-vlan-above-4094", "PhysicalNetwork",
         spec("PhysicalNetwork", vnetRanges=[{"start": 4000, "end": 5000}]),
         "spec.vnetRanges", "VLAN IDs go from 1 to 4094"),
    case("pnet-vnet-overlap", "PhysicalNetwork",
         spec("PhysicalNetwork", vnetRanges=[{"start": 100, "end": 199}, {"start": 150, "end": 250}]),
         "spec.vnetRanges", "vnetRanges must not overlap"),
    case("pnet-duplicate-traffic", "PhysicalNetwork",
         spec("PhysicalNetwork", trafficTypes=[{"type": "Guest", "label": "cloudbr0"},
                                               {"type": "Public", "label": "cloudbr1"},
                                               {"type": "Guest", "label": "cloudbr2"}]),
         "spec.trafficTypes", "each traffic type appears once"),
    case("pnet-public-without-public-traffic", "PhysicalNetwork",
         spec("PhysicalNetwork", trafficTypes=[{"type": "Guest", "label": "cloudbr0"}]),
         "spec.publicIpRanges", "publicIpRanges need the Public traffic type"),
    case("pnet-bad-label", "PhysicalNetwork",
         spec("PhysicalNetwork", trafficTypes=[{"type": "Guest", "label": "a-bridge-name-too-long"},
                                               {"type": "Public", "label": "cloudbr1"}]),
         "spec.trafficTypes[0].label", "may not be more than 15"),
    # --- offerings -------------------------------------------------------------------------------
    case("serviceoffering-memory-too-small", "ServiceOffering", spec("ServiceOffering", memoryMiB=16),
         "spec.memoryMiB", "should be greater than or equal to 32"),
    case("serviceoffering-zero-cpus", "ServiceOffering", spec("ServiceOffering", cpuNumber=0),
         "spec.cpuNumber", "should be greater than or equal to 1"),
    case("serviceoffering-storage-enum", "ServiceOffering", spec("ServiceOffering", storageType="Local"),
         'spec.storageType: Unsupported value: "Local"', '"local", "shared"'),
    case("diskoffering-zero-size", "DiskOffering", spec("DiskOffering", diskSizeGiB=0),
         "spec.diskSizeGiB", "should be greater than or equal to 1"),
    case("diskoffering-customized-with-size", "DiskOffering", spec("DiskOffering", customized=True),
         "spec.diskSizeGiB", "a customized offering takes its size from each volume; leave diskSizeGiB unset"),
    case("diskoffering-fixed-without-size", "DiskOffering", spec("DiskOffering", diskSizeGiB=DROP),
         "spec.diskSizeGiB", "a fixed-size offering needs diskSizeGiB"),
    case("diskoffering-min-above-max", "DiskOffering",
         spec("DiskOffering", diskSizeGiB=DROP, customized=True, minSizeGiB=10, maxSizeGiB=5),
         "spec.minSizeGiB", "minSizeGiB must not exceed maxSizeGiB"),
    case("networkoffering-l2-with-services", "NetworkOffering",
         spec("NetworkOffering", guestIpType="L2", services=services("Dhcp")),
         "spec.services", "an L2 network offers no services"),
    case("networkoffering-sourcenat-on-shared", "NetworkOffering",
         spec("NetworkOffering", guestIpType="Shared", services=services("Dhcp", "SourceNat")),
         "spec.services", "SourceNat is only for Isolated networks"),
    case("networkoffering-staticnat-on-shared", "NetworkOffering",
         spec("NetworkOffering", guestIpType="Shared", services=services("Dhcp", "StaticNat")),
         "spec.services", "StaticNat, PortForwarding and Lb use public IPs"),
    case("networkoffering-duplicate-services", "NetworkOffering",
         spec("NetworkOffering", services=services("Dhcp", "Dns", "Dhcp")),
         "spec.services", "each service appears once"),
    case("networkoffering-securitygroup-wrong-provider", "NetworkOffering",
         spec("NetworkOffering", guestIpType="Shared", services=services("Dhcp", "SecurityGroup")),
         "spec.services[1].provider",
         "SecurityGroup is provided by SecurityGroupProvider, every other service by VirtualRouter"),
    case("networkoffering-securitygroup-on-isolated", "NetworkOffering",
         spec("NetworkOffering", services=services("Dhcp", "SecurityGroup",
                                                   SecurityGroup="SecurityGroupProvider")),
         "spec.services", "SecurityGroup is only for Shared networks"),
    # --- storage ---------------------------------------------------------------------------------
    case("storagepool-filesystem-zone-scope", "StoragePool", spec("StoragePool", scope="Zone", host=DROP),
         "spec.scope", "a Filesystem pool is local: its scope is Host"),
    case("storagepool-rbd-without-rbd", "StoragePool",
         spec("StoragePool", type="RBD", scope="Zone", host=DROP, path=DROP),
         "RBD pools need rbd; Filesystem and SharedMountPoint pools need path"),
    case("storagepool-rbd-host-scope", "StoragePool",
         spec("StoragePool", type="RBD", path=DROP,
              rbd={"monitors": ["192.0.2.10:6789"], "pool": "cumulo",
                   "secretRef": {"name": "ceph", "namespace": "cumulo-system", "key": "key"}}),
         "spec.scope", "an RBD pool is shared: its scope is Cluster or Zone"),
    case("storagepool-host-scope-without-host", "StoragePool", spec("StoragePool", host=DROP),
         "spec.host", "a Host-scoped pool names its host"),
    case("storagepool-relative-path", "StoragePool", spec("StoragePool", path="var/lib/cumulo"),
         "spec.path", "should match '^/'"),
    case("volume-negative-size", "Volume", spec("Volume", sizeGiB=-5),
         "spec.sizeGiB", "should be greater than or equal to 1"),
    case("volume-no-size", "Volume", spec("Volume", sizeGiB=DROP),
         "spec.sizeGiB", "give sizeGiB, a diskOffering with a size, or fromSnapshot"),
    # --- templates -------------------------------------------------------------------------------
    case("template-two-sources", "Template", spec("Template", fromVolume={"name": "root-vm1"}),
         "give exactly one source: url, fromSnapshot or fromVolume"),
    case("template-bad-checksum", "Template", spec("Template", checksum="sha256:ABCDEF"),
         "spec.checksum", "must be <algorithm>:<lowercase hex digest> with algorithm md5, sha1, sha256 or sha512"),
    case("template-bad-url-scheme", "Template", spec("Template", url="ftp://images.example.com/tiny.qcow2"),
         "spec.url", "must be a file:///, http:// or https:// URL"),
    case("template-iso-direct-kernel-boot", "Template",
         spec("Template", format="ISO",
              directKernelBoot={"kernel": {"url": "file:///var/lib/cumulo/seed/tiny-guest.vmlinuz"}}),
         "spec.directKernelBoot", "an ISO cannot use directKernelBoot"),
    # --- guest networks --------------------------------------------------------------------------
    case("network-start-after-end", "Network", spec("Network", startIp="10.2.0.200"),
         "spec.startIp", "startIp must not be after endIp"),
    case("network-gateway-outside", "Network", spec("Network", gateway="10.3.0.1"),
         "spec.gateway", "gateway must be inside cidr"),
    case("network-cidr-too-small", "Network",
         spec("Network", cidr="10.2.0.0/30", gateway="10.2.0.1", startIp="10.2.0.2", endIp="10.2.0.2"),
         "spec.cidr", "cidr must hold at least 8 addresses (/29 or larger)"),
    case("network-gateway-without-cidr", "Network",
         spec("Network", cidr=DROP, startIp=DROP, endIp=DROP),
         "spec.gateway", "give cidr and gateway together"),
    # --- guests ----------------------------------------------------------------------------------
    case("vm-two-default-nics", "VirtualMachine",
         spec("VirtualMachine", nics=[nic("net1", default=True), nic("net2", default=True)]),
         "spec.nics", "at most one NIC is the default"),
    case("vm-two-nics-one-network", "VirtualMachine",
         spec("VirtualMachine", nics=[nic("net1"), nic("net1")]),
         "spec.nics", "a guest has one NIC per network"),
    case("vm-bad-mac", "VirtualMachine",
         spec("VirtualMachine", nics=[nic("net1", macAddress="02:00:0A:01:01:05")]),
         "spec.nics[0].macAddress", "must be a lowercase unicast MAC address such as 02:00:0a:01:01:05"),
    case("vm-multicast-mac", "VirtualMachine",
         spec("VirtualMachine", nics=[nic("net1", macAddress="01:00:5e:00:00:01")]),
         "spec.nics[0].macAddress", "must be a lowercase unicast MAC address"),
    case("vm-bad-reference-name", "VirtualMachine", spec("VirtualMachine", serviceOffering="Small_Offering"),
         "spec.serviceOffering", "should match"),
    case("vm-bad-template-reference", "VirtualMachine", spec("VirtualMachine", template={"name": "Tiny Guest"}),
         "spec.template.name", "should match"),
    case("vm-state-enum", "VirtualMachine", spec("VirtualMachine", state="Paused"),
         'spec.state: Unsupported value: "Paused"', '"Running", "Stopped", "Destroyed"'),
    case("vm-userdata-twice", "VirtualMachine",
         spec("VirtualMachine", userData="#cloud-config\n", userDataSecretRef={"name": "userdata"}),
         "spec.userData", "give userData or userDataSecretRef, not both"),
    case("vm-missing-template", "VirtualMachine", spec("VirtualMachine", template=DROP),
         "spec.template: Required value"),
    # --- rules -----------------------------------------------------------------------------------
    case("pfr-port-out-of-range", "PortForwardingRule",
         spec("PortForwardingRule", publicPorts={"start": 65535, "end": 65536}),
         "spec.publicPorts.end", "should be less than or equal to 65535"),
    case("pfr-port-zero", "PortForwardingRule",
         spec("PortForwardingRule", privatePorts={"start": 0, "end": 1}),
         "spec.privatePorts.start", "should be greater than or equal to 1"),
    case("pfr-ranges-of-different-length", "PortForwardingRule",
         spec("PortForwardingRule", privatePorts={"start": 80, "end": 90}),
         "spec.privatePorts", "publicPorts and privatePorts must be ranges of the same length"),
    case("pfr-protocol-enum", "PortForwardingRule", spec("PortForwardingRule", protocol="ICMP"),
         'spec.protocol: Unsupported value: "ICMP"', '"TCP", "UDP"'),
    case("firewall-ingress-without-public-ip", "FirewallRule", spec("FirewallRule", publicIpAddress=DROP),
         "spec.direction", "an Ingress rule names a publicIpAddress; an Egress rule names a network"),
    case("firewall-egress-with-public-ip", "FirewallRule", spec("FirewallRule", direction="Egress"),
         "spec.direction", "an Ingress rule names a publicIpAddress; an Egress rule names a network"),
    case("firewall-icmp-with-ports", "FirewallRule", spec("FirewallRule", protocol="ICMP"),
         "spec.ports", "ports apply to TCP and UDP only"),
    case("firewall-bad-source-cidr", "FirewallRule", spec("FirewallRule", cidrs=["0.0.0.0/33"]),
         "spec.cidrs[0]", "must be an IPv4 network in CIDR notation"),
    case("securitygroup-ports-reversed", "SecurityGroup",
         spec("SecurityGroup", ingress=[{"protocol": "TCP", "ports": {"start": 80, "end": 22}}]),
         "spec.ingress[0].ports", "start must not exceed end"),
    case("securitygroup-icmp-type-on-tcp", "SecurityGroup",
         spec("SecurityGroup", ingress=[{"protocol": "TCP", "icmpType": 8}]),
         "spec.ingress[0].icmpType", "icmpType and icmpCode apply to ICMP only"),
    case("loadbalancer-duplicate-members", "LoadBalancerRule",
         spec("LoadBalancerRule", members=[{"name": "vm1"}, {"name": "vm1"}]),
         "spec.members", "each member appears once"),
    case("quota-not-default", "Quota", spec("Quota"), "a namespace has one Quota, named default",
         name=f"team-quota-{SUFFIX}"),
    case("quota-negative-limit", "Quota", spec("Quota", limits={"cpus": -1}),
         "spec.limits.cpus", "should be greater than or equal to 0", name="default"),
    # --- immutable fields and transition rules (setup applied first) -----------------------------
    case("zone-networktype-immutable", "Zone",
         spec("Zone", networkType="Basic"), "spec.networkType", "is immutable", setup=spec("Zone")),
    case("hostpod-zone-immutable", "HostPod",
         spec("HostPod", zone="zone2"), "spec.zone", "is immutable", setup=spec("HostPod")),
    case("cluster-hypervisor-immutable", "Cluster",
         spec("Cluster", hypervisorType="Simulator"), "spec.hypervisorType", "is immutable",
         setup=spec("Cluster")),
    case("template-url-immutable", "Template",
         spec("Template", url="https://images.example.com/other.qcow2"), "spec.url", "is immutable",
         setup=spec("Template")),
    case("storagepool-path-immutable", "StoragePool",
         spec("StoragePool", path="/srv/pools/p"), "spec.path", "is immutable", setup=spec("StoragePool")),
    case("volume-storagepool-kept", "Volume",
         spec("Volume"), "spec.storagePool",
         "storagePool cannot be removed once set; name another pool to migrate the volume",
         setup=spec("Volume", storagePool="pool-a")),
    case("volume-one-policy-per-interval", "Volume",
         spec("Volume", snapshotPolicies=[{"intervalType": "Daily", "schedule": "00:30", "maxSnapshots": 2},
                                          {"intervalType": "Daily", "schedule": "12:30", "maxSnapshots": 2}]),
         "spec.snapshotPolicies", "at most one snapshot policy per interval type"),
    case("volume-shrink", "Volume",
         spec("Volume", sizeGiB=5), "spec.sizeGiB", "volumes can grow but not shrink", setup=spec("Volume")),
    case("affinitygroup-type-immutable", "AffinityGroup",
         spec("AffinityGroup", type="HostAffinity"), "spec.type", "is immutable", setup=spec("AffinityGroup")),
    case("template-source-immutable", "Template",
         spec("Template", url=DROP, fromVolume={"name": "root-vm1"}), "spec",
         "can only be set when the object is created", setup=spec("Template")),
]

ACCEPTED = [
    # Edge cases next to the rows above that must still be accepted.
    pytest.param("VirtualMachine", spec("VirtualMachine", nics=[nic("net1", macAddress="02:00:0a:01:01:05")]),
                 id="vm-unicast-mac"),
    pytest.param("VirtualMachine", spec("VirtualMachine", nics=DROP), id="vm-without-lists"),
    pytest.param("PhysicalNetwork", spec("PhysicalNetwork", vnetRanges=DROP, publicIpRanges=DROP,
                                         trafficTypes=[{"type": "Guest", "label": "cloudbr0"}]),
                 id="pnet-without-lists"),
    pytest.param("NetworkOffering", {"guestIpType": "L2"}, id="networkoffering-l2-without-services"),
    pytest.param("LoadBalancerRule", spec("LoadBalancerRule", members=DROP), id="loadbalancer-without-members"),
    pytest.param("Zone", spec("Zone", networkType="Basic", securityGroupsEnabled=True), id="zone-basic-sg"),
    pytest.param("Zone", spec("Zone", networkType="Basic"), id="zone-basic-sg-unset"),
    pytest.param("NetworkOffering", {"guestIpType": "L2", "services": []}, id="networkoffering-l2-empty"),
    pytest.param("NetworkOffering", {"guestIpType": "Shared", "services": services(
        "SecurityGroup", "Dhcp", SecurityGroup="SecurityGroupProvider")}, id="networkoffering-shared-sg"),
    pytest.param("DiskOffering", {"customized": True, "minSizeGiB": 1, "maxSizeGiB": 64},
                 id="diskoffering-customized"),
    pytest.param("StoragePool", spec("StoragePool", scope="Cluster", type="SharedMountPoint", host=DROP,
                                     cluster="cluster1"), id="storagepool-shared-mount-point"),
    pytest.param("Template", spec("Template", url=DROP, fromVolume={"name": "root-vm1"}), id="template-from-volume"),
    pytest.param("Template", spec("Template", checksum="sha256:" + "0" * 64), id="template-checksum"),
    pytest.param("Network", {"networkOffering": "isolated-nat", "zone": "zone1"}, id="network-zone-defaults"),
    pytest.param("Volume", {"zone": "zone1", "type": "ROOT"}, id="volume-root-without-size"),
    pytest.param("FirewallRule", {"direction": "Egress", "network": "net1", "protocol": "ICMP", "icmpType": 8},
                 id="firewall-egress-icmp"),
    pytest.param("PortForwardingRule", spec("PortForwardingRule", publicPorts={"start": 65535, "end": 65535},
                                            privatePorts={"start": 1, "end": 1}), id="pfr-port-bounds"),
]


def apply(control_plane: envtest.ControlPlane, document: dict[str, t.Any], *extra: str):
    return control_plane.kubectl("apply", *extra, "-f", "-", input=yaml.safe_dump(document), check=False)


@pytest.fixture(scope="module")
def namespace(control_plane: envtest.ControlPlane) -> t.Iterator[str]:
    control_plane.kubectl("create", "namespace", NAMESPACE)
    # Schema and CEL only: the base manifests name offerings and templates that do not exist, which the
    # admission webhook (when a session controller runs) would refuse first.
    control_plane.kubectl("label", "namespace", NAMESPACE, "cumulo.io/admission-webhook=disabled")
    yield NAMESPACE
    control_plane.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    for param in CASES:
        row: Case = param.values[0]
        if row.setup is not None and row.kind not in NAMESPACED_KINDS:
            control_plane.kubectl("delete", f"{row.kind.lower()}.cumulo.io", row.object_name,
                                  "--ignore-not-found", "--wait=false", check=False)


def test_the_table_is_large_and_unique() -> None:
    ids = [param.id for param in CASES]
    assert len([param for param in CASES if not param.marks]) >= 35
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_base_manifests_are_valid(control_plane: envtest.ControlPlane, namespace: str, kind: str) -> None:
    """Each row changes one thing of a base the apiserver accepts, so it fails for that change alone."""
    name = "default" if kind == "Quota" else f"base-{kind.lower()}-{SUFFIX}"
    result = apply(control_plane, manifest(kind, name, spec(kind)), "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("kind", "accepted_spec"), ACCEPTED)
def test_edge_case_is_accepted(control_plane: envtest.ControlPlane, namespace: str, kind: str,
                               accepted_spec: dict[str, t.Any]) -> None:
    name = "default" if kind == "Quota" else f"accepted-{kind.lower()}-{SUFFIX}"
    result = apply(control_plane, manifest(kind, name, accepted_spec), "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("row", CASES)
def test_invalid_manifest_is_rejected(control_plane: envtest.ControlPlane, namespace: str, row: Case) -> None:
    if row.setup is not None:
        created = apply(control_plane, manifest(row.kind, row.object_name, row.setup))
        assert created.returncode == 0, f"setup of {row.id} was refused: {created.stderr}"
    result = apply(control_plane, manifest(row.kind, row.object_name, row.spec))
    assert result.returncode != 0, f"{row.id} was accepted: {result.stdout}"
    for expected in row.expect:
        assert expected in result.stderr, f"{row.id}: {expected!r} not in:\n{result.stderr}"
