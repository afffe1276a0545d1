"""The Open vSwitch backend on simulated hosts: each host namespace runs its own ovsdb-server/ovs-vswitchd
(userspace datapath), its cloudbr0 is an OVS bridge whose uplink is a trunk on the lab's underlay.

Guests here are network namespaces: a veth whose host end the driver plugs into the segment, whose other end
is the guest's ``eth0`` (TX checksum offload off, as every namespace-side veth on the userspace datapath
needs). Every guest of a test is in the same IPv4 subnet, so only the VLAN tags keep the segments apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Cloud, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.network import Segment, broadcast_uri, guest_bridge  # noqa: E402
from cumulo import ovs  # noqa: E402
from cumulo.netlab import LabHost, NetLab  # noqa: E402
from hostagent.drivers.network import NetworkError  # noqa: E402
from hostagent.drivers.network.openvswitch import OpenVSwitchDriver, kernel_has_datapath  # noqa: E402

from privateplane import private_plane_fixtures  # noqa: E402

pytest_plugins = ["conftest_netlab", "conftest_libvirt"]
# The session controller would reconcile the VirtualMachine whose launch the real-guest test writes itself.
control_plane, kube, system_namespace = private_plane_fixtures()


@pytest.fixture
def ovs_lab(netlab: NetLab) -> NetLab:
    reason = ovs.unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private Open vSwitch: {reason}")
    return netlab


def vlan_segment(vlan: int | None, label: str = "cloudbr0", mtu: int = 1500) -> Segment:
    uri = broadcast_uri("VLAN", vlan)
    return Segment(vswitch="openvswitch", traffic_label=label, broadcast_uri=uri,
                   bridge=guest_bridge("openvswitch", label, uri), mtu=mtu)


def vxlan_segment(vni: int, label: str = "cloudbr0", vswitch: str = "openvswitch", mtu: int = 1500) -> Segment:
    uri = broadcast_uri("VXLAN", vni)
    return Segment(vswitch=vswitch, traffic_label=label, broadcast_uri=uri,
                   bridge=guest_bridge(vswitch, label, uri), mtu=mtu)


def driver(host: LabHost) -> OpenVSwitchDriver:
    return OpenVSwitchDriver(netns=host.netns, ovsdb=ovs.lab_switch(host.netns).db_url)


@dataclasses.dataclass
class Guest:
    """A network-namespace guest: ``eth0`` inside netns ``<prefix>-<name>``, its peer ``port`` on the host."""

    lab: NetLab
    host: LabHost
    name: str
    address: str
    port: str

    @property
    def netns(self) -> str:
        return self.lab.netns_name(self.name)

    def exec(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.netns, argv, **kwargs)  # type: ignore[arg-type]

    def ping(self, other: Guest, count: int = 1, wait: int = 2) -> bool:
        result = self.exec(["busybox", "ping", "-c", str(count), "-W", str(wait), other.address.split("/")[0]],
                           check=False, timeout=count * wait + 10)
        return result.returncode == 0


def make_guest(lab: NetLab, host: LabHost, name: str, address: str, mtu: int = 1500) -> Guest:
    """The guest's namespace and veth (not yet plugged anywhere), both ends at the segment's MTU."""
    guest = Guest(lab, host, name, address, port=f"v{name}")
    subprocess.run(["ip", "netns", "add", guest.netns], check=True)  # <prefix>-*: removed with the lab
    host.exec(["ip", "link", "add", guest.port, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "mtu",
               str(mtu), "netns", guest.netns])
    guest.exec(["ip", "link", "set", "lo", "up"])
    guest.exec(["ip", "addr", "add", address, "dev", "eth0"])
    guest.exec(["ip", "link", "set", "eth0", "up"])
    ovs.disable_tx_offload(guest.netns, "eth0")
    return guest


TCP_SERVER = """
import socket, sys
with socket.create_server(("0.0.0.0", int(sys.argv[1]))) as server:
    print("listening", flush=True)
    server.settimeout(20)
    connection, _ = server.accept()
    connection.settimeout(20)
    total = 0
    while chunk := connection.recv(65536):
        total += len(chunk)
    connection.sendall(str(total).encode())
