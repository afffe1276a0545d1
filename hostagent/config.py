"""The agent's configuration and the small pure helpers that build it (host names, private IP)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

from .drivers.hypervisor.simulator import SimulatedCapacity
from .faults import Fault

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ConfigError(ValueError):
    """A configuration the agent cannot run with; the message says what to change."""


def validate_host_name(name: str, source: str) -> str:
    if len(name) > 253 or not _NAME.match(name):
        raise ConfigError(f"host name {name!r} (from {source}) is not a valid Kubernetes object name: lower-case "
                          "letters, digits, '-' and '.', starting and ending with a letter or digit")
    return name


def resolve_host_name(flag: str | None, environ: Mapping[str, str], hostname: str | None = None) -> str:
    """``--host``, else $CUMULO_HOST, else $NODE_NAME (a DaemonSet's spec.nodeName), else the machine's
    host name (lower-cased and cut at the first dot, as kubelet names its node)."""
    for value, source in ((flag, "--host"), (environ.get("CUMULO_HOST"), "$CUMULO_HOST"),
                          (environ.get("NODE_NAME"), "$NODE_NAME")):
        if value:
            return validate_host_name(value, source)
    name = (hostname if hostname is not None else socket.gethostname()).lower().split(".")[0]
    return validate_host_name(name, "the machine's host name")


def simulated_host_names(base: str, count: int) -> list[str]:
    """``--simulate N``: hosts ``<base>-0`` … ``<base>-(N-1)``."""
    if count < 1:
        raise ConfigError(f"--simulate needs at least 1 host, not {count}")
    return [validate_host_name(f"{base}-{index}", "--host and --simulate") for index in range(count)]


def default_private_ip(apiserver_url: str | None) -> str | None:
    """The address this machine uses to reach the apiserver (the management network), else the source
    address of the default route. A UDP connect sends no packet; it only asks the kernel for a route."""
    candidates = []
    if apiserver_url:
        host = urlparse(apiserver_url).hostname
        if host:
            candidates.append(host)
    candidates.append("192.0.2.1")  # TEST-NET-1: any address routed via the default route
    fallback = None
    for target in candidates:
        try:
            address = socket.getaddrinfo(target, 443, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((address, 443))
                source = str(probe.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(source).is_loopback:
            return source
        fallback = fallback or source
    return fallback


@dataclasses.dataclass
class AgentConfig:
    hosts: Sequence[str]
    hypervisor: str = "libvirt"  # libvirt | simulator | netns
    libvirt_uri: str = "qemu:///system"
    virt_type: str = "qemu"
    network_driver: str = "linuxbridge"  # linuxbridge | openvswitch | simulator
    host_netns: str | None = None
    """Simulated hosts: the network namespace standing in for the host's network stack (bridges, taps,
    routers' veths are made in it). None: the agent's own, as on a real hypervisor."""
    ovsdb: str = "unix:/run/openvswitch/db.sock"
    """The openvswitch network driver: the host's Open vSwitch database (unix:<socket> or tcp:<ip>:<port>)."""
    storage_driver: str = "filesystem"  # filesystem | simulator
    simulated: SimulatedCapacity = dataclasses.field(default_factory=SimulatedCapacity)
    sim_storage_bytes: int = 10 * 1024**4
    register_cluster: str | None = None
    node_name: str | None = None
    heartbeat_interval: float = 10.0
    lease_duration: int = 40
    check_interval: float = 10.0
    storage_heartbeat_interval: float = 10.0
    fence_after: float = 60.0
    report_refresh: float = 300.0
    """Seconds after which an unchanged status.node is sent again (kubelet's nodeStatusReportFrequency, 5 min):
    liveness is the Lease, so this only keeps reportedAt from going stale. At 1,000 hosts every 60 s it was
    17 Host status writes a second, each fanned out to every Host watcher."""
    call_timeout: float = 30.0
    kubeconfig: str | None = None
    faults: Mapping[str, Fault] = dataclasses.field(default_factory=dict)
    private_ip: str | None = None
    api_threads: int = 8
    state_dir: str = "/var/lib/cumulo"
    """Files of guests: ``<state_dir>/vms/<uid>/`` (console log, config drive)."""
    stop_timeout: float = 60.0
    """Seconds of ACPI shutdown requests before a guest is powered off hard."""
    vm_resync: float = 10.0
    """Seconds between checks of each guest's domain (a guest that powered itself off, a crashed one)."""
    resync: float = 60.0
    """Seconds between re-reconciles of every Template and Volume (level-based safety net)."""
    orphan_sweep: float = 30.0
    """Seconds between sweeps of the hypervisor's domains for orphans."""
    download_concurrency: int = 2
    vm_concurrency: int = 4
    sim_start_seconds: float = 0.0
    sim_stop_seconds: float = 0.0
    sim_persist: bool = False
    """Simulated domains and disks in ``<state_dir>/simulator/<host>.json`` (they survive an agent crash)."""

    @property
    def process_scale(self) -> int:
        """How many agents' worth of concurrent work the process does: a ``--simulate N`` process stands for N
        agents, each with its own guests' queue and API threads; up to 4 agents' worth, as one process shares
        its cores (benchmarks/burst.py: with 4 guests at a time for 10 hosts, a burst waited on the agent)."""
        return max(1, min(len(self.hosts), 4))

    @property
    def process_vm_concurrency(self) -> int:
        return self.vm_concurrency * self.process_scale

    @property
    def process_api_threads(self) -> int:
        return self.api_threads * self.process_scale

    def validate(self) -> None:
        if self.heartbeat_interval <= 0 or self.check_interval <= 0:
            raise ConfigError("--heartbeat-interval and --check-interval must be positive")
        if self.storage_heartbeat_interval <= 0 or self.fence_after <= self.storage_heartbeat_interval:
            raise ConfigError("--storage-heartbeat-interval must be positive and --fence-after longer than it")
        if self.lease_duration < 2 * self.heartbeat_interval:
            raise ConfigError(f"--lease-duration ({self.lease_duration}s) must be at least twice "
                              f"--heartbeat-interval ({self.heartbeat_interval:g}s), or one slow renewal "
                              "marks the host Disconnected")
        if self.hypervisor != "simulator" and len(self.hosts) > 1:
            raise ConfigError("--simulate needs --hypervisor simulator")
        if self.hypervisor != "simulator" and self.faults:
            raise ConfigError("--fault is for the simulator hypervisor only")
        if len(set(self.hosts)) != len(self.hosts):
            raise ConfigError("host names must be unique")
        if self.stop_timeout <= 0 or self.vm_resync <= 0 or self.resync <= 0 or self.orphan_sweep <= 0:
            raise ConfigError("--stop-timeout, --vm-resync, --resync and --orphan-sweep must be positive")
        if self.download_concurrency < 1 or self.vm_concurrency < 1:
            raise ConfigError("--download-concurrency and --vm-concurrency must be at least 1")
        if not os.path.isabs(self.state_dir):
            raise ConfigError(f"--state-dir must be an absolute path, not {self.state_dir!r}")
