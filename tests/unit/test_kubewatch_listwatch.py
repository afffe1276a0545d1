"""The shared list+watch loop (kubewatch/listwatch.py) against a scripted fake transport: a 410 relists, failures
back off with a growing delay that a healthy watch resets, a nudge ends an outage's backoff (not a refusal's),
a failed paged listing starts again from its first page, and stop() ends a watch blocked on its socket at once."""

import asyncio
import socket
import threading
import time

import pytest

from kubewatch.client import KubeError
from kubewatch.listwatch import Backoff, ListWatch


def page(names, version="", cont=None):
    metadata = {"resourceVersion": version}
    if cont:
        metadata["continue"] = cont
    return {"items": [{"metadata": {"name": n, "resourceVersion": version}} for n in names], "metadata": metadata}


def event(event_type, name, version):
    return {"type": event_type, "object": {"metadata": {"name": name, "resourceVersion": version}}}


class Blocked:
    """An open watch response whose read blocks until its socket is shut down (as stop() does)."""

    def __init__(self):
        self.sock, self.peer = socket.socketpair()
        self.connection = self

    def read_until_shut(self):
        data = self.sock.recv(1)  # b"" once shut down
        self.sock.close()
        self.peer.close()
        raise KubeError(None, "Unavailable", f"stream ended ({data!r})")


class FakeTransport:
    """Answers in turn from ``lists`` and ``watches`` (an answer, a list of events, or a KubeError); once a
    script is used up a list fails as unreachable and a watch blocks on its socket until stopped."""

    def __init__(self, lists=(), watches=()):
        self.lists, self.watches = list(lists), list(watches)
        self.calls = []  # ("list"|"watch", query, monotonic time)
        self.blocked = threading.Event()

    def list(self, path, query, timeout):
        self.calls.append(("list", dict(query), time.monotonic()))
        answer = self.lists.pop(0) if self.lists else KubeError(None, "Unavailable", "script ended")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def watch(self, path, query, timeout_seconds, on_response):
        self.calls.append(("watch", dict(query), time.monotonic()))
        if not self.watches:
            response = Blocked()
            on_response(response)
            self.blocked.set()
            response.read_until_shut()
        answer = self.watches.pop(0)
        if isinstance(answer, Exception):
            raise answer
        on_response(None)
        yield from answer

    def kinds(self):
        return [call[0] for call in self.calls]


class Recorder(ListWatch):
    """Records the hooks' calls, in the thread."""

    def __init__(self, transport, **kwargs):
        super().__init__(transport, "things", "/apis/g.io/v1/things", {"labelSelector": "a=b"}, **kwargs)
        self.seen = []

    def list_page(self, answer, first):
        self.seen.append(("page", first, [item["metadata"]["name"] for item in answer["items"]]))

    def list_done(self):
        self.seen.append(("listed",))

    def watch_event(self, event_type, obj):
        self.seen.append((event_type, obj["metadata"]["name"]))


class RecordingBackoff(Backoff):
    def __init__(self, initial, maximum):
        super().__init__(initial, maximum)
        self.asked = []  # the growing delay each next() drew from

    def next(self):
        self.asked.append(self._next)
        return super().next()


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def run(watcher, until, timeout=10.0):
    """Start ``watcher`` on an event loop, wait for ``until()`` (in a thread), stop it; returns the thread."""

    async def scenario():
        watcher.start()
        await asyncio.to_thread(wait_until, until, timeout)
        watcher.stop()
        await asyncio.to_thread(watcher._thread.join, 5)

    asyncio.run(scenario())
    assert not watcher._thread.is_alive(), "the watch thread did not end after stop()"


def test_an_expired_watch_lists_again_from_scratch():
    transport = FakeTransport(
        lists=[page(["a"], "10"), page(["a", "b"], "20")],
        watches=[[event("MODIFIED", "a", "11"), {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
                  {"type": "ERROR", "object": {"code": 410, "message": "too old"}}]])
    watcher = Recorder(transport)
    run(watcher, transport.blocked.is_set)
    assert transport.kinds() == ["list", "watch", "list", "watch"]
    assert "resourceVersion" not in transport.calls[2][1]  # a fresh listing, not a resumed one
    assert transport.calls[3][1]["resourceVersion"] == "20"
    assert all(call[1]["labelSelector"] == "a=b" for call in transport.calls)
    assert watcher.seen == [("page", True, ["a"]), ("listed",), ("MODIFIED", "a"),
                            ("page", True, ["a", "b"]), ("listed",)]


def test_a_broken_stream_resumes_from_the_last_resource_version_and_a_410_answer_relists():
    transport = FakeTransport(
        lists=[page(["a"], "10"), page(["a"], "30")],
        watches=[[event("ADDED", "b", "12"), {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "14"}}}],
                 KubeError(None, "Unavailable", "connection reset"),
                 KubeError(410, "Expired", "too old resource version")])
    watcher = Recorder(transport)
    watcher.backoff = Backoff(0.01, 0.02)
    run(watcher, transport.blocked.is_set)
    assert transport.kinds() == ["list", "watch", "watch", "watch", "list", "watch"]
    assert [call[1].get("resourceVersion") for call in transport.calls] == [None, "10", "14", "14", None, "30"]


