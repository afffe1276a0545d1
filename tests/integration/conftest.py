"""Integration tier: a real kube-apiserver + etcd (cumulo.envtest) shared by the whole session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from cumulo import envtest, toolchain
from cumuloprocess import CumuloProcess as Process
from cumuloprocess import free_port

REPO = Path(__file__).resolve().parents[2]
INTEGRATION_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def toolchain_binaries() -> None:
    """Build etcd, kube-apiserver and kubectl if needed; skip the tier only when Go is missing."""
    missing = [name for name in ("etcd", "kube-apiserver", "kubectl") if not toolchain.binary(name).exists()]
    if not missing:
        return
    if shutil.which("go") is None:
        pytest.skip(reason=f"integration tier skipped: {', '.join(missing)} not built and Go is not installed "
                    "to build them (see cumulo/toolchain.py)")
    toolchain.ensure_all()  # a build error fails the session loudly


@pytest.fixture(scope="session")
def control_plane(toolchain_binaries: None) -> Iterator[envtest.ControlPlane]:
    with envtest.ControlPlane() as plane:
        plane.install_crds(REPO / "crds")
        yield plane


@pytest.fixture(scope="session")
def kube(control_plane: envtest.ControlPlane) -> Iterator[ApiClient]:
    """An admin kubernetes.client.ApiClient."""
    with control_plane.api_client() as api:
        yield api


def ensure_namespace(plane: envtest.ControlPlane, name: str) -> None:
    plane.kubectl("create", "namespace", name, check=False)


@pytest.fixture(scope="session")
def controller(control_plane: envtest.ControlPlane) -> Iterator[Process]:
    """cumulo-controller running against the session's control plane (hosts go to Alert 5 s after they
    stop heartbeating, so tests see the whole sequence quickly)."""
    import sys

    ensure_namespace(control_plane, "cumulo-system")
    # The admission webhook is on for the whole session: the apiserver reaches it by URL, with the CA the
    # controller generates in its cert directory.
    port, metrics_port = free_port(), free_port()
    process = Process("cumulo-controller", [
        str(Path(sys.executable).with_name("cumulo-controller")), "--kubeconfig", str(control_plane.admin_kubeconfig),
        "--host-alert-after", "5", "--log-level", "DEBUG",
        "--webhook-port", str(port), "--webhook-addr", "127.0.0.1", "--webhook-host", "127.0.0.1",
        "--webhook-cert-dir", str(control_plane.workdir / "webhook"),
        "--webhook-url-base", f"https://127.0.0.1:{port}",
        "--metrics-port", str(metrics_port), "--metrics-address", "127.0.0.1",
    ], control_plane.workdir / "cumulo-controller.log")
    process.metrics_port = metrics_port  # scrape http://127.0.0.1:<metrics_port>/metrics
    try:
        # Generous: on a loaded machine the apiserver answers the start-up LISTs with 429s (each retried after 1 s).
        process.wait_for_log("reconciling with", timeout=120)
        yield process
    finally:
        process.stop()
