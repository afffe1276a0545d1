"""A control plane of a test module's own, with no controller.

Agent tests that write the controller's fields themselves (``status.launch`` of a VirtualMachine) cannot share
the session's control plane: once any test has started the session's ``controller``, it reconciles every
VirtualMachine and would take those fields back. A module opts out with::

    control_plane, kube, system_namespace = private_plane_fixtures()
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE
from cumulo import envtest

REPO = Path(__file__).resolve().parents[2]


def private_plane_fixtures():
    @pytest.fixture(scope="module")
    def control_plane(toolchain_binaries: None) -> Iterator[envtest.ControlPlane]:
        with envtest.ControlPlane() as plane:
            plane.install_crds(REPO / "crds")
            plane.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
            yield plane

    @pytest.fixture(scope="module")
    def kube(control_plane: envtest.ControlPlane) -> Iterator[ApiClient]:
        with control_plane.api_client() as api:
            yield api

    @pytest.fixture(scope="module")
    def system_namespace(control_plane: envtest.ControlPlane) -> str:
        return SYSTEM_NAMESPACE

    return control_plane, kube, system_namespace
