"""API error answers back into Blixard's error tree.

The API sends ``{"error": {"code", "message", "field"?}}``; ``code`` is the
``code`` attribute of the error class that was raised on the server, so the
client raises the same class and callers (the CLI's exit codes) can treat a
remote ValidationError exactly like a local one.
"""

from __future__ import annotations

from typing import Any

import httpx

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
from blixard.domain.token import Unauthorized


class ApiError(BlixardError):
    """The API answered with an error that has no class of its own here."""

    code = "api_error"

    def __init__(self, message: str, status: int = 0, code: str = "api_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ApiUnreachable(BlixardError):
    """No answer from the API: not running, wrong address, or too slow."""

    code = "api_unreachable"


class UnexpectedAnswer(BlixardError):
    """The API answered something this client cannot read (a version mismatch?)."""

    code = "unexpected_answer"


_BY_CODE: dict[str, type[BlixardError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        Conflict,
        StoreUnavailable,
        Unauthorized,
        PayloadTooLarge,
        TooManyRequests,
        HandlerFailed,
        NoCapacity,
        HandlerTimeout,
    )
}


def error_from_response(response: httpx.Response) -> BlixardError:
    """The Blixard error an error answer stands for."""
    detail = _detail(response)
    if detail is None:
        text = response.text.strip().replace("\n", " ")[:200]
        return ApiError(
            f"HTTP {response.status_code} from {response.request.url}: {text or 'no body'}",
            status=response.status_code,
        )
    code = str(detail.get("code", "error"))
    message = str(detail.get("message", "")) or f"HTTP {response.status_code}"
    field = detail.get("field")
    if code == ValidationError.code and isinstance(field, str):
        prefix = f"{field}: "
        return ValidationError(field, message.removeprefix(prefix))
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    return ApiError(message, status=response.status_code, code=code)


def _detail(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail: dict[str, Any] = body["error"]
        return detail
    return None
