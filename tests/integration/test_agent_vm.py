"""Virtual machines end to end on real libvirt: the controller, a real agent subprocess driving a private libvirtd
(QEMU/TCG) and the tiny test guest (cumulo.guestimage), through the whole stack.

One zone per test: Zone, HostPod, KVM Cluster, a Host bound to the agent, a Host-scoped Filesystem pool and an
ImageStore under tmp_path, a 1 vCPU / 128 MiB local ServiceOffering. At most two guests run at once (2 cores, TCG).
Figures (template download, create→Running, create→boot marker) are printed and recorded as test properties.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

pytest.register_assert_rewrite("conftest_libvirt")
from conftest_libvirt import audit_writes, unique, wait_for  # noqa: E402
from libvirtcloud import (  # noqa: E402
    Console,
    build_zone,
    condition,
    libvirt_domain,
    line,
    template_spec,
    vm_phase,
    wait_phase,
)

from cumulo import guestimage  # noqa: E402

pytest_plugins = ["conftest_libvirt"]
pytestmark = [pytest.mark.usefixtures("controller", "system_namespace"), pytest.mark.timeout(300)]

GIB = 1024**3


@pytest.fixture
def controller_log(controller, request):
    """The controller's log lines about this test's namespaces go into the report (shown when it fails)."""
    start = len(controller.log())
    namespaces: list[str] = []
    yield namespaces
    lines = [entry for entry in controller.log()[start:].splitlines()
             if any(namespace in entry for namespace in namespaces) and "urllib3" not in entry]
    request.node.add_report_section("teardown", "controller log (this test's namespaces)", "\n".join(lines[-150:]))


def start_foreign_domain(uri: str, tmp_path: Path, namespace: str, name: str, host: str) -> str:
    """A Cumulo-looking domain started behind the agent's back (no disks: it idles in the firmware)."""
    import datetime
    import uuid

    import libvirt

    from hostagent.drivers.hypervisor import DomainDescription, DomainOwner, domainxml

    uid = str(uuid.uuid4())
    owner = DomainOwner(namespace=namespace, name=name, uid=uid, host=host,
                        started_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    description = DomainDescription(uuid=uid, name=f"{namespace}_{name}", owner=owner, cpus=1, memory_mib=32,
                                    cpu_shares=100, console_log=str(tmp_path / f"{name}.log"))
    connection = libvirt.open(uri)
    try:
        connection.createXML(domainxml.render(description), 0)
    finally:
        connection.close()
    return uid


def destroy_domain(uri: str, uuid: str) -> None:
    import libvirt

    connection = libvirt.open(uri)
    try:
        connection.lookupByUUIDString(uuid).destroy()
    finally:
        connection.close()


def test_template_vm_volume_lifecycle_and_agent_restart(
        cloud, kube, control_plane, agents, libvirtd, guest, tmp_path, record_property, controller_log) -> None:
    zone, agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    controller_log.append(zone.objects.namespace)
    objects = zone.objects
    figures: dict[str, float] = {}

    # -- Template: downloaded, checksummed, format detected ------------------------------------------
    started = time.monotonic()
    objects.create("templates", "Template", "tiny", template_spec(guest, zone.name))
    template = wait_for(lambda: (t := objects.get("templates", "tiny")) and (t.get("status") or {}).get("state") == "Ready" and t,
                        timeout=60, interval=0.2, what="template Ready")
    figures["template_download_s"] = time.monotonic() - started
    status = template["status"]
    assert status["detectedFormat"] == "QCOW2"
    assert status["checksum"] == f"sha256:{guest.disk_sha256}"
    assert status["virtualSizeBytes"] == guest.disk_virtual_size
    assert status["physicalSizeBytes"] == guest.disk.stat().st_size
    assert status["download"]["state"] == "Ready" and status["download"]["host"] == zone.host
    copy = Path(status["zones"][0]["path"])
    assert copy.is_file() and zone.store_path in copy.parents
    assert Path(f"{copy}.kernel").read_bytes() == guest.kernel.read_bytes()
    assert Path(f"{copy}.initrd").read_bytes() == guest.initrd.read_bytes()
    assert not Path(f"{copy}.partial").exists()
    # Unbound once Ready (the label goes in the step after the status write).
    wait_for(lambda: "cumulo.io/host" not in (objects.get("templates", "tiny")["metadata"].get("labels") or {}),
             timeout=10, what="the template unbound from its download host")

    # -- Two guests: user data from a Secret, and inline with SSH keys (booted in parallel) ------------
    user_data = "#cloud-config\nruncmd:\n  - echo hello from cumulo\n"
    secret_data = "#cloud-config\nchpasswd:\n  list: |\n    root:from-a-secret-4f1c\n"
    client.CoreV1Api(kube).create_namespaced_secret(objects.namespace, {
        "metadata": {"name": "vm1-userdata"}, "stringData": {"userdata": secret_data}})
    started = time.monotonic()
    objects.create("virtualmachines", "VirtualMachine", "vm1", {
        "serviceOffering": zone.offering, "template": {"name": "tiny"}, "zone": zone.name,
        "userDataSecretRef": {"name": "vm1-userdata"}})
    objects.create("virtualmachines", "VirtualMachine", "vm2", {
        "serviceOffering": zone.offering, "template": {"name": "tiny"}, "zone": zone.name, "hostname": "second",
        "userData": user_data, "sshPublicKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@cumulo"],
        "expungeDelaySeconds": 5})
    vm1 = wait_phase(zone, "vm1", "Running", timeout=90)
    figures["create_to_running_s"] = time.monotonic() - started
    node = vm1["node"]
    uid1 = objects.get("virtualmachines", "vm1")["metadata"]["uid"]
    assert node["host"] == zone.host and node["domainState"] == "running" and node["message"] == ""
    assert node["domainUuid"] == uid1 and node["startedAt"]
    assert node["disks"] == ["vm1-root"]
    assert node["consoleLog"] == str(zone.state_dir / "vms" / uid1 / "console.log")
    control_plane.kubectl("wait", "--for=condition=Ready", f"virtualmachine/vm1", "-n", objects.namespace,
                          "--timeout=30s")
    console1 = Console(node["consoleLog"])
    console1.wait(line(guestimage.BOOT_MARKER))
    figures["create_to_boot_marker_s"] = time.monotonic() - started
    console1.wait(line(f"{guestimage.BOOT_COUNT_PREFIX}1"), 10)
    console1.wait(line(f"{guestimage.INSTANCE_ID_PREFIX}{uid1}"), 10)
    console1.wait(line(f"{guestimage.LOCAL_HOSTNAME_PREFIX}vm1"), 10)
    # The Secret's content reached the guest through the config drive (0600), and no object holds it.
    console1.wait(line(f"{guestimage.USERDATA_SHA256_PREFIX}{hashlib.sha256(secret_data.encode()).hexdigest()}"), 10)
    assert (zone.state_dir / "vms" / uid1 / "config-drive.iso").stat().st_mode & 0o777 == 0o600
    assert "from-a-secret" not in control_plane.kubectl("get", "vm", "-n", objects.namespace, "-o", "json").stdout

    # Steady state: nothing changes, nothing is written (the agent polls its domains every 10 s).
    since = time.time()
    time.sleep(3)
    writes = audit_writes(control_plane, agent.user, since, time.time())
    assert not {key: count for key, count in writes.items() if key != "leases"}, writes

    # The root volume: an overlay of the pool's cached base image, on the pool.
    root = objects.get("volumes", "vm1-root")
    assert root["status"]["phase"] == "Attached" and root["status"]["node"]["exists"] is True
    root_path = Path(root["status"]["path"])
    assert root_path.is_file() and root_path.parent == zone.pool_path
    base = Path(root["status"]["baseImage"]["path"])
    assert base.is_file() and base.read_bytes() == guest.disk.read_bytes()

    # `cumulo console` prints the log.
    kubeconfig = str(control_plane.admin_kubeconfig)
    printed = subprocess.run([str(Path(sys.executable).with_name("cumulo")), "console", f"{objects.namespace}/vm1",
                              "--kubeconfig", kubeconfig], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    assert guestimage.BOOT_MARKER in printed.stdout

    # vm2: user data, instance id and host name from the config drive.
    vm2 = wait_phase(zone, "vm2", "Running", timeout=60)
    uid2 = objects.get("virtualmachines", "vm2")["metadata"]["uid"]
    console2 = Console(vm2["node"]["consoleLog"])
    console2.wait(line(f"{guestimage.USERDATA_SHA256_PREFIX}{hashlib.sha256(user_data.encode()).hexdigest()}"))
    console2.wait(line(f"{guestimage.INSTANCE_ID_PREFIX}{uid2}"), 10)
    console2.wait(line(f"{guestimage.LOCAL_HOSTNAME_PREFIX}second"), 10)
    console2.wait(line(guestimage.READY_MARKER), 30)

    # vm2 destroyed with a short expunge delay: Destroyed, then gone with its root disk and its domain.
    root2 = Path(objects.status("volumes", "vm2-root")["path"])
    objects.patch("virtualmachines", "vm2", {"spec": {"state": "Destroyed"}})
    wait_phase(zone, "vm2", "Destroyed", timeout=60)
    assert libvirt_domain(libvirtd.uri, uid2) is None
    wait_for(lambda: objects.get("virtualmachines", "vm2") is None, timeout=30, what="vm2 expunged")
    wait_for(lambda: objects.get("volumes", "vm2-root") is None, timeout=30, what="vm2's root volume gone")
    assert not root2.exists()
    assert base.exists()  # the shared base image stays

    # -- A data volume: hot-attach, live resize, detach ------------------------------------------------
    disks = console1.wait(r"^CUMULO disks vda=\d+ sr0=\d+\r?$", 30)
    vda = re.search(r"vda=(\d+)", disks.group(0)).group(1)
    disk_offering = unique("data")
    cloud.create("diskofferings", disk_offering, {"customized": True, "storageType": "local"})
    started = time.monotonic()
    objects.create("volumes", "Volume", "data1", {"diskOffering": disk_offering, "sizeGiB": 1, "zone": zone.name,
                                                   "virtualMachine": {"name": "vm1"}})
    attached = console1.wait(rf"^CUMULO disks vda={vda} vdb={GIB // 512} sr0=\d+\r?$", 60, after=disks.end())
    figures["volume_create_to_guest_sees_vdb_s"] = time.monotonic() - started
    wait_for(lambda: objects.status("virtualmachines", "vm1")["node"]["disks"] == ["data1", "vm1-root"],
             timeout=20, what="data1 reported attached")
    wait_for(lambda: objects.status("volumes", "data1").get("phase") == "Attached", timeout=20,
             what="data1 Attached")
    data_status = objects.status("volumes", "data1")
    assert data_status["node"]["sizeBytes"] == GIB and data_status["storagePool"] == zone.pool

    objects.patch("volumes", "data1", {"spec": {"sizeGiB": 2}})
    resized = console1.wait(rf"^CUMULO disks vda={vda} vdb={2 * GIB // 512} sr0=\d+\r?$", 60, after=attached.end())
    wait_for(lambda: objects.status("volumes", "data1")["node"]["sizeBytes"] == 2 * GIB, timeout=20,
             what="data1 reported 2 GiB")

    objects.patch("volumes", "data1", {"spec": {"virtualMachine": None}})
    console1.wait(rf"^CUMULO disks vda={vda} sr0=\d+\r?$", 60, after=resized.end())
    wait_for(lambda: objects.status("virtualmachines", "vm1")["node"]["disks"] == ["vm1-root"], timeout=20,
             what="data1 reported detached")
    wait_for(lambda: objects.status("volumes", "data1").get("phase") == "Ready", timeout=20, what="data1 Ready")
    data_path = Path(objects.status("volumes", "data1")["path"])
    objects.delete("volumes", "data1")
    wait_for(lambda: objects.get("volumes", "data1") is None, timeout=30, what="data1 deleted")
    assert not data_path.exists()

    # -- The agent is killed while the guest runs; a new one adopts the domain ------------------------
    before = libvirt_domain(libvirtd.uri, uid1)
    assert before is not None
    agent.kill()
    # While it is down: a domain of a VirtualMachine that does not exist (deleted meanwhile), and one of another
    # host's agent sharing this libvirtd. The first must go (after a GET confirms), the second must stay.
    ghost = start_foreign_domain(libvirtd.uri, tmp_path, objects.namespace, "ghost", zone.host)
    neighbour = start_foreign_domain(libvirtd.uri, tmp_path, objects.namespace, "neighbour", "another-host")
    started = time.monotonic()
    agent2 = agents.start(zone.host + "-again", *zone.agent_args)
    wait_for(lambda: "adopted running domain" in agent2.log(), timeout=30, what="the new agent adopting the domain")
    figures["agent_start_to_adoption_s"] = time.monotonic() - started
    wait_for(lambda: libvirt_domain(libvirtd.uri, ghost) is None, timeout=30, what="the orphaned domain destroyed")
    assert libvirt_domain(libvirtd.uri, neighbour) is not None
    destroy_domain(libvirtd.uri, neighbour)
    time.sleep(2)  # a few reconcile and sweep rounds
    after = libvirt_domain(libvirtd.uri, uid1)
    assert after is not None and after[0] == before[0], "the domain was restarted"
    assert after[1] > before[1], "the guest stopped running"
    assert console1.count(guestimage.BOOT_MARKER) == 1
    assert vm_phase(zone, "vm1") == "Running"
    assert objects.status("virtualmachines", "vm1")["node"]["startedAt"] == node["startedAt"]

    # -- Stop (ACPI) and start again: root-disk writes survive -----------------------------------------
    console1.wait(line(guestimage.READY_MARKER), 30)
    started = time.monotonic()
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Stopped"}})
    wait_phase(zone, "vm1", "Stopped", timeout=60)
    figures["acpi_stop_to_stopped_s"] = time.monotonic() - started
    assert libvirt_domain(libvirtd.uri, uid1) is None
    assert objects.status("virtualmachines", "vm1")["node"]["domainState"] == "shutoff"
    assert guestimage.POWEROFF_MARKER in console1.text()  # a clean ACPI power-off, not a hard stop
    offset = len(console1.text())
    followed = tmp_path / "console-follow.txt"
    with followed.open("wb") as out:  # `cumulo console -f` follows the next boot as it happens
        follower = subprocess.Popen([str(Path(sys.executable).with_name("cumulo")), "console", "-f",
                                     f"{objects.namespace}/vm1", "--kubeconfig", kubeconfig], stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        objects.patch("virtualmachines", "vm1", {"spec": {"state": "Running"}})
        wait_phase(zone, "vm1", "Running", timeout=60)
        console1.wait(line(f"{guestimage.BOOT_COUNT_PREFIX}2"), after=offset)
        wait_for(lambda: f"{guestimage.BOOT_COUNT_PREFIX}2" in followed.read_text(errors="replace"), timeout=10,
                 what="`cumulo console -f` printing the second boot")
    finally:
        follower.terminate()
        follower.wait(10)

    # -- Destroy and expunge -----------------------------------------------------------------------
    objects.patch("virtualmachines", "vm1", {"spec": {"state": "Destroyed", "expungeDelaySeconds": 1}})
    wait_for(lambda: objects.get("virtualmachines", "vm1") is None, timeout=90, what="vm1 expunged")
    wait_for(lambda: not root_path.exists(), timeout=20, what="vm1's root disk removed")
    assert libvirt_domain(libvirtd.uri, uid1) is None

    # -- The template goes: its agent removes the copy's files -------------------------------------
    objects.delete("templates", "tiny")
    wait_for(lambda: objects.get("templates", "tiny") is None, timeout=30, what="template deleted")
    assert not copy.exists() and not Path(f"{copy}.kernel").exists() and not Path(f"{copy}.initrd").exists()

    for key, value in figures.items():
        record_property(key, round(value, 2))
    print("figures:", {key: round(value, 2) for key, value in figures.items()})


def test_template_formats_checksums_and_refusals(cloud, kube, control_plane, agents, libvirtd, guest, tmp_path,
                                                 controller_log) -> None:
    """What the agent finds in images, not what they are declared: checksum mismatches, a qcow2 with a backing file
    (refused), a declared RAW that is QCOW2 (the controller compares), an ISO told apart from raw."""
    import pycdlib

    zone, _agent = build_zone(cloud, kube, control_plane, agents, libvirtd, tmp_path)
    controller_log.append(zone.objects.namespace)
    objects = zone.objects
    images = tmp_path / "images"
    images.mkdir()
    evil = images / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(guest.disk), str(evil)],
                   check=True)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="TOOLS")
    iso.add_fp(__import__("io").BytesIO(b"hello"), 5, "/README.;1")
    iso.write(str(images / "tools.iso"))
    iso.close()
    wrong = "0" * 64
    started = time.monotonic()
    objects.create("templates", "Template", "bad-sum", template_spec(guest, zone.name, checksum=f"sha256:{wrong}"))
    objects.create("templates", "Template", "backing", {"url": evil.as_uri(), "format": "QCOW2", "zone": zone.name})
    objects.create("templates", "Template", "declared-raw", {"url": guest.disk.as_uri(), "format": "RAW",
                                                              "zone": zone.name})
    objects.create("templates", "Template", "iso", {"url": (images / "tools.iso").as_uri(), "format": "ISO",
                                                     "zone": zone.name, "checksum": "md5:" + __import__(
                                                         "hashlib").md5((images / "tools.iso").read_bytes()).hexdigest()})

    def settled(name: str) -> dict[str, Any] | None:
        status = objects.status("templates", name)
        return status if status.get("state") in ("Ready", "Error") else None

    bad = wait_for(lambda: settled("bad-sum"), timeout=60, what="bad-sum settled")
    assert bad["state"] == "Error"
    assert condition(objects.get("templates", "bad-sum"), "Ready")["message"] == (
        f"zone {zone.name}: checksum mismatch for the image: expected sha256:{wrong}, got sha256:{guest.disk_sha256}")
    backing = wait_for(lambda: settled("backing"), timeout=60, what="backing settled")
    assert backing["state"] == "Error" and backing["download"]["detectedFormat"] == "QCOW2"
    assert backing["download"]["message"].startswith(f"refused: the qcow2 image has a backing file ({guest.disk})")
    raw = wait_for(lambda: settled("declared-raw"), timeout=60, what="declared-raw settled")
    assert raw["state"] == "Error" and raw["download"]["detectedFormat"] == "QCOW2"
    assert raw["zones"][0]["message"] == raw["download"]["message"] == "declared RAW but the image is QCOW2"
    iso_status = wait_for(lambda: settled("iso"), timeout=60, what="iso settled")
    assert iso_status["state"] == "Ready" and iso_status["detectedFormat"] == "ISO"
    assert iso_status["checksum"].startswith("md5:")
    assert iso_status["virtualSizeBytes"] == (images / "tools.iso").stat().st_size
    print(f"four templates settled in {time.monotonic() - started:.1f}s")
    # Nothing half-made is left in the store: only the ISO's copy.
    stored = sorted(p.name for p in (zone.store_path / "templates" / objects.namespace).iterdir())
    assert len(stored) == 1 and stored[0].startswith("iso-") and stored[0].endswith(".iso"), stored
