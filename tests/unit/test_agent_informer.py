"""The agent's informer (hostagent/kube.py) on the shared loop: a cache and on_event(old, new) that a relist
brings up to date (what went meanwhile is DELETED, an unchanged object is not reported again), and ApiHealth
told of an outage and of the answer that ends it."""

import asyncio
import logging
import time

from hostagent.kube import ApiHealth, Informer, KubeError


def obj(name, version, namespace="ns"):
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}}


class Transport:
    """Scripted lists and watches (an answer, events, or a KubeError); then every watch ends at once."""

    def __init__(self, lists, watches):
        self.lists, self.watches = lists, watches
        self.watching = 0

    def list(self, path, query, timeout):
        answer = self.lists.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def watch(self, path, query, timeout_seconds, on_response):
        self.watching += 1
        on_response(None)
        yield from (self.watches.pop(0) if self.watches else [])


def test_a_relist_reports_what_changed_meanwhile_and_the_health_follows_the_apiserver(caplog):
    transport = Transport(
        lists=[KubeError(None, "Unavailable", "connection refused"),
               {"items": [obj("a", "1"), obj("b", "2")], "metadata": {"resourceVersion": "2"}},
               # After the 410: b went, c came, a is unchanged.
               {"items": [obj("a", "3"), obj("c", "4")], "metadata": {"resourceVersion": "4"}}],
        watches=[[{"type": "MODIFIED", "object": obj("a", "3")}, {"type": "MODIFIED", "object": obj("a", "3")},
                  {"type": "ERROR", "object": {"code": 410, "message": "too old"}}]])
    health = ApiHealth()
    events = []
    informer = Informer(transport, "Thing", "/apis/g.io/v1/things",
                        lambda kind, old, new: events.append((kind, old and old["metadata"]["name"],
                                                              new and new["metadata"]["name"])),
                        health=health, namespaced=True)
    informer.backoff.initial = informer.backoff._next = 0.01
    assert health.informers == [informer]

    async def scenario():
        informer.start()
        await asyncio.wait_for(informer.synced.wait(), 10)
        deadline = time.monotonic() + 10
        while ("DELETED", "b", None) not in events:
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.01)
        informer.stop()
        await asyncio.to_thread(informer._thread.join, 5)

    with caplog.at_level(logging.INFO, logger="hostagent.kube"):
        asyncio.run(scenario())
    assert not informer._thread.is_alive()
    assert events == [("ADDED", None, "a"), ("ADDED", None, "b"), ("MODIFIED", "a", "a"),
                      ("ADDED", None, "c"), ("DELETED", "b", None)]
    assert sorted(informer.cache) == ["ns/a", "ns/c"]
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("apiserver unreachable; retrying with backoff") == 1
    assert "apiserver reachable again" in messages
    assert "list/watch failed; retrying with backoff" in messages and "watch expired; relisting" in messages
