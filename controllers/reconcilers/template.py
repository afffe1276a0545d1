"""Template reconciler: registers an image into each target zone's image store through a host agent.

The controller picks the image store and a host of the zone that reaches it, records the copy's path
and labels the Template with that host (so its agent, which watches only objects labelled with its
host, sees it). The agent downloads, checks the format with qemu-img and the checksum, and reports
under ``status.download``; the controller turns that into the copy's state. One zone is downloaded
at a time.

A Template made from a Snapshot (its backup on the zone's image store) or from a stopped guest's root Volume
is not downloaded: the copy records the disk image as its ``source`` and the agent converts it into the
store (qemu-img, flattened, so the template has no backing file). Such a template lives in the zone of its
source only; a volume's copy is made by the agent of the volume's host (it reaches the disk).
"""

from __future__ import annotations

from controllers import inventory, kinds
from controllers.api.v1alpha1 import Template
from controllers.api.v1alpha1.host import HOST_LABEL, HostState
from controllers.api.v1alpha1.template import ImageFormat, TemplateState, TemplateStatus, TemplateZoneCopy
from controllers.conditions import Check, first_failure
from controllers.reconcilers.base import Dependents, InventoryReconciler
from controllers.reconcilers.snapshot import backed_up
from controllers.reconcilers.volume import vm_stopped

EXTENSIONS = {ImageFormat.QCOW2: "qcow2", ImageFormat.RAW: "raw", ImageFormat.ISO: "iso"}


def copy_path(store_path: str, template: Template) -> str:
    meta = template.metadata
    return f"{store_path.rstrip('/')}/templates/{meta.namespace}/{meta.name}-{meta.uid[:8]}." \
           f"{EXTENSIONS[template.spec.format]}"


