"""The virtual router on a host simulated as a network namespace: a VirtualRouter object (created here directly,
no controller involved) is run by the host's agent (linuxbridge driver) as a router namespace with dnsmasq and
nftables; network-namespace guests wired by hand on its VXLAN guest segment, and a public namespace playing the
internet, prove on the wire: DHCP fixed leases, DNS names, source NAT, port forwarding and static NAT behind the
firewall, egress policy, load balancing, teardown, and an agent killed with SIGKILL adopting everything."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import audit_writes, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.network import guest_bridge  # noqa: E402
from cumulo.netlab import LabHost, NetLab, list_netns  # noqa: E402
from hostagent.router import host_veths, netns_name  # noqa: E402

pytest_plugins = ["conftest_libvirt", "conftest_netlab"]
pytestmark = [pytest.mark.timeout(300)]

GROUP, VERSION = "cumulo.io", "v1alpha1"
ROUTER_GUEST, ROUTER_MAC = "10.1.1.1", "02:00:0a:01:01:01"
PUBLIC_GATEWAY = "203.0.113.1"
SOURCE_NAT, STATIC_NAT, BALANCED = "203.0.113.10", "203.0.113.11", "203.0.113.12"
GUESTS = {"g1": ("02:00:0a:01:01:0b", "10.1.1.11"), "g2": ("02:00:0a:01:01:0c", "10.1.1.12")}

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event handler of a test guest: configure eth0, log the event.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router"
    ;;
esac
echo "$1 ip=$ip router=$router dns=$dns domain=$domain mtu=$mtu" >> {log}
"""


def wget(lab: NetLab, netns: str, url: str, timeout: int = 2) -> str | None:
    """The body at ``url`` fetched from inside ``netns`` (None: no answer). busybox 1.35's wget crashes with
    its own -T, hence timeout(1)."""
    result = lab.exec(netns, ["timeout", str(timeout), "busybox", "wget", "-q", "-O", "-", url], check=False,
                      timeout=timeout + 10)
    return result.stdout.strip() if result.returncode == 0 else None


