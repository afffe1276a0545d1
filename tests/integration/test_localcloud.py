"""`make up` / `make down` for real (cumulo.localcloud), in a temporary state directory so that a developer's
running cloud (in .cumulo/) is not disturbed: control plane, controller, a private libvirtd and an agent per
quickstart host, hosts Up; idempotent up (nothing restarted, a dead process restarted) and down."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cumulo import libvirtd, localcloud, processes, toolchain


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


def test_up_runs_the_whole_cloud_idempotently_and_down_stops_it(tmp_path: Path) -> None:
    reason = libvirtd.unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private libvirtd: {reason}")
    state_dir = tmp_path / "cloud"
    messages: list[str] = []
    recorded: set[int] = set()
    try:
        cloud = localcloud.up(state_dir, log=messages.append, timeout=60)
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
        assert "host1" in summary and "--network-driver simulator" in summary and "demo/demo-vm" in summary

        began = time.monotonic()
        again = localcloud.up(state_dir, log=messages.append)
        took = time.monotonic() - began
        assert again.started == [] and again.pids == cloud.pids, "a second up must reuse every process"
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
                            "control plane"}, messages
    assert all(gone(pid) for pid in recorded), [pid for pid in recorded if not gone(pid, 0)]
    assert not (state_dir / "kubeconfig").exists()
    assert localcloud.down(state_dir, log=messages.append) == []
    assert messages[-1] == "nothing is running"
