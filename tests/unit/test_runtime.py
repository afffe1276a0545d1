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
    """A watch that cannot resume (410 after an apiserver restart) lists the kind again; what the store has beyond
    the listing's keys was deleted meanwhile and goes, with the keys its dependents derive from it queued."""
    from controllers.runtime import LISTED, Runtime

    kind = Kind("pods", "g", "v", True, Named)
    runtime = Runtime(None, [kind], [])
    for name in ("p1", "p2"):  # p2 is deleted while the watch is broken
        runtime.watched("pods", "ADDED", raw(name, "z", "1"))
    runtime.watched("pods", "MODIFIED", raw("p1", "z", "4"))  # the relisting's objects
    runtime.watched("pods", "ADDED", raw("p3", "z", "5"))
    assert runtime.store.get("pods", "p2") is not None
    runtime.watched("pods", LISTED, {("pods", None, "p1"), ("pods", None, "p3")})
    assert [o.metadata.name for o in runtime.store.list("pods")] == ["p1", "p3"]
    assert runtime.relisted("pods", {("pods", None, "p1"), ("pods", None, "p3")}) == 0


def vm_raw(name, message):
    return {
        "apiVersion": "cumulo.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "t", "resourceVersion": "7", "uid": f"uid-{name}",
                     "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "me"}},
        "spec": {"serviceOffering": "small", "template": {"name": "img"}, "zone": "z1"},
        "status": {"phase": "Starting", "conditions": [
            {"type": "Ready", "status": "False", "reason": "Starting", "message": message,
             "lastTransitionTime": "2026-11-21T10:00:00Z"}]},
    }