class Guest:
    """A network-namespace guest on the router's guest segment: DHCP client (udhcpc) and a web server answering
    its own name."""

    def __init__(self, lab: NetLab, host: LabHost, name: str, mac: str, bridge: str, directory: Path) -> None:
        self.lab, self.name = lab, name
        self.port = f"{lab.prefix}{name}"
        self.ns = lab.add_namespace(name, host=host, port=self.port, mtu=1450)
        self.netns = self.ns.netns
        self.ns.exec(["ip", "link", "set", "eth0", "address", mac])
        host.exec(["ip", "link", "set", self.port, "master", bridge])
        self.log = directory / f"{name}.dhcp.log"
        self.log.touch()
        script = directory / f"{name}.udhcpc"
        script.write_text(UDHCPC_SCRIPT.replace("{log}", str(self.log)))
        script.chmod(0o755)
        www = directory / f"{name}-www"
        www.mkdir()
        (www / "index.html").write_text(f"{name}\n")
        self.httpd = self.ns.popen(["busybox", "httpd", "-f", "-p", "80", "-h", str(www)])
        self.dhcp = self.ns.popen(["busybox", "udhcpc", "-f", "-i", "eth0", "-s", str(script), "-t", "20", "-T", "1",
                                   "-A", "1", "-O", "mtu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def events(self) -> list[str]:
        return self.log.read_text().splitlines()

    def bound(self) -> str | None:
        """The address of the last bound/renew event."""
        for line in reversed(self.events()):
            if line.startswith(("bound", "renew")):
                return line
        return None

    def renew(self) -> None:
        os.kill(self.dhcp.pid, signal.SIGUSR1)  # udhcpc: renew now


class Router:
    """Access to one VirtualRouter object."""

    def __init__(self, kube: client.ApiClient, namespace: str, name: str) -> None:
        self.custom = client.CustomObjectsApi(kube)
        self.namespace, self.name = namespace, name

    def create(self, spec: dict[str, t.Any], host: str) -> dict[str, t.Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualrouters", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualRouter",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": {"cumulo.io/host": host}},
            "spec": spec})

    def get(self) -> dict[str, t.Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualrouters",
                                                            self.name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def node(self) -> dict[str, t.Any]:
        return ((self.get() or {}).get("status") or {}).get("node") or {}

    def patch_spec(self, spec: dict[str, t.Any]) -> int:
        """Merge-patch the spec; the new generation."""
        obj = self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualrouters", self.name,
                                                         {"spec": spec})
        return int(obj["metadata"]["generation"])

    def applied(self, generation: int, timeout: float = 30.0) -> dict[str, t.Any]:
        def check() -> dict[str, t.Any] | None:
            node = self.node()
            if node.get("state") == "Error":
                raise AssertionError(f"router reports Error: {node.get('message')}")
            return node if node.get("state") == "Running" and node.get("appliedGeneration") == generation else None
        return wait_for(check, timeout=timeout, what=f"router Running at generation {generation}")

    def delete(self) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualrouters", self.name)


def table_handle(lab: NetLab, netns: str) -> int:
    """The kernel's handle of the router's nftables table: a reload (delete + create) gives a new one."""
    listing = lab.exec(netns, ["nft", "-a", "list", "table", "ip", "cumulo"]).stdout
    match = re.search(r"table ip cumulo \{ # handle (\d+)", listing)
    assert match, listing
    return int(match.group(1))


@pytest.mark.usefixtures("system_namespace")
def test_virtual_router_on_a_lab_host(netlab: NetLab, agents, kube, control_plane, tmp_path: Path) -> None:
    started = time.monotonic()
    h1 = netlab.add_host("h1")
    public = netlab.add_public(f"{PUBLIC_GATEWAY}/24")
    host = unique("vrhost")
    namespace = unique("vr")
    control_plane.kubectl("create", "namespace", namespace)
    state_dir = tmp_path / "state"
    agent_args = ["--host", host, "--hypervisor", "simulator", "--network-driver", "linuxbridge",
                  "--host-netns", h1.netns, "--state-dir", str(state_dir), "--heartbeat-interval", "2",
                  "--lease-duration", "10", "--orphan-sweep", "2", "--resync", "5"]
    agent = agents.start("agent", *agent_args)

    vni = random.randint(10000, 16000000)
    guest_uri = f"vxlan://{vni}"
    bridge = guest_bridge("linuxbridge", "cloudbr0", guest_uri)
    network_uid = str(uuid.uuid4())
    router_netns = netns_name(h1.netns, network_uid)
    leases = [{"macAddress": mac, "ipAddress": ip, "hostname": name} for name, (mac, ip) in GUESTS.items()]
    firewall_elsewhere = [  # rules for other sources: they must not open anything
        {"publicIp": SOURCE_NAT, "protocol": "TCP", "portStart": 8080, "portEnd": 8080, "cidrs": ["198.51.100.0/24"]},
        {"publicIp": STATIC_NAT, "protocol": "TCP", "portStart": 80, "portEnd": 80, "cidrs": ["198.51.100.0/24"]},
    ]
    spec = {
        "network": "net1", "networkUid": network_uid, "host": host,
        "guest": {"segment": {"trafficLabel": "cloudbr0", "broadcastUri": guest_uri, "bridge": bridge, "mtu": 1450},
                  "macAddress": ROUTER_MAC, "addresses": [f"{ROUTER_GUEST}/24"]},
        "gateway": ROUTER_GUEST,
        "public": {"segment": {"trafficLabel": "cloudbr1", "bridge": "cloudbr1"}, "macAddress": "02:00:cb:00:71:0a",
                   "addresses": [f"{SOURCE_NAT}/24", f"{STATIC_NAT}/24", f"{BALANCED}/24"]},
        "publicGateway": PUBLIC_GATEWAY, "sourceNatIp": SOURCE_NAT, "dnsServers": [PUBLIC_GATEWAY],
        "domain": "cloud.internal", "leases": leases,
        "firewall": firewall_elsewhere,
        "staticNats": [{"publicIp": STATIC_NAT, "privateIp": GUESTS["g1"][1]}],
        "portForwards": [{"name": "web", "publicIp": SOURCE_NAT, "publicPortStart": 8080, "publicPortEnd": 8080,
                          "privateIp": GUESTS["g2"][1], "privatePortStart": 80}],
        "loadBalancers": [{"name": "lb", "publicIp": BALANCED, "publicPort": 80, "privatePort": 80,
                           "members": [ip for _, ip in GUESTS.values()]}],
    }
    router = Router(kube, namespace, "net1")
    created = router.create(spec, host)
    node = router.applied(created["metadata"]["generation"], timeout=60)
    assert node["host"] == host and node["namespace"] == router_netns and node["message"] == ""
    assert router_netns in list_netns()
    pid = node["dnsmasqPid"]
    assert pid and open(f"/proc/{pid}/cmdline").read().startswith("dnsmasq")
    timings = {"router running": time.monotonic() - started}

    # -- DHCP and DNS ----------------------------------------------------------------------------------------
    guests = {name: Guest(netlab, h1, name, mac, bridge, tmp_path) for name, (mac, _) in GUESTS.items()}
    for name, guest in guests.items():
        event = wait_for(guest.bound, timeout=30, what=f"{name} DHCP lease")
        assert f"ip={GUESTS[name][1]} router={ROUTER_GUEST} dns={ROUTER_GUEST} domain=cloud.internal mtu=1450" \
            in event, event
    stranger = netlab.add_namespace("g3", host=h1, port=f"{netlab.prefix}g3", mtu=1450)
    h1.exec(["ip", "link", "set", f"{netlab.prefix}g3", "master", bridge])
    unknown = stranger.exec(["busybox", "udhcpc", "-n", "-q", "-i", "eth0", "-t", "2", "-T", "1", "-s", "/bin/true"],
                            check=False)
    assert unknown.returncode != 0, "a MAC without lease got an address"
    # A new lease: dnsmasq re-reads its hosts files (SIGHUP), keeps running, and serves the new guest. This one is
    # not the guest's default NIC: no router, no DNS server offered.
    stranger_mac = stranger.exec(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    leases.append({"macAddress": stranger_mac, "ipAddress": "10.1.1.13", "hostname": "g3", "default": False})
    node = router.applied(router.patch_spec({"leases": leases}))
    assert node["dnsmasqPid"] == pid, "dnsmasq was restarted for a new lease"
    g3_log = tmp_path / "g3.dhcp.log"
    (tmp_path / "g3.udhcpc").write_text(UDHCPC_SCRIPT.replace("{log}", str(g3_log)))
    (tmp_path / "g3.udhcpc").chmod(0o755)
    stranger.exec(["busybox", "udhcpc", "-n", "-q", "-i", "eth0", "-t", "5", "-T", "1", "-s",
                   str(tmp_path / "g3.udhcpc")])
    assert "bound ip=10.1.1.13 router= dns= domain=cloud.internal" in g3_log.read_text(), g3_log.read_text()
    for query in ("g2", "g2.cloud.internal"):
        answer = guests["g1"].ns.exec(["busybox", "nslookup", query, ROUTER_GUEST], check=False).stdout
        assert f"Address: {GUESTS['g2'][1]}" in answer, answer
    # Other names go to the upstream resolver (dnsServers): a dnsmasq on the public side knows example.test.
    public.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                  f"--listen-address={PUBLIC_GATEWAY}", "--bind-interfaces", "--pid-file=",
                  "--address=/example.test/198.51.100.7"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: "198.51.100.7" in guests["g1"].ns.exec(["busybox", "nslookup", "example.test", ROUTER_GUEST],
                                                            check=False).stdout,
             timeout=10, what="example.test resolved through the router")
    timings["dhcp + dns"] = time.monotonic() - started

    # -- source NAT: the internet sees the source NAT address -----------------------------------------------
    www = tmp_path / "public-www"
    www.mkdir()
    (www / "index.html").write_text("internet\n")
    access_log = tmp_path / "public-httpd.log"
    public.popen(["busybox", "httpd", "-f", "-vv", "-p", "80", "-h", str(www)], stderr=access_log.open("w"))
    wait_for(lambda: wget(netlab, public.netns, "http://127.0.0.1/") == "internet", timeout=10, what="public httpd")
    assert wget(netlab, guests["g2"].netns, f"http://{PUBLIC_GATEWAY}/") == "internet"
    assert wait_for(lambda: f":{SOURCE_NAT}]:" in access_log.read_text(), timeout=5, what="access log line"), \
        access_log.read_text()
    # A static NAT guest leaves as its own public address.
    assert wget(netlab, guests["g1"].netns, f"http://{PUBLIC_GATEWAY}/") == "internet"
    assert wait_for(lambda: f":{STATIC_NAT}]:" in access_log.read_text(), timeout=5, what="static NAT source")

    # -- firewall: rules for other sources open nothing ------------------------------------------------------
    assert wget(netlab, public.netns, f"http://{SOURCE_NAT}:8080/") is None, "port forward open without a rule"
    assert wget(netlab, public.netns, f"http://{STATIC_NAT}/") is None, "static NAT open without a rule"
    assert wget(netlab, public.netns, f"http://{BALANCED}/") is None, "load balancer open without a rule"

    # The right rules open port forwarding, static NAT and the balancer; egress now denied by default.
    firewall = [*firewall_elsewhere,
                {"publicIp": SOURCE_NAT, "protocol": "TCP", "portStart": 8080, "portEnd": 8080,
                 "cidrs": ["203.0.113.0/24"]},
                {"publicIp": STATIC_NAT, "protocol": "TCP", "portStart": 80, "portEnd": 80},
                {"publicIp": BALANCED, "protocol": "TCP", "portStart": 80, "portEnd": 80, "cidrs": ["0.0.0.0/0"]}]
    router.applied(router.patch_spec({"firewall": firewall, "egressDefaultAllow": False}))
    assert wget(netlab, public.netns, f"http://{SOURCE_NAT}:8080/") == "g2"
    assert wget(netlab, public.netns, f"http://{STATIC_NAT}/") == "g1"
    assert wget(netlab, public.netns, f"http://{SOURCE_NAT}:8081/") is None  # nothing forwarded there
    # Hairpin: a guest reaches a port forward of its own network's public address.
    assert wget(netlab, guests["g1"].netns, f"http://{SOURCE_NAT}:8080/") == "g2"

    # -- load balancer: connections spread over both members ---------------------------------------------------
    answers = collections.Counter(wget(netlab, public.netns, f"http://{BALANCED}/") for _ in range(10))
    assert answers == {"g1": 5, "g2": 5}, answers

    # -- egress: default deny blocks, an egress rule opens -----------------------------------------------------
    assert wget(netlab, guests["g2"].netns, f"http://{PUBLIC_GATEWAY}/") is None, "egress not denied"
    router.applied(router.patch_spec({"egress": [{"protocol": "TCP", "portStart": 80, "portEnd": 80,
                                                  "cidrs": [f"{PUBLIC_GATEWAY}/32"]}]}))
    assert wget(netlab, guests["g2"].netns, f"http://{PUBLIC_GATEWAY}/") == "internet"
    assert not guests["g2"].ns.ping(PUBLIC_GATEWAY), "egress rule for TCP 80 let ICMP out"
    timings["nat + firewall + lb + egress"] = time.monotonic() - started

    # -- agent killed: everything adopted, nothing re-applied --------------------------------------------------
    node = router.node()
    generation = node["appliedGeneration"]
    handle = table_handle(netlab, router_netns)
    counters = netlab.exec(router_netns, ["nft", "list", "chain", "ip", "cumulo", "firewall"]).stdout
    orphan = netns_name(h1.netns, "deadbeef" + network_uid[8:])  # a router namespace nobody explains
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    agent.kill()
    killed_at = time.time()
    restarted = agents.start("agent-2", *agent_args)
    wait_for(lambda: any(r.get("msg") == "router running" for r in restarted.log_records()), timeout=30,
             what="restarted agent adopting the router")
    wait_for(lambda: orphan not in list_netns(), timeout=30, what="orphan router namespace removed")
    assert router.node() == node, "status.node was rewritten after the restart"
    assert router.node()["dnsmasqPid"] == pid and open(f"/proc/{pid}/cmdline").read().startswith("dnsmasq")
    assert table_handle(netlab, router_netns) == handle, "the ruleset was reloaded"
    writes = audit_writes(control_plane, restarted.user, killed_at)
    assert "virtualrouters/status" not in writes, writes
    records = [r for r in restarted.log_records() if r.get("msg") == "router configured"]
    assert records == [], records
    # The lease renews from the same dnsmasq; forwarding still works.
    before = len(guests["g1"].events())
    guests["g1"].renew()
    wait_for(lambda: any(line.startswith("renew") for line in guests["g1"].events()[before:]), timeout=15,
             what="g1 lease renewal")
    assert f"ip={GUESTS['g1'][1]}" in guests["g1"].events()[-1]
    assert wget(netlab, public.netns, f"http://{SOURCE_NAT}:8080/") == "g2"
    assert router.node()["appliedGeneration"] == generation
    later = netlab.exec(router_netns, ["nft", "list", "chain", "ip", "cumulo", "firewall"]).stdout
    assert later != counters  # the same counters kept counting (not reset by a reload)
    timings["restart adopted"] = time.monotonic() - started

    # -- dnsmasq killed: the agent starts it again; the lease file keeps the leases --------------------------
    os.kill(pid, signal.SIGKILL)
    pid = wait_for(lambda: (p := router.node().get("dnsmasqPid")) != pid and p, timeout=20, what="dnsmasq restarted")
    before = len(guests["g2"].events())
    guests["g2"].renew()
    wait_for(lambda: any(line.startswith("renew") for line in guests["g2"].events()[before:]), timeout=15,
             what="g2 lease renewal from the new dnsmasq")
    assert f"ip={GUESTS['g2'][1]}" in guests["g2"].events()[-1]

    # -- the router namespace deleted under the agent: rebuilt from the spec ------------------------------------
    subprocess.run(["ip", "netns", "delete", router_netns], check=True)
    wait_for(lambda: router_netns in list_netns() and wget(netlab, public.netns, f"http://{SOURCE_NAT}:8080/") == "g2",
             timeout=30, what="router rebuilt")
    pid = wait_for(lambda: (p := router.node().get("dnsmasqPid")) != pid and p, timeout=20, what="new dnsmasq")
    config = f"--conf-file={state_dir}/routers/{network_uid}/"
    stale = subprocess.run(["pgrep", "-f", "--", config], capture_output=True, text=True).stdout.split()
    assert stale == [str(pid)], f"dnsmasq processes of this router: {stale}, reported {pid}"
    before = len(guests["g1"].events())
    guests["g1"].renew()
    wait_for(lambda: any(line.startswith("renew") for line in guests["g1"].events()[before:]), timeout=15,
             what="g1 lease renewal from the rebuilt router")
    timings["dnsmasq and namespace rebuilt"] = time.monotonic() - started

    # -- the object goes: the router goes ------------------------------------------------------------------
    router.delete()
    wait_for(lambda: router_netns not in list_netns(), timeout=30, what="router namespace removed")
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    ports = h1.exec(["ip", "-o", "link", "show"]).stdout
    assert not any(port in ports for port in host_veths(network_uid)), ports
    wait_for(lambda: not (state_dir / "routers" / network_uid).exists(), timeout=10, what="state directory removed")
    timings["torn down"] = time.monotonic() - started
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))


