"""A real single-node Ceph for the RBD tests (a pytest plugin: ``pytest_plugins = ["conftest_ceph"]``).

* ``ceph_cluster`` (session): one private cluster (cumulo.ceph: mon + mgr + memstore OSD on 127.0.0.1), skipped
  with the precise reason where it cannot run (packages missing), stopped at the end of the session.
* ``ceph_pool``: a Ceph pool of the test's own and a client allowed RBD on it only; both removed afterwards.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from cumulo.ceph import CephUnavailable, PrivateCeph, unavailable_reason


@dataclasses.dataclass(frozen=True)
class CephPool:
    cluster: PrivateCeph
    name: str
    user: str
    key: str

    @property
    def monitor(self) -> str:
        return self.cluster.monitor


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[PrivateCeph]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason=f"no private Ceph: {reason}")
    cluster = PrivateCeph()
    try:
        cluster.start()
    except CephUnavailable as error:
        pytest.skip(reason=f"the private Ceph did not start: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ceph_pool(ceph_cluster: PrivateCeph) -> Iterator[CephPool]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(name)
    key = ceph_cluster.create_user(name, name)
    ceph_cluster.wait_clean()
    yield CephPool(ceph_cluster, name, name, key)
    ceph_cluster.delete_pool(name)
    ceph_cluster.run("ceph", "auth", "del", f"client.{name}")
