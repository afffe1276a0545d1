"""HA on real libvirt: two private libvirtds in lab host namespaces share a SharedMountPoint directory holding an HA
guest's root disk. The test plays the controller (a private plane: it writes the placement itself) so that it can
check each agent-side step on the real thing:

* both agents write their storage heartbeat files on the shared pool; asked to investigate, host 2 reads host 1's
  as fresh;
* host 1's agent hangs (SIGSTOP) while its guest keeps writing its disk: host 2 reports the guest's activity (the
  host must not be taken for dead); it resumes without harm;
* host 1's agent is cut off from the API (its connection goes through a proxy the test closes) and from the pool
  (the directory is remounted read-only in the agent's own mount namespace; its QEMU still writes the disk): it
  fences itself, destroying the guest's real domain, and host 2 reads its heartbeat as stale;
* the guest placed on host 2 starts there on the same disk file (QEMU's image lock proves host 1's domain is gone);
* host 1 reconnects: it does not start the guest again, and the disk file is untouched and used by host 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("conftest_libvirt", "netguests")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402
from netguests import Guests  # noqa: E402

from controllers.api.v1alpha1.host import investigate_annotation  # noqa: E402
from cumulo import guestimage  # noqa: E402
from cumulo.netlab import NetLab  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
control_plane, kube, system_namespace = private_plane_fixtures()
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(300)]

AGENT = Path(sys.executable).with_name("cumulo-agent")


class Proxy:
    """A TCP forwarder to the apiserver that the test can cut (every connection closed) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets = []


def domain_names(uri: str) -> list[str]:
    import libvirt

    connection = libvirt.open(uri)
    try:
        names = []
        for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                names.append(domain.name())
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return names
    finally:
        connection.close()


