"""The libvirt domain XML of a guest, rendered from a LaunchSpec (hostagent.vmspec.describe + domainxml.render) and
read back; asserted structurally with ElementTree."""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET

from controllers.api.v1alpha1.virtualmachine import LaunchSpec
from hostagent import vmspec
from hostagent.drivers.hypervisor import DiskDevice, DomainOwner, NetworkSource
from hostagent.drivers.hypervisor import domainxml

NS = {"cumulo": domainxml.METADATA_NS}
STARTED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def vm(name: str = "web", namespace: str = "tenant", uid: str = "0a1b2c3d-0000-4000-8000-000000000001") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "42"}}


def launch(**overrides) -> LaunchSpec:
    data = {
        "host": "kvm1", "cpuNumber": 2, "cpuSpeedMHz": 1000, "memoryMiB": 128, "osType": "Other Linux (64-bit)",
        "disks": [
            {"volume": "web-root", "device": "vda", "pool": "p1", "poolType": "Filesystem",
             "path": "/pools/p1/root.qcow2", "sizeBytes": 64 * 2**20},
            {"volume": "data.one", "device": "vdb", "pool": "p1", "poolType": "Filesystem",
             "path": "/pools/p1/data.qcow2", "sizeBytes": 2**30},
        ],
        "kernelPath": "/store/t.qcow2.kernel", "initrdPath": "/store/t.qcow2.initrd",
        "kernelCmdline": "console=ttyS0 root=/dev/vda rw", "powerState": "Running", "hostname": "web",
    }
    data.update(overrides)
    return LaunchSpec.model_validate(data)


def render(spec: LaunchSpec | None = None, virt_type: str = "qemu", host_mhz: int | None = 2000,
           **kwargs) -> ET.Element:
    options = {"console_log": "/state/vms/uid/console.log", "config_drive": "/state/vms/uid/config-drive.iso"}
    options.update(kwargs)
    description = vmspec.describe(vm(), spec or launch(), host_mhz=host_mhz, started_at=STARTED, **options)
    return ET.fromstring(domainxml.render(description, virt_type))


def test_identity_resources_and_metadata():
    root = render()
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "tenant_web-0a1b2c3d"
    assert root.findtext("uuid") == "0a1b2c3d-0000-4000-8000-000000000001"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "128"
    assert root.findtext("currentMemory") == "128"
    assert root.findtext("vcpu") == "2"
    owner = root.find("metadata/cumulo:instance", NS)
    assert {child.tag.split("}")[1]: child.text for child in owner} == {
        "namespace": "tenant", "name": "web", "uid": "0a1b2c3d-0000-4000-8000-000000000001", "host": "kvm1",
        "launchVersion": "42", "startedAt": "2026-01-02T03:04:05Z"}
    assert root.findtext("on_poweroff") == "destroy" and root.findtext("on_crash") == "destroy"
    assert root.find("features/acpi") is not None  # ACPI shutdown
    assert root.find("cpu") is None  # TCG: QEMU's default CPU model


def test_kvm_uses_the_host_cpu():
    root = render(virt_type="kvm")
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"


def test_direct_kernel_boot_on_q35():
    os_ = render().find("os")
    assert os_.find("type").get("machine") == "q35" and os_.find("type").text == "hvm"
    assert os_.findtext("kernel") == "/store/t.qcow2.kernel"
    assert os_.findtext("initrd") == "/store/t.qcow2.initrd"
    assert os_.findtext("cmdline") == "console=ttyS0 root=/dev/vda rw"
    assert os_.find("boot") is None


def test_disk_boot_without_a_kernel():
    os_ = render(launch(kernelPath=None, initrdPath=None, kernelCmdline=None)).find("os")
    assert os_.find("kernel") is None and os_.find("cmdline") is None
    assert os_.find("boot").get("dev") == "hd"


def test_disks_are_virtio_in_launch_order_root_first_with_volume_aliases():
    disks = render().findall("devices/disk")
    volumes = [d for d in disks if d.get("device") == "disk"]
    assert [d.find("source").get("file") for d in volumes] == ["/pools/p1/root.qcow2", "/pools/p1/data.qcow2"]
    assert [d.find("target").get("dev") for d in volumes] == ["vda", "vdb"]
    assert {d.find("target").get("bus") for d in volumes} == {"virtio"}
    assert {d.find("driver").get("type") for d in volumes} == {"qcow2"}
    assert [d.find("alias").get("name") for d in volumes] == ["ua-cumulo-vol-web-root", "ua-cumulo-vol-data_one"]


