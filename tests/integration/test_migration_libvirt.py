"""Live migration of real guests (libvirt/QEMU TCG, the tiny test guest) through the whole stack: two lab hosts h1
and h2 each run a private libvirtd in their own network and mount namespaces, listening for migration peers on
their underlay addresses (cumulo.libvirtd ``listen``); a netns guest on h3 fetches the real guests' HTTP status page
(hostname, boot count, uptime) across the VXLAN network before, during and after each move.

* ``sh``: root disk on a SharedMountPoint pool both hosts see: memory-only live migration.
* ``lo``: root disk on its host's local pool: live migration with block copy into the other host's local pool (the
  disk pre-created by the target's agent); the Volume moves (pool, host, path) and the source file is removed after
  success.

The planner chooses the target (the other libvirt host: the KVM template fits no other). A first attempt for ``lo``
meets a target libvirtd that refuses connections: it fails with libvirt's reason, the guest stays on its source
and the target's disk copy is removed. Each guest keeps its IP and MAC, its service keeps answering, its uptime
keeps growing and its boot count stays 1 (no reboot), and the domain runs on the target's libvirtd only. Slow (two
TCG boots): one test."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import libvirt
import pytest

pytest.register_assert_rewrite("conftest_libvirt", "networkcloud")
from conftest_libvirt import wait_for  # noqa: E402
from networkcloud import ISOLATED_SERVICES, NetworkCloud, tcp  # noqa: E402

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(600)]


def status_page(netns: str, address: str) -> dict[str, str] | None:
    """The guest's /cgi-bin/status (key=value lines), fetched from inside ``netns``."""
    answer = tcp(netns, address, 80, f"GET /cgi-bin/status HTTP/1.0\r\nHost: {address}\r\n\r\n", 3.0)
    if not answer:
        return None
    body = re.split(r"\r?\n\r?\n", answer, maxsplit=1)[-1]
    page = dict(re.findall(r"([\w-]+)=(\S+)", body))
    return page if "uptime" in page else None