def test_fenced_libvirt_host_hands_its_ha_guest_over(kube, control_plane, agents, netlab: NetLab, libvirtd_factory,
                                                    guest: guestimage.TinyGuest, tmp_path: Path) -> None:
    cloud = Cloud(kube)
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    lv1, lv2 = libvirtd_factory(netns=h1.netns), libvirtd_factory(netns=h2.netns)
    host1, host2, cluster, zone = unique("ha1"), unique("ha2"), unique("cl"), unique("zone")
    shared = tmp_path / "shared"
    shared.mkdir()
    pool = unique("nfs")
    cloud.create("storagepools", pool, {"zone": zone, "scope": "Cluster", "cluster": cluster,
                                        "type": "SharedMountPoint", "path": str(shared)})
    common = ["--hypervisor", "libvirt", "--network-driver", "linuxbridge", "--storage-driver", "filesystem",
              "--register-cluster", cluster, "--heartbeat-interval", "1", "--lease-duration", "4",
              "--storage-heartbeat-interval", "1", "--fence-after", "5", "--vm-resync", "2", "--orphan-sweep", "3",
              "--metrics-port", "0"]

    # Host 1's agent: through a proxy, and in a mount namespace of its own where the pool is a bind mount.
    kubeconfig, _ = agents.kubeconfig(host1)
    config = yaml.safe_load(kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    address, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = Proxy((address, int(port)))
    proxy.start()
    config["clusters"][0]["cluster"]["server"] = f"https://{address}:{proxy.port}"
    proxied = tmp_path / "host1-proxied.kubeconfig"
    proxied.write_text(yaml.safe_dump(config))
    args1 = [str(AGENT), "--kubeconfig", str(proxied), "--host", host1, "--libvirt-uri", lv1.uri, "--host-netns",
             h1.netns, "--state-dir", str(tmp_path / "a1"), *common]
    log1 = (tmp_path / "agent1.log").open("ab")
    agent1 = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         f'mount --bind "$0" "$0" && exec "$@"', str(shared), *args1],
        stdout=log1, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def in_agent1(*command: str) -> bool:
        return subprocess.run(["nsenter", "-t", str(agent1.pid), "-m", *command], capture_output=True).returncode == 0

    try:
        agents.start(host2, "--host", host2, "--libvirt-uri", lv2.uri, "--host-netns", h2.netns,
                     "--state-dir", str(tmp_path / "a2"), *common)
        for host in (host1, host2):
            wait_for(lambda h=host: cloud.node(h), timeout=60, what=f"{host} reporting")
            cloud.patch_status("hosts", host, {"zone": zone})  # the controller's field; no controller here
        beat1, beat2 = shared / ".cumulo-heartbeat" / host1, shared / ".cumulo-heartbeat" / host2
        wait_for(lambda: beat1.exists() and beat2.exists(), timeout=30, what="both storage heartbeat files")
        first = float(beat1.read_text())
        wait_for(lambda: float(beat1.read_text()) > first, timeout=10, what="host 1's heartbeat refreshed")

        # The HA guest on host 1, its root disk on the shared pool.
        root = shared / "ha-root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", guest.disk_format, "-b", str(guest.disk),
                        str(root)], check=True)
        disk = {"volume": "ha-root", "device": "vda", "pool": pool, "poolType": "SharedMountPoint",
                "path": str(root), "format": "qcow2", "sizeBytes": guest.disk_virtual_size}
        extra = {"disks": [disk], "kernelPath": str(guest.kernel), "initrdPath": str(guest.initrd),
                 "kernelCmdline": guest.cmdline, "memoryMiB": guest.min_memory_mib, "haEnabled": True}
        guests = Guests(kube, control_plane)
        guests.create("ha", host1, [], extra=extra)
        wait_for(lambda: guests.node("ha").get("domainState") == "running", timeout=90,
                 what="the HA guest running on host 1")
        assert len(domain_names(lv1.uri)) == 1

        # Host 2 investigates host 1: fresh.
        request = {"host": host1, "staleAfterSeconds": 4,
                   "pools": [{"name": pool, "type": "SharedMountPoint", "path": str(shared)}]}
        cloud.patch("hosts", host2, {"metadata": {"annotations": {investigate_annotation(host1): json.dumps(request)}}})

        def answer() -> dict:
            return ((cloud.node(host2) or {}).get("investigations") or {}).get(host1, {}).get(pool, {})

        wait_for(lambda: answer().get("fresh") is True, timeout=30, what="host 2 reading a fresh heartbeat")

        # Host 1's agent hangs (SIGSTOP): both its heartbeats stop and nothing fences, but its guest still writes
        # its disk (the test touches the file as a write would): host 2 reports guest activity, so the host must not
        # be taken for dead.
        request["pools"][0]["disks"] = [str(root)]
        cloud.patch("hosts", host2, {"metadata": {"annotations": {investigate_annotation(host1): json.dumps(request)}}})
        os.kill(agent1.pid, signal.SIGSTOP)
        try:
            def written() -> dict:
                os.utime(root)
                return answer()

            seen = wait_for(lambda: (a := written()).get("guestActivity") and a, timeout=30,
                            what="host 2 seeing the guest's disk written after host 1 should have fenced")
            assert seen["fresh"] is False and str(root) in seen["guestActivity"]
        finally:
            os.kill(agent1.pid, signal.SIGCONT)
        wait_for(lambda: answer().get("fresh") is True and "guestActivity" not in answer(), timeout=30,
                 what="host 1 writing its heartbeat again after the hang")
        assert guests.node("ha").get("domainState") == "running" and len(domain_names(lv1.uri)) == 1

        # Host 1 is cut off from the API and from the pool: it fences itself, host 2 reads the heartbeat stale.
        cut = time.monotonic()
        proxy.cut()
        # A read-only remount fails while a file is open for writing (a heartbeat being written): retry.
        wait_for(lambda: in_agent1("mount", "-o", "remount,bind,ro", str(shared)), timeout=10, interval=0.05,
                 what="the pool read-only for host 1's agent")
        wait_for(lambda: not domain_names(lv1.uri), timeout=30, what="host 1's agent destroying its HA domain")
        fenced_after = time.monotonic() - cut
        wait_for(lambda: answer().get("fresh") is False and answer().get("readable") is True, timeout=30,
                 what="host 2 reading a stale heartbeat")
        assert answer().get("lastWrite")
        assert root.exists()

        # The controller's step: the guest placed on host 2. It starts there on the same disk.
        cloud.custom.patch_namespaced_custom_object(
            "cumulo.io", "v1alpha1", guests.namespace, "virtualmachines", "ha",
            {"metadata": {"labels": {"cumulo.io/host": host2}}})
        guests.launch("ha", host2, [], extra=extra)
        wait_for(lambda: (n := guests.node("ha")).get("host") == host2 and n.get("domainState") == "running",
                 timeout=90, what="the HA guest running on host 2")
        assert len(domain_names(lv2.uri)) == 1

        # Host 1 comes back: it does not run the guest again; the disk stays where host 2 uses it.
        assert in_agent1("mount", "-o", "remount,bind,rw", str(shared))
        proxy.start()
        wait_for(lambda: float(beat1.read_text()) > time.time() - 3, timeout=30, what="host 1 writing again")
        time.sleep(8)  # several resyncs and sweeps of host 1's agent
        assert domain_names(lv1.uri) == []
        assert guests.node("ha").get("host") == host2 and guests.node("ha").get("domainState") == "running"
        assert root.exists() and len(domain_names(lv2.uri)) == 1
        log = (tmp_path / "agent1.log").read_text()
        assert "fenced: HA guest's domain destroyed" in log
        print(f"host 1 fenced its HA guest {fenced_after:.1f}s after it was cut off (--fence-after 5)")
    finally:
        proxy.cut()
        if agent1.poll() is None:
            agent1.terminate()
            try:
                agent1.wait(15)
            except subprocess.TimeoutExpired:
                agent1.kill()
                agent1.wait()
        log1.close()
