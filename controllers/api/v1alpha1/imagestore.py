"""ImageStore: CloudStack's secondary storage, holding templates, ISOs and snapshot backups of a zone."""

from __future__ import annotations

import typing as t

from pydantic import Field

from .common import (
    CLUSTER,
    IMMUTABLE,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
    Name,
    Model,
    Resource,
    ResourceStatus,
    StrEnum,
    column,
)
from .storagepool import AbsolutePath


class ImageStoreType(StrEnum):
    """Filesystem: a directory every host of the zone sees at the same path (a shared mount in production)."""

    FILESYSTEM = "Filesystem"


class ImageStoreSpec(Model):
    """Desired state of an image store."""

    zone: t.Annotated[Name, IMMUTABLE] = Field(description="Zone served by this store. Immutable.")
    type: t.Annotated[ImageStoreType, IMMUTABLE] = Field(
        ImageStoreType.FILESYSTEM, description="Kind of store. Immutable."
    )
    path: t.Annotated[AbsolutePath, IMMUTABLE] = Field(
        description="Directory holding templates/, isos/ and snapshots/. Immutable."
    )
    display_text: DisplayText = Field("", description="Human-readable description of the store.")
    read_only: bool = Field(False, description="A read-only store serves existing images but takes no new ones.")


class ImageStoreStatus(ResourceStatus):
    """Observed state of an image store."""

    capacity_bytes: int | None = Field(None, description="Size of the filesystem holding the store, in bytes.")
    used_bytes: int | None = Field(None, description="Space used on that filesystem, in bytes.")
    templates: int | None = Field(None, description="Number of templates stored.")
    snapshots: int | None = Field(None, description="Number of snapshot backups stored.")


class ImageStore(
    Resource,
    scope=CLUSTER,
    short_names=["imgs"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Zone", ".spec.zone"),
        column("Path", ".spec.path"),
        PHASE_COLUMN,
        column("Templates", ".status.templates", "integer"),
        column("Used", ".status.usedBytes", "integer", 1),
    ],
):
    """An image store (secondary storage) of a zone: templates, ISOs and snapshot backups."""

    selectable_fields = (".spec.zone",)

    spec: ImageStoreSpec = Field(description="Desired state of the image store.")
    status: ImageStoreStatus = Field(default_factory=ImageStoreStatus, description="Observed state of the store.")
