"""A test topology of simulated hypervisor hosts: network namespaces joined by an underlay and a public network.

::

    root namespace                          host namespace <prefix>-<name>
    ┌──────────────────────┐                ┌────────────────────────────────────────┐
    │ bridge <prefix>u     │── <p><n>u ──── │ eth0 ── cloudbr0 (172.a.b.N/24, MTU 1600)│  guest/underlay traffic
    │ (no IP, no snooping) │                │                                          │
    │ bridge <prefix>p     │── <p><n>p ──── │ eth1 ── cloudbr1 (no IP)                 │  public traffic
    └──────────┬───────────┘                └────────────────────────────────────────┘
               └── <p>pubp ── eth0 (203.0.113.1/24) in namespace <prefix>-pub ("the internet")

Namespaces made inside a lab namespace with ``ip netns exec <ns> ip netns add`` vanish (the command runs in a
private mount namespace): make them with :meth:`NetLab.add_namespace` or from the root namespace.

Each host namespace is what a hypervisor's host network is to the agent (``--host-netns``): loopback up,
``ip_forward=1``, ``bridge-nf-call-iptables=1`` (so an ``inet`` nftables table sees bridged guest traffic),
the traffic-label bridges ``cloudbr0`` (holding the host's underlay address; VXLAN tunnels ride on it) and
``cloudbr1`` (public, no address). The root-namespace bridges are plain wires: they have no address, and
multicast snooping is off so VXLAN's multicast groups flood to every host without an IGMP querier.

Names: a lab has a short ``prefix`` (≤ 6 characters, default ``nl`` + 4 hex digits); host names are ≤ 6
characters, so every root-namespace interface name (``<prefix><name>u``) stays within Linux's 15.

Cleanup: :meth:`NetLab.close` kills the processes left in the lab's namespaces and removes the namespaces and
the root-namespace links. A lab records its owner PID in ``/run/cumulo-netlab/<prefix>``; :func:`reap_stale`
removes labs whose owner is gone (a crashed or SIGKILLed test run), never the labs of live runs. A lab made with
``owner=False`` (the local cloud of ``make up``, which outlives the command that built it) has no owner record, so
:func:`reap_stale` never touches it; :func:`remove_lab` (``make down``) removes it.

Extension point for other virtual switches: ``add_host(name, vswitch=...)`` looks the host's bridge builder
up in :data:`HOST_BUILDERS`. ``linuxbridge`` is built here; an Open vSwitch variant (``cloudbr0`` as an OVS
netdev bridge, with its own ovsdb-server/ovs-vswitchd) registers a builder with the same signature, wires
the host side of ``eth0``/``eth1`` into its bridges, and appends its teardown to ``LabHost.cleanups``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import os
import signal
import subprocess
import time
import typing as t
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

STATE_DIR = Path("/run/cumulo-netlab")
PREFIX_SCHEME = "nl"         # default prefixes: nl + 4 hex digits
UNDERLAY_MTU = 1600          # VXLAN adds 50 bytes; OVS netdev tunnels need >= 1600
UNDERLAY_BRIDGE = "cloudbr0"
PUBLIC_BRIDGE = "cloudbr1"
UNDERLAY_NIC = "eth0"        # the host namespace's "physical" NICs (veth ends)
PUBLIC_NIC = "eth1"
IFNAMSIZ = 15


class NetLabError(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def netns_exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unique_prefix() -> str:
    return f"{PREFIX_SCHEME}{uuid.uuid4().hex[:4]}"


def underlay_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A 172.16.0.0/12 /24 derived from the prefix (labs are separate L2 domains; distinct subnets only make
    captures and logs easier to read)."""
    digest = hashlib.sha256(prefix.encode()).digest()
    return ipaddress.IPv4Network(f"172.{16 + digest[0] % 16}.{digest[1]}.0/24")


@dataclasses.dataclass
class LabHost:
    """One simulated hypervisor host (or the public namespace)."""

    lab: NetLab
    name: str
    netns: str
    vswitch: str = "linuxbridge"
    underlay_ip: str | None = None             # address on cloudbr0, no prefix length
    cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.netns, argv, check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs: t.Any) -> subprocess.Popen[t.Any]:
        return self.lab.popen(self.netns, argv, **kwargs)

    def sysctl(self, key: str, value: str | int) -> None:
        self.exec(["sysctl", "-qw", f"{key}={value}"])

    def ping(self, address: str, *, count: int = 1, wait: int = 2, size: int | None = None) -> bool:
        """Whether ``address`` answers (busybox ping: the machine has no iputils)."""
        argv = ["busybox", "ping", "-c", str(count), "-W", str(wait)]
        if size is not None:
            argv += ["-s", str(size)]
        return self.exec([*argv, address], check=False, timeout=wait * count + 10).returncode == 0

    def mtu(self, ifname: str) -> int:
        return int(self.exec(["cat", f"/sys/class/net/{ifname}/mtu"]).stdout)


