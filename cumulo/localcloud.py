"""`make up` / `make down`: a whole local Cumulo cloud on this machine, left running between commands.

What runs (everything detached, so it outlives the command that started it):

* the control plane: etcd and kube-apiserver on loopback (:mod:`cumulo.envtest`);
* ``cumulo-controller``, every reconciler;
* a network lab (:mod:`cumulo.netlab`, prefix ``cu`` + 4 hex digits of the state directory's path): each
  quickstart Host is a network namespace ``<prefix>-<host>`` with the traffic-label bridges ``cloudbr0``
  (underlay: guest VXLAN segments ride on it) and ``cloudbr1`` (public), joined by two root-namespace
  bridges, and a namespace ``<prefix>-pub`` on the public bridge holding the public range's gateway (it
  plays the internet);
* per quickstart Host (``host1``, ``host2``): a private libvirtd (:mod:`cumulo.libvirtd`, QEMU/TCG) inside the
  host's namespace, so its guests' taps plug into the host's bridges, and a ``cumulo-agent --host <host>
  --hypervisor libvirt --network-driver linuxbridge --host-netns <prefix>-<host>`` driving it (segments,
  virtual routers and security groups are made in that namespace).

Everything lives under one state directory (default ``<repo>/.cumulo``): the control plane's work
directory (``control-plane/``), the admin kubeconfig (``kubeconfig``), the components' kubeconfigs
(``kubeconfigs/``), the libvirtds' work directories (``hosts/<host>/libvirtd/``), the logs (``logs/``) and
``state.json``, which records the controller and agents by PID and start time and the lab (the control plane
and each libvirtd keep their own ``state.json``). The hosts' local storage is the quickstart's: its Filesystem
pools under /var/lib/cumulo/pools and its image store /var/lib/cumulo/images.

Both operations are idempotent. :func:`up` reuses whatever still runs, starts what is missing or died,
and restarts the controller and agents when what they depend on changed (the control plane restarted
on a new port, a libvirtd restarted, a different command line). The lab is kept while it is whole and
rebuilt (with everything running inside it) when a part of it is missing. :func:`down` stops everything
recorded and removes the lab: namespaces (with the routers' and guests' processes left in them) and bridges.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cumulo import envtest, guestimage, libvirtd, netlab, processes, toolchain

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".cumulo"
CRDS = REPO / "crds"
QUICKSTART = REPO / "examples" / "quickstart"
SYSTEM_NAMESPACE = "cumulo-system"
GROUP, VERSION = "cumulo.io", "v1alpha1"
UP_TIMEOUT = 120.0  # seconds the hosts get to come Up
STOP_TIMEOUT = 10.0  # SIGTERM grace period of every process
AGENT_METRICS_PORT = 9180  # host i serves its metrics on 9180 + i (the controller: 8080)

Log = Callable[[str], None]


class LocalCloudError(RuntimeError):
    """`make up` could not bring the cloud up; the message names what is not ready, with its log."""


@dataclass(frozen=True)
class Layout:
    """The paths of one local cloud under its state directory."""

    root: Path

    @property
    def control_plane(self) -> Path:
        return self.root / "control-plane"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kubeconfigs(self) -> Path:
        return self.root / "kubeconfigs"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def controller_log(self) -> Path:
        return self.logs / "controller.log"

    def agent_log(self, host: str) -> Path:
        return self.logs / f"agent-{host}.log"

    def libvirtd_dir(self, host: str) -> Path:
        return self.root / "hosts" / host / "libvirtd"

    def libvirtd_dirs(self) -> list[Path]:
        """Every libvirtd work directory, also of hosts no longer in the quickstart."""
        return sorted(path.parent for path in (self.root / "hosts").glob("*/libvirtd/etc"))

    @property
    def lab_prefix(self) -> str:
        """The network lab's prefix: fixed per state directory, so two clouds never share a lab."""
        return "cu" + hashlib.sha256(str(self.root).encode()).hexdigest()[:4]


@dataclass(frozen=True)
class Lab:
    """The hosts' network namespaces (cumulo.netlab) of one local cloud."""

    prefix: str
    hosts: dict[str, str]  # host -> its network namespace
    public: str  # the namespace playing the internet

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "hosts": self.hosts, "public": self.public}

    @classmethod
    def from_json(cls, data: Any) -> Lab | None:
        if not isinstance(data, dict) or not isinstance(data.get("prefix"), str):
            return None
        return cls(data["prefix"], dict(data.get("hosts") or {}), str(data.get("public") or ""))


