"""A private Open vSwitch per simulated host: ``ovsdb-server`` + ``ovs-vswitchd`` of one network namespace.

A simulated hypervisor host is a network namespace (see :mod:`cumulo.netlab`); when its virtual switch is
Open vSwitch it needs a switch of its own, as a real host has. Each instance keeps everything in one work
directory (the OVSDB file ``conf.db``, the database socket ``db.sock``, the daemons' control sockets, pid
files and logs; the daemons find them through ``OVS_RUNDIR``/``OVS_DBDIR``/``OVS_LOGDIR``), so instances never
meet each other or a system Open vSwitch. Both daemons run inside the host's namespace (``ip netns exec``):
the ports ``ovs-vswitchd`` opens and the internal ports it creates (tap devices) are that host's interfaces,
and whatever kills a namespace's processes (a lab's teardown) ends its switch too. The database socket is a
file, so clients (the agent's network driver, ``ovs-vsctl``) reach :attr:`PrivateOpenVSwitch.db_url` from any
namespace.

Two modes, like :mod:`cumulo.libvirtd`:

* attached (``start()``, or a context manager): both daemons are our children, die with the Python process
  even when it is SIGKILLed (PR_SET_PDEATHSIG), and are reaped by :meth:`PrivateOpenVSwitch.stop`.
* detached (``start(detach=True)``, for ``make up``): the daemons outlive Python; their PIDs and start times
  are kept in ``<workdir>/state.json``; a second ``start`` in the same work directory reuses them, ``stop``
  from any process ends them.

Facts of these machines the setup relies on:

* There is no OVS kernel datapath (no ``openvswitch`` module): bridges must be ``datapath_type=netdev``
  (:func:`add_bridge` does that), the userspace datapath, which reads and writes ports through packet
  sockets and makes internal ports as tap devices (so ``/dev/net/tun`` must exist).
* ``ovs-vswitchd`` lists ``system`` in ``Open_vSwitch.datapath_types`` even without the kernel module: that
  column says what the binary was built with, not what the kernel can do.
* With the userspace datapath, a packet a namespace sends through a veth with TX checksum offload on
  leaves with its TCP/UDP checksum unfilled and is dropped by the receiver: turn offload off on the
  namespace side of every veth that ends on an OVS bridge (:func:`disable_tx_offload`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cumulo import processes

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
PKGDATADIR = Path("/usr/share/openvswitch")
STATE_FILE = "state.json"
DAEMONS = ("ovsdb-server", "ovs-vswitchd")
_SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL
VSCTL_TIMEOUT = 10  # seconds ovs-vsctl waits for the database (and for ovs-vswitchd to apply a change)


class OVSUnavailable(RuntimeError):
    """This machine cannot run a private Open vSwitch; the message says why (tests skip with it)."""


class OVSError(RuntimeError):
    """A private Open vSwitch failed to start or refused a command; the message has the daemon's words."""


def unavailable_reason() -> str | None:
    """Why a private Open vSwitch cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "a private Open vSwitch needs root (ovs-vswitchd opens packet sockets in a host namespace)"
    for binary in ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package openvswitch-switch)"
    if shutil.which("ip") is None:
        return "ip is not installed (Debian package iproute2)"
    if not SCHEMA.is_file():
        return f"{SCHEMA} is missing (Debian package openvswitch-common)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: the userspace datapath makes internal ports as tap devices"
    return None


def vsctl_argv(db_url: str, *args: str, wait: bool = True) -> list[str]:
    """``ovs-vsctl`` against the database at ``db_url``. ``wait=False`` (--no-wait) returns once the
    database has the change, without waiting for ``ovs-vswitchd`` to apply it."""
    argv = ["ovs-vsctl", f"--db={db_url}", f"--timeout={VSCTL_TIMEOUT}"]
    if not wait:
        argv.append("--no-wait")
    return [*argv, *args]


def disable_tx_offload(netns: str | None, device: str) -> None:
    """``ethtool -K <device> tx off`` (inside ``netns`` when given): see the module docstring for why."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    _run([*prefix, "ethtool", "-K", device, "tx", "off"], f"ethtool -K {device} tx off")


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OVSError(f"{what}: {error}") from None
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise OVSError(f"{what} failed (exit {result.returncode}): {detail}")
    return result.stdout