def test_failures_back_off_with_a_growing_delay_and_a_healthy_watch_resets_it():
    unavailable = KubeError(503, "ServiceUnavailable", "etcd away")
    transport = FakeTransport(lists=[unavailable, unavailable, unavailable, page(["a"], "1")],
                              watches=[[], KubeError(500, "InternalError", "x"), []])
    watcher = Recorder(transport)
    watcher.backoff = backoff = RecordingBackoff(0.01, 0.04)
    # Three failed lists, then a listing and a watch that ends at once: the delay keeps growing to its maximum.
    run(watcher, lambda: len(transport.calls) >= 5 and len(backoff.asked) >= 4)
    assert transport.kinds()[:5] == ["list", "list", "list", "list", "watch"]
    assert backoff.asked[:4] == [0.01, 0.02, 0.04, 0.04]
    gaps = [later[2] - earlier[2] for earlier, later in zip(transport.calls, transport.calls[1:4])]
    assert all(gap >= 0.005 for gap in gaps), gaps  # it did wait between attempts

    # Once a watch has lasted long enough, the next failure starts from the initial delay again.
    transport = FakeTransport(lists=[page(["a"], "1")], watches=[[], KubeError(500, "InternalError", "x")])
    watcher = Recorder(transport)
    watcher.backoff = backoff = RecordingBackoff(0.01, 0.04)
    watcher.backoff._next = 0.04  # as after an outage
    watcher.healthy_seconds = 0.0
    run(watcher, transport.blocked.is_set)
    assert backoff.asked == [0.01]


def test_a_listing_that_fails_midway_starts_again_from_its_first_page():
    transport = FakeTransport(lists=[page(["a"], cont="c1"), KubeError(None, "Unavailable", "reset"),
                                     page(["a"], cont="c2"), page(["b"], "5")])
    watcher = Recorder(transport, page_size=1)
    watcher.backoff = Backoff(0.01, 0.02)
    run(watcher, transport.blocked.is_set)
    assert [call[1] for call in transport.calls[:4]] == [
        {"labelSelector": "a=b", "limit": 1}, {"labelSelector": "a=b", "limit": 1, "continue": "c1"},
        {"labelSelector": "a=b", "limit": 1}, {"labelSelector": "a=b", "limit": 1, "continue": "c2"}]
    assert watcher.seen == [("page", True, ["a"]), ("page", True, ["a"]), ("page", False, ["b"]), ("listed",)]


@pytest.mark.parametrize(("error", "nudged"), [(KubeError(None, "Unavailable", "refused"), True),
                                              (KubeError(403, "Forbidden", "no"), False)])
def test_a_nudge_ends_the_backoff_of_an_outage_but_not_of_a_refusal(error, nudged):
    transport = FakeTransport(lists=[error, page([], "1")])
    watcher = Recorder(transport)
    watcher.backoff = Backoff(60, 60)  # without a nudge the retry comes after 30-60 s

    async def scenario():
        watcher.start()
        await asyncio.to_thread(wait_until, lambda: len(transport.calls) == 1)
        await asyncio.sleep(1.1)  # nudges are spaced by a second from the last attempt
        watcher.nudge()
        retried = await asyncio.to_thread(transport.blocked.wait, 3)
        watcher.stop()
        await asyncio.to_thread(watcher._thread.join, 5)
        return retried

    assert asyncio.run(scenario()) is nudged
    assert not watcher._thread.is_alive()


def test_stop_ends_a_blocked_watch_and_a_backoff_at_once():
    transport = FakeTransport(lists=[page(["a"], "1")])
    watcher = Recorder(transport)
    started = time.monotonic()
    run(watcher, transport.blocked.is_set)  # the watch blocks (its timeout would be minutes)
    assert time.monotonic() - started < 3

    transport = FakeTransport(lists=[KubeError(None, "Unavailable", "refused")])
    watcher = Recorder(transport)
    watcher.backoff = Backoff(60, 60)
    started = time.monotonic()
    run(watcher, lambda: len(transport.calls) == 1)
    assert time.monotonic() - started < 3
    assert transport.kinds() == ["list"]