class Prober:
    """Polls a guest's status page in the background; records (time, page or None)."""

    def __init__(self, netns: str, address: str) -> None:
        self.netns, self.address = netns, address
        self.answers: list[tuple[float, dict[str, str] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.answers.append((time.monotonic(), status_page(self.netns, self.address)))
            self._stop.wait(0.3)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def longest_gap(self) -> float:
        """The longest time between two answers."""
        times = [at for at, page in self.answers if page is not None]
        return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def domain_ids(uri: str) -> set[str]:
    connection = libvirt.open(uri)
    try:
        return {d.UUIDString() for d in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        connection.close()


def refused_migration(nc: NetworkCloud, name: str, source: str, target: str, daemons: dict) -> None:
    """The target's libvirtd refuses connections (a firewall rule in its namespace): the migration fails with
    libvirt's reason, the guest keeps running on its source only, and the disk prepared on the target goes."""
    lab_target = nc.lab_hosts[target]
    lab_target.exec(["nft", "-f", "-"], input="table inet cumulo_test_block {\n chain input {\n"
                    "  type filter hook input priority 0;\n  tcp dport 16509 reject with tcp reset\n }\n}\n")
    try:
        nc.create("virtualmachinemigrations", "VirtualMachineMigration", f"refused-{name}",
                  {"virtualMachine": {"name": name}, "host": target})
        failed = wait_for(lambda: (s := nc.status("virtualmachinemigrations", f"refused-{name}")).get("phase")
                          in ("Succeeded", "Failed") and s, timeout=120, interval=0.5, what=f"refused-{name} ends")
        assert failed["phase"] == "Failed" and failed["reason"] == "MigrationFailed", failed
        assert "16509" in failed["message"] or "connect" in failed["message"], failed["message"]
        target_copy = Path(failed["plan"]["disks"][0]["targetPath"])
        wait_for(lambda: nc.status("virtualmachinemigrations", f"refused-{name}").get("cleanedUp") is True,
                 what="the target copy removed")
        assert not target_copy.exists()
        vm = wait_for(lambda: (s := nc.status("virtualmachines", name)).get("phase") == "Running" and s,
                      what=f"{name} Running on its source")
        assert vm["placement"]["host"] == source and "migration" not in vm
        uid = nc.get("virtualmachines", name)["metadata"]["uid"]
        assert uid in domain_ids(daemons[source].uri) and uid not in domain_ids(daemons[target].uri)
        print(f"{name}: refused migration failed with: {failed['message']}")
    finally:
        lab_target.exec(["nft", "delete", "table", "inet", "cumulo_test_block"], check=False)


def test_live_migration_of_real_guests_shared_and_block_copy(netlab, cloud, kube, control_plane, agents,
                                                           libvirtd_factory, guest: guestimage.TinyGuest,
                                                           tmp_path: Path) -> None:
    started = time.monotonic()
    storage = tmp_path / "disks"
    nc = NetworkCloud(cloud, kube, control_plane, agents, netlab, tmp_path, hosts=("h3",), storage=storage,
                      image=guest.disk)

    def libvirt_host(short: str) -> str:
        def daemon(netns: str):
            address = next(h.underlay_ip for h in netlab.hosts.values() if h.netns == netns)
            return libvirtd_factory(netns=netns, listen=address)

        return nc.add_host(short, libvirtd=daemon, extra_args=lambda host: ["--private-ip", host.underlay_ip])

    h1, h2 = libvirt_host("h1"), libvirt_host("h2")
    shared_dir = storage / "shared"
    shared_dir.mkdir(parents=True)
    cloud.create("storagepools", f"{nc.cluster}-shared", {"zone": nc.zone, "scope": "Cluster",
                                                          "type": "SharedMountPoint", "cluster": nc.cluster,
                                                          "path": str(shared_dir)})
    shared_offering = f"{nc.offering}-shared"
    cloud.create("serviceofferings", shared_offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 256,
                                                       "storageType": "shared"})
    nc.create("templates", "Template", "tiny", {
        "url": guest.disk.as_uri(), "format": "QCOW2", "zone": nc.zone, "hypervisor": "KVM",
        "checksum": f"sha256:{guest.disk_sha256}",
        "directKernelBoot": {"kernel": {"url": guest.kernel.as_uri()}, "initrd": {"url": guest.initrd.as_uri()},
                             "cmdline": guest.cmdline}})
    wait_for(lambda: nc.status("templates", "tiny").get("state") == "Ready", timeout=60, what="template tiny Ready")
    nc.network("web", nc.network_offering("Isolated", ISOLATED_SERVICES))
    # Not pinned (a pinned guest cannot move): the KVM template fits the two libvirt hosts only.
    nc.vm("sh", ["web"], template={"name": "tiny"}, serviceOffering=shared_offering)
    nc.vm("lo", ["web"], template={"name": "tiny"})
    nc.vm("peer", ["web"], host="h3")
    nc.running("sh", "lo", "peer", timeout=180)
    peer = nc.guest_netns("peer")
    daemons = nc.libvirtds

    for name, block_copy in (("sh", False), ("lo", True)):
        before = nc.status("virtualmachines", name)
        source = before["placement"]["host"]
        target = h2 if source == h1 else h1
        address = nc.nic(name)["ipAddress"]
        first = wait_for(lambda: status_page(peer, address), timeout=240, interval=1,
                         what=f"{name}'s status page from the netns guest")
        assert first["hostname"] == name and first["boot-count"] == "1", first
        root_before = nc.status("volumes", f"{name}-root")
        if block_copy:
            refused_migration(nc, name, source, target, daemons)
        moving_started = time.monotonic()
        with Prober(peer, address) as prober:
            nc.create("virtualmachinemigrations", "VirtualMachineMigration", f"move-{name}",
                      {"virtualMachine": {"name": name}})
            done = wait_for(lambda: (s := nc.status("virtualmachinemigrations", f"move-{name}")).get("phase")
                            in ("Succeeded", "Failed") and s, timeout=240, interval=0.5, what=f"move-{name} ends")
            assert done["phase"] == "Succeeded", done
            moved = wait_for(lambda: (s := nc.status("virtualmachines", name)).get("phase") == "Running"
                             and (s.get("node") or {}).get("host") == target and s, timeout=60,
                             what=f"{name} Running on {target}")
            time.sleep(2)  # a few answers from the target too
        took = time.monotonic() - moving_started
        during = [page for at, page in prober.answers if page is not None]
        assert during, f"{name}: no answer at all while migrating: {prober.answers[-5:]}"
        assert prober.longest_gap() < 15, f"{name}: the service stopped answering for {prober.longest_gap():.1f}s"
        after = wait_for(lambda: status_page(peer, address), timeout=30, what=f"{name}'s page after the move")
        assert float(after["uptime"]) > float(first["uptime"]), (first, after)
        assert after["boot-count"] == "1" and after["instance-id"] == first["instance-id"], after
        # Same IP and MAC; the domain runs on the target's libvirtd only.
        assert moved["nics"] == before["nics"] and moved["placement"]["host"] == target
        uid = nc.get("virtualmachines", name)["metadata"]["uid"]
        assert uid in domain_ids(daemons[target].uri) and uid not in domain_ids(daemons[source].uri)
        assert done["sourceHost"] == source and done["targetHost"] == target
        root = nc.status("volumes", f"{name}-root")
        if block_copy:
            assert [d["volume"] for d in done["plan"]["disks"]] == [f"{name}-root"]
            assert root["host"] == target and root["storagePool"] == f"{target}-local"
            assert root["path"] != root_before["path"] and Path(root["path"]).exists()
            wait_for(lambda: nc.status("virtualmachinemigrations", f"move-{name}").get("cleanedUp") is True,
                     what="the source copy removed")
            assert not Path(root_before["path"]).exists()
            assert moved["launch"]["disks"][0]["path"] == root["path"]
        else:
            assert done["plan"].get("disks", []) == []
            assert root["path"] == root_before["path"] and root["storagePool"] == f"{nc.cluster}-shared"
        print(f"{name}: {'block copy' if block_copy else 'shared storage'} migration {source} -> {target} took "
              f"{took:.1f}s ({done['message']}); longest "
              f"service gap {prober.longest_gap():.1f}s over {len(prober.answers)} probes; uptime "
              f"{first['uptime']} -> {after['uptime']}")
    # Back again, with the source's agent SIGKILLed as the move begins and restarted: the restarted agent finds
    # the hypervisor's state (a job still running is waited for, a domain still here is migrated again) and the
    # guest ends up running on exactly one host, where its placement says.
    back_from = nc.status("virtualmachines", "sh")["placement"]["host"]
    back_to = h1 if back_from == h2 else h2
    agent = nc.agent_processes[back_from]
    nc.create("virtualmachinemigrations", "VirtualMachineMigration", "back-sh", {"virtualMachine": {"name": "sh"}})
    wait_for(lambda: nc.status("virtualmachinemigrations", "back-sh").get("phase") in ("Migrating", "Succeeded",
                                                                                      "Failed"),
             timeout=120, interval=0.05, what="back-sh Migrating")
    agent.kill()
    time.sleep(1)
    agent.start()
    back = wait_for(lambda: (s := nc.status("virtualmachinemigrations", "back-sh")).get("phase")
                    in ("Succeeded", "Failed") and s, timeout=240, interval=0.5, what="back-sh ends")
    vm = wait_for(lambda: (s := nc.status("virtualmachines", "sh")).get("phase") == "Running"
                  and (s.get("node") or {}).get("host") == s["placement"]["host"] and s, timeout=120,
                  what="sh Running where placed")
    uid = nc.get("virtualmachines", "sh")["metadata"]["uid"]
    where = {host for host in (h1, h2) if uid in domain_ids(daemons[host].uri)}
    assert where == {vm["placement"]["host"]}, (where, vm["placement"], back)
    assert back["phase"] == "Succeeded" and vm["placement"]["host"] == back_to, back
    page = wait_for(lambda: status_page(peer, nc.nic("sh")["ipAddress"]), timeout=30, what="sh answering")
    assert page["boot-count"] == "1", page
    print(f"sh: migrated back {back_from} -> {back_to} across a SIGKILL of the source's agent: {back['message']}")
    print(f"total {time.monotonic() - started:.1f}s")
