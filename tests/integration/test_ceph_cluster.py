"""The private Ceph of the RBD tests: it runs, a test's pool takes RBD images through the Python bindings and
QEMU, and its user is confined to that pool."""

from __future__ import annotations

import subprocess

import pytest

pytest.register_assert_rewrite("conftest_ceph")
from conftest_ceph import CephPool  # noqa: E402

pytest_plugins = ["conftest_ceph"]


def test_private_ceph_serves_rbd_to_bindings_and_qemu(ceph_pool: CephPool, tmp_path) -> None:
    import rados
    import rbd

    cluster = ceph_pool.cluster
    assert cluster.startup_seconds is not None and cluster.startup_seconds < 60
    status = cluster.ceph_json("status")
    assert status["health"]["status"] == "HEALTH_OK"
    conn = rados.Rados(rados_id=ceph_pool.user, conf={"mon_host": ceph_pool.monitor, "key": ceph_pool.key})
    conn.connect(timeout=10)
    try:
        with conn.open_ioctx(ceph_pool.name) as ioctx:
            rbd.RBD().create(ioctx, "disk", 64 * 1024**2)
            with rbd.Image(ioctx, "disk") as image:
                image.write(b"cumulo", 0)
                assert image.size() == 64 * 1024**2
        with pytest.raises(rados.Error):  # confined to its own pool
            conn.open_ioctx("device_health_metrics").write_full("x", b"y")
    finally:
        conn.shutdown()
    # QEMU's rbd driver reads the same image (qemu-block-extra).
    monitor = ceph_pool.monitor.replace(":", r"\:")
    spec = f"rbd:{ceph_pool.name}/disk:id={ceph_pool.user}:key={ceph_pool.key}:mon_host={monitor}"
    out = subprocess.run(["qemu-img", "info", "--output", "json", spec], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"virtual-size": 67108864' in out.stdout
