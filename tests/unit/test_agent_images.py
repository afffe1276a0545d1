"""Template images (hostagent.images): checksum parsing, format detection, and the download with a fake executor
standing in for qemu-img."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hostagent import images
from hostagent.executor import CommandError, CommandResult, ImageInfo, QemuImg, SubprocessExecutor, check


class FakeExecutor:
    """Answers ``qemu-img info`` with canned JSON (per file name suffix, else ``default``) and records argv."""

    def __init__(self, default: dict | None = None, returncode: int = 0, stderr: str = "") -> None:
        self.default = default if default is not None else {"format": "qcow2", "virtual-size": 64 << 20,
                                                             "actual-size": 1 << 20}
        self.returncode, self.stderr = returncode, stderr
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str], *, timeout: float = 120.0) -> CommandResult:
        self.calls.append(tuple(argv))
        return CommandResult(tuple(argv), self.returncode, json.dumps(self.default) if not self.returncode else "",
                             self.stderr)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- checksums ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, algorithm", [
    ("md5:" + "a" * 32, "md5"), ("sha1:" + "b" * 40, "sha1"), ("sha256:" + "c" * 64, "sha256"),
    ("sha512:" + "d" * 128, "sha512"), ("SHA256:" + "C" * 64, "sha256"),
])
def test_checksums_parse(text, algorithm):
    checksum = images.parse_checksum(text)
    assert checksum.algorithm == algorithm and checksum.hexdigest == text.split(":")[1].lower()
    assert str(checksum) == f"{algorithm}:{checksum.hexdigest}"


@pytest.mark.parametrize("text, message", [
    ("c" * 64, "must be <algorithm>:<hex>"),
    ("crc32:1234abcd", "must be <algorithm>:<hex>"),
    ("sha256:" + "c" * 63, "a sha256 digest is 64 hex digits"),
    ("md5:" + "g" * 32, "a md5 digest is 32 hex digits"),
])
def test_bad_checksums_say_why(text, message):
    with pytest.raises(images.ChecksumError, match=message):
        images.parse_checksum(text)


# -- format detection ---------------------------------------------------------------------------------


def info(fmt: str, backing: str | None = None) -> ImageInfo:
    return ImageInfo(format=fmt, virtual_size=1 << 30, actual_size=1 << 20, backing_file=backing)


ISO_HEAD = bytes(32769) + b"CD001" + bytes(10)


def test_formats_are_detected_not_declared():
    assert images.detect_format(info("qcow2"), b"QFI\xfb") == images.DetectedFormat("QCOW2")
    assert images.detect_format(info("raw"), bytes(40000)) == images.DetectedFormat("RAW")
    assert images.detect_format(info("raw"), ISO_HEAD) == images.DetectedFormat("ISO")  # qemu-img says raw


def test_a_qcow2_with_a_backing_file_is_refused():
    detected = images.detect_format(info("qcow2", backing="/etc/shadow"), b"")
    assert detected.format == "QCOW2"
    assert detected.error.startswith("refused: the qcow2 image has a backing file (/etc/shadow)")


def test_other_formats_are_refused_by_name():
    detected = images.detect_format(info("vmdk"), b"")
    assert detected.format == "VMDK" and "unsupported image format vmdk" in detected.error


def test_image_info_from_qemu_img_json():
    parsed = ImageInfo.from_json({"format": "qcow2", "virtual-size": 5, "actual-size": 3,
                                  "backing-filename": "base.qcow2", "full-backing-filename": "/p/base.qcow2",
                                  "backing-filename-format": "qcow2"})
    assert parsed == ImageInfo("qcow2", 5, 3, "/p/base.qcow2", "qcow2")


# -- the download -----------------------------------------------------------------------------------


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src" / "image.qcow2"
    path.parent.mkdir()
    path.write_bytes(b"QFI\xfb" + bytes(range(256)) * 9000)
    return path


def test_download_checks_and_stores_the_image_with_boot_files(source, tmp_path):
    kernel, initrd = source.with_name("vmlinuz"), source.with_name("initrd.img")
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initrd" * 100)
    target = tmp_path / "store" / "templates" / "ns" / "t.qcow2"
    request = images.DownloadRequest(
        url=source.as_uri(), path=str(target), checksum=f"sha256:{sha256(source.read_bytes())}",
        kernel=images.BootFile(kernel.as_uri(), f"md5:{hashlib.md5(kernel.read_bytes()).hexdigest()}"),
        initrd=images.BootFile(initrd.as_uri()))
    executor = FakeExecutor()
    progress = images.Progress()
    result = run(images.download_template(request, QemuImg(executor), progress))
    assert result == images.DownloadResult(detected_format="QCOW2", checksum=f"sha256:{sha256(source.read_bytes())}",
                                           physical_size_bytes=source.stat().st_size, virtual_size_bytes=64 << 20)
    assert target.read_bytes() == source.read_bytes()
    assert Path(f"{target}.kernel").read_bytes() == kernel.read_bytes()
    assert Path(f"{target}.initrd").read_bytes() == initrd.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.qcow2", "t.qcow2.initrd", "t.qcow2.kernel"]
    assert progress.bytes == progress.total == source.stat().st_size and progress.percent == 100
    # The format is probed on the partial file, before it becomes the template: never with -f.
    assert executor.calls == [("qemu-img", "info", "--output=json", f"{target}.partial")]


def test_the_reported_checksum_uses_the_given_algorithm(source, tmp_path):
    digest = hashlib.sha1(source.read_bytes()).hexdigest()
    request = images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.qcow2"), checksum=f"sha1:{digest}")
    assert run(images.download_template(request, QemuImg(FakeExecutor()))).checksum == f"sha1:{digest}"


def test_a_checksum_mismatch_names_both_digests_and_leaves_nothing(source, tmp_path):
    target = tmp_path / "t.qcow2"
    wrong = "0" * 64
    request = images.DownloadRequest(url=source.as_uri(), path=str(target), checksum=f"sha256:{wrong}")
    with pytest.raises(images.DownloadError) as caught:
        run(images.download_template(request, QemuImg(FakeExecutor())))
    assert str(caught.value) == (f"checksum mismatch for the image: expected sha256:{wrong}, "
                                 f"got sha256:{sha256(source.read_bytes())}")
    assert list(tmp_path.glob("t.qcow2*")) == []


def test_a_kernel_checksum_mismatch_fails_the_download(source, tmp_path):
    kernel = source.with_name("vmlinuz")
    kernel.write_bytes(b"k")
    request = images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.qcow2"),
                                     kernel=images.BootFile(kernel.as_uri(), "sha256:" + "1" * 64))
    with pytest.raises(images.DownloadError, match="checksum mismatch for the kernel"):
        run(images.download_template(request, QemuImg(FakeExecutor())))
    assert list(tmp_path.glob("t.qcow2*")) == []


def test_a_backing_file_is_refused_after_download(source, tmp_path):
    executor = FakeExecutor({"format": "qcow2", "virtual-size": 1, "backing-filename": "/var/lib/secret.img"})
    request = images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.qcow2"))
    with pytest.raises(images.FormatRefused) as caught:
        run(images.download_template(request, QemuImg(executor)))
    assert caught.value.detected_format == "QCOW2" and "backing file (/var/lib/secret.img)" in str(caught.value)
    assert list(tmp_path.glob("t.qcow2*")) == []


def test_a_declared_format_that_is_not_the_real_one_is_refused(source, tmp_path):
    request = images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.raw"), declared_format="RAW")
    with pytest.raises(images.FormatRefused, match="declared RAW but the image is QCOW2") as caught:
        run(images.download_template(request, QemuImg(FakeExecutor())))
    assert caught.value.detected_format == "QCOW2" and list(tmp_path.glob("t.raw*")) == []


def test_an_iso_reports_its_file_size_as_virtual_size(tmp_path):
    source = tmp_path / "cd.iso"
    source.write_bytes(ISO_HEAD + bytes(5000))
    executor = FakeExecutor({"format": "raw", "virtual-size": 1})
    result = run(images.download_template(images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.iso")),
                                          QemuImg(executor)))
    assert result.detected_format == "ISO" and result.virtual_size_bytes == source.stat().st_size


def test_what_qemu_img_cannot_read_is_an_error(source, tmp_path):
    executor = FakeExecutor(returncode=1, stderr="qemu-img: Could not open 'x': Image is not in qcow2 format\n")
    request = images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.qcow2"))
    with pytest.raises(images.DownloadError, match="qemu-img info failed \\(exit 1\\): qemu-img: Could not open"):
        run(images.download_template(request, QemuImg(executor)))


def test_missing_source_and_bad_urls(tmp_path):
    qemu_img = QemuImg(FakeExecutor())
    with pytest.raises(images.DownloadError, match="cannot read /nope/x.qcow2: No such file or directory"):
        run(images.download_template(images.DownloadRequest(url="file:///nope/x.qcow2", path=str(tmp_path / "t")),
                                     qemu_img))
    with pytest.raises(images.DownloadError, match="unsupported URL scheme 'ftp'"):
        run(images.download_template(images.DownloadRequest(url="ftp://h/x", path=str(tmp_path / "t")), qemu_img))
    with pytest.raises(images.DownloadError, match="file URLs must be file:///"):
        run(images.download_template(images.DownloadRequest(url="file://host/x", path=str(tmp_path / "t")),
                                     qemu_img))


def test_cancelling_stops_the_copy(source, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(images.Cancelled):
        run(images.download_template(images.DownloadRequest(url=source.as_uri(), path=str(tmp_path / "t.qcow2")),
                                     QemuImg(FakeExecutor()), cancel=cancel))
    assert list(tmp_path.glob("t.qcow2*")) == []


@pytest.fixture
def http_server(source):
    directory = str(source.parent)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_with_progress(source, tmp_path, http_server):
    progress = images.Progress()
    request = images.DownloadRequest(url=f"{http_server}/{source.name}", path=str(tmp_path / "t.qcow2"),
                                     checksum=f"sha256:{sha256(source.read_bytes())}")
    run(images.download_template(request, QemuImg(FakeExecutor()), progress))
    assert (tmp_path / "t.qcow2").read_bytes() == source.read_bytes()
    assert progress.total == source.stat().st_size and progress.percent == 100
    with pytest.raises(images.DownloadError, match="HTTP 404"):
        run(images.download_template(images.DownloadRequest(url=f"{http_server}/missing", path=str(tmp_path / "u")),
                                     QemuImg(FakeExecutor())))


# -- the executor ---------------------------------------------------------------------------------------


def test_subprocess_executor_runs_and_times_out():
    executor = SubprocessExecutor(concurrency=2)
    result = run(executor.run(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandError, match="sh failed \\(exit 3\\): err"):
        check(result)
    with pytest.raises(CommandError, match="sleep did not finish within 0.2s"):
        run(executor.run(["sleep", "5"], timeout=0.2))
    with pytest.raises(CommandError, match="cannot run /nonexistent"):
        run(executor.run(["/nonexistent"]))
