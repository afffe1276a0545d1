"""libvirt domain XML of a Cumulo guest: rendered from a :class:`DomainDescription`, and read back (owner and
disks) from a running domain's XML. Pure: no libvirt calls, unit-tested with ElementTree.

The shape, and why:

* ``q35`` machine: PCIe; ``spare_pcie_ports`` empty ``pcie-root-port`` controllers so disks can be
  hot-plugged (q35 hot-plugs only into root ports, and libvirt adds ports only for the devices it is given).
* A volume on an RBD pool is a network disk (``<source protocol='rbd' name='pool/image'>``, a ``<host>`` per
  monitor, ``<auth>`` naming the libvirt secret of usage ``ceph`` the agent defined with the client's key): QEMU
  talks to Ceph itself through librbd, nothing is mapped on the host.
* Disks are ``virtio`` in launch order, the root disk first (the guest names virtio disks in PCI order, so
  the first one is ``/dev/vda`` whatever the ``<target dev>``). Each carries a user alias
  ``ua-cumulo-vol-<volume>`` ('.' → '_': Volume names are DNS subdomains, aliases allow ``[A-Za-z0-9_-]``)
  that names its Volume, so the agent tells which volumes a running domain holds from the domain alone.
* The NoCloud config drive is a read-only CD on a ``virtio-scsi`` controller (``sr0`` in the guest): q35's
  own CD bus is AHCI/SATA, which small cloud kernels lack.
* The serial console goes to a file (``<serial type='file'>``, ``append='on'``): QEMU itself writes it,
  so it keeps being written while the agent is down or restarting, and a restart of the guest appends.
* Direct kernel boot when the description has a kernel; else the first disk boots.
* ``<cputune><shares>`` weighs CPU time by the offering's speed; with ``limitCpuUse`` a quota caps it.
* A ``<metadata>`` element (namespace :data:`METADATA_NS`) records the owning VirtualMachine
  (namespace, name, uid), the host, the launch's resourceVersion and the start time: what adoption
  after an agent restart reads.
* NICs are ``virtio`` interfaces in device order with the launch's MAC, the segment's MTU and the host-side tap
  named like every guest port of the agent (``vn<uid8><device>``, :func:`hostagent.vmspec.nic_port`), so
  security groups and the netns driver name ports the same way. How a tap reaches its segment depends on the
  virtual switch: :data:`INTERFACE_RENDERERS` maps ``Segment.vswitch`` to a renderer; the Linux bridge one is
  ``type='bridge'`` with the segment's bridge (libvirt plugs the tap; the agent ensured the bridge before the
  start). Open vSwitch's is ``type='ethernet'`` (libvirt makes the tap, the agent's network driver plugs it:
  :func:`openvswitch_interface`).
* ``on_poweroff``/``on_crash`` ``destroy``: domains are transient; a stopped guest leaves no domain behind.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import typing as t

from . import CPU_PERIOD_US, DiskDevice, DomainDescription, DomainOwner, HypervisorError, NetworkSource, NicDevice

METADATA_NS = "https://cumulo.io/xmlns/libvirt-domain/1"
METADATA_PREFIX = "cumulo"
VOLUME_ALIAS_PREFIX = "ua-cumulo-vol-"
CONFIG_DRIVE_ALIAS = "ua-cumulo-config-drive"
NIC_ALIAS_PREFIX = "ua-cumulo-nic-"

ET.register_namespace(METADATA_PREFIX, METADATA_NS)


def volume_alias(volume: str) -> str:
    return VOLUME_ALIAS_PREFIX + volume.replace(".", "_")


def volume_of_alias(alias: str | None) -> str | None:
    if alias and alias.startswith(VOLUME_ALIAS_PREFIX):
        return alias[len(VOLUME_ALIAS_PREFIX):].replace("_", ".")
    return None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {key.rstrip("_"): value for key, value in attributes.items()})
    if text is not None:
        element.text = text
    return element


def split_host(address: str) -> tuple[str, str | None]:
    """``host:port`` (or ``[v6]:port``, or a bare host) -> (host, port or None)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, port
    return address, None


def join_host(host: str, port: str | None) -> str:
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def source_element(element: ET.Element, disk: DiskDevice) -> None:
    """A file's ``<source file>``; an RBD image's ``<source protocol='rbd' name='pool/image'>`` with a ``<host>``
    per monitor and the ``<auth>`` naming the libvirt secret that holds the client's key."""
    network = disk.network
    if network is None:
        _sub(element, "source", file=disk.path)
        return
    source = _sub(element, "source", protocol=network.protocol, name=disk.path)
    for address in network.hosts:
        host, port = split_host(address)
        if port:
            _sub(source, "host", name=host, port=port)
        else:
            _sub(source, "host", name=host)
    auth = _sub(source, "auth", username=network.user)
    _sub(auth, "secret", type="ceph", uuid=network.secret_uuid)


def secret_xml(uuid: str, usage: str) -> str:
    """A persistent, private libvirt secret of usage ``ceph`` (its value is set separately)."""
    root = ET.Element("secret", {"ephemeral": "no", "private": "yes"})
    _sub(root, "uuid", uuid)
    usage_element = _sub(root, "usage", type="ceph")
    _sub(usage_element, "name", usage)
    return ET.tostring(root, encoding="unicode")


def disk_element(disk: DiskDevice) -> ET.Element:
    """The ``<disk>`` of a volume (also what hot-plug attaches): a file, or a network disk (RBD)."""
    element = ET.Element("disk", {"type": "network" if disk.network else "file", "device": disk.device})
    driver = _sub(element, "driver", name="qemu", type=disk.format)
    if disk.device == "disk" and not disk.read_only:
        driver.set("discard", "unmap")  # the guest's TRIM frees space in the qcow2 file / RBD image
    if disk.network is not None:
        driver.set("cache", "writeback")  # librbd's cache; flushes from the guest still reach Ceph
    source_element(element, disk)
    _sub(element, "target", dev=disk.target, bus=disk.bus)
    if disk.read_only:
        _sub(element, "readonly")
    _sub(element, "alias", name=volume_alias(disk.volume) if disk.volume else CONFIG_DRIVE_ALIAS)
    return element


def disk_xml(disk: DiskDevice) -> str:
    return ET.tostring(disk_element(disk), encoding="unicode")


def _interface_common(element: ET.Element, nic: NicDevice) -> ET.Element:
    _sub(element, "mac", address=nic.mac)
    _sub(element, "target", dev=nic.port)
    _sub(element, "model", type="virtio")
    _sub(element, "mtu", size=str(nic.mtu))
    if nic.rate_mbps:
        # libvirt shapes the tap with tc; its unit is KiB/s (CloudStack's networkrate is Mbit/s).
        kib = str(nic.rate_mbps * 1_000_000 // 8 // 1024)
        bandwidth = _sub(element, "bandwidth")
        _sub(bandwidth, "inbound", average=kib)
        _sub(bandwidth, "outbound", average=kib)
    _sub(element, "alias", name=f"{NIC_ALIAS_PREFIX}{nic.device_id}")
    return element


def linuxbridge_interface(nic: NicDevice) -> ET.Element:
    element = ET.Element("interface", {"type": "bridge"})
    _sub(element, "source", bridge=nic.segment.bridge)
    return _interface_common(element, nic)


def openvswitch_interface(nic: NicDevice) -> ET.Element:
    """``type='ethernet'``: libvirt makes the tap and plugs it nowhere; the agent's Open vSwitch driver has it on
    the segment (tag included) before and after the start (:data:`AGENT_PLUGGED`). Not libvirt's
    ``<virtualport type='openvswitch'/>``: libvirt would run ``ovs-vsctl`` against the default database, not the
    switch the agent was given (a simulated host's private one), and without the tag. The guest does its own
    checksums and segmentation (host offloads off): OVS's userspace datapath forwards frames as the tap hands
    them over, so partial checksums and 64 KiB GSO frames would reach the wire as they are."""
    element = ET.Element("interface", {"type": "ethernet"})
    _interface_common(element, nic)
    driver = _sub(element, "driver")
    _sub(driver, "host", csum="off", gso="off", tso4="off", tso6="off", ecn="off", ufo="off")
    return element


INTERFACE_RENDERERS: dict[str, t.Callable[[NicDevice], ET.Element]] = {"linuxbridge": linuxbridge_interface,
                                                                      "openvswitch": openvswitch_interface}
"""``Segment.vswitch`` -> the ``<interface>`` of a NIC on it; see the module docstring."""

AGENT_PLUGGED = frozenset({"openvswitch"})
"""Virtual switches whose taps libvirt leaves unplugged: the hypervisor driver plugs them (network driver)."""


def interface_element(nic: NicDevice) -> ET.Element:
    renderer = INTERFACE_RENDERERS.get(nic.segment.vswitch)
    if renderer is None:
        raise HypervisorError(f"NIC {nic.device_id}: libvirt guests cannot be plugged into a "
                              f"{nic.segment.vswitch!r} segment on this agent")
    return renderer(nic)


def render(description: DomainDescription, virt_type: str = "qemu") -> str:
    """The domain XML for ``virConnectCreateXML``."""
    d = description
    root = ET.Element("domain", {"type": virt_type})
    _sub(root, "name", d.name)
    _sub(root, "uuid", d.uuid)
    metadata = _sub(root, "metadata")
    owner = ET.SubElement(metadata, f"{{{METADATA_NS}}}instance")
    for field in ("namespace", "name", "uid", "host"):
        ET.SubElement(owner, f"{{{METADATA_NS}}}{field}").text = getattr(d.owner, field)
    ET.SubElement(owner, f"{{{METADATA_NS}}}launchVersion").text = d.owner.launch_version
    ET.SubElement(owner, f"{{{METADATA_NS}}}startedAt").text = d.owner.started_at
    _sub(root, "memory", str(d.memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(d.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(d.cpus), placement="static")
    cputune = _sub(root, "cputune")
    _sub(cputune, "shares", str(d.cpu_shares))
    if d.cpu_quota_us is not None:
        _sub(cputune, "period", str(CPU_PERIOD_US))
        _sub(cputune, "quota", str(d.cpu_quota_us))
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=d.machine)
    if d.kernel:
        _sub(os_, "kernel", d.kernel)
        if d.initrd:
            _sub(os_, "initrd", d.initrd)
        _sub(os_, "cmdline", d.cmdline or "")
    else:
        _sub(os_, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if virt_type == "kvm":
        _sub(root, "cpu", mode="host-passthrough", check="none")
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    if d.machine == "q35":
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
    for disk in d.disks:
        devices.append(disk_element(disk))
    if d.config_drive:
        bus = "scsi" if d.machine == "q35" else "ide"
        if bus == "scsi":
            _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
        devices.append(disk_element(DiskDevice(volume="", path=d.config_drive, target="sda" if bus == "scsi" else "hdc",
                                               format="raw", bus=bus, device="cdrom", read_only=True)))
    for nic in d.nics:
        devices.append(interface_element(nic))
    if d.machine == "q35":
        for _ in range(d.spare_pcie_ports):
            _sub(devices, "controller", type="pci", model="pcie-root-port")
    _sub(devices, "controller", type="usb", model="none")
    if d.console_log:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=d.console_log, append="on")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="file")
        _sub(console, "source", path=d.console_log, append="on")
        _sub(console, "target", type="serial", port="0")
    else:
        serial = _sub(devices, "serial", type="null")
        _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


# --------------------------------------------------------------------------------------------
# Reading a domain's XML back


def parse_owner(root: ET.Element) -> DomainOwner | None:
    instance = root.find(f"metadata/{{{METADATA_NS}}}instance")
    if instance is None:
        return None

    def text(field: str) -> str:
        return (instance.findtext(f"{{{METADATA_NS}}}{field}") or "").strip()

    if not text("uid") or not text("name") or not text("namespace"):
        return None
    return DomainOwner(namespace=text("namespace"), name=text("name"), uid=text("uid"), host=text("host"),
                       launch_version=text("launchVersion"), started_at=text("startedAt"))


def parse_disks(root: ET.Element) -> tuple[DiskDevice, ...]:
    """The file-backed and network (RBD) disks and CDs of the domain, in XML order. ``volume`` is the Volume name of a Cumulo
    volume disk, "" for anything else (the config drive, a disk someone added by hand)."""
    disks = []
    for element in root.findall("devices/disk"):
        source = element.find("source")
        target = element.find("target")
        if source is None or target is None or not (source.get("file") or source.get("name")):
            continue
        driver = element.find("driver")
        alias = element.find("alias")
        network = None
        if element.get("type") == "network":
            secret = source.find("auth/secret")
            if secret is None:
                secret = element.find("auth/secret")
            auth = source.find("auth")
            if auth is None:
                auth = element.find("auth")
            network = NetworkSource(
                hosts=tuple(join_host(str(h.get("name", "")), h.get("port")) for h in source.findall("host")),
                user=auth.get("username", "") if auth is not None else "",
                secret_uuid=secret.get("uuid", "") if secret is not None else "",
                protocol=source.get("protocol", "rbd"))
        disks.append(DiskDevice(
            volume=volume_of_alias(alias.get("name") if alias is not None else None) or "",
            path=source.get("file") or source.get("name", ""), target=target.get("dev", ""), bus=target.get("bus", ""),
            format=driver.get("type", "raw") if driver is not None else "raw",
            device=element.get("device", "disk"), read_only=element.find("readonly") is not None, network=network))
    return tuple(disks)


def parse_console(root: ET.Element) -> str | None:
    source = root.find("devices/serial[@type='file']/source")
    return source.get("path") if source is not None else None


def parse(xml: str) -> tuple[DomainOwner | None, tuple[DiskDevice, ...], str | None]:
    """(owner, disks, console log path) of a domain XML."""
    root = ET.fromstring(xml)
    return parse_owner(root), parse_disks(root), parse_console(root)


# --------------------------------------------------------------------------------------------
# Live migration


def migration_xml(xml: str, *, host: str, disks: t.Mapping[str, str], console_log: str | None,
                  config_drive: str | None) -> str:
    """The destination XML of a live migration, from the source domain's migratable XML: the owner's host
    becomes the target (so the target's agent adopts it as its own), the moved disks point at their copies
    (``disks``: source path -> target path; the copy is a whole image, so the source's backing chain goes), and
    the console log and config drive at the files the target's agent prepared."""
    root = ET.fromstring(xml)
    instance = root.find(f"metadata/{{{METADATA_NS}}}instance")
    if instance is not None:
        element = instance.find(f"{{{METADATA_NS}}}host")
        if element is None:
            element = ET.SubElement(instance, f"{{{METADATA_NS}}}host")
        element.text = host
    for element in root.findall("devices/disk"):
        source = element.find("source")
        if source is None or not source.get("file"):
            continue
        alias = element.find("alias")
        if alias is not None and alias.get("name") == CONFIG_DRIVE_ALIAS or element.get("device") == "cdrom":
            if config_drive:
                source.set("file", config_drive)
            continue
        target = disks.get(source.get("file", ""))
        if target is not None:
            source.set("file", target)
            for backing in element.findall("backingStore"):
                element.remove(backing)
    if console_log:
        for tag in ("serial", "console"):
            for element in root.findall(f"devices/{tag}[@type='file']/source"):
                element.set("path", console_log)
    return ET.tostring(root, encoding="unicode")
