"""The function routes: documents, invoke, triggers, metrics, logs (docs/functions.md).

Writes validate everything before storing anything: the document (the domain
models), the name's length (worker names add ``-w<i>``), the handler itself
(the runtime's check: a Nix expression that does not parse is refused here,
not at the first invocation) and HTTP routes taken by another function.
Invocations go to this node's gateway, which routes them anywhere.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from blixard.api.errors import COMMON_ERRORS, ErrorResponse
from blixard.api.reads import stored
from blixard.api.vms import checked_name, read_json_body
from blixard.domain.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    ValidationError,
)
from blixard.domain.function import (
    Function,
    FunctionStatus,
    FunctionWorker,
    HttpTrigger,
    Runtime,
)
from blixard.domain.parse import ROOT_FIELD, parse
from blixard.functions import runtime as rt
from blixard.functions.gateway import MAX_EVENT_BYTES, Gateway, gather
from blixard.functions.metrics import summarise
from blixard.store.objects import ObjectStore

#: Function names leave room for the worker suffix ``-w<index>`` in a 63-character label.
MAX_FUNCTION_NAME = 57
_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    400: {"model": ErrorResponse, "description": "Invalid document or parameter"},
    404: {"model": ErrorResponse, "description": "No such function"},
}
_DOC_BODY = {
    "requestBody": {
        "required": True,
        "description": "A Function document: metadata.name and spec.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Function"}}},
    }
}


class FunctionList(BaseModel):
    items: list[Function]


def parse_function_document(data: Any) -> Function:
    """A Function from a decoded document (``kind`` optional, but not another kind)."""
    if isinstance(data, dict) and "kind" in data and data["kind"] != "Function":
        raise ValidationError("kind", f"must be 'Function' on this route, got {data['kind']!r}")
    fn = parse(Function, data)
    if len(fn.metadata.name) > MAX_FUNCTION_NAME:
        raise ValidationError(
            "metadata.name", f"must be at most {MAX_FUNCTION_NAME} characters for a function"
        )
    return fn


async def _read_event(request: Request) -> bytes:
    """The event body: JSON, at most MAX_EVENT_BYTES (413 past it); empty means null."""
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_EVENT_BYTES:
            raise PayloadTooLarge(
                f"the event is larger than {MAX_EVENT_BYTES} bytes, the gateway's limit"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return b"null"
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(ROOT_FIELD, f"the event must be JSON: {exc}") from None
    return raw


#: Headers a handler may not set: the server frames the answer itself.
HOP_BY_HOP = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
     "trailer", "proxy-connection"}
)  # fmt: skip


def handler_answer(response: rt.Response, extra: Mapping[str, str]) -> Response:
    """The handler's answer as HTTP: its status, headers and body (text as is, else JSON)."""
    headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.update(extra)
    is_text = isinstance(response.body, str)
    headers.setdefault(
        "content-type", "text/plain; charset=utf-8" if is_text else "application/json"
    )
    return Response(
        content=response.body_bytes(), status_code=response.status_code, headers=headers
    )


