"""`make up` / `make down` for real (cumulo.localcloud), in a temporary state directory so that a developer's
running cloud (in .cumulo/) is not disturbed: control plane, controller, a network lab (a namespace per quickstart
host and the public side), a private libvirtd inside each host's namespace and an agent per host, hosts Up, the
demo guest leased its address from the virtual router and answers HTTP at its static NAT public address from the
public namespace; idempotent up (nothing restarted, a dead process restarted) and down (the lab removed too)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cumulo import libvirtd, localcloud, netlab, processes, toolchain


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes.proc_start_time(pid) is not None:  # a zombie counts as gone
        if time.monotonic() > deadline:
            return False
        processes.reap(pid)
        time.sleep(0.05)
    return True


def kubectl(kubeconfig: Path, *args: str) -> str:
    return subprocess.run([str(toolchain.binary("kubectl")), "--kubeconfig", str(kubeconfig), *args],
                          check=True, text=True, capture_output=True, timeout=30).stdout


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state directory: libvirtd's socket paths under it must fit in 107 bytes, which pytest's
    tmp_path (/tmp/pytest-of-root/pytest-NNN/<test name>/) does not leave room for."""
    directory = Path(tempfile.mkdtemp(prefix="cumulo-up-"))
    yield directory / "cloud"
    shutil.rmtree(directory, ignore_errors=True)


def test_up_runs_the_whole_cloud_idempotently_and_down_stops_it(state_dir: Path) -> None:
    reason = libvirtd.unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private libvirtd: {reason}")
    messages: list[str] = []
    recorded: set[int] = set()
    try:
        cloud = localcloud.up(state_dir, log=messages.append, timeout=120)
        recorded |= set(cloud.pids.values())
        assert cloud.hosts == {"host1": "Up", "host2": "Up"}
        assert set(cloud.pids) == {"etcd", "kube-apiserver", "controller", "libvirtd/host1", "libvirtd/host2",
                                   "agent/host1", "agent/host2"}
        assert sorted(cloud.started) == sorted(cloud.pids)
        assert all(processes.alive(pid, None) for pid in cloud.pids.values())
        # What a user sees with the admin kubeconfig: both hosts Up in the State column.
        kubeconfig = state_dir / "kubeconfig"
        assert cloud.kubeconfig == kubeconfig
        rows = [line.split() for line in kubectl(kubeconfig, "get", "hosts", "--no-headers").splitlines()]
        assert sorted((row[0], row[2]) for row in rows) == [("host1", "Up"), ("host2", "Up")]
        assert (state_dir / "logs" / "controller.log").stat().st_size > 0
        assert (state_dir / "logs" / "agent-host1.log").stat().st_size > 0
        summary = messages[-1]
        assert "host1" in summary and "demo/demo-vm" in summary

        # Real networking: each host is a namespace of the lab, its libvirtd runs in it; the demo guest leased
        # the address IPAM gave it from its network's virtual router, and the internet reaches its web page
        # through the quickstart's static NAT address (firewall rule: port 80 open).
        lab = cloud.lab
        assert lab is not None and set(lab.hosts) == {"host1", "host2"}
        assert set(netlab.list_netns()) >= {*lab.hosts.values(), lab.public}
        address = cloud.addresses["demo/demo-vm"]
        assert address.startswith("10.1.1."), cloud.addresses
        public_ip = cloud.public_ips["demo/demo-web"]
        assert public_ip.startswith("203.0.113.") and public_ip in summary and lab.public in summary
        page = subprocess.run(["ip", "netns", "exec", lab.public, "curl", "-s", "--max-time", "5",
                               f"http://{public_ip}/"], capture_output=True, text=True, timeout=30).stdout
        assert "hostname=demo-vm" in page, page
        via_cli = subprocess.run([str(localcloud.REPO / ".venv" / "bin" / "cumulo"), "netns", "--state-dir",
                                  str(state_dir), "public", "--", "curl", "-s", "--max-time", "5",
                                  f"http://{public_ip}/"], capture_output=True, text=True, timeout=30).stdout
        assert via_cli == page

        began = time.monotonic()
        again = localcloud.up(state_dir, log=messages.append)
        took = time.monotonic() - began
        assert again.started == [] and again.pids == cloud.pids, "a second up must reuse every process"
        assert again.lab == lab and again.addresses == cloud.addresses and again.public_ips == cloud.public_ips
        assert took < 5, f"a second up took {took:.1f}s"
        assert "everything was already running" in messages[-1]

        os.kill(cloud.pids["controller"], signal.SIGKILL)
        assert gone(cloud.pids["controller"])
        third = localcloud.up(state_dir, log=messages.append)
        recorded |= set(third.pids.values())
        assert third.started == ["controller"]
        assert third.pids["controller"] != cloud.pids["controller"] and processes.alive(third.pids["controller"], None)
        assert {k: v for k, v in third.pids.items() if k != "controller"} == \
               {k: v for k, v in cloud.pids.items() if k != "controller"}
    finally:
        stopped = localcloud.down(state_dir, log=messages.append)
    assert set(stopped) == {"agent/host1", "agent/host2", "controller", "libvirtd/host1", "libvirtd/host2",
                            f"network lab {lab.prefix}", "control plane"}, messages
    assert not [netns for netns in netlab.list_netns() if netns.startswith(f"{lab.prefix}-")]
    assert subprocess.run(["ip", "link", "show", f"{lab.prefix}u"], capture_output=True).returncode != 0
    assert all(gone(pid) for pid in recorded), [pid for pid in recorded if not gone(pid, 0)]
    assert not (state_dir / "kubeconfig").exists()
    assert localcloud.down(state_dir, log=messages.append) == []
    assert messages[-1] == "nothing is running"