def test_every_kind_of_rule_loads_into_the_kernel(tmp_path: Path) -> None:
    """The renderer's whole vocabulary (shifted port ranges over UDP, both balancing algorithms, ICMP and
    CIDR-limited firewall rules, egress exceptions) is accepted by nft and the kernel, twice in a row."""
    from controllers.api.v1alpha1.virtualrouter import VirtualRouterSpec
    from hostagent.router import nftables

    if os.geteuid() != 0:
        pytest.skip(reason="network namespaces need root")
    spec = VirtualRouterSpec.model_validate({
        "network": "n", "networkUid": str(uuid.uuid4()), "host": "h",
        "guest": {"segment": {"trafficLabel": "cloudbr0", "bridge": "cloudbr0"}, "macAddress": ROUTER_MAC,
                  "addresses": [f"{ROUTER_GUEST}/24"]},
        "public": {"segment": {"trafficLabel": "cloudbr1", "bridge": "cloudbr1"}, "macAddress": "02:00:cb:00:71:0a",
                   "addresses": [f"{SOURCE_NAT}/24", f"{STATIC_NAT}/24", f"{BALANCED}/24"]},
        "publicGateway": PUBLIC_GATEWAY, "sourceNatIp": SOURCE_NAT, "egressDefaultAllow": False,
        "firewall": [{"publicIp": SOURCE_NAT, "protocol": "UDP", "portStart": 5000, "portEnd": 5009,
                      "cidrs": ["198.51.100.0/24", "192.0.2.0/25"]},
                     {"publicIp": STATIC_NAT, "protocol": "ICMP", "icmpType": 8, "icmpCode": 0},
                     {"publicIp": BALANCED, "protocol": "All"}],
        "egress": [{"protocol": "TCP", "portStart": 443, "cidrs": ["0.0.0.0/0"]}, {"protocol": "ICMP"}],
        "staticNats": [{"publicIp": STATIC_NAT, "privateIp": "10.1.1.11"}],
        "portForwards": [{"name": "udp", "publicIp": SOURCE_NAT, "protocol": "UDP", "publicPortStart": 5000,
                          "publicPortEnd": 5009, "privateIp": "10.1.1.12", "privatePortStart": 6000,
                          "sourceCidrs": ["198.51.100.0/24"]}],
        "loadBalancers": [{"name": name, "publicIp": BALANCED, "publicPort": port, "privatePort": 80,
                           "algorithm": algorithm, "members": ["10.1.1.11", "10.1.1.12", "10.1.1.13"]}
                          for name, port, algorithm in (("rr", 80, "RoundRobin"), ("src", 81, "Source"),
                                                        ("lc", 82, "LeastConn"))],
    })
    ruleset = nftables.render(spec)
    path = tmp_path / "router.nft"
    path.write_text(ruleset.text)
    netns = unique("vrnft")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for _ in range(2):  # the second load replaces the first (the transaction creates, deletes, defines)
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", str(path)], check=True, capture_output=True)
        listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "cumulo"], check=True,
                                 capture_output=True, text=True).stdout
        assert nftables.applied_digest(listing) == ruleset.digest
        assert "udp dport map { 5000 : 6000," in listing and "jhash ip saddr mod 3" in listing
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
