"""cumulo.io/v1alpha1: every kind of the Cumulo API."""

from .affinitygroup import AffinityGroup
from .cluster import Cluster
from .common import API_VERSION, GROUP, VERSION
from .diskoffering import DiskOffering
from .firewallrule import FirewallRule
from .host import Host
from .hostpod import HostPod
from .imagestore import ImageStore
from .loadbalancerrule import LoadBalancerRule
from .network import Network
from .networkoffering import NetworkOffering
from .physicalnetwork import PhysicalNetwork
from .portforwardingrule import PortForwardingRule
from .publicipaddress import PublicIPAddress
from .quota import Quota
from .securitygroup import SecurityGroup
from .serviceoffering import ServiceOffering
from .snapshot import Snapshot
from .storagepool import StoragePool
from .template import Template
from .usage import UsageRecord
from .virtualmachine import VirtualMachine
from .virtualmachinemigration import VirtualMachineMigration
from .virtualrouter import VirtualRouter
from .volume import Volume
from .zone import Zone

__all__ = [
    "API_VERSION", "GROUP", "VERSION",
    "AffinityGroup", "Cluster", "DiskOffering", "FirewallRule", "Host", "HostPod", "ImageStore",
    "LoadBalancerRule", "Network", "NetworkOffering", "PhysicalNetwork", "PortForwardingRule",
    "PublicIPAddress", "Quota", "SecurityGroup", "ServiceOffering", "Snapshot", "StoragePool", "Template",
    "UsageRecord", "VirtualMachine", "VirtualMachineMigration", "VirtualRouter", "Volume", "Zone",
]