def test_targets_follow_launch_order_not_the_launch_device_names():
    spec = launch()
    spec.disks[0].device, spec.disks[1].device = "vdc", "vda"  # whatever the controller wrote
    volumes = [d for d in render(spec).findall("devices/disk") if d.get("device") == "disk"]
    assert [d.find("target").get("dev") for d in volumes] == ["vda", "vdb"]


def test_config_drive_is_a_read_only_cd_on_virtio_scsi():
    root = render()
    cdrom = next(d for d in root.findall("devices/disk") if d.get("device") == "cdrom")
    assert cdrom.find("source").get("file") == "/state/vms/uid/config-drive.iso"
    assert cdrom.find("target").get("bus") == "scsi"
    assert cdrom.find("readonly") is not None
    assert cdrom.find("driver").get("type") == "raw"
    assert [c.get("model") for c in root.findall("devices/controller[@type='scsi']")] == ["virtio-scsi"]
    assert render(config_drive=None).find("devices/disk[@device='cdrom']") is None


def test_spare_root_ports_for_hotplug_and_no_usb():
    root = render()
    models = [c.get("model") for c in root.findall("devices/controller[@type='pci']")]
    assert models[0] == "pcie-root" and root.find("devices/controller[@type='pci']").get("index") == "0"
    assert models.count("pcie-root-port") == 8
    assert root.find("devices/controller[@type='usb']").get("model") == "none"


