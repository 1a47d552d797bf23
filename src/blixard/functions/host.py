"""The workers of this node: start the ones assigned here, run invocations, report, stop.

A worker record (``function-workers/<fn>-w<i>``) names its node; the host of
that node starts the worker with the function's runtime when it sees the
record, marks it ready in the store, and closes it when the record goes
(scale-down, a new function generation, deletion). The node's own gateway
can also start a worker the moment it created the record (no watch round
trip on a local cold start); either way one start happens per record.

Execution slots are counted here, exactly: a worker runs at most its
``concurrency`` invocations at once, and a caller that finds no free slot is
told so at once (the gateway then tries another worker or waits). What the
autoscaler needs (in-flight count, last use) is written to the record at
most every ``report_s`` seconds and only when it changed, never per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog

from blixard.domain.errors import BlixardError, Conflict, NotFound, StoreError
from blixard.domain.function import (
    Function,
    FunctionSpec,
    FunctionWorker,
    Runtime,
    WorkerState,
)
from blixard.domain.keys import Kind, kind_prefix
from blixard.domain.parse import from_json_bytes
from blixard.functions import runtime as rt
from blixard.functions.metrics import FunctionMetrics
from blixard.store.objects import ObjectStore
from blixard.store.protocol import EventType, StateStore

log = structlog.get_logger(__name__)


class WorkerBusy(BlixardError):
    """Every slot of the worker is taken: try another worker, or wait."""

    code = "worker_busy"


class WorkerNotHere(NotFound):
    """This node runs no such worker (it was removed, or never started here)."""

    code = "worker_not_found"


@dataclass
class LocalWorker:
    """One worker of this node and its bookkeeping."""

    name: str
    function: str
    generation: int
    spec: FunctionSpec
    concurrency: int
    #: The function's uid: a function deleted and created again under the same name
    #: never gets the old incarnation's workers.
    function_uid: UUID | None = None
    worker: rt.Worker | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str = ""
    in_flight: int = 0
    invocations: int = 0
    last_used: datetime | None = None
    ready_at: datetime | None = None
    cold_start_ms: float | None = None
    #: What the store was last told, to write only changes.
    reported: tuple[Any, ...] = ()
    starting: asyncio.Task[None] | None = field(default=None, repr=False)
    closed: bool = False

    @property
    def free(self) -> int:
        return self.concurrency - self.in_flight if self.worker is not None else 0


class LogRing:
    """The last lines handlers wrote to stderr on this node, per function (bounded)."""

    def __init__(self, per_function: int = 1000) -> None:
        self.per_function = per_function
        self.lines: dict[str, list[str]] = {}

    def add(self, function: str, line: str) -> None:
        ring = self.lines.setdefault(function, [])
        ring.append(line)
        if len(ring) > self.per_function:
            del ring[: len(ring) - self.per_function]

    def tail(self, function: str, n: int) -> list[str]:
        return self.lines.get(function, [])[-n:] if n > 0 else []


class FunctionHost:
    """Runs the function workers assigned to ``node_id``."""

    def __init__(
        self,
        store: StateStore,
        node_id: str,
        runtimes: Mapping[Runtime, rt.Runtime],
        work_root: Path,
        metrics: FunctionMetrics,
        *,
        report_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.node_id = node_id
        self.runtimes = dict(runtimes)
        self.work_root = work_root
        self.metrics = metrics
        self.report_s = report_s
        self.clock = clock
        self.workers: dict[str, LocalWorker] = {}
        self.logs = LogRing()
        #: Set whenever a slot frees or a worker becomes ready: waiting gateways look again.
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        #: Workers being closed (and dead workers' records being dropped): awaited at close.
        self._closing: set[asyncio.Task[None]] = set()

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Clear what a previous run left, adopt this node's worker records, follow them."""
        shutil.rmtree(self.work_root, ignore_errors=True)  # processes died with the daemon
        rt.ensure_dir(self.work_root)
        self._tasks.append(asyncio.create_task(self._follow()))
        self._tasks.append(asyncio.create_task(self._report_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for local in list(self.workers.values()):
            self._spawn_close(local)
        if self._closing:  # closes in progress finish (bounded): no process left behind
            await asyncio.wait(self._closing, timeout=60)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- starting -----------------------------------------------------------------------

    def ensure(self, record: FunctionWorker, spec: FunctionSpec) -> LocalWorker:
        """The local worker for ``record``, starting it if this is the first sight of it."""
        local = self.workers.get(record.metadata.name)
        if local is not None and local.generation == record.spec.generation:
            return local
        if local is not None:  # same name, another generation: the old one goes
            self._spawn_close(local)
        local = LocalWorker(
            name=record.metadata.name,
            function=record.spec.function,
            generation=record.spec.generation,
            spec=spec,
            function_uid=record.spec.function_uid,
            concurrency=spec.per_worker,
        )
        self.workers[local.name] = local
        local.starting = asyncio.create_task(self._start(local))
        return local

    async def _start(self, local: LocalWorker) -> None:
        began = self.clock()
        runtime = self.runtimes.get(local.spec.runtime)
        try:
            if runtime is None:
                raise rt.HandlerFailed(
                    f"node {self.node_id} has no {local.spec.runtime.value} runtime"
                )
            work_dir = rt.ensure_dir(self.work_root / local.name)
            worker = await runtime.start_worker(local.function, local.spec, work_dir)
        except Exception as exc:
            local.failed = f"worker {local.name} could not start on {self.node_id}: {exc}"
            log.warning("function worker failed to start", worker=local.name, error=str(exc))
            local.ready.set()
            await self._notify()
            await self._report(local)
            return
        if local.closed:
            await worker.close()
            return
        local.worker = worker
        local.concurrency = max(1, worker.concurrency)
        local.cold_start_ms = (self.clock() - began) * 1000.0
        local.ready_at = datetime.now(UTC)
        self.metrics.cold_start.labels(local.function).observe(local.cold_start_ms / 1000.0)
        local.ready.set()
        log.info(
            "function worker ready",
            worker=local.name,
            cold_start_ms=round(local.cold_start_ms, 1),
        )
        await self._notify()
        await self._report(local)

    # --- invoking -----------------------------------------------------------------------

    def try_acquire(self, name: str) -> LocalWorker:
        """Take one slot of worker ``name``: WorkerNotHere, or WorkerBusy if none is free."""
        local = self.workers.get(name)
        if local is None or local.closed:
            raise WorkerNotHere(f"no worker {name!r} on node {self.node_id}")
        if local.failed:
            raise rt.HandlerFailed(local.failed)
        if local.worker is None or not local.worker.alive() or local.free <= 0:
            raise WorkerBusy(f"worker {name!r} has no free slot")
        local.in_flight += 1
        return local

    def release(self, local: LocalWorker) -> None:
        """Give back a slot taken with :meth:`try_acquire` that was not used."""
        local.in_flight -= 1

    def free_local(self, function: str, generation: int, uid: UUID | None) -> list[LocalWorker]:
        """This node's ready workers of ``function`` with a free slot, most free first."""
        found = [
            w
            for w in self.workers.values()
            if w.function == function
            and w.generation == generation
            and (uid is None or w.function_uid in (None, uid))
            and not w.closed
            and not w.failed
            and w.worker is not None
            and w.free > 0
        ]
        return sorted(found, key=lambda w: -w.free)

    async def run(
        self, local: LocalWorker, event: bytes, context: dict[str, Any], timeout_s: float
    ) -> rt.Response:
        """Run one invocation on a slot taken with :meth:`try_acquire`, and give it back."""
        assert local.worker is not None
        began = self.clock()
        outcome = "ok"
        try:
            response = await local.worker.invoke(event, context, timeout_s)
            for line in response.logs.splitlines()[-20:]:
                self._log_line(local, context, line)
            return response
        except rt.HandlerTimeout:
            outcome = "timeout"
            raise
        except rt.HandlerFailed as exc:
            outcome = "error"
            if exc.detail:
                for line in exc.detail.splitlines()[-20:]:
                    self._log_line(local, context, line)
            raise
        except rt.WorkerGone:
            outcome = "error"
            self._spawn_close(local)
            await self._drop_record(local.name)
            raise
        finally:
            elapsed = self.clock() - began
            local.in_flight -= 1
            local.invocations += 1
            local.last_used = datetime.now(UTC)
            self.metrics.duration.labels(local.function).observe(elapsed)
            self.metrics.invocations.labels(local.function, outcome).inc()
            if local.worker is not None and not local.worker.alive() and not local.closed:
                # It died (e.g. its VM was discarded after a timeout): free its name
                # so a new worker can take its place.
                self._spawn_close(local)
                self._background(self._drop_record(local.name))
            await self._notify()

    def _log_line(self, local: LocalWorker, context: dict[str, Any], line: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        request = context.get("requestId", "-")
        self.logs.add(local.function, f"{stamp} {self.node_id} {local.name} {request} {line}")

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # --- following the store --------------------------------------------------------------

    async def _follow(self) -> None:
        prefix = kind_prefix(Kind.FUNCTION_WORKERS)
        while True:
            try:
                listed = await self.store.range(prefix)
                mine = set()
                for kv in listed.kvs:
                    record = _decode_worker(kv.value, kv.mod_revision)
                    if record is not None and record.spec.node == self.node_id:
                        mine.add(record.metadata.name)
                        await self._adopt(record)
                for name in set(self.workers) - mine:
                    self._spawn_close(self.workers[name])
                async for event in self.store.watch(prefix, from_revision=listed.revision + 1):
                    name = event.kv.key.rpartition("/")[2]
                    if event.type is EventType.DELETE:
                        if name in self.workers:
                            self._spawn_close(self.workers[name])
                        continue
                    record = _decode_worker(event.kv.value, event.kv.mod_revision)
                    if record is None:
                        continue
                    if record.spec.node == self.node_id:
                        await self._adopt(record)
                    elif name in self.workers:
                        self._spawn_close(self.workers[name])
            except StoreError as exc:
                log.info("function host watch restarting", error=str(exc))
                await asyncio.sleep(0.5)

    async def _adopt(self, record: FunctionWorker) -> None:
        local = self.workers.get(record.metadata.name)
        if local is not None and local.generation == record.spec.generation:
            return
        try:
            fn = await self.objects.get(Function, record.spec.function)
        except NotFound:
            return  # the autoscaler removes workers of deleted functions
        if fn.metadata.generation != record.spec.generation:
            return  # a stale worker: replaced, not started
        self.ensure(record, fn.spec)

    # --- reporting ------------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_s)
            for local in list(self.workers.values()):
                try:
                    await self._report(local)
                except StoreError as exc:
                    log.info("worker report failed", worker=local.name, error=str(exc))

    async def _report(self, local: LocalWorker) -> None:
        if local.closed:
            return
        state = (
            WorkerState.FAILED
            if local.failed
            else WorkerState.READY
            if local.worker is not None
            else WorkerState.STARTING
        )
        facts = (state, local.in_flight, local.invocations, local.last_used)
        if facts == local.reported:
            return

        def change(record: FunctionWorker) -> FunctionWorker:
            if record.spec.node != self.node_id or record.spec.generation != local.generation:
                raise NotFound("the record now describes another worker")
            status = record.status.model_copy(
                update={
                    "state": state,
                    "message": local.failed,
                    "in_flight": local.in_flight,
                    "invocations": local.invocations,
                    "last_used_at": local.last_used,
                    "ready_at": local.ready_at,
                    "cold_start_ms": local.cold_start_ms,
                }
            )
            return record.model_copy(update={"status": status})

        try:
            await self.objects.modify(FunctionWorker, local.name, change)
            local.reported = facts
        except NotFound:
            self._spawn_close(local)
        except Conflict:
            pass  # tried again at the next report

    async def _drop_record(self, name: str) -> None:
        """A worker that died is removed from the store (the gateway starts another)."""
        with contextlib.suppress(BlixardError):
            record = await self.objects.get(FunctionWorker, name)
            if record.spec.node == self.node_id:
                await self.objects.delete(record)

    # --- stopping -------------------------------------------------------------------------

    def _spawn_close(self, local: LocalWorker) -> None:
        if local.closed:
            return
        local.closed = True
        if self.workers.get(local.name) is local:
            del self.workers[local.name]
        self._background(self._close(local))

    async def _close(self, local: LocalWorker) -> None:
        local.closed = True
        if local.starting is not None and not local.starting.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await local.starting
        # Scale-down and replacement are graceful: calls already running finish
        # (within their timeout); no new call gets this worker once it is closed.
        deadline = self.clock() + local.spec.timeout_s
        while local.in_flight > 0 and self.clock() < deadline:  # noqa: ASYNC110 - rare, bounded
            await asyncio.sleep(0.05)
        if local.worker is not None:
            with contextlib.suppress(Exception):
                await local.worker.close()
            log.info("function worker stopped", worker=local.name)
        shutil.rmtree(self.work_root / local.name, ignore_errors=True)


def _decode_worker(raw: bytes, revision: int) -> FunctionWorker | None:
    try:
        return from_json_bytes(FunctionWorker, raw).with_resource_version(revision)
    except BlixardError:
        return None
