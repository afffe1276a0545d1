import asyncio

from controllers.runtime import Kind, Store, WorkQueue, merge_patch


def test_merge_patch_sets_changes_and_nulls_removed_keys():
    old = {"phase": "Ready", "capacity": {"cpu": 1, "mem": 2}, "gone": 1, "list": [1]}
    new = {"phase": "Ready", "capacity": {"cpu": 2, "mem": 2}, "list": [1, 2]}
    assert merge_patch(old, new) == {"capacity": {"cpu": 2}, "gone": None, "list": [1, 2]}
    assert merge_patch(new, new) is None


class Obj:
    def __init__(self, raw):
        self.raw = raw
        self.zone = raw["spec"]["zone"]


def raw(name, zone, version):
    return {"metadata": {"name": name, "resourceVersion": version}, "spec": {"zone": zone}}


def test_store_indexes_follow_updates_and_deletes():
    store = Store([Kind("pods", "g", "v", False, Obj)])
    store.define_index("pods", "zone", lambda o: [o.zone])
    store.upsert("pods", raw("p1", "z1", "1"))
    store.upsert("pods", raw("p2", "z1", "1"))
    assert [o.raw["metadata"]["name"] for o in store.by("pods", "zone", "z1")] == ["p1", "p2"]
    old, new = store.upsert("pods", raw("p1", "z2", "2"))
    assert old.zone == "z1" and new.zone == "z2"
    assert [o.raw["metadata"]["name"] for o in store.by("pods", "zone", "z2")] == ["p1"]
    same_old, same_new = store.upsert("pods", raw("p1", "z2", "2"))
    assert same_old is same_new  # a resync of a known version is not a change
    store.remove("pods", raw("p2", "z1", "3"))
    assert store.by("pods", "zone", "z1") == []


def test_work_queue_dedupes_and_reprocesses_keys_added_while_active():
    async def scenario():
        queue = WorkQueue()
        key = ("pods", None, "p1")
        queue.add(key)
        queue.add(key)
        assert len(queue) == 1
        got = await queue.get()
        queue.add(key)  # changed while being reconciled
        assert len(queue) == 0
        queue.done(got)
        assert len(queue) == 1
        await queue.get()
        queue.done(key)
        queue.add_after(key, 0.05)
        queue.add_after(key, 10)  # a later request does not delay the earlier one
        await asyncio.wait_for(queue.get(), 1)

    asyncio.run(scenario())
