"""Every resource type the controller watches, with how to reach and parse it."""

from __future__ import annotations

from controllers.api import v1alpha1 as api
from controllers.api.v1alpha1.host import HEARTBEAT_LABEL, HOST_LABEL
from controllers.hostmonitor import Lease
from controllers.runtime import Kind, cumulo_kind

ZONES = cumulo_kind(api.Zone)
HOSTPODS = cumulo_kind(api.HostPod)
CLUSTERS = cumulo_kind(api.Cluster)
HOSTS = cumulo_kind(api.Host)
STORAGEPOOLS = cumulo_kind(api.StoragePool)
IMAGESTORES = cumulo_kind(api.ImageStore)
PHYSICALNETWORKS = cumulo_kind(api.PhysicalNetwork)
SERVICEOFFERINGS = cumulo_kind(api.ServiceOffering)
DISKOFFERINGS = cumulo_kind(api.DiskOffering)
NETWORKOFFERINGS = cumulo_kind(api.NetworkOffering)
TEMPLATES = cumulo_kind(api.Template)
VIRTUALMACHINES = cumulo_kind(api.VirtualMachine)
VOLUMES = cumulo_kind(api.Volume)
VIRTUALMACHINEMIGRATIONS = cumulo_kind(api.VirtualMachineMigration)
SNAPSHOTS = cumulo_kind(api.Snapshot)
NETWORKS = cumulo_kind(api.Network)
PUBLICIPADDRESSES = cumulo_kind(api.PublicIPAddress)
AFFINITYGROUPS = cumulo_kind(api.AffinityGroup)
VIRTUALROUTERS = cumulo_kind(api.VirtualRouter)
FIREWALLRULES = cumulo_kind(api.FirewallRule)
PORTFORWARDINGRULES = cumulo_kind(api.PortForwardingRule)
LOADBALANCERRULES = cumulo_kind(api.LoadBalancerRule)
SECURITYGROUPS = cumulo_kind(api.SecurityGroup)
QUOTAS = cumulo_kind(api.Quota)
USAGERECORDS = cumulo_kind(api.UsageRecord)
LEASES = Kind("leases", "coordination.k8s.io", "v1", True, lambda raw: Lease.parse(raw, HOST_LABEL), "Lease",
              selector=HEARTBEAT_LABEL)

ALL = (ZONES, HOSTPODS, CLUSTERS, HOSTS, STORAGEPOOLS, IMAGESTORES, PHYSICALNETWORKS, SERVICEOFFERINGS,
       DISKOFFERINGS, NETWORKOFFERINGS, TEMPLATES, VIRTUALMACHINES, VOLUMES, SNAPSHOTS, NETWORKS, PUBLICIPADDRESSES,
       AFFINITYGROUPS, VIRTUALROUTERS, FIREWALLRULES, PORTFORWARDINGRULES, LOADBALANCERRULES, SECURITYGROUPS, QUOTAS,
       USAGERECORDS, VIRTUALMACHINEMIGRATIONS, LEASES)
