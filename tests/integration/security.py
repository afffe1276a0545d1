"""Cumulo's shipped RBAC and agent node restriction in a test control plane, and the identities they restrict.

``install_security(plane)`` applies charts/cumulo/templates/tenant-roles.yaml and agent-restriction.yaml as they
ship (once per control plane), fills in the aggregated admin/edit/view roles (envtest runs no aggregation
controller) and returns once the admission policy is in force (policies load asynchronously: a dry-run write
the policy must refuse is retried until it is refused).

Agent identities are client certificates: ``system:cumulo-agent:<host>`` in group ``cumulo:agents``; a
``--simulate N`` agent is ``system:cumulo-agent:<base>`` in ``cumulo:agents`` and ``cumulo:simulators``, which
the policy lets act for ``<base>-0`` … ``<base>-(N-1)`` (test and scale runs only).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cumulo import envtest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "charts" / "cumulo" / "templates"
TENANT_ROLES = TEMPLATES / "tenant-roles.yaml"
AGENT_RESTRICTION = TEMPLATES / "agent-restriction.yaml"
POLICY = "cumulo-agent-node-restriction"
AGENT_GROUP = "cumulo:agents"
SIMULATOR_GROUP = "cumulo:simulators"

_installed: set[tuple[str, str]] = set()
_lock = threading.Lock()


def agent_user(host: str) -> str:
    return f"system:cumulo-agent:{host}"


def mint_agent_kubeconfig(plane: envtest.ControlPlane, host: str, path: Path | None = None, *,
                          simulator: bool = False) -> tuple[Path, str]:
    """A restricted agent credential for ``host`` (or, with ``simulator``, for the simulated hosts
    ``<host>-N``); installs the policy first. Returns (kubeconfig, user name)."""
    install_security(plane)
    user = agent_user(host)
    groups = [AGENT_GROUP, SIMULATOR_GROUP] if simulator else [AGENT_GROUP]
    return plane.mint_kubeconfig(user, groups, path), user


def install_security(plane: envtest.ControlPlane, timeout: float = 30.0) -> None:
    key = (str(plane.workdir), plane.server)
    with _lock:
        if key in _installed:
            return
        for path in (TENANT_ROLES, AGENT_RESTRICTION):
            plane.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=cumulo-tests",
                          "-f", str(path))
        plane.aggregate_cluster_roles()
        _wait_policy_in_force(plane, timeout)
        _installed.add(key)


def _wait_policy_in_force(plane: envtest.ControlPlane, timeout: float) -> None:
    # A dry-run registration of another host's Host: RBAC allows it, only the policy refuses it.
    probe = plane.mint_kubeconfig(agent_user("policy-probe"), [AGENT_GROUP])
    body = json.dumps({"apiVersion": "cumulo.io/v1alpha1", "kind": "Host", "metadata": {"name": "not-the-probe"},
                       "spec": {"cluster": "probe"}})
    deadline = time.monotonic() + timeout
    while True:
        result = plane.kubectl("create", "--dry-run=server", "-f", "-", "-o", "name", input=body,
                               kubeconfig=probe, check=False)
        if POLICY in result.stderr:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{POLICY} not in force after {timeout:g}s: {result.stdout}{result.stderr}")
        time.sleep(0.1)
