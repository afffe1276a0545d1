"""Integration tier: a real kube-apiserver + etcd (cumulo.envtest) shared by the whole session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from cumulo import envtest, toolchain

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
        pytest.skip(f"integration tier skipped: {', '.join(missing)} not built and Go is not installed "
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
