"""The envtest control plane behaves like a real, RBAC-enforcing cluster."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from cumulo import envtest, toolchain

REPO = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def eventually(check: Callable[[], object], timeout: float = 10.0) -> object:
    """Poll ``check`` until it returns a truthy value; RBAC and token caches settle in ms."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def list_namespaces_status(api: client.ApiClient) -> int:
    try:
        client.CoreV1Api(api).list_namespace()
        return 200
    except ApiException as error:
        return error.status


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def port_open(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_apiserver_reports_the_pinned_version(kube: client.ApiClient) -> None:
    assert client.VersionApi(kube).get_code().git_version == toolchain.KUBERNETES.version


def test_rbac_is_enforced_for_minted_users(control_plane: envtest.ControlPlane,
                                           kube: client.ApiClient) -> None:
    user = unique("tenant")
    with control_plane.api_client(control_plane.mint_kubeconfig(user, ["cumulo:tenants"])) as api:
        assert list_namespaces_status(api) == 403

        client.RbacAuthorizationV1Api(kube).create_cluster_role_binding(client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=unique("view")),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="view"),
            subjects=[client.RbacV1Subject(api_group="rbac.authorization.k8s.io", kind="User", name=user)],
        ))
        assert eventually(lambda: list_namespaces_status(api) == 200)

        review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == user
        assert "cumulo:tenants" in review.status.user_info.groups


def test_service_account_token_authenticates_as_the_service_account(
        control_plane: envtest.ControlPlane) -> None:
    namespace, name = unique("sa-ns"), "agent"
    kubeconfig = control_plane.service_account_kubeconfig(namespace, name)
    with control_plane.api_client(kubeconfig) as api:
        review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:{name}"
    assert "system:serviceaccounts" in review.status.user_info.groups
    # Asking again reuses the existing namespace and ServiceAccount.
    assert control_plane.service_account_kubeconfig(namespace, name).exists()


def test_token_carries_its_bound_object(control_plane: envtest.ControlPlane, kube: client.ApiClient) -> None:
    namespace = unique("bound")
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    secret = core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="anchor")))
    kubeconfig = control_plane.service_account_kubeconfig(
        namespace, "agent", bound_object_ref={"kind": "Secret", "name": "anchor", "uid": secret.metadata.uid})
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["kubernetes.io"]["secret"] == {"name": "anchor", "uid": secret.metadata.uid}
    assert claims["sub"] == f"system:serviceaccount:{namespace}:agent"
    # (Deleting the secret revokes the token, but only once the apiserver's 10 s token cache expires.)
    assert control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                                 kubeconfig=kubeconfig).stdout == claims["sub"]


