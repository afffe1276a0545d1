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

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, wait_for  # noqa: E402
from cumuloprocess import CumuloProcess, console_script  # noqa: E402
from libvirtcloud import build_zone, template_spec  # noqa: E402
from privateplane import private_plane_fixtures  # noqa: E402


pytest_plugins = ["conftest_libvirt"]
pytestmark = pytest.mark.timeout(420)

control_plane, kube, system_namespace = private_plane_fixtures()

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
    cloud = Cloud(kube)
    rng = random.Random(SEED)
    controller = CumuloProcess("cumulo-controller", [
        console_script("cumulo-controller"), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--metrics-port", "0", "--log-level", "DEBUG"], tmp_path / "controller.log")
    try:
        controller.wait_for_log("reconciling with", timeout=60)
        built, agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path, agent_flags=[
            "--lease-duration", "10", "--stop-timeout", "5", "--vm-resync", "3", "--orphan-sweep", "5"])
        zone, offering, objects = built.name, built.offering, built.objects
        listed = objects.list
        objects.create("templates", "Template", "tiny", template_spec(guest, zone))
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
            objects.create("virtualmachines", "VirtualMachine", name, {"serviceOffering": offering,
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
            objects.delete("virtualmachines", name)
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
