"""A simulated cloud for the benchmarks: the envtest control plane (real etcd + kube-apiserver), the
production ``cumulo-controller`` binary and one ``cumulo-agent --simulate N`` process, set up with the same
objects an operator would apply (zone, pod, cluster, one local pool per host, image store, offering,
template), then timed by a watch.

Why a watch rather than object timestamps for create→Running: ``creationTimestamp`` and a condition's
``lastTransitionTime`` are RFC 3339 with whole seconds, so against a 1 s target each figure carries up to
±1 s of rounding. The watch records, on this machine's monotonic clock, when the create request was sent
and when the apiserver first delivered the object with ``Ready=True`` (phase Running); the watch's delivery
lag (milliseconds on loopback) counts against Cumulo. The timestamp figure is reported beside it as a
cross-check.

Identities (``identities=``): by default ``tokens``, as a cluster runs them: the controller with a ServiceAccount
token (cumulo-system/cumulo-controller, bound to cluster-admin rather than the chart's ClusterRole), each agent
process with the Pod-bound token of ServiceAccount cumulo-system/cumulo-simulator for a Pod on a Node named like
its host group, as the chart's simulator DaemonSet does. The apiserver caches a verified token for 10 s, whereas
a client certificate (``certificates``: the controller in ``system:masters``, the agents the restricted
certificate the tests use, ``cumulo:agents`` + ``cumulo:simulators``) costs an ECDSA chain verification on every
request, ~6% of the apiserver's CPU in the burst. Either way the agents' writes pass the shipped RBAC and the
node-restriction ValidatingAdmissionPolicy, as in production. The admission webhook is not registered (issue 8 adds it to the chart;
with ``failurePolicy: Ignore`` it adds one loopback HTTPS call per tenant create).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import uuid
from pathlib import Path

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import REPO
from cumulo import envtest

sys.path.insert(0, str(REPO / "tests" / "integration"))
from security import install_security, mint_agent_kubeconfig  # noqa: E402  (the shipped agent RBAC + node restriction)

GROUP, VERSION = "cumulo.io", "v1alpha1"
BIN = Path(sys.executable).parent
CONTROLLER_USER = "system:cumulo-controller"
SYSTEM_NAMESPACE = "cumulo-system"
CONTROLLER_ACCOUNT = "cumulo-controller"
SIMULATOR_ACCOUNT = "cumulo-simulator"  # the chart's ServiceAccount of the simulated hosts' DaemonSet
CONTROLLER_USERS = (CONTROLLER_USER, f"system:serviceaccount:{SYSTEM_NAMESPACE}:{CONTROLLER_ACCOUNT}")
AGENT_USERS = ("system:cumulo-agent:", f"system:serviceaccount:{SYSTEM_NAMESPACE}:{SIMULATOR_ACCOUNT}")
"""Prefixes of the agents' user names, for attributing audit entries."""
PYSPY = os.environ.get("PYSPY", "/tmp/pyspy-venv/bin/py-spy")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def percentile(values: t.Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def summary(values: t.Sequence[float]) -> str:
    return (f"p50 {percentile(values, 50):.2f} s, p95 {percentile(values, 95):.2f} s, "
            f"p99 {percentile(values, 99):.2f} s, max {max(values):.2f} s")


def parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Process:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Profiler:
    """``py-spy record`` of a running process, for the duration of a ``with`` block."""

    def __init__(self, process: Process, output: Path, rate: int = 50) -> None:
        self.command = [PYSPY, "record", "--pid", str(process.pid), "--rate", str(rate), "--output", str(output),
                        "--format", {".json": "speedscope", ".txt": "raw"}.get(output.suffix, "flamegraph"),
                        "--nonblocking"]
        self.output = output
        self.popen: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        self.popen = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def watch_counts(metrics: str) -> dict[str, int]:
    """Open WATCH requests per resource from kube-apiserver's ``/metrics`` text (``apiserver_longrunning_requests``,
    summed over scopes and API versions), resources without one left out."""
    counts: dict[str, int] = {}
    for line in metrics.splitlines():
        if not line.startswith("apiserver_longrunning_requests{") or 'verb="WATCH"' not in line:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[resource] = counts.get(resource, 0) + int(float(line.rsplit(" ", 1)[1]))
    return {resource: count for resource, count in sorted(counts.items()) if count}


def request_counts(metrics: str) -> collections.Counter[str]:
    """``apiserver_request_total`` by verb (all resources, all codes) from kube-apiserver's ``/metrics`` text."""
    counts: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(metrics):
        if family.name == "apiserver_request":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels.get("verb", "")] += int(sample.value)
    return counts


