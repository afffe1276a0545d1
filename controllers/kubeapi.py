"""The controller's writes and authoritative reads, through the Kubernetes API.

The blocking ``kubernetes`` client runs in worker threads; every call is a single request. Status is
written with JSON merge patches of only what changed; finalizers with a merge patch carrying the
resourceVersion they were computed from, so a concurrent change fails the write instead of being lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import datetime
import socket
import typing as t
import uuid

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from controllers.runtime import Conflict, Kind


def load_client(kubeconfig: str | None = None, pool_size: int = 32) -> client.ApiClient:
    """A client whose connection pool keeps ``pool_size`` connections: with fewer than the requests in flight,
    urllib3 opens (a TLS handshake each) and drops connections on every burst."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class KubeApi:
    def __init__(self, api_client: client.ApiClient, component: str = "cumulo-controller", threads: int = 20):
        """``threads``: requests in flight at once (the reconcile workers' writes, the usage meter's, events); not
        asyncio's default executor, which has cores + 4 threads and would queue the workers' requests."""
        self.client = api_client
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kubeapi")
        self.custom = client.CustomObjectsApi(api_client)
        self.component = component
        self.instance = f"{component}-{socket.gethostname()}"
        self.writes = 0

    async def _call(self, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._threads, call)
        except ApiException as error:
            if error.status == 409:  # the object moved on since the resourceVersion we wrote against
                raise Conflict(error.reason) from error
            raise

    async def _request(self, verb: str, kind: Kind, namespace: str | None, *rest: t.Any, status: bool = False,
                       **kwargs: t.Any) -> t.Any:
        """Call ``<verb>_{namespaced|cluster}_custom_object[_status]`` with the kind's path and ``rest``."""
        scope = "namespaced" if kind.namespaced else "cluster"
        function = getattr(self.custom, f"{verb}_{scope}_custom_object" + ("_status" if status else ""))
        where = (namespace,) if kind.namespaced else ()
        return await self._call(function, kind.group, kind.version, *where, kind.plural, *rest, **kwargs)

    async def _patch(self, kind: Kind, name: str, namespace: str | None, body: t.Any, *, status: bool = False,
                     missing_ok: bool = False) -> t.Any:
        self.writes += 1
        try:
            return await self._request("patch", kind, namespace, name, body, status=status,
                                       _content_type="application/merge-patch+json")
        except ApiException as error:
            if missing_ok and error.status == 404:
                return None
            raise

    async def list_selected(self, kind: Kind, field_selector: str) -> list[dict]:
        """Objects of ``kind`` matching a field selector (CRD selectableFields), at most a few."""
        body = await self._call(self.custom.list_cluster_custom_object, kind.group, kind.version, kind.plural,
                                field_selector=field_selector, limit=10)
        return body.get("items", [])

    async def list(self, kind: Kind) -> list[dict]:
        """Every object of ``kind`` (in every namespace), restricted by the kind's label selector."""
        kwargs = {"label_selector": kind.selector} if kind.selector else {}
        body = await self._call(self.custom.list_cluster_custom_object, kind.group, kind.version, kind.plural,
                                **kwargs)
        api_version, kind_name = body.get("apiVersion"), body.get("kind", "").removesuffix("List")
        items = body.get("items", [])
        for item in items:  # list items carry no apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind_name)
        return items

    async def patch_status(self, kind: Kind, name: str, namespace: str | None, status_patch: dict) -> dict:
        return await self._patch(kind, name, namespace, {"status": status_patch}, status=True)

    async def set_finalizers(self, kind: Kind, name: str, namespace: str | None, resource_version: str,
                             wanted: list[str], labels: dict[str, str] | None = None) -> None:
        """Replace the finalizer list, only if the object is still at ``resource_version`` (else Conflict); set
        ``labels`` in the same write."""
        body: dict[str, t.Any] = {"metadata": {"finalizers": wanted, "resourceVersion": resource_version}}
        if labels:
            body["metadata"]["labels"] = labels
        await self._patch(kind, name, namespace, body, missing_ok=True)

    async def set_label(self, kind: Kind, name: str, namespace: str | None, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one label; other labels are left alone."""
        await self._patch(kind, name, namespace, {"metadata": {"labels": {key: value}}}, missing_ok=True)

    async def patch(self, kind: Kind, name: str, namespace: str | None, body: dict) -> None:
        """A JSON merge patch of the object (spec or metadata)."""
        await self._patch(kind, name, namespace, body, missing_ok=True)

    async def create(self, kind: Kind, body: dict) -> dict | None:
        """Create an object; the object as created, or None when it already exists (the caller's earlier attempt
        got through)."""
        self.writes += 1
        with contextlib.suppress(Conflict):
            return await self._request("create", kind, body["metadata"].get("namespace"), body)
        return None

    async def delete(self, kind: Kind, name: str, namespace: str | None) -> None:
        self.writes += 1
        try:
            await self._request("delete", kind, namespace, name)
        except ApiException as error:
            if error.status != 404:
                raise

    async def record_event(self, kind: Kind, obj: t.Any, type_: str, reason: str, note: str) -> None:
        """Post an events.k8s.io/v1 Event about ``obj`` (cluster-scoped objects' events go to default)."""
        self.writes += 1
        meta = obj.metadata
        namespace = meta.namespace or "default"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.name}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "eventTime": now,
            "type": type_,
            "reason": reason,
            "action": reason,
            "note": note[:1024],
            "reportingController": f"cumulo.io/{self.component}",
            "reportingInstance": self.instance[:128],
            "regarding": {"apiVersion": kind.api_version, "kind": kind.kind, "name": meta.name,
                          "namespace": meta.namespace, "uid": meta.uid,
                          "resourceVersion": meta.resource_version},
        }
        try:
            await self._call(self.custom.create_namespaced_custom_object, "events.k8s.io", "v1", namespace,
                             "events", event)
        except ApiException as error:  # events are best effort; never fail a reconcile on them
            if error.status not in (403, 404, 409, 422):
                raise
