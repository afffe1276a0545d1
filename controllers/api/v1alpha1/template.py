"""Template: a disk image (or ISO) guests boot from, registered into the zone's image store."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from .common import (
    IMMUTABLE,
    NAMESPACED,
    PHASE_COLUMN,
    STATUS_SUBRESOURCE,
    DisplayText,
    HypervisorType,
    Model,
    Name,
    ObjectReference,
    Resource,
    ResourceStatus,
    Rule,
    StrEnum,
    column,
    rules,
    set_at_creation,
)

ImageUrl = t.Annotated[
    str,
    Field(max_length=2048),
    Rule("self.matches('^(file:///|https?://)[^ ]+$')", "must be a file:///, http:// or https:// URL"),
]
Checksum = t.Annotated[
    str,
    Field(max_length=140),
    Rule("self.matches('^(md5:[0-9a-f]{32}|sha1:[0-9a-f]{40}|sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$')",
         "must be <algorithm>:<lowercase hex digest> with algorithm md5, sha1, sha256 or sha512"),
]


class ImageFormat(StrEnum):
    QCOW2 = "QCOW2"
    RAW = "RAW"
    ISO = "ISO"


class TemplateState(StrEnum):
    DOWNLOADING = "Downloading"
    READY = "Ready"
    ERROR = "Error"


class BootFile(Model):
    """A file fetched next to the image, such as a kernel or an initrd for direct-kernel boot."""

    url: ImageUrl = Field(description="Where to fetch it: file:///, http:// or https://.")
    checksum: Checksum | None = Field(None, description="Expected digest, <algorithm>:<hex>.")


class DirectKernelBoot(Model):
    """Boot the guest's kernel directly (as OpenStack images with kernel_id/ramdisk_id can), not its bootloader."""

    kernel: BootFile = Field(description="The kernel image.")
    initrd: BootFile | None = Field(None, description="The initial ramdisk.")
    cmdline: t.Annotated[str, Field(max_length=4096)] = Field("", description="Kernel command line.")


class TemplateSpec(Model):
    """Where the image comes from and how guests use it."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            Rule("[has(self.url), has(self.fromSnapshot), has(self.fromVolume)].filter(x, x).size() == 1",
                 "give exactly one source: url, fromSnapshot or fromVolume"),
            Rule("!has(self.directKernelBoot) || self.format != 'ISO'", "an ISO cannot use directKernelBoot",
                 field_path=".directKernelBoot"),
            Rule("!has(self.checksum) || has(self.url)", "checksum applies to url sources", field_path=".checksum"),
            set_at_creation("url", "fromSnapshot", "fromVolume", "checksum", "zone"),
        )
    )

    display_text: DisplayText = Field("", description="Human-readable description shown to users.")
    url: t.Annotated[ImageUrl, IMMUTABLE] | None = Field(
        None, description="Where to download the image from: file:///, http:// or https://. Immutable."
    )
    from_snapshot: t.Annotated[ObjectReference, IMMUTABLE] | None = Field(
        None, description="Make the template from this Snapshot (same namespace). Immutable."
    )
    from_volume: t.Annotated[ObjectReference, IMMUTABLE] | None = Field(
        None, description="Make the template from this Volume, a stopped guest's root disk. Immutable."
    )
    format: t.Annotated[ImageFormat, IMMUTABLE] = Field(
        ImageFormat.QCOW2, description="Declared format: QCOW2, RAW or ISO. Checked against the image itself."
    )
    checksum: t.Annotated[Checksum, IMMUTABLE] | None = Field(
        None, description="Expected digest of the download, <algorithm>:<hex>. Immutable."
    )
    zone: t.Annotated[Name, IMMUTABLE] | None = Field(
        None, description="Zone to register the template in; every zone when unset. Immutable."
    )
    hypervisor: HypervisorType = Field(HypervisorType.KVM, description="Hypervisor the image is for.")
    os_type: t.Annotated[str, Field(max_length=255)] = Field(
        "Other Linux (64-bit)", description="Guest OS type, as CloudStack names them; picks virtual hardware."
    )
    public: bool = Field(False, description="Usable from every namespace; otherwise only from its own.")
    bootable: bool = Field(True, description="Guests may boot from it (ISOs may be data-only).")
    password_enabled: bool = Field(
        False, description="The image runs a password agent, so Cumulo may set a generated password."
    )
    direct_kernel_boot: DirectKernelBoot | None = Field(
        None, description="Kernel, initrd and command line to boot the guest with, besides the disk."
    )


class TemplateZoneCopy(Model):
    """The template's copy in one zone's image store."""

    zone: str = Field(description="The zone.")
    image_store: str = Field(description="The ImageStore holding the copy.")
    path: str = Field(description="Absolute path of the image (inside the store's directory).")
    host: str | None = Field(None, description="Host whose agent downloads the copy.")
    source: str | None = Field(None, description="For templates made from a snapshot or volume: the disk image "
                               "the agent converts into the copy (not downloaded).")
    state: TemplateState = Field(description="Downloading, Ready or Error.")
    download_percent: int | None = Field(None, description="Progress of the download, 0-100.")
    message: str = Field("", description="Why the copy failed, when it did.")


class DownloadReport(Model):
    """Progress of a download, written by the agent doing it (owned by the agent)."""

    zone: str = Field(description="Zone of the copy being downloaded.")
    host: str = Field(description="The downloading host.")
    state: TemplateState = Field(description="Downloading, Ready or Error.")
    percent: int | None = Field(None, description="Progress, 0-100, when the size is known.")
    bytes: int = Field(0, description="Bytes downloaded so far.")
    message: str = Field("", description="What failed, when it did.")
    detected_format: str | None = Field(None, description="Format found by qemu-img info.")
    checksum: str | None = Field(None, description="Digest of what was downloaded, <algorithm>:<hex>.")
    physical_size_bytes: int | None = Field(None, description="Size of the image file.")
    virtual_size_bytes: int | None = Field(None, description="Size of the disk the image represents.")
    deleted: bool = Field(False, description="The copy's files were removed (the Template is being deleted).")


class TemplateStatus(ResourceStatus):
    """Observed state of a template."""

    state: TemplateState | None = Field(None, description="Downloading, Ready or Error.")
    download_percent: int | None = Field(None, description="Progress of the download, 0-100.")
    detected_format: str | None = Field(None, description="Format found by qemu-img info.")
    checksum: str | None = Field(None, description="Digest of the stored image, <algorithm>:<hex>.")
    physical_size_bytes: int | None = Field(None, description="Size of the image file.")
    virtual_size_bytes: int | None = Field(None, description="Size of the disk the image represents.")
    zones: list[TemplateZoneCopy] = Field(default_factory=list, description="The copies in each zone.")
    download: DownloadReport | None = Field(None, description="The running or last download (agent-owned).")


class Template(
    Resource,
    scope=NAMESPACED,
    short_names=["tmpl"],
    subresources=STATUS_SUBRESOURCE,
    printer_columns=[
        column("Format", ".spec.format"),
        column("Public", ".spec.public", "boolean"),
        column("State", ".status.state"),
        column("Progress", ".status.downloadPercent", "integer"),
        column("Virtual-Size", ".status.virtualSizeBytes", "integer", 1),
        PHASE_COLUMN,
    ],
):
    """A template or ISO: an image guests boot from, kept in the zone's image store."""

    selectable_fields = (".spec.zone",)

    spec: TemplateSpec = Field(description="Where the image comes from and how guests use it.")
    status: TemplateStatus = Field(default_factory=TemplateStatus, description="Observed state of the template.")
