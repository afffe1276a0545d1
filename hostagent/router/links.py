"""Netlink work of the router (pyroute2): its network namespace, its veths, addresses and default route.

Plain synchronous functions (callers run them in a thread). Every ``ensure_*`` reads first and changes only
what differs, so applying an unchanged spec to a working router touches nothing; each returns whether it
changed something. ``netns=None`` is the agent's own network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import typing as t
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR = "/run/netns"


class LinkError(Exception):
    """A netlink operation failed; the message is fit for a status field."""


@contextlib.contextmanager
def _ipr(namespace: str | None) -> Iterator[IPRoute]:
    try:
        ipr = IPRoute(netns=namespace) if namespace else IPRoute()
    except (OSError, NetlinkError) as error:
        raise LinkError(f"cannot open netlink in network namespace {namespace or '(agent)'}: {error}") from None
    try:
        yield ipr
    except NetlinkError as error:
        raise LinkError(f"netlink in network namespace {namespace or '(agent)'}: {error}") from None
    finally:
        ipr.close()


# -- namespaces -----------------------------------------------------------------------------------


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def ensure_netns(name: str) -> bool:
    """The named namespace exists with loopback up; whether it was created."""
    created = False
    if netns_inode(name) is None:
        try:
            netns.create(name)
        except OSError as error:
            if error.errno != errno.EEXIST:
                raise LinkError(f"cannot create network namespace {name}: {error}") from None
        created = True
    with _ipr(name) as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo and not ipr.get_links(lo[0])[0]["flags"] & 1:  # IFF_UP
            ipr.link("set", index=lo[0], state="up")
    return created


def remove_netns(name: str) -> bool:
    """Remove the namespace (its interfaces go with it, asynchronously); whether it existed."""
    if netns_inode(name) is None:
        return False
    try:
        netns.remove(name)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise LinkError(f"cannot remove network namespace {name}: {error}") from None
    return True


# -- links ------------------------------------------------------------------------------------------


def _link(ipr: IPRoute, name: str) -> t.Any | None:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        return None
    try:
        return ipr.get_links(indexes[0])[0]
    except NetlinkError as error:
        if error.code == errno.ENODEV:
            return None
        raise


def delete_link(namespace: str | None, name: str) -> bool:
    """Delete the interface (a veth takes its peer along); whether it existed."""
    with _ipr(namespace) as ipr:
        link = _link(ipr, name)
        if link is None:
            return False
        try:
            ipr.link("del", index=link["index"])
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise
    return True


def ensure_veth(host_netns: str | None, host_name: str, router_netns: str, router_name: str, *, mac: str,
                mtu: int) -> bool:
    """A veth pair: ``host_name`` in the host's namespace, ``router_name`` (with ``mac``) in the router's, both
    up with ``mtu``. A half-present or mismatched pair is replaced. Whether the pair was (re)created."""
    mac = mac.lower()
    created = False
    with _ipr(host_netns) as host, _ipr(router_netns) as router:
        host_link, router_link = _link(host, host_name), _link(router, router_name)
        paired = (host_link is not None and router_link is not None
                  and host_link.get("IFLA_LINK") == router_link["index"]
                  and router_link.get("IFLA_LINK") == host_link["index"]
                  and router_link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth")
        if not paired:
            if host_link is not None:
                host.link("del", index=host_link["index"])
            if router_link is not None:
                router.link("del", index=router_link["index"])
            host.link("add", ifname=host_name, kind="veth", mtu=mtu,
                      peer={"ifname": router_name, "net_ns_fd": router_netns, "mtu": mtu, "address": mac})
            created = True
            host_link, router_link = _link(host, host_name), _link(router, router_name)
            if host_link is None or router_link is None:
                raise LinkError(f"veth {host_name}/{router_name} did not appear after creation")
        changes: dict[str, t.Any] = {}
        if router_link.get("IFLA_ADDRESS", "").lower() != mac:
            changes["address"] = mac
        if router_link.get("IFLA_MTU") != mtu:
            changes["mtu"] = mtu
        if not router_link["flags"] & 1:
            changes["state"] = "up"
        if changes:
            router.link("set", index=router_link["index"], **changes)
        host_changes: dict[str, t.Any] = {}
        if host_link.get("IFLA_MTU") != mtu:
            host_changes["mtu"] = mtu
        if not host_link["flags"] & 1:
            host_changes["state"] = "up"
        if host_changes:
            host.link("set", index=host_link["index"], **host_changes)
    return created or bool(changes) or bool(host_changes)


def ensure_addresses(namespace: str, ifname: str, addresses: Sequence[str]) -> bool:
    """Exactly these IPv4 addresses (CIDR notation; the first one primary) on ``ifname``; whether any changed."""
    wanted = [ipaddress.IPv4Interface(address) for address in addresses]
    changed = False
    with _ipr(namespace) as ipr:
        link = _link(ipr, ifname)
        if link is None:
            raise LinkError(f"{ifname} is missing in network namespace {namespace}")
        index = link["index"]

        def present() -> set[ipaddress.IPv4Interface]:
            return {ipaddress.IPv4Interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}")
                    for entry in ipr.get_addr(index=index, family=socket.AF_INET)}

        for interface in present() - set(wanted):
            with contextlib.suppress(NetlinkError):  # a secondary goes with its primary
                ipr.addr("del", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            changed = True
        remaining = present()
        for interface in wanted:  # in order, so the first is the primary address
            if interface not in remaining:
                ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
                changed = True
    return changed


def ensure_default_route(namespace: str, gateway: str | None, ifname: str) -> bool:
    """The default route via ``gateway`` on ``ifname`` (None: no default route); whether it changed."""
    with _ipr(namespace) as ipr:
        routes = [route for route in ipr.get_routes(family=socket.AF_INET, table=254)
                  if route["dst_len"] == 0]
        link = _link(ipr, ifname) if gateway else None
        if gateway and link is None:
            raise LinkError(f"{ifname} is missing in network namespace {namespace}")
        current = [(route.get("RTA_GATEWAY"), route.get("RTA_OIF")) for route in routes]
        if gateway and current == [(gateway, link["index"])]:
            return False
        if not gateway and not routes:
            return False
        for route in routes:
            ipr.route("del", dst="0.0.0.0/0", gateway=route.get("RTA_GATEWAY"), oif=route.get("RTA_OIF"))
        if gateway:
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=link["index"])
    return True
