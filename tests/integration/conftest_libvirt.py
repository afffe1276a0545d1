"""Fixtures of the host-agent integration tests (a pytest plugin: ``pytest_plugins = ["conftest_libvirt"]``).

* ``guest``: the tiny TCG test guest (cumulo.guestimage), skipped when QEMU is not installed.
* ``libvirtd``: a private libvirtd (cumulo.libvirtd), skipped with the precise reason where it
  cannot run.
* ``system_namespace``: the cumulo-system namespace the heartbeat Leases live in.
* ``agents``: starts ``cumulo-agent`` processes, each with the restricted client-certificate identity of
  its host (``system:cumulo-agent:<host>``, group ``cumulo:agents``, under the shipped RBAC and node-
  restriction policy; see security.py), stops them at the end and attaches their logs to a failing
  test's report.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cumulo import envtest, guestimage
from cumulo.libvirtd import LibvirtUnavailable, PrivateLibvirtd, unavailable_reason
from security import mint_agent_kubeconfig
from controllers.api.crd import registry
from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / ".venv" / "bin" / "cumulo-agent"
GROUP, VERSION = "cumulo.io", "v1alpha1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except ApiException as error:
            last = error
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def _pdeathsig() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class AgentProcess:
    """One cumulo-agent subprocess."""

    def __init__(self, name: str, args: list[str], log_path: Path, user: str) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(AGENT), *self.args], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crash or an OOM kill."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records


class Agents:
    """Factory of agent processes for one test."""

    def __init__(self, plane: envtest.ControlPlane, directory: Path) -> None:
        self.plane = plane
        self.directory = directory
        self.started: list[AgentProcess] = []

    def kubeconfig(self, host: str, *, simulate: bool = False) -> tuple[Path, str]:
        """The restricted identity of the agent of ``host`` (security.py: the shipped RBAC and node-restriction
        policy, installed in the control plane on first use); ``simulate``: of the ``--simulate N`` agent
        whose hosts are ``<host>-N``."""
        return mint_agent_kubeconfig(self.plane, host, self.directory / f"{host}.kubeconfig", simulator=simulate)

    def start(self, name: str, *args: str, kubeconfig: Path | None = None, user: str | None = None) -> AgentProcess:
        if kubeconfig is None:
            # The identity of the host(s) the command line names, whatever the process is called.
            host = args[args.index("--host") + 1] if "--host" in args else name
            kubeconfig, user = self.kubeconfig(host, simulate="--simulate" in args)
        if "--metrics-port" not in args:  # many agents run at once: no metrics server unless a test asks
            args = (*args, "--metrics-port", "0")
        agent = AgentProcess(name, ["--kubeconfig", str(kubeconfig), *args], self.directory / f"{name}.log",
                             user or "unknown")
        self.started.append(agent.start())
        return agent


@pytest.fixture
def agents(control_plane: envtest.ControlPlane, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Agents]:
    factory = Agents(control_plane, tmp_path)
    yield factory
    for agent in factory.started:
        code = agent.stop()
        request.node.add_report_section("teardown", f"agent {agent.name} log (exit {code})",
                                        "\n".join(agent.log().splitlines()[-60:]))


@pytest.fixture(scope="session")
def system_namespace(kube: client.ApiClient) -> str:
    try:
        client.CoreV1Api(kube).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM_NAMESPACE)))
    except ApiException as error:
        if error.status != 409:
            raise
    return SYSTEM_NAMESPACE


@pytest.fixture(scope="session")
def guest() -> guestimage.TinyGuest:
    """The tiny TCG test guest (kernel, busybox root disk), built once and cached."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"{tool} is not installed (Debian package {package}; run hack/install-system-deps)")
    return guestimage.ensure_tiny_guest(log=lambda message: print(f"[tiny guest] {message}"))


@pytest.fixture
def libvirtd() -> Iterator[PrivateLibvirtd]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private libvirtd: {reason}")
    daemon = PrivateLibvirtd()
    try:
        daemon.start()
    except LibvirtUnavailable as error:
        pytest.skip(reason=f"private libvirtd did not start: {error}")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def libvirtd_factory() -> Iterator[Callable[..., PrivateLibvirtd]]:
    """Private libvirtds started on demand, e.g. ``libvirtd_factory(netns=host.netns)`` inside a lab host's
    network namespace (cumulo.netlab); all stopped at the end."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private libvirtd: {reason}")
    started: list[PrivateLibvirtd] = []

    def start(netns: str | None = None, listen: str | None = None) -> PrivateLibvirtd:
        daemon = PrivateLibvirtd(netns=netns, listen=listen)
        try:
            daemon.start()
        except LibvirtUnavailable as error:
            pytest.skip(reason=f"private libvirtd did not start: {error}")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


# -- API helpers -----------------------------------------------------------------------------


class Cloud:
    """Typed-enough access to the objects the agent tests create and read."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)

    def create(self, plural: str, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": _KINDS[plural], "metadata": {"name": name, **metadata},
                "spec": spec}
        return self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)

    def list(self, plural: str) -> list[dict[str, Any]]:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]

    def delete(self, plural: str, name: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def patch(self, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, body)

    def patch_status(self, plural: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_cluster_custom_object_status(GROUP, VERSION, plural, name, {"status": status})

    def node(self, host: str) -> dict[str, Any] | None:
        try:
            return (self.get("hosts", host).get("status") or {}).get("node")
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def lease(self, host: str) -> client.V1Lease | None:
        try:
            return self.coordination.read_namespaced_lease(f"host-{host}", SYSTEM_NAMESPACE)
        except ApiException as error:
            if error.status == 404:
                return None
            raise


_KINDS = {crd.plural_name: crd.kind for crd in registry()}


@pytest.fixture
def cloud(kube: client.ApiClient) -> Cloud:
    return Cloud(kube)


def audit_writes(plane: envtest.ControlPlane, user: str, since: float, until: float | None = None) -> dict[str, int]:
    """Write requests (create/update/patch/delete) of ``user`` between two wall-clock times, by
    ``resource[/subresource]``, from the apiserver's audit log."""
    import datetime

    counts: dict[str, int] = {}
    for line in plane.audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("user", {}).get("username") != user or entry.get("verb") not in (
                "create", "update", "patch", "delete"):
            continue
        received = datetime.datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
        stamp = received.timestamp()
        if stamp < since or (until is not None and stamp > until):
            continue
        ref = entry.get("objectRef", {})
        key = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts
