"""A real booted guest (libvirt/QEMU TCG, the tiny test guest) on a VXLAN segment: its libvirtd runs inside lab host
h1's namespace, the agent ensures the segment before starting the domain, libvirt plugs the tap into ``brvx-<vni>``;
the guest gets its address by DHCP from a dnsmasq on host h2 and answers ping and HTTP from a netns guest on h2.
Slow (TCG boot): the one real-guest network test."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt", "netguests")
from conftest_libvirt import unique, wait_for  # noqa: E402
from netguests import Guests, dhcp_server, guest_addr, http, start_agent, vxlan_nic  # noqa: E402

from cumulo import guestimage  # noqa: E402
from cumulo.netlab import NetLab  # noqa: E402
from hostagent.drivers.hypervisor.netns import guest_netns  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
# The session controller would reconcile the VirtualMachines whose launch these tests write themselves.
control_plane, kube, system_namespace = private_plane_fixtures()
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(300)]


def test_real_guest_dhcp_over_vxlan(kube, control_plane, agents, netlab: NetLab, libvirtd_factory,
                                    guest: guestimage.TinyGuest, tmp_path: Path) -> None:
    started = time.monotonic()
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    daemon = libvirtd_factory(netns=h1.netns)
    host1, host2 = unique("lv1"), unique("lv2")
    agents.start(host1, "--host", host1, "--hypervisor", "libvirt", "--libvirt-uri", daemon.uri,
                 "--network-driver", "linuxbridge", "--host-netns", h1.netns, "--state-dir", str(tmp_path / "a1"),
                 "--storage-driver", "simulator", "--vm-resync", "2", "--heartbeat-interval", "2",
                 "--lease-duration", "10")
    start_agent(agents, host2, h2, tmp_path / "a2")
    guests = Guests(kube, control_plane)
    vni = 12001 + int(uuid.uuid4().hex[:3], 16)
    cidr = "10.63.0.0/24"
    vm_mac, peer_mac = f"02:00:00:{uuid.uuid4().hex[:2]}:00:31", f"02:00:00:{uuid.uuid4().hex[:2]}:00:32"
    dhcp_server(netlab, h2, "dhcp", "dhcp0", "10.63.0.1/24", {vm_mac: "10.63.0.31", peer_mac: "10.63.0.32"},
                f"brvx-{vni}", tmp_path, vni=vni)

    root = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", guest.disk_format, "-b", str(guest.disk),
                    str(root)], check=True)
    disk = {"volume": "lv-root", "device": "vda", "pool": "p", "poolType": "Filesystem", "path": str(root),
            "format": "qcow2", "sizeBytes": guest.disk_virtual_size}
    uid = guests.create("lv", host1, [vxlan_nic(vni, vm_mac, "10.63.0.31", cidr)],
                        extra={"disks": [disk], "kernelPath": str(guest.kernel), "initrdPath": str(guest.initrd),
                               "kernelCmdline": guest.cmdline, "memoryMiB": guest.min_memory_mib})
    peer_uid = guests.create("peer", host2, [vxlan_nic(vni, peer_mac, "10.63.0.32", cidr)])
    peer = guest_netns(h2.netns, peer_uid)

    node = wait_for(lambda: (n := guests.node("lv")).get("domainState") == "running" and n, timeout=60,
                    what="the libvirt guest running")
    tap = h1.exec(["ip", "-d", "link", "show", f"vn{uid.replace('-', '')[:8]}0"]).stdout
    assert f"master brvx-{vni}" in tap and "mtu 1450" in tap, tap
    console = Path(node["consoleLog"])
    wait_for(lambda: "CUMULO ip eth0 10.63.0.31" in console.read_text(errors="replace"), timeout=180, interval=1,
             what="the guest's DHCP lease on its console")
    booted = time.monotonic() - started
    wait_for(lambda: "10.63.0.32/24" in guest_addr(netlab, peer), timeout=30, what="the netns peer leased")
    assert netlab.exec(peer, ["busybox", "ping", "-c", "3", "-W", "5", "10.63.0.31"], check=False).returncode == 0
    answer = wait_for(lambda: http(netlab, peer, "http://10.63.0.31/", timeout=5), timeout=60, interval=1,
                      what="the real guest's HTTP answer")
    assert "lv" in answer
    print(f"real guest leased its address over VXLAN {booted:.1f}s after the test started; "
          f"HTTP from the other host's netns guest answered: {answer!r}; total {time.monotonic() - started:.1f}s")
