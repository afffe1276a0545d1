"""The controller's list+watch (controllers/informer.py) against a scripted apiserver: paged listings, events in
order, managedFields dropped before the loop sees an object, and a 410 relist that drops what went meanwhile."""

import asyncio
import json
import threading

from controllers.informer import Informer
from controllers.runtime import Kind, Runtime


class Meta:
    def __init__(self, raw):
        self.name, self.namespace = raw["metadata"]["name"], raw["metadata"].get("namespace")
        self.resource_version = raw["metadata"]["resourceVersion"]


class Pod:
    def __init__(self, raw):
        assert "managedFields" not in raw["metadata"], "managedFields reached the parser"
        self.metadata = Meta(raw)


KIND = Kind("pods", "g.io", "v1", True, Pod, "Pod")


def pod(name, version):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version,
                         "managedFields": [{"manager": "x", "fieldsV1": {"f:spec": {}}}]}}


class Stream:
    def __init__(self, lines):
        self.lines = lines

    def stream(self, amt=None, decode_content=False):
        yield from (line.encode() + b"\n" for line in self.lines)

    def close(self):
        pass

    def release_conn(self):
        pass


class Answer:
    def __init__(self, status, body=None, lines=()):
        self.status = status
        self._body = json.dumps(body or {}).encode()
        self.response = Stream(lines)

    def read(self):
        return self._body


class ScriptedApi:
    """Answers the informer's requests in turn from ``script`` (query check, answer); then blocks until stopped."""

    def __init__(self, script):
        self.script = list(script)
        self.queries = []
        self.done = threading.Event()

    def param_serialize(self, method, path, query_params, header_params, auth_settings):
        return method, (path, dict(query_params)), header_params, None, None

    def call_api(self, method, url, headers, body, _request_timeout):
        path, query = url
        self.queries.append(query)
        if not self.script:
            self.done.set()
            threading.Event().wait(5)
            raise OSError("closed")
        return self.script.pop(0)


def watch_line(event_type, obj):
    return json.dumps({"type": event_type, "object": obj})


def test_paged_listing_then_watch_then_a_410_relist_drops_what_was_deleted():
    api = ScriptedApi([
        Answer(200, {"apiVersion": "g.io/v1", "items": [pod("p1", "1")], "metadata": {"continue": "c1"}}),
        Answer(200, {"items": [pod("p2", "2")], "metadata": {"resourceVersion": "10"}}),
        Answer(200, lines=[watch_line("MODIFIED", pod("p1", "11")), watch_line("BOOKMARK", {"metadata": {
            "resourceVersion": "12"}}), watch_line("ERROR", {"code": 410, "message": "too old"})]),
        # The relist: p2 was deleted while the watch was broken.
        Answer(200, {"items": [pod("p1", "11"), pod("p3", "13")], "metadata": {"resourceVersion": "14"}}),
    ])

    async def scenario():
        runtime = Runtime(None, [KIND], [])
        runtime.watch(lambda kind, sink: Informer(api, kind, sink, page_size=1))
        await asyncio.wait_for(runtime.load(), 5)
        assert runtime.loaded
        for _ in range(100):
            if api.done.is_set():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the thread's last batch reaches the loop
        await runtime.stop()
        return runtime

    runtime = asyncio.run(scenario())
    assert sorted(o.metadata.name for o in runtime.store.list("pods")) == ["p1", "p3"]
    assert runtime.store.get("pods", "p1", "ns").metadata.resource_version == "11"
    assert api.queries[0] == {"limit": 1}
    assert api.queries[1] == {"limit": 1, "continue": "c1"}
    assert api.queries[2]["watch"] == "true" and api.queries[2]["resourceVersion"] == "10"
    assert "resourceVersion" not in api.queries[3]  # a fresh listing after the 410


def test_a_failing_list_is_retried_and_sends_the_label_selector():
    selected = Kind("leases", "coordination.k8s.io", "v1", True, Pod, "Lease", selector="cumulo.io/heartbeat")
    api = ScriptedApi([
        Answer(503, {"message": "etcd away"}),
        Answer(200, {"items": [pod("l1", "1")], "metadata": {"resourceVersion": "2"}}),
    ])

    async def scenario():
        runtime = Runtime(None, [selected], [])
        runtime.watch(lambda kind, sink: Informer(api, kind, sink))
        await asyncio.wait_for(runtime.load(), 5)
        await runtime.stop()
        return runtime

    runtime = asyncio.run(scenario())
    assert [o.metadata.name for o in runtime.store.list("leases")] == ["l1"]
    assert all(query["labelSelector"] == "cumulo.io/heartbeat" for query in api.queries)
