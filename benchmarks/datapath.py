"""Guest datapath: TCP throughput and ping RTT between network-namespace endpoints on simulated hosts.

A :class:`cumulo.netlab.NetLab` of hosts (network namespaces on a root-namespace underlay bridge) and guests
(namespaces whose veth the host's network driver plugs into a segment), measured pairwise:

* baseline: two guests on the same Linux-bridge host and VXLAN segment (no tunnel: the local bridge);
* (a) Linux bridge, VXLAN segment across two hosts (the kernel's vxlan device, ``LinuxBridgeDriver``);
* (b) Open vSwitch, VLAN segment across two hosts (userspace ``netdev`` datapath of a private ovs-vswitchd per
  host, ``OpenVSwitchDriver``); the userspace datapath is known to be slow: this measures it;
* (c) a guest on host 2 reaching the "internet" namespace through its network's virtual router on host 1
  (``RouterRuntime`` with the Linux bridge driver): VXLAN to the router, nftables forward + source NAT, out
  of the router's public interface onto the public network.

Throughput: a Python receiver counts what one TCP connection delivers; a Python sender writes up to ``--mb`` MB
(stopping early at ``--seconds``) in 256 KiB writes. RTT: ``busybox ping -A`` (next ping as soon as the reply
came), 200 pings of 56 bytes; min/avg/max as busybox reports them.

    sudo .venv/bin/python -m benchmarks.datapath [--mb 200] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from controllers.api.v1alpha1.network import Segment, broadcast_uri, guest_bridge  # noqa: E402
from controllers.api.v1alpha1.virtualrouter import VirtualRouterSpec  # noqa: E402
from cumulo import netlab as netlab_module  # noqa: E402
from cumulo import ovs  # noqa: E402
from cumulo.netlab import LabHost, NetLab  # noqa: E402
from hostagent.drivers.network.linuxbridge import LinuxBridgeDriver  # noqa: E402
from hostagent.drivers.network.openvswitch import OpenVSwitchDriver  # noqa: E402
from hostagent.executor import SubprocessExecutor  # noqa: E402
from hostagent.router.runtime import RouterRuntime  # noqa: E402

SHARED = "machine shared with other engineers' test runs"
PORT = 5201

RECEIVER = """
import socket, sys, time
with socket.create_server(("0.0.0.0", int(sys.argv[1]))) as server:
    print("listening", flush=True)
    server.settimeout(30)
    connection, _ = server.accept()
    connection.settimeout(30)
    buffer = bytearray(1 << 18)
    total, started = 0, time.perf_counter()
    while count := connection.recv_into(buffer):
        total += count
    print(total, time.perf_counter() - started, flush=True)
"""
SENDER = """
import socket, sys, time
size, seconds = int(sys.argv[3]), float(sys.argv[4])
chunk = memoryview(bytes(range(256)) * 1024)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    sent, deadline = 0, time.monotonic() + seconds
    while sent < size and time.monotonic() < deadline:
        connection.sendall(chunk)
        sent += len(chunk)
    connection.shutdown(socket.SHUT_WR)
