"""Where a volume goes on each pool type, and whether a pool can take it (controllers.reconcilers.volume)."""

from __future__ import annotations

from controllers.api.v1alpha1.storagepool import StoragePool
from controllers.api.v1alpha1.template import ImageFormat
from controllers.api.v1alpha1.volume import Volume
from controllers.reconcilers.volume import base_image_path, disk_path, insufficient, pool_free_bytes

GIB = 1024**3


def pool(kind: str = "RBD", *, capacity: int | None = 10 * GIB, allocated: int = 0, factor: float = 1.0) -> StoragePool:
    spec = {"zone": "z1", "scope": "Zone", "type": kind, "overprovisioningFactor": factor}
    if kind == "RBD":
        spec["rbd"] = {"monitors": ["10.0.0.1:6789"], "pool": "cloud",
                       "secretRef": {"namespace": "cumulo-system", "name": "ceph", "key": "key"}}
    else:
        spec["path"] = "/srv/pool/"
    status = {"capacityBytes": capacity, "allocatedBytes": allocated} if capacity is not None else {}
    return StoragePool.model_validate({"apiVersion": "cumulo.io/v1alpha1", "kind": "StoragePool",
                                       "metadata": {"name": "p1"}, "spec": spec, "status": status})


VOLUME = Volume.model_validate({"apiVersion": "cumulo.io/v1alpha1", "kind": "Volume",
                                "metadata": {"name": "v", "namespace": "t", "uid": "u-1"},
                                "spec": {"zone": "z1", "sizeGiB": 1}})


def test_rbd_volumes_are_images_cloned_from_the_template_snapshot() -> None:
    assert disk_path(pool("RBD"), VOLUME) == "volume-u-1"
    assert base_image_path(pool("RBD"), "t-9", ImageFormat.QCOW2) == "template-t-9@base"
    assert disk_path(pool("SharedMountPoint"), VOLUME) == "/srv/pool/u-1.qcow2"
    assert base_image_path(pool("SharedMountPoint"), "t-9", ImageFormat.RAW) == "/srv/pool/templates/t-9.raw"


def test_free_bytes_count_overprovisioning_and_what_is_allocated_for_every_pool_type() -> None:
    for kind in ("RBD", "SharedMountPoint"):
        assert pool_free_bytes(pool(kind, capacity=10 * GIB, allocated=4 * GIB)) == 6 * GIB
        assert pool_free_bytes(pool(kind, capacity=10 * GIB, allocated=4 * GIB, factor=2.0)) == 16 * GIB
        assert pool_free_bytes(pool(kind, capacity=10 * GIB, allocated=12 * GIB)) == -2 * GIB
    assert pool_free_bytes(pool(capacity=None)) == 0  # nothing reported yet: nothing fits


def test_the_refusal_says_how_much_is_free_and_why() -> None:
    full = pool(capacity=10 * GIB, allocated=9 * GIB, factor=1.5)
    assert insufficient(full, 20 * GIB, pool_free_bytes(full)) == (
        "StoragePool p1 cannot take 20 GiB: 6.0 GiB free of 10.0 GiB × overprovisioning 1.5, 9.0 GiB allocated")
    assert insufficient(pool(capacity=None), GIB, 0) == "StoragePool p1 has not reported its capacity yet"
    over = pool(capacity=GIB, allocated=3 * GIB)
    assert "0.0 GiB free" in insufficient(over, GIB, pool_free_bytes(over))


def test_a_root_volume_takes_the_planners_pool_never_one_of_its_own() -> None:
    """A local-offering guest's root volume seen before its spec.storagePool is written must not pick the shared
    pool its host also reaches (it did: a root disk without a disk offering counted as shared)."""
    import asyncio

    from fakeapi import FakeApi
    from test_vm_reconciler import obj, start, world

    from controllers.api.v1alpha1.virtualmachine import VirtualMachine

    async def scenario() -> None:
        api = FakeApi()
        world(api, hosts=("h1",))
        api.put("storagepools", obj("StoragePool", "shared", {"zone": "z1", "scope": "Zone", "type": "SharedMountPoint",
                                                              "path": "/shared"},
                                    {"hostAccess": {"h1": {"reachable": True}}, "capacityBytes": 1000 * GIB}))
        runtime = await start(api)
        volumes = runtime.reconcilers["volumes"]
        root = Volume.model_validate(obj("Volume", "vm1-root", {"zone": "z1", "type": "ROOT",
                                                                "virtualMachine": {"name": "vm1"}}, namespace="demo"))
        vm = VirtualMachine.model_validate(obj("VirtualMachine", "vm1", {
            "serviceOffering": "small", "template": {"name": "tiny"}, "zone": "z1"}, namespace="demo"))
        pool, why = volumes._pool(root, vm, None)
        assert pool is None and "planner" in why
        vm.status = vm.status.model_validate({"placement": {"host": "h1", "storagePool": "h1-local"}})
        pool, _ = volumes._pool(root, vm, None)
        assert pool is not None and pool.metadata.name == "h1-local"
        await runtime.stop()

    asyncio.run(scenario())
