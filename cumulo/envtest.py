"""A real kube-apiserver and etcd run as local processes on loopback ("envtest" style).

Used by the integration tests, by ``make up`` and by the benchmarks. The binaries come from
:mod:`cumulo.toolchain`. Everything a control plane needs (certificates, etcd data, logs, audit
log, kubeconfigs, ``state.json``) lives in one work directory.

What is deliberately missing: no kube-controller-manager and no kube-scheduler run, because
Cumulo needs no pods. Consequences callers must know about:

* Deleting a namespace never finishes: the namespace controller that empties it and removes the
  ``kubernetes`` finalizer does not run, so it stays ``Terminating`` (and, through the
  NamespaceLifecycle admission plugin, refuses new objects). Tests use unique namespaces and do
  not wait for namespace deletion.
* There is no garbage collector: ownerReferences do not cascade, and a ``foreground`` deletion
  never completes. Background/orphan deletion of the object itself works.
* No ServiceAccount ``default`` is created in new namespaces, so a Pod without an explicit,
  existing ``serviceAccountName`` is refused by the ServiceAccount admission plugin. Bound
  tokens (TokenRequest) need no controller and work.
* No ClusterRole aggregation controller: :meth:`ControlPlane.aggregate_cluster_roles` fills in
  ``admin``/``edit``/``view`` at start and after :meth:`ControlPlane.install_crds`, once; call it
  again after applying ClusterRoles with ``aggregate-to-*`` labels.

Children are started in their own session (so a terminal's Ctrl-C does not hit them half-way)
and, unless detached, with ``PR_SET_PDEATHSIG`` so they die with the Python process even when it
is SIGKILLed. Linux delivers that signal when the *thread* that forked them exits, so start a
non-detached control plane from a long-lived thread (normally the main thread).

Detached mode (``start(detach=True)``) is for ``make up``: the processes outlive Python, their
PIDs, ports and paths are kept in ``<workdir>/state.json``, :meth:`ControlPlane.attach` finds
them again and :meth:`ControlPlane.stop` ends them.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cumulo import processes, toolchain

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "cumulo-admin"
STATE_FILE = "state.json"
POLL_INTERVAL = processes.POLL_INTERVAL  # seconds between readiness polls
# The discovery document kubectl reads (resources, short names and categories of all groups).
_AGGREGATED_DISCOVERY = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"

# Audit log: Metadata for every request (who did what to which object, the apicalls.log of
# CloudStack); probes are noise. RequestReceived is dropped so each request logs once.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "nonResourceURLs": ["/healthz*", "/livez*", "/readyz*", "/version"]},
        {"level": "Metadata"},
    ],
}


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or used; the message carries the log tail."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


# --------------------------------------------------------------------------------------------
# Certificates


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: generated in microseconds, unlike RSA, and accepted by Go, kubectl and Python.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class _CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def load_or_create(cls, key_path: Path, cert_path: Path) -> _CertificateAuthority:
        # Kept across restarts of a persistent control plane so that issued kubeconfigs stay valid.
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cumulo-envtest-ca")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(_cert_pem(cert))
        return cls(key, cert)

    def issue(self, common_name: str, organizations: Iterable[str] = (), *, server: bool = False,
              dns_names: Sequence[str] = (), ips: Sequence[str] = (),
              days: int = 365) -> tuple[bytes, bytes]:
        """A leaf certificate; returns (cert PEM, key PEM)."""
        key = _new_key()
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if dns_names or ips:
            alt: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
            alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return _cert_pem(builder.sign(self.key, hashes.SHA256())), _key_pem(key)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------------
# Processes


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the ports differ from each other.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """etcd + kube-apiserver on loopback. Use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path | str | None = None, *,
                 apiserver_args: Mapping[str, str | None] | None = None,
                 etcd_args: Mapping[str, str | None] | None = None) -> None:
        """``apiserver_args``/``etcd_args`` override or (with value None) remove default flags."""
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="cumulo-envtest-")) if workdir is None \
            else Path(workdir).resolve()
        self._apiserver_overrides = dict(apiserver_args or {})
        self._etcd_overrides = dict(etcd_args or {})
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._state: dict[str, Any] | None = None
        self.startup_seconds: float | None = None

    # -- paths and addresses --------------------------------------------------------------

    @property
    def cert_dir(self) -> Path:
        return self.workdir / "certs"

    @property
    def ca_cert_path(self) -> Path:
        return self.cert_dir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def apiserver_log(self) -> Path:
        return self.workdir / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    @property
    def server(self) -> str:
        """The apiserver URL, https://127.0.0.1:<port>."""
        return str(self._require_state()["apiserver"]["url"])

    @property
    def etcd_url(self) -> str:
        return str(self._require_state()["etcd"]["client_url"])

    @property
    def running(self) -> bool:
        state = self._state
        return state is not None and all(processes.alive(state[name]["pid"], state[name]["start_time"])
                                         for name in ("etcd", "apiserver"))

    def _require_state(self) -> dict[str, Any]:
        if self._state is None:
            raise ControlPlaneError("the control plane is not started")
        return self._state

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, detach: bool = False, timeout: float = 60.0) -> ControlPlane:
        """Start etcd and kube-apiserver and wait until /readyz answers ok.

        With ``detach=True`` the processes outlive this Python process (``make up``); if the
        work directory already holds a live control plane, it is reused instead (idempotent).
        """
        if self._state is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Two `make up`s at once: the second waits, then finds the first one's control plane.
        with (self.workdir / "start.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked(detach, timeout)

    def _start_locked(self, detach: bool, timeout: float) -> ControlPlane:
        existing = self._read_state()
        if existing is not None:
            if self._state_alive(existing):
                if not detach:
                    raise ControlPlaneError(
                        f"a control plane already runs in {self.workdir}; use ControlPlane.attach()")
                self._state, self._owns_workdir = existing, False
                return self
            self._kill_leftovers(existing)  # a half-dead one from an earlier run
        started = time.monotonic()
        self._prepare_files()
        binaries = {name: toolchain.binary(name) for name in ("etcd", "kube-apiserver", "kubectl")}
        for path in binaries.values():
            if not path.exists():
                raise ControlPlaneError(f"{path} is missing; build it with `python3 -m cumulo.toolchain`")
        try:
            # Free ports are chosen by binding and closing; another process may grab one in
            # between, so a bind failure is retried with fresh ports.
            for _ in range(3):
                etcd_port, peer_port, api_port = _free_ports(3)
                state = self._launch(binaries, etcd_port, peer_port, api_port, detach, timeout)
                if state is not None:
                    break
            else:
                raise ControlPlaneError("could not bind free loopback ports")
            self._state = state
            self.aggregate_cluster_roles()
        except BaseException:
            self._state = None
            self._stop_processes()
            raise
        self._write_state(state)
        self.startup_seconds = time.monotonic() - started
        if not detach:
            atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop kube-apiserver, then etcd. Idempotent.

        Also stops a control plane recorded in the work directory's state.json that this object
        did not start (``ControlPlane(workdir).stop()`` is ``cumulo down``). Removes the work
        directory if it is a temporary one this object created; a given work directory (certs,
        etcd data, logs) is kept, so the next start in it resumes the same cluster state.
        """
        atexit.unregister(self.stop)
        state = self._state or self._read_state()
        self._stop_processes(state, timeout)
        self._state = None
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_apiserver(self) -> None:
        """SIGKILL kube-apiserver alone (a crash; etcd keeps running): the crash tests' apiserver outage."""
        state = self._require_state()
        proc = self._procs.pop("apiserver", None)
        pid = proc.pid if proc is not None else state["apiserver"]["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=30)
        else:
            processes.reap(pid)

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start kube-apiserver again after :meth:`kill_apiserver`, on the same port over the same etcd, so
        every kubeconfig stays valid; returns once /readyz answers ok."""
        state = self._require_state()
        port = int(state["apiserver"]["port"])
        etcd_port = int(state["etcd"]["client_url"].rsplit(":", 1)[1])
        offset = processes.size(self.apiserver_log)
        api = self._spawn("apiserver", self._apiserver_command(toolchain.binary("kube-apiserver"), etcd_port, port),
                          self.apiserver_log, bool(state.get("detached")))
        context = self._client_ssl_context()
        deadline = time.monotonic() + timeout
        while _get(port, "/readyz", context)[0] != 200:
            if api.poll() is not None or time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver did not come back on port {port}; {self.apiserver_log}:\n"
                                        f"{processes.tail(self.apiserver_log, offset)}")
            time.sleep(POLL_INTERVAL)
        state["apiserver"].update(pid=api.pid, start_time=processes.proc_start_time(api.pid))
        self._write_state(state)

    @classmethod
    def attach(cls, workdir: Path | str) -> ControlPlane | None:
        """The control plane running in ``workdir`` (from its state.json), or None if none runs
        there (no state, or its processes are gone)."""
        plane = cls(workdir)
        state = plane._read_state()
        if state is None or not plane._state_alive(state):
            return None
        plane._state = state
        return plane

    def _stop_processes(self, state: Mapping[str, Any] | None = None, timeout: float = 10.0) -> None:
        for name in ("apiserver", "etcd"):  # the apiserver first, so it does not log etcd errors
            proc = self._procs.pop(name, None)
            if proc is not None:
                processes.terminate(proc.pid, None, timeout)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
            elif state is not None and name in state:
                processes.terminate(state[name]["pid"], state[name]["start_time"], timeout)

    def _kill_leftovers(self, state: Mapping[str, Any]) -> None:
        self._stop_processes(state)
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def _read_state(self) -> dict[str, Any] | None:
        return processes.read_json(self.state_path)

    def _write_state(self, state: Mapping[str, Any]) -> None:
        processes.write_json(self.state_path, state)  # atomic: a concurrent attach never sees half a file

    @staticmethod
    def _state_alive(state: Mapping[str, Any]) -> bool:
        try:
            return all(processes.alive(state[name]["pid"], state[name]["start_time"])
                       for name in ("etcd", "apiserver"))
        except (KeyError, TypeError):
            return False

    # -- start-up steps ---------------------------------------------------------------------

    def _prepare_files(self) -> _CertificateAuthority:
        certs = self.cert_dir
        certs.mkdir(parents=True, exist_ok=True)
        ca = _CertificateAuthority.load_or_create(certs / "ca.key", self.ca_cert_path)
        service_ip = str(next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts()))
        cert, key = ca.issue(
            "kube-apiserver", server=True,
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"],
            ips=["127.0.0.1", service_ip])
        (certs / "apiserver.crt").write_bytes(cert)
        _write_private(certs / "apiserver.key", key)
        cert, key = ca.issue(ADMIN_USER, ["system:masters"])
        (certs / "admin.crt").write_bytes(cert)
        _write_private(certs / "admin.key", key)
        if not (certs / "sa.key").exists():  # kept across restarts so issued tokens stay valid
            sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(certs / "sa.key", _key_pem(sa_key))
            (certs / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        return ca

    def _etcd_command(self, binary: Path, client_port: int, peer_port: int) -> list[str]:
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        args: dict[str, str | None] = {
            "name": "cumulo",
            "data-dir": str(self.workdir / "etcd"),
            "listen-client-urls": client,
            "advertise-client-urls": client,
            "listen-peer-urls": peer,
            "initial-advertise-peer-urls": peer,
            "initial-cluster": f"cumulo={peer}",
            "initial-cluster-state": "new",  # ignored when the data dir already has a member
            # Throw-away local data: losing the last writes on a power cut is acceptable, and
            # fsync dominates the latency of every write on a laptop or CI disk.
            "unsafe-no-fsync": "true",
            # One member has nobody to lose contact with; a short election timeout makes its
            # first self-election take ~0.1 s instead of ~0.6 s.
            "heartbeat-interval": "10",
            "election-timeout": "100",
            "quota-backend-bytes": str(8 * 1024**3),  # etcd's recommended maximum; default is 2 GiB
            "auto-compaction-mode": "periodic",  # the apiserver compacts too; this bounds the db
            "auto-compaction-retention": "10m",
            "log-level": "warn",
        }
        return [str(binary), *_flags(args, self._etcd_overrides)]

    def _apiserver_command(self, binary: Path, etcd_port: int, port: int) -> list[str]:
        certs = self.cert_dir
        args: dict[str, str | None] = {
            "bind-address": "127.0.0.1",
            "secure-port": str(port),
            # The Service "kubernetes" gets no endpoints: a loopback address is not a valid
            # Endpoints address, and nothing in-cluster needs to reach the apiserver.
            "advertise-address": "127.0.0.1",
            "endpoint-reconciler-type": "none",
            "cert-dir": str(certs),  # never /var/run/kubernetes
            "tls-cert-file": str(certs / "apiserver.crt"),
            "tls-private-key-file": str(certs / "apiserver.key"),
            "client-ca-file": str(self.ca_cert_path),
            "etcd-servers": f"http://127.0.0.1:{etcd_port}",
            "service-cluster-ip-range": SERVICE_CLUSTER_IP_RANGE,
            "allow-privileged": "true",
            # Node for kubelet-style identities, RBAC for everything else; no AlwaysAllow, so
            # tests see the same 403s a real cluster gives.
            "authorization-mode": "Node,RBAC",
            "service-account-issuer": SERVICE_ACCOUNT_ISSUER,
            "api-audiences": SERVICE_ACCOUNT_ISSUER,
            "service-account-key-file": str(certs / "sa.pub"),
            "service-account-signing-key-file": str(certs / "sa.key"),
            # On top of the 1.36 default set (which already has NamespaceLifecycle,
            # ServiceAccount, the webhooks and both admission policy kinds): NodeRestriction
            # limits node identities to their own objects. ResourceQuota and
            # StorageObjectInUseProtection are off because their counterparts live in
            # kube-controller-manager, which does not run here: an unsynced ResourceQuota would
            # refuse every create in its namespace, and PVC protection finalizers would never go.
            "enable-admission-plugins": "NamespaceLifecycle,ServiceAccount,NodeRestriction,"
                                        "ValidatingAdmissionPolicy,MutatingAdmissionPolicy,"
                                        "ValidatingAdmissionWebhook,MutatingAdmissionWebhook",
            "disable-admission-plugins": "ResourceQuota,StorageObjectInUseProtection",
            "audit-policy-file": str(self.workdir / "audit-policy.yaml"),
            "audit-log-path": str(self.audit_log),
            "audit-log-format": "json",
            # Blocking: an entry is written before the response, so a test can read it right away.
            "audit-log-mode": "blocking",
            "audit-log-maxsize": "256",
            "audit-log-maxbackup": "2",
            "profiling": "false",
        }
        return [str(binary), *_flags(args, self._apiserver_overrides)]

    def _spawn(self, name: str, command: list[str], log: Path, detach: bool) -> subprocess.Popen[bytes]:
        proc = processes.spawn(command, log, detach=detach, cwd=self.workdir)
        self._procs[name] = proc
        return proc

    def _launch(self, binaries: Mapping[str, Path], etcd_port: int, peer_port: int, api_port: int,
                detach: bool, timeout: float) -> dict[str, Any] | None:
        """Start both processes; None if a port was taken in the meantime (caller retries)."""
        deadline = time.monotonic() + timeout
        etcd_offset = processes.size(self.etcd_log)
        etcd = self._spawn("etcd", self._etcd_command(binaries["etcd"], etcd_port, peer_port),
                           self.etcd_log, detach)
        # The apiserver's etcd preflight retries only once a second; waiting here is faster.
        while not _etcd_healthy(etcd_port):
            if etcd.poll() is not None:
                tail = processes.tail(self.etcd_log, etcd_offset)
                self._procs.pop("etcd", None)
                if "address already in use" in tail:
                    return None
                raise ControlPlaneError(f"etcd exited with {etcd.returncode}; {self.etcd_log}:\n{tail}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd not healthy after {timeout:.0f}s; {self.etcd_log}:\n"
                                        f"{processes.tail(self.etcd_log, etcd_offset)}")
            time.sleep(POLL_INTERVAL)

        api_offset = processes.size(self.apiserver_log)
        api = self._spawn("apiserver", self._apiserver_command(binaries["kube-apiserver"], etcd_port,
                                                               api_port), self.apiserver_log, detach)
        context = self._client_ssl_context()
        last = ""
        while True:
            status, last = _get(api_port, "/readyz?verbose", context)
            if status == 200:
                break
            if api.poll() is not None:
                tail = processes.tail(self.apiserver_log, api_offset)
                self._procs.pop("apiserver", None)
                if "address already in use" in tail:
                    self._stop_processes()
                    return None
                raise ControlPlaneError(f"kube-apiserver exited with {api.returncode}; "
                                        f"{self.apiserver_log}:\n{tail}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready after {timeout:.0f}s; last /readyz:\n{last}\n"
                    f"{self.apiserver_log}:\n{processes.tail(self.apiserver_log, api_offset)}")
            time.sleep(POLL_INTERVAL)

        url = f"https://127.0.0.1:{api_port}"
        self._write_kubeconfig_file(self.admin_kubeconfig, ADMIN_USER, {
            "client-certificate-data": _b64((self.cert_dir / "admin.crt").read_bytes()),
            "client-key-data": _b64((self.cert_dir / "admin.key").read_bytes()),
        }, server=url)
        return {
            "version": 1,
            "workdir": str(self.workdir),
            "detached": detach,
            "kubernetes_version": toolchain.KUBERNETES.version,
            "admin_kubeconfig": str(self.admin_kubeconfig),
            "audit_log": str(self.audit_log),
            "etcd": {"pid": etcd.pid, "start_time": processes.proc_start_time(etcd.pid),
                     "client_url": f"http://127.0.0.1:{etcd_port}",
                     "peer_url": f"http://127.0.0.1:{peer_port}", "log": str(self.etcd_log)},
            "apiserver": {"pid": api.pid, "start_time": processes.proc_start_time(api.pid), "url": url,
                          "port": api_port, "log": str(self.apiserver_log)},
        }

    def _client_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_cert_path))
        context.load_cert_chain(self.cert_dir / "admin.crt", self.cert_dir / "admin.key")
        return context

    # -- RBAC ---------------------------------------------------------------------------------

    def aggregate_cluster_roles(self) -> list[str]:
        """Fill in the rules of aggregated ClusterRoles (admin, edit, view, and any other with an
        ``aggregationRule``); returns the names it updated.

        In a real cluster kube-controller-manager's clusterrole-aggregation controller does this
        continuously; here nothing does, and the built-in roles would grant nothing. start() and
        install_crds() call it; call it again after applying ClusterRoles that carry
        ``aggregate-to-*`` labels (a one-shot, not a watch).
        """
        path = "/apis/rbac.authorization.k8s.io/v1/clusterroles"
        roles = {role["metadata"]["name"]: role for role in self._api("GET", path)["items"]}
        changed: set[str] = set()
        for _ in range(len(roles)):  # to a fixpoint: admin aggregates edit, which aggregates view
            progress = False
            for name, role in sorted(roles.items()):
                selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors") or []
                if not selectors:
                    continue
                # As the controller does: sources in name order, each distinct rule once.
                rules: list[Any] = []
                for source in sorted(roles):
                    labels = roles[source]["metadata"].get("labels") or {}
                    if source != name and any(_selects(selector, labels) for selector in selectors):
                        rules += [rule for rule in roles[source].get("rules") or [] if rule not in rules]
                if rules != (role.get("rules") or []):
                    role["rules"] = rules
                    changed.add(name)
                    progress = True
            if not progress:
                break
        for name in sorted(changed):
            self._api("PATCH", f"{path}/{name}", {"rules": roles[name]["rules"]},
                      content_type="application/merge-patch+json")
        return sorted(changed)

    def _wait_crds_served(self, names: set[str], timeout: float) -> None:
        """Wait until the CRDs are Established *and* in discovery, which lags Established: a
        `kubectl get <kind or category>` right after Established can still fail."""
        # One list per poll: `kubectl wait` checks CRDs one after another, ~0.1 s each.
        deadline = time.monotonic() + timeout
        while True:
            listed = self._api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            crds = [crd for crd in listed["items"] if crd["metadata"]["name"] in names]
            pending = names - {crd["metadata"]["name"] for crd in crds if _established(crd)}
            if not pending:
                wanted = {
                    (crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]):
                        sorted(crd["spec"]["names"].get("categories") or [])
                    for crd in crds for version in crd["spec"]["versions"] if version.get("served")}
                discovery = self._api("GET", "/apis", accept=_AGGREGATED_DISCOVERY)
                served = {(group["metadata"]["name"], version["version"], resource["resource"]):
                          sorted(resource.get("categories") or [])
                          for group in discovery["items"] for version in group["versions"]
                          for resource in version.get("resources") or []}
                pending = {key[2] + "." + key[0] for key, categories in wanted.items()
                           if served.get(key) != categories}
                if not pending:
                    return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRDs not served after {timeout:.0f}s: {sorted(pending)}")
            time.sleep(POLL_INTERVAL)

    def _api(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             accept: str = "application/json") -> Any:
        """A JSON request as admin, without the weight of the kubernetes client."""
        port = self._require_state()["apiserver"]["port"]
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                                 context=self._client_ssl_context())
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body),
                               headers={"Content-Type": content_type, "Accept": accept})
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        if response.status >= 300:
            raise ControlPlaneError(f"{method} {path}: {response.status} {text}")
        return json.loads(text)

    # -- credentials ------------------------------------------------------------------------

    def _write_kubeconfig_file(self, path: Path, user: str, credentials: Mapping[str, str],
                               server: str | None = None) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cumulo", "cluster": {
                "server": server or self.server,
                "certificate-authority-data": _b64(self.ca_cert_path.read_bytes()),
            }}],
            "users": [{"name": user, "user": dict(credentials)}],
            "contexts": [{"name": "cumulo", "context": {"cluster": "cumulo", "user": user}}],
            "current-context": "cumulo",
            "preferences": {},
        }
        _write_private(path, yaml.safe_dump(config, sort_keys=False).encode())
        return path

    def write_kubeconfig(self, path: Path | str) -> Path:
        """Copy the admin kubeconfig to ``path`` (``make up`` writes ``.cumulo/kubeconfig``)."""
        self._require_state()
        path = Path(path)
        _write_private(path, self.admin_kubeconfig.read_bytes())
        return path

    def _kubeconfig_path(self, name: str) -> Path:
        return self.workdir / "kubeconfigs" / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".kubeconfig")

    def mint_kubeconfig(self, user: str, groups: Iterable[str] = (), path: Path | str | None = None,
                        *, days: int = 365) -> Path:
        """A client-certificate kubeconfig for any user/groups identity (CN=user, O=groups).

        Authentication only: what the identity may do is up to RBAC. ``system:masters`` in
        ``groups`` bypasses RBAC, like the admin.
        """
        self._require_state()
        ca = _CertificateAuthority.load_or_create(self.cert_dir / "ca.key", self.ca_cert_path)
        cert, key = ca.issue(user, list(groups), days=days)
        return self._write_kubeconfig_file(
            Path(path) if path is not None else self._kubeconfig_path(user), user,
            {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)})

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | str | None = None, *,
                                   audiences: Sequence[str] | None = None,
                                   expiration_seconds: int = 30 * 24 * 3600,
                                   bound_object_ref: Mapping[str, str] | Any | None = None,
                                   create_namespace: bool = True) -> Path:
        """A bearer-token kubeconfig for ServiceAccount ``namespace/name``.

        Creates the namespace (unless told not to) and the ServiceAccount if missing, and gets a
        bound token from the TokenRequest API. ``bound_object_ref`` (a V1BoundObjectReference or a
        dict with kind, name, optional apiVersion and uid; kind Pod, Secret or Node) ties the
        token's life to that object (revocation shows after up to 10 s, the apiserver's token
        cache) and, for a Node or Pod, adds node claims. The default
        expiration is long because nothing refreshes the token in local runs.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            creations: list[tuple[Any, dict[str, Any]]] = []
            if create_namespace:
                creations.append((core.create_namespace, {"body": client.V1Namespace(
                    metadata=client.V1ObjectMeta(name=namespace))}))
            creations.append((core.create_namespaced_service_account, {
                "namespace": namespace,
                "body": client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))}))
            for create, kwargs in creations:
                try:
                    create(**kwargs)
                except ApiException as error:
                    if error.status != 409:  # already exists is fine
                        raise
            ref = bound_object_ref
            if isinstance(ref, Mapping):
                ref = client.V1BoundObjectReference(
                    api_version=ref.get("apiVersion", "v1"), kind=ref["kind"], name=ref["name"],
                    uid=ref.get("uid"))
            request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=list(audiences) if audiences is not None else [SERVICE_ACCOUNT_ISSUER],
                expiration_seconds=expiration_seconds, bound_object_ref=ref))
            response = core.create_namespaced_service_account_token(name, namespace, request)
            token = str(response.status.token)  # type: ignore[union-attr]
        return self._write_kubeconfig_file(
            Path(path) if path is not None
            else self._kubeconfig_path(f"system:serviceaccount:{namespace}:{name}"),
            f"system:serviceaccount:{namespace}:{name}", {"token": token})

    def api_client(self, kubeconfig: Path | str | None = None) -> ApiClient:
        """A kubernetes.client.ApiClient for ``kubeconfig`` (default: admin). Close it when done."""
        from kubernetes import config

        api: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or self.admin_kubeconfig))
        return api

    # -- kubectl ----------------------------------------------------------------------------

    def kubectl(self, *args: str, kubeconfig: Path | str | None = None, input: str | None = None,
                check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess[str]:
        """Run the toolchain's kubectl (admin kubeconfig by default); text output is captured."""
        self._require_state()
        command = [str(toolchain.binary("kubectl")), "--kubeconfig", str(kubeconfig or self.admin_kubeconfig),
                   # per-control-plane discovery cache instead of one ~/.kube/cache entry per port
                   "--cache-dir", str(self.workdir / "kubectl-cache"), *args]
        result = subprocess.run(command, input=input, text=True, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, command, result.stdout, result.stderr)
        return result

    def install_crds(self, directory: Path | str, timeout: float = 60) -> list[str]:
        """Server-side apply every manifest in ``directory`` and wait until each CRD is Established.

        A missing or empty directory is a no-op. Returns the names of the applied objects.
        """
        directory = Path(directory)
        if not directory.is_dir() or not any(directory.glob("*.yaml")):
            return []
        # --force-conflicts: the generated CRDs are authoritative, whoever touched them last.
        applied = self.kubectl("apply", "--server-side", "--force-conflicts",
                               "--field-manager=cumulo-envtest", "-f", str(directory),
                               "-o", "name").stdout.split()
        crds = [name for name in applied if name.startswith("customresourcedefinition")]
        if crds:
            self._wait_crds_served({name.split("/", 1)[1] for name in crds}, timeout)
            # kubectl refreshes a stale discovery cache for an unknown kind but not for an
            # unknown category (`kubectl get cumulo`), so drop what the apply cached.
            shutil.rmtree(self.workdir / "kubectl-cache" / "discovery", ignore_errors=True)
        if any(name.startswith("clusterrole.") for name in applied):
            self.aggregate_cluster_roles()
        return applied


def _established(crd: Mapping[str, Any]) -> bool:
    return any(condition.get("type") == "Established" and condition.get("status") == "True"
               for condition in (crd.get("status") or {}).get("conditions") or [])


def _flags(defaults: Mapping[str, str | None], overrides: Mapping[str, str | None]) -> list[str]:
    merged = {**defaults, **overrides}
    return [f"--{key}={value}" for key, value in merged.items() if value is not None]


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a metav1.LabelSelector (as JSON) matches ``labels``; empty matches everything."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if (operator == "In" and labels.get(key) not in values
                or operator == "NotIn" and key in labels and labels[key] in values
                or operator == "Exists" and key not in labels
                or operator == "DoesNotExist" and key in labels):
            return False
    return True


def _etcd_healthy(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status == 200 and b'"true"' in body
    except (OSError, http.client.HTTPException):
        return False


def _get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    """GET over HTTPS; (0, error) when the apiserver does not answer yet."""
    try:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        connection.close()
        return response.status, body
    except (OSError, http.client.HTTPException) as error:
        return 0, str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cumulo.envtest up|down|status [WORKDIR]``: a detached control plane by hand."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cumulo.envtest")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("workdir", nargs="?", default=".cumulo/control-plane", type=Path)
    options = parser.parse_args(argv)
    if options.command == "up":
        toolchain.ensure_all()
        plane = ControlPlane(options.workdir).start(detach=True)
        took = " (already running)" if plane.startup_seconds is None else f" in {plane.startup_seconds:.2f}s"
        print(f"control plane at {plane.server}{took}; kubeconfig {plane.admin_kubeconfig}")
        return 0
    attached = ControlPlane.attach(options.workdir)
    if options.command == "status":
        print(f"running at {attached.server}" if attached else "not running")
        return 0 if attached else 1
    if attached is not None:
        attached.stop()
    else:  # remains of a half-dead one
        plane = ControlPlane(options.workdir)
        plane._kill_leftovers(plane._read_state() or {})
    print("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
