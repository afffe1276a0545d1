"""Template images: checksums, format detection and the download of an image (and its boot files) into an
image store.

A download streams ``url`` into ``<path>.partial`` while hashing it, checks the digest, fetches the
direct-kernel-boot files next to it (``<path>.kernel``, ``<path>.initrd``), probes the real format with
``qemu-img info`` (the declared format is never trusted), refuses qcow2 images with a backing file (the
backing file would be a path on the host: reading any host file through a guest), and only then renames
``.partial`` to ``path``: the image exists at ``path`` only when complete and checked. An image whose
detected format differs from the declared one is refused too (the controller would refuse the copy).

The parsing and detection functions are pure; :func:`fetch` is blocking (run it in a thread);
:func:`download_template` orchestrates them with an :class:`~hostagent.executor.Executor` for qemu-img.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import threading
import typing as t
import urllib.error
import urllib.parse
import urllib.request

from .executor import CommandError, ImageInfo, QemuImg

CHUNK = 1024 * 1024
HTTP_TIMEOUT = 30.0
DIGEST_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
DEFAULT_ALGORITHM = "sha256"
ISO_MAGIC_OFFSET = 32769  # "CD001" of the primary volume descriptor (sector 16, byte 1)
ISO_MAGIC = b"CD001"
SUPPORTED_FORMATS = ("QCOW2", "RAW", "ISO")
PARTIAL = ".partial"
KERNEL_SUFFIX = ".kernel"
INITRD_SUFFIX = ".initrd"


class DownloadError(Exception):
    """The download failed; the message is stable (reported in status.download.message)."""


class FormatRefused(DownloadError):
    """The image is of a format (or shape) the cloud does not take; ``detected_format`` says what it is."""

    def __init__(self, detected_format: str, message: str) -> None:
        super().__init__(message)
        self.detected_format = detected_format


class ChecksumError(ValueError):
    """A checksum string that is not ``<algorithm>:<hex>``."""


@dataclasses.dataclass(frozen=True)
class Checksum:
    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def parse_checksum(text: str) -> Checksum:
    """``md5|sha1|sha256|sha512:<lower-case hex>`` (upper-case hex is accepted and lowered)."""
    algorithm, sep, digest = text.strip().partition(":")
    algorithm, digest = algorithm.lower(), digest.lower()
    if not sep or algorithm not in DIGEST_LENGTHS:
        raise ChecksumError(f"checksum {text!r} must be <algorithm>:<hex> with algorithm "
                            f"{', '.join(DIGEST_LENGTHS)}")
    if len(digest) != DIGEST_LENGTHS[algorithm] or any(c not in "0123456789abcdef" for c in digest):
        raise ChecksumError(f"checksum {text!r}: a {algorithm} digest is {DIGEST_LENGTHS[algorithm]} hex digits")
    return Checksum(algorithm, digest)


def is_iso9660(head: bytes) -> bool:
    """Whether ``head`` (the first ≥ 32774 bytes of a file) holds an ISO 9660 volume descriptor."""
    return head[ISO_MAGIC_OFFSET:ISO_MAGIC_OFFSET + len(ISO_MAGIC)] == ISO_MAGIC


def read_head(path: str, size: int = ISO_MAGIC_OFFSET + len(ISO_MAGIC)) -> bytes:
    with open(path, "rb") as file:
        return file.read(size)


@dataclasses.dataclass(frozen=True)
class DetectedFormat:
    format: str            # upper case: QCOW2, RAW, ISO, or qemu's name upper-cased for the unsupported
    error: str | None = None


def detect_format(info: ImageInfo, head: bytes) -> DetectedFormat:
    """The image's real format from ``qemu-img info`` and its first bytes. qemu-img calls an ISO ``raw``;
    its volume descriptor tells it apart. A qcow2 with a backing file is refused."""
    qemu_format = info.format.lower()
    if qemu_format == "raw":
        return DetectedFormat("ISO" if is_iso9660(head) else "RAW")
    if qemu_format == "qcow2":
        if info.backing_file:
            return DetectedFormat("QCOW2", f"refused: the qcow2 image has a backing file ({info.backing_file}); "
                                           "an image must be self-contained (a backing file would expose host "
                                           "files to the guest)")
        return DetectedFormat("QCOW2")
    name = qemu_format.upper() or "UNKNOWN"
    return DetectedFormat(name, f"unsupported image format {qemu_format or 'unknown'}; "
                                f"supported: {', '.join(SUPPORTED_FORMATS)}")


# --------------------------------------------------------------------------------------------
# Fetching


@dataclasses.dataclass
class Progress:
    """Written by the fetching thread, read by the reporter (plain ints: no lock needed)."""

    bytes: int = 0
    total: int | None = None

    @property
    def percent(self) -> int | None:
        if not self.total:
            return None
        return max(0, min(100, self.bytes * 100 // self.total))


class Cancelled(Exception):
    """The download was cancelled (the template went away or changed hands)."""


def _open(url: str) -> tuple[t.BinaryIO, int | None]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: file URLs must be file:///<absolute path>")
        path = urllib.parse.unquote(parsed.path)
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by the caller
        except OSError as error:
            raise DownloadError(f"cannot read {path}: {error.strerror or error}") from None
        return file, os.fstat(file.fileno()).st_size
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "cumulo-agent"})
        try:
            response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)  # noqa: S310 - scheme checked
        except urllib.error.HTTPError as error:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(f"{url}: {reason}") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None
    raise DownloadError(f"{url}: unsupported URL scheme {parsed.scheme!r} (file, http, https)")


def fetch(url: str, destination: str, algorithms: t.Iterable[str], progress: Progress | None = None,
          cancel: threading.Event | None = None) -> dict[str, str]:
    """Copy ``url`` to ``destination`` (blocking), hashing with each of ``algorithms``; the hex digests.
    The file is flushed to disk before returning."""
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in set(algorithms)}
    source, total = _open(url)
    if progress is not None:
        progress.total, progress.bytes = total, 0
    try:
        with source, open(destination, "wb") as out:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                try:
                    chunk = source.read(CHUNK)
                except OSError as error:
                    raise DownloadError(f"{url}: read failed: {error}") from None
                if not chunk:
                    break
                out.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                if progress is not None:
                    progress.bytes += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as error:
        raise DownloadError(f"cannot write {destination}: {error.strerror or error}") from None
    if total is not None and progress is not None and progress.bytes != total:
        raise DownloadError(f"{url}: got {progress.bytes} bytes of {total}")
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def digest_file(path: str, algorithms: t.Iterable[str]) -> dict[str, str]:
    """Hex digests of a file (blocking)."""
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in set(algorithms)}
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def verify(expected: Checksum | None, digests: dict[str, str], what: str) -> None:
    if expected is not None and digests[expected.algorithm] != expected.hexdigest:
        raise DownloadError(f"checksum mismatch for {what}: expected {expected}, got "
                            f"{expected.algorithm}:{digests[expected.algorithm]}")


@dataclasses.dataclass(frozen=True)
class BootFile:
    url: str
    checksum: str | None = None


@dataclasses.dataclass(frozen=True)
class DownloadRequest:
    """One zone copy of a template to download (from ``spec`` and the copy's ``path``)."""

    url: str
    path: str
    checksum: str | None = None
    kernel: BootFile | None = None
    initrd: BootFile | None = None
    declared_format: str | None = None   # spec.format: checked against the detected format
    source_image: str | None = None      # a disk image on this host to convert (templates from snapshots/volumes)

    @classmethod
    def of(cls, spec: t.Mapping[str, t.Any], path: str, source_image: str | None = None) -> DownloadRequest:
        boot = spec.get("directKernelBoot") or {}

        def boot_file(entry: t.Any) -> BootFile | None:
            return BootFile(entry["url"], entry.get("checksum")) if isinstance(entry, t.Mapping) else None

        return cls(url=spec.get("url") or "", path=path, checksum=spec.get("checksum"),
                   kernel=boot_file(boot.get("kernel")), initrd=boot_file(boot.get("initrd")),
                   declared_format=spec.get("format"), source_image=source_image)

    def files(self) -> list[str]:
        """Every file the copy may have left behind."""
        return [self.path + suffix for suffix in ("", PARTIAL, KERNEL_SUFFIX, INITRD_SUFFIX,
                                                  KERNEL_SUFFIX + PARTIAL, INITRD_SUFFIX + PARTIAL)]


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    detected_format: str
    checksum: str
    physical_size_bytes: int
    virtual_size_bytes: int


def copy_files(path: str) -> list[str]:
    """The files a template copy at ``path`` consists of, with its leftovers."""
    return DownloadRequest(url="", path=path).files()


def _remove(paths: t.Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _checksum(text: str | None, what: str) -> Checksum | None:
    if text is None:
        return None
    try:
        return parse_checksum(text)
    except ChecksumError as error:
        raise DownloadError(f"{what}: {error}") from None


async def download_template(request: DownloadRequest, qemu_img: QemuImg, progress: Progress | None = None,
                            cancel: threading.Event | None = None) -> DownloadResult:
    """Download, check and store one template copy (see the module docstring). Raises :class:`DownloadError`
    (or :class:`Cancelled`); nothing but complete, checked files is left behind."""
    expected = _checksum(request.checksum, "spec.checksum")
    algorithm = expected.algorithm if expected else DEFAULT_ALGORITHM
    partial = request.path + PARTIAL
    try:
        os.makedirs(os.path.dirname(request.path), exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create {os.path.dirname(request.path)}: {error.strerror or error}") from None
    try:
        if request.source_image is not None:
            # A snapshot backup or a stopped guest's disk: flattened into a standalone image (no backing file).
            _remove([partial])
            try:
                await qemu_img.convert(request.source_image, partial, output_format=(
                    "raw" if (request.declared_format or "").upper() == "RAW" else "qcow2"))
            except CommandError as error:
                raise DownloadError(f"cannot convert {request.source_image}: {error}") from None
            digests = await asyncio.to_thread(digest_file, partial, {algorithm})
            if progress is not None:
                progress.bytes = progress.total = os.stat(partial).st_size
        else:
            digests = await asyncio.to_thread(fetch, request.url, partial, {algorithm}, progress, cancel)
        verify(expected, digests, "the image")
        for boot, suffix, what in ((request.kernel, KERNEL_SUFFIX, "the kernel"),
                                   (request.initrd, INITRD_SUFFIX, "the initrd")):
            if boot is None:
                _remove([request.path + suffix])
                continue
            boot_expected = _checksum(boot.checksum, f"{what}'s checksum")
            target = request.path + suffix
            boot_digests = await asyncio.to_thread(
                fetch, boot.url, target + PARTIAL, {boot_expected.algorithm if boot_expected else DEFAULT_ALGORITHM},
                None, cancel)
            verify(boot_expected, boot_digests, what)
            os.replace(target + PARTIAL, target)
        try:
            info = await qemu_img.info(partial, force_share=False)
        except CommandError as error:
            raise DownloadError(f"not a disk image qemu-img can read: {error}") from None
        detected = detect_format(info, await asyncio.to_thread(read_head, partial))
        if detected.error is not None:
            raise FormatRefused(detected.format, detected.error)
        declared = (request.declared_format or "").upper()
        if declared and declared != detected.format:
            # The controller refuses the copy too; refusing here keeps the store free of unusable images.
            raise FormatRefused(detected.format, f"declared {declared} but the image is {detected.format}")
        size = os.stat(partial).st_size
        os.replace(partial, request.path)
    except BaseException:
        _remove([partial, request.path + KERNEL_SUFFIX + PARTIAL, request.path + INITRD_SUFFIX + PARTIAL])
        raise
    return DownloadResult(detected_format=detected.format, checksum=f"{algorithm}:{digests[algorithm]}",
                          physical_size_bytes=size,
                          virtual_size_bytes=size if detected.format == "ISO" else info.virtual_size)
