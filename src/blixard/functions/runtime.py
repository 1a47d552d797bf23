"""What every function runtime offers the gateway: check a handler, start warm workers.

A *worker* is one warm unit of a function on this node (a pre-spawned
process pool for ``command`` and ``nix``, one microVM for ``microvm``). The
gateway asks a runtime for a worker on a cold start, keeps it while it is
warm, sends it invocations, and closes it when the autoscaler scales down.
Runtimes never see HTTP: they take the event as JSON bytes and a context
mapping and give back a :class:`Response`, or raise one of the errors below,
which the gateway turns into 502 / 504 answers without harm to itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from blixard.domain.errors import BlixardError, HandlerFailed, HandlerTimeout
from blixard.domain.function import FunctionSpec

#: Largest handler output read back (stdout, or the guest's answer): past it the
#: handler failed (502), and the gateway's memory is never at the handler's mercy.
MAX_OUTPUT_BYTES = 6 * 1024 * 1024
#: An HTTP header name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

__all__ = ["HandlerFailed", "HandlerTimeout", "Response", "Runtime", "Worker", "WorkerGone"]


class WorkerGone(BlixardError):
    """The worker can no longer serve (its process or VM died): start another one."""

    code = "worker_gone"


@dataclass(frozen=True)
class Response:
    """A handler's answer: what the gateway sends back to the caller."""

    status_code: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: What the handler wrote to stderr (its tail), for ``blixard function logs``.
    logs: str = ""

    def body_bytes(self) -> bytes:
        """The body as sent: text as UTF-8, anything else as JSON."""
        if self.body is None:
            return b""
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body, separators=(",", ":")).encode()


def parse_response(raw: bytes) -> Response:
    """Read a handler's output: a JSON response object, or any JSON value as a 200 body.

    ``{"statusCode": 201, "body": ..., "headers": {...}}`` (the Nix example's
    shape, and Lambda's proxy shape) sets the status; a JSON value without
    ``statusCode`` is the body of a 200. Output that is not JSON, a status
    outside 100..599 or headers that are not strings is :class:`HandlerFailed`.
    """
    if len(raw) > MAX_OUTPUT_BYTES:
        raise HandlerFailed(f"the handler's output is larger than {MAX_OUTPUT_BYTES} bytes")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        shown = raw[:200].decode(errors="replace")
        raise HandlerFailed(
            f"the handler's output is not JSON ({exc}): {shown!r}", detail=shown
        ) from None
    if not isinstance(value, dict) or "statusCode" not in value:
        return Response(200, value)
    status = value["statusCode"]
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise HandlerFailed(f"statusCode must be an integer from 100 to 599, got {status!r}")
    headers = value.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise HandlerFailed(f"headers must map strings to strings, got {headers!r}")
    for key, item in headers.items():
        if not _TOKEN.fullmatch(key) or any(ch in item for ch in "\r\n\x00"):
            raise HandlerFailed(f"header {key!r} is not a valid HTTP header name and value")
    return Response(status, value.get("body"), dict(headers))


class Worker(Protocol):
    """One warm unit of one function on this node."""

    #: Invocations it can run at the same time (a microVM's guest agent: 1).
    concurrency: int

    async def invoke(self, event: bytes, context: dict[str, Any], timeout_s: float) -> Response:
        """Run the handler once on ``event`` (JSON bytes).

        Past ``timeout_s`` the execution is killed and :class:`HandlerTimeout`
        raised; a crash or bad output raises :class:`HandlerFailed`; a worker
        that cannot serve any more raises :class:`WorkerGone`. A worker stays
        usable after HandlerFailed and HandlerTimeout unless it says otherwise
        by raising WorkerGone on the next call.
        """
        ...

    def alive(self) -> bool:
        """False once the worker can no longer serve (closed, or its process/VM died)."""
        ...

    async def close(self) -> None:
        """Stop it and free everything it holds (processes, VMs, files). Idempotent."""
        ...


class Runtime(Protocol):
    """A kind of handler: ``nix``, ``command`` or ``microvm``."""

    name: str

    async def check(self, spec: FunctionSpec) -> None:
        """Refuse a handler that can never work, before anything is stored.

        Raises ValidationError naming ``spec.handler`` (or another field) and the
        reason: a Nix expression that does not parse, a command that is not an
        executable, a microVM image that does not exist.
        """
        ...

    async def start_worker(self, name: str, spec: FunctionSpec, work_dir: Path) -> Worker:
        """Cold start: whatever it takes for a worker of ``name`` to be ready.

        ``work_dir`` is this worker's own empty directory (removed after close).
        Raises HandlerFailed when the worker cannot start (with the reason).
        """
        ...


def event_context(function: str, request_id: str, http: dict[str, Any] | None) -> dict[str, Any]:
    """The context handlers get: which function, which request, the HTTP request if any."""
    return {"function": function, "requestId": request_id, "http": http}


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (0700: handler files and sockets are this node's business)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
