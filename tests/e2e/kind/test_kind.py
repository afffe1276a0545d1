"""Cumulo on kind: the chart installed with the simulator hypervisor, the quickstart applied, demo-vm Running.

run.sh does the work; this suite runs it where a container engine and kind exist, and is skipped with the reason
elsewhere (this development machine has a docker client but no engine). The quickstart overlay it applies is
built here in any case, with the toolchain's kubectl (kustomize is built into it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cumulo import toolchain

HERE = Path(__file__).resolve().parent
KUBECTL = toolchain.binary("kubectl")
HELM = toolchain.binary("helm")


def engine_missing() -> str | None:
    """Why the kind suite cannot run here, or None."""
    if shutil.which("kind") is None:
        return "kind is not installed"
    if shutil.which("docker") is None:
        return "docker is not installed"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"docker cannot reach a container engine ({probe.stderr.strip().splitlines()[-1:]})"
    return None


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_quickstart_runs_on_kind_with_the_simulator():
    reason = engine_missing()
    if reason:
        pytest.skip(f"kind end-to-end skipped: {reason}; it needs a machine with a running Docker engine and kind "
                    "(tests/e2e/kind/run.sh)")
    env = {**os.environ, "KUBECTL": str(KUBECTL) if KUBECTL.exists() else "kubectl",
           "HELM": str(HELM) if HELM.exists() else "helm"}
    result = subprocess.run([str(HERE / "run.sh")], env=env, capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, f"run.sh failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert "demo-vm Running" in result.stdout


@pytest.mark.skipif(not KUBECTL.exists(), reason=f"kubectl is not built ({KUBECTL}): `cumulo toolchain`")
def test_the_simulator_quickstart_overlay_builds():
    built = subprocess.run([str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                            str(HERE / "quickstart-simulator")], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert ("VirtualMachine", "demo-vm") in kinds and ("PublicIPAddress", "demo-web") in kinds
    assert not any(kind in ("Host",) for kind, _ in kinds)  # the nodes are the hosts (run.sh)
    assert not any(kind == "StoragePool" and name.startswith("host") for kind, name in kinds)
    cluster = next(doc for doc in docs if doc["kind"] == "Cluster")
    template = next(doc for doc in docs if doc["kind"] == "Template")
    assert cluster["spec"]["hypervisorType"] == "Simulator" and template["spec"]["hypervisor"] == "Simulator"
