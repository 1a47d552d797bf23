"""One error shape for every failure the API reports.

Every answer that is not a success is ``{"error": {"code", "message",
"field"?}}``: Blixard's own errors, FastAPI's request validation, unknown
routes, and crashes. The client maps ``code`` back to the same error class, so
a ``ValidationError`` raised by the domain on the server reaches the CLI as a
``ValidationError`` with the same field. A crash answers 500 with no
traceback: the details go to the node's log, never to the caller.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blixard.api.logs import NodeUnreachable
from blixard.domain.errors import (
    AlreadyExists,
    BlixardError,
    Conflict,
    HandlerFailed,
    HandlerTimeout,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    TooManyRequests,
    ValidationError,
)
from blixard.domain.parse import ROOT_FIELD, dotted
from blixard.domain.token import Unauthorized
from blixard.functions.host import WorkerBusy, WorkerNotHere

log = structlog.get_logger(__name__)

#: First match wins, so subclasses come before their bases.
_STATUS: tuple[tuple[type[BlixardError], int], ...] = (
    (PayloadTooLarge, 413),  # a ValidationError too: before it
    (ValidationError, 400),
    (Unauthorized, 401),
    (WorkerNotHere, 404),
    (NotFound, 404),
    (TooManyRequests, 429),
    (WorkerBusy, 429),
    (HandlerFailed, 502),
    (NoCapacity, 503),
    (HandlerTimeout, 504),
    (AlreadyExists, 409),
    (Conflict, 409),
    (StoreUnavailable, 503),
    (NodeUnreachable, 502),
)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class ErrorDetail(BaseModel):
    """What went wrong: a machine code, a sentence, and the field when there is one."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


#: For route declarations: the error answers every authenticated route may give.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid bearer token"},
    503: {"model": ErrorResponse, "description": "The state store is unavailable"},
}


def status_for(exc: BlixardError) -> int:
    """The HTTP status of a Blixard error (500 for any kind without its own)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        detail["field"] = field
    return {"error": detail}


def error_response(exc: BlixardError) -> JSONResponse:
    """The JSON answer for a Blixard error."""
    field = exc.field if isinstance(exc, ValidationError) else None
    headers = {"X-Blixard-Error": exc.code}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(exc.code, str(exc), field), status_code=status_for(exc), headers=headers
    )


def request_validation_error(exc: RequestValidationError) -> ValidationError:
    """FastAPI's own validation (query and path parameters) as a Blixard ValidationError."""
    errors = list(exc.errors())
    if not errors:
        return ValidationError(ROOT_FIELD, "invalid request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] in {"query", "path", "header", "body", "cookie"}:
        loc = loc[1:]
    reason = str(first.get("msg", "is invalid"))
    value = first.get("input")
    if first.get("type") == "missing":
        reason = "is required"
    elif value is None or isinstance(value, str | int | float | bool):
        reason = f"{reason}, got {value!r}"
    return ValidationError(dotted(loc), reason)


async def _blixard_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BlixardError)
    if status_for(exc) >= 500:
        log.warning("api request failed", error=str(exc), code=exc.code)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request_validation_error(exc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one shape; crashes are caught by CatchAll below."""
    app.add_exception_handler(BlixardError, _blixard_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class CatchAllMiddleware:
    """Answer 500 in the error shape when a request crashes, and log the traceback.

    Starlette's own fallback re-raises after answering, which prints the
    traceback a second time and makes test clients raise; this middleware ends
    the request cleanly instead. If the response had already started (a log
    stream), nothing can be sent: the connection is closed and the error logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("api request crashed", path=scope.get("path"))
            if started:
                return
            response = JSONResponse(
                error_body("internal", "internal error; the node's log has the details"),
                status_code=500,
            )
            await response(scope, receive, send)