@dataclass
class Quickstart:
    """What `make up` needs to know of the manifests it applies."""

    directory: Path
    hosts: list[str] = field(default_factory=list)
    storage_dirs: list[Path] = field(default_factory=list)  # made before the agents start
    vms: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    public_ips: list[tuple[str, str]] = field(default_factory=list)  # PublicIPAddresses (namespace, name)
    firewall_rules: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    public_gateway: str = "203.0.113.1/24"  # the first public range's gateway, held by the lab's public side

    @classmethod
    def read(cls, directory: Path) -> Quickstart:
        quickstart = cls(directory)
        for manifest in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(manifest.read_text()):
                if not isinstance(doc, dict) or not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
                    continue
                kind, meta, spec = doc.get("kind"), doc.get("metadata") or {}, doc.get("spec") or {}
                if kind == "Host":
                    quickstart.hosts.append(meta["name"])
                elif kind == "ImageStore" and spec.get("type") == "Filesystem":
                    quickstart.storage_dirs.append(Path(spec["path"]))
                elif kind == "StoragePool" and spec.get("type") == "Filesystem":
                    # The agent makes a Filesystem pool's own directory, as on a real host; its parent
                    # is the "host's" disk.
                    quickstart.storage_dirs.append(Path(spec["path"]).parent)
                elif kind == "VirtualMachine":
                    quickstart.vms.append((meta.get("namespace", "default"), meta["name"]))
                elif kind == "PublicIPAddress":
                    quickstart.public_ips.append((meta.get("namespace", "default"), meta["name"]))
                elif kind == "FirewallRule":
                    quickstart.firewall_rules.append((meta.get("namespace", "default"), meta["name"]))
                elif kind == "PhysicalNetwork" and spec.get("publicIpRanges"):
                    first = spec["publicIpRanges"][0]
                    length = first["cidr"].split("/")[1]
                    quickstart.public_gateway = f"{first['gateway']}/{length}"
        quickstart.storage_dirs = sorted(set(quickstart.storage_dirs))
        return quickstart


@dataclass
class Component:
    """A detached process of the local cloud (controller or agent), as state.json records it."""

    name: str
    record: processes.Record
    log: Path
    config: dict[str, Any]  # what it was started with; a change restarts it
    started_at: float | None = None  # wall-clock time of a start by this `up`, which then waits for it
    log_offset: int = 0  # where this start's part of the log begins

    def to_json(self) -> dict[str, Any]:
        return {**self.record.to_json(), "log": str(self.log), "config": self.config}

    @classmethod
    def from_json(cls, name: str, data: Any) -> Component | None:
        record = processes.Record.from_json(data)
        if record is None or not isinstance(data.get("config"), dict):
            return None
        return cls(name, record, Path(data.get("log", "")), data["config"])


@dataclass
class Cloud:
    """What :func:`up` leaves running."""

    state_dir: Path
    server: str
    kubeconfig: Path
    pids: dict[str, int]  # component ("etcd", "kube-apiserver", "controller", "libvirtd/host1", "agent/host1") -> PID
    started: list[str]  # the components this call started (empty when everything already ran)
    hosts: dict[str, str]  # host -> state
    vms: dict[str, str]  # namespace/name -> phase
    seconds: float
    lab: Lab | None = None
    addresses: dict[str, str] = field(default_factory=dict)  # namespace/name of a VM -> its leased address
    public_ips: dict[str, str] = field(default_factory=dict)  # namespace/name of a PublicIPAddress -> address


# ------------------------------------------------------------------------------------------------