"""


def throughput(lab: NetLab, sender: LabHost, receiver: LabHost, address: str, size: int, seconds: float) -> str:
    listener = lab.popen(receiver.netns, [sys.executable, "-c", RECEIVER, str(PORT)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        sender.exec([sys.executable, "-c", SENDER, address, str(PORT), str(size), str(seconds)],
                    timeout=seconds + 40)
        total, elapsed = listener.stdout.readline().split()
        listener.wait(10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
    megabytes = int(total) / 1e6
    return f"TCP {megabytes:,.0f} MB in {float(elapsed):.2f} s = {megabytes / float(elapsed):,.0f} MB/s " \
           f"({megabytes * 8 / float(elapsed):,.0f} Mbit/s)"


def rtt(source: LabHost, address: str, count: int = 200) -> str:
    result = source.exec(["busybox", "ping", "-q", "-A", "-c", str(count), "-W", "5", address], check=False,
                         timeout=60)
    match = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", result.stdout)
    loss = re.search(r"(\d+)% packet loss", result.stdout)
    if not match:
        return f"ping failed: {result.stdout.strip()[-200:]} {result.stderr.strip()[-200:]}"
    low, avg, high = (float(value) for value in match.groups())
    return f"ping RTT avg {avg * 1e3:,.0f} µs (min {low * 1e3:,.0f}, max {high * 1e3:,.0f}; " \
           f"{loss.group(1) if loss else '?'}% loss of {count})"


def guest(lab: NetLab, host: LabHost, name: str, address: str, mtu: int, *, offload_off: bool = False,
          gateway: str | None = None) -> LabHost:
    """A namespace guest whose veth ``v<name>`` on ``host`` is still to be plugged."""
    ns = lab.add_namespace(name, host=host, port=f"{lab.prefix}{name}", address=address, mtu=mtu)
    if offload_off:
        ovs.disable_tx_offload(ns.netns, "eth0")
    if gateway:
        ns.exec(["ip", "route", "add", "default", "via", gateway])
    return ns


def measure_pair(lab: NetLab, a: LabHost, b: LabHost, address: str, args: argparse.Namespace) -> str:
    assert a.ping(address, count=3, wait=3), f"{a.name} cannot reach {address}"
    return f"{throughput(lab, a, b, address, args.mb * 1_000_000, args.seconds)}; {rtt(a, address)}"


def linuxbridge_and_router(args: argparse.Namespace, lines: list[str]) -> None:
    with NetLab() as lab:
        h1, h2 = lab.add_host("h1"), lab.add_host("h2")
        public = lab.add_public("203.0.113.1/24")
        vni = 4000 + os.getpid() % 1000
        uri = broadcast_uri("VXLAN", vni)
        seg = Segment(traffic_label="cloudbr0", broadcast_uri=uri, bridge=guest_bridge("linuxbridge", "cloudbr0", uri),
                      mtu=1450)
        g1 = guest(lab, h1, "g1", "10.7.0.11/24", 1450)
        g3 = guest(lab, h1, "g3", "10.7.0.13/24", 1450)
        g2 = guest(lab, h2, "g2", "10.7.0.12/24", 1450, gateway="10.7.0.1")
        d1, d2 = LinuxBridgeDriver(netns=h1.netns), LinuxBridgeDriver(netns=h2.netns)

        async def plug() -> None:
            for driver, host_guests in ((d1, (g1, g3)), (d2, (g2,))):
                await driver.ensure_segment(seg)
                for g in host_guests:
                    await driver.plug(seg, f"{lab.prefix}{g.name}")

        asyncio.run(plug())
        lines.append(f"baseline, Linux bridge, same host and segment (MTU 1450): "
                     f"{measure_pair(lab, g1, g3, '10.7.0.13', args)}")
        lines.append(f"(a) Linux bridge, VXLAN across two hosts (MTU 1450): {measure_pair(lab, g2, g1, '10.7.0.11', args)}")

        if args.skip_router:
            return
        # (c) the network's router on h1: guest g2 (on h2) -> VXLAN -> router -> SNAT -> public namespace.
        network_uid = str(uuid.uuid4())
        spec = VirtualRouterSpec.model_validate({
            "network": "bench", "networkUid": network_uid, "host": "h1",
            "guest": {"segment": seg.model_dump(by_alias=True, mode="json"), "macAddress": "02:00:0a:07:00:01",
                      "addresses": ["10.7.0.1/24"]},
            "gateway": "10.7.0.1",
            "public": {"segment": {"trafficLabel": "cloudbr1", "bridge": "cloudbr1"},
                       "macAddress": "02:00:cb:00:71:0a", "addresses": ["203.0.113.10/24"]},
            "publicGateway": "203.0.113.1", "sourceNatIp": "203.0.113.10", "dhcp": False, "dns": False,
        })
        state_dir = tempfile.mkdtemp(prefix="cumulo-bench-datapath-")
        runtime = RouterRuntime(state_dir, h1.netns, SubprocessExecutor())
        try:
            asyncio.run(runtime.apply(spec, namespace="bench", name="bench", uid="u", network=d1))
            lines.append(f"(c) guest on host 2 → VXLAN → virtual router on host 1 (nftables forward + SNAT) → "
                         f"public namespace: {measure_pair(lab, g2, public, '203.0.113.1', args)}")
        finally:
            asyncio.run(runtime.teardown(network_uid, runtime.owner(network_uid), d1))
            subprocess.run(["rm", "-rf", state_dir], check=False)


def openvswitch(args: argparse.Namespace, lines: list[str]) -> None:
    reason = ovs.unavailable_reason()
    if reason is not None:
        lines.append(f"(b) Open vSwitch skipped: {reason}")
        return
    with NetLab() as lab:
        started = time.perf_counter()
        h1, h2 = lab.add_host("h1", vswitch="openvswitch"), lab.add_host("h2", vswitch="openvswitch")
        ready = time.perf_counter() - started
        uri = broadcast_uri("VLAN", 100)
        seg = Segment(vswitch="openvswitch", traffic_label="cloudbr0", broadcast_uri=uri,
                      bridge=guest_bridge("openvswitch", "cloudbr0", uri), mtu=1500)
        o1 = guest(lab, h1, "o1", "10.9.0.1/24", 1500, offload_off=True)
        o2 = guest(lab, h2, "o2", "10.9.0.2/24", 1500, offload_off=True)

        async def plug() -> None:
            for host, g in ((h1, o1), (h2, o2)):
                driver = OpenVSwitchDriver(netns=host.netns, ovsdb=ovs.lab_switch(host.netns).db_url)
                try:
                    await driver.ensure_segment(seg)
                    await driver.plug(seg, f"{lab.prefix}{g.name}")
                finally:
                    await driver.close()

        asyncio.run(plug())
        lines.append(f"(b) Open vSwitch netdev (userspace datapath), VLAN 100 across two hosts (MTU 1500; two OVS "
                     f"hosts ready in {ready:.1f} s): {measure_pair(lab, o1, o2, '10.9.0.2', args)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="megabytes per TCP transfer")
    parser.add_argument("--seconds", type=float, default=15.0, help="a transfer stops sending after this")
    parser.add_argument("--skip-router", action="store_true")
    parser.add_argument("--skip-ovs", action="store_true")
    parser.add_argument("--no-write", "--no-record", dest="no_write", action="store_true",
                        help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    reason = netlab_module.unavailable_reason()
    if reason is not None:
        sys.exit(f"datapath needs a network lab: {reason}")
    netlab_module.reap_stale()
    lines: list[str] = []
    linuxbridge_and_router(args, lines)
    if not args.skip_ovs:
        openvswitch(args, lines)
    lines.append(f"single TCP connection, Python sender/receiver (256 KiB writes), up to {args.mb} MB or "
                 f"{args.seconds:g} s; {SHARED}")
    record("Guest datapath", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
