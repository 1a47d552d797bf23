"""Typed client of the functions API (docs/functions.md): documents, invocations, metrics.

A subclass of :class:`BlixardClient` so it shares the session, the token and
the error mapping (an error answer raises the same Blixard error class as on
the server) and the VM/node routes stay one call away (``trigger`` asks the
node record for its gateway address).

Invocations are different from every other route: the answer is the
*handler's*, whatever its status, and only an answer the gateway itself
produced (marked by ``X-Blixard-Error``) is an error. A handler answering 404
or 500 is a successful invocation that the caller judges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from blixard.client.errors import ApiError, ApiUnreachable, error_from_response
from blixard.client.http import DEFAULT_TIMEOUT_S, BlixardClient, _path
from blixard.domain.errors import BlixardError
from blixard.domain.function import Function

#: The headers of an invocation answer (docs/functions.md); httpx matches them case-blind.
ERROR_HEADER = "X-Blixard-Error"
REQUEST_ID_HEADER = "X-Blixard-Request-Id"
COLD_START_HEADER = "X-Blixard-Cold-Start"
NODE_HEADER = "X-Blixard-Node"
WORKER_HEADER = "X-Blixard-Worker"
DURATION_HEADER = "X-Blixard-Duration-Ms"


class Quantiles(BaseModel):
    """A latency summary in milliseconds; the quantiles are bucket upper bounds.

    ``None`` stands for "no observation": a server may send ``null`` when
    ``count`` is 0, and a table shows ``-`` rather than a made-up 0 ms.
    """

    model_config = ConfigDict(extra="allow")

    count: int = 0
    avg: float | None = None
    p50: float | None = None
    p99: float | None = None


class FunctionMetrics(BaseModel):
    """``GET /v1/functions/{name}/metrics``: counters summed over every live node.

    Extra fields are allowed so a newer server does not break an older CLI.
    """

    model_config = ConfigDict(extra="allow")

    function: str
    nodes: list[str] = Field(default_factory=list)
    invocations: int = 0
    errors: int = 0
    cold_starts: int = 0
    warm_starts: int = 0
    timeouts: int = 0
    rejected: int = 0
    duration_ms: Quantiles = Field(default_factory=Quantiles)
    cold_start_ms: Quantiles = Field(default_factory=Quantiles)
    queue_ms: Quantiles = Field(default_factory=Quantiles)


@dataclass(frozen=True)
class Invocation:
    """One handler answer as the gateway relayed it, plus the gateway's facts about it.

    ``body`` is the raw bytes: a handler may answer text, JSON or anything its
    ``Content-Type`` says, and only the caller knows what it wants from them.
    The facts are ``None`` when the answer did not carry the header.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str | None = None
    cold_start: bool | None = None
    node: str | None = None
    worker: str | None = None
    duration_ms: float | None = None

    @property
    def ok(self) -> bool:
        """The handler answered 2xx (anything else is still not an error of the call)."""
        return 200 <= self.status < 300

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _bool_header(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    return None


def _float_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def is_gateway_error(response: httpx.Response) -> bool:
    """Did the gateway (or the API in front of it) answer, rather than the handler?

    ``X-Blixard-Error`` marks the gateway's own errors (docs/functions.md). An
    error answer that carries neither that header nor any invocation fact
    (request id, worker) never reached a handler either: a refused token, an
    unknown route of an older server, a proxy in between. Treating it as the
    handler's answer would print an auth error as if the function said it.
    """
    if ERROR_HEADER in response.headers:
        return True
    if response.status_code < 400:
        return False
    return REQUEST_ID_HEADER not in response.headers and WORKER_HEADER not in response.headers


def gateway_error(response: httpx.Response) -> BlixardError:
    """The Blixard error of a gateway error answer; the header's code if the body has none."""
    exc = error_from_response(response)
    code = response.headers.get(ERROR_HEADER)
    if isinstance(exc, ApiError) and exc.code == "api_error" and code:
        # No error body (e.g. a HEAD, or a body lost on the way): the header still says what.
        detail = {"error": {"code": code, "message": exc.args[0] if exc.args else code}}
        return error_from_response(
            httpx.Response(response.status_code, json=detail, request=response.request)
        )
    return exc


class FunctionClient(BlixardClient):
    """``FunctionClient(url, token)``: every route of docs/functions.md, typed."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` serves the requests in-process instead of over TCP.

        For tests (an ``httpx.MockTransport`` standing in for the API) and for
        embedding (Starlette's TestClient transport around a real API app);
        the CLI never passes it.
        """
        super().__init__(base_url, token, timeout_s)
        if transport is not None:
            headers = self._http.headers
            self._http.close()
            self._http = httpx.Client(
                base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport
            )

    def __enter__(self) -> FunctionClient:
        return self

    # ------------------------------------------------------------------ documents

    def create_function(self, document: dict[str, Any]) -> Function:
        """``POST /v1/functions`` with a Function document (``metadata.name``, ``spec``)."""
        return self._model(Function, self._request("POST", "/v1/functions", json=document))

    def list_functions(self) -> list[Function]:
        """``GET /v1/functions``: every function with its workers' counts and nodes."""
        return self._items(Function, self._request("GET", "/v1/functions"))

    def get_function(self, name: str) -> Function:
        return self._model(Function, self._request("GET", _path("functions", name)))

    def replace_function(self, name: str, document: dict[str, Any]) -> Function:
        """``PUT /v1/functions/{name}``; a ``metadata.resource_version`` in it makes the
        write conditional (Conflict when someone else wrote since it was read)."""
        response = self._request("PUT", _path("functions", name), json=document)
        return self._model(Function, response)

    def delete_function(self, name: str) -> None:
        """``DELETE /v1/functions/{name}``: 204; the server stops its workers."""
        self._request("DELETE", _path("functions", name))

    # ------------------------------------------------------------------ triggers

    def add_function_trigger(
        self, name: str, path: str, methods: list[str] | None = None
    ) -> Function:
        """Route ``methods`` (server default: GET and POST) on ``path`` to the function."""
        body: dict[str, Any] = {"type": "http", "path": path}
        if methods:
            body["methods"] = methods
        response = self._request("POST", _path("functions", name, "triggers"), json=body)
        return self._model(Function, response)

    def remove_function_trigger(self, name: str, path: str) -> Function:
        route = _path("functions", name, "triggers")
        response = self._request("DELETE", route, params={"path": path})
        return self._model(Function, response)

    # ------------------------------------------------------------------ observing

    def function_metrics(self, name: str) -> FunctionMetrics:
        response = self._request("GET", _path("functions", name, "metrics"))
        return self._model(FunctionMetrics, response)

    def function_logs(self, name: str, tail: int | None = None) -> str:
        """The handlers' stderr lines from every live node, newest last (plain text)."""
        params = {"tail": tail} if tail is not None else None
        response = self._request("GET", _path("functions", name, "logs"), params=params)
        return response.text

    # ------------------------------------------------------------------ invoking

    def invoke_function(
        self,
        name: str,
        event: bytes | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Invocation:
        """``POST /v1/functions/{name}/invoke`` with ``event`` (JSON bytes; None sends none).

        ``timeout_s`` bounds the wait for the answer; None (the default) waits
        as long as the gateway does, since the gateway enforces the function's
        own timeout (up to an hour) and answers 504 past it. A gateway error
        raises its Blixard error (PayloadTooLarge, TooManyRequests,
        HandlerFailed, NoCapacity, HandlerTimeout, NotFound, ...); a
        handler's own answer, 4xx and 5xx included, is returned.
        """
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        timeout = httpx.Timeout(self.timeout_s, read=timeout_s)
        try:
            response = self._http.request(
                "POST",
                _path("functions", name, "invoke"),
                content=event if event is not None else b"",
                headers=headers,
                timeout=timeout,
            )
        except httpx.ReadTimeout as exc:
            if timeout_s is None:  # pragma: no cover - no read limit was set
                raise self._unreachable(exc) from None
            raise ApiUnreachable(
                f"function {name!r} did not answer within {timeout_s:g}s at {self.base_url}"
            ) from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if is_gateway_error(response):
            raise gateway_error(response)
        facts = response.headers
        return Invocation(
            status=response.status_code,
            headers=dict(response.headers),
            body=response.content,
            request_id=facts.get(REQUEST_ID_HEADER),
            cold_start=_bool_header(facts.get(COLD_START_HEADER)),
            node=facts.get(NODE_HEADER),
            worker=facts.get(WORKER_HEADER),
            duration_ms=_float_header(facts.get(DURATION_HEADER)),
        )