def up(state_dir: Path | str | None = None, *, log: Log = print, timeout: float = UP_TIMEOUT,
       quickstart: Path | str = QUICKSTART) -> Cloud:
    """Start the local cloud (or what of it is not running), apply the quickstart, wait until its hosts
    are Up; idempotent. Raises LocalCloudError naming what did not come up, with its log."""
    began = time.monotonic()
    layout = Layout(Path(state_dir).absolute() if state_dir is not None else STATE_DIR)
    manifests = Quickstart.read(Path(quickstart))
    reason = libvirtd.unavailable_reason()
    if reason is not None:
        raise LocalCloudError(f"the hosts' hypervisors (private libvirtds) cannot run here: {reason}")
    toolchain.ensure_all(log)
    layout.root.mkdir(parents=True, exist_ok=True)
    with _locked(layout):
        started: list[str] = []
        plane = envtest.ControlPlane.attach(layout.control_plane)
        if plane is not None and not _apiserver_ready(plane):
            # Running but not answering: shutting down, or wedged. Start it afresh (same data).
            log(f"the control plane at {plane.server} does not answer; restarting it")
            plane.stop(timeout=2)  # a SIGTERMed apiserver can hang in its shutdown hooks
            plane = None
        if plane is None:
            # Half of one left (etcd or the apiserver died): envtest would give the survivor 10 s.
            envtest.ControlPlane(layout.control_plane).stop(timeout=2)
            log(f"starting etcd and kube-apiserver ({toolchain.KUBERNETES.version})")
            plane = envtest.ControlPlane(layout.control_plane).start(detach=True)
            started += ["etcd", "kube-apiserver"]
        state = processes.read_json(layout.state) or {}
        components = _recorded(state)
        identity = {"server": plane.server, "ca_sha256": _digest([plane.ca_cert_path])}
        # The CRDs and the system namespace are (re)applied only when the CRDs changed or the cluster is
        # a new one (new CA: new etcd data); they stay in etcd across control-plane restarts.
        applied = dict(state.get("applied") or {})
        crds = {"cluster": identity["ca_sha256"], "crds": _digest(sorted(CRDS.glob("*.yaml")))}
        if applied.get("crds") != crds:
            plane.install_crds(CRDS)
            plane.kubectl("apply", "--server-side", "--field-manager=cumulo-up", "-f", "-",
                          input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": SYSTEM_NAMESPACE}}))
            applied["crds"] = crds
        plane.write_kubeconfig(layout.kubeconfig)
        for directory in manifests.storage_dirs:
            directory.mkdir(parents=True, exist_ok=True)
        lab = _ensure_lab(layout, manifests, log)
        bin_dir = Path(sys.executable).parent

        def ensure(name: str, user: str, argv: list[str], log_path: Path, extra: Mapping[str, Any]) -> Component:
            kubeconfig = layout.kubeconfigs / f"{user}.kubeconfig"
            config = {"argv": [*argv, "--kubeconfig", str(kubeconfig)], **identity, **extra}
            current = components.get(name)
            if current is not None and current.record.alive:
                if current.config == config:
                    return current
                log(f"restarting {name}: {_why(current.config, config)}")
                current.record.terminate(STOP_TIMEOUT)
            elif current is not None:
                log(f"{name} (pid {current.record.pid}) is gone; starting it again (log {_show(log_path)})")
            # Admin rights (system:masters) for now; each component still gets its own identity, so the
            # audit log tells their requests apart.
            plane.mint_kubeconfig(user, ["system:masters"], kubeconfig)
            offset, started_at = processes.size(log_path), time.time()
            proc = processes.spawn(config["argv"], log_path, detach=True, cwd=layout.root)
            component = Component(name, processes.Record.of(proc.pid), log_path, config, started_at, offset)
            components[name] = component
            started.append(name)
            _save(layout, components, applied, lab)  # recorded at once: an error later must not lose it
            return component

        ensure("controller", "cumulo-controller", [str(bin_dir / "cumulo-controller")], layout.controller_log, {})
        daemons: dict[str, libvirtd.PrivateLibvirtd] = {}
        hypervisors_started: float | None = None  # wall-clock time a libvirtd (so its guests) was started anew
        for host in manifests.hosts:
            netns = lab.hosts[host]
            running = libvirtd.PrivateLibvirtd.attach(layout.libvirtd_dir(host))
            if running is not None and running.pid is not None and not _in_netns(running.pid, netns):
                # Started before the lab existed (or in a lab since rebuilt): its guests' taps are elsewhere.
                log(f"restarting the libvirtd of {host} inside {netns} (its guests are destroyed and restarted)")
                running.stop(STOP_TIMEOUT)
            daemon = libvirtd.PrivateLibvirtd(layout.libvirtd_dir(host), netns=netns)
            before = time.time()
            try:
                daemon.start(detach=True)
            except libvirtd.LibvirtUnavailable as error:
                raise LocalCloudError(f"the libvirtd of {host} did not start: {error}") from None
            if daemon.startup_seconds is not None:
                started.append(f"libvirtd/{host}")
                hypervisors_started = hypervisors_started or before
            daemons[host] = daemon
        for index, host in enumerate(manifests.hosts):
            daemon = daemons[host]
            ensure(f"agent/{host}", f"cumulo-agent-{host}", [
                str(bin_dir / "cumulo-agent"), "--host", host, "--hypervisor", "libvirt",
                "--libvirt-uri", daemon.uri, "--network-driver", "linuxbridge", "--host-netns", lab.hosts[host],
                "--log-format", "text", "--metrics-port", str(AGENT_METRICS_PORT + index),
                "--state-dir", str(layout.root / "hosts" / host / "agent"),
            ], layout.agent_log(host), {"libvirtd": daemon.record.to_json() if daemon.record else None})
        for name in sorted(set(components) - {"controller", *(f"agent/{host}" for host in manifests.hosts)}):
            log(f"stopping {name}: its host is no longer in {_show(manifests.directory)}")
            components.pop(name).record.terminate(STOP_TIMEOUT)
        for directory in layout.libvirtd_dirs():
            if directory.parent.name not in daemons and libvirtd.PrivateLibvirtd.attach(directory) is not None:
                log(f"stopping the libvirtd of {directory.parent.name}: no longer in {_show(manifests.directory)}")
                libvirtd.PrivateLibvirtd(directory).stop(STOP_TIMEOUT)
        # The quickstart is applied when it changed since it was last applied to this cluster, or when
        # one of its Hosts is missing; otherwise a user's own changes to its objects are left alone.
        quickstart_applied = {"cluster": identity["ca_sha256"],
                              "quickstart": _digest(sorted(manifests.directory.glob("*.yaml")))}
        _seed_tiny_guest(log)
        if applied.get("quickstart") != quickstart_applied or None in _get_hosts(plane, manifests.hosts).values():
            plane.kubectl("apply", "--server-side", "--field-manager=cumulo-quickstart", "-f",
                          str(manifests.directory))
            applied["quickstart"] = quickstart_applied
        _save(layout, components, applied, lab)
        hosts = _wait_hosts_up(plane, manifests.hosts, components, layout, timeout)
        vms, addresses = _wait_vms_running(plane, manifests.vms, log, timeout, hypervisors_started,
                                           {host: daemon.uri for host, daemon in daemons.items()})
        public_ips = _wait_public_ips(plane, manifests, timeout)

    plane_state = processes.read_json(plane.state_path) or {}
    pids = {"etcd": plane_state["etcd"]["pid"], "kube-apiserver": plane_state["apiserver"]["pid"]}
    pids.update({name: component.record.pid for name, component in components.items()})
    pids.update({f"libvirtd/{host}": daemon.pid for host, daemon in daemons.items() if daemon.pid is not None})
    cloud = Cloud(layout.root, plane.server, layout.kubeconfig, pids, started, hosts, vms,
                  time.monotonic() - began, lab, addresses, public_ips)
    log(_summary(cloud, layout, plane, components, daemons))
    return cloud


def down(state_dir: Path | str | None = None, *, log: Log = print) -> list[str]:
    """Stop everything :func:`up` started (agents, controller, libvirtds and their guests, the control
    plane) and remove the admin kubeconfig; idempotent. Returns what was running."""
    layout = Layout(Path(state_dir).absolute() if state_dir is not None else STATE_DIR)
    if not layout.root.is_dir():
        log("nothing is running")
        return []
    with _locked(layout):
        stopped: list[str] = []
        components = _recorded(processes.read_json(layout.state) or {})
        running = {name: c for name, c in components.items() if c.record.alive}
        # Agents and controller together: each gets SIGTERM, then one grace period for all.
        processes.terminate_all([(c.record.pid, c.record.start_time) for c in running.values()], STOP_TIMEOUT)
        stopped += sorted(running)
        lab = Lab.from_json((processes.read_json(layout.state) or {}).get("lab"))
        layout.state.unlink(missing_ok=True)
        for directory in layout.libvirtd_dirs():
            daemon = libvirtd.PrivateLibvirtd(directory)
            was_running = libvirtd.PrivateLibvirtd.attach(directory) is not None
            guests = daemon.stop(STOP_TIMEOUT)
            host = directory.parent.name
            if was_running:
                stopped.append(f"libvirtd/{host}")
            if guests:
                log(f"destroyed the guests of {host}: {', '.join(guests)}")
        # The lab last: what is left in its namespaces (routers' dnsmasqs, guests) goes with them.
        prefix = lab.prefix if lab is not None else layout.lab_prefix
        if _lab_exists(prefix):
            _remove_lab(prefix)
            stopped.append(f"network lab {prefix}")
        if envtest.ControlPlane.attach(layout.control_plane) is not None:
            stopped.append("control plane")
        envtest.ControlPlane(layout.control_plane).stop()  # also whatever half of it is left
        layout.kubeconfig.unlink(missing_ok=True)
    log(f"stopped {', '.join(stopped)}" if stopped else "nothing is running")
    return stopped


# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """One `make up`/`make down` at a time per state directory (a second one waits)."""
    with layout.lock.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _recorded(state: Mapping[str, Any]) -> dict[str, Component]:
    components = {}
    for name, data in (state.get("components") or {}).items():
        component = Component.from_json(name, data)
        if component is not None:
            components[name] = component
    return components


def _save(layout: Layout, components: Mapping[str, Component], applied: Mapping[str, Any], lab: Lab) -> None:
    processes.write_json(layout.state, {"version": 1, "applied": dict(applied), "lab": lab.to_json(), "components": {
        name: component.to_json() for name, component in sorted(components.items())}})


def _links(netns: str | None = None) -> set[str]:
    argv = ["ip", *(["-n", netns] if netns else []), "-o", "link", "show"]
    out = netlab.run(argv, check=False).stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2}