class ApiserverProfiler:
    """kube-apiserver's own CPU profile (``/debug/pprof/profile``) over ``seconds``, taken from a thread while a
    ``with`` block runs; the control plane must run with ``--profiling=true``. Summarised with the Go toolchain's
    ``go tool pprof``, the same toolchain that built the binary (cumulo/toolchain.py)."""

    def __init__(self, cloud: SimCloud, output: Path, seconds: int) -> None:
        self.cloud, self.output, self.seconds = cloud, output, seconds
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.output.write_bytes(self.cloud.apiserver_get(f"/debug/pprof/profile?seconds={self.seconds}",
                                                             timeout=self.seconds + 60))
        except Exception as error:  # reported by top(), never fatal to the benchmark
            self.error = error

    def __enter__(self) -> ApiserverProfiler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(self.seconds + 90)

    # Where kube-apiserver's CPU goes, as shares of the profile's samples whose stack holds a matching function
    # (so the shares overlap: merge patch and managedFields are both part of a status patch).
    PARTS = {
        "status patches (StatusREST.Update)": r"customresource\.\(\*StatusREST\)\.Update$",
        "JSON merge patch applied to the stored object": r"handlers\.\(\*jsonPatcher\)\.applyPatchToCurrentObject",
        "managedFields (field manager)": r"managedfields",
        "schema coercion/pruning of custom resources": r"unstructuredSchemaCoercer",
        "OpenAPI schema validation": r"validate\.\(\*SchemaValidator\)\.Validate$",
        "CRD CEL rules (x-kubernetes-validations)": r"apiserver/schema/cel\.\(\*Validator\)\.Validate$",
        "  of which on status patches": r"customresource\.statusStrategy\.ValidateUpdate.*|apiserver/schema/cel\."
                                         r"\(\*Validator\)\.Validate$",
        "ValidatingAdmissionPolicy (agent node restriction)": r"policy/validating\.\(\*Plugin\)\.Validate",
        "audit log": r"audit\.\(\*AuditContext\)\.ProcessEventStage|plugin/pkg/audit|"
                     r"evaluatePolicyAndCreateAuditEvent",
        "client-certificate verification": r"x509\.\(\*Authenticator\)\.AuthenticateRequest",
        "RBAC authorization": r"rbac\.\(\*RBACAuthorizer\)\.Authorize",
        "etcd watch decoding": r"etcd3\.\(\*watchChan\)",
        "serving watches (encode, send)": r"handlers\.\(\*WatchServer\)",
        "GC background marking": r"runtime\.gcBgMarkWorker",
        "allocation (mallocgc, incl. GC assists)": r"runtime\.mallocgc$",
    }

    def parts(self) -> dict[str, str]:
        """``PARTS`` as "share% (seconds)" of the profile."""
        if self.error is not None or not self.output.exists():
            return {}
        go = shutil.which("go") or "/usr/local/go/bin/go"
        shares = {}
        for name, pattern in self.PARTS.items():
            if name.startswith("  of which on status patches"):
                command = [go, "tool", "pprof", "-top", "-focus", self.PARTS["CRD CEL rules (x-kubernetes-validations)"],
                           "-show_from", r"customresource\.statusStrategy\.ValidateUpdate", str(self.output)]
            else:
                command = [go, "tool", "pprof", "-top", "-focus", pattern, str(self.output)]
            out = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
            match = re.search(r"Showing nodes accounting for ([\d.]+m?s), ([\d.]+)% of", out)
            shares[name] = f"{float(match.group(2)):.1f}% ({match.group(1)})" if match else "0%"
        return shares

    def top(self, count: int = 12, cumulative: bool = False) -> list[str]:
        """``go tool pprof -top`` lines: ``flat flat% sum% cum cum% function``."""
        if self.error is not None or not self.output.exists():
            return [f"no profile: {self.error}"]
        go = shutil.which("go") or "/usr/local/go/bin/go"
        command = [go, "tool", "pprof", "-top", f"-nodecount={count}", *(["-cum"] if cumulative else []),
                   str(self.output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        lines = result.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("flat")), None)
        return lines[start + 1:] if start is not None else [result.stderr.strip()]


