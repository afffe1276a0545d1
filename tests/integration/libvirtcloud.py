"""A libvirt cloud for the integration tests that run real guests: one zone with a Host bound to an agent on a
private libvirtd (QEMU/TCG), the tiny test guest's template, and the helpers these tests share to read objects,
wait for phases and conditions and watch a guest's serial console.

A helper module, not a test module: test modules import it (never each other)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest_libvirt import Cloud, unique, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cumulo import guestimage

if TYPE_CHECKING:
    from conftest_ceph import CephPool

GROUP, VERSION = "cumulo.io", "v1alpha1"
BOOT_TIMEOUT = 90


class Namespaced:
    """Namespaced Cumulo objects of one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
                "metadata": {"name": name, "namespace": self.namespace, **metadata}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, plural: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)["items"]

    def status(self, plural: str, name: str) -> dict[str, Any]:
        return (self.get(plural, name) or {}).get("status") or {}

    def patch(self, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name, body)

    def delete(self, plural: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise


@dataclasses.dataclass
class Zone:
    name: str
    host: str
    pool: str
    pool_path: Path
    store_path: Path
    state_dir: Path
    offering: str
    objects: Namespaced
    agent_args: list[str]


def build_zone(cloud: Cloud, kube: client.ApiClient, control_plane, agents, libvirtd, tmp_path: Path,
               agent_flags: Sequence[str] = ()) -> tuple[Zone, Any]:
    """A zone of one libvirt host with a local pool, an image store and a tiny offering, a tenant namespace, and the
    host's agent started (``agent_flags`` come last, so they override the defaults) and Up."""
    zone, pod, cluster, host = unique("zone"), unique("pod"), unique("kvm"), unique("kvmhost")
    cloud.create("zones", zone, {"networkType": "Advanced", "dns1": "192.0.2.53", "localStorageEnabled": True})
    cloud.create("hostpods", pod, {"zone": zone, "cidr": "10.252.0.0/24", "gateway": "10.252.0.1",
                                   "startIp": "10.252.0.10", "endIp": "10.252.0.20"})
    cloud.create("clusters", cluster, {"pod": pod, "hypervisorType": "KVM", "cpuOvercommitRatio": 4.0})
    cloud.create("hosts", host, {"cluster": cluster})
    pool, pool_path = unique("local"), tmp_path / "pool"
    cloud.create("storagepools", pool, {"zone": zone, "scope": "Host", "type": "Filesystem", "host": host,
                                        "path": str(pool_path)})
    store_path = tmp_path / "store"
    store_path.mkdir()
    cloud.create("imagestores", unique("store"), {"zone": zone, "type": "Filesystem", "path": str(store_path)})
    offering = unique("tiny")
    cloud.create("serviceofferings", offering, {"cpuNumber": 1, "cpuSpeedMHz": 500, "memoryMiB": 128,
                                                "storageType": "local"})
    namespace = unique("tenant")
    control_plane.kubectl("create", "namespace", namespace)
    state_dir = tmp_path / "state"
    args = ["--host", host, "--libvirt-uri", libvirtd.uri, "--network-driver", "simulator",
            "--heartbeat-interval", "1", "--lease-duration", "5", "--state-dir", str(state_dir),
            "--stop-timeout", "30", "--log-level", "debug", "--log-format", "text", *agent_flags]
    agent = agents.start(host, *args)
    wait_for(lambda: (cloud.get("hosts", host).get("status") or {}).get("state") == "Up", timeout=30,
             what=f"host {host} Up")
    wait_for(lambda: (cloud.get("storagepools", pool).get("status") or {}).get("state") == "Up", timeout=30,
             what="the local pool Up")
    return Zone(zone, host, pool, pool_path, store_path, state_dir, offering, Namespaced(kube, namespace), args), agent


def create_rbd_pool(cloud: Cloud, kube: client.ApiClient, ceph_pool: CephPool, zone: str) -> tuple[str, str]:
    """A Zone-scoped RBD StoragePool on the test's Ceph pool, its key in a Secret of cumulo-system: (pool, Secret)."""
    secret = unique("ceph-key")
    client.CoreV1Api(kube).create_namespaced_secret("cumulo-system", {"metadata": {"name": secret},
                                                                      "stringData": {"key": ceph_pool.key}})
    pool = unique("rbd")
    cloud.create("storagepools", pool, {
        "zone": zone, "scope": "Zone", "type": "RBD",
        "rbd": {"monitors": [ceph_pool.monitor], "pool": ceph_pool.name, "user": ceph_pool.user,
                "secretRef": {"namespace": "cumulo-system", "name": secret, "key": "key"}}})
    return pool, secret


def template_spec(guest: guestimage.TinyGuest, zone: str, **overrides: Any) -> dict[str, Any]:
    spec = {
        "url": guest.disk.as_uri(), "format": "QCOW2", "zone": zone, "checksum": f"sha256:{guest.disk_sha256}",
        "directKernelBoot": {
            "kernel": {"url": guest.kernel.as_uri(), "checksum": f"sha256:{guest.kernel_sha256}"},
            "initrd": {"url": guest.initrd.as_uri(), "checksum": f"sha256:{guest.initrd_sha256}"},
            "cmdline": guest.cmdline,
        },
    }
    spec.update(overrides)
    return spec


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), {})