def _lab_exists(prefix: str) -> bool:
    return any(name.startswith(f"{prefix}-") for name in netlab.list_netns()) or \
        any(name.startswith(prefix) for name in _links())


def _remove_lab(prefix: str) -> None:
    """netlab.remove_lab, and the root ends of veths whose namespace lost its name but lives on in a process
    (``ip netns delete`` under a running libvirtd): they would block the rebuild."""
    netlab.remove_lab(prefix)
    for name in sorted(_links()):
        if name.startswith(prefix):
            netlab.run(["ip", "link", "delete", name], check=False)


def _lab_whole(lab: Lab) -> bool:
    """Whether every part of the lab is there: namespaces, root bridges and veths, the hosts' bridges."""
    if not {*lab.hosts.values(), lab.public} <= set(netlab.list_netns()):
        return False
    wanted = {f"{lab.prefix}u", f"{lab.prefix}p", f"{lab.prefix}pubp"}
    wanted |= {f"{lab.prefix}{host}{end}" for host in lab.hosts for end in "up"}
    if not wanted <= _links():
        return False
    return all({netlab.UNDERLAY_BRIDGE, netlab.PUBLIC_BRIDGE} <= _links(netns) for netns in lab.hosts.values())


def _ensure_lab(layout: Layout, manifests: Quickstart, log: Log) -> Lab:
    """The quickstart hosts' namespaces and the public side: kept when whole, else (re)built from scratch."""
    prefix = layout.lab_prefix
    lab = Lab(prefix, {host: f"{prefix}-{host}" for host in manifests.hosts}, f"{prefix}-pub")
    if _lab_whole(lab):
        return lab
    if _lab_exists(prefix):
        log(f"network lab {prefix} is incomplete; rebuilding it (what ran inside it is restarted)")
        _remove_lab(prefix)
    log(f"building network lab {prefix}: hosts {', '.join(manifests.hosts)} and the public side "
        f"{manifests.public_gateway}")
    try:
        built = netlab.NetLab(prefix, owner=False)
        for host in manifests.hosts:
            built.add_host(host)
        built.add_public(manifests.public_gateway)
    except netlab.NetLabError as error:
        _remove_lab(prefix)
        raise LocalCloudError(f"cannot build the network lab: {error}") from None
    return lab


