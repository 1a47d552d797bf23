"""The gateway's own HTTP listener: HTTP triggers, and the node-to-node calls of gateways.

A separate port from the API (``--gateway-port``, 7480 by default), because
its two jobs differ from the API's:

* **HTTP triggers** are public endpoints, like a cloud function's URL: no
  bearer token; any request whose method and path match a trigger invokes
  that function. The event is the request body when it is JSON, ``{"body":
  <text>}`` when it is other text, and the query parameters as an object
  when there is no body; the request itself (method, path, query, headers
  without Authorization/Cookie) is in ``context.http``.
* **Forwarded calls** (``/_blixard/v1/...``) from other nodes' gateways: run
  an invocation on one of this node's workers, or report this node's
  metrics and handler logs. They must carry the cluster's gateway secret.

Errors have the API's shape and an ``X-Blixard-Error`` header with the code.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blixard.api.errors import error_body, status_for
from blixard.api.functions import handler_answer
from blixard.domain.errors import BlixardError, NotFound, PayloadTooLarge
from blixard.functions import runtime as rt
from blixard.functions.gateway import FORWARDED_HEADER, MAX_EVENT_BYTES, SECRET_HEADER, Gateway

_HIDDEN_HEADERS = frozenset({"authorization", "cookie", SECRET_HEADER.lower()})


def error_answer(exc: BlixardError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.code, str(exc)),
        status_code=status_for(exc),
        headers={"X-Blixard-Error": exc.code},
    )


async def _body(request: Request) -> bytes:
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_EVENT_BYTES:
            raise PayloadTooLarge(
                f"the request body is larger than {MAX_EVENT_BYTES} bytes, the gateway's limit"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def trigger_event(raw: bytes, query: dict[str, str]) -> bytes:
    """The event of a trigger request (see the module docstring)."""
    if not raw.strip():
        return json.dumps(query).encode()
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return json.dumps({"body": raw.decode(errors="replace")}).encode()
    return raw


def gateway_app(gateway: Gateway) -> Starlette:
    """The ASGI app of the gateway port."""

    def authorised(request: Request) -> bool:
        given = request.headers.get(SECRET_HEADER, "")
        return hmac.compare_digest(given.encode(), gateway.secret.encode())

    def refused() -> JSONResponse:
        return JSONResponse(
            error_body("unauthorized", "node-to-node calls need the cluster's gateway secret"),
            status_code=401,
            headers={"X-Blixard-Error": "unauthorized"},
        )

    async def forwarded_invoke(request: Request) -> Response:
        if not authorised(request):
            return refused()
        try:
            context: dict[str, Any] = json.loads(request.headers.get("X-Blixard-Context", "{}"))
            timeout_s = float(request.headers.get("X-Blixard-Timeout", "30"))
        except ValueError:
            return error_answer(rt.HandlerFailed("a malformed forwarded call"))
        try:
            # A slot first: a busy worker says so before the event is read.
            local = gateway.acquire_forwarded(request.path_params["worker"])
        except BlixardError as exc:
            return error_answer(exc)
        try:
            event = await _body(request)
        except BlixardError as exc:
            gateway.host.release(local)
            return error_answer(exc)
        except BaseException:
            gateway.host.release(local)
            raise
        try:
            response = await gateway.serve_forwarded(local, event, context, timeout_s)
        except BlixardError as exc:
            return error_answer(exc)
        headers = {
            FORWARDED_HEADER: "1",
            "X-Blixard-Handler-Headers": json.dumps(response.headers),
            "X-Blixard-Body": "text" if isinstance(response.body, str) else "json",
        }
        return Response(
            response.body_bytes() if response.body is not None else b"",
            status_code=response.status_code,
            headers=headers,
        )

    async def metrics_raw(request: Request) -> Response:
        if not authorised(request):
            return refused()
        return JSONResponse(gateway.metrics.raw(request.path_params["name"]))

    async def logs_raw(request: Request) -> Response:
        if not authorised(request):
            return refused()
        tail = int(request.query_params.get("tail", "100"))
        return JSONResponse(gateway.host.logs.tail(request.path_params["name"], tail))

    async def trigger(request: Request) -> Response:
        path = request.url.path
        fn = gateway.view.route(path, request.method)
        if fn is None:
            return error_answer(
                NotFound(f"no function has an HTTP trigger on {request.method} {path}")
            )
        try:
            event = trigger_event(await _body(request), dict(request.query_params))
            http = {
                "method": request.method,
                "path": path,
                "query": dict(request.query_params),
                "headers": {
                    k: v for k, v in request.headers.items() if k.lower() not in _HIDDEN_HEADERS
                },
            }
            result = await gateway.invoke(fn.metadata.name, event, http)
        except BlixardError as exc:
            return error_answer(exc)
        return handler_answer(result.response, result.headers())

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/_blixard/v1/workers/{worker}/invoke", forwarded_invoke, methods=["POST"]),
            Route("/_blixard/v1/functions/{name}/metrics-raw", metrics_raw, methods=["GET"]),
            Route("/_blixard/v1/functions/{name}/logs", logs_raw, methods=["GET"]),
            Route("/{path:path}", trigger, methods=methods),
        ]
    )