HostBuilder = Callable[["NetLab", LabHost], None]


def _build_linuxbridge_host(lab: NetLab, host: LabHost) -> None:
    for bridge, mtu in ((UNDERLAY_BRIDGE, lab.underlay_mtu), (PUBLIC_BRIDGE, 1500)):
        host.exec(["ip", "link", "add", bridge, "mtu", str(mtu), "type", "bridge", "mcast_snooping", "0"])
    host.exec(["ip", "link", "set", UNDERLAY_NIC, "master", UNDERLAY_BRIDGE, "up"])
    host.exec(["ip", "link", "set", PUBLIC_NIC, "master", PUBLIC_BRIDGE, "up"])
    assert host.underlay_ip is not None
    host.exec(["ip", "addr", "add", f"{host.underlay_ip}/{lab.underlay.prefixlen}", "dev", UNDERLAY_BRIDGE])
    host.exec(["ip", "link", "set", UNDERLAY_BRIDGE, "up"])
    host.exec(["ip", "link", "set", PUBLIC_BRIDGE, "up"])


def _build_openvswitch_host(lab: NetLab, host: LabHost) -> None:
    from cumulo import ovs  # the host's own ovsdb-server/ovs-vswitchd; its teardown goes to host.cleanups

    ovs.build_lab_host(lab, host)


# vswitch -> builder of the host's traffic-label bridges (eth0/eth1 exist, are up-able, not enslaved).
HOST_BUILDERS: dict[str, HostBuilder] = {"linuxbridge": _build_linuxbridge_host,
                                         "openvswitch": _build_openvswitch_host}


