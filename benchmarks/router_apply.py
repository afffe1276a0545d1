"""Virtual router apply cost: rendering and loading the ruleset and dnsmasq files of a router with N leases,
N port forwards, N firewall rules and a load balancer of N members (N = 10, 100, 1000).

Per N:

* render: ``hostagent.router.nftables.render`` and ``hostagent.router.dnsmasq.render`` (pure), median of runs;
* apply for real with the agent's own :class:`~hostagent.router.runtime.RouterRuntime` (real ``ip netns``,
  ``nft``, ``sysctl``, ``ethtool``, pyroute2, dnsmasq; the simulator network driver, so no segment is
  plugged) in a throwaway "host" namespace: the first apply (namespace, ruleset, veths, dnsmasq start), an
  unchanged apply (what every resync costs: digest checks only), a forced ``nft -f`` of the same ruleset
  (an atomic table replace) and ``nft list table`` (the digest check alone);
* dnsmasq: a restart until its pidfile names it and until its log says it read the N-line hosts files, and a
  new lease applied (SIGHUP) until dnsmasq has re-read both hosts files.

Every namespace, process and file is removed at the end (teardown through the runtime, then the host namespace).

    sudo .venv/bin/python -m benchmarks.router_apply [--sizes 10,100,1000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record  # noqa: E402
from controllers.api.v1alpha1.virtualrouter import VirtualRouterSpec  # noqa: E402
from hostagent.drivers.network.simulator import SimulatorNetworkDriver  # noqa: E402
from hostagent.executor import SubprocessExecutor  # noqa: E402
from hostagent.router import dnsmasq, nftables  # noqa: E402
from hostagent.router.runtime import RouterRuntime  # noqa: E402

SHARED = "machine shared with other engineers' test runs"
PUBLIC_IP = "203.0.113.10"


def spec(n: int, network_uid: str, extra_lease: bool = False) -> VirtualRouterSpec:
    """A router on 10.8.0.0/20 with ``n`` of everything."""
    def guest(i: int) -> str:
        return f"10.8.{(10 + i) // 256}.{(10 + i) % 256}"

    leases = [{"macAddress": f"02:00:0a:08:{i // 256:02x}:{i % 256:02x}", "ipAddress": guest(i), "hostname": f"g{i}"}
              for i in range(n + (1 if extra_lease else 0))]
    port_forwards = [{"name": f"pf{i}", "publicIp": PUBLIC_IP, "protocol": "TCP" if i % 2 else "UDP",
                      "publicPortStart": 10000 + i, "publicPortEnd": 10000 + i, "privateIp": guest(i),
                      "privatePortStart": 80 if i % 3 else 10000 + i} for i in range(n)]
    firewall = [{"publicIp": PUBLIC_IP, "protocol": "TCP", "portStart": 10000 + i, "portEnd": 10000 + i,
                 "cidrs": [f"198.51.{i // 256}.{i % 256}/32", "192.0.2.0/24"]} for i in range(n)]
    raw = {
        "network": "bench", "networkUid": network_uid, "host": "bench",
        "guest": {"segment": {"trafficLabel": "cloudbr0", "broadcastUri": "vxlan://4242", "bridge": "brvx-4242",
                              "mtu": 1450},
                  "macAddress": "02:00:0a:08:00:01", "addresses": ["10.8.0.1/20"]},
        "gateway": "10.8.0.1",
        "public": {"segment": {"trafficLabel": "cloudbr1", "bridge": "cloudbr1"}, "macAddress": "02:00:cb:00:71:0a",
                   "addresses": [f"{PUBLIC_IP}/24", "203.0.113.11/24"]},
        "publicGateway": "203.0.113.1", "sourceNatIp": PUBLIC_IP, "dnsServers": ["203.0.113.1"],
        "leases": leases, "firewall": firewall, "portForwards": port_forwards,
        "loadBalancers": [{"name": "lb", "publicIp": "203.0.113.11", "publicPort": 80, "privatePort": 8080,
                           "members": [guest(i) for i in range(n)]}],
        "staticNats": [],
    }
    return VirtualRouterSpec.model_validate(raw)


def median_seconds(function, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)


def timed_cmd(argv: list[str], repeat: int) -> float:
    return median_seconds(lambda: sh(argv), repeat)


def wait_log(path: str, marker: str, count: int, deadline: float = 20.0) -> float:
    """Seconds until ``path`` holds ``count`` lines containing ``marker``."""
    started = time.perf_counter()
    while time.perf_counter() - started < deadline:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            text = ""
        if text.count(marker) >= count:
            return time.perf_counter() - started
        time.sleep(0.002)
    raise TimeoutError(f"{path}: {count} x {marker!r} not seen within {deadline}s")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


async def measure(n: int, host_netns: str, state_dir: str, repeat: int) -> str:
    network_uid = str(uuid.uuid4())
    router_spec = spec(n, network_uid)
    paths_probe = dnsmasq.Paths("/nonexistent")
    render_nft = median_seconds(lambda: nftables.render(router_spec), repeat)
    render_dns = median_seconds(lambda: dnsmasq.render(router_spec, paths_probe), repeat)
    ruleset = nftables.render(router_spec)
    rule_lines = sum(1 for line in ruleset.text.splitlines() if line.startswith("    ") and "type " not in line)

    runtime = RouterRuntime(state_dir, host_netns, SubprocessExecutor(concurrency=4))
    driver = SimulatorNetworkDriver()
    netns = runtime.netns(network_uid)
    paths = runtime.paths(network_uid)
    owner = None
    try:
        started = time.perf_counter()
        applied = await runtime.apply(router_spec, namespace="bench", name="bench", uid="u", network=driver)
        first_apply = time.perf_counter() - started
        assert "nftables" in applied.changed and "dnsmasq started" in applied.changed, applied.changed
        first_ready = wait_log(paths.log, f"read {paths.addn_hosts}", 1)  # usually already there

        started = time.perf_counter()
        applied = await runtime.apply(router_spec, namespace="bench", name="bench", uid="u", network=driver)
        noop_apply = time.perf_counter() - started
        assert applied.changed == [], applied.changed

        ruleset_file = os.path.join(paths.directory, "nftables.nft")
        nft_load = timed_cmd(["ip", "netns", "exec", netns, "nft", "-f", ruleset_file], repeat=3)
        nft_list = timed_cmd(["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "cumulo"], repeat=3)
        # A fresh table (what the first apply loaded): table gone, then loaded.
        sh(["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "cumulo"])
        started = time.perf_counter()
        sh(["ip", "netns", "exec", netns, "nft", "-f", ruleset_file])
        nft_fresh = time.perf_counter() - started

        # dnsmasq restart: stopped, then converged by the runtime (start until the pidfile names it).
        files = dnsmasq.render(router_spec, paths)
        pid = runtime.dnsmasq_pid(netns, paths)
        assert pid is not None
        await runtime._stop(pid)
        reads_before = Path(paths.log).read_text().count(f"read {paths.dhcp_hosts}")
        started = time.perf_counter()
        pid, what = await runtime._dnsmasq(netns, paths, files)
        dnsmasq_start = time.perf_counter() - started
        assert what in ("dnsmasq started", "dnsmasq restarted"), what
        wait_log(paths.log, f"read {paths.dhcp_hosts}", reads_before + 1)
        wait_log(paths.log, f"read {paths.addn_hosts}", reads_before + 1)
        dnsmasq_ready = time.perf_counter() - started

        # One more lease: an apply that SIGHUPs dnsmasq, which re-reads both hosts files.
        bigger = spec(n, network_uid, extra_lease=True)
        reads = Path(paths.log).read_text().count(f"read {paths.addn_hosts}")
        started = time.perf_counter()
        applied = await runtime.apply(bigger, namespace="bench", name="bench", uid="u", network=driver)
        reload_apply = time.perf_counter() - started
        assert applied.changed == ["dnsmasq reloaded"], applied.changed
        wait_log(paths.log, f"read {paths.addn_hosts}", reads + 1)
        wait_log(paths.log, f"read {paths.dhcp_hosts}", reads + 1)
        reloaded = time.perf_counter() - started
        assert runtime.dnsmasq_pid(netns, paths) == pid, "a new lease must not restart dnsmasq"

        owner = runtime.owner(network_uid)
        started = time.perf_counter()
        await runtime.teardown(network_uid, owner, driver)
        teardown = time.perf_counter() - started
        owner = None
    finally:
        if runtime.owner(network_uid) is not None or netns in runtime.namespaces():
            await runtime.teardown(network_uid, runtime.owner(network_uid), driver)

    return (f"N={n}: render nftables {ms(render_nft)} ({rule_lines} rule lines, {len(ruleset.text) / 1024:,.0f} KiB), "
            f"dnsmasq {ms(render_dns)}; first apply {ms(first_apply)} (+{ms(first_ready)} until dnsmasq logged its "
            f"hosts files), unchanged apply {ms(noop_apply)}; nft -f fresh table {ms(nft_fresh)}, replace "
            f"{ms(nft_load)}, nft list table {ms(nft_list)}; dnsmasq start {ms(dnsmasq_start)} (hosts files read "
            f"{ms(dnsmasq_ready)}); new lease apply {ms(reload_apply)}, SIGHUP re-read done {ms(reloaded)}; "
            f"teardown {ms(teardown)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=5, help="runs per render timing")
    parser.add_argument("--no-write", "--no-record", dest="no_write", action="store_true",
                        help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("router_apply needs root (network namespaces, nftables, dnsmasq)")
    for binary in ("nft", "dnsmasq", "ethtool", "ip"):
        if shutil.which(binary) is None:
            sys.exit(f"router_apply needs {binary}")
    host_netns = f"bra{uuid.uuid4().hex[:4]}"  # a throwaway "host"; routers are named <host_netns>-vr-<uid8>
    state_dir = tempfile.mkdtemp(prefix="cumulo-bench-router-")
    lines = []
    sh(["ip", "netns", "add", host_netns])
    try:
        sh(["ip", "netns", "exec", host_netns, "ip", "link", "set", "lo", "up"])
        for n in (int(size) for size in args.sizes.split(",")):
            lines.append(asyncio.run(measure(n, host_netns, state_dir, args.repeat)))
            print(lines[-1], flush=True)
    finally:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
            name = name.split(" ")[0]
            if name.startswith(f"{host_netns}-vr-"):
                subprocess.run(["ip", "netns", "delete", name], check=False)
        subprocess.run(["ip", "netns", "delete", host_netns], check=False)
        shutil.rmtree(state_dir, ignore_errors=True)
    lines.append(SHARED)
    record("Virtual router apply", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
