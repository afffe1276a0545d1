"""The test topology itself: hosts reach each other over the underlay (at its MTU) and the public namespace
over the public network; close() leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from cumulo import netlab as netlab_module
from cumulo.netlab import NetLab

pytest_plugins = ["conftest_netlab"]


def test_hosts_underlay_and_public(netlab: NetLab) -> None:
    h1, h2 = netlab.add_host("h1"), netlab.add_host("h2")
    public = netlab.add_public("203.0.113.1/24")
    assert h1.netns == f"{netlab.prefix}-h1"
    assert h1.mtu("cloudbr0") == h1.mtu("eth0") == 1600
    assert h1.ping(h2.underlay_ip, size=1572)
    assert h1.exec(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert h1.exec(["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]).stdout.strip() == "1"
    # cloudbr1 has no address; give h2's one for the check and reach the internet's gateway.
    h2.exec(["ip", "addr", "add", "203.0.113.20/24", "dev", "cloudbr1"])
    assert h2.ping("203.0.113.1")
    assert public.exec(["ip", "-o", "addr", "show", "eth0"]).stdout.count("203.0.113.1/24") == 1


def test_close_removes_everything(netlab_factory) -> None:
    lab = netlab_factory()
    lab.add_host("h1")
    lab.add_public()
    sleeper = lab.popen(lab.hosts["h1"].netns, ["sleep", "600"])
    lab.close()
    assert sleeper.poll() is not None
    assert not [ns for ns in netlab_module.list_netns() if ns.startswith(f"{lab.prefix}-")]
    assert netlab_module.run(["ip", "link", "show", f"{lab.prefix}u"], check=False).returncode != 0


def test_reap_stale_removes_labs_of_dead_owners(netlab_factory) -> None:
    lab = netlab_factory()
    lab.add_host("h1")
    (netlab_module.STATE_DIR / lab.prefix).write_text("999999999")  # an owner that cannot exist
    assert lab.prefix in netlab_module.reap_stale()
    assert not [ns for ns in netlab_module.list_netns() if ns.startswith(f"{lab.prefix}-")]
    live = netlab_factory()
    assert (netlab_module.STATE_DIR / live.prefix).read_text() == str(os.getpid())
    assert live.prefix not in netlab_module.reap_stale()
