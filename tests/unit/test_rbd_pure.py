"""Pure parts of the RBD driver: names, QEMU's rbd filename, Ceph's df figures."""

from __future__ import annotations

from hostagent.drivers.storage.rbd import (
    RbdAccess,
    ceph_conf_text,
    is_template_image,
    keyring_text,
    pool_usage,
    qemu_uri,
    rados_conf,
    split_snapshot,
)

ACCESS = RbdAccess(monitors=("10.0.0.1:6789", "10.0.0.2:6789"), pool="cloud", user="cumulo", key="AQAsecret==")


def test_split_snapshot_defaults_to_the_template_snapshot() -> None:
    assert split_snapshot("template-abc@base") == ("template-abc", "base")
    assert split_snapshot("template-abc") == ("template-abc", "base")
    assert split_snapshot("img@snap-1") == ("img", "snap-1")


def test_qemu_uri_escapes_and_keeps_the_key_off_the_command_line() -> None:
    uri = qemu_uri(ACCESS, "volume-1", "/run/x:y/ceph.conf")
    assert uri == r"rbd:cloud/volume-1:id=cumulo:conf=/run/x\:y/ceph.conf"
    assert "AQAsecret" not in uri
    assert "mon host = 10.0.0.1:6789,10.0.0.2:6789" in ceph_conf_text(ACCESS, "/k")
    assert keyring_text(ACCESS) == "[client.cumulo]\n\tkey = AQAsecret==\n"
    assert rados_conf(ACCESS)["mon_host"] == "10.0.0.1:6789,10.0.0.2:6789"
    assert "AQAsecret" not in repr(ACCESS)


def test_pool_usage_is_what_the_pool_holds_plus_what_it_can_still_take() -> None:
    df = {"pools": [{"name": "other", "stats": {"bytes_used": 5, "max_avail": 10}},
                    {"name": "cloud", "stats": {"stored": 90, "bytes_used": 100, "max_avail": 900}}]}
    assert pool_usage(df, "cloud") == (1000, 100)
    assert pool_usage(df, "missing") is None
    assert pool_usage({}, "cloud") is None


def test_an_rbd_launch_disk_becomes_a_network_disk_with_a_stable_secret() -> None:
    from controllers.api.v1alpha1.virtualmachine import LaunchDisk
    from hostagent import vmspec

    disk = LaunchDisk.model_validate({
        "volume": "vm-root", "device": "vda", "pool": "p1", "poolType": "RBD", "path": "cloud/volume-u1",
        "format": "raw", "sizeBytes": 1, "rbd": {"monitors": ["10.0.0.2:6789", "10.0.0.1:6789"], "pool": "cloud",
                                                  "user": "cumulo", "secretRef": {"namespace": "s", "name": "n",
                                                                                  "key": "k"}}})
    device = vmspec.disk_device(disk, "vda")
    assert device.path == "cloud/volume-u1" and device.format == "raw"
    assert device.network is not None and device.network.hosts == ("10.0.0.2:6789", "10.0.0.1:6789")
    assert device.network.user == "cumulo"
    # One secret per cluster and client, whatever the monitors' order: every host and restart names the same.
    assert device.network.secret_uuid == vmspec.libvirt_secret_uuid(["10.0.0.1:6789", "10.0.0.2:6789"], "cumulo")
    assert device.network.secret_uuid != vmspec.libvirt_secret_uuid(["10.0.0.1:6789"], "cumulo")
    plain = vmspec.disk_device(disk.model_copy(update={"rbd": None, "path": "/p/d.qcow2"}), "vda")
    assert plain.network is None


def test_only_template_images_go_with_their_last_clone() -> None:
    assert is_template_image("template-u1", "base")
    assert not is_template_image("template-u1", "snap-1")
    assert not is_template_image("volume-u1", "base")  # a clone of a volume's snapshot leaves the volume alone
    assert not is_template_image("template-u1.importing-h1", "base")