class TemplateReconciler(InventoryReconciler):
    kind = kinds.TEMPLATES
    dependents = (Dependents("volumes", "fromTemplate", lambda volume: [
        f"{volume.spec.from_template.namespace or volume.metadata.namespace}/{volume.spec.from_template.name}"]
        if volume.spec.from_template else []),)
    agent_status_keys = ("download",)

    def setup(self) -> None:
        super().setup()
        self.index("imagestores", ".spec.zone", lambda store: [store.spec.zone])
        self.index("hosts", ".status.zone", lambda host: [host.status.zone] if host.status.zone else [])

    def blocked_by(self, template: Template) -> list[str]:
        key = f"{template.metadata.namespace}/{template.metadata.name}"
        return [f"Volume {v.metadata.namespace}/{v.metadata.name}" + (
                    f" (an RBD clone of {v.status.base_image.path} in Ceph pool {v.status.rbd.pool})"
                    if v.status.rbd and v.status.base_image else "")
                for v in self.store.by("volumes", "fromTemplate", key)]

    def watch_map(self):
        # Dependents are keyed namespace/name here; an image store or host of a zone matters to every
        # template waiting in that zone.
        def of_volume(volume):
            if not volume.spec.from_template:
                return []
            return [self.key(volume.spec.from_template.name,
                             volume.spec.from_template.namespace or volume.metadata.namespace)]

        def waiting(_obj):
            return [self.key(t_.metadata.name, t_.metadata.namespace) for t_ in self.store.list("templates")
                    if t_.status.state != TemplateState.READY]

        def made_from(obj):
            # Templates waiting for this snapshot or volume (made from it).
            return [self.key(t_.metadata.name, t_.metadata.namespace) for t_ in self.store.list("templates")
                    if t_.spec.url is None and t_.status.state != TemplateState.READY
                    and t_.metadata.namespace == obj.metadata.namespace]

        return {"volumes": lambda v: [*of_volume(v), *made_from(v)], "imagestores": waiting, "hosts": waiting,
                "snapshots": made_from, "virtualmachines": made_from}

    def source(self, template: Template) -> tuple[Check, str | None, str | None, str | None]:
        """For a template made from a snapshot or a volume: (check, zone, image to convert, host that must
        convert it or None for any host of the zone)."""
        namespace = template.metadata.namespace
        if template.spec.from_snapshot is not None:
            name = template.spec.from_snapshot.name
            snapshot = self.store.get("snapshots", name, namespace)
            if snapshot is None:
                return Check.failed("SnapshotNotFound", f"Snapshot {name} does not exist"), None, None, None
            if not backed_up(snapshot):
                return Check.failed("SnapshotNotReady", f"Snapshot {name} is not BackedUp yet"), None, None, None
            return Check.passed(), snapshot.status.zone, snapshot.status.secondary.path, None
        name = template.spec.from_volume.name
        volume = self.store.get("volumes", name, namespace)
        if volume is None:
            return Check.failed("VolumeNotFound", f"Volume {name} does not exist"), None, None, None
        vm = self.store.get("virtualmachines", volume.spec.virtual_machine.name, namespace) \
            if volume.spec.virtual_machine else None
        if not vm_stopped(vm):
            return Check.failed("VirtualMachineNotStopped", f"stop VirtualMachine {vm.metadata.name} first: a "
                                "template is made from a stopped guest's disk"), None, None, None
        if not volume.status.path or volume.status.node is None or not volume.status.node.exists \
                or volume.status.migration is not None or volume.status.revert is not None:
            return Check.failed("VolumeNotReady", f"Volume {name} is not Ready"), None, None, None
        return Check.passed(), volume.spec.zone, volume.status.path, volume.status.host

    def zones(self, template: Template) -> list[str]:
        if template.spec.zone:
            return [template.spec.zone]
        return sorted({store.spec.zone for store in self.store.list("imagestores")})

    def store_for(self, zone: str):
        stores = [s for s in self.store.by("imagestores", ".spec.zone", zone) if not s.spec.read_only]
        ready = [s for s in stores if s.status.phase == "Ready"]
        return (ready or stores or [None])[0]

    def downloader(self, zone: str, store_name: str, current: str | None) -> str | None:
        candidates = [h for h in self.store.by("hosts", ".status.zone", zone)
                      if h.status.state == HostState.UP and h.status.node
                      and (report := h.status.node.image_stores.get(store_name)) is not None and report.reachable]
        names = sorted(h.metadata.name for h in candidates)
        if current in names:
            return current
        return names[0] if names else None

    def derive(self, template: Template, ctx: inventory.Context) -> TemplateStatus:
        previous = {copy.zone: copy for copy in template.status.zones}
        zones, image, converter = self.zones(template), None, None
        if template.spec.url is None:
            if previous and all(c.state == TemplateState.READY for c in previous.values()):
                zones = list(previous)  # made; the source may change or go now
            else:
                check, zone, image, converter = self.source(template)
                if not check.ok:
                    if ctx.deleting or previous:
                        zones = list(previous)
                    else:
                        return self._status(template, ctx, [], check)
                else:
                    zones = [zone]
        download = template.status.download
        copies: list[TemplateZoneCopy] = []
        active_taken = False
        for zone in zones:
            copy = previous.get(zone)
            store = self.store_for(zone)
            if store is None:
                copies.append(TemplateZoneCopy(zone=zone, image_store="", path="", state=TemplateState.DOWNLOADING,
                                               message=f"zone {zone} has no writable ImageStore"))
                continue
            if copy is None or copy.image_store != store.metadata.name:
                copy = TemplateZoneCopy(zone=zone, image_store=store.metadata.name,
                                        path=copy_path(store.spec.path, template), state=TemplateState.DOWNLOADING,
                                        source=image)
            if ctx.deleting and download is not None and download.deleted and download.zone == zone:
                copy = copy.model_copy(update={"host": None, "message": "files removed"})
            elif download is not None and download.zone == zone and download.host == copy.host \
                    and copy.state == TemplateState.DOWNLOADING:
                copy = copy.model_copy(update={"state": download.state, "download_percent": download.percent,
                                               "message": download.message})
                if download.state == TemplateState.READY and download.detected_format \
                        and download.detected_format.upper() != template.spec.format.value:
                    copy = copy.model_copy(update={
                        "state": TemplateState.ERROR,
                        "message": f"declared {template.spec.format.value} but the image is "
                                   f"{download.detected_format}"})
            if copy.state == TemplateState.DOWNLOADING and not ctx.deleting:
                if active_taken:
                    copy = copy.model_copy(update={"host": None, "message": "waiting for another zone's copy"})
                else:
                    active_taken = True
                    host = self.downloader(zone, store.metadata.name, converter or copy.host)
                    if converter is not None and host != converter:
                        host = None
                    copy = copy.model_copy(update={
                        "host": host,
                        "message": "" if host else f"no Up host in zone {zone} reaches image store "
                                                   f"{store.metadata.name} yet"})
            copies.append(copy)
        return self._status(template, ctx, copies, Check.passed())

    def _status(self, template: Template, ctx: inventory.Context, copies: list[TemplateZoneCopy],
                source: Check) -> TemplateStatus:
        errors = [c for c in copies if c.state == TemplateState.ERROR]
        pending = [c for c in copies if c.state == TemplateState.DOWNLOADING]
        download = template.status.download
        if not source.ok:
            state, check = TemplateState.ERROR, source
        elif errors:
            state = TemplateState.ERROR
            check = Check.failed("DownloadFailed", f"zone {errors[0].zone}: {errors[0].message}")
        elif not copies:
            state, check = TemplateState.DOWNLOADING, Check.failed("NoImageStore", "no zone has an ImageStore yet")
        elif pending:
            state = TemplateState.DOWNLOADING
            check = Check.failed("Downloading", pending[0].message or f"downloading into zone {pending[0].zone}")
        else:
            state, check = TemplateState.READY, Check.passed("Ready", f"stored in {len(copies)} zone(s)")
        ready = first_failure(check)
        done = download if download is not None and download.state == TemplateState.READY else None
        return TemplateStatus(
            observed_generation=template.metadata.generation,
            phase=inventory.phase(ctx, ready, "Ready"),
            conditions=inventory.conditions(template.status.conditions, template.metadata.generation, ctx, ready),
            state=state,
            download_percent=pending[0].download_percent if pending else (100 if state == TemplateState.READY
                                                                          else None),
            detected_format=done.detected_format if done else template.status.detected_format,
            checksum=done.checksum if done else template.status.checksum,
            physical_size_bytes=done.physical_size_bytes if done else template.status.physical_size_bytes,
            virtual_size_bytes=done.virtual_size_bytes if done else template.status.virtual_size_bytes,
            zones=copies,
        )

    async def act(self, template: Template, status: TemplateStatus) -> None:
        # Bind the template to the host downloading it, so that host's agent (label-selected) sees it.
        active = next((c.host for c in status.zones if c.state == TemplateState.DOWNLOADING and c.host), None)
        if template.metadata.labels.get(HOST_LABEL) != active:
            await self.runtime.api.set_label(self.kind, template.metadata.name, template.metadata.namespace,
                                             HOST_LABEL, active)

    async def finalize(self, template: Template) -> bool:
        """The agent that stored each copy removes its files before the Template goes."""
        report = template.status.download
        for copy in template.status.zones:
            if not copy.host or copy.state == TemplateState.DOWNLOADING and not copy.download_percent:
                continue  # nothing was written for this copy
            if report is not None and report.deleted and report.zone == copy.zone:
                continue
            if template.metadata.labels.get(HOST_LABEL) != copy.host:
                await self.runtime.api.set_label(self.kind, template.metadata.name, template.metadata.namespace,
                                                 HOST_LABEL, copy.host)
            return False
        return True
