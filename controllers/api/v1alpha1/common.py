"""Types shared by every Cumulo kind: references, conditions, capacity, and CEL building blocks.

Validation that a single object can check by itself lives here as CEL rules
(``x-kubernetes-validations``) so that the real apiserver rejects bad input at ``kubectl apply``
time with a specific message. The Python models trust what the apiserver accepted.
"""

from __future__ import annotations

import datetime
import enum
import typing as t

from kube_custom_resource import CustomResource, schema
from kube_custom_resource.custom_resource import Metadata, Scope
from pydantic import ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from controllers.api.schema import structural_schema

GROUP = "cumulo.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SYSTEM_NAMESPACE = "cumulo-system"
"""Namespace of Cumulo's own objects: heartbeat Leases, the controller's leader Lease, system Secrets."""
SHARED_NAMESPACE = "cumulo-shared"
"""Admin-owned namespace readable by every authenticated user: public templates, networks shared with all."""
FINALIZER = f"{GROUP}/finalizer"

# Tenancy: a namespace is a CloudStack account (or project); these namespace labels place it in the domain tree.
# Documentation and selection only (``kubectl get ns -l cumulo.io/domain-ROOT.eng``); nothing enforces them.
DOMAIN_LABEL = f"{GROUP}/domain"
"""The namespace's domain as a path from ROOT, with ``.`` between levels (label values allow no ``/``):
``ROOT.eng.web`` is CloudStack's ``ROOT/eng/web``."""
DOMAIN_LEVEL_PREFIX = f"{GROUP}/domain-"
"""One label per ancestor, so a subtree is one selector: ``cumulo.io/domain-ROOT.eng: "true"`` on every namespace
in ROOT/eng and below."""
ACCOUNT_TYPE_LABEL = f"{GROUP}/account-type"
"""``account`` or ``project`` (CloudStack's two kinds of resource owner)."""


class Model(schema.BaseModel):
    """Base of every nested object: camelCase on the wire, Python names in code."""


class StrEnum(str, schema.Enum):
    """An enum serialised as its string value."""


class ObjectMeta(Metadata):
    """The object metadata Cumulo reads (kube-custom-resource's, plus generation)."""

    generation: int | None = Field(None, description="Sequence number of the desired state (spec changes).")


class Resource(CustomResource, abstract=True):
    """Base of every Cumulo kind. Subclasses pass CRD names and printer columns as class keywords."""

    metadata: ObjectMeta = Field(description="Standard object metadata.")

    selectable_fields: t.ClassVar[tuple[str, ...]] = ()
    """JSON paths usable in field selectors (``kubectl get hosts --field-selector spec.cluster=c1``);
    the controller looks up dependents with them. At most 8, scalar fields only."""

    @classmethod
    def model_json_schema(cls, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
        return structural_schema(cls)


CLUSTER = Scope.CLUSTER
NAMESPACED = Scope.NAMESPACED
STATUS_SUBRESOURCE = {"status": {}}


def column(name: str, json_path: str, type: str = "string", priority: int = 0, description: str = "") -> dict:
    """A printer column for ``kubectl get``; priority 1 shows only with ``-o wide``."""
    entry: dict[str, t.Any] = {"name": name, "type": type, "jsonPath": json_path}
    if priority:
        entry["priority"] = priority
    if description:
        entry["description"] = description
    return entry


PHASE_COLUMN = column("Phase", ".status.phase", description="Summary of the state")


# --------------------------------------------------------------------------------------------
# CEL and schema annotations
# --------------------------------------------------------------------------------------------


class Rule:
    """Annotation adding one CEL rule (``x-kubernetes-validations``) to the annotated schema."""

    def __init__(self, rule: str, message: str, *, reason: str | None = None, field_path: str | None = None):
        self.entry: dict[str, str] = {"rule": rule, "message": message}
        if reason:
            self.entry["reason"] = reason
        if field_path:
            self.entry["fieldPath"] = field_path

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # Kept beside a $ref (not written into the shared definition); crd inlining merges it.
        json_schema = handler(core_schema)
        json_schema.setdefault("x-kubernetes-validations", []).append(self.entry)
        return json_schema


def rules(*entries: Rule) -> dict[str, t.Any]:
    """Model-level CEL rules, for ``model_config = ConfigDict(json_schema_extra=rules(...))``."""
    return {"x-kubernetes-validations": [entry.entry for entry in entries]}


class SchemaExtra:
    """Annotation merging raw OpenAPI keys (list types, formats) into the annotated schema."""

    def __init__(self, **extra: t.Any):
        self.extra = extra

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        json_schema.update(self.extra)
        return json_schema


IMMUTABLE = Rule("self == oldSelf", "is immutable", reason="FieldValueForbidden")


def _ipv4_as_int(expr: str) -> str:
    """A CEL expression turning a dotted-quad string into an int, so IPv4 addresses can be ordered."""
    octet = "int({e}.split('.')[{i}])"
    return "(" + " + ".join(f"{octet.format(e=expr, i=i)} * {256 ** (3 - i)}" for i in range(4)) + ")"


def _is_ipv4(expr: str) -> str:
    return f"(isIP({expr}) && ip({expr}).family() == 4)"


# The helpers below skip absent or malformed operands: the field's own rule reports those, once.


def address_in_cidr(address: str, cidr: str = "cidr") -> Rule:
    """``address`` (a field name) lies inside the network ``cidr``."""
    a, c = f"self.{address}", f"self.{cidr}"
    return Rule(
        f"!has({a}) || !has({c}) || !isCIDR({c}) || !isIP({a}) || cidr({c}).containsIP({a})",
        f"{address} must be inside {cidr}", field_path=f".{address}",
    )


def address_range(start: str = "startIp", end: str = "endIp") -> Rule:
    """Address ``start`` is not after address ``end``."""
    s_, e_ = f"self.{start}", f"self.{end}"
    return Rule(
        f"!has({s_}) || !has({e_}) || !{_is_ipv4(s_)} || !{_is_ipv4(e_)} || {_ipv4_as_int(s_)} <= {_ipv4_as_int(e_)}",
        f"{start} must not be after {end}", field_path=f".{start}",
    )


def set_at_creation(*fields: str) -> Rule:
    """Optional immutable fields can be neither added nor removed later (``self == oldSelf`` on the field
    itself only runs when both values exist)."""
    return Rule(
        " && ".join(f"has(self.{f}) == has(oldSelf.{f})" for f in fields),
        f"{', '.join(fields)} can only be set when the object is created", reason="FieldValueForbidden",
    )


Name = t.Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
]
"""A Kubernetes object name (DNS subdomain)."""

