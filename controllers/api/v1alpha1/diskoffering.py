"""DiskOffering: the size, placement and limits of a data disk."""

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
    StorageType,
    StrEnum,
    Tags,
    column,
    rules,
)

SizeGiB = t.Annotated[int, Field(ge=1, le=65536)]


class ProvisioningType(StrEnum):
    """thin: allocate on write. sparse: preallocate metadata. fat: allocate everything up front."""

    THIN = "thin"
    SPARSE = "sparse"
    FAT = "fat"


class DiskOfferingSpec(Model):
    """What a volume of this offering gets."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("self.customized || has(self.diskSizeGiB)", "a fixed-size offering needs diskSizeGiB",
                 field_path=".diskSizeGiB"),
            Rule("!self.customized || !has(self.diskSizeGiB)",
                 "a customized offering takes its size from each volume; leave diskSizeGiB unset",
                 field_path=".diskSizeGiB"),
            Rule("!has(self.minSizeGiB) || !has(self.maxSizeGiB) || self.minSizeGiB <= self.maxSizeGiB",
                 "minSizeGiB must not exceed maxSizeGiB", field_path=".minSizeGiB"),
        )
    )

    display_text: DisplayText = Field("", description="Human-readable description shown to users.")
    disk_size_gib: SizeGiB | None = Field(None, alias="diskSizeGiB", description="Size of every volume, in GiB.")
    customized: bool = Field(False, description="Each volume chooses its own size.")
    min_size_gib: SizeGiB | None = Field(None, alias="minSizeGiB", description="Smallest size a customized volume may have.")
    max_size_gib: SizeGiB | None = Field(None, alias="maxSizeGiB", description="Largest size a customized volume may have.")
    storage_type: StorageType = Field(StorageType.SHARED, description="local or shared primary storage.")
    provisioning_type: ProvisioningType = Field(ProvisioningType.THIN, description="thin, sparse or fat.")
    tags: Tags = Field(default_factory=list, description="Volumes only go to pools carrying all these tags.")
    bytes_read_rate: t.Annotated[int, Field(ge=1)] | None = Field(None, description="Read limit, bytes per second.")
    bytes_write_rate: t.Annotated[int, Field(ge=1)] | None = Field(None, description="Write limit, bytes per second.")
    iops_read_rate: t.Annotated[int, Field(ge=1)] | None = Field(None, description="Read limit, operations per second.")
    iops_write_rate: t.Annotated[int, Field(ge=1)] | None = Field(
        None, description="Write limit, operations per second."
    )
    enabled: bool = Field(True, description="Disabled offerings cannot be used for new volumes.")


class DiskOfferingStatus(ResourceStatus):
    """Observed state of a disk offering."""

    volumes: int | None = Field(None, description="Number of volumes using the offering.")


class DiskOffering(
    Resource,
    scope=CLUSTER,
    short_names=["dko"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Size-GiB", ".spec.diskSizeGiB", "integer"),
        column("Custom", ".spec.customized", "boolean"),
        column("Storage", ".spec.storageType"),
        column("Enabled", ".spec.enabled", "boolean"),
        column("Volumes", ".status.volumes", "integer", 1),
        PHASE_COLUMN,
    ],
):
    """A disk offering: size, storage type, provisioning and I/O limits of data volumes."""

    spec: DiskOfferingSpec = Field(description="What a volume of this offering gets.")
    status: DiskOfferingStatus = Field(default_factory=DiskOfferingStatus, description="Observed state.")
