"""Crash safety on real libvirt: four tiny TCG guests started and deleted at once on one private libvirtd while
the agent and the controller are SIGKILLed and restarted at seeded random points (the simulator-scale run is
test_chaos.py). Each guest ends Running with one domain that was never started twice (its libvirt run id never
changes: an agent restart adopts, it does not reboot or duplicate), and after the deletes no domain, Volume or
disk file is left."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from cumuloprocess import CumuloProcess, console_script  # noqa: E402
from privateplane import private_plane_fixtures  # noqa: E402


pytest_plugins = ["conftest_libvirt"]
pytestmark = pytest.mark.timeout(420)

control_plane, kube, system_namespace = private_plane_fixtures()

GROUP, VERSION = "cumulo.io", "v1alpha1"
SEED = 1
GUESTS = 4


def run_ids(uri: str) -> dict[str, int]:
    """uuid -> libvirt run id of every active domain of the daemon."""
    import libvirt

    connection = libvirt.open(uri)
    try:
        ids = {}
        # The listing is a snapshot; a domain undefined while it is read (the deletes) is not an error.
        for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                ids[domain.UUIDString()] = domain.ID()
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return ids
    finally:
        connection.close()


def test_libvirt_guests_survive_agent_and_controller_kills(control_plane, kube, system_namespace, agents, libvirtd,
                                                          guest, tmp_path: Path) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube)
    cloud = Cloud(kube)
    rng = random.Random(SEED)
    controller = CumuloProcess("cumulo-controller", [
        console_script("cumulo-controller"), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--metrics-port", "0", "--log-level", "DEBUG"], tmp_path / "controller.log")
    try:
        controller.wait_for_log("reconciling with", timeout=60)
        zone, pod, cluster, host = unique("zone"), unique("pod"), unique("kvm"), unique("kvmhost")
        cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53", "localStorageEnabled": True})
        cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.252.0.0/24", "gateway": "10.252.0.1",
                                       "startIp": "10.252.0.10", "endIp": "10.252.0.20"})
        cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "KVM", "cpuOvercommitRatio": 4.0})
        cloud.create("hosts", host, {"cluster": cluster})
        pool_path, store_path = tmp_path / "pool", tmp_path / "store"
        store_path.mkdir()
        cloud.create("storagepools", f"{host}-local", {"zone": zone, "scope": "Host", "type": "Filesystem",
                                                       "host": host, "path": str(pool_path)})
        cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": str(store_path)})
        offering = unique("tiny")
        cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128,
                                                    "storageType": "local"})
        namespace = unique("chaos")
        control_plane.kubectl("create", "namespace", namespace)
        args = ["--host", host, "--libvirt-uri", libvirtd.uri, "--network-driver", "simulator",
                "--heartbeat-interval", "1", "--lease-duration", "10", "--state-dir", str(tmp_path / "state"),
                "--stop-timeout", "5", "--vm-resync", "3", "--orphan-sweep", "5"]
        agent = agents.start(host, *args)
        wait_for(lambda: (cloud.get("hosts", host).get("status") or {}).get("state") == "Up", timeout=60,
                 what=f"host {host} Up")

        def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
                "metadata": {"name": name, "namespace": namespace}, "spec": spec})

        def listed(plural: str) -> list[dict[str, Any]]:
            return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]

        create("templates", "Template", "tiny", {
            "url": guest.disk.as_uri(), "format": "QCOW2", "zone": zone, "checksum": f"sha256:{guest.disk_sha256}",
            "directKernelBoot": {
                "kernel": {"url": guest.kernel.as_uri(), "checksum": f"sha256:{guest.kernel_sha256}"},
                "initrd": {"url": guest.initrd.as_uri(), "checksum": f"sha256:{guest.initrd_sha256}"},
                "cmdline": guest.cmdline}})
        wait_for(lambda: next((t for t in listed("templates")), {}).get("status", {}).get("state") == "Ready",
                 timeout=90, what="the template Ready")

        seen: dict[str, set[int]] = {}

        def sample() -> None:
            for uuid, run_id in run_ids(libvirtd.uri).items():
                seen.setdefault(uuid, set()).add(run_id)

        def crash(process: str, after: float) -> None:
            """Wait ``after`` seconds (sampling the domains), SIGKILL the process, restart it shortly after."""
            nonlocal agent
            deadline = time.monotonic() + after
            while time.monotonic() < deadline:
                sample()
                time.sleep(0.2)
            print(f"kill {process} at +{after:.1f}s")
            if process == "agent":
                agent.kill()
                time.sleep(rng.uniform(0.3, 2.0))
                agent.start()
            else:
                controller.restart(kill=True)
                time.sleep(rng.uniform(0.3, 2.0))

        def all_vms(check) -> bool:
            sample()
            vms = listed("virtualmachines")
            return len(vms) == GUESTS and all(check(vm) for vm in vms)

        # Starts: all guests at once, the agent killed while it starts them, then the controller.
        started = time.monotonic()
        names = [f"vm{i}" for i in range(GUESTS)]
        for name in names:
            create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offering,
                                                               "template": {"name": "tiny"}, "zone": zone})
        for process in rng.sample(["agent", "controller"], 2):
            crash(process, rng.uniform(0.5, 4.0))
        wait_for(lambda: all_vms(lambda vm: (vm.get("status") or {}).get("phase") == "Running"), timeout=150,
                 interval=0.5, what=f"{GUESTS} guests Running")
        print(f"{GUESTS} guests Running {time.monotonic() - started:.0f} s after the creates")
        vms = {vm["metadata"]["uid"]: vm for vm in listed("virtualmachines")}
        domains = run_ids(libvirtd.uri)
        assert set(domains) == set(vms), f"domains {domains} for guests {sorted(vms)}"
        twice = {uuid: ids for uuid, ids in seen.items() if len(ids) > 1}
        assert not twice, f"domains started more than once (libvirt run ids): {twice}"
        disks = [disk["path"] for vm in vms.values() for disk in vm["status"]["launch"]["disks"]]
        assert disks and all(Path(path).exists() for path in disks)

        # Deletes: all guests at once, the controller and the agent killed meanwhile.
        started = time.monotonic()
        for name in names:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", name)
        for process in rng.sample(["agent", "controller"], 2):
            crash(process, rng.uniform(0.2, 2.0))
        wait_for(lambda: not listed("virtualmachines") and not listed("volumes"), timeout=120, interval=0.5,
                 what="guests and volumes gone")
        print(f"{GUESTS} guests gone {time.monotonic() - started:.0f} s after the deletes")
        wait_for(lambda: not run_ids(libvirtd.uri), timeout=30, what="no domain left")
        assert not [path for path in disks if Path(path).exists()]
        assert agent.alive() and controller.popen.poll() is None
    finally:
        controller.stop()
        print("controller log tail:\n" + "\n".join(controller.log().splitlines()[-20:]), file=sys.stderr)