DnsLabel = t.Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]

IPv4Address = t.Annotated[
    str,
    Field(max_length=15),
    Rule(_is_ipv4("self"), "must be an IPv4 address such as 10.1.1.1"),
]

IPv4Cidr = t.Annotated[
    str,
    Field(max_length=18),
    Rule(
        "isCIDR(self) && cidr(self).ip().family() == 4 && cidr(self) == cidr(self).masked()",
        "must be an IPv4 network in CIDR notation with no host bits set, such as 10.1.1.0/24",
    ),
]

Tag = t.Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")]
Tags = t.Annotated[list[Tag], Field(max_length=32), SchemaExtra(**{"x-kubernetes-list-type": "set"})]

Port = t.Annotated[int, Field(ge=1, le=65535)]

DisplayText = t.Annotated[str, Field(max_length=255)]

Description = t.Annotated[str, Field(max_length=1024)]


# --------------------------------------------------------------------------------------------
# Enums used by several kinds
# --------------------------------------------------------------------------------------------


class AllocationState(StrEnum):
    """CloudStack's allocation state: a Disabled object takes no new placements; existing ones stay."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"


class HypervisorType(StrEnum):
    KVM = "KVM"
    SIMULATOR = "Simulator"


class StorageType(StrEnum):
    """Where an offering's disks live: on the host itself, or on storage shared by a cluster or zone."""

    LOCAL = "local"
    SHARED = "shared"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    ICMP = "ICMP"
    ALL = "All"


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


class ObjectReference(Model):
    """A reference to an object in the same namespace, or to a cluster-scoped object."""

    name: Name = Field(description="Name of the referenced object.")


class NamespacedReference(Model):
    """A reference to a namespaced object; the namespace defaults to the referring object's own."""

    name: Name = Field(description="Name of the referenced object.")
    namespace: DnsLabel | None = Field(
        None, description="Namespace of the referenced object; defaults to the namespace of the referring object."
    )


class SecretKeyReference(Model):
    """A key of a Secret."""

    name: Name = Field(description="Name of the Secret.")
    namespace: DnsLabel = Field(description="Namespace of the Secret.")
    key: t.Annotated[str, Field(min_length=1, max_length=253)] = Field(description="Key within the Secret's data.")


# --------------------------------------------------------------------------------------------
# Status building blocks
# --------------------------------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """One aspect of an object's state, in the shape of Kubernetes' metav1.Condition."""

    type: t.Annotated[str, Field(min_length=1, max_length=316)] = Field(
        description="Type of the condition, such as Ready, Scheduled or DeletionBlocked."
    )
    status: ConditionStatus = Field(description="Whether the condition holds: True, False or Unknown.")
    reason: t.Annotated[str, Field(max_length=1024)] = Field(
        "", description="A CamelCase word saying why the condition has its status."
    )
    message: t.Annotated[str, Field(max_length=32768)] = Field(
        "", description="A human-readable explanation; says what to do when action is needed."
    )
    last_transition_time: datetime.datetime | None = Field(
        None, description="When the status of the condition last changed."
    )
    observed_generation: int | None = Field(
        None, description="The metadata.generation the condition was set for."
    )


Conditions = t.Annotated[
    list[Condition],
    Field(max_length=32),
    SchemaExtra(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
]


class ResourceStatus(Model):
    """Fields every Cumulo status carries."""

    observed_generation: int | None = Field(
        None, description="The metadata.generation this status was derived from."
    )
    phase: str | None = Field(None, description="A one-word summary of the state, derived from the conditions.")
    conditions: Conditions = Field(
        default_factory=list,
        description="Current conditions. Ready is always present once the object was reconciled; "
        "each carries a reason and a message.",
    )


class CapacityFigure(Model):
    """Total and allocated amounts of one resource. Totals already include overcommit/overprovisioning."""

    total: int = Field(0, description="Capacity available to placements, after overcommit ratios.")
    allocated: int = Field(0, description="Amount reserved by placed objects.")


class Capacity(Model):
    """Capacity of an infrastructure object, summed over the hosts and pools below it."""

    cpu_cores: CapacityFigure = Field(
        default_factory=CapacityFigure, alias="cpuCores", description="Virtual CPU cores."
    )
    memory_mib: CapacityFigure = Field(
        default_factory=CapacityFigure, alias="memoryMiB", description="Memory, in MiB."
    )
    primary_storage_gib: CapacityFigure = Field(
        default_factory=CapacityFigure, alias="primaryStorageGiB", description="Primary storage, in GiB."
    )


class PortRange(Model):
    """An inclusive range of TCP or UDP ports."""

    model_config = ConfigDict(json_schema_extra=rules(Rule("self.start <= self.end", "start must not exceed end")))

    start: Port = Field(description="First port.")
    end: Port = Field(description="Last port.")


Cidrs = t.Annotated[list[IPv4Cidr], Field(max_length=64)]
