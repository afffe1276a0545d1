"""``cumulo-agent``: the host agent command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing as t
from collections.abc import Sequence

from kubernetes.config.config_exception import ConfigException

from . import log as agent_log
from . import metrics
from .agent import Agent, HostWorker, agent_version
from .config import AgentConfig, ConfigError, default_private_ip, resolve_host_name, simulated_host_names
from .drivers.hypervisor import HypervisorDriver
from .drivers.hypervisor.simulator import SimulatedCapacity, SimulatorDriver
from .drivers.network import NetworkDriver
from .drivers.network.simulator import SimulatorNetworkDriver
from .drivers.storage import StorageDriver
from .drivers.storage.simulator import SimulatorStorageDriver
from .executor import SubprocessExecutor
from .faults import FaultConfigError, FaultInjector, parse_fault_option
from .kube import AsyncKube, Kube, load_configuration

log = logging.getLogger("hostagent")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cumulo-agent", description="Cumulo host agent: heartbeats and host facts of "
                                "one hypervisor host (or of N simulated hosts).")
    p.add_argument("--host", help="Host object name (default: $CUMULO_HOST, $NODE_NAME, the machine's host name)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="Kubernetes Node the agent runs on, read for the cumulo.io/cluster label (default: $NODE_NAME)")
    p.add_argument("--hypervisor", choices=["libvirt", "simulator", "netns"], default="libvirt",
                   help="netns: guests are network namespaces with real NICs (network tests)")
    p.add_argument("--libvirt-uri", default="qemu:///system")
    p.add_argument("--virt-type", choices=["qemu", "kvm"], default="qemu",
                   help="libvirt domain type; qemu (TCG) unless the host really runs KVM guests")
    p.add_argument("--network-driver", choices=["linuxbridge", "openvswitch", "simulator"],
                   help="default: linuxbridge for libvirt, simulator for the simulator")
    p.add_argument("--host-netns", metavar="NAME",
                   help="simulated hosts: the network namespace standing in for the host's network stack")
    p.add_argument("--ovsdb", default="unix:/run/openvswitch/db.sock",
                   help="openvswitch network driver: the host's OVSDB (unix:<socket> or tcp:<ip>:<port>)")
    p.add_argument("--storage-driver", choices=["filesystem", "simulator"],
                   help="default: filesystem for libvirt, simulator for the simulator")
    p.add_argument("--simulate", type=int, metavar="N", help="run N simulated hosts <host>-0 … <host>-(N-1)")
    p.add_argument("--sim-cpus", type=int, default=16)
    p.add_argument("--sim-memory-mib", type=int, default=65536)
    p.add_argument("--sim-cpu-speed-mhz", type=int, default=2400)
    p.add_argument("--sim-storage-gib", type=int, default=10240, help="capacity of every simulated pool and store")
    p.add_argument("--register-cluster", metavar="CLUSTER",
                   help="create missing Host objects in this Cluster (also done when the Node has the "
                        "cumulo.io/cluster label)")
    p.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between Lease renewals")
    p.add_argument("--lease-duration", type=int, default=40, help="leaseDurationSeconds of the heartbeat Lease")
    p.add_argument("--storage-heartbeat-interval", type=float,
                   help="seconds between storage heartbeat writes (and investigation reads); default: the heartbeat "
                   "interval")
    p.add_argument("--fence-after", type=float, default=60.0,
                   help="destroy the HA guests' domains when neither the Lease nor the storage heartbeat could be "
                   "written for this long; keep it below the controller's --host-down-after minus the intervals")
    p.add_argument("--check-interval", type=float,
                   help="seconds between host checks (facts, storage, bridges); default: the heartbeat interval")
    p.add_argument("--report-refresh", type=float, default=300.0,
                   help="re-send an unchanged status.node after this many seconds (refreshes reportedAt)")
    p.add_argument("--call-timeout", type=float, default=30.0, help="deadline of one hypervisor call, in seconds")
    p.add_argument("--private-ip", default=os.environ.get("CUMULO_PRIVATE_IP"),
                   help="management address to report (default: $CUMULO_PRIVATE_IP, else the source address "
                        "towards the apiserver)")
    p.add_argument("--fault", action="append", default=[], metavar="OP=JSON",
                   help="simulator fault for every host, e.g. facts='{\"fail\":true,\"message\":\"down\"}'; "
                        "the Host annotation overrides it per operation")
    p.add_argument("--api-threads", type=int, default=8, help="concurrent API requests")
    p.add_argument("--state-dir", default=os.environ.get("CUMULO_STATE_DIR", "/var/lib/cumulo"),
                   help="guest files (console logs, config drives) go to <state-dir>/vms/<uid>/ "
                        "(default: $CUMULO_STATE_DIR, else /var/lib/cumulo)")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds of ACPI shutdown requests before a guest is powered off hard")
    p.add_argument("--vm-resync", type=float, default=10.0, help="seconds between checks of each guest's domain")
    p.add_argument("--resync", type=float, default=60.0,
                   help="seconds between re-reconciles of every Template and Volume bound to the host")
    p.add_argument("--orphan-sweep", type=float, default=30.0,
                   help="seconds between sweeps of the hypervisor's domains for orphans")
    p.add_argument("--download-concurrency", type=int, default=2, help="template downloads at once")
    p.add_argument("--vm-concurrency", type=int, default=4, help="guests reconciled at once")
    p.add_argument("--sim-start-seconds", type=float, default=0.0, help="simulated time a domain takes to start")
    p.add_argument("--sim-stop-seconds", type=float, default=0.0,
                   help="simulated time a guest takes to power off after an ACPI shutdown request")
    p.add_argument("--sim-persist", action="store_true",
                   help="keep each simulated host's domains and disks in <state-dir>/simulator/<host>.json, so they "
                        "outlive the agent process as real guests do (crash tests)")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config, else in-cluster")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    p.add_argument("--metrics-port", type=int, default=metrics.DEFAULT_PORT,
                   help=f"serve Prometheus metrics at /metrics on this port (default {metrics.DEFAULT_PORT}; 0: off)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics server listens on")
    return p


def build_config(options: argparse.Namespace, environ: t.Mapping[str, str]) -> AgentConfig:
    base = resolve_host_name(options.host, environ)
    simulator = options.hypervisor == "simulator"
    if options.simulate is not None and not simulator:
        raise ConfigError("--simulate needs --hypervisor simulator")
    hosts = simulated_host_names(base, options.simulate) if options.simulate is not None else [base]
    try:
        faults = dict(parse_fault_option(option) for option in options.fault)
    except FaultConfigError as error:
        raise ConfigError(str(error)) from None
    config = AgentConfig(
        hosts=hosts,
        hypervisor=options.hypervisor,
        libvirt_uri=options.libvirt_uri,
        virt_type=options.virt_type,
        network_driver=options.network_driver or ("simulator" if simulator else "linuxbridge"),
        host_netns=options.host_netns,
        ovsdb=options.ovsdb,
        storage_driver=options.storage_driver or (
            "simulator" if simulator or options.hypervisor == "netns" else "filesystem"),
        simulated=SimulatedCapacity(cpus=options.sim_cpus, memory_mib=options.sim_memory_mib,
                                    cpu_speed_mhz=options.sim_cpu_speed_mhz),
        sim_storage_bytes=options.sim_storage_gib * 1024**3,
        register_cluster=options.register_cluster,
        node_name=options.node_name,
        heartbeat_interval=options.heartbeat_interval,
        lease_duration=options.lease_duration,
        check_interval=options.check_interval or options.heartbeat_interval,
        storage_heartbeat_interval=options.storage_heartbeat_interval or options.heartbeat_interval,
        fence_after=options.fence_after,
        report_refresh=options.report_refresh,
        call_timeout=options.call_timeout,
        kubeconfig=options.kubeconfig,
        faults=faults,
        private_ip=options.private_ip,
        api_threads=options.api_threads,
        state_dir=os.path.abspath(options.state_dir),
        stop_timeout=options.stop_timeout,
        vm_resync=options.vm_resync,
        resync=options.resync,
        orphan_sweep=options.orphan_sweep,
        download_concurrency=options.download_concurrency,
        vm_concurrency=options.vm_concurrency,
        sim_start_seconds=options.sim_start_seconds,
        sim_stop_seconds=options.sim_stop_seconds,
        sim_persist=options.sim_persist,
    )
    config.validate()
    return config


def build_workers(agent: Agent) -> list[HostWorker]:
    """Drivers per host: a simulated host has its own fault injector; real drivers are shared."""
    config = agent.config
    network: NetworkDriver
    if config.network_driver == "linuxbridge":
        from .drivers.network.linuxbridge import LinuxBridgeDriver  # pyroute2 only where it is used
        network = LinuxBridgeDriver(netns=config.host_netns)
    elif config.network_driver == "openvswitch":
        from .drivers.network.openvswitch import OpenVSwitchDriver  # ovsdbapp only where it is used
        network = OpenVSwitchDriver(netns=config.host_netns, ovsdb=config.ovsdb)
    else:
        network = SimulatorNetworkDriver()
    shared_storage: StorageDriver | None = None
    if config.storage_driver == "filesystem":
        from .drivers.storage.filesystem import FilesystemStorageDriver
        # One executor for every qemu-img of the process: at most a few at once.
        shared_storage = FilesystemStorageDriver(timeout=min(config.call_timeout, 15.0),
                                                 executor=SubprocessExecutor(concurrency=4))
    workers = []
    for name in config.hosts:
        hypervisor: HypervisorDriver
        faults: FaultInjector | None = None
        disk_sizes: dict[str, int] = {}  # a simulated host's disks, seen by its hypervisor and its storage
        if config.hypervisor == "simulator":
            faults = FaultInjector(config.faults)
            hypervisor = SimulatorDriver(config.simulated, faults, version=agent.version,
                                         call_timeout=config.call_timeout, start_seconds=config.sim_start_seconds,
                                         stop_seconds=config.sim_stop_seconds, disk_sizes=disk_sizes,
                                         host=name,
                                         state_file=os.path.join(config.state_dir, "simulator", f"{name}.json")
                                         if config.sim_persist else None)
        elif config.hypervisor == "netns":
            from .drivers.hypervisor.netns import NetnsDriver
            hypervisor = NetnsDriver(network, config.state_dir, host_netns=config.host_netns,
                                     capacity=config.simulated, version=agent.version,
                                     call_timeout=config.call_timeout)
        else:
            from .drivers.hypervisor.libvirt import LibvirtDriver  # libvirt-python only where it is used
            hypervisor = LibvirtDriver(config.libvirt_uri, config.virt_type, call_timeout=config.call_timeout,
                                       network=network)
        storage = shared_storage if shared_storage is not None else SimulatorStorageDriver(
            faults or FaultInjector(), capacity_bytes=config.sim_storage_bytes, call_timeout=config.call_timeout,
            disk_sizes=disk_sizes, saved=hypervisor.save if isinstance(hypervisor, SimulatorDriver) else None)
        workers.append(HostWorker(agent, name, hypervisor=hypervisor, storage=storage, network=network,
                                  faults=faults))
    return workers


def _forget_signal_handling() -> None:
    """In a child forked by the agent (pyroute2 forks one to enter a network namespace, then signals it): the
    inherited signal wakeup fd is the event loop's, so a SIGTERM the child gets would stop the agent itself."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


