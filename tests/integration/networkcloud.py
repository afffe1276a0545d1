"""A cloud of hosts simulated as network namespaces, for the guest-network tests: the control plane, the controller,
one agent per lab host (``--host-netns``), an advanced or basic zone over the lab's bridges, and helpers to run
commands in guests (netns guests: ``--hypervisor netns``) and on the public side.

Real guests: with ``storage=<dir>`` the zone's image store and the hosts' pools are real directories under it and
the agents use the filesystem storage driver (so a template is really downloaded, whichever host does it), and
``add_host(short, libvirtd=<PrivateLibvirtd in the lab host's namespace>)`` makes a host whose agent runs
``--hypervisor libvirt`` (QEMU/TCG guests, their taps on the host's bridges)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import typing as t
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest_libvirt import Agents, Cloud, unique, wait_for
from cumulo.netlab import LabHost, NetLab

GROUP, VERSION = "cumulo.io", "v1alpha1"
PUBLIC_GATEWAY = "203.0.113.1"

ISOLATED_SERVICES = ["Dhcp", "Dns", "SourceNat", "StaticNat", "PortForwarding", "Firewall", "Lb", "UserData"]

TCP_CLIENT = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
try:
    with socket.create_connection((host, port), timeout=float(sys.argv[4])) as s:
        s.settimeout(float(sys.argv[4]))
        if payload:
            s.sendall(payload)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    print(data.decode(errors="replace"))
except OSError as error:
    print(f"ERROR {type(error).__name__}: {error}")
    sys.exit(1)
"""

PEER_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, (address, _) = s.accept()
    c.sendall(address.encode())
    c.close()