def functions_router(
    objects: ObjectStore, gateway: Gateway | None, runtimes: Mapping[Runtime, rt.Runtime]
) -> APIRouter:
    """The routes under ``/v1/functions``."""
    router = APIRouter(prefix="/v1/functions", tags=["functions"], responses=_ERRORS)

    def need_gateway() -> Gateway:
        if gateway is None:
            raise StoreUnavailable("this node runs no function gateway")
        return gateway

    async def check(fn: Function) -> None:
        runtime = runtimes.get(fn.spec.runtime)
        if runtime is None:
            raise ValidationError(
                "spec.runtime", f"this node has no {fn.spec.runtime.value} runtime"
            )
        try:
            await runtime.check(fn.spec)
        except ValidationError as exc:  # runtimes name spec fields ("handler")
            field = exc.field if exc.field.startswith("spec.") else f"spec.{exc.field}"
            raise ValidationError(field, exc.reason) from None
        taken = await objects.list(Function)
        for other in taken:
            if other.metadata.name == fn.metadata.name:
                continue
            for mine in fn.spec.triggers:
                for theirs in other.spec.triggers:
                    common = set(mine.methods) & set(theirs.methods)
                    if mine.path == theirs.path and common:
                        raise Conflict(
                            f"route {sorted(common)[0]} {mine.path} belongs to function "
                            f"{other.metadata.name!r}"
                        )

    async def store_spec_change(name: str, fn: Function, expected: int) -> Function:
        current = await stored(objects.get(Function, name))
        if expected and expected != current.metadata.resource_version:
            raise Conflict(
                f"function {name!r} changed since it was read (resource_version {expected})"
            )
        # The generation names the workers' shape: it moves only when workers must be
        # replaced (docs/functions.md); a new trigger or scaling bound keeps them warm.
        changed = current.spec.needs_new_workers(fn.spec)
        meta = current.metadata.model_copy(
            update={
                "labels": fn.metadata.labels,
                "generation": current.metadata.generation + (1 if changed else 0),
            }
        )
        updated = current.model_copy(update={"metadata": meta, "spec": fn.spec})
        return await objects.update(updated)

    @router.post(
        "",
        status_code=201,
        response_model=Function,
        summary="Create a function",
        openapi_extra=_DOC_BODY,
        responses={409: {"model": ErrorResponse, "description": "Name or route taken"}},
    )
    async def create_function(request: Request) -> Function:
        fn = parse_function_document(await read_json_body(request))
        await check(fn)
        meta = fn.metadata.model_copy(
            update={
                "uid": uuid.uuid4(),
                "generation": 1,
                "resource_version": 0,
                "created_at": datetime.now(UTC),
            }
        )
        return await objects.create(
            fn.model_copy(update={"metadata": meta, "status": FunctionStatus()})
        )

    @router.get("", response_model=FunctionList, summary="List functions with their workers")
    async def list_functions() -> FunctionList:
        items = await stored(objects.list(Function))
        return FunctionList(items=sorted(items, key=lambda f: f.metadata.name))

    @router.get("/{name}", response_model=Function, summary="One function")
    async def get_function(name: str) -> Function:
        try:
            return await stored(objects.get(Function, checked_name(name)))
        except NotFound:
            raise NotFound(f"function {name!r} does not exist") from None

    @router.put(
        "/{name}",
        response_model=Function,
        summary="Replace a function's spec",
        openapi_extra=_DOC_BODY,
    )
    async def replace_function(name: str, request: Request) -> Function:
        """Store a new spec (generation + 1 if it changed: workers are replaced)."""
        fn = parse_function_document(await read_json_body(request))
        if fn.metadata.name != checked_name(name):
            raise ValidationError(
                "metadata.name", f"must be {name!r} (the name in the URL), got {fn.metadata.name!r}"
            )
        await check(fn)
        try:
            return await store_spec_change(name, fn, fn.metadata.resource_version)
        except NotFound:
            raise NotFound(f"function {name!r} does not exist") from None

    @router.delete("/{name}", status_code=204, summary="Delete a function; its workers stop")
    async def delete_function(name: str) -> Response:
        checked_name(name)
        for _ in range(20):
            try:
                fn = await stored(objects.get(Function, name))
            except NotFound:
                raise NotFound(f"function {name!r} does not exist") from None
            try:
                await objects.delete(fn)
            except Conflict:
                continue
            # Its workers go now (the autoscaler would within a second): a function
            # created again under this name must never meet them.
            for worker in await stored(objects.list(FunctionWorker)):
                if worker.spec.function == name:
                    with contextlib.suppress(Conflict, NotFound):
                        await objects.delete(worker)
            if gateway is not None:
                gateway.metrics.forget(name)
            return Response(status_code=204)
        raise Conflict(f"function {name!r} kept changing under 20 attempts to delete it")

    @router.post(
        "/{name}/invoke",
        summary="Invoke a function with a JSON event",
        response_class=Response,
        responses={
            200: {"description": "The handler's own answer (its status, headers and body)"},
            413: {"model": ErrorResponse, "description": "Event too large"},
            429: {"model": ErrorResponse, "description": "Concurrency limit and queue full"},
            502: {"model": ErrorResponse, "description": "The handler failed"},
            504: {"model": ErrorResponse, "description": "The handler timed out"},
        },
    )
    async def invoke_function(name: str, request: Request) -> Response:
        gw = need_gateway()
        checked_name(name)
        event = await _read_event(request)
        result = await gw.invoke(name, event)
        return handler_answer(result.response, result.headers())

    async def change_triggers(name: str, change: Callable[[Function], Function]) -> Function:
        """Apply ``change`` to the stored function with CAS, from a fresh read on a conflict."""
        for _ in range(20):
            fn = await get_function(name)
            wanted = change(fn)
            await check(wanted)
            try:
                return await store_spec_change(name, wanted, fn.metadata.resource_version)
            except Conflict:
                continue
        raise Conflict(f"function {name!r} kept changing under 20 attempts to change it")

    @router.post("/{name}/triggers", response_model=Function, summary="Add an HTTP trigger")
    async def add_trigger(name: str, request: Request) -> Function:
        trigger = parse(HttpTrigger, await read_json_body(request))

        def add(fn: Function) -> Function:
            kept = [t for t in fn.spec.triggers if t.path != trigger.path]
            spec = fn.spec.model_copy(update={"triggers": [*kept, trigger]})
            return parse_function_document(
                {
                    "metadata": fn.metadata.model_dump(mode="json"),
                    "spec": spec.model_dump(mode="json"),
                }
            )

        return await change_triggers(name, add)

    @router.delete("/{name}/triggers", response_model=Function, summary="Remove an HTTP trigger")
    async def remove_trigger(
        name: str, path: Annotated[str, Query(description="The trigger's path")]
    ) -> Function:

        def remove(fn: Function) -> Function:
            kept = [t for t in fn.spec.triggers if t.path != path]
            if len(kept) == len(fn.spec.triggers):
                raise NotFound(f"function {name!r} has no trigger on {path!r}")
            return fn.model_copy(update={"spec": fn.spec.model_copy(update={"triggers": kept})})

        return await change_triggers(name, remove)

    @router.get("/{name}/metrics", summary="Invocation figures summed over every live node")
    async def function_metrics(name: str) -> dict[str, Any]:
        gw = need_gateway()
        await get_function(name)
        answers = await gather(gw, f"functions/{name}/metrics-raw", lambda: gw.metrics.raw(name))
        return summarise(name, answers)

    @router.get(
        "/{name}/logs",
        summary="The handlers' stderr lines from every live node",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Lines, oldest first"}},
    )
    async def function_logs(
        name: str, tail: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> Response:
        gw = need_gateway()
        await get_function(name)
        answers = await gather(
            gw, f"functions/{name}/logs?tail={tail}", lambda: gw.host.logs.tail(name, tail)
        )
        lines = sorted(line for _, found in answers for line in found)[-tail:]
        text = "".join(f"{line}\n" for line in lines)
        return Response(text, media_type="text/plain; charset=utf-8")

    return router
