"""Raw JSON requests to the apiserver through a ``kubernetes`` ApiClient.

Why not the client's typed API classes: their model deserialisation is slow (the controller's watches decode
thousands of events a second at scale) and every caller wants plain JSON anyway. The ApiClient still gives
kubeconfig/in-cluster/token handling and its urllib3 pool; requests go through its generic
``param_serialize``/``call_api``.
"""

from __future__ import annotations

import json
import typing as t
from collections.abc import Callable, Iterator, Mapping

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

CONNECT_TIMEOUT = 5.0


class KubeError(Exception):
    """An API request failed. ``status`` is None when the apiserver could not be reached."""

    def __init__(self, status: int | None, reason: str, message: str, details: Mapping[str, t.Any] | None = None):
        super().__init__(f"{status or 'unreachable'} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    @property
    def unavailable(self) -> bool:
        return self.status is None or self.status in (429, 500, 502, 503, 504)


def error_of(status: int, data: bytes) -> KubeError:
    """The :class:`KubeError` of an answer with a non-2xx ``status`` and body ``data`` (a Status, if JSON)."""
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = body.get("message", data[:200].decode(errors="replace"))
    return KubeError(status, str(body.get("reason", "")), str(message), body.get("details"))


class JsonClient:
    """Blocking JSON requests; thread-safe (urllib3 connection pool). Also the list+watch loop's transport
    (:class:`kubewatch.listwatch.Transport`)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.server = getattr(getattr(api, "configuration", None), "host", "")

    def close(self) -> None:
        self.api.close()

    def _send(self, method: str, path: str, query: Mapping[str, t.Any] | None, body: t.Any,
              content_type: str, timeout: tuple[float, float]) -> t.Any:
        headers = {"Accept": "application/json"}
        extra: dict[str, t.Any] = {}
        if body is not None:
            headers["Content-Type"] = content_type
            extra["body"] = body
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers,
            auth_settings=["BearerToken"], **extra)
        try:
            return self.api.call_api(method, url, headers, body, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(None, "Unavailable", f"{self.server}: {error}") from None
        except ApiException as error:  # status 0: TLS errors and the like
            raise KubeError(error.status or None, str(error.reason), str(error.body or error.reason)) from None

    def request(self, method: str, path: str, *, query: Mapping[str, t.Any] | None = None, body: t.Any = None,
                content_type: str = "application/json", timeout: float = 10.0) -> t.Any:
        """One request; the decoded JSON answer. Raises :class:`KubeError`."""
        response = self._send(method, path, query, body, content_type, (CONNECT_TIMEOUT, timeout))
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(None, "Unavailable", f"{self.server}: {error}") from None
        if not 200 <= response.status < 300:
            raise error_of(response.status, data)
        return json.loads(data)

    def list(self, path: str, query: Mapping[str, t.Any], timeout: float) -> dict[str, t.Any]:
        """One page of a collection."""
        return self.request("GET", path, query=query, timeout=timeout)

    def watch(self, path: str, query: Mapping[str, t.Any], timeout_seconds: int,
              on_response: Callable[[t.Any], None]) -> Iterator[dict[str, t.Any]]:
        """The events of one watch request, until the server ends it after ``timeout_seconds``.
        ``on_response`` gets the open response so another thread can shut it down."""
        query = {**query, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": timeout_seconds}
        response = self._send("GET", path, query, None, "", (CONNECT_TIMEOUT, timeout_seconds + 30))
        try:
            if not 200 <= response.status < 300:
                raise error_of(response.status, response.read())
            on_response(response.response)
            try:
                for line in iter_resp_lines(response.response):
                    if line:
                        yield json.loads(line)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise KubeError(None, "Unavailable", f"watch {path}: {error}") from None
        finally:
            # Closed, not returned to the pool as is: an unfinished stream leaves unread data behind.
            response.response.close()
            response.response.release_conn()