def test_kubectl_works_with_the_admin_kubeconfig(control_plane: envtest.ControlPlane) -> None:
    assert control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout \
        == envtest.ADMIN_USER
    assert "namespace/default" in control_plane.kubectl("get", "namespaces", "-o", "name").stdout
    namespace = unique("kubectl")
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: greeting}
        data: {hello: world}
        """))
    assert control_plane.kubectl("get", "configmap", "greeting", "-n", namespace,
                                 "-o", "jsonpath={.data.hello}").stdout == "world"
    with pytest.raises(envtest.KubectlError, match="NotFound"):
        control_plane.kubectl("get", "configmap", "missing", "-n", namespace)


def test_admin_kubeconfig_copy_works_anywhere(control_plane: envtest.ControlPlane, tmp_path: Path) -> None:
    copy = control_plane.write_kubeconfig(tmp_path / ".cumulo" / "kubeconfig")
    assert copy.stat().st_mode & 0o077 == 0, "credentials must not be world-readable"
    result = subprocess.run([str(toolchain.binary("kubectl")), "--kubeconfig", str(copy), "auth", "whoami"],
                            text=True, capture_output=True, check=True)
    assert envtest.ADMIN_USER in result.stdout


def test_builtin_roles_are_aggregated(control_plane: envtest.ControlPlane) -> None:
    # No controller-manager aggregates them; view/edit/admin would grant nothing otherwise.
    for role in ("view", "edit", "admin"):
        rules = json.loads(control_plane.kubectl("get", "clusterrole", role, "-o", "json").stdout)["rules"]
        assert any("configmaps" in rule.get("resources", []) for rule in rules), role


def test_audit_log_records_who_did_what(control_plane: envtest.ControlPlane) -> None:
    namespace = unique("audit")
    control_plane.kubectl("create", "namespace", namespace)
    entries = [json.loads(line) for line in control_plane.audit_log.read_text().splitlines()]
    created = [entry for entry in entries
               if entry.get("verb") == "create" and entry.get("objectRef", {}).get("name") == namespace]
    assert len(created) == 1
    assert created[0]["level"] == "Metadata"
    assert created[0]["user"]["username"] == envtest.ADMIN_USER
    assert created[0]["responseStatus"]["code"] == 201


def test_install_crds_waits_until_established(control_plane: envtest.ControlPlane, tmp_path: Path) -> None:
    assert control_plane.install_crds(tmp_path / "missing") == []
    assert control_plane.install_crds(tmp_path) == []
    (tmp_path / "widget.yaml").write_text(textwrap.dedent("""\
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata: {name: widgets.envtest.cumulo.io}
        spec:
          group: envtest.cumulo.io
          scope: Namespaced
          names: {plural: widgets, singular: widget, kind: Widget, categories: [envtest-things]}
          versions:
          - name: v1
            served: true
            storage: true
            schema:
              openAPIV3Schema:
                type: object
                x-kubernetes-preserve-unknown-fields: true
        """))
    applied = control_plane.install_crds(tmp_path)
    assert applied == ["customresourcedefinition.apiextensions.k8s.io/widgets.envtest.cumulo.io"]
    # Served right away, by kind and by category (discovery lags Established).
    assert control_plane.kubectl("get", "widgets.envtest.cumulo.io", "-A").returncode == 0
    assert control_plane.kubectl("get", "envtest-things", "-A").returncode == 0
    assert control_plane.install_crds(tmp_path) == applied  # re-applying is fine


def processes_using(workdir: Path) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(workdir).encode() in cmdline.read_bytes() and not gone(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def test_failed_start_reports_the_log_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "control-plane"
    plane = envtest.ControlPlane(workdir, apiserver_args={"no-such-flag": "1"})
    with pytest.raises(envtest.ControlPlaneError, match="unknown flag: --no-such-flag"):
        plane.start()
    assert processes_using(workdir) == []
    assert not (workdir / "state.json").exists()


def _run_envtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cumulo.envtest", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_detached_control_plane_outlives_its_starter_and_stops(tmp_path: Path) -> None:
    workdir = tmp_path / "control-plane"
    up = _run_envtest("up", str(workdir))
    assert up.returncode == 0, up.stderr
    try:
        attached = envtest.ControlPlane.attach(workdir)
        assert attached is not None, "the starter exited and took the control plane with it"
        state = json.loads((workdir / "state.json").read_text())
        pids = [state["etcd"]["pid"], state["apiserver"]["pid"]]
        assert attached.kubectl("get", "--raw", "/readyz").stdout == "ok"

        again = _run_envtest("up", str(workdir))  # idempotent: reuses the running one
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        assert json.loads((workdir / "state.json").read_text()) == state
        server = attached.server
    finally:
        if attached := envtest.ControlPlane.attach(workdir):
            attached.stop()
    assert eventually(lambda: all(gone(pid) for pid in pids))
    assert not port_open(server)
    assert envtest.ControlPlane.attach(workdir) is None
    attached.stop()  # idempotent
    assert workdir.is_dir(), "a given work directory (etcd data, certs) is kept"


def test_children_die_with_a_killed_parent_and_a_restart_resumes(tmp_path: Path) -> None:
    workdir = tmp_path / "control-plane"
    script = textwrap.dedent(f"""\
        import sys, time
        from cumulo import envtest
        plane = envtest.ControlPlane({str(workdir)!r}).start()
        plane.kubectl("create", "configmap", "survivor", "-n", "default")
        print("ready", flush=True)
        time.sleep(600)
        """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        state = json.loads((workdir / "state.json").read_text())
        pids = [state["etcd"]["pid"], state["apiserver"]["pid"]]
        assert not any(gone(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)  # no atexit, no stop(): only PR_SET_PDEATHSIG helps
        parent.wait()
        assert eventually(lambda: all(gone(pid) for pid in pids), timeout=15)
        assert envtest.ControlPlane.attach(workdir) is None

        # A start in the same work directory clears the stale state and resumes the data.
        with envtest.ControlPlane(workdir) as plane:
            survivor = plane.kubectl("get", "configmap", "survivor", "-n", "default", "-o", "name")
            assert survivor.stdout.strip() == "configmap/survivor"
    finally:
        parent.kill()
        envtest.ControlPlane(workdir).stop()  # clean up whatever is left, if the test failed
