"""The guest network data plane through real agents: ``cumulo-agent --hypervisor netns --network-driver linuxbridge
--host-netns <lab host>`` against the real kube-apiserver, with VirtualMachines whose ``status.launch`` the test
writes itself (as the controller would). DHCP comes from a plain dnsmasq on the segment (the virtual router is
tested on its own).

* two lab hosts, VXLAN: network-namespace guests on different hosts get their addresses by DHCP and reach each
  other; a guest of another VNI (same CIDR) is unreachable; an agent restart adopts the guests untouched;
  stopping releases the segment on a host where nothing else uses it.
* basic zone: a flat (untagged) segment, a security group allowing TCP 22 from one CIDR only; anti-spoofing.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt", "netguests")
from conftest_libvirt import unique, wait_for  # noqa: E402
from netguests import Guests, dhcp_server, flat_nic, guest_addr, http, mac, start_agent, vxlan_nic  # noqa: E402

from cumulo.netlab import NetLab  # noqa: E402
from hostagent.drivers.hypervisor.netns import guest_netns  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
# The session controller would reconcile the VirtualMachines whose launch these tests write themselves.
control_plane, kube, system_namespace = private_plane_fixtures()
pytestmark = [pytest.mark.usefixtures("system_namespace"), pytest.mark.timeout(240)]


def test_vxlan_guests_across_hosts(netlab: NetLab, kube, control_plane, agents, tmp_path: Path) -> None:
    started = time.monotonic()
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    host1, host2 = unique("nh1"), unique("nh2")
    agent1 = start_agent(agents, host1, h1, tmp_path / "a1")
    agent2 = start_agent(agents, host2, h2, tmp_path / "a2")
    guests = Guests(kube, control_plane)
    red = 6001 + int(uuid.uuid4().hex[:3], 16)
    blue = red + 5000
    cidr = "10.61.0.0/24"
    macs = {name: mac(index) for index, name in enumerate(["ra", "rb", "bc"], 1)}
    ips = {"ra": "10.61.0.21", "rb": "10.61.0.22", "bc": "10.61.0.22"}  # blue reuses red's CIDR and rb's address
    dhcp_server(netlab, h1, "dred", "dred0", "10.61.0.1/24", {macs["ra"]: ips["ra"], macs["rb"]: ips["rb"]},
                f"brvx-{red}", tmp_path, vni=red)
    dhcp_server(netlab, h1, "dblue", "dblue0", "10.61.0.1/24", {macs["bc"]: ips["bc"]}, f"brvx-{blue}", tmp_path,
                vni=blue)
    uids = {"ra": guests.create("ra", host1, [vxlan_nic(red, macs["ra"], ips["ra"], cidr)]),
            "rb": guests.create("rb", host2, [vxlan_nic(red, macs["rb"], ips["rb"], cidr)]),
            "bc": guests.create("bc", host2, [vxlan_nic(blue, macs["bc"], ips["bc"], cidr)])}
    hosts = {"ra": h1, "rb": h2, "bc": h2}
    netns = {name: guest_netns(hosts[name].netns, uid) for name, uid in uids.items()}
    for name in uids:
        wait_for(lambda n=name: guests.node(n).get("domainState") == "running", timeout=30, what=f"{name} running")
        wait_for(lambda n=name: f"{ips[n]}/24" in guest_addr(netlab, netns[n]), timeout=30,
                 what=f"{name} leased {ips[name]} by DHCP")
    print(f"three netns guests running with DHCP leases {time.monotonic() - started:.1f}s after the agents started")
    assert "vxlan id" in h2.exec(["ip", "-d", "link", "show", f"vxlan{red}"]).stdout
    assert netlab.exec(netns["rb"], ["ip", "route"]).stdout.startswith("default via 10.61.0.1")
    assert "nameserver 10.61.0.1" in netlab.exec(netns["rb"], ["cat", "/etc/resolv.conf"]).stdout

    # Across hosts over VXLAN: ra (h1) reaches rb (h2); the answer names rb. Both service ports answer.
    assert http(netlab, netns["ra"], "http://10.61.0.22/") == "rb"
    assert http(netlab, netns["ra"], "http://10.61.0.22:22/") == "rb"
    # Isolation: blue's guest bc has the same address on another VNI; from blue's DHCP namespace only bc answers.
    assert http(netlab, f"{netlab.prefix}-dblue", "http://10.61.0.22/") == "bc"
    assert not netlab.exec(netns["bc"], ["busybox", "ping", "-c", "2", "-W", "2", "10.61.0.21"],
                           check=False).returncode == 0, "blue reaches a red guest"

    # Agent restart: guests are adopted, not restarted (same start time), and keep working.
    before = guests.node("ra")["startedAt"]
    agent1.kill()
    agent1 = start_agent(agents, host1, h1, tmp_path / "a1")
    time.sleep(4)
    assert guests.node("ra")["startedAt"] == before and guests.node("ra")["domainState"] == "running"
    assert http(netlab, netns["rb"], "http://10.61.0.21/") == "ra"

    # rb stops: its namespace goes, and red's segment on h2 (nothing else on it) is released.
    guests.launch("rb", host2, [vxlan_nic(red, macs["rb"], ips["rb"], cidr)], power="Stopped")
    wait_for(lambda: guests.node("rb").get("domainState") == "shutoff", timeout=30, what="rb stopped")
    wait_for(lambda: h2.exec(["ip", "link", "show", f"brvx-{red}"], check=False).returncode != 0, timeout=15,
             what=f"brvx-{red} released on h2")
    assert h2.exec(["ip", "link", "show", f"brvx-{blue}"], check=False).returncode == 0, "blue is still in use"
    assert netns["rb"] not in netlab.exec(h2.netns, ["ip", "netns", "list"]).stdout

    # bc is deleted while h2's agent is down: the restarted agent destroys its guest and releases blue's segment
    # (found on the host, not remembered).
    agent2.kill()
    guests.delete("bc")
    start_agent(agents, host2, h2, tmp_path / "a2")
    wait_for(lambda: netns["bc"] not in netlab.exec(h2.netns, ["ip", "netns", "list"]).stdout, timeout=30,
             what="the deleted guest's namespace removed")
    wait_for(lambda: h2.exec(["ip", "link", "show", f"brvx-{blue}"], check=False).returncode != 0, timeout=30,
             what=f"brvx-{blue} released on h2 after the agent restart")
    print(f"VXLAN data plane test took {time.monotonic() - started:.1f}s")


def test_security_group_allows_ssh_from_one_cidr(netlab: NetLab, kube, control_plane, agents, tmp_path: Path) -> None:
    started = time.monotonic()
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    host1 = unique("sg1")
    start_agent(agents, host1, h1, tmp_path / "a1")
    guests = Guests(kube, control_plane)
    cidr = "10.70.0.0/24"
    guest_mac, open_mac = mac(1), mac(2)
    dhcp_server(netlab, h1, "dflat", "dflat0", "10.70.0.1/24", {guest_mac: "10.70.0.50", open_mac: "10.70.0.60"},
                "cloudbr0", tmp_path)
    # Clients on the flat network: one inside the allowed CIDR (on the other host), one outside it.
    inside = netlab.add_namespace("cin", host=h2, port="cin0", address="10.70.0.10/24")
    h2.exec(["ip", "link", "set", "cin0", "master", "cloudbr0"])
    outside = netlab.add_namespace("cout", host=h1, port="cout0", address="10.70.0.100/24")
    h1.exec(["ip", "link", "set", "cout0", "master", "cloudbr0"])
    policy = {"ingress": [{"protocol": "TCP", "portStart": 22, "portEnd": 22, "cidrs": ["10.70.0.0/28"]}],
              "groups": ["ssh-from-admins"]}
    uid = guests.create("sg", host1, [flat_nic(guest_mac, "10.70.0.50", cidr, securityGroups=policy)])
    open_uid = guests.create("open", host1, [flat_nic(open_mac, "10.70.0.60", cidr)])
    guest, open_guest = guest_netns(h1.netns, uid), guest_netns(h1.netns, open_uid)
    for name, namespace, ip in (("sg", guest, "10.70.0.50"), ("open", open_guest, "10.70.0.60")):
        wait_for(lambda n=namespace, a=ip: f"{a}/24" in guest_addr(netlab, n), timeout=30, what=f"{name} leased")
    assert "table inet cumulo_sg" in h1.exec(["nft", "list", "tables"]).stdout

    assert http(netlab, inside.netns, "http://10.70.0.50:22/") == "sg", "TCP 22 from the allowed CIDR"
    assert http(netlab, outside.netns, "http://10.70.0.50:22/") is None, "TCP 22 from outside the CIDR"
    assert http(netlab, inside.netns, "http://10.70.0.50/") is None, "TCP 80 is not allowed from anywhere"
    assert http(netlab, outside.netns, "http://10.70.0.60/") == "open", "a guest without security groups is open"
    # Egress is allowed (stateful: the answers come back); a spoofed source address does not leave the port.
    assert http(netlab, guest, "http://10.70.0.60/") == "open"
    netlab.exec(guest, ["ip", "addr", "add", "10.70.0.99/24", "dev", "eth0"])
    spoofed = netlab.exec(guest, ["busybox", "ping", "-c", "2", "-W", "2", "-I", "10.70.0.99", "10.70.0.60"],
                          check=False)
    assert spoofed.returncode != 0, "a spoofed source address got through"

    # The policy changes (now TCP 22 from anywhere): the agent follows the launch.
    policy["ingress"][0]["cidrs"] = []
    guests.launch("sg", host1, [flat_nic(guest_mac, "10.70.0.50", cidr, securityGroups=policy)])
    wait_for(lambda: http(netlab, outside.netns, "http://10.70.0.50:22/", timeout=1) == "sg", timeout=20,
             what="the widened rule applied")
    # The guest stops: its rules go (the table goes with the last guest under security groups).
    guests.launch("sg", host1, [flat_nic(guest_mac, "10.70.0.50", cidr, securityGroups=policy)], power="Stopped")
    wait_for(lambda: "cumulo_sg" not in h1.exec(["nft", "list", "tables"]).stdout, timeout=20,
             what="security group tables removed")
    print(f"security group test took {time.monotonic() - started:.1f}s")