async def run(config: AgentConfig, kube: Kube) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    os.register_at_fork(after_in_child=_forget_signal_handling)
    api = AsyncKube(kube, threads=config.process_api_threads)
    try:
        await Agent(config, api, build_workers).run(stop)
    finally:
        api.close()
    log.info("agent stopped")


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    agent_log.setup(options.log_level, options.log_format)
    try:
        config = build_config(options, os.environ)
        configuration = load_configuration(config.kubeconfig)
    except (ConfigError, ConfigException, OSError) as error:
        print(f"cumulo-agent: {error}", file=sys.stderr)
        return 2
    if config.private_ip is None:
        config.private_ip = default_private_ip(configuration.host)
    if options.metrics_port:
        try:
            metrics.serve(options.metrics_port, options.metrics_address)
        except OSError as error:  # heartbeats matter more than metrics: say so and carry on
            log.error("cannot serve metrics; running without", extra={
                "address": options.metrics_address, "port": options.metrics_port, "error": str(error)})
    kube = Kube(configuration, user_agent=f"cumulo-agent/{agent_version()}",
                max_connections=config.process_api_threads + 8)
    log.info("starting", extra={"hosts": len(config.hosts), "first_host": config.hosts[0],
                                "hypervisor": config.hypervisor, "heartbeat_interval": config.heartbeat_interval,
                                "lease_duration": config.lease_duration})
    asyncio.run(run(config, kube))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
