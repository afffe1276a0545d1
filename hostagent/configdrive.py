"""The cloud-init NoCloud config drive of a guest: an ISO 9660 image labelled ``cidata`` holding ``user-data``
and ``meta-data`` (with Rock Ridge and Joliet names, so every guest kernel sees the dashed names), made with
pycdlib.

``meta-data`` is YAML: ``instance-id`` (the VirtualMachine's uid: stable across restarts, so cloud-init runs
its once-per-instance modules once), ``local-hostname`` and ``public-keys``. ``user-data`` is the launch's
user data as given, or the bytes of its Secret's key (gzip user data included); empty when there is none: NoCloud
wants the file.
"""

from __future__ import annotations

import io
import os
import typing as t

import pycdlib
import yaml

VOLUME_LABEL = "cidata"


def meta_data(instance_id: str, hostname: str, public_keys: t.Sequence[str] = ()) -> bytes:
    data: dict[str, t.Any] = {"instance-id": instance_id, "local-hostname": hostname}
    if public_keys:
        data["public-keys"] = [key.strip() for key in public_keys]
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False).encode()


def _iso_name(name: str) -> str:
    """An ISO 9660 level-1 name for the plain (non-Rock-Ridge) directory: ``user-data`` → ``/USERDATA.;1``."""
    return "/" + "".join(c for c in name.upper() if c.isalnum())[:8] + ".;1"


def build_iso(files: t.Mapping[str, bytes]) -> bytes:
    """An ISO 9660 image labelled ``cidata`` with ``files`` (name → content) in its root."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    try:
        for name, content in files.items():
            iso.add_fp(io.BytesIO(content), len(content), _iso_name(name), rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def nocloud_files(*, instance_id: str, hostname: str, user_data: str | bytes | None,
                  public_keys: t.Sequence[str] = ()) -> dict[str, bytes]:
    content = user_data.encode() if isinstance(user_data, str) else user_data or b""
    return {"user-data": content, "meta-data": meta_data(instance_id, hostname, public_keys)}


def write_config_drive(path: str, *, instance_id: str, hostname: str, user_data: str | bytes | None,
                       public_keys: t.Sequence[str] = ()) -> None:
    """Write the guest's config drive to ``path`` (atomically; mode 0600: user data may hold secrets)."""
    image = build_iso(nocloud_files(instance_id=instance_id, hostname=hostname, user_data=user_data,
                                    public_keys=public_keys))
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(image)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def read_iso_files(image: bytes) -> dict[str, bytes]:
    """The files of a config drive by their Rock Ridge names (for tests and debugging)."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
        return files
    finally:
        iso.close()