def test_store_slims_and_compacts_objects_without_changing_them():
    """managedFields and kubectl's last-applied copy are dropped before parsing; equal pydantic fields sets are
    shared and short strings interned, so 10,000 guests fit the controller's memory budget."""
    from controllers import kinds

    store = Store([kinds.VIRTUALMACHINES])
    message = "creating the root volume"
    expected = vm_raw("a", message)
    del expected["metadata"]["managedFields"], expected["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    expected = kinds.VIRTUALMACHINES.parse(expected)
    _, a = store.upsert("virtualmachines", vm_raw("a", " ".join(message.split())))  # equal, not the same string
    _, b = store.upsert("virtualmachines", vm_raw("b", " ".join(message.split())))
    dumped = a.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped == expected.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert a.metadata.annotations == {"keep": "me"}
    assert "managedFields" not in dumped["metadata"]
    assert a.__pydantic_fields_set__ is b.__pydantic_fields_set__  # one set for equal field sets
    assert a.status.conditions[0].message is b.status.conditions[0].message  # interned
    # A reconciler's copy gets its own fields set: changing the copy leaves the stored objects alone.
    copy = a.model_copy(deep=True)
    copy.status.phase = "Running"
    copy.metadata.generation = 3
    assert "generation" not in b.metadata.__pydantic_fields_set__
    assert b.status.phase == "Starting" and a.status.phase == "Starting"


def test_compactor_interns_strings_in_lists_and_dicts_of_models():
    from controllers.runtime import Compactor
    import pydantic

    class Inner(pydantic.BaseModel):
        tags: list[str] = []
        labels: dict[str, str] = {}

    class Outer(pydantic.BaseModel):
        inner: list[Inner] = []

    def make():
        return Outer.model_validate({"inner": [{"tags": ["".join(["x", "1"])], "labels": {"k": "".join(["v", "2"])}}]})

    compact = Compactor()
    one, two = compact(make()), compact(make())
    assert make().inner[0].tags[0] is not make().inner[0].tags[0]
    assert one.inner[0].tags[0] is two.inner[0].tags[0]
    assert one.inner[0].labels["k"] is two.inner[0].labels["k"]
    assert one.inner[0].__pydantic_fields_set__ is two.inner[0].__pydantic_fields_set__
    assert one == two


def test_store_index_answers_stay_sorted_and_current_and_empty_values_go():
    store = Store([Kind("pods", "g", "v", False, Obj)])
    store.define_index("pods", "zone", lambda o: [o.zone])
    for name in ("p3", "p1", "p2"):
        store.upsert("pods", raw(name, "z1", "1"))
    names = lambda value: [o.raw["metadata"]["name"] for o in store.by("pods", "zone", value)]  # noqa: E731
    assert names("z1") == ["p1", "p2", "p3"] and store.count("pods", "zone", "z1") == 3
    store.upsert("pods", raw("p2", "z1", "2"))  # a change that moves nothing: the cached order serves
    assert names("z1") == ["p1", "p2", "p3"] and store.by("pods", "zone", "z1")[1].raw["metadata"]["resourceVersion"] == "2"
    store.upsert("pods", raw("p0", "z1", "1"))
    store.upsert("pods", raw("p3", "z2", "2"))
    assert names("z1") == ["p0", "p1", "p2"] and names("z2") == ["p3"]
    store.remove("pods", raw("p3", "z2", "3"))
    assert names("z2") == [] and store.count("pods", "zone", "z2") == 0
    assert "z2" not in store._indexes["pods", "zone"]  # no empty set left behind
    assert store.count("pods", "zone", None) == 0 and store.by("pods", "zone", None) == []


def test_changes_of_coalesced_kinds_reach_a_rollup_once_per_window_and_its_own_changes_at_once():
    """A Host-like rollup follows its guests' changes: a burst of them is one reconcile (one status write) after
    ``coalesce_seconds``; a change of the rollup's own object is reconciled at once."""
    from controllers.runtime import Reconciler, Result, Runtime

    hosts, guests = Kind("hosts", "g", "v", False, Named), Kind("guests", "g", "v", True, Named)
    seen: list[tuple[str, float]] = []

    class HostRollup(Reconciler):
        kind = hosts
        coalesced = frozenset({"guests"})

        def watch_map(self):
            return {"guests": lambda guest: [self.key("h1")]}

        async def reconcile(self, obj):
            seen.append((obj.metadata.name, asyncio.get_running_loop().time()))
            return Result()

    async def scenario():
        runtime = Runtime(None, [hosts, guests], [HostRollup], workers=1, coalesce_seconds=0.3)
        runtime.loaded = True
        await runtime.start()
        runtime.observe("hosts", "ADDED", raw("h1", "z", "1"))
        await asyncio.sleep(0.05)
        assert len(seen) == 1  # its own change: at once
        started = asyncio.get_running_loop().time()
        for version in range(2, 12):  # ten guest changes within 0.1 s
            runtime.observe("guests", "MODIFIED", {**raw("g1", "z", str(version)), "metadata": {
                "name": "g1", "namespace": "t", "resourceVersion": str(version)}})
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert len(seen) == 1  # waiting for more
        await asyncio.sleep(0.4)
        assert len(seen) == 2 and seen[1][1] - started >= 0.29
        await runtime.stop()

    asyncio.run(scenario())


def test_new_objects_wait_behind_objects_under_way_but_are_never_starved():
    from controllers.runtime import NEW_LANE_SHARE

    async def scenario():
        queue = WorkQueue()
        for index in range(10):
            queue.add(("vms", "ns", f"new{index}"), new=True)
        for index in range(10):
            queue.add(("vms", "ns", f"old{index}"))
        taken = []
        for _ in range(12):
            key = await queue.get()
            queue.done(key)
            taken.append(key[2])
        # Under-way first, in order; every NEW_LANE_SHARE-th take serves the new lane, in order.
        assert [name for name in taken if name.startswith("new")] == ["new0", "new1", "new2"]
        assert taken[NEW_LANE_SHARE - 1] == "new0"
        assert [name for name in taken if name.startswith("old")] == [f"old{i}" for i in range(9)]
        rest = []
        for _ in range(8):
            key = await queue.get()
            queue.done(key)
            rest.append(key[2])
        assert rest == ["old9", *[f"new{i}" for i in range(3, 10)]] and len(queue) == 0
        waiter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        queue.add(("vms", "ns", "late"), new=True)
        assert (await asyncio.wait_for(waiter, 1))[2] == "late"

    asyncio.run(scenario())
