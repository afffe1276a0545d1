"""The host agent survives a restart of the whole control plane (etcd and kube-apiserver).

The envtest control plane comes back on a new port after a restart (free ports are chosen at start),
so the agent reaches it through a TCP proxy on a fixed port, the way agents reach a real apiserver
through a load balancer or a stable Service address. While the control plane is down, the proxy
accepts and drops every connection and counts them: the agent must keep retrying, with backoff,
not in a hot loop.
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import Agents, Cloud, unique, wait_for  # noqa: E402

from controllers.api.v1alpha1.common import SYSTEM_NAMESPACE  # noqa: E402
from controllers.api.v1alpha1.host import SIMULATOR_FAULTS_ANNOTATION  # noqa: E402
from cumulo import envtest  # noqa: E402

pytest_plugins = ["conftest_libvirt"]

REPO = Path(__file__).resolve().parents[2]


class TcpProxy:
    """127.0.0.1:<port> → 127.0.0.1:<target>; with no target, connections are accepted and dropped."""

    def __init__(self, target: int) -> None:
        self.target: int | None = target
        self.dropped = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            target = self.target
            if target is None:
                self.dropped += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """The upstream is gone: break every open connection, drop new ones."""
        self.target = None
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def test_agent_survives_a_control_plane_restart(tmp_path: Path, request: pytest.FixtureRequest,
                                               toolchain_binaries: None) -> None:
    plane = envtest.ControlPlane(tmp_path / "control-plane")
    plane.start()
    proxy = TcpProxy(int(plane.server.rsplit(":", 1)[1]))
    agents = Agents(plane, tmp_path)
    try:
        plane.install_crds(REPO / "crds")
        host = unique("simrs")
        kubeconfig, user = agents.kubeconfig(host)
        config = yaml.safe_load(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        kubeconfig.write_text(yaml.safe_dump(config))
        agent = agents.start(host, "--host", host, "--hypervisor", "simulator", "--register-cluster", unique("cl"),
                             "--heartbeat-interval", "1", "--lease-duration", "10", kubeconfig=kubeconfig, user=user)

        with plane.api_client() as api:
            cloud = Cloud(api)
            # No cumulo-system namespace yet: the agent says so and keeps trying.
            wait_for(lambda: any(record["msg"].startswith(f"namespace {SYSTEM_NAMESPACE} does not exist")
                                 for record in agent.log_records()), what="the missing namespace logged")
            wait_for(lambda: cloud.node(host), what="status.node, which needs no namespace")
            plane.kubectl("create", "namespace", SYSTEM_NAMESPACE)
            wait_for(lambda: cloud.lease(host), what="the Lease once the namespace exists")
            lease_uid = cloud.lease(host).metadata.uid
            before = cloud.lease(host).spec.renew_time

        outage = 4.0
        proxy.cut()
        plane.stop(timeout=1)  # SIGKILL after 1 s: a kube-apiserver may hang in its shutdown hooks
        time.sleep(outage)
        assert agent.alive()
        attempts = proxy.dropped
        plane.start()
        proxy.target = int(plane.server.rsplit(":", 1)[1])

        with plane.api_client() as api:
            cloud = Cloud(api)
            # Heartbeats resume on the same Lease …
            wait_for(lambda: cloud.lease(host).spec.renew_time > before + datetime.timedelta(
                seconds=outage), timeout=20, what="a renewal after the restart")
            assert cloud.lease(host).metadata.uid == lease_uid
            # … and the Host watch is back: a change made after the restart reaches the agent.
            cloud.patch("hosts", host, {"metadata": {"annotations": {SIMULATOR_FAULTS_ANNOTATION: json.dumps(
                {"facts": {"fail": True, "message": "after the restart"}})}}})
            wait_for(lambda: cloud.node(host)["message"] == "after the restart", timeout=20,
                     what="the agent seeing a change made after the restart")

        records = agent.log_records()
        print(f"\nduring a {outage:g}s outage the agent opened {attempts} connections "
              f"({attempts / outage:.1f}/s)")
        assert any(record["msg"] == "apiserver reachable again" for record in records)
        assert sum(record["msg"] == "apiserver unreachable; retrying with backoff" for record in records) == 1
        # Four watches backing off from 0.5 s and one heartbeat a second: a handful per second.
        assert attempts / outage < 20, attempts
        assert agent.alive()
    finally:
        for agent in agents.started:
            code = agent.stop()
            request.node.add_report_section("teardown", f"agent {agent.name} log (exit {code})",
                                            "\n".join(agent.log().splitlines()[-60:]))
        proxy.close()
        plane.stop()