class NetLab:
    """A lab: create with a unique short prefix, add hosts, :meth:`close` at the end (or use ``with``)."""

    def __init__(self, prefix: str | None = None, *, underlay_mtu: int = UNDERLAY_MTU, owner: bool = True) -> None:
        self.prefix = prefix or unique_prefix()
        if len(self.prefix) > 6 or not self.prefix.isalnum():
            raise NetLabError(f"lab prefix {self.prefix!r}: at most 6 letters/digits (interface names ≤ 15)")
        self.underlay_mtu = underlay_mtu
        self.underlay = underlay_subnet(self.prefix)
        self.underlay_bridge = f"{self.prefix}u"
        self.public_bridge = f"{self.prefix}p"
        self.hosts: dict[str, LabHost] = {}
        self.public: LabHost | None = None
        self.extra: dict[str, LabHost] = {}
        self._processes: list[subprocess.Popen[t.Any]] = []
        self._next_address = 11
        self._closed = False
        if owner:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            (STATE_DIR / self.prefix).write_text(str(os.getpid()))
        try:
            for bridge, mtu in ((self.underlay_bridge, underlay_mtu), (self.public_bridge, 1500)):
                run(["ip", "link", "add", bridge, "mtu", str(mtu), "type", "bridge", "mcast_snooping", "0"])
                run(["ip", "link", "set", bridge, "up"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topology ----------------------------------------------------------------------------

    def netns_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _new_netns(self, name: str) -> str:
        if not name.isalnum() or len(name) > 8:
            raise NetLabError(f"lab namespace name {name!r}: at most 8 letters/digits")
        if name in self.hosts or name in self.extra or (self.public is not None and self.public.name == name):
            raise NetLabError(f"lab host {name!r} exists")
        netns = self.netns_name(name)
        run(["ip", "netns", "add", netns])
        run(netns_exec_argv(netns, ["ip", "link", "set", "lo", "up"]))
        return netns

    def _wire(self, netns: str, root_name: str, inner_name: str, bridge: str, mtu: int) -> None:
        """A veth from ``bridge`` (root namespace) to ``inner_name`` inside ``netns``."""
        if len(root_name) > IFNAMSIZ:
            raise NetLabError(f"interface name {root_name!r} is longer than {IFNAMSIZ}")
        run(["ip", "link", "add", root_name, "mtu", str(mtu), "type", "veth", "peer", "name", inner_name,
             "mtu", str(mtu), "netns", netns])
        run(["ip", "link", "set", root_name, "master", bridge, "up"])
        # Like a physical NIC, the namespace's end fills in its checksums itself: with TX offload on, its
        # packets would arrive at an Open vSwitch (userspace datapath) host with TCP/UDP checksums unfilled.
        run(netns_exec_argv(netns, ["ethtool", "-K", inner_name, "tx", "off"]))
        run(netns_exec_argv(netns, ["ip", "link", "set", inner_name, "up"]))

    def add_host(self, name: str, *, vswitch: str = "linuxbridge") -> LabHost:
        """A hypervisor host: namespace ``<prefix>-<name>`` with cloudbr0 (underlay address) and cloudbr1.
        Host names are ≤ 6 characters (root-namespace interface names ``<prefix><name>u``)."""
        if len(name) > 6:
            raise NetLabError(f"lab host name {name!r}: at most 6 letters/digits")
        builder = HOST_BUILDERS.get(vswitch)
        if builder is None:
            raise NetLabError(f"no lab host builder for vswitch {vswitch!r} (known: {sorted(HOST_BUILDERS)})")
        netns = self._new_netns(name)
        address = str(self.underlay.network_address + self._next_address)
        self._next_address += 1
        host = LabHost(self, name, netns, vswitch=vswitch, underlay_ip=address)
        self.hosts[name] = host
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv6.conf.all.disable_ipv6", 1),
                           ("net.ipv6.conf.default.disable_ipv6", 1)):
            host.sysctl(key, value)
        self._wire(netns, f"{self.prefix}{name}u", UNDERLAY_NIC, self.underlay_bridge, self.underlay_mtu)
        self._wire(netns, f"{self.prefix}{name}p", PUBLIC_NIC, self.public_bridge, 1500)
        builder(self, host)
        self._enable_br_netfilter(host)
        return host

    def _enable_br_netfilter(self, host: LabHost) -> None:
        # The sysctl appears in a namespace once br_netfilter is loaded (creating a bridge does not load it;
        # an nft rule with a bridge-family hook or `modprobe` does). Try modprobe; tolerate its absence.
        path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        probe = host.exec(["test", "-e", path], check=False)
        if probe.returncode != 0:
            run(["modprobe", "br_netfilter"], check=False)
        host.sysctl("net.bridge.bridge-nf-call-iptables", 1)

    def add_namespace(self, name: str, *, host: LabHost | None = None, port: str | None = None,
                      address: str | None = None, mtu: int = 1500) -> LabHost:
        """A bare namespace ``<prefix>-<name>`` (a DHCP server, a client, a hand-made guest), removed with the
        lab. With ``host`` and ``port``: a veth ``port`` in the host's namespace (not plugged anywhere) to
        ``eth0`` inside, with ``address`` (CIDR form) when given."""
        netns = self._new_netns(name)
        namespace = LabHost(self, name, netns, vswitch="none")
        self.extra[name] = namespace
        if host is not None and port is not None:
            host.exec(["ip", "link", "add", port, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0",
                       "mtu", str(mtu), "netns", netns])
            host.exec(["ip", "link", "set", port, "up"])
            namespace.exec(["ip", "link", "set", "eth0", "up"])
            if address:
                namespace.exec(["ip", "addr", "add", address, "dev", "eth0"])
        return namespace

    def add_public(self, gateway: str = "203.0.113.1/24", name: str = "pub") -> LabHost:
        """The "internet": a namespace on the public bridge holding the public range's gateway address."""
        if self.public is not None:
            raise NetLabError("the lab has its public namespace already")
        netns = self._new_netns(name)
        self._wire(netns, f"{self.prefix}{name}p", "eth0", self.public_bridge, 1500)
        public = LabHost(self, name, netns, vswitch="none")
        public.exec(["ip", "addr", "add", gateway, "dev", "eth0"])
        public.sysctl("net.ipv4.ip_forward", 1)
        self.public = public
        return public

    # -- processes ---------------------------------------------------------------------------

    def exec(self, netns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(netns_exec_argv(netns, argv), check=check, timeout=timeout, input=input)

    def popen(self, netns: str, argv: Sequence[str], **kwargs: t.Any) -> subprocess.Popen[t.Any]:
        """A long-running process in ``netns`` (a server, a client loop), killed by :meth:`close`."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(netns_exec_argv(netns, argv), **kwargs)
        self._processes.append(process)
        return process

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        hosts = [*self.hosts.values(), *self.extra.values(), *([self.public] if self.public else [])]
        for host in hosts:
            for cleanup in reversed(host.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
        remove_lab(self.prefix)


def _kill_netns_processes(netns: str) -> None:
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        if pids:
            time.sleep(0.05)


def remove_lab(prefix: str) -> None:
    """Remove every namespace ``<prefix>-*`` (with its processes) and root link ``<prefix>*``."""
    for netns in list_netns():
        if netns.startswith(f"{prefix}-"):
            _kill_netns_processes(netns)
            run(["ip", "netns", "delete", netns], check=False)
    # Root-side veth ends die with their peers in the namespaces; the two lab bridges remain.
    for bridge in (f"{prefix}u", f"{prefix}p"):
        if run(["ip", "link", "show", bridge], check=False).returncode == 0:
            run(["ip", "link", "delete", bridge], check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / prefix).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Remove the labs whose owner process is gone; returns their prefixes."""
    reaped = []
    if not STATE_DIR.is_dir():
        return reaped
    for record in STATE_DIR.iterdir():
        try:
            pid = int(record.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            continue
        remove_lab(record.name)
        reaped.append(record.name)
    return reaped


def unavailable_reason() -> str | None:
    """Why a lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and bridges need root"
    for binary in ("ip", "sysctl"):
        if run(["sh", "-c", f"command -v {binary}"], check=False).returncode != 0:
            return f"{binary} is not installed"
    return None
