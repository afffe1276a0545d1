"""The agent's RBD pools (hostagent.rbdpools): the key from the pool's Secret, one driver per pool while its
access stays the same, clear messages for a Secret that cannot be used."""

from __future__ import annotations

import asyncio
import base64

import pytest

from hostagent import rbdpools
from hostagent.drivers.storage import StorageError
from hostagent.kube import KubeError

RBD = {"monitors": ["10.0.0.1:6789"], "pool": "cloud", "user": "cumulo",
       "secretRef": {"namespace": "cumulo-system", "name": "ceph", "key": "key"}}


class FakeApi:
    def __init__(self, secrets: dict[str, dict]) -> None:
        self.secrets = secrets
        self.gets = 0

    async def request(self, method: str, path: str, **_: object) -> dict:
        self.gets += 1
        name = path.rsplit("/", 1)[1]
        if name not in self.secrets:
            raise KubeError(404, "NotFound", f"secrets {name!r} not found")
        return self.secrets[name]


def encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_one_driver_per_pool_until_its_key_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi({"ceph": {"data": {"key": encoded("AQAone==\n")}}})
    pools = rbdpools.RbdPools(api, "h1")  # type: ignore[arg-type]

    async def scenario() -> None:
        first = await pools.driver("p1", RBD)
        assert first.access.key == "AQAone==" and first.access.monitors == ("10.0.0.1:6789",)
        assert first.access.pool == "cloud" and first.access.user == "cumulo"
        assert await pools.driver("p1", RBD) is first
        assert api.gets == 1  # read at most every KEY_TTL seconds
        api.secrets["ceph"] = {"data": {"key": encoded("AQAtwo==")}}
        monkeypatch.setattr(rbdpools, "KEY_TTL", 0.0)
        second = await pools.driver("p1", RBD)
        assert second is not first and second.access.key == "AQAtwo=="
        await pools.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("secrets", "message"), [
    ({}, "Ceph key Secret cumulo-system/ceph does not exist"),
    ({"ceph": {"data": {"other": encoded("x")}}}, "Ceph key Secret cumulo-system/ceph has no key 'key'"),
    ({"ceph": {"data": {"key": "%%%"}}}, "Ceph key Secret cumulo-system/ceph: key 'key' is not valid base64 text"),
])
def test_a_secret_that_cannot_be_used_says_why(secrets: dict, message: str) -> None:
    pools = rbdpools.RbdPools(FakeApi(secrets), "h1")  # type: ignore[arg-type]
    with pytest.raises(StorageError) as error:
        asyncio.run(pools.driver("p1", RBD))
    assert str(error.value) == message