class PrivateOpenVSwitch:
    """The Open vSwitch of one simulated host (network namespace ``netns``), kept in ``workdir``."""

    def __init__(self, netns: str, workdir: Path | str) -> None:
        self.netns = netns
        self.workdir = Path(workdir).absolute()
        if len(str(self.db_socket).encode()) > _SUN_PATH_MAX:
            raise ValueError(f"work directory {self.workdir} too long for a Unix socket path")
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # Paths

    @property
    def db_file(self) -> Path:
        return self.workdir / "conf.db"

    @property
    def db_socket(self) -> Path:
        return self.workdir / "db.sock"

    @property
    def db_url(self) -> str:
        """Where clients reach the database (``--db=`` of ovs-vsctl, the agent's ``--ovsdb``)."""
        return f"unix:{self.db_socket}"

    def pidfile(self, daemon: str) -> Path:
        return self.workdir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.workdir / f"{daemon}.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment every OVS program of this instance runs with (its directories, a fixed locale)."""
        directory = str(self.workdir)
        return {**os.environ, "LC_ALL": "C", "OVS_RUNDIR": directory, "OVS_DBDIR": directory,
                "OVS_LOGDIR": directory, "OVS_SYSCONFDIR": directory, "OVS_PKGDATADIR": str(PKGDATADIR)}

    # Life cycle

    def _state(self) -> dict[str, processes.Record]:
        data = processes.read_json(self.workdir / STATE_FILE) or {}
        records = {}
        for daemon in DAEMONS:
            record = processes.Record.from_json(data.get(daemon))
            if record is not None:
                records[daemon] = record
        return records

    def _running(self, daemon: str) -> bool:
        child = self._children.get(daemon)
        if child is not None:
            return child.poll() is None
        record = self._state().get(daemon)
        return record is not None and record.alive

    @property
    def running(self) -> bool:
        return all(self._running(daemon) for daemon in DAEMONS)

    def start(self, *, detach: bool = False, timeout: float = 15.0) -> PrivateOpenVSwitch:
        """Start whatever of the two daemons is not running (idempotent), and wait until ``ovs-vswitchd`` has
        applied the database's configuration. Raises :class:`OVSUnavailable` or :class:`OVSError`."""
        reason = unavailable_reason()
        if reason:
            raise OVSUnavailable(reason)
        if _run(["ip", "netns", "list"], "ip netns list").split().count(self.netns) == 0:
            raise OVSError(f"network namespace {self.netns!r} does not exist")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.db_file.exists():
            _run(["ovsdb-tool", "create", str(self.db_file), str(SCHEMA)], "ovsdb-tool create", self.env)
        deadline = time.monotonic() + timeout
        if not self._running("ovsdb-server"):
            self.db_socket.unlink(missing_ok=True)
            self._spawn("ovsdb-server", [
                "ip", "netns", "exec", self.netns, "ovsdb-server", str(self.db_file),
                f"--remote=punix:{self.db_socket}",
                f"--pidfile={self.pidfile('ovsdb-server')}", f"--log-file={self.log_file('ovsdb-server')}",
            ], detach)
            self._wait(deadline, "ovsdb-server", self._db_answers)
            _run(vsctl_argv(self.db_url, "init", wait=False), "ovs-vsctl init", self.env)
        if not self._running("ovs-vswitchd"):
            self._spawn("ovs-vswitchd", [
                "ip", "netns", "exec", self.netns, "ovs-vswitchd", self.db_url,
                f"--pidfile={self.pidfile('ovs-vswitchd')}", f"--log-file={self.log_file('ovs-vswitchd')}",
            ], detach)
        # Without --no-wait, ovs-vsctl returns only once ovs-vswitchd has caught up with the database.
        remaining = max(1, int(deadline - time.monotonic()))
        try:
            _run([*vsctl_argv(self.db_url, f"--timeout={remaining}", "init")], "ovs-vsctl init", self.env,
                 timeout=remaining + 5)
        except OVSError as error:
            log = processes.tail(self.log_file("ovs-vswitchd"), lines=10)
            raise OVSError(f"ovs-vswitchd in {self.netns} did not come up: {error}\n{log}") from None
        if detach:
            processes.write_json(self.workdir / STATE_FILE, {
                daemon: processes.Record.of(self._pid(daemon)).to_json() for daemon in DAEMONS})
        return self

    def _spawn(self, daemon: str, argv: list[str], detach: bool) -> None:
        # Our children either way (so they are reaped): attached ones also die with us; detached ones are
        # recorded in state.json by start().
        child = processes.spawn(argv, self.workdir / f"{daemon}.out", detach=detach, env=self.env)
        self._children[daemon] = child

    def _pid(self, daemon: str) -> int:
        child = self._children.get(daemon)
        if child is not None:
            return child.pid
        record = self._state().get(daemon)
        if record is None:
            raise OVSError(f"{daemon} of {self.netns} is not known")
        return record.pid

    def _db_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.db_socket))
            except OSError:
                return False
        return True

    def _wait(self, deadline: float, daemon: str, ready: Any) -> None:
        while not ready():
            child = self._children.get(daemon)
            if child is not None and child.poll() is not None:
                raise OVSError(f"{daemon} of {self.netns} exited ({child.returncode}): "
                               f"{processes.tail(self.workdir / f'{daemon}.out', lines=5)}")
            if time.monotonic() > deadline:
                raise OVSError(f"{daemon} of {self.netns} did not answer in time")
            time.sleep(processes.POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> None:
        """End both daemons (ovs-vswitchd first: its internal ports go with it). Idempotent."""
        records = self._state()
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            child = self._children.pop(daemon, None)
            if child is not None:
                processes.terminate(child.pid, processes.proc_start_time(child.pid), timeout)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(1)
            elif daemon in records:
                records[daemon].terminate(timeout)
        (self.workdir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> PrivateOpenVSwitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Configuration (for topology set-up; the agent talks OVSDB itself)

    def vsctl(self, *args: str, wait: bool = True) -> str:
        return _run(vsctl_argv(self.db_url, *args, wait=wait), f"ovs-vsctl {' '.join(args[:2])}", self.env)

    def add_bridge(self, name: str, *, mtu: int | None = None) -> None:
        """An OVS bridge on the userspace datapath; its internal port ``name`` appears in the namespace."""
        args = ["--may-exist", "add-br", name, "--", "set", "Bridge", name, "datapath_type=netdev"]
        if mtu is not None:
            args += ["--", "set", "Interface", name, f"mtu_request={mtu}"]
        self.vsctl(*args)

    def add_port(self, bridge: str, port: str, *, tag: int | None = None) -> None:
        """Plug the namespace's interface ``port`` into ``bridge`` (an access port when ``tag`` is given,
        a trunk carrying every VLAN otherwise)."""
        args = ["--may-exist", "add-port", bridge, port]
        if tag is not None:
            args += [f"tag={tag}"]
        self.vsctl(*args)

    def ports(self, bridge: str) -> list[str]:
        return self.vsctl("list-ports", bridge).split()

    def bridges(self) -> list[str]:
        return self.vsctl("list-br").split()


# Lab hosts (cumulo.netlab) whose virtual switch is Open vSwitch

LAB_DIR = Path("/run/cumulo-ovs")  # <LAB_DIR>/<host netns>/: one switch's work directory
_lab_switches: dict[str, PrivateOpenVSwitch] = {}


def lab_switch(netns: str) -> PrivateOpenVSwitch:
    """The private Open vSwitch of the lab host whose namespace is ``netns``."""
    switch = _lab_switches.get(netns)
    if switch is None:
        raise KeyError(f"{netns} is not an Open vSwitch lab host of this process")
    return switch


def _remove_stale_lab_dirs(namespaces: Sequence[str]) -> None:
    # Work directories of namespaces that are gone (a crashed run's labs, reaped since).
    if LAB_DIR.is_dir():
        for directory in LAB_DIR.iterdir():
            if directory.name not in namespaces:
                shutil.rmtree(directory, ignore_errors=True)


def build_lab_host(lab: Any, host: Any) -> None:
    """The ``openvswitch`` host builder of :mod:`cumulo.netlab`: the traffic-label bridges ``cloudbr0``
    (underlay address on its internal port, MTU of the underlay) and ``cloudbr1`` are netdev bridges of the
    host's own Open vSwitch, with the host's NICs ``eth0``/``eth1`` as trunk ports (every VLAN tag passes)."""
    from cumulo import netlab

    reason = unavailable_reason()
    if reason:
        raise OVSUnavailable(reason)
    _remove_stale_lab_dirs(netlab.list_netns())
    switch = PrivateOpenVSwitch(host.netns, LAB_DIR / host.netns)

    def teardown() -> None:
        _lab_switches.pop(host.netns, None)
        switch.stop()
        shutil.rmtree(switch.workdir, ignore_errors=True)

    host.cleanups.append(teardown)
    switch.start()
    _lab_switches[host.netns] = switch
    for bridge, nic, mtu in ((netlab.UNDERLAY_BRIDGE, netlab.UNDERLAY_NIC, lab.underlay_mtu),
                             (netlab.PUBLIC_BRIDGE, netlab.PUBLIC_NIC, 1500)):
        switch.add_bridge(bridge, mtu=mtu)
        disable_tx_offload(host.netns, nic)
        switch.add_port(bridge, nic)
        host.exec(["ip", "link", "set", nic, "up"])
        host.exec(["ip", "link", "set", bridge, "up"])
    host.exec(["ip", "addr", "add", f"{host.underlay_ip}/{lab.underlay.prefixlen}", "dev", netlab.UNDERLAY_BRIDGE])
