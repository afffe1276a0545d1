"""Helpers of the guest network integration tests: VirtualMachines with a hand-written ``status.launch`` (what the
controller would write), NIC dicts, a dnsmasq DHCP server on a segment, HTTP from inside a namespace, agents running
``--hypervisor netns`` for a lab host."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest_libvirt import unique

from controllers.api.v1alpha1.network import Segment
from cumulo.netlab import LabHost, NetLab
from hostagent.drivers.network.linuxbridge import LinuxBridgeDriver

GROUP, VERSION = "cumulo.io", "v1alpha1"


class Guests:
    """VirtualMachine objects with a hand-written launch, in one namespace."""

    def __init__(self, kube: client.ApiClient, control_plane: Any) -> None:
        self.custom = client.CustomObjectsApi(kube)
        self.namespace = unique("net")
        control_plane.kubectl("create", "namespace", self.namespace)

    def create(self, name: str, host: str, nics: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": self.namespace, "labels": {"cumulo.io/host": host}},
                "spec": {"serviceOffering": "none", "template": {"name": "none"}, "zone": "none"}}
        vm = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualmachines", body)
        self.launch(name, host, nics, extra=extra)
        return str(vm["metadata"]["uid"])

    def launch(self, name: str, host: str, nics: list[dict[str, Any]], power: str = "Running",
               extra: dict[str, Any] | None = None) -> None:
        launch = {"host": host, "cpuNumber": 1, "cpuSpeedMHz": 1000, "memoryMiB": 64, "nics": nics,
                  "powerState": power, "hostname": name, **(extra or {})}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, "virtualmachines", name,
                                                          {"status": {"launch": launch}})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualmachines", name)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualmachines", name)

    def node(self, name: str) -> dict[str, Any]:
        try:
            vm = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualmachines", name)
        except ApiException as error:
            if error.status == 404:
                return {}
            raise
        return (vm.get("status") or {}).get("node") or {}


def vxlan_nic(vni: int, mac: str, ip: str, cidr: str, device_id: int = 0, **extra: Any) -> dict[str, Any]:
    return {"network": f"ns/net{vni}", "deviceId": device_id, "macAddress": mac, "ipAddress": ip, "cidr": cidr,
            "gateway": cidr.replace("0/24", "1"), "bridge": f"brvx-{vni}", "broadcastUri": f"vxlan://{vni}",
            "vswitch": "linuxbridge", "trafficLabel": "cloudbr0", "mtu": 1450, "default": device_id == 0, **extra}


def flat_nic(mac: str, ip: str, cidr: str, **extra: Any) -> dict[str, Any]:
    return {"network": "ns/flat", "deviceId": 0, "macAddress": mac, "ipAddress": ip, "cidr": cidr,
            "gateway": cidr.replace("0/24", "1"), "bridge": "cloudbr0", "vswitch": "linuxbridge",
            "trafficLabel": "cloudbr0", "mtu": 1500, "default": True, **extra}


def dhcp_server(lab: NetLab, host: LabHost, name: str, port: str, address: str, leases: dict[str, str],
                bridge: str, log_dir: Path, vni: int | None = None) -> LabHost:
    """dnsmasq in namespace ``name`` on ``bridge`` of ``host`` (made here for a VXLAN segment: a router's
    segment would be ensured by its agent), answering only the given MAC → IP leases, never forwarding DNS."""
    mtu = 1450 if vni is not None else 1500
    server = lab.add_namespace(name, host=host, port=port, address=address, mtu=mtu)
    if vni is not None:
        segment = Segment(traffic_label="cloudbr0", broadcast_uri=f"vxlan://{vni}", bridge=bridge, mtu=mtu)
        asyncio.run(LinuxBridgeDriver(netns=host.netns).ensure_segment(segment))
    host.exec(["ip", "link", "set", port, "master", bridge, "up"])
    gateway = address.split("/")[0]
    argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--interface=eth0", "--except-interface=lo", "--leasefile-ro", "--pid-file=", "--port=53",
            f"--dhcp-range={gateway},static,255.255.255.0,1h", f"--dhcp-option=3,{gateway}",
            f"--dhcp-option=6,{gateway}", "--log-dhcp"]
    argv += [f"--dhcp-host={mac},{ip}" for mac, ip in leases.items()]
    with open(log_dir / f"dnsmasq-{name}.log", "w") as log:
        server.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return server


def guest_addr(lab: NetLab, netns: str) -> str:
    return lab.exec(netns, ["ip", "-4", "-o", "addr", "show", "eth0"], check=False).stdout


def http(lab: NetLab, netns: str, url: str, *, timeout: int = 3) -> str | None:
    """The body ``url`` answers from inside ``netns`` (busybox wget), or None. (Debian's busybox 1.35 wget
    segfaults with its own -T timeout option: coreutils' timeout bounds it instead.)"""
    result = lab.exec(netns, ["timeout", str(timeout), "busybox", "wget", "-q", "-O", "-", url], check=False,
                      timeout=timeout + 10)
    return result.stdout.strip() if result.returncode == 0 else None


def start_agent(agents: Any, host: str, lab_host: LabHost, state: Path) -> Any:
    return agents.start(host, "--host", host, "--hypervisor", "netns", "--network-driver", "linuxbridge",
                        "--host-netns", lab_host.netns, "--state-dir", str(state), "--vm-resync", "2",
                        "--heartbeat-interval", "2", "--lease-duration", "10", "--orphan-sweep", "5",
                        "--log-level", "info")


def mac(index: int) -> str:
    return f"02:00:00:{uuid.uuid4().hex[:2]}:00:{index:02x}"