"""
TCP_CLIENT = """
import os, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4])) as connection:
    connection.sendall(os.urandom(int(sys.argv[3])))
    connection.shutdown(socket.SHUT_WR)
    print(connection.recv(64).decode())
"""


def tcp_transfer(lab: NetLab, client: Guest, server: Guest, size: int = 1_000_000, port: int = 5001,
                 timeout: float = 10.0) -> int:
    """Bytes ``server`` counted of ``size`` random bytes ``client`` sent over one TCP connection (0: none got
    through)."""
    listener = lab.popen(server.netns, [sys.executable, "-c", TCP_SERVER, str(port)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        result = client.exec([sys.executable, "-c", TCP_CLIENT, server.address.split("/")[0], str(port), str(size),
                              str(timeout)], check=False, timeout=timeout + 10)
        return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else 0
    finally:
        if listener.poll() is None:
            listener.kill()
        listener.wait(5)


def test_vlan_segments_connect_across_hosts_and_stay_apart(ovs_lab: NetLab) -> None:
    started = time.monotonic()
    h1, h2 = ovs_lab.add_host("h1", vswitch="openvswitch"), ovs_lab.add_host("h2", vswitch="openvswitch")
    assert h1.mtu("cloudbr0") == 1600 and h1.ping(h2.underlay_ip, size=1572)  # the underlay through OVS
    lab_ready = time.monotonic() - started
    red, blue = vlan_segment(100), vlan_segment(200)
    a1, a2 = make_guest(ovs_lab, h1, "a1", "10.9.0.1/24"), make_guest(ovs_lab, h2, "a2", "10.9.0.2/24")
    b1, b2 = make_guest(ovs_lab, h1, "b1", "10.9.0.3/24"), make_guest(ovs_lab, h2, "b2", "10.9.0.4/24")

    async def plug() -> None:
        for host, plugs in ((h1, [(red, a1), (blue, b1)]), (h2, [(red, a2), (blue, b2)])):
            network = driver(host)
            try:
                for seg, guest in plugs:
                    await network.ensure_segment(seg)
                    await network.plug(seg, guest.port)
                    await network.plug(seg, guest.port)  # idempotent
                assert await network.ports(red) == [plugs[0][1].port]
                assert await network.ports(blue) == [plugs[1][1].port]
            finally:
                await network.close()

    asyncio.run(plug())
    switch = ovs.lab_switch(h1.netns)
    assert switch.vsctl("get", "Port", a1.port, "tag").strip() == "100"
    assert switch.vsctl("get", "Port", b1.port, "tag").strip() == "200"
    assert switch.vsctl("get", "Port", "eth0", "tag").strip() == "[]"  # the uplink trunks every VLAN

    assert a1.ping(a2, wait=3), "same VLAN across the underlay"
    assert b2.ping(b1, wait=3), "the other VLAN across the underlay"
    # TCP in both directions proves the checksums survive the userspace datapath.
    assert tcp_transfer(ovs_lab, a1, a2) == 1_000_000
    assert tcp_transfer(ovs_lab, b2, b1) == 1_000_000
    # Same subnet, other tag: nothing gets through, on the same host or across.
    assert not a1.ping(b1, wait=1)
    assert not a1.ping(b2, wait=1)
    assert not b2.ping(a2, wait=1)
    assert tcp_transfer(ovs_lab, a1, b2, size=1000, timeout=2) == 0

    async def release() -> None:
        for host, plugs in ((h1, [(red, a1), (blue, b1)]), (h2, [(red, a2), (blue, b2)])):
            network = driver(host)
            try:
                for seg, guest in plugs:
                    await network.unplug(seg, guest.port)
                    await network.unplug(seg, guest.port)  # already gone: not an error
                    await network.release_segment(seg)
                    assert await network.ports(seg) == []
            finally:
                await network.close()

    asyncio.run(release())
    for host in (h1, h2):
        assert ovs.lab_switch(host.netns).ports("cloudbr0") == ["eth0"]
    assert not a1.ping(a2, wait=1)
    print(f"lab of two OVS hosts ready in {lab_ready:.2f}s, whole test {time.monotonic() - started:.1f}s")


async def segments_of(host: LabHost) -> list[Segment]:
    network = driver(host)
    try:
        return await network.segments()
    finally:
        await network.close()


def test_vxlan_segments_on_ovs_hosts_interoperate_with_linux_bridge_hosts(ovs_lab: NetLab) -> None:
    from hostagent.drivers.network.linuxbridge import LinuxBridgeDriver

    h1, h2 = ovs_lab.add_host("h1", vswitch="openvswitch"), ovs_lab.add_host("h2", vswitch="openvswitch")
    h3 = ovs_lab.add_host("h3")  # a Linux bridge host on the same underlay
    guests = {"a1": (h1, 5001, "10.9.0.1/24"), "a2": (h2, 5001, "10.9.0.2/24"), "a3": (h3, 5001, "10.9.0.3/24"),
              "b2": (h2, 5002, "10.9.0.4/24"), "b3": (h3, 5002, "10.9.0.5/24")}
    made = {name: make_guest(ovs_lab, host, name, address, mtu=1450) for name, (host, _, address) in guests.items()}

    def segment_of(host: LabHost, vni: int) -> Segment:
        return vxlan_segment(vni, vswitch=host.vswitch, mtu=1450)

    def network_of(host: LabHost) -> t.Any:
        return driver(host) if host.vswitch == "openvswitch" else LinuxBridgeDriver(netns=host.netns)

    async def plug() -> None:
        for name, (host, vni, _) in guests.items():
            network = network_of(host)
            try:
                await network.ensure_segment(segment_of(host, vni))
                await network.ensure_segment(segment_of(host, vni))  # idempotent
                await network.plug(segment_of(host, vni), made[name].port)
            finally:
                await network.close()

    asyncio.run(plug())
    switch = ovs.lab_switch(h2.netns)
    assert switch.bridges() == ["brvx-5001", "brvx-5002", "cloudbr0", "cloudbr1"]
    assert sorted(switch.ports("brvx-5001")) == ["va2", "vxlan5001"]
    assert "vxlan id 5001 group 239.0.19.137 dev cloudbr0" in h2.exec(["ip", "-d", "link", "show", "vxlan5001"]).stdout

    assert made["a1"].ping(made["a2"], wait=3), "OVS to OVS host over VXLAN"
    assert made["a3"].ping(made["a1"], wait=3), "Linux bridge to OVS host over VXLAN"
    assert tcp_transfer(ovs_lab, made["a1"], made["a2"]) == 1_000_000
    assert tcp_transfer(ovs_lab, made["a2"], made["a3"]) == 1_000_000
    assert made["b2"].ping(made["b3"], wait=3)
    assert [(s.broadcast_uri, s.bridge, s.traffic_label, s.mtu) for s in asyncio.run(segments_of(h2))] == [
        ("vxlan://5001", "brvx-5001", "cloudbr0", 1450), ("vxlan://5002", "brvx-5002", "cloudbr0", 1450)]
    assert not made["a2"].ping(made["b2"], wait=1), "another VNI on the same host"
    assert not made["a1"].ping(made["b3"], wait=1), "another VNI across hosts"

    async def release() -> None:
        for host, vni, names in ((h1, 5001, ["a1"]), (h2, 5001, ["a2"]), (h2, 5002, ["b2"])):
            network = driver(host)
            try:
                await network.release_segment(segment_of(host, vni))  # a port is left: the segment stays
                assert switch.bridges().count(f"brvx-{vni}") == 1 or host is h1
                for name in names:
                    await network.unplug(segment_of(host, vni), made[name].port)
                await network.release_segment(segment_of(host, vni))
                await network.release_segment(segment_of(host, vni))  # gone already: not an error
            finally:
                await network.close()

    asyncio.run(release())
    for host in (h1, h2):
        assert ovs.lab_switch(host.netns).bridges() == ["cloudbr0", "cloudbr1"]
        assert "vxlan" not in host.exec(["ip", "-o", "link"]).stdout
        assert asyncio.run(segments_of(host)) == []


def test_ports_whose_interface_died_are_released_and_errors_are_clear(ovs_lab: NetLab) -> None:
    h1 = ovs_lab.add_host("h1", vswitch="openvswitch")
    red = vlan_segment(100)
    a1 = make_guest(ovs_lab, h1, "a1", "10.9.0.1/24")
    b1 = make_guest(ovs_lab, h1, "b1", "10.9.0.2/24")
    switch = ovs.lab_switch(h1.netns)
    kernel_datapath = kernel_has_datapath()  # (pyroute2's generic netlink runs an event loop of its own)

    async def scenario() -> None:
        network = driver(h1)
        try:
            assert await network.bridge_exists("cloudbr0") and await network.bridge_exists("cloudbr1")
            assert not await network.bridge_exists("cloudbr7")
            assert not await network.bridge_exists("eth0")  # an interface, not an OVS bridge
            await network.plug(red, a1.port)
            await network.plug(red, b1.port)
            # A guest's interface vanishes (its QEMU died): the OVSDB record stays until the segment is released.
            subprocess.run(["ip", "netns", "delete", a1.netns], check=True)
            wait_for(lambda: a1.port not in h1.exec(["ip", "-o", "link"]).stdout, timeout=5, what="veth gone")
            assert a1.port in switch.ports("cloudbr0")
            await network.release_segment(red)
            assert switch.ports("cloudbr0") == ["eth0", b1.port]  # b1 is alive and stays
            # A tap that will exist later (libvirt makes it at domain start) can be recorded beforehand; the next
            # plug on the host drops dead records, but not that one.
            await network.prepare_port(red, "vlater")
            await network.plug(red, b1.port)
            assert switch.vsctl("get", "Port", "vlater", "tag").strip() == "100"
            h1.exec(["ip", "link", "add", "vlater", "type", "veth", "peer", "name", "vlaterp"])
            wait_for(lambda: switch.vsctl("get", "Interface", "vlater", "ofport").strip() not in ("-1", "[]"),
                     timeout=5, what="the switch opening the interface that appeared")
            await network.plug(red, "vlater")
            h1.exec(["ip", "link", "del", "vlater"])
            await network.plug(red, b1.port)  # the dead one goes with the next plug
            assert switch.ports("cloudbr0") == ["eth0", b1.port]
            # Moving a port to the untagged segment clears its tag.
            await network.plug(vlan_segment(None), b1.port)
            assert switch.vsctl("get", "Port", b1.port, "tag").strip() == "[]"
            with pytest.raises(NetworkError, match="port 'vnothere' does not exist"):
                await network.plug(red, "vnothere")
            with pytest.raises(NetworkError, match="'cloudbr7' is not an Open vSwitch bridge"):
                await network.ensure_segment(vlan_segment(100, label="cloudbr7"))
            with pytest.raises(NetworkError, match="needs 'cloudbr1' to have an MTU of at least 1550, not 1500"):
                await network.ensure_segment(vxlan_segment(5001, label="cloudbr1"))
            if not kernel_datapath:
                # A label bridge on the kernel datapath (OVSDB's default) cannot work on this kernel: say so.
                switch.vsctl("add-br", "sysbr", wait=False)
                with pytest.raises(NetworkError, match="'sysbr' uses the kernel datapath .system., but this kernel "
                                                       "has no Open vSwitch module"):
                    await network.ensure_segment(vlan_segment(100, label="sysbr"))
        finally:
            await network.close()
        unreachable = OpenVSwitchDriver(netns=h1.netns, ovsdb=f"unix:{switch.workdir}/missing.sock", timeout=2)
        with pytest.raises(NetworkError, match="cannot reach the Open vSwitch database"):
            await unreachable.bridge_exists("cloudbr0")

    asyncio.run(scenario())


def test_private_switch_restarts_idempotently(ovs_lab: NetLab) -> None:
    h1 = ovs_lab.add_host("h1", vswitch="openvswitch")
    switch = ovs.lab_switch(h1.netns)
    assert switch.running
    switch.start()  # running: nothing happens
    switch.stop()
    switch.stop()
    assert not switch.running
    switch.start()  # the database kept the bridges; the internal port keeps the underlay address
    assert switch.bridges() == ["cloudbr0", "cloudbr1"]
    assert h1.underlay_ip in h1.exec(["ip", "-o", "addr", "show", "cloudbr0"]).stdout


def test_agent_reports_its_ovs_label_bridges(ovs_lab: NetLab, system_namespace, cloud: Cloud, agents) -> None:
    h1 = ovs_lab.add_host("h1", vswitch="openvswitch")
    host, cluster, zone = unique("ovs"), unique("cl"), unique("zone")
    cloud.create("physicalnetworks", unique("pnet"), {
        "zone": zone, "isolationMethod": "VLAN", "vswitch": "openvswitch", "vnetRanges": [{"start": 100, "end": 199}],
        "trafficTypes": [{"type": "Guest", "label": "cloudbr0"}, {"type": "Public", "label": "cloudbr1"},
                         {"type": "Management", "label": "cloudbr9"}]})
    agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", cluster,
                 "--network-driver", "openvswitch", "--host-netns", h1.netns,
                 "--ovsdb", ovs.lab_switch(h1.netns).db_url, "--heartbeat-interval", "1", "--lease-duration", "10")
    wait_for(lambda: cloud.node(host), what="status.node")
    cloud.patch_status("hosts", host, {"zone": zone})
    node = wait_for(lambda: (n := cloud.node(host)) and n.get("bridges") and n, what="bridges reported")
    assert node["bridges"] == {"cloudbr0": True, "cloudbr1": True, "cloudbr9": False}
    # The switch sees a bridge come: the report follows within a check interval.
    ovs.lab_switch(h1.netns).add_bridge("cloudbr9")
    wait_for(lambda: cloud.node(host)["bridges"]["cloudbr9"] is True, timeout=10, what="cloudbr9 reported")


def vlan_nic(vlan: int, mac: str, ip: str, cidr: str) -> dict[str, t.Any]:
    """A launch NIC on VLAN ``vlan`` of an Open vSwitch physical network (what the controller would write)."""
    return {"network": f"ns/vlan{vlan}", "deviceId": 0, "macAddress": mac, "ipAddress": ip, "cidr": cidr,
            "gateway": cidr.replace("0/24", "1"), "bridge": "cloudbr0", "broadcastUri": f"vlan://{vlan}",
            "vswitch": "openvswitch", "trafficLabel": "cloudbr0", "mtu": 1500, "default": True}


@pytest.mark.timeout(300)
def test_real_guest_on_an_open_vswitch_vlan(ovs_lab: NetLab, system_namespace, kube, control_plane, agents,
                                            libvirtd_factory, tmp_path) -> None:
    """A booted guest (libvirt/QEMU TCG) on an OVS host: libvirt makes its tap, the agent has it on cloudbr0 with
    the VLAN tag; it leases its address from a dnsmasq on the other OVS host over the tagged underlay and answers
    HTTP from a netns guest there. The agent killed and restarted adopts it with the plumbing untouched."""
    import shutil
    import uuid

    pytest.register_assert_rewrite("netguests")
    from netguests import Guests, guest_addr, http

    from cumulo import guestimage
    from hostagent.drivers.hypervisor.netns import guest_netns

    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"{tool} is not installed (Debian package {package}; run hack/install-system-deps)")
    guest = guestimage.ensure_tiny_guest(log=lambda message: print(f"[tiny guest] {message}"))
    started = time.monotonic()
    h1, h2 = ovs_lab.add_host("h1", vswitch="openvswitch"), ovs_lab.add_host("h2", vswitch="openvswitch")
    daemon = libvirtd_factory(netns=h1.netns)
    host1, host2 = unique("lv1"), unique("lv2")
    common = ["--network-driver", "openvswitch", "--storage-driver", "simulator", "--vm-resync", "2",
              "--heartbeat-interval", "2", "--lease-duration", "10"]
    agent1_args = [host1, "--host", host1, "--hypervisor", "libvirt", "--libvirt-uri", daemon.uri, "--host-netns",
                   h1.netns, "--ovsdb", ovs.lab_switch(h1.netns).db_url, "--state-dir", str(tmp_path / "a1"),
                   *common]
    agent1 = agents.start(*agent1_args)
    agents.start(host2, "--host", host2, "--hypervisor", "netns", "--host-netns", h2.netns, "--ovsdb",
                 ovs.lab_switch(h2.netns).db_url, "--state-dir", str(tmp_path / "a2"), *common)
    vlan, cidr = 300 + int(uuid.uuid4().hex[:2], 16), "10.64.0.0/24"
    vm_mac, peer_mac = f"02:00:00:{uuid.uuid4().hex[:2]}:00:31", f"02:00:00:{uuid.uuid4().hex[:2]}:00:32"

    # The network's DHCP server: dnsmasq in a namespace on h2, its port tagged like the guests'.
    server = ovs_lab.add_namespace("dhcp", host=h2, port="dhcp0", address="10.64.0.1/24")
    ovs.disable_tx_offload(server.netns, "eth0")
    network = driver(h2)
    try:
        asyncio.run(network.plug(vlan_segment(vlan), "dhcp0"))
    finally:
        asyncio.run(network.close())
    with open(tmp_path / "dnsmasq.log", "w") as log:
        server.popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                      "--interface=eth0", "--except-interface=lo", "--leasefile-ro", "--pid-file=", "--port=0",
                      "--dhcp-range=10.64.0.1,static,255.255.255.0,1h", "--log-dhcp",
                      f"--dhcp-host={vm_mac},10.64.0.31", f"--dhcp-host={peer_mac},10.64.0.32"],
                     stdout=log, stderr=subprocess.STDOUT)

    guests = Guests(kube, control_plane)
    root = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", guest.disk_format, "-b", str(guest.disk),
                    str(root)], check=True)
    disk = {"volume": "lv-root", "device": "vda", "pool": "p", "poolType": "Filesystem", "path": str(root),
            "format": "qcow2", "sizeBytes": guest.disk_virtual_size}
    uid = guests.create("lv", host1, [vlan_nic(vlan, vm_mac, "10.64.0.31", cidr)],
                        extra={"disks": [disk], "kernelPath": str(guest.kernel), "initrdPath": str(guest.initrd),
                               "kernelCmdline": guest.cmdline, "memoryMiB": guest.min_memory_mib})
    peer = guest_netns(h2.netns, guests.create("peer", host2, [vlan_nic(vlan, peer_mac, "10.64.0.32", cidr)]))

    node = wait_for(lambda: (n := guests.node("lv")).get("domainState") == "running" and n, timeout=60,
                    what="the libvirt guest running")
    tap, switch = f"vn{uid.replace('-', '')[:8]}0", ovs.lab_switch(h1.netns)
    assert tap in switch.ports("cloudbr0") and switch.vsctl("get", "Port", tap, "tag").strip() == str(vlan)
    assert switch.vsctl("get", "Interface", tap, "ofport").strip() not in ("-1", "[]")
    console = Path(node["consoleLog"])
    wait_for(lambda: "CUMULO ip eth0 10.64.0.31" in console.read_text(errors="replace"), timeout=180, interval=1,
             what="the guest's DHCP lease on its console")
    booted = time.monotonic() - started
    wait_for(lambda: "10.64.0.32/24" in guest_addr(ovs_lab, peer), timeout=30, what="the netns peer leased")
    answer = wait_for(lambda: http(ovs_lab, peer, "http://10.64.0.31/", timeout=5), timeout=60, interval=1,
                      what="the real guest's HTTP answer")
    assert "lv" in answer

    # The agent dies and comes back: the guest is adopted, its tap stays tagged, traffic flows throughout.
    agent1.kill()
    assert http(ovs_lab, peer, "http://10.64.0.31/", timeout=5)
    agents.start(*agent1_args)
    wait_for(lambda: "adopted running domain" in agent1.log(), timeout=30,  # both lives log to one file
             what="the restarted agent adopting the guest")
    assert switch.vsctl("get", "Port", tap, "tag").strip() == str(vlan)
    assert http(ovs_lab, peer, "http://10.64.0.31/", timeout=5)
    print(f"real guest on an OVS VLAN leased its address {booted:.1f}s after the test started; "
          f"total {time.monotonic() - started:.1f}s")
