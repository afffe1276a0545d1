"""NetworkOffering: the kind of guest network (isolated, shared, L2) and the services it offers."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    CLUSTER,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
    Model,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    Tags,
    column,
    rules,
)


class GuestIpType(StrEnum):
    """Isolated: a private network per owner behind a virtual router. Shared: one network many owners use,
    made by an admin. L2: a plain segment with no addressing or services."""

    ISOLATED = "Isolated"
    SHARED = "Shared"
    L2 = "L2"


class NetworkService(StrEnum):
    DHCP = "Dhcp"
    DNS = "Dns"
    SOURCE_NAT = "SourceNat"
    STATIC_NAT = "StaticNat"
    PORT_FORWARDING = "PortForwarding"
    FIREWALL = "Firewall"
    LB = "Lb"
    USER_DATA = "UserData"
    SECURITY_GROUP = "SecurityGroup"


class ServiceProvider(StrEnum):
    """What implements a service: the virtual router (a network namespace on a host) or the host itself."""

    VIRTUAL_ROUTER = "VirtualRouter"
    SECURITY_GROUP_PROVIDER = "SecurityGroupProvider"


class EgressPolicy(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class OfferedService(Model):
    """One service of the offering and its provider."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("(self.name == 'SecurityGroup') == (self.provider == 'SecurityGroupProvider')",
                 "SecurityGroup is provided by SecurityGroupProvider, every other service by VirtualRouter",
                 field_path=".provider"),
        )
    )

    name: NetworkService = Field(description="The service.")
    provider: ServiceProvider = Field(ServiceProvider.VIRTUAL_ROUTER, description="What implements it.")


_SERVICES = "self.services.exists(s, s.name == '{}')"


class NetworkOfferingSpec(Model):
    """What a network of this offering is and offers."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.guestIpType != 'L2' || self.services.size() == 0",
                 "an L2 network offers no services", field_path=".services"),
            Rule("self.services.all(a, self.services.exists_one(b, b.name == a.name))",
                 "each service appears once", field_path=".services"),
            Rule(f"self.guestIpType == 'Isolated' || !({_SERVICES.format('SourceNat')})",
                 "SourceNat is only for Isolated networks", field_path=".services"),
            Rule(f"self.guestIpType == 'Shared' || !({_SERVICES.format('SecurityGroup')})",
                 "SecurityGroup is only for Shared networks", field_path=".services"),
            Rule("self.guestIpType == 'Isolated' || "
                 "!self.services.exists(s, s.name in ['StaticNat', 'PortForwarding', 'Lb'])",
                 "StaticNat, PortForwarding and Lb use public IPs, which only Isolated networks have",
                 field_path=".services"),
        )
    )

    display_text: DisplayText = Field("", description="Human-readable description shown to users.")
    guest_ip_type: GuestIpType = Field(description="Isolated, Shared or L2.")
    services: t.Annotated[list[OfferedService], Field(max_length=9)] = Field(
        default_factory=list, description="Services offered on networks of this offering, with their providers."
    )
    specify_vlan: bool = Field(False, description="Networks of this offering are given an explicit VLAN by an admin.")
    conserve_mode: bool = Field(
        True, description="Allow one public IP to carry several services (static NAT excepted)."
    )
    egress_default_policy: EgressPolicy = Field(
        EgressPolicy.ALLOW, description="Egress from guests when no egress rule matches: Allow or Deny."
    )
    network_rate_mbps: t.Annotated[int, Field(ge=1)] | None = Field(
        None, description="Rate limit of the network's router, megabits per second; unlimited when unset."
    )
    tags: Tags = Field(default_factory=list, description="Networks only go onto physical networks with these tags.")
    enabled: bool = Field(True, description="Disabled offerings cannot be used for new networks.")


class NetworkOfferingStatus(ResourceStatus):
    """Observed state of a network offering."""

    networks: int | None = Field(None, description="Number of networks using the offering.")


class NetworkOffering(
    Resource,
    scope=CLUSTER,
    short_names=["nwo"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Guest-IP-Type", ".spec.guestIpType"),
        column("Egress", ".spec.egressDefaultPolicy"),
        column("Enabled", ".spec.enabled", "boolean"),
        column("Networks", ".status.networks", "integer", 1),
        PHASE_COLUMN,
    ],
):
    """A network offering: the guest IP type and the services networks of it get."""

    spec: NetworkOfferingSpec = Field(description="What a network of this offering is and offers.")
    status: NetworkOfferingStatus = Field(default_factory=NetworkOfferingStatus, description="Observed state.")
