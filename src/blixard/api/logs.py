"""Streaming a task's output over HTTP.

The log source is injected (the agent and its drivers own the tasks); the API
only turns its byte chunks into a ``text/plain`` stream. The first chunk is
awaited briefly before the answer starts, so a source that fails at once
("no such task on this node") still gets a proper 404 instead of a 200 stream
that ends empty; a quiet ``follow`` stream starts anyway after that short wait
so the caller sees the headers without waiting for output.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import structlog
from fastapi.responses import StreamingResponse

from blixard.domain.errors import BlixardError, NotFound

log = structlog.get_logger(__name__)

#: ``logs(instance_name, follow)``: the instance's output; raises NotFound if the
#: node has no such task. With ``follow`` it keeps yielding until the client leaves.
LogSource = Callable[[str, bool], AsyncIterator[bytes]]

#: How long the first chunk may take before the answer starts without it.
FIRST_CHUNK_WAIT_S = 0.5


class NodeUnreachable(BlixardError):
    """The node that runs a task did not answer for its output (HTTP 502)."""

    code = "node_unreachable"


def remote_source(node: str, url: str, headers: dict[str, str]) -> LogSource:
    """Output of a task on another node, read from that node's API.

    Nodes never call each other to change state; reading a task's console is
    one of the two exceptions DESIGN.md allows, because the bytes live only on
    the node that runs the task. The caller's own token is passed on: tokens
    are cluster-wide, and no node gains rights by forwarding.
    """

    async def source(instance: str, follow: bool) -> AsyncIterator[bytes]:
        timeout = httpx.Timeout(10.0, read=None if follow else 30.0)
        try:
            async with (
                httpx.AsyncClient(timeout=timeout) as client,
                client.stream("GET", url, headers=headers) as resp,
            ):
                if resp.status_code == 404:
                    raise NotFound(f"instance {instance!r} has no task on node {node}")
                if resp.status_code != 200:
                    raise NodeUnreachable(
                        f"node {node} answered HTTP {resp.status_code} for the output of {instance}"
                    )
                async for chunk in resp.aiter_raw():
                    yield chunk
        except httpx.TransportError as exc:
            base = url.split("/v1/", maxsplit=1)[0]
            raise NodeUnreachable(
                f"node {node} ({base}) did not answer for the output of {instance}: "
                f"{type(exc).__name__}"
            ) from None

    return source


async def _next_chunk(it: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _close(it: AsyncIterator[bytes]) -> None:
    aclose: Any = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def stream_logs(source: LogSource, instance: str, follow: bool) -> StreamingResponse:
    """A streaming answer of ``source(instance, follow)``; its early errors raise here."""
    it = source(instance, follow).__aiter__()
    first: asyncio.Task[bytes | None] = asyncio.ensure_future(_next_chunk(it))
    try:
        await asyncio.wait({first}, timeout=FIRST_CHUNK_WAIT_S)
    except BaseException:
        first.cancel()
        raise
    if first.done():
        try:
            first.result()  # raises NotFound (or anything else) before the answer starts
        except BaseException:
            await _close(it)
            raise

    async def body() -> AsyncIterator[bytes]:
        try:
            chunk = await first
            while chunk is not None:
                if chunk:
                    yield chunk
                chunk = await _next_chunk(it)
        except BlixardError as exc:
            # Headers are sent: the status can no longer change, so end the stream.
            log.warning("log stream ended by an error", instance=instance, error=str(exc))
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            await _close(it)

    return StreamingResponse(
        body(),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )
