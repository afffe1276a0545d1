"""Applying a router's spec on a host, adopting a running router, and tearing one down.

:meth:`RouterRuntime.apply` is level-based and idempotent: it renders everything first (a bad spec changes
nothing), then checks each piece and changes only what differs from the spec:

1. the owner record ``router.json`` (written before anything exists, so a router can always be traced to
   its VirtualRouter and its segments unplugged);
2. the namespace;
3. nftables: the digest in the table's comment against the rendered one; loaded only when they differ (before
   forwarding is on, so a new router never forwards unfiltered);
4. sysctls (``ip_forward=1``, IPv6 off);
5. per interface: the segment (``ensure_segment``), the veth pair, the host side plugged into the segment,
   the router side's MAC, MTU and addresses, TX checksum offload off (OVS netdev drops packets whose
   checksum a veth left to "hardware");
6. the default route via ``publicGateway``;
7. dnsmasq: the digests of what the running dnsmasq loaded (``dnsmasq.loaded``, written after each start or
   reload) against the rendered files: restart for a new configuration, SIGHUP for new hosts files,
   nothing otherwise; started when not running (pidfile, then ``/proc/<pid>`` must be a live dnsmasq with
   this configuration in this namespace).

An agent killed and started again therefore finds everything in place and changes nothing: guests keep their
leases and connections. dnsmasq is a daemon of its own (it outlives the agent); only :meth:`teardown` ends it.

Shell-outs (``ip netns exec`` with sysctl, ethtool, nft, dnsmasq) go through the agent's
:class:`~hostagent.executor.Executor`; netlink through :mod:`.links` in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
import typing as t

from controllers.api.v1alpha1.network import Segment
from controllers.api.v1alpha1.virtualrouter import RouterInterface, VirtualRouterSpec

from ..drivers.network import NetworkDriver, NetworkError
from ..executor import CommandError, Executor, check
from . import GUEST_IFNAME, PUBLIC_IFNAME, dnsmasq, host_veths, links, netns_name, netns_prefix, nftables

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
STOP_SECONDS = 5.0
RECORD = "router.json"
LOADED = "dnsmasq.loaded"
RULESET = "nftables.nft"
SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.disable_ipv6": "1",
           "net.ipv6.conf.default.disable_ipv6": "1"}


class RouterError(Exception):
    """The router cannot be brought to its spec; the message is fit for a status field."""


@dataclasses.dataclass
class Owner:
    """Which VirtualRouter a router on the host belongs to (``router.json``)."""

    namespace: str
    name: str
    uid: str
    host: str
    network_uid: str
    netns: str
    host_netns: str | None
    guest_segment: dict[str, t.Any] | None = None
    public_segment: dict[str, t.Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def segments(self) -> list[tuple[Segment, str]]:
        """(segment, host-side port) of each interface."""
        guest_port, public_port = host_veths(self.network_uid)
        return [(Segment.model_validate(raw), port)
                for raw, port in ((self.guest_segment, guest_port), (self.public_segment, public_port)) if raw]


@dataclasses.dataclass
class Applied:
    netns: str
    dnsmasq_pid: int | None
    warnings: tuple[str, ...]
    changed: list[str]   # what this apply changed (empty: the router was already as the spec says)


def _segment_json(interface: RouterInterface | None) -> dict[str, t.Any] | None:
    return interface.segment.model_dump(by_alias=True, mode="json") if interface is not None else None


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except FileNotFoundError:
        return None


def _write(path: str, content: str) -> None:
    """Atomically (readers never see half a file)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        file.write(content)
    os.replace(temporary, path)


def _process_state(pid: int) -> str | None:
    """The state letter of a process (None: no such process). PID 1 of a container may never reap: a dead
    daemon can linger as a zombie ('Z')."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    state = _process_state(pid)
    return state is not None and state not in ("Z", "X")


def _netns_processes(name: str) -> list[int]:
    """PIDs of the live processes in the named network namespace."""
    try:
        target = os.stat(os.path.join(links.NETNS_DIR, name))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            info = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (info.st_ino, info.st_dev) == (target.st_ino, target.st_dev) and _alive(int(entry)):
            found.append(int(entry))
    return found


def _processes_with(argument: str) -> list[int]:
    """PIDs of the live processes having ``argument`` on their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = file.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argument in argv and _alive(int(entry)):
            found.append(int(entry))
    return found


class RouterRuntime:
    def __init__(self, state_dir: str, host_netns: str | None, executor: Executor) -> None:
        self.root = os.path.join(state_dir, "routers")
        self.host_netns = host_netns
        self.executor = executor

    # -- names and files --------------------------------------------------------------------------

    def netns(self, network_uid: str) -> str:
        return netns_name(self.host_netns, network_uid)

    def directory(self, network_uid: str) -> str:
        return os.path.join(self.root, network_uid)

    def paths(self, network_uid: str) -> dnsmasq.Paths:
        return dnsmasq.Paths(self.directory(network_uid))

    def owner(self, network_uid: str) -> Owner | None:
        """The owner record of a router directory (None: missing or unreadable)."""
        raw = _read(os.path.join(self.root, network_uid, RECORD))
        if raw is None:
            return None
        try:
            return Owner(**json.loads(raw))
        except (TypeError, ValueError):
            return None

    def owners(self) -> list[tuple[str, Owner | None]]:
        """(network uid, owner record or None) of every router directory."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [(entry, self.owner(entry)) for entry in entries]

    def namespaces(self) -> list[str]:
        """The router namespaces of this host that exist."""
        prefix = netns_prefix(self.host_netns)
        return [name for name in links.list_netns() if name.startswith(prefix)]

    # -- commands -----------------------------------------------------------------------------------

    async def _in(self, netns: str, argv: list[str], what: str) -> str:
        result = await self.executor.run(["ip", "netns", "exec", netns, *argv], timeout=COMMAND_TIMEOUT)
        return check(result, what).stdout

    async def _sysctls(self, netns: str) -> bool:
        current = (await self._in(netns, ["sysctl", "-n", *SYSCTLS], "sysctl")).split()
        if current == list(SYSCTLS.values()):
            return False
        await self._in(netns, ["sysctl", "-qw", *(f"{key}={value}" for key, value in SYSCTLS.items())], "sysctl")
        return True

    async def _tx_offload_off(self, netns: str, ifname: str) -> bool:
        features = await self._in(netns, ["ethtool", "-k", ifname], "ethtool -k")
        if "tx-checksumming: off" in features:
            return False
        await self._in(netns, ["ethtool", "-K", ifname, "tx", "off"], "ethtool -K")
        return True

    async def ruleset_digest(self, netns: str) -> str | None:
        result = await self.executor.run(["ip", "netns", "exec", netns, "nft", "list", "table", nftables.FAMILY,
                                          nftables.TABLE], timeout=COMMAND_TIMEOUT)
        if result.returncode != 0:
            return None  # no table yet
        return nftables.applied_digest(result.stdout)

    # -- apply ----------------------------------------------------------------------------------------

    async def apply(self, spec: VirtualRouterSpec, *, namespace: str, name: str, uid: str,
                    network: NetworkDriver) -> Applied:
        uid_net = spec.network_uid
        if len(uid_net) < 8 or not uid_net.replace("-", "").isalnum():
            raise RouterError(f"networkUid {uid_net!r} is not a uid: it names the router's namespace and veths")
        netns = self.netns(uid_net)
        paths = self.paths(uid_net)
        try:
            ruleset = nftables.render(spec)
            files = dnsmasq.render(spec, paths) if dnsmasq.needed(spec) else None
        except (nftables.RulesetError, dnsmasq.DnsmasqConfigError) as error:
            raise RouterError(str(error)) from None
        changed: list[str] = []
        owner = Owner(namespace=namespace, name=name, uid=uid, host=spec.host, network_uid=uid_net, netns=netns,
                      host_netns=self.host_netns, guest_segment=_segment_json(spec.guest),
                      public_segment=_segment_json(spec.public))
        try:
            os.makedirs(paths.directory, mode=0o700, exist_ok=True)
            previous = self.owner(uid_net)
            # Until the interfaces have moved, the record keeps the segments they are plugged into (a failed
            # apply retried later must still release the old ones).
            await self._record(paths, dataclasses.replace(owner, guest_segment=previous.guest_segment,
                                                          public_segment=previous.public_segment)
                               if previous is not None else owner)
            if await asyncio.to_thread(links.ensure_netns, netns):
                changed.append("namespace")
            # The ruleset first: a new router never forwards (ip_forward) before its firewall is in place.
            if await self.ruleset_digest(netns) != ruleset.digest:
                path = os.path.join(paths.directory, RULESET)
                await asyncio.to_thread(_write, path, ruleset.text)
                await self._in(netns, ["nft", "-f", path], "nft -f")
                changed.append("nftables")
            if await self._sysctls(netns):
                changed.append("sysctl")
            guest_port, public_port = host_veths(uid_net)
            for interface, port, ifname in ((spec.guest, guest_port, GUEST_IFNAME),
                                            (spec.public, public_port, PUBLIC_IFNAME)):
                old = getattr(previous, "guest_segment" if ifname == GUEST_IFNAME else "public_segment", None)
                if await self._interface(netns, interface, port, ifname, old, network):
                    changed.append(ifname)
            await self._record(paths, owner)
            gateway = spec.public_gateway if spec.public is not None else None
            if await asyncio.to_thread(links.ensure_default_route, netns, gateway, PUBLIC_IFNAME):
                changed.append("route")
            pid, what = await self._dnsmasq(netns, paths, files)
            if what:
                changed.append(what)
        except (links.LinkError, CommandError, NetworkError, OSError) as error:
            raise RouterError(str(error)) from None
        warnings = ruleset.warnings + (files.warnings if files is not None else ())
        return Applied(netns, pid, warnings, changed)

    async def _record(self, paths: dnsmasq.Paths, owner: Owner) -> None:
        record = json.dumps(dataclasses.asdict(owner), indent=1, sort_keys=True)
        path = os.path.join(paths.directory, RECORD)
        if _read(path) != record:
            await asyncio.to_thread(_write, path, record)

    async def _interface(self, netns: str, interface: RouterInterface | None, port: str, ifname: str,
                         old_segment: dict[str, t.Any] | None, network: NetworkDriver) -> bool:
        """One router interface; whether anything changed."""
        old = Segment.model_validate(old_segment) if old_segment else None
        if interface is None:
            removed = await asyncio.to_thread(links.delete_link, self.host_netns, port)
            if old is not None:
                await network.unplug(old, port)
                await network.release_segment(old)
            return removed
        segment = interface.segment
        changed = False
        if old is not None and old != segment:
            await network.unplug(old, port)
            changed = True
        await network.ensure_segment(segment)
        if await asyncio.to_thread(links.ensure_veth, self.host_netns, port, netns, ifname,
                                   mac=interface.mac_address, mtu=segment.mtu):
            changed = True
        await network.plug(segment, port)
        if old is not None and old != segment:
            await network.release_segment(old)
        if await asyncio.to_thread(links.ensure_addresses, netns, ifname, interface.addresses):
            changed = True
            await self._announce(netns, ifname, interface.addresses)
        if await self._tx_offload_off(netns, ifname):
            changed = True
        return changed

    async def _announce(self, netns: str, ifname: str, addresses: list[str]) -> None:
        """Gratuitous ARP for new addresses: a router that moved to another host (same addresses, same MACs)
        is found at once by the segment's bridges and the neighbours' ARP caches, not after they expire.
        Best effort: a neighbour that misses it learns the usual way."""
        for address in addresses:
            try:
                await self.executor.run(["ip", "netns", "exec", netns, "busybox", "arping", "-U", "-c", "1", "-w", "1",
                                         "-I", ifname, address.split("/")[0]], timeout=5)
            except CommandError:
                pass

    # -- dnsmasq -------------------------------------------------------------------------------------

    def dnsmasq_pid(self, netns: str, paths: dnsmasq.Paths) -> int | None:
        """The PID of this router's running dnsmasq: a live dnsmasq started with this configuration, in this
        namespace, named by the pidfile (or, the pidfile lost, found among the namespace's processes)."""
        raw = _read(paths.pidfile)
        try:
            pid = int((raw or "").strip())
        except ValueError:
            pid = 0
        if pid and self._is_dnsmasq(pid, netns, paths):
            return pid
        # A lost pidfile: look for it among the namespace's processes rather than start a second one.
        for candidate in _netns_processes(netns):
            if self._is_dnsmasq(candidate, netns, paths):
                return candidate
        return None

    @staticmethod
    def _is_dnsmasq(pid: int, netns: str, paths: dnsmasq.Paths) -> bool:
        if not _alive(pid):
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().decode(errors="replace").split("\0")
            process_netns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        target = links.netns_inode(netns)
        if not argv or os.path.basename(argv[0]) != "dnsmasq" or f"--conf-file={paths.config}" not in argv:
            return False
        return target is not None and process_netns.st_ino == target

    async def _dnsmasq(self, netns: str, paths: dnsmasq.Paths, files: dnsmasq.Files | None) -> tuple[int | None, str]:
        """Converge dnsmasq; (its PID, what was done or '')."""
        pid = self.dnsmasq_pid(netns, paths)
        if files is None:
            if pid is not None:
                await self._stop(pid)
                return None, "dnsmasq stopped"
            return None, ""
        loaded_path = os.path.join(paths.directory, LOADED)
        loaded: dict[str, t.Any] | None = None
        try:
            loaded = json.loads(_read(loaded_path) or "null")
        except ValueError:
            loaded = None
        if pid is not None and (not isinstance(loaded, dict) or loaded.get("pid") != pid):
            loaded = None  # a dnsmasq we did not record: what it loaded is unknown
        needed = dnsmasq.change(loaded, files)
        if pid is not None and needed == dnsmasq.Change.NONE:
            return pid, ""
        for path, content in files.by_path(paths).items():
            if _read(path) != content:
                await asyncio.to_thread(_write, path, content)
        if pid is not None and needed == dnsmasq.Change.RELOAD:
            os.kill(pid, signal.SIGHUP)
            what = "dnsmasq reloaded"
        else:
            if pid is not None:
                await self._stop(pid)
            pid = await self._start(netns, paths)
            what = "dnsmasq restarted" if loaded else "dnsmasq started"
        await asyncio.to_thread(_write, loaded_path, json.dumps({"pid": pid, **files.digests()}))
        return pid, what

    async def _start(self, netns: str, paths: dnsmasq.Paths) -> int:
        # A dnsmasq of this router left in a namespace that was deleted under it (still alive, as it holds it)
        # would keep the old veths' peer and leases file busy: it goes first.
        for pid in await asyncio.to_thread(_processes_with, f"--conf-file={paths.config}"):
            await self._stop(pid)
        try:
            os.unlink(paths.pidfile)
        except FileNotFoundError:
            pass
        # dnsmasq forks into the background; its parent exits once the daemon runs (or with the error).
        await self._in(netns, ["dnsmasq", f"--conf-file={paths.config}"], "dnsmasq")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            pid = self.dnsmasq_pid(netns, paths)
            if pid is not None:
                return pid
            await asyncio.sleep(0.05)
        raise RouterError("dnsmasq started but its pidfile names no running dnsmasq")

    async def _stop(self, pid: int) -> None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_SECONDS
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                await asyncio.sleep(0.05)

    # -- teardown -------------------------------------------------------------------------------------

    async def teardown(self, network_uid: str, owner: Owner | None, network: NetworkDriver | None) -> None:
        """Remove the router of ``network_uid`` (a full uid, or the 8 characters of a namespace name): its
        processes, namespace, host-side veths, segments (when its owner record names them) and files."""
        netns = owner.netns if owner is not None else self.netns(network_uid)
        pids = await asyncio.to_thread(_netns_processes, netns)
        if len(network_uid) > 8:  # and its dnsmasq, should it run in a namespace deleted under it
            pids += await asyncio.to_thread(_processes_with, f"--conf-file={self.paths(network_uid).config}")
        for pid in sorted(set(pids)):
            await self._stop(pid)
        for port in host_veths(network_uid):
            # The veths would go with the namespace, but only once the kernel gets round to it.
            await asyncio.to_thread(links.delete_link, self.host_netns, port)
        await asyncio.to_thread(links.remove_netns, netns)
        if owner is not None and network is not None:
            for segment, port in owner.segments():
                await network.unplug(segment, port)
                await network.release_segment(segment)
        if len(network_uid) > 8:
            await asyncio.to_thread(shutil.rmtree, self.directory(network_uid), True)
