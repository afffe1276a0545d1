"""A real booted guest through the whole stack: the controller implements an isolated VXLAN network and places a
real QEMU guest (libvirt, TCG, the tiny test guest) on lab host h1, whose private libvirtd runs inside h1's network
namespace, and a netns guest on h2. The real guest learns its IPAM address by DHCP from the virtual router (its
console says ``CUMULO ip eth0 <addr>``), the netns guest on the other host pings it and fetches its HTTP page across
VXLAN, and the public namespace reaches the same page through a static NAT public IP opened by a firewall rule.
Slow (a TCG boot): one test."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt", "networkcloud")
from conftest_libvirt import wait_for  # noqa: E402
from networkcloud import ISOLATED_SERVICES, NetworkCloud, http  # noqa: E402

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(360)]


def test_real_guest_through_the_controller(netlab, cloud, kube, control_plane, agents, libvirtd_factory,
                                           guest: guestimage.TinyGuest, tmp_path: Path) -> None:
    started = time.monotonic()
    nc = NetworkCloud(cloud, kube, control_plane, agents, netlab, tmp_path, hosts=("h2",), storage=tmp_path / "disks",
                      image=guest.disk)
    nc.add_host("h1", libvirtd=lambda netns: libvirtd_factory(netns=netns))
    nc.create("templates", "Template", "tiny", {
        "url": guest.disk.as_uri(), "format": "QCOW2", "zone": nc.zone, "hypervisor": "KVM",
        "checksum": f"sha256:{guest.disk_sha256}",
        "directKernelBoot": {"kernel": {"url": guest.kernel.as_uri()}, "initrd": {"url": guest.initrd.as_uri()},
                             "cmdline": guest.cmdline}})
    wait_for(lambda: nc.status("templates", "tiny").get("state") == "Ready", timeout=60, what="template tiny Ready")
    offering = nc.network_offering("Isolated", ISOLATED_SERVICES)
    nc.network("web", offering)
    nc.vm("real", ["web"], host="h1", template={"name": "tiny"})
    nc.vm("peer", ["web"], host="h2")
    nc.running("real", "peer", timeout=120)
    network = wait_for(lambda: (s := nc.status("networks", "web")).get("phase") == "Implemented" and s, timeout=60,
                       what="network web Implemented")
    assert network["broadcastUri"].startswith("vxlan://")

    # The real guest's DHCP client got the address IPAM chose, from the router (its console says so).
    address = nc.nic("real")["ipAddress"]
    console = Path(nc.status("virtualmachines", "real")["node"]["consoleLog"])
    wait_for(lambda: f"{guestimage.IP_PREFIX}eth0 {address}" in console.read_text(errors="replace"), timeout=180,
             interval=1, what=f"'CUMULO ip eth0 {address}' on the real guest's console")
    leased = time.monotonic() - started

    # The netns guest on the other host reaches it across the VXLAN segment: ping and its HTTP page.
    assert nc.dhcp_address("peer") == nc.nic("peer")["ipAddress"]
    assert nc.ping("peer", address, count=3), "the netns guest on h2 cannot ping the real guest on h1"
    page = wait_for(lambda: http(nc.guest_netns("peer"), address, timeout=5), timeout=60, interval=1,
                    what="the real guest's HTTP page from the netns guest")
    assert "hostname=real" in page, page

    # From the internet: static NAT to the real guest, closed until a firewall rule opens port 80.
    nc.create("publicipaddresses", "PublicIPAddress", "ip-real", {"zone": nc.zone, "network": "web",
                                                                    "staticNat": {"virtualMachine": {"name": "real"}}})
    public_ip = wait_for(lambda: nc.status("publicipaddresses", "ip-real").get("ipAddress"), timeout=30,
                         what="the static NAT address")
    assert http(nc.public.netns, public_ip, timeout=2) is None, "reachable before any firewall rule"
    nc.create("firewallrules", "FirewallRule", "http", {"publicIpAddress": "ip-real", "protocol": "TCP",
                                                         "ports": {"start": 80, "end": 80},
                                                         "cidrs": ["203.0.113.0/24"]})
    page = wait_for(lambda: http(nc.public.netns, public_ip, timeout=5), timeout=60, interval=1,
                    what=f"the real guest's HTTP page at {public_ip} from the public namespace")
    assert "hostname=real" in page, page
    print(f"real guest leased {address} {leased:.1f}s after the test started; reached through static NAT "
          f"{public_ip}; total {time.monotonic() - started:.1f}s")