def _in_netns(pid: int, netns: str) -> bool:
    """Whether process ``pid`` runs in the named network namespace."""
    try:
        own, named = os.stat(f"/proc/{pid}/ns/net"), os.stat(f"/run/netns/{netns}")
    except OSError:
        return False
    return (own.st_dev, own.st_ino) == (named.st_dev, named.st_ino)


def _apiserver_ready(plane: envtest.ControlPlane, timeout: float = 3.0) -> bool:
    """Whether the kube-apiserver answers /readyz with ok within ``timeout``."""
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=str(plane.ca_cert_path))
    context.load_cert_chain(plane.cert_dir / "admin.crt", plane.cert_dir / "admin.key")
    port = int(plane.server.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
            try:
                connection.request("GET", "/readyz")
                response = connection.getresponse()
                if response.status == 200 and response.read() == b"ok":
                    return True
            finally:
                connection.close()
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _get_hosts(plane: envtest.ControlPlane, hosts: list[str]) -> dict[str, dict[str, Any] | None]:
    """The Host objects named ``hosts`` (None for a missing one), in one kubectl call."""
    listed = json.loads(plane.kubectl("get", "hosts.cumulo.io", "-o", "json").stdout)
    found = {item["metadata"]["name"]: item for item in listed.get("items") or []}
    return {host: found.get(host) for host in hosts}


def _why(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if old.get("server") != new.get("server") or old.get("ca_sha256") != new.get("ca_sha256"):
        return f"the control plane moved to {new.get('server')}"
    if old.get("libvirtd") != new.get("libvirtd"):
        return "its libvirtd was restarted"
    return "its command line changed"


def _show(path: Path) -> str:
    """A path as the user typed it: relative to the current directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _host_state(host: Mapping[str, Any] | None) -> tuple[str, str]:
    """(state, why) of a Host object; why is its Ready condition's reason and message."""
    if host is None:
        return "absent", "the Host object does not exist"
    status = host.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    why = ": ".join(part for part in (ready.get("reason"), ready.get("message")) if part)
    return status.get("state") or "(no state yet)", why


def _not_ready(plane: envtest.ControlPlane, hosts: Mapping[str, tuple[str, str]],
               components: Mapping[str, Component]) -> dict[str, str]:
    """What is not ready yet -> why: hosts not Up, and the components this `up` started that have not
    shown they work (the controller has primed its caches; an agent has renewed its heartbeat Lease)."""
    waiting = {host: state + (f" ({why})" if why else "") for host, (state, why) in hosts.items() if state != "Up"}
    fresh = {name: component for name, component in components.items() if component.started_at is not None}
    controller = fresh.get("controller")
    if controller is not None and "reconciling with" not in processes.tail(controller.log, controller.log_offset,
                                                                          lines=10**6):
        waiting["controller"] = "has not primed its caches yet"
    agents = {name.split("/", 1)[1]: component for name, component in fresh.items() if name.startswith("agent/")}
    if agents:
        leases = json.loads(plane.kubectl("get", "leases", "-n", SYSTEM_NAMESPACE, "-o", "json").stdout)
        renewed = {item["metadata"]["name"]: _timestamp((item.get("spec") or {}).get("renewTime"))
                   for item in leases.get("items") or []}
        for host, agent in agents.items():
            if (renewed.get(f"host-{host}") or 0) < (agent.started_at or 0) - 1:
                waiting[f"agent/{host}"] = "has not renewed the heartbeat Lease since it started"
    return waiting


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    import datetime

    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _wait_hosts_up(plane: envtest.ControlPlane, hosts: list[str], components: Mapping[str, Component],
                   layout: Layout, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = {host: _host_state(obj) for host, obj in _get_hosts(plane, hosts).items()}
        waiting = _not_ready(plane, states, components)
        if not waiting:
            return {host: state for host, (state, _) in states.items()}
        for component in components.values():
            if not component.record.alive:
                raise LocalCloudError(
                    f"{component.name} exited; {_show(component.log)}:\n"
                    f"{processes.tail(component.log, component.log_offset)}\n"
                    "(`make up` again restarts it; `make down` stops everything)")
        if time.monotonic() > deadline:
            lines = [f"not ready after {timeout:.0f}s:"]
            lines += [f"  {name}: {why}" for name, why in waiting.items()]
            logs = {layout.agent_log(name.split("/")[-1]) for name in waiting if name != "controller"}
            logs.add(layout.controller_log)
            for path in sorted(logs):
                lines.append(f"--- {_show(path)}:\n{processes.tail(path, lines=20)}")
            lines.append("Everything started is left running to look at; `make down` stops it.")
            raise LocalCloudError("\n".join(lines))
        time.sleep(0.25)


SEED_DIR = Path("/var/lib/cumulo/seed")


def _seed_tiny_guest(log: Log) -> None:
    """Put the tiny test guest where the quickstart's Template points (file:///var/lib/cumulo/seed/...)."""
    guest = guestimage.ensure_tiny_guest(log)
    SEED_DIR.mkdir(parents=True, exist_ok=True)
    for source, digest, target in ((guest.disk, guest.disk_sha256, "tiny-guest.qcow2"),
                                   (guest.kernel, guest.kernel_sha256, "tiny-guest.vmlinuz"),
                                   (guest.initrd, guest.initrd_sha256, "tiny-guest.initrd")):
        stamp = SEED_DIR / f".{target}.sha256"
        if (SEED_DIR / target).exists() and stamp.exists() and stamp.read_text() == digest:
            continue
        partial = SEED_DIR / f".{target}.partial"
        shutil.copyfile(source, partial)
        partial.rename(SEED_DIR / target)
        stamp.write_text(digest)


def _wait_vms_running(plane: envtest.ControlPlane, vms: list[tuple[str, str]], log: Log, timeout: float,
                      since: float | None = None, uris: Mapping[str, str] | None = None,
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """Wait until the quickstart's guests run, their consoles show the boot marker and, for a guest with a NIC,
    the address IPAM gave its first NIC, leased by DHCP from the virtual router. Their phases and addresses.

    Only the console of the guest's latest start counts (after the agent's last ``[cumulo-agent <time>] starting
    domain`` line), and with ``since`` (a hypervisor was started anew, its guests destroyed) only a start after it:
    the log is appended to across restarts, so an older boot's markers are still in it.

    A guest whose domain has fewer interfaces than its launch asks for (it was started before the quickstart gave
    it its NIC: a state directory of an older Cumulo) is stopped and started again through its spec; a running
    domain is adopted as it is, never re-plugged. ``uris``: each host's libvirt URI, to look at the domain."""
    deadline = time.monotonic() + timeout
    phases = _vm_phases(plane, vms)
    addresses: dict[str, str] = {}
    for namespace, name in vms:
        key = f"{namespace}/{name}"
        console = None
        checked: str | None = None  # the domain run (uuid + start time) whose interfaces were counted
        restarting = False
        while time.monotonic() < deadline:
            result = plane.kubectl("get", "virtualmachine", name, "-n", namespace, "-o", "json", check=False)
            status = (json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}
            phases[key] = status.get("phase") or "(no phase yet)"
            console = ((status.get("node") or {}).get("consoleLog"))
            address = next((nic.get("ipAddress") for nic in status.get("nics") or []), None)
            text = _current_boot(_read(Path(console)) if console else "", since)
            if restarting:
                if phases[key] == "Stopped":
                    plane.kubectl("patch", "virtualmachine", name, "-n", namespace, "--type", "merge",
                                  "--field-manager=cumulo-quickstart", "-p", '{"spec":{"state":"Running"}}')
                    restarting, since = False, time.time()
            elif phases[key] == "Running" and guestimage.BOOT_MARKER in text:
                marker = f"{guestimage.IP_PREFIX}eth0 {address}"
                if address is None:
                    log(f"{key} is Running; its console ({console}) shows {guestimage.BOOT_MARKER!r}")
                    break
                if marker in text:
                    log(f"{key} is Running; its console ({console}) shows {marker!r} (its DHCP lease)")
                    addresses[key] = address
                    break
                node, launch = status.get("node") or {}, status.get("launch") or {}
                run = f"{node.get('domainUuid')}@{node.get('startedAt')}"
                if uris and launch.get("nics") and checked != run and node.get("host") in uris:
                    checked = run
                    plugged = _domain_interfaces(uris[node["host"]], node.get("domainUuid"))
                    if plugged is not None and plugged < len(launch["nics"]):
                        log(f"{key} runs with {plugged} of its {len(launch['nics'])} NICs (started before they "
                            "were added); stopping and starting it")
                        plane.kubectl("patch", "virtualmachine", name, "-n", namespace, "--type", "merge",
                                      "--field-manager=cumulo-quickstart", "-p", '{"spec":{"state":"Stopped"}}')
                        restarting = True
            time.sleep(0.5)
        else:
            ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
            raise LocalCloudError(f"VirtualMachine {key} is {phases[key]}, not Running with its boot marker and "
                                  f"DHCP lease, after {timeout:.0f}s: {ready.get('reason')}: {ready.get('message')}"
                                  + (f"\nconsole {console}:\n{_read(Path(console))[-2000:]}" if console else ""))
    return phases, addresses


_START_LINE = re.compile(r"^\[cumulo-agent (\S+)\] starting domain .*$", re.M)


def _current_boot(console: str, since: float | None) -> str:
    """The part of a console log written since the guest's last start (all of it when it has no start line);
    "" when that start is older than ``since``."""
    starts = list(_START_LINE.finditer(console))
    if not starts:
        return console if since is None else ""
    last = starts[-1]
    if since is not None:
        try:
            stamp = _timestamp(last.group(1))
        except ValueError:
            stamp = None
        if stamp is None or stamp < int(since):  # the line has whole seconds
            return ""
    return console[last.end():]


def _domain_interfaces(uri: str, uuid: str | None) -> int | None:
    """How many network interfaces the running domain ``uuid`` has (None: cannot tell)."""
    import libvirt

    if not uuid:
        return None
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors are exceptions; libvirt prints them otherwise
    try:
        connection = libvirt.open(uri)
    except libvirt.libvirtError:
        return None
    try:
        return connection.lookupByUUIDString(uuid).XMLDesc().count("<interface ")
    except libvirt.libvirtError:
        return None
    finally:
        connection.close()


def _wait_public_ips(plane: envtest.ControlPlane, manifests: Quickstart, timeout: float) -> dict[str, str]:
    """The quickstart's public addresses, once allocated and their firewall rules applied in the router."""
    deadline = time.monotonic() + timeout
    addresses: dict[str, str] = {}
    waiting: list[str] = []
    while True:
        waiting = []
        for plural, objects in (("publicipaddresses", manifests.public_ips),
                                ("firewallrules", manifests.firewall_rules)):
            for namespace, name in objects:
                result = plane.kubectl("get", plural, name, "-n", namespace, "-o", "json", check=False)
                status = (json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}
                if plural == "publicipaddresses" and status.get("ipAddress"):
                    addresses[f"{namespace}/{name}"] = status["ipAddress"]
                elif plural == "firewallrules" and status.get("phase") == "Applied":
                    continue
                else:
                    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
                    waiting.append(f"{plural} {namespace}/{name}: {status.get('phase') or '(no phase yet)'} "
                                   f"{ready.get('reason') or ''} {ready.get('message') or ''}".rstrip())
        if not waiting:
            return addresses
        if time.monotonic() > deadline:
            raise LocalCloudError(f"not ready after {timeout:.0f}s:\n  " + "\n  ".join(waiting))
        time.sleep(0.5)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _vm_phases(plane: envtest.ControlPlane, vms: list[tuple[str, str]]) -> dict[str, str]:
    phases = {}
    for namespace, name in vms:
        result = plane.kubectl("get", "virtualmachine", name, "-n", namespace, "-o", "jsonpath={.status.phase}",
                               check=False)
        phases[f"{namespace}/{name}"] = (result.stdout.strip() or "(no phase yet)") if result.returncode == 0 \
            else "(not found)"
    return phases


def _summary(cloud: Cloud, layout: Layout, plane: envtest.ControlPlane, components: Mapping[str, Component],
             daemons: Mapping[str, libvirtd.PrivateLibvirtd]) -> str:
    fresh = "started " + ", ".join(cloud.started) if cloud.started else "everything was already running"
    lines = [
        "",
        f"Cumulo is up ({fresh}; {cloud.seconds:.1f}s).",
        "",
        f"  control plane  {plane.server}  etcd pid {cloud.pids['etcd']}, kube-apiserver pid "
        f"{cloud.pids['kube-apiserver']}  logs {_show(plane.workdir)}/*.log",
        f"  controller     pid {cloud.pids['controller']}  log {_show(layout.controller_log)}",
    ]
    for host, daemon in daemons.items():
        agent = components[f"agent/{host}"]
        lines.append(f"  {host:<14} {cloud.hosts.get(host, '?')}: agent pid {agent.record.pid} "
                     f"(log {_show(agent.log)}), libvirtd pid {daemon.pid} "
                     f"(log {_show(daemon.log_path)}, {daemon.uri})")
    for vm, phase in cloud.vms.items():
        address = f" at {cloud.addresses[vm]}" if vm in cloud.addresses else ""
        lines.append(f"  vm {vm:<11} {phase}{address}  (`cumulo console {vm}` prints its serial console)")
    kubeconfig = _show(cloud.kubeconfig)
    state_flag = "" if layout.root == STATE_DIR else f" --state-dir {_show(layout.root)}"
    if cloud.lab is not None:
        lines += [
            "",
            f"Network lab {cloud.lab.prefix}: each host is a network namespace ("
            + ", ".join(f"{host}: {netns}" for host, netns in cloud.lab.hosts.items())
            + ") with its bridges cloudbr0 (guest VXLAN)",
            f"and cloudbr1 (public) and a private libvirtd (QEMU/TCG) inside; {cloud.lab.public} holds the public "
            "gateway (the internet).",
        ]
        for name, address in cloud.public_ips.items():
            lines += [f"  public ip {name}: {address}; from the internet:",
                      f"    ip netns exec {cloud.lab.public} curl http://{address}/",
                      f"    .venv/bin/cumulo netns{state_flag} public -- curl http://{address}/"]
    lines += [
        "",
        f"  export KUBECONFIG={kubeconfig}",
        "  kubectl get zones,hostpods,clusters,hosts     # host1 and host2 Up, with capacity",
        "  kubectl get hosts,storagepools -o wide",
        "  kubectl get cumulo -A                         # every Cumulo object",
        "  kubectl get vm -n demo                        # the demo guest",
        "  kubectl get networks,pip,vr -n demo           # its network, public IPs and virtual router",
        "  kubectl explain virtualmachine.spec           # the API, documented",
        "",
        "Stop everything with `make down`.",
    ]
    return "\n".join(lines)
