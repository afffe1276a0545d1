"""Real guest: ``kubectl apply`` of a VirtualMachine → the tiny TCG guest's boot marker on its serial console,
against the same guest started directly with libvirt in the same run. Target: Cumulo's overhead <= 1.5 s
(median of the differences). Several runs of each, alternated; median and spread.

What runs: the envtest control plane, the production controller, a real ``cumulo-agent`` driving a private
libvirtd (QEMU/TCG; cumulo.libvirtd) with the filesystem storage driver, and the tiny guest of
cumulo.guestimage (direct kernel boot, root disk overlay on the pool's copy of the template). The direct run
creates the same kind of qcow2 overlay with qemu-img and defines the same domain shape (the agent's own
domain XML renderer, 1 vCPU, 128 MiB, no NICs) with ``createXML``; its clock starts before qemu-img, as the
Cumulo run's starts before kubectl. Each guest is destroyed before the next run (2 cores: one TCG guest at
a time).

    .venv/bin/python benchmarks/real_guest.py [--runs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from benchmarks.common import REPO, record  # noqa: E402
from benchmarks.simcloud import BIN, CONTROLLER_USER, GROUP, VERSION, Process, unique  # noqa: E402
from benchmarks.simcloud import mint_agent_kubeconfig  # noqa: E402
from cumulo import envtest, guestimage  # noqa: E402
from cumulo.libvirtd import PrivateLibvirtd, unavailable_reason  # noqa: E402

BOOT_TIMEOUT = 120.0


def wait(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def marker_in(path: Path | str) -> bool:
    try:
        return guestimage.BOOT_MARKER in Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return False


def direct_boot(libvirtd: PrivateLibvirtd, guest: guestimage.TinyGuest, workdir: Path) -> float:
    """Seconds from nothing to the boot marker, with qemu-img and libvirt only."""
    import libvirt

    from hostagent.drivers.hypervisor import DiskDevice, DomainDescription, DomainOwner, domainxml

    uid = str(uuid.uuid4())
    disk, console = workdir / f"{uid}.qcow2", workdir / f"{uid}.log"
    owner = DomainOwner(namespace="bench", name="direct", uid=uid, host="direct",
                        started_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    started = time.monotonic()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(guest.disk), str(disk)],
                   check=True)
    description = DomainDescription(uuid=uid, name=f"direct-{uid[:8]}", owner=owner, cpus=1, memory_mib=128,
                                    cpu_shares=100, disks=(DiskDevice("root", str(disk), "vda"),),
                                    kernel=str(guest.kernel), initrd=str(guest.initrd), cmdline=guest.cmdline,
                                    console_log=str(console))
    connection = libvirt.open(libvirtd.uri)
    try:
        domain = connection.createXML(domainxml.render(description), 0)
        wait(lambda: marker_in(console), BOOT_TIMEOUT, "the directly started guest's boot marker")
        took = time.monotonic() - started
        domain.destroy()
    finally:
        connection.close()
    return took


class Cloud:
    def __init__(self, workdir: Path, libvirtd: PrivateLibvirtd, guest: guestimage.TinyGuest) -> None:
        self.workdir, self.libvirtd, self.guest = workdir, libvirtd, guest
        self.plane = envtest.ControlPlane(workdir / "plane")
        self.processes: list[Process] = []

    def start(self) -> None:
        plane = self.plane
        plane.start()
        plane.install_crds(REPO / "crds")
        self.api = plane.api_client()
        self.custom = client.CustomObjectsApi(self.api)
        plane.kubectl("create", "namespace", "cumulo-system")
        kubeconfig = plane.mint_kubeconfig(CONTROLLER_USER, ["system:masters"], self.workdir / "controller.kubeconfig")
        controller = Process("cumulo-controller", [str(BIN / "cumulo-controller"), "--kubeconfig", str(kubeconfig),
                                                   "--metrics-port", "0"], self.workdir / "controller.log")
        self.processes.append(controller)
        wait(lambda: "reconciling with" in controller.log(), 60, "the controller started", interval=0.2)
        zone, pod, cluster, self.host = unique("zone"), unique("pod"), unique("kvm"), unique("kvmhost")
        self.zone, self.offering, self.namespace = zone, unique("tiny"), unique("bench")
        pool = self.workdir / "pool"
        store = self.workdir / "store"
        store.mkdir()
        for plural, kind, name, spec in [
            ("zones", "Zone", zone, {"networkType": "Advanced", "dns1": "192.0.2.53", "localStorageEnabled": True}),
            ("hostpods", "HostPod", pod, {"zone": zone, "cidr": "10.252.0.0/24", "gateway": "10.252.0.1",
                                          "startIp": "10.252.0.10", "endIp": "10.252.0.20"}),
            ("clusters", "Cluster", cluster, {"pod": pod, "hypervisorType": "KVM", "cpuOvercommitRatio": 4.0}),
            ("hosts", "Host", self.host, {"cluster": cluster}),
            ("storagepools", "StoragePool", unique("local"), {"zone": zone, "scope": "Host", "type": "Filesystem",
                                                              "host": self.host, "path": str(pool)}),
            ("imagestores", "ImageStore", unique("store"), {"zone": zone, "type": "Filesystem", "path": str(store)}),
            ("serviceofferings", "ServiceOffering", self.offering, {"cpuNumber": 1, "cpuSpeedMHz": 500,
                                                                    "memoryMiB": 128, "storageType": "local"}),
        ]:
            self.custom.create_cluster_custom_object(GROUP, VERSION, plural, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})
        plane.kubectl("create", "namespace", self.namespace)
        agent_kubeconfig, _ = mint_agent_kubeconfig(plane, self.host, self.workdir / "agent.kubeconfig")
        self.processes.append(Process("cumulo-agent", [
            str(BIN / "cumulo-agent"), "--kubeconfig", str(agent_kubeconfig), "--host", self.host, "--libvirt-uri",
            self.libvirtd.uri, "--network-driver", "simulator", "--state-dir", str(self.workdir / "state"),
            "--metrics-port", "0", "--log-level", "warning"], self.workdir / "agent.log"))
        wait(lambda: (self.get_cluster("hosts", self.host).get("status") or {}).get("state") == "Up", 60,
             "the host Up", interval=0.2)
        guest = self.guest
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "templates", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Template", "metadata": {"name": "tiny"}, "spec": {
                "url": guest.disk.as_uri(), "format": "QCOW2", "zone": zone, "checksum": f"sha256:{guest.disk_sha256}",
                "directKernelBoot": {
                    "kernel": {"url": guest.kernel.as_uri(), "checksum": f"sha256:{guest.kernel_sha256}"},
                    "initrd": {"url": guest.initrd.as_uri(), "checksum": f"sha256:{guest.initrd_sha256}"},
                    "cmdline": guest.cmdline}}})
        wait(lambda: (self.get("templates", "tiny").get("status") or {}).get("state") == "Ready", 120,
             "the template Ready", interval=0.2)

    def get_cluster(self, plural: str, name: str) -> dict:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)

    def get(self, plural: str, name: str) -> dict:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    def boot(self, name: str) -> tuple[float, float]:
        """(seconds to the boot marker, seconds to phase Running) of a guest applied with kubectl."""
        manifest = (f"apiVersion: {GROUP}/{VERSION}\nkind: VirtualMachine\nmetadata:\n  name: {name}\n"
                    f"  namespace: {self.namespace}\nspec:\n  serviceOffering: {self.offering}\n  zone: {self.zone}\n"
                    "  template:\n    name: tiny\n")
        started = time.monotonic()
        self.plane.kubectl("apply", "-f", "-", input=manifest)
        seen: dict[str, float] = {}

        def look() -> bool:
            status = self.get("virtualmachines", name).get("status") or {}
            if status.get("phase") == "Running":
                seen.setdefault("running", time.monotonic() - started)
            console = (status.get("node") or {}).get("consoleLog")
            if "marker" not in seen and console and marker_in(console):
                seen["marker"] = time.monotonic() - started
            return len(seen) == 2

        wait(look, BOOT_TIMEOUT, "phase Running and the boot marker")
        took, running = seen["marker"], seen["running"]
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualmachines", name)
        wait(lambda: not self.get("virtualmachines", name), 120, "the guest deleted", interval=0.2)
        return took, running

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    missing = unavailable_reason() or next((f"{tool} is not installed" for tool in ("qemu-system-x86_64", "qemu-img")
                                            if shutil.which(tool) is None), None)
    if missing:
        record("Real guest: kubectl apply → boot marker", [f"not run: {missing}"], write=not args.no_write)
        return 0
    guest = guestimage.ensure_tiny_guest()
    workdir = Path(tempfile.mkdtemp(prefix="cumulo-bench-guest-"))
    cumulo, running, direct = [], [], []
    try:
        with PrivateLibvirtd(workdir / "libvirtd") as libvirtd:
            cloud = Cloud(workdir, libvirtd, guest)
            try:
                cloud.start()
                direct_dir = workdir / "direct"
                direct_dir.mkdir()
                for run in range(args.runs):
                    direct.append(direct_boot(libvirtd, guest, direct_dir))
                    took, phase = cloud.boot(f"guest-{run}")
                    cumulo.append(took)
                    running.append(phase)
            finally:
                cloud.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    overhead = [c - d for c, d in zip(cumulo, direct)]

    def spread(values: list[float]) -> str:
        return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"

    lines = [f"kubectl apply → boot marker through Cumulo: {spread(cumulo)}; phase Running at {spread(running)}",
             f"the same guest started directly (qemu-img overlay + libvirt createXML): {spread(direct)}",
             f"Cumulo's overhead: {spread(overhead)} (target <= 1.5 s); {args.runs} alternated runs of each, tiny "
             "TCG guest (1 vCPU, 128 MiB, direct kernel boot) on a private libvirtd; machine shared with other "
             "engineers' test runs"]
    record("Real guest: kubectl apply → boot marker", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
