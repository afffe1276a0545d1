"""The Linux bridge driver on real netlink, in lab host namespaces: VXLAN segments carry traffic between hosts,
VNIs are isolated, untagged segments use the label bridge, VLAN is refused on a kernel without 802.1Q, and a
segment is removed only when its last port has gone."""

from __future__ import annotations

import asyncio
import os

import pytest

from controllers.api.v1alpha1.network import Segment, guest_bridge
from cumulo.netlab import LabHost, NetLab, run
from hostagent.drivers.network import NetworkError
from hostagent.drivers.network.linuxbridge import LinuxBridgeDriver

pytest_plugins = ["conftest_netlab"]


def segment(uri: str | None, label: str = "cloudbr0", mtu: int = 1450) -> Segment:
    return Segment(traffic_label=label, broadcast_uri=uri, bridge=guest_bridge("linuxbridge", label, uri), mtu=mtu)


def guest(lab: NetLab, host: LabHost, name: str, address: str) -> str:
    """A bare namespace guest: veth ``<name>`` on the host, ``eth0`` with ``address`` inside; returns the port."""
    netns = f"{lab.prefix}-{name}"
    run(["ip", "netns", "add", netns])  # named <prefix>-*: the lab removes it
    host.exec(["ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", netns])
    lab.exec(netns, ["ip", "link", "set", "lo", "up"])
    lab.exec(netns, ["ip", "addr", "add", address, "dev", "eth0"])
    lab.exec(netns, ["ip", "link", "set", "eth0", "up"])
    return name


def ping(lab: NetLab, name: str, address: str) -> bool:
    result = lab.exec(f"{lab.prefix}-{name}", ["busybox", "ping", "-c", "2", "-W", "2", address], check=False)
    return result.returncode == 0


def links(host: LabHost) -> str:
    return host.exec(["ip", "-d", "link", "show"]).stdout


def test_vxlan_across_hosts_and_isolation(netlab: NetLab) -> None:
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    d1, d2 = LinuxBridgeDriver(netns=h1.netns), LinuxBridgeDriver(netns=h2.netns)
    red, blue = segment("vxlan://5001"), segment("vxlan://70000")

    async def wire() -> None:
        for driver, host, suffix in ((d1, h1, "1"), (d2, h2, "2")):
            for seg in (red, blue):
                await driver.ensure_segment(seg)
                await driver.ensure_segment(seg)  # idempotent
        await d1.plug(red, guest(netlab, h1, "ra", "10.1.1.11/24"))
        await d2.plug(red, guest(netlab, h2, "rb", "10.1.1.12/24"))
        await d2.plug(blue, guest(netlab, h2, "bb", "10.1.1.13/24"))  # same subnet, other VNI
        await d2.plug(blue, "bb")

    asyncio.run(wire())
    detail = h1.exec(["ip", "-d", "link", "show", "vxlan5001"]).stdout
    assert "vxlan id 5001 group 239.0.19.137 dev cloudbr0" in detail and "dstport 4789" in detail
    assert "master brvx-5001" in detail and "mtu 1450" in detail
    assert "group 239.1.17.112" in h1.exec(["ip", "-d", "link", "show", "vxlan70000"]).stdout
    assert ping(netlab, "ra", "10.1.1.12"), "red guests on two hosts reach each other over VXLAN"
    assert not ping(netlab, "ra", "10.1.1.13"), "a guest of another VNI is not reachable"
    assert asyncio.run(d2.ports(red)) == ["rb"]
    found = sorted(asyncio.run(d2.segments()), key=lambda s: s.bridge)
    assert [(s.bridge, s.broadcast_uri, s.traffic_label, s.mtu) for s in found] == [
        ("brvx-5001", "vxlan://5001", "cloudbr0", 1450), ("brvx-70000", "vxlan://70000", "cloudbr0", 1450)]


def test_release_only_when_unused(netlab: NetLab) -> None:
    h1 = netlab.add_host("h1")
    driver = LinuxBridgeDriver(netns=h1.netns)
    seg = segment("vxlan://42")

    async def scenario() -> None:
        await driver.ensure_segment(seg)
        port = guest(netlab, h1, "ga", "10.2.0.2/24")
        await driver.plug(seg, port)
        await driver.release_segment(seg)
        assert "brvx-42" in links(h1), "a segment with a port stays"
        await driver.unplug(seg, port)
        await driver.unplug(seg, port)      # idempotent
        await driver.unplug(seg, "nosuch")  # a port already gone
        await driver.release_segment(seg)
        assert "brvx-42" not in links(h1) and "vxlan42" not in links(h1)
        await driver.release_segment(seg)   # idempotent

    asyncio.run(scenario())


def test_untagged_segment_uses_the_label_bridge(netlab: NetLab) -> None:
    h1 = netlab.add_host("h1")
    driver = LinuxBridgeDriver(netns=h1.netns)
    flat = segment(None, mtu=1500)

    async def scenario() -> None:
        assert await driver.bridge_exists("cloudbr0") and not await driver.bridge_exists("eth0")
        await driver.ensure_segment(flat)
        port = guest(netlab, h1, "fa", f"{h1.underlay_ip[:-2]}99/24")
        await driver.plug(flat, port)
        await driver.release_segment(flat)  # never removes the label bridge

    asyncio.run(scenario())
    assert "cloudbr0" in links(h1)
    assert ping(netlab, "fa", h1.underlay_ip)


def test_vlan_refused_without_8021q(netlab: NetLab) -> None:
    if os.path.isdir("/proc/net/vlan"):
        pytest.skip(reason="this kernel has 802.1Q support; the refusal is for kernels without it")
    h1 = netlab.add_host("h1")
    with pytest.raises(NetworkError, match="cannot make 802.1Q VLAN devices"):
        asyncio.run(LinuxBridgeDriver(netns=h1.netns).ensure_segment(segment("vlan://100", mtu=1500)))


def test_clear_errors(netlab: NetLab) -> None:
    h1 = netlab.add_host("h1")
    driver = LinuxBridgeDriver(netns=h1.netns)
    with pytest.raises(NetworkError, match="'cloudbr9' does not exist"):
        asyncio.run(driver.ensure_segment(segment("vxlan://7", label="cloudbr9")))
    with pytest.raises(NetworkError, match="MTU of at least 1550"):
        asyncio.run(driver.ensure_segment(segment("vxlan://7", label="cloudbr1", mtu=1500)))
    with pytest.raises(NetworkError, match="does not exist"):
        asyncio.run(LinuxBridgeDriver(netns=f"{netlab.prefix}-gone").bridge_exists("cloudbr0"))
    assert not os.path.exists(f"/run/netns/{netlab.prefix}-gone")
