"""PortForwardingRule: forward ports of a public address to a guest."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .common import (
    NAMESPACED,
    STATUS_SUBRESOURCE,
    Cidrs,
    IPv4Address,
    Model,
    Name,
    ObjectReference,
    PortRange,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
)


class TransportProtocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class PortForwardingRuleSpec(Model):
    """Desired forwarding."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.publicPorts.end - self.publicPorts.start == self.privatePorts.end - self.privatePorts.start",
                 "publicPorts and privatePorts must be ranges of the same length", field_path=".privatePorts"),
        )
    )

    public_ip_address: Name = Field(description="The PublicIPAddress (same namespace).")
    protocol: TransportProtocol = Field(TransportProtocol.TCP, description="TCP or UDP.")
    public_ports: PortRange = Field(description="Ports on the public address.")
    private_ports: PortRange = Field(description="Ports on the guest.")
    virtual_machine: ObjectReference = Field(description="The guest (same namespace).")
    vm_ip_address: IPv4Address | None = Field(
        None, alias="vmIpAddress", description="Guest address; the guest's NIC on the address's network when unset."
    )
    source_cidrs: Cidrs = Field(
        default_factory=list, description="Only forward traffic from these CIDRs; from anywhere when empty."
    )


class PortForwardingRule(
    Resource,
    scope=NAMESPACED,
    short_names=["pfr"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Public-IP", ".spec.publicIpAddress"),
        column("Protocol", ".spec.protocol"),
        column("Public-Start", ".spec.publicPorts.start", "integer"),
        column("VM", ".spec.virtualMachine.name"),
        column("Private-Start", ".spec.privatePorts.start", "integer"),
        column("Phase", ".status.phase"),
    ],
):
    """A port forwarding rule on a public address of an isolated network."""

    spec: PortForwardingRuleSpec = Field(description="Desired forwarding.")
    status: ResourceStatus = Field(default_factory=ResourceStatus, description="Observed state of the rule.")

