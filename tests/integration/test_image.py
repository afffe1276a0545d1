"""The container image, run daemonless: cumulo-controller and a simulator cumulo-agent from the image (buildah run,
chroot isolation, the host's network) against a control plane of this module's own; the Zone is reconciled and
the agent's Host comes Up. Also the tools the agent runs are in the image.

Skipped unless buildah is installed and the image was built (`hack/build-image`: a debootstrap base and the
Containerfile through buildah with vfs storage, about 3 minutes; nothing here pulls from a registry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import typing as t
from pathlib import Path

import pytest
import yaml

from privateplane import private_plane_fixtures

control_plane, kube, system_namespace = private_plane_fixtures()

IMAGE = os.environ.get("CUMULO_IMAGE", "localhost/cumulo:dev")
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def image_missing() -> str | None:
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian package buildah; see hack/build-image)"
    if os.geteuid() != 0:
        return "buildah with vfs storage and chroot isolation needs root here"
    probe = subprocess.run([*BUILDAH, "inspect", "--type", "image", IMAGE], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the image {IMAGE} is not built (hack/build-image builds it in about 3 minutes)"
    return None


pytestmark = [pytest.mark.skipif(image_missing() is not None, reason=f"image test skipped: {image_missing()}"),
              pytest.mark.timeout(300)]


class Container:
    """One working container of the image; commands run in it with `buildah run` (chroot isolation)."""

    def __init__(self, name: str, mounts: t.Sequence[Path]):
        subprocess.run([*BUILDAH, "rm", name], capture_output=True)
        self.name = subprocess.run([*BUILDAH, "from", "--name", name, IMAGE], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self.volumes = [arg for path in mounts for arg in ("-v", f"{path}:{path}:ro")]
        self.processes: list[subprocess.Popen] = []

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*BUILDAH, "run", "--isolation", "chroot", *self.volumes, self.name, "--", *argv],
                              capture_output=True, text=True, timeout=60)

    def start(self, log: Path, *argv: str, user: str | None = None) -> subprocess.Popen:
        as_user = ["--user", user] if user else []
        process = subprocess.Popen([*BUILDAH, "run", "--isolation", "chroot", *as_user, *self.volumes, self.name, "--",
                                    *argv],
                                   stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def remove(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        # buildah's chroot child can outlive buildah's process group: end whatever still runs with our files.
        for volume in self.volumes[1::2]:
            subprocess.run(["pkill", "-KILL", "-f", volume.split(":")[0]], capture_output=True)
        subprocess.run([*BUILDAH, "rm", self.name], capture_output=True)


def wait_for(what: str, probe: t.Callable[[], t.Any], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_the_image_runs_the_controller_and_an_agent(control_plane, tmp_path):
    # The controller runs as the image's unprivileged user: its kubeconfig (a throwaway plane's admin) must be
    # readable by it, in a directory it can reach.
    shared = Path(tempfile.mkdtemp(prefix="cumulo-image-"))
    shared.chmod(0o755)
    kubeconfig = shared / "kubeconfig"
    kubeconfig.write_bytes(control_plane.admin_kubeconfig.read_bytes())
    kubeconfig.chmod(0o644)
    container = Container("cumulo-image-test", [shared])
    try:
        tools = container.run("sh", "-c", "id -u; python3 -c 'import libvirt, pyroute2, ovsdbapp, kopf'; "
                                          "qemu-img --version; nft --version; dnsmasq --version; rbd --version; "
                                          "ovs-ofctl --version; ip -V; virsh --version")
        assert tools.returncode == 0, tools.stderr
        assert tools.stdout.splitlines()[0] == "10001"  # unprivileged by default; the chart runs the agent as root

        log = tmp_path / "image.log"
        container.start(log, "timeout", "240", "cumulo-controller", "--kubeconfig", str(kubeconfig),
                        "--metrics-port", "0", "--leader-elect", "--lease-duration", "6", "--renew-deadline", "4",
                        "--retry-period", "1")
        wait_for("the controller in the image to lead", lambda: "leading: primed" in log.read_text(), 90, log)
        control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all([
            {"apiVersion": "cumulo.io/v1alpha1", "kind": "Zone", "metadata": {"name": "img-zone"},
             "spec": {"networkType": "Advanced", "dns1": "192.0.2.53"}},
            {"apiVersion": "cumulo.io/v1alpha1", "kind": "HostPod", "metadata": {"name": "img-pod"},
             "spec": {"zone": "img-zone", "cidr": "10.251.0.0/24", "gateway": "10.251.0.1",
                      "startIp": "10.251.0.10", "endIp": "10.251.0.20"}},
            {"apiVersion": "cumulo.io/v1alpha1", "kind": "Cluster", "metadata": {"name": "img-cluster"},
             "spec": {"pod": "img-pod", "hypervisorType": "Simulator"}},
        ]))
        container.start(log, "timeout", "240", "cumulo-agent", "--kubeconfig", str(kubeconfig), "--host", "img-host",
                        "--hypervisor", "simulator", "--register-cluster", "img-cluster", "--heartbeat-interval", "1",
                        "--metrics-port", "0", "--state-dir", "/tmp/cumulo", user="0:0")  # as the chart runs it

        def host_up() -> bool:
            result = control_plane.kubectl("get", "host", "img-host", "-o", "json", check=False)
            return result.returncode == 0 and (json.loads(result.stdout).get("status") or {}).get("state") == "Up"

        wait_for("the image's agent to bring its Host Up", host_up, 90, log)
    finally:
        container.remove()
        shutil.rmtree(shared, ignore_errors=True)
