"""Templates: the agent of the host the controller chose downloads a zone's copy into the image store, and
removes its copies when the Template is deleted; it reports under ``status.download`` (DownloadReport).

The controller labels a Template with the downloading host while a copy is ``Downloading`` (or, while the
Template is being deleted, with the host of the copy whose files must go) and records the copy's path.
:func:`template_action` (pure) decides from the object alone what this agent must do; downloads run as
background tasks (at most ``download_concurrency`` at once), report progress at most once a second, and
are cancelled when the copy changes hands or the Template goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import typing as t

from controllers.api.v1alpha1.template import TemplateState

from .drivers.storage import StorageError
from .images import Cancelled, DownloadError, DownloadRequest, FormatRefused, Progress
from .reconciler import ObjectReconciler

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
"""At most one progress write per download per this many seconds."""


@dataclasses.dataclass(frozen=True)
class CopyRef:
    zone: str
    host: str
    path: str
    state: str
    source: str | None = None


@dataclasses.dataclass(frozen=True)
class TemplateAction:
    """``idle``: nothing to do; ``download``: download ``copy``; ``delete``: remove the files of ``copies`` and
    report ``report`` (the copy the controller waits for) as deleted; ``wait``: a download was reported
    finished and the controller has not taken it in yet."""

    kind: str
    copy: CopyRef | None = None
    copies: tuple[CopyRef, ...] = ()
    report: CopyRef | None = None


def _copies(template: t.Mapping[str, t.Any], hosts: t.Collection[str]) -> list[CopyRef]:
    return [CopyRef(zone=str(c.get("zone", "")), host=str(c["host"]), path=str(c["path"]), state=str(c.get("state")),
                    source=c.get("source"))
            for c in (template.get("status") or {}).get("zones") or []
            if c.get("host") in hosts and c.get("path")]


def template_action(template: t.Mapping[str, t.Any], hosts: t.Collection[str], *,
                    file_exists: t.Callable[[str], bool] = os.path.exists) -> TemplateAction:
    """What this agent (running ``hosts``) must do for ``template`` now. Pure but for ``file_exists``."""
    status = template.get("status") or {}
    report = status.get("download") or {}
    mine = _copies(template, hosts)
    if (template.get("metadata") or {}).get("deletionTimestamp"):
        if not mine:
            return TemplateAction("idle")
        pending = [c for c in mine if not (report.get("deleted") and report.get("zone") == c.zone
                                           and report.get("host") == c.host)]
        return TemplateAction("delete", copies=tuple(mine), report=pending[0] if pending else None)
    active = next((c for c in mine if c.state == TemplateState.DOWNLOADING), None)
    if active is None:
        return TemplateAction("idle")
    if report.get("zone") == active.zone and report.get("host") == active.host and not report.get("deleted"):
        if report.get("state") == TemplateState.ERROR:
            return TemplateAction("wait", copy=active)
        if report.get("state") == TemplateState.READY and file_exists(active.path):
            return TemplateAction("wait", copy=active)
    return TemplateAction("download", copy=active)


def ready_report(copy: CopyRef, result: t.Any, progress: Progress) -> dict[str, t.Any]:
    return {"zone": copy.zone, "host": copy.host, "state": TemplateState.READY.value, "percent": 100,
            "bytes": progress.bytes, "message": "", "detectedFormat": result.detected_format,
            "checksum": result.checksum, "physicalSizeBytes": result.physical_size_bytes,
            "virtualSizeBytes": result.virtual_size_bytes, "deleted": False}


def progress_report(copy: CopyRef, progress: Progress, message: str = "") -> dict[str, t.Any]:
    return {"zone": copy.zone, "host": copy.host, "state": TemplateState.DOWNLOADING.value,
            "percent": progress.percent if progress.total else None, "bytes": progress.bytes, "message": message,
            "deleted": False}


def error_report(copy: CopyRef, progress: Progress, message: str, detected_format: str | None = None) -> dict[str, t.Any]:
    return {"zone": copy.zone, "host": copy.host, "state": TemplateState.ERROR.value,
            "percent": progress.percent if progress.total else None, "bytes": progress.bytes, "message": message,
            "detectedFormat": detected_format, "deleted": False}


@dataclasses.dataclass
class Download:
    copy: CopyRef
    progress: Progress = dataclasses.field(default_factory=Progress)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


class TemplateReconciler(ObjectReconciler):
    kind = "Template"
    plural = "templates"
    status_key = "download"

    def __init__(self, agent: t.Any, *, download_concurrency: int = 2, **kwargs: t.Any) -> None:
        super().__init__(agent, **kwargs)
        self._slots = asyncio.Semaphore(download_concurrency)
        self.downloads: dict[str, Download] = {}
        # The last finished download's report per template: if writing it failed, the next round writes
        # it again instead of downloading again.
        self.finished: dict[str, tuple[CopyRef, dict[str, t.Any]]] = {}

    def _cancel(self, key: str) -> None:
        download = self.downloads.pop(key, None)
        if download is not None:
            download.cancel.set()
            if download.task is not None:
                download.task.cancel()
            log.info("download cancelled", extra={"object": key, "zone": download.copy.zone})

    async def reconcile(self, key: str, template: dict[str, t.Any] | None) -> float | None:
        if template is None:
            self._cancel(key)
            self.forget_states(key)
            self.finished.pop(key, None)
            return None
        action = template_action(template, self.hosts)
        if action.kind == "delete":
            self._cancel(key)
            return await self._delete(key, template, action)
        if action.kind == "download":
            assert action.copy is not None
            running = self.downloads.get(key)
            if running is not None and running.copy == action.copy:
                return None
            finished = self.finished.get(key)
            if finished is not None and finished[0] == action.copy and (
                    finished[1]["state"] == TemplateState.ERROR or os.path.exists(action.copy.path)):
                await self.report(key, template, finished[1])
                return None
            self._cancel(key)
            download = Download(action.copy)
            self.downloads[key] = download
            download.task = asyncio.create_task(self._download(key, template, download), name=f"download-{key}")
            return None
        if action.kind == "idle":
            self._cancel(key)
        return None

    async def _delete(self, key: str, template: dict[str, t.Any], action: TemplateAction) -> float | None:
        for copy in action.copies:
            worker = self.worker(copy.host)
            if worker is None:
                continue
            try:
                await worker.storage.delete_template(copy.path)
            except StorageError as error:
                self.transition(key, "delete", str(error), logging.WARNING, "cannot remove a template copy",
                                error=str(error))
                return self.queue.backoff(key)
            self.transition(key, f"delete {copy.zone}", "done", logging.INFO, "template copy removed", path=copy.path)
        if action.report is not None:
            previous = (template.get("status") or {}).get("download") or {}
            state = previous.get("state") if previous.get("zone") == action.report.zone else action.report.state
            await self.report(key, template, {"zone": action.report.zone, "host": action.report.host,
                                              "state": state or action.report.state, "deleted": True})
        return None

    async def _download(self, key: str, template: dict[str, t.Any], download: Download) -> None:
        copy = download.copy
        worker = self.worker(copy.host)
        try:
            assert worker is not None
            request = DownloadRequest.of(template.get("spec") or {}, copy.path, copy.source)
            if self._slots.locked():
                await self._report_current(key, progress_report(copy, download.progress, "waiting for a download "
                                                                                        "slot"))
            async with self._slots:
                started = time.monotonic()
                log.info("download started", extra={"object": key, "zone": copy.zone, "url": request.url,
                                                    "path": copy.path})
                await self._report_current(key, progress_report(copy, download.progress))
                transfer = asyncio.create_task(worker.storage.download_template(request, download.progress,
                                                                               download.cancel))
                reported = download.progress.bytes
                try:
                    while True:
                        done, _ = await asyncio.wait([transfer], timeout=PROGRESS_INTERVAL)
                        if done:
                            break
                        if download.progress.bytes != reported:
                            reported = download.progress.bytes
                            await self._report_current(key, progress_report(copy, download.progress))
                    result = transfer.result()
                finally:
                    if not transfer.done():
                        download.cancel.set()
                        transfer.cancel()
                        await asyncio.gather(transfer, return_exceptions=True)
            log.info("download finished", extra={"object": key, "zone": copy.zone, "format": result.detected_format,
                                                 "bytes": download.progress.bytes,
                                                 "seconds": round(time.monotonic() - started, 2)})
            await self._finish(key, copy, ready_report(copy, result, download.progress))
        except (Cancelled, asyncio.CancelledError):
            pass
        except FormatRefused as error:
            log.warning("download refused", extra={"object": key, "zone": copy.zone, "error": str(error)})
            await self._finish(key, copy, error_report(copy, download.progress, str(error), error.detected_format))
        except DownloadError as error:
            log.warning("download failed", extra={"object": key, "zone": copy.zone, "error": str(error)})
            await self._finish(key, copy, error_report(copy, download.progress, str(error)))
        except Exception:
            log.exception("download failed", extra={"object": key, "zone": copy.zone})
            await self._finish(key, copy, error_report(copy, download.progress, "internal error of the agent "
                                                                                "(see its log)"))
        finally:
            if self.downloads.get(key) is download:
                del self.downloads[key]

    async def _finish(self, key: str, copy: CopyRef, value: dict[str, t.Any]) -> None:
        self.finished[key] = (copy, value)
        await self._report_current(key, value)
        self.queue.add(key, 5.0)  # make sure the final report got through

    async def _report_current(self, key: str, value: dict[str, t.Any]) -> None:
        """Report against the object as the cache has it now (the download outlives the event it began on)."""
        template = self.informer.cache.get(key)
        if template is None:
            return
        try:
            await self.report(key, template, value)
        except Exception as error:  # a failed progress write must not end the download; the next one retries
            log.warning("download report failed", extra={"object": key, "error": str(error)})