class Console:
    """A guest's serial console log, as status.node.consoleLog names it."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, pattern: str, timeout: float = BOOT_TIMEOUT, after: int = 0, interval: float = 0.1) -> re.Match[str]:
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text(), after)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the console within {timeout:g}s:\n{self.text()[-3000:]}")
            time.sleep(interval)

    def count(self, line: str) -> int:
        return len(re.findall(rf"^{re.escape(line)}\r?$", self.text(), re.M))


def console_wait(path: str, pattern: str, timeout: float = 120, after: int = 0) -> None:
    """Wait for ``pattern`` on the console log at ``path`` (status.node.consoleLog)."""
    Console(path).wait(pattern, timeout, after, interval=0.2)


def line(text: str) -> str:
    return rf"^{re.escape(text)}\r?$"


def vm_phase(zone: Zone, name: str) -> str | None:
    return zone.objects.status("virtualmachines", name).get("phase")


def wait_phase(where: Zone | Namespaced, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    """The guest's status once it is in ``phase``; else the failure says where it is and why."""
    objects = where.objects if isinstance(where, Zone) else where
    try:
        return wait_for(lambda: (status := objects.status("virtualmachines", name)).get("phase") == phase
                        and status, timeout=timeout, interval=0.1, what=f"VirtualMachine {name} {phase}")
    except AssertionError as error:
        vm = objects.get("virtualmachines", name)
        raise AssertionError(f"{error}; it is {((vm or {}).get('status') or {}).get('phase')}, "
                             f"Ready: {condition(vm, 'Ready')}, node: {((vm or {}).get('status') or {}).get('node')}, "
                             f"root volume: {objects.status('volumes', f'{name}-root')}") from None


def libvirt_domain(uri: str, uuid: str) -> tuple[int, float] | None:
    """(libvirt run id, cpu seconds) of the domain, or None when there is none."""
    import libvirt

    connection = libvirt.open(uri)
    try:
        domain = connection.lookupByUUIDString(uuid)
        if not domain.isActive():
            return None
        return domain.ID(), domain.info()[4] / 1e9
    except libvirt.libvirtError:  # none, or gone between the lookup and the look
        return None
    finally:
        connection.close()


# -- snapshots ------------------------------------------------------------------------------------------


def snapshot_phase(objects: Namespaced, name: str) -> str | None:
    return (objects.get("snapshots", name) or {}).get("status", {}).get("phase")


def wait_backed_up(objects: Namespaced, name: str, timeout: float = 120) -> dict[str, Any]:
    try:
        return wait_for(lambda: snapshot_phase(objects, name) == "BackedUp" and objects.get("snapshots", name),
                        timeout=timeout, interval=0.2, what=f"Snapshot {name} BackedUp")
    except AssertionError as error:
        raise AssertionError(f"{error}; it is {objects.get('snapshots', name)}") from None


def wait_condition(objects: Namespaced, plural: str, name: str, type_: str, status: str, reason: str | None = None,
                   timeout: float = 120) -> dict[str, Any]:
    def check():
        found = condition(objects.get(plural, name), type_)
        return found.get("status") == status and (reason is None or found.get("reason") == reason) and found

    try:
        return wait_for(check, timeout=timeout, interval=0.2, what=f"{plural} {name} {type_}={status} {reason or ''}")
    except AssertionError as error:
        raise AssertionError(f"{error}; status: {(objects.get(plural, name) or {}).get('status')}") from None
