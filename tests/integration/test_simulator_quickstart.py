"""What tests/e2e/kind/run.sh applies, on a local simulated cloud: the quickstart overlay for the simulator and the
per-node hosts (hosts.sh) with two simulator agents standing in for the kind nodes' DaemonSet pods, one controller;
demo/demo-vm goes Running. So the kind suite's manifests are known to work even where kind cannot run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cumulo import toolchain
from cumuloprocess import CumuloProcess, console_script
from privateplane import private_plane_fixtures

control_plane, kube, system_namespace = private_plane_fixtures()
pytestmark = pytest.mark.timeout(240)

KIND = Path(__file__).resolve().parents[1] / "e2e" / "kind"
NODES = ("kind-node-a", "kind-node-b")


def test_the_kind_quickstart_runs_on_simulated_nodes(control_plane, tmp_path):
    overlay = subprocess.run([str(toolchain.binary("kubectl")), "kustomize", "--load-restrictor",
                              "LoadRestrictionsNone", str(KIND / "quickstart-simulator")],
                             capture_output=True, text=True, check=True).stdout
    hosts = subprocess.run([str(KIND / "hosts.sh"), *NODES], capture_output=True, text=True, check=True).stdout
    kubeconfig = str(control_plane.admin_kubeconfig)
    processes = [CumuloProcess("controller", [console_script("cumulo-controller"), "--kubeconfig", kubeconfig,
                                              "--metrics-port", "0"], tmp_path / "controller.log")]
    try:
        processes[0].wait_for_log("reconciling with", timeout=60)
        control_plane.kubectl("apply", "-f", "-", input=overlay)
        control_plane.kubectl("apply", "-f", "-", input=hosts)
        for node in NODES:  # as the DaemonSet runs it (values-simulator.yaml), one per node
            processes.append(CumuloProcess(node, [
                console_script("cumulo-agent"), "--kubeconfig", kubeconfig, "--host", node, "--hypervisor", "simulator",
                "--register-cluster", "cluster1", "--heartbeat-interval", "2", "--metrics-port", "0",
                "--state-dir", str(tmp_path / node)], tmp_path / f"{node}.log"))
        deadline = time.monotonic() + 150
        phase = None
        while phase != "Running":
            assert time.monotonic() < deadline, (
                f"demo-vm is {phase}:\n{control_plane.kubectl('get', 'cumulo', '-A').stdout}\n"
                f"{control_plane.kubectl('get', 'vm', 'demo-vm', '-n', 'demo', '-o', 'yaml').stdout[-3000:]}")
            result = control_plane.kubectl("get", "vm", "demo-vm", "-n", "demo", "-o", "json", check=False)
            phase = (json.loads(result.stdout).get("status") or {}).get("phase") if result.returncode == 0 else None
            time.sleep(1)
        vm = json.loads(control_plane.kubectl("get", "vm", "demo-vm", "-n", "demo", "-o", "json").stdout)
        assert vm["status"]["placement"]["host"] in NODES
    finally:
        for process in processes:
            process.stop()
