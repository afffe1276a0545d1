"""One reconciler per kind."""

from controllers.reconcilers.cluster import ClusterReconciler
from controllers.reconcilers.host import HostReconciler
from controllers.reconcilers.hostpod import HostPodReconciler
from controllers.reconcilers.migration import VirtualMachineMigrationReconciler
from controllers.reconcilers.imagestore import ImageStoreReconciler
from controllers.reconcilers.offerings import (
    DiskOfferingReconciler,
    NetworkOfferingReconciler,
    ServiceOfferingReconciler,
)
from controllers.reconcilers.network import NetworkReconciler, VirtualRouterReconciler
from controllers.reconcilers.physicalnetwork import PhysicalNetworkReconciler
from controllers.reconcilers.publicip import PublicIPAddressReconciler
from controllers.reconcilers.quota import QuotaReconciler
from controllers.reconcilers.snapshot import SnapshotReconciler
from controllers.reconcilers.rules import (
    FirewallRuleReconciler,
    LoadBalancerRuleReconciler,
    PortForwardingRuleReconciler,
    SecurityGroupReconciler,
)
from controllers.reconcilers.storagepool import StoragePoolReconciler
from controllers.reconcilers.template import TemplateReconciler
from controllers.reconcilers.usage import UsageReconciler
from controllers.reconcilers.virtualmachine import VirtualMachineReconciler
from controllers.reconcilers.volume import VolumeReconciler
from controllers.reconcilers.zone import ZoneReconciler

INFRASTRUCTURE = (
    ZoneReconciler, HostPodReconciler, ClusterReconciler, HostReconciler, StoragePoolReconciler,
    ImageStoreReconciler, PhysicalNetworkReconciler, ServiceOfferingReconciler, DiskOfferingReconciler,
    NetworkOfferingReconciler,
)
COMPUTE = (TemplateReconciler, VolumeReconciler, VirtualMachineReconciler, VirtualMachineMigrationReconciler,
           SnapshotReconciler)
NETWORKING = (NetworkReconciler, VirtualRouterReconciler, PublicIPAddressReconciler, FirewallRuleReconciler, PortForwardingRuleReconciler,
              LoadBalancerRuleReconciler, SecurityGroupReconciler)
ALL = INFRASTRUCTURE + NETWORKING + COMPUTE + (QuotaReconciler, UsageReconciler)