class SimCloud:
    """Control plane + controller + one simulating agent, and the objects guests need."""

    def __init__(self, *, hosts: int, cpus_per_host: int, memory_mib: int = 262144, workdir: Path | None = None,
                 controller_args: t.Sequence[str] = (), agent_args: t.Sequence[str] = (),
                 restricted_agent: bool = True, keep: bool = False, hosts_per_agent: int | None = None,
                 apiserver_args: t.Mapping[str, str | None] | None = None, identities: str = "tokens") -> None:
        """``apiserver_args``: kube-apiserver flags over envtest's defaults (None removes one); ``identities``:
        ``tokens`` (ServiceAccount tokens, as in a cluster) or ``certificates`` (client certificates)."""
        if identities not in ("tokens", "certificates"):
            raise ValueError(f"identities must be tokens or certificates, not {identities!r}")
        self.identities = identities
        self.hosts, self.cpus_per_host, self.memory_mib = hosts, cpus_per_host, memory_mib
        self.controller_args, self.agent_args = list(controller_args), list(agent_args)
        self.restricted_agent = restricted_agent
        self.keep = keep
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cumulo-bench-"))
        self.plane = envtest.ControlPlane(self.workdir / "plane", apiserver_args=apiserver_args)
        self.controller: Process | None = None
        self.agents: list[Process] = []
        self.base = unique("sim")
        self.zone, self.pod, self.cluster = unique("zone"), unique("pod"), unique("cluster")
        self.offering = unique("small")
        self.namespace = unique("bench")
        # One `cumulo-agent --simulate N` process per group of hosts: <base>a<k>-<i>.
        per_agent = hosts_per_agent or hosts
        self.groups = [(f"{self.base}a{k}", min(per_agent, hosts - start)) for k, start in
                       enumerate(range(0, hosts, per_agent))]
        self.host_names = [f"{group}-{i}" for group, count in self.groups for i in range(count)]

    @property
    def agent(self) -> Process | None:
        return self.agents[0] if self.agents else None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> SimCloud:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.plane.start()
        self.plane.install_crds(REPO / "crds")
        self.api = self.plane.api_client()
        self.custom = client.CustomObjectsApi(self.api)
        with contextlib.suppress(ApiException):
            client.CoreV1Api(self.api).create_namespace(client.V1Namespace(
                metadata=client.V1ObjectMeta(name="cumulo-system")))
        self.start_controller()
        self._infrastructure()
        self.start_agent()
        # Each look lists every Host: at 1,000 hosts (~4 MB of JSON) five looks a second would load the apiserver
        # that is registering them.
        self.wait(lambda: self.hosts_up() == self.hosts, timeout=120 + self.hosts * 0.3, what="hosts Up",
                  interval=0.2 if self.hosts <= 100 else 2.0)
        self._template()

    def start_controller(self) -> None:
        # An identity of its own, so the audit log tells its writes from the benchmark's (which run as admin).
        if self.identities == "tokens":
            kubeconfig = self._controller_token()
        else:
            kubeconfig = self.plane.mint_kubeconfig(CONTROLLER_USER, ["system:masters"],
                                                    self.workdir / "controller.kubeconfig")
        self.controller = Process("cumulo-controller", [
            str(BIN / "cumulo-controller"), "--kubeconfig", str(kubeconfig), "--metrics-port", "0",
            *self.controller_args], self.workdir / "controller.log")
        self.wait(lambda: "reconciling with" in self.controller.log(), timeout=60, what="the controller started",
                  process=self.controller)

    def start_agent(self) -> None:
        for group, count in self.groups:
            if self.restricted_agent and self.identities == "tokens":
                kubeconfig = self._simulator_token(group)
            elif self.restricted_agent:
                kubeconfig, _ = mint_agent_kubeconfig(self.plane, group, self.workdir / f"{group}.kubeconfig",
                                                      simulator=True)
            else:
                kubeconfig = self.plane.admin_kubeconfig
            self.agents.append(Process(f"cumulo-agent {group}", [
                str(BIN / "cumulo-agent"), "--kubeconfig", str(kubeconfig), "--host", group, "--hypervisor",
                "simulator", "--simulate", str(count), "--register-cluster", self.cluster, "--sim-cpus",
                str(self.cpus_per_host), "--sim-memory-mib", str(self.memory_mib), "--metrics-port", "0",
                "--state-dir", str(self.workdir / f"{group}-state"), "--log-level", "warning", *self.agent_args],
                self.workdir / f"{group}.log"))

    def _controller_token(self) -> Path:
        """A ServiceAccount token of cumulo-system/cumulo-controller, which may do anything (cluster-admin)."""
        rbac = client.RbacAuthorizationV1Api(self.api)
        with contextlib.suppress(ApiException):  # exists already: a kept control plane
            rbac.create_cluster_role_binding({
                "metadata": {"name": f"{CONTROLLER_ACCOUNT}-benchmark"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_ACCOUNT, "namespace": SYSTEM_NAMESPACE}]})
        return self.plane.service_account_kubeconfig(SYSTEM_NAMESPACE, CONTROLLER_ACCOUNT,
                                                     self.workdir / "controller.kubeconfig", create_namespace=False)

    def _simulator_token(self, node: str) -> Path:
        """The Pod-bound token of a simulator DaemonSet Pod on Node ``node``: the node-restriction policy lets it
        act for the hosts ``<node>-N`` (charts/cumulo/templates/agent-restriction.yaml)."""
        install_security(self.plane)
        core = client.CoreV1Api(self.api)
        core.create_node({"metadata": {"name": node}})
        with contextlib.suppress(ApiException):  # one ServiceAccount for all agent processes
            core.create_namespaced_service_account(SYSTEM_NAMESPACE, {"metadata": {"name": SIMULATOR_ACCOUNT}})
        pod = core.create_namespaced_pod(SYSTEM_NAMESPACE, {"metadata": {"name": f"{SIMULATOR_ACCOUNT}-{node}"}, "spec": {
            "nodeName": node, "serviceAccountName": SIMULATOR_ACCOUNT,
            "containers": [{"name": "agent", "image": "cumulo-agent"}]}})
        return self.plane.service_account_kubeconfig(
            SYSTEM_NAMESPACE, SIMULATOR_ACCOUNT, self.workdir / f"{node}.kubeconfig", create_namespace=False,
            bound_object_ref={"kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid})

    def stop(self) -> None:
        for process in (*self.agents, self.controller):
            if process is not None:
                process.stop()
        with contextlib.suppress(Exception):
            self.api.close()
        self.plane.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- objects ---------------------------------------------------------------------------------

    def create_cluster_object(self, plural: str, kind: str, name: str, spec: dict) -> None:
        self.custom.create_cluster_custom_object(GROUP, VERSION, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})

    def create_object(self, plural: str, kind: str, name: str, spec: dict, namespace: str | None = None) -> None:
        namespace = namespace or self.namespace
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec})

    def _infrastructure(self) -> None:
        self.create_cluster_object("zones", "Zone", self.zone, {"networkType": "Advanced", "dns1": "192.0.2.53"})
        self.create_cluster_object("hostpods", "HostPod", self.pod, {
            "zone": self.zone, "cidr": "10.254.0.0/16", "gateway": "10.254.0.1", "startIp": "10.254.0.10",
            "endIp": "10.254.255.250"})
        self.create_cluster_object("clusters", "Cluster", self.cluster,
                                   {"pod": self.pod, "hypervisorType": "Simulator"})

        def pool(host: str) -> None:
            self.create_cluster_object("storagepools", "StoragePool", f"{host}-local", {
                "zone": self.zone, "scope": "Host", "type": "Filesystem", "host": host, "path": f"/sim/{host}"})

        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            list(threads.map(pool, self.host_names))
        self.create_cluster_object("imagestores", "ImageStore", unique("store"), {"zone": self.zone,
                                                                                  "path": "/sim/images"})
        self.create_cluster_object("serviceofferings", "ServiceOffering", self.offering,
                                   {"cpuNumber": 1, "memoryMiB": 256, "storageType": "local"})
        client.CoreV1Api(self.api).create_namespace(client.V1Namespace(
            metadata=client.V1ObjectMeta(name=self.namespace)))

    def _template(self) -> None:
        self.create_object("templates", "Template", "img", {"url": "file:///sim/images/img.qcow2", "zone": self.zone,
                                                            "hypervisor": "Simulator"})
        self.wait(lambda: (self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "templates", "img")
                           .get("status") or {}).get("state") == "Ready", timeout=60, what="the template Ready")

    def vm_spec(self) -> dict:
        return {"serviceOffering": self.offering, "template": {"name": "img"}, "zone": self.zone}

    def hosts_up(self) -> int:
        try:
            items = self.custom.list_cluster_custom_object(GROUP, VERSION, "hosts")["items"]
        except ApiException as error:
            if error.status in (429, 500, 503, 504):  # an apiserver busy registering 1,000 hosts: look again
                return -1
            raise
        names = set(self.host_names)
        return sum(1 for item in items if item["metadata"]["name"] in names
                   and (item.get("status") or {}).get("state") == "Up")

    def wait(self, check: t.Callable[[], t.Any], timeout: float, what: str, interval: float = 0.2,
             process: Process | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in (process, self.controller, *self.agents):
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    def pids(self) -> dict[str, int]:
        state = self.plane._require_state()
        agents = {"agent" if len(self.agents) == 1 else f"agent {k}": agent.pid for k, agent in enumerate(self.agents)}
        return {"controller": self.controller.pid, **agents, "kube-apiserver": state["apiserver"]["pid"],
                "etcd": state["etcd"]["pid"]}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    # -- the apiserver's own metrics -------------------------------------------------------------

    def apiserver_get(self, path: str, timeout: float = 30) -> bytes:
        """GET ``path`` from kube-apiserver as admin (metrics, pprof)."""
        port = self.plane._require_state()["apiserver"]["port"]
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                 context=self.plane._client_ssl_context())
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
            return body
        finally:
            connection.close()

    def apiserver_metrics(self) -> str:
        return self.apiserver_get("/metrics").decode()

    def watchers(self) -> dict[str, int]:
        return watch_counts(self.apiserver_metrics())


