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


class Meta:
    def __init__(self, raw):
        self.name, self.namespace = raw["metadata"]["name"], raw["metadata"].get("namespace")


class Named:
    def __init__(self, raw):
        self.metadata = Meta(raw)


def test_a_relist_drops_what_was_deleted_while_the_watch_was_broken():
    """kopf's relist after a 410 (a restarted kube-apiserver) replays what exists but sends no DELETED for what
    went meanwhile: the runtime lists the kind itself and drops the rest, except what arrived during its LIST."""
    from controllers.runtime import Runtime

    kind = Kind("pods", "g", "v", True, Named)

    class Api:
        def __init__(self):
            self.objects = [raw("p1", "z", "1"), raw("p3", "z", "5")]
            self.runtime = None

        async def list(self, listed):
            assert listed is kind
            self.runtime.observe("pods", "ADDED", raw("p4", "z", "6"))  # a watch event while the LIST runs
            return self.objects

    async def scenario():
        api = Api()
        runtime = api.runtime = Runtime(api, [kind], [])
        for name in ("p1", "p2"):  # p2 is deleted while the watch is broken
            runtime.store.upsert("pods", raw(name, "z", "1"))
        runtime.loaded = True
        runtime.observe("pods", None, raw("p1", "z", "1"))  # the relist starts
        runtime.observe("pods", None, raw("p3", "z", "5"))
        assert runtime.store.get("pods", "p2") is not None
        await asyncio.sleep(0.1)
        assert len(runtime._prunes) == 1  # one prune per kind, not per event
        await asyncio.sleep(2.5)
        assert [o.metadata.name for o in runtime.store.list("pods")] == ["p1", "p3", "p4"]
        assert runtime._prunes == {}

    asyncio.run(scenario())
