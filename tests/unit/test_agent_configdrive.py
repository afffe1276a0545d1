"""The NoCloud config drive (hostagent.configdrive), read back with pycdlib."""

from __future__ import annotations

import io
import os
import stat

import pycdlib
import yaml

from hostagent import configdrive


def read_names(image: bytes) -> tuple[str, list[str], list[str]]:
    """(volume label, Joliet names, ISO 9660 names) of the image's root."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        joliet = sorted(child.file_identifier().decode("utf-16-be") for child in iso.list_children(joliet_path="/")
                        if not child.is_dot() and not child.is_dotdot())
        plain = sorted(child.file_identifier().decode() for child in iso.list_children(iso_path="/")
                       if not child.is_dot() and not child.is_dotdot())
        return label, joliet, plain
    finally:
        iso.close()


def test_config_drive_contents(tmp_path):
    path = tmp_path / "config-drive.iso"
    user_data = "#cloud-config\nruncmd:\n  - echo hi\n"
    keys = ["ssh-ed25519 AAAA key1 a@b", "ssh-rsa BBBB key2 c@d\n"]
    configdrive.write_config_drive(str(path), instance_id="uid-1", hostname="web", user_data=user_data,
                                   public_keys=keys)
    image = path.read_bytes()
    assert image[32769:32774] == b"CD001"  # ISO 9660, what the guest probes for
    label, joliet, plain = read_names(image)
    assert label == "cidata"
    assert joliet == ["meta-data", "user-data"]
    assert plain == ["METADATA.;1", "USERDATA.;1"]
    files = configdrive.read_iso_files(image)  # by Rock Ridge names
    assert files["user-data"].decode() == user_data
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "uid-1", "local-hostname": "web",
                    "public-keys": ["ssh-ed25519 AAAA key1 a@b", "ssh-rsa BBBB key2 c@d"]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # user data may hold secrets
    assert [p.name for p in tmp_path.iterdir()] == ["config-drive.iso"]  # no temporary file left


def test_meta_data_lines_are_plain_key_value_for_simple_parsers():
    text = configdrive.meta_data("0a1b-2c", "host-1").decode()
    assert text.splitlines() == ["instance-id: 0a1b-2c", "local-hostname: host-1"]


def test_no_user_data_is_an_empty_file(tmp_path):
    path = tmp_path / "cd.iso"
    configdrive.write_config_drive(str(path), instance_id="i", hostname="h", user_data=None)
    assert configdrive.read_iso_files(path.read_bytes())["user-data"] == b""


def test_rewriting_replaces_the_drive(tmp_path):
    path = tmp_path / "cd.iso"
    configdrive.write_config_drive(str(path), instance_id="i", hostname="one", user_data="a")
    configdrive.write_config_drive(str(path), instance_id="i", hostname="two", user_data="b")
    files = configdrive.read_iso_files(path.read_bytes())
    assert files["user-data"] == b"b" and b"local-hostname: two" in files["meta-data"]
