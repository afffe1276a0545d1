"""The Helm chart against helm and the test launcher's real apiserver.

- `helm lint`, and values.schema.json through helm's own validator: bad values are refused, naming the key.
- `helm template` with the default values and with others (2 replicas, ServiceMonitor on, cert-manager on and off,
  the simulator agent, Open vSwitch, no webhook), each rendering applied with `kubectl apply --dry-run=server`, so
  kube-apiserver validates every Deployment, DaemonSet, RBAC object, PDB, Service, Secret, admission policy and
  webhook configuration (its namespaces are created first). Kinds whose API this apiserver does not serve
  (cert-manager's Certificate/Issuer, prometheus-operator's ServiceMonitor) are listed and checked for shape here
  only; the test says which.
- The RBAC is least privilege and enough: cumulo-controller runs under its ServiceAccount with exactly the chart's
  grants (leader election included) and reconciles, and the audit log shows no refused request of it.

A control plane of this module's own: the chart's objects (namespaces, cluster roles, the admission policy) and a
controller under a ServiceAccount stay out of the session's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import yaml

from cumulo import toolchain

from cumuloprocess import CumuloProcess as Process
from privateplane import private_plane_fixtures

control_plane, kube, system_namespace = private_plane_fixtures()

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cumulo"
HELM = toolchain.binary("helm")
NAMESPACE = "cumulo-system"

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"helm is not built ({HELM}): run `make toolchain` or "
                                "`.venv/bin/cumulo toolchain` (builds it from the Go module proxy, ~3 min cold)")

# Kinds the test apiserver has no API for (no cert-manager, no prometheus-operator installed).
UNSERVED = {"cert-manager.io/v1": {"Certificate", "Issuer"}, "monitoring.coreos.com/v1": {"ServiceMonitor"}}

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "two-replicas-servicemonitor-cert-manager": [
        "--set", "controller.replicas=3", "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "webhook.certificate.source=cert-manager", "--set", "controller.podDisruptionBudget.minAvailable=2"],
    "cert-manager-present-auto": ["--api-versions", "cert-manager.io/v1",
                                  "--set", "webhook.certificate.issuerRef.name=corp-ca",
                                  "--set", "webhook.certificate.issuerRef.kind=ClusterIssuer"],
    "helm-certificate-forced": ["--api-versions", "cert-manager.io/v1", "--set", "webhook.certificate.source=helm"],
    "simulator-agent": ["--set", "agent.hypervisor=simulator", "--set", "agent.simulatedHosts=3",
                        "--set", "controller.replicas=1", "--set", "controller.podDisruptionBudget.enabled=false",
                        "--set-json", 'agent.nodeSelector={}'],
    "openvswitch-no-webhook-no-metrics": [
        "--set", "agent.networkDriver=openvswitch", "--set", "webhook.enabled=false",
        "--set", "controller.metricsPort=0", "--set", "agent.metricsPort=0",
        "--set-json", 'agent.tolerations=[{"operator":"Exists"}]', "--set", "agent.registerCluster=cluster1"],
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120,
                            env={"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "HELM_CACHE_HOME": "/tmp/helm-cache",
                                 "HELM_CONFIG_HOME": "/tmp/helm-config", "HELM_DATA_HOME": "/tmp/helm-data"})
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def render(*args: str) -> list[dict]:
    out = helm("template", "cumulo", str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint():
    result = helm("lint", str(CHART), "--namespace", NAMESPACE, "--strict")
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("args, key", [
    (["--set", "controller.replicas=0"], "replicas"),
    (["--set", "controller.replica=2"], "replica"),
    (["--set", "agent.hypervisor=xen"], "hypervisor"),
    (["--set", "agent.hostPaths.state=var/lib/cumulo"], "state"),
    (["--set", "webhook.certificate.source=vault"], "source"),
    (["--set", "metrics.serviceMonitor.interval=often"], "interval"),
])
def test_values_schema_refuses_bad_values(args, key, tmp_path):
    result = helm("template", "cumulo", str(CHART), "--namespace", NAMESPACE, *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and key in result.stderr, \
        result.stderr


def test_a_bad_values_file_is_refused(tmp_path):
    values = tmp_path / "bad.yaml"
    values.write_text("controller:\n  replicas: two\nagent:\n  nodeSelector: [hypervisor]\n")
    result = helm("lint", str(CHART), "--namespace", NAMESPACE, "-f", str(values), check=False)
    assert result.returncode != 0 and "replicas" in result.stdout + result.stderr


def test_the_wrong_namespace_and_a_pdb_that_blocks_every_drain_are_refused():
    wrong = helm("template", "cumulo", str(CHART), "--namespace", "default", check=False)
    assert wrong.returncode != 0 and "install Cumulo into the namespace cumulo-system" in wrong.stderr
    stuck = helm("template", "cumulo", str(CHART), "--namespace", NAMESPACE, "--set", "controller.replicas=1",
                 check=False)
    assert stuck.returncode != 0 and "minAvailable" in stuck.stderr


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_default_rendering():
    docs = by_kind(render())
    deployment = docs["Deployment"][0]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-elect" in container["args"]
    assert {"POD_NAME", "POD_NAMESPACE"} <= {env["name"] for env in container["env"]}
    daemonset = docs["DaemonSet"][0]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"] and pod["serviceAccountName"] == "cumulo-agent"
    agent = pod["containers"][0]
    assert agent["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/run/netns"]["mountPropagation"] == "Bidirectional" and mounts["/lib/modules"]["readOnly"]
    assert {"/var/run/libvirt", "/var/lib/cumulo", "/dev"} <= set(mounts)
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    assert pod["nodeSelector"] == {"cumulo.io/hypervisor": "true"}
    assert docs["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    secret = docs["Secret"][0]
    assert secret["metadata"]["name"] == "cumulo-webhook-tls" and {"ca.crt", "tls.crt", "tls.key"} <= set(secret["data"])
    assert "ServiceMonitor" not in docs and "Certificate" not in docs
    # The chart ships the other engineers' plain manifests as they are.
    names = {(d["kind"], d["metadata"]["name"]) for d in render()}
    assert ("ValidatingAdmissionPolicy", "cumulo-agent-node-restriction") in names
    assert ("ClusterRole", "cumulo-tenant-admin") in names


def test_simulator_agent_needs_no_host_access():
    pod = by_kind(render(*VARIANTS["simulator-agent"]))["DaemonSet"][0]["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert agent["securityContext"]["runAsNonRoot"] and "privileged" not in agent["securityContext"]
    assert "--hypervisor=simulator" in agent["args"] and "--simulate=3" in agent["args"]
    assert pod["serviceAccountName"] == "cumulo-simulator"  # the node restriction lets it act for <node>-N
    assert all(volume.get("hostPath") is None for volume in pod["volumes"])


def test_cert_manager_replaces_the_generated_certificate():
    docs = by_kind(render(*VARIANTS["cert-manager-present-auto"]))
    assert "Secret" not in docs and "Issuer" not in docs
    certificate = docs["Certificate"][0]
    assert certificate["spec"]["secretName"] == "cumulo-webhook-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "cumulo-webhook.cumulo-system.svc" in certificate["spec"]["dnsNames"]
    forced = by_kind(render(*VARIANTS["two-replicas-servicemonitor-cert-manager"]))
    assert forced["Issuer"][0]["spec"] == {"selfSigned": {}}
    assert forced["ServiceMonitor"][0]["spec"]["endpoints"][0]["port"] == "metrics"


def test_generated_certificate_serves_the_webhook_service():
    from cryptography import x509

    import base64

    secret = by_kind(render())["Secret"][0]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert "cumulo-webhook.cumulo-system.svc" in names
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_passes_server_side_dry_run(control_plane, variant):
    docs = render("--include-crds", "--kube-version", toolchain.KUBERNETES.version, *VARIANTS[variant])
    unserved = [d for d in docs if d["kind"] in UNSERVED.get(d["apiVersion"], ())]
    served = [d for d in docs if d not in unserved]
    # Namespaces first (a dry run creates nothing), then every object through admission and validation.
    for namespace in [NAMESPACE] + [d["metadata"]["name"] for d in served if d["kind"] == "Namespace"]:
        control_plane.kubectl("create", "namespace", namespace, check=False)
    result = control_plane.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts",
                                   "--field-manager", "helm-test", "-f", "-", input=yaml.safe_dump_all(served),
                                   check=False)
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(served), result.stdout
    for doc in unserved:  # no API for these here: their shape is all this test can check
        assert doc["metadata"]["namespace"] == NAMESPACE and doc["spec"]
    kinds = {d["kind"] for d in served}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Role", "CustomResourceDefinition",
            "ValidatingAdmissionPolicy"} <= kinds


# -- least privilege, for real ------------------------------------------------------------------------------------


def wait_for(what: str, probe: t.Callable[[], t.Any], timeout: float) -> t.Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return value


def refusals(plane, username: str) -> list[str]:
    out = []
    for line in plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("user", {}).get("username") == username and event.get("stage") == "ResponseComplete" \
                and event.get("responseStatus", {}).get("code") == 403:
            out.append(f"{event['verb']} {event['requestURI']}")
    return out


def test_the_controller_runs_with_exactly_the_charts_rbac(control_plane, tmp_path):
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Namespace"}
    docs = [d for d in render() if d["kind"] in rbac_kinds]
    control_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    kubeconfig = control_plane.service_account_kubeconfig(NAMESPACE, "cumulo-controller", tmp_path / "controller",
                                                          create_namespace=False)
    user = "system:serviceaccount:cumulo-system:cumulo-controller"
    process = Process("controller-sa", [
        str(Path(sys.executable).with_name("cumulo-controller")), "--kubeconfig", str(kubeconfig), "--leader-elect",
        "--lease-duration", "6", "--renew-deadline", "4", "--retry-period", "1", "--metrics-port", "0",
    ], tmp_path / "controller.log")
    try:
        process.wait_for_log("leading: primed", timeout=60)
        zone, pod = "rbac-zone", "rbac-pod"
        control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all([
            {"apiVersion": "cumulo.io/v1alpha1", "kind": "Zone", "metadata": {"name": zone},
             "spec": {"networkType": "Advanced", "dns1": "192.0.2.53"}},
            {"apiVersion": "cumulo.io/v1alpha1", "kind": "HostPod", "metadata": {"name": pod},
             "spec": {"zone": zone, "cidr": "10.250.0.0/24", "gateway": "10.250.0.1", "startIp": "10.250.0.10",
                      "endIp": "10.250.0.20"}},
        ]))

        def ready(kind: str, name: str) -> bool:
            obj = json.loads(control_plane.kubectl("get", kind, name, "-o", "json").stdout)
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in (obj.get("status") or {}).get("conditions", []))

        wait_for("the zone and pod Ready", lambda: ready("zone", zone) and ready("hostpod", pod), 30)
        # Finalizers were written, and deleting a zone in use is blocked: patch, list by field, events.
        control_plane.kubectl("delete", "zone", zone, "--wait=false")
        wait_for("DeletionBlocked", lambda: "DeletionBlocked" in control_plane.kubectl(
            "get", "zone", zone, "-o", "json").stdout, 30)
        events = control_plane.kubectl("get", "events", "-A", "-o", "json").stdout
        assert "cumulo.io/cumulo-controller" in events
        lease = json.loads(control_plane.kubectl("get", "lease", "cumulo-controller", "-n", NAMESPACE,
                                                 "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"]
        assert refusals(control_plane, user) == [], "\n".join(refusals(control_plane, user))
    finally:
        process.stop()


# -- GitOps: examples/gitops ---------------------------------------------------------------------------------------

GITOPS = REPO / "examples" / "gitops"


def test_the_gitops_base_is_the_rendered_chart():
    committed = (GITOPS / "base" / "cumulo.yaml").read_text()
    fresh = helm("template", "cumulo", str(CHART), "--namespace", NAMESPACE, "--include-crds",
                 "--set", "webhook.certificate.source=cert-manager").stdout
    assert committed.split("\n", 1)[1] == fresh, "examples/gitops/base/cumulo.yaml is stale: run examples/gitops/render.sh"
    assert "kind: Secret" not in committed  # no private key in git: cert-manager issues the webhook's certificate


def test_the_gitops_overlay_builds_and_the_apiserver_accepts_it(control_plane):
    built = subprocess.run([str(toolchain.binary("kubectl")), "kustomize", str(GITOPS / "overlays" / "production")],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/cloud/cumulo:0.1.0"
    agent = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"node-role.example.com/hypervisor": ""}
    served = [d for d in docs if d["kind"] not in UNSERVED.get(d["apiVersion"], ())]
    for doc in served:
        if doc["kind"] == "Namespace":
            control_plane.kubectl("create", "namespace", doc["metadata"]["name"], check=False)
    result = control_plane.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts",
                                   "--field-manager", "gitops-test", "-f", "-", input=yaml.safe_dump_all(served),
                                   check=False)
    assert result.returncode == 0, result.stderr
