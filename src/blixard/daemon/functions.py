"""Wiring of the node's serverless side: runtimes, the worker host, the gateway and its port.

Kept out of :mod:`blixard.daemon.node` so the node's start-up reads as a list
of parts; this module owns the order those parts start and stop in (the
gateway's listener last up, first down; workers closed last, so no
invocation is cut off by its own node's shutdown before the listener stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from blixard.api.gateway import gateway_app
from blixard.domain.function import Runtime
from blixard.functions import runtime as rt
from blixard.functions.gateway import Gateway, cluster_secret
from blixard.functions.host import FunctionHost
from blixard.functions.metrics import FunctionMetrics
from blixard.store.protocol import StateStore

log = structlog.get_logger(__name__)


def build_runtimes(
    enabled: Sequence[str], data_dir: Path, images_dir: Path
) -> dict[Runtime, rt.Runtime]:
    """The runtimes this node offers (``[functions] runtimes``)."""
    from blixard.functions.registry import process_runtimes  # noqa: PLC0415

    runtimes = {kind: run for kind, run in process_runtimes().items() if kind.value in enabled}
    if "microvm" in enabled:
        from blixard.functions.microvm import MicroVmRuntime  # noqa: PLC0415

        runtimes[Runtime.MICROVM] = MicroVmRuntime(
            images_dir=images_dir, run_dir=data_dir / "functions" / "microvm"
        )
    return runtimes


@dataclass
class FunctionsPart:
    """The running serverless side of a node."""

    runtimes: dict[Runtime, rt.Runtime]
    metrics: FunctionMetrics
    host: FunctionHost
    gateway: Gateway
    server: uvicorn.Server | None = None
    serving: asyncio.Task[None] | None = None
    _closing: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.serving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(10):
                    await self.serving
            self.serving.cancel()  # still serving after 10 s: cut it off
        await self.gateway.close()
        await self.host.close()
        for runtime in self.runtimes.values():
            closer = getattr(runtime, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()


async def start_functions(
    store: StateStore,
    node_id: str,
    runtimes: dict[Runtime, rt.Runtime],
    work_root: Path,
    sock: socket.socket | None,
) -> FunctionsPart:
    """Start the worker host and the gateway, and serve the gateway port on ``sock``."""
    metrics = FunctionMetrics()
    host = FunctionHost(store, node_id, runtimes, work_root, metrics)
    secret = await cluster_secret(store)
    gateway = Gateway(store, node_id, host, metrics, secret=secret)
    part = FunctionsPart(runtimes, metrics, host, gateway)
    try:
        await _serve(part, sock)
    except BaseException:
        await part.close()  # nothing half-started is left running
        raise
    return part


async def _serve(part: FunctionsPart, sock: socket.socket | None) -> None:
    await part.host.start()
    await part.gateway.start()
    if sock is not None:
        part.server = uvicorn.Server(
            uvicorn.Config(
                gateway_app(part.gateway), log_level="warning", access_log=False, lifespan="off"
            )
        )
        part.serving = asyncio.create_task(part.server.serve(sockets=[sock]))
        while not part.server.started and not part.serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if part.serving.done():
            part.serving.result()