def test_serial_console_to_a_file_appended():
    root = render()
    serial = root.find("devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == "/state/vms/uid/console.log"
    assert serial.find("source").get("append") == "on"
    assert root.find("devices/console/target").get("type") == "serial"
    assert render(console_log=None).find("devices/serial").get("type") == "null"


def test_cpu_shares_and_quota():
    assert render().findtext("cputune/shares") == "2000"  # 2 vCPUs x 1000 MHz
    assert render().find("cputune/quota") is None  # limitCpuUse is off
    limited = render(launch(limitCpuUse=True), host_mhz=2000).find("cputune")
    assert limited.findtext("period") == "100000" and limited.findtext("quota") == "50000"  # half a CPU per vCPU
    assert render(launch(limitCpuUse=True), host_mhz=None).find("cputune/quota") is None  # host speed unknown
    assert render(launch(limitCpuUse=True, cpuSpeedMHz=3000), host_mhz=2000).find("cputune/quota") is None
    assert vmspec.cpu_shares(launch(cpuNumber=256, cpuSpeedMHz=4000)) == vmspec.MAX_SHARES
    assert vmspec.cpu_quota_us(launch(limitCpuUse=True, cpuSpeedMHz=1), 100000) == vmspec.MIN_QUOTA_US


def test_render_then_parse_round_trip():
    description = vmspec.describe(vm(), launch(), console_log="/c.log", config_drive="/d.iso", host_mhz=None,
                                  started_at=STARTED)
    owner, disks, console = domainxml.parse(domainxml.render(description))
    assert owner == DomainOwner(namespace="tenant", name="web", uid="0a1b2c3d-0000-4000-8000-000000000001",
                                host="kvm1", launch_version="42", started_at="2026-01-02T03:04:05Z")
    assert console == "/c.log"
    assert [(d.volume, d.target, d.device, d.read_only) for d in disks] == [
        ("web-root", "vda", "disk", False), ("data.one", "vdb", "disk", False), ("", "sda", "cdrom", True)]


def test_parse_a_foreign_domain():
    xml = """<domain type='kvm'><name>other</name><uuid>u</uuid><devices>
      <disk type='file' device='disk'><source file='/x.img'/><target dev='vda' bus='virtio'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdb' bus='virtio'/></disk>
      <serial type='pty'><target port='0'/></serial></devices></domain>"""
    owner, disks, console = domainxml.parse(xml)
    assert owner is None and console is None
    assert disks == (DiskDevice(volume="", path="/x.img", target="vda", format="raw"),
                     DiskDevice(volume="", path="p/i", target="vdb", format="raw",
                                network=NetworkSource(hosts=(), user="", secret_uuid="")))


def test_rbd_disk_is_a_network_disk_with_monitors_and_the_ceph_secret():
    disk = DiskDevice(volume="root.1", path="cloud/volume-u1", target="vda", format="raw",
                      network=NetworkSource(hosts=("10.0.0.1:6789", "[fd00::1]:3300", "mon3"), user="cumulo",
                                            secret_uuid="5a0a1f3e-0000-4000-8000-000000000001"))
    element = ET.fromstring(domainxml.disk_xml(disk))
    assert element.get("type") == "network" and element.find("driver").get("type") == "raw"
    source = element.find("source")
    assert source.get("protocol") == "rbd" and source.get("name") == "cloud/volume-u1" and source.get("file") is None
    assert [(h.get("name"), h.get("port")) for h in source.findall("host")] == [
        ("10.0.0.1", "6789"), ("fd00::1", "3300"), ("mon3", None)]
    assert source.find("auth").get("username") == "cumulo"
    secret = source.find("auth/secret")
    assert (secret.get("type"), secret.get("uuid")) == ("ceph", "5a0a1f3e-0000-4000-8000-000000000001")
    # Read back from a running domain's XML: the same device (adoption, hot-unplug).
    _, (parsed,), _ = domainxml.parse(f"<domain><devices>{domainxml.disk_xml(disk)}</devices></domain>")
    assert parsed.path == disk.path and parsed.volume == "root.1"
    assert parsed.network == NetworkSource(hosts=("10.0.0.1:6789", "[fd00::1]:3300", "mon3"), user="cumulo",
                                           secret_uuid="5a0a1f3e-0000-4000-8000-000000000001")


def test_ceph_secret_xml_is_private_and_persistent():
    root = ET.fromstring(domainxml.secret_xml("5a0a1f3e-0000-4000-8000-000000000001", "cumulo client.x"))
    assert root.get("ephemeral") == "no" and root.get("private") == "yes"
    assert root.findtext("uuid") == "5a0a1f3e-0000-4000-8000-000000000001"
    assert root.find("usage").get("type") == "ceph" and root.findtext("usage/name") == "cumulo client.x"


def test_hotplug_disk_xml():
    element = ET.fromstring(domainxml.disk_xml(DiskDevice(volume="data1", path="/p/d.qcow2", target="vdc")))
    assert element.get("device") == "disk" and element.find("target").get("dev") == "vdc"
    assert element.find("alias").get("name") == "ua-cumulo-vol-data1"
    assert element.find("driver").get("discard") == "unmap"


def test_nics_are_virtio_interfaces_on_their_segment_bridges():
    import pytest

    from hostagent.drivers.hypervisor import HypervisorError

    nic = {"network": "tenant/net", "macAddress": "02:00:0a:01:01:05", "bridge": "brvx-5001",
           "broadcastUri": "vxlan://5001", "trafficLabel": "cloudbr0", "mtu": 1450}
    flat = {"network": "tenant/flat", "deviceId": 1, "macAddress": "02:00:0a:02:02:06", "bridge": "cloudbr0",
            "trafficLabel": "cloudbr0"}
    root = render(launch(nics=[flat, nic]))
    interfaces = root.findall("devices/interface")
    assert [i.get("type") for i in interfaces] == ["bridge", "bridge"]
    first, second = interfaces
    assert first.find("mac").get("address") == "02:00:0a:01:01:05"
    assert first.find("source").get("bridge") == "brvx-5001"
    assert first.find("target").get("dev") == "vn0a1b2c3d0"
    assert first.find("model").get("type") == "virtio" and first.find("mtu").get("size") == "1450"
    assert first.find("alias").get("name") == "ua-cumulo-nic-0"
    assert second.find("source").get("bridge") == "cloudbr0" and second.find("target").get("dev") == "vn0a1b2c3d1"
    assert second.find("mtu").get("size") == "1500"
    with pytest.raises(HypervisorError, match="'nosuch' segment"):
        render(launch(nics=[{**nic, "vswitch": "nosuch", "bridge": "cloudbr0"}]))


def test_a_rate_limited_network_shapes_the_nic_both_ways():
    nic = {"network": "tenant/net", "macAddress": "02:00:0a:01:01:05", "bridge": "brvx-5001",
           "broadcastUri": "vxlan://5001", "trafficLabel": "cloudbr0", "mtu": 1450, "rateMbps": 100}
    interface = render(launch(nics=[nic])).find("devices/interface")
    bandwidth = interface.find("bandwidth")
    # 100 Mbit/s = 12,500,000 B/s = 12207 KiB/s (libvirt's unit), in and out.
    assert bandwidth.find("inbound").get("average") == "12207" == bandwidth.find("outbound").get("average")
    assert render(launch(nics=[{**nic, "rateMbps": None}])).find("devices/interface/bandwidth") is None