"""


def netns_run(netns: str, argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)


def tcp(netns: str, host: str, port: int, payload: str = "", timeout: float = 3.0) -> str | None:
    """What a TCP server at ``host:port`` answers a client in ``netns`` (None: no connection)."""
    result = netns_run(netns, ["python3", "-c", TCP_CLIENT, host, str(port), payload, str(timeout)],
                       timeout=timeout + 10)
    return result.stdout.strip() if result.returncode == 0 else None


def http(netns: str, host: str, port: int = 80, timeout: float = 3.0) -> str | None:
    answer = tcp(netns, host, port, f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n", timeout)
    if not answer:
        return None
    return re.split(r"\r?\n\r?\n", answer, maxsplit=1)[-1].strip()


class NetworkCloud:
    """An advanced (or basic) zone whose hosts are the lab's namespaces, each with its own agent."""

    def __init__(self, cloud: Cloud, kube: client.ApiClient, control_plane: t.Any, agents: Agents, lab: NetLab,
                 tmp_path: Path, *, hosts: t.Sequence[str] = ("h1", "h2"), vswitch: str = "linuxbridge",
                 isolation: str = "VXLAN", basic: bool = False, vnets: tuple[int, int] = (5000, 5099),
                 storage: Path | None = None, image: Path | None = None) -> None:
        self.cloud, self.kube, self.plane, self.agents, self.lab = cloud, kube, control_plane, agents, lab
        self.custom = client.CustomObjectsApi(kube)
        self.tmp_path = tmp_path
        self.basic = basic
        self.storage = storage  # None: simulated storage (paths under /sim, nothing on disk)
        self.libvirtds: dict[str, t.Any] = {}  # host name -> its PrivateLibvirtd (--hypervisor libvirt)
        self.zone, self.pod, self.cluster = unique("zone"), unique("pod"), unique("nc")
        self.pnet = unique("pnet")
        self.offering = unique("small")
        self.namespace = unique("tenant")
        self.lab_hosts: dict[str, LabHost] = {}
        self.agent_processes: dict[str, t.Any] = {}
        self.host_names: dict[str, str] = {}
        self.extra_args: dict[str, list[str]] = {}
        self.public = lab.add_public(f"{PUBLIC_GATEWAY}/24")
        cloud.create("zones", self.zone, {"networkType": "Basic" if basic else "Advanced", "dns1": "192.0.2.53",
                                          "localStorageEnabled": True})
        cloud.create("hostpods", self.pod, {"zone": self.zone, "cidr": "10.253.0.0/24", "gateway": "10.253.0.1",
                                            "startIp": "10.253.0.10", "endIp": "10.253.0.20"})
        cloud.create("clusters", self.cluster, {"pod": self.pod, "hypervisorType": "Simulator"})
        traffic = [{"type": "Guest", "label": "cloudbr0"}]
        pnet: dict[str, t.Any] = {"zone": self.zone, "isolationMethod": isolation, "vswitch": vswitch,
                                  "vnetRanges": [{"start": vnets[0], "end": vnets[1]}], "trafficTypes": traffic,
                                  "mtu": 1600}
        if not basic:
            traffic.append({"type": "Public", "label": "cloudbr1"})
            pnet["publicIpRanges"] = [{"cidr": "203.0.113.0/24", "gateway": PUBLIC_GATEWAY,
                                       "startIp": "203.0.113.10", "endIp": "203.0.113.60"}]
        cloud.create("physicalnetworks", self.pnet, pnet)
        if storage is not None:
            (storage / "images").mkdir(parents=True, exist_ok=True)
        cloud.create("imagestores", unique("store"), {"zone": self.zone, "type": "Filesystem",
                                                      "path": str(storage / "images") if storage else "/sim/images"})
        cloud.create("serviceofferings", self.offering, {"cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 256,
                                                         "storageType": "local"})
        control_plane.kubectl("create", "namespace", self.namespace)
        for short in hosts:
            self.add_host(short, vswitch=vswitch)
        # With real storage, the netns guests' template must be a real image too (any qcow2: nothing boots it).
        url = image.as_uri() if storage is not None and image is not None else "file:///sim/images/img.qcow2"
        self.create("templates", "Template", "img", {"url": url, "format": "QCOW2",
                                                      "zone": self.zone, "hypervisor": "Simulator"})
        wait_for(lambda: self.status("templates", "img").get("state") == "Ready", timeout=30, what="template Ready")

    # -- hosts -------------------------------------------------------------------------------------

    def add_host(self, short: str, *, vswitch: str = "linuxbridge", libvirtd: t.Any = None,
                 extra_args: t.Callable[[LabHost], t.Sequence[str]] | None = None) -> str:
        """A lab host and its agent; ``libvirtd``: a function making the host's PrivateLibvirtd from its
        namespace name (its agent then runs ``--hypervisor libvirt``); ``extra_args``: more agent options, from
        the lab host."""
        lab_host = self.lab.add_host(short, vswitch=vswitch)
        name = f"{self.cluster}-{short}"
        self.lab_hosts[name] = lab_host
        self.host_names[short] = name
        if libvirtd is not None:
            self.libvirtds[name] = libvirtd(lab_host.netns)
        self.extra_args[name] = list(extra_args(lab_host)) if extra_args else []
        pool = str(self.storage / "pools" / name) if self.storage else f"/sim/{name}"
        self.cloud.create("storagepools", f"{name}-local", {"zone": self.zone, "scope": "Host", "type": "Filesystem",
                                                            "host": name, "path": pool})
        self.start_agent(name)
        wait_for(lambda: (self.cloud.get("hosts", name).get("status") or {}).get("state") == "Up", timeout=40,
                 what=f"{name} Up")
        return name

    def agent_args(self, name: str) -> list[str]:
        lab_host = self.lab_hosts[name]
        daemon = self.libvirtds.get(name)
        args = ["--host", name, "--storage-driver", "filesystem" if self.storage else "simulator",
                *(["--hypervisor", "libvirt", "--libvirt-uri", daemon.uri] if daemon else ["--hypervisor", "netns"]),
                "--host-netns", lab_host.netns, "--register-cluster", self.cluster, "--heartbeat-interval", "1",
                "--lease-duration", "5", "--vm-resync", "2", "--state-dir", str(self.tmp_path / name),
                *self.extra_args.get(name, [])]
        if lab_host.vswitch == "openvswitch":
            from cumulo import ovs
            args += ["--network-driver", "openvswitch", "--ovsdb", ovs.lab_switch(lab_host.netns).db_url]
        else:
            args += ["--network-driver", "linuxbridge"]
        return args

    def start_agent(self, name: str) -> t.Any:
        process = self.agent_processes[name] = self.agents.start(name, *self.agent_args(name))
        return process

    # -- objects -----------------------------------------------------------------------------------

    def create(self, plural: str, kind: str, name: str, spec: dict[str, t.Any], namespace: str | None = None) -> None:
        namespace = namespace or self.namespace
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, t.Any]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    def status(self, plural: str, name: str, namespace: str | None = None) -> dict[str, t.Any]:
        return self.get(plural, name, namespace).get("status") or {}

    def patch(self, plural: str, name: str, body: dict[str, t.Any], namespace: str | None = None) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, plural, name, body)

    def delete(self, plural: str, name: str, namespace: str | None = None) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def network_offering(self, guest_ip_type: str, services: t.Sequence[str], **spec: t.Any) -> str:
        name = unique(guest_ip_type.lower())
        self.cloud.create("networkofferings", name, {
            "guestIpType": guest_ip_type, "services": [
                {"name": s, "provider": "SecurityGroupProvider" if s == "SecurityGroup" else "VirtualRouter"}
                for s in services], **spec})
        return name

    def network(self, name: str, offering: str, **spec: t.Any) -> None:
        self.create("networks", "Network", name, {"networkOffering": offering, "zone": self.zone, **spec})

    def vm(self, name: str, networks: t.Sequence[str] | None = None, host: str | None = None, **spec: t.Any) -> None:
        nics = spec.pop("nics", None) or [{"network": {"name": n}} for n in networks or []]
        body = {"serviceOffering": self.offering, "template": {"name": "img"}, "zone": self.zone, "nics": nics,
                **spec}
        if host:
            body["placement"] = {"host": self.host_names.get(host, host)}
        self.create("virtualmachines", "VirtualMachine", name, body)

    def running(self, *names: str, timeout: float = 60.0) -> None:
        def check() -> bool:
            return all(self.status("virtualmachines", n).get("phase") == "Running" for n in names)
        try:
            wait_for(check, timeout=timeout, what=f"{', '.join(names)} Running")
        except AssertionError:
            details = {n: (self.status("virtualmachines", n).get("phase"),
                           [(c["type"], c["reason"], c.get("message")) for c in
                            self.status("virtualmachines", n).get("conditions", []) if c["status"] != "True"])
                       for n in names}
            raise AssertionError(f"not Running: {json.dumps(details, indent=1)}") from None

    def nic(self, vm: str, index: int = 0) -> dict[str, t.Any]:
        return self.status("virtualmachines", vm)["nics"][index]

    # -- guests ------------------------------------------------------------------------------------

    def guest_netns(self, vm: str) -> str:
        obj = self.get("virtualmachines", vm)
        host = obj["status"]["placement"]["host"]
        return f"{self.lab_hosts[host].netns}-g-{obj['metadata']['uid'][:8]}"

    def guest_address(self, vm: str, ifname: str = "eth0") -> str | None:
        """The address the guest holds on ``ifname`` (as its DHCP client configured it)."""
        result = netns_run(self.guest_netns(vm), ["ip", "-j", "-4", "addr", "show", "dev", ifname])
        if result.returncode != 0 or not result.stdout.strip():
            return None
        for link in json.loads(result.stdout):
            for info in link.get("addr_info", []):
                return info["local"]
        return None

    def dhcp_address(self, vm: str, timeout: float = 40.0) -> str:
        return wait_for(lambda: self.guest_address(vm), timeout=timeout, what=f"{vm} configured by DHCP")

    def in_guest(self, vm: str, argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return netns_run(self.guest_netns(vm), argv, timeout)

    def guest_dir(self, vm: str) -> Path:
        """The netns hypervisor's record of a guest (pid files, the DHCP client's log)."""
        obj = self.get("virtualmachines", vm)
        host = obj["status"]["placement"]["host"]
        return self.tmp_path / host / "netns" / self.lab_hosts[host].netns / obj["metadata"]["uid"]

    def renew_lease(self, vm: str, ifname: str = "eth0", timeout: float = 15.0) -> str:
        """Make the guest's DHCP client renew now (SIGUSR1) and return the log line of the answer."""
        directory = self.guest_dir(vm)
        log = directory / "udhcpc.log"
        before = log.read_text().count(f" renew {ifname} ")
        pid = int((directory / f"udhcpc-{ifname}.pid").read_text())
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: log.read_text().count(f" renew {ifname} ") > before, timeout=timeout,
                 what=f"{vm} renewing its lease; log: {log.read_text()[-400:]}")
        return [line for line in log.read_text().splitlines() if f" renew {ifname} " in line][-1]

    def ping(self, vm: str, address: str, count: int = 2) -> bool:
        return self.in_guest(vm, ["busybox", "ping", "-c", str(count), "-W", "2", address]).returncode == 0

    def resolve(self, vm: str, name: str) -> str:
        result = self.in_guest(vm, ["busybox", "nslookup", name])
        return result.stdout + result.stderr

    def peer_server(self, netns: str, port: int) -> subprocess.Popen[bytes]:
        """A TCP server in ``netns`` answering each connection with the client's address."""
        process = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", PEER_SERVER, str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # Wait for the socket, not a fixed time: on a loaded machine python3 alone can take longer to start.
        assert process.stdout is not None and process.stdout.readline().strip() == "listening", \
            f"the peer server on port {port} in {netns} did not start"
        return process
