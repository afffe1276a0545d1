"""PublicIPAddress: an address from the zone's public ranges, for source NAT, static NAT and rules."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    STATUS_SUBRESOURCE,
    IPv4Address,
    Model,
    Name,
    ObjectReference,
    Resource,
    ResourceStatus,
    column,
    rules,
    set_at_creation,
)


class StaticNat(Model):
    """One-to-one NAT of the public address to a guest."""

    virtual_machine: ObjectReference = Field(description="The guest (same namespace).")
    vm_ip_address: IPv4Address | None = Field(
        None, alias="vmIpAddress", description="Guest address to map to; the guest's NIC on the network when unset."
    )


class PublicIPAddressSpec(Model):
    """Desired state of a public address."""

    model_config = ConfigDict(json_schema_extra=rules(set_at_creation("ipAddress")))

    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone whose public ranges the address comes from.")
    network: t.Annotated[Name, IMMUTABLE] = Field(description="Isolated Network (same namespace) it serves.")
    ip_address: t.Annotated[IPv4Address, IMMUTABLE] | None = Field(
        None, description="A specific address to ask for; any free one when unset. Immutable."
    )
    source_nat: t.Annotated[bool, IMMUTABLE] = Field(
        False, description="The network's source NAT address; made by the controller, not by users."
    )
    static_nat: StaticNat | None = Field(None, description="Map the address one-to-one to a guest.")


class PublicIPAddressStatus(ResourceStatus):
    """Observed state of a public address."""

    ip_address: str | None = Field(None, description="The allocated address.")
    vlan: int | None = Field(None, description="VLAN of the public range, if tagged.")
    physical_network: str | None = Field(None, description="PhysicalNetwork of the public range.")


class PublicIPAddress(
    Resource,
    scope=NAMESPACED,
    short_names=["pip"],
    plural_name="publicipaddresses",
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Address", ".status.ipAddress"),
        column("Network", ".spec.network"),
        column("Source-NAT", ".spec.sourceNat", "boolean"),
        column("Static-NAT", ".spec.staticNat.virtualMachine.name"),
        column("Phase", ".status.phase"),
    ],
):
    """A public IP address of an isolated network."""

    selectable_fields = (".spec.network", ".spec.zone")

    spec: PublicIPAddressSpec = Field(description="Desired state of the address.")
    status: PublicIPAddressStatus = Field(default_factory=PublicIPAddressStatus, description="Observed state.")