class RunningWatch:
    """Watches the VirtualMachines of a namespace from a thread; records when each is first Running."""

    def __init__(self, cloud: SimCloud, namespace: str | None = None) -> None:
        self.cloud = cloud
        self.namespace = namespace or cloud.namespace
        self.running: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RunningWatch:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        api = self.cloud.plane.api_client()
        custom = client.CustomObjectsApi(api)
        version = custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                       "virtualmachines")["metadata"]["resourceVersion"]
        self._ready.set()
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                           "virtualmachines", resource_version=version, timeout_seconds=60,
                                           allow_watch_bookmarks=False):
                    now = time.monotonic()
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    self.seen.setdefault(name, now)
                    if (obj.get("status") or {}).get("phase") == "Running":
                        self.running.setdefault(name, now)
                    if self._stop.is_set():
                        break
            except Exception:  # a broken stream resumes from the last version
                time.sleep(0.1)

    def wait_all(self, names: t.Collection[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(name in self.running for name in names):
            if time.monotonic() > deadline:
                missing = [name for name in names if name not in self.running]
                raise TimeoutError(f"{len(missing)} of {len(names)} guests not Running after {timeout:.0f}s "
                                   f"(e.g. {missing[:3]})")
            for process in (self.cloud.controller, *self.cloud.agents):
                if process is not None and not process.alive():
                    raise RuntimeError(f"{process.name} exited:\n{process.log()[-3000:]}")
            time.sleep(0.05)


def timestamp_latencies(cloud: SimCloud, names: t.Collection[str], namespace: str | None = None) -> list[float]:
    """Ready's lastTransitionTime − creationTimestamp of each guest (whole seconds on both sides)."""
    wanted = set(names)
    items = cloud.custom.list_namespaced_custom_object(GROUP, VERSION, namespace or cloud.namespace,
                                                       "virtualmachines")["items"]
    latencies = []
    for item in items:
        if item["metadata"]["name"] not in wanted:
            continue
        ready = next((c for c in (item.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)
        if ready and ready["status"] == "True":
            created = parse_time(item["metadata"]["creationTimestamp"])
            latencies.append(parse_time(ready["lastTransitionTime"]) - created)
    return latencies


def create_guests(cloud: SimCloud, names: t.Sequence[str], *, spacing: float = 0.0, threads: int = 16,
                  namespace: str | None = None) -> dict[str, float]:
    """Create the guests: all at once (``threads`` concurrent requests) or one every ``spacing`` seconds;
    returns when each create request was sent (monotonic)."""
    sent: dict[str, float] = {}
    namespace = namespace or cloud.namespace

    def create(name: str) -> None:
        sent[name] = time.monotonic()
        cloud.create_object("virtualmachines", "VirtualMachine", name, cloud.vm_spec(), namespace=namespace)

    if spacing <= 0:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(create, names))
    else:
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = []
            for index, name in enumerate(names):
                delay = start + index * spacing - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(create, name))
            for future in futures:
                future.result()
    return sent


def median_spread(values: t.Sequence[float]) -> str:
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def dump(path: Path, data: t.Any) -> None:
    path.write_text(json.dumps(data, indent=1))
