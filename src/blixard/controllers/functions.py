"""The function autoscaler (leader-elected): warm minimum, scale up under load, scale to zero.

Every ``interval_s`` it reads functions, workers, nodes and liveness, and per function:

* removes workers that cannot serve: of a deleted function or an older
  generation (a spec change replaces workers), past a lowered cap, on a node
  that is gone or runs no gateway with the runtime, whose start failed, or
  that never became ready (a later invocation tries a fresh one);
* scales up toward the target concurrency: one more worker per pass while the
  reported in-flight invocations need more (``ceil(in_flight / per_worker)``),
  or while every slot has been busy for two passes in a row (the excess then
  waits at the gateways), up to the cap; bursts between passes are met by the
  gateways' cold starts;
* keeps ``min_instances`` workers (placed by the scheduler, like cold starts);
* scales down: a ready worker idle (nothing in flight) for longer than
  ``scale_down_delay_s`` since its last use is removed, most idle first, never
  below ``min_instances``: with the default minimum of 0 that is scale to zero;
* writes the counts users see in ``function list`` (workers, warm, busy, where).

Gateways start workers on demand (a cold start) themselves; this loop is what
keeps workers warm ahead of demand and removes them after it. Both create
workers by "create if absent" on ``<fn>-w<i>``, so together they never pass the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from blixard.domain.errors import AlreadyExists, BlixardError, Conflict, NotFound
from blixard.domain.function import (
    Function,
    FunctionPhase,
    FunctionStatus,
    FunctionWorker,
    FunctionWorkerSpec,
    WorkerState,
    worker_name,
)
from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node
from blixard.scheduler.functions import can_host, worker_request, worker_views
from blixard.scheduler.placement import default_limit, place
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

log = structlog.get_logger(__name__)

#: Passes in a row with every slot busy before one more worker is added.
SATURATED_PASSES = 2
#: A worker still starting this long past its function's timeout is given up
#: (the gateways' start allowance is 30 s; a little more before judging).
START_LIMIT_S = 45.0


class FunctionAutoscaler:
    """One pass a second over every function (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        *,
        interval_s: float = 1.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.interval_s = interval_s
        self.now = now
        self.clock = clock
        #: Consecutive passes in which every slot of a function was busy.
        self._saturated: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except BlixardError as exc:
                log.info("function autoscaler pass failed", error=str(exc))
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> None:
        functions = {f.metadata.name: f for f in await self.objects.list(Function)}
        workers = await self.objects.list(FunctionWorker)
        nodes = {n.metadata.name: n for n in await self.objects.list(Node)}
        leases = await self.store.range(NODE_LEASES_PREFIX, keys_only=True)
        alive = {kv.key[len(NODE_LEASES_PREFIX) :] for kv in leases.kvs}
        by_function: dict[str, list[FunctionWorker]] = {}
        for worker in workers:
            fn = functions.get(worker.spec.function)
            why = self._unfit(worker, fn, nodes, alive)
            if why is not None:
                await self._remove(worker, why)
                continue
            by_function.setdefault(worker.spec.function, []).append(worker)
        kept = [w for ws in by_function.values() for w in ws]
        for name, fn in functions.items():
            mine = by_function.get(name, [])
            mine = await self._scale(fn, mine, kept, functions, nodes, alive)
            await self._publish(fn, mine)

    # --- decisions ---------------------------------------------------------------------

    def _unfit(
        self,
        worker: FunctionWorker,
        fn: Function | None,
        nodes: dict[str, Node],
        alive: set[str],
    ) -> str | None:
        if fn is None or (
            worker.spec.function_uid is not None and worker.spec.function_uid != fn.metadata.uid
        ):
            return "its function was deleted"
        if worker.spec.generation != fn.metadata.generation:
            return f"generation {worker.spec.generation} replaced by {fn.metadata.generation}"
        node = nodes.get(worker.spec.node)
        if node is None or worker.spec.node not in alive:
            return f"node {worker.spec.node} is down"
        if not can_host(node, fn.spec.runtime):
            return (
                f"node {worker.spec.node} runs no gateway with the {fn.spec.runtime.value} runtime"
            )
        if worker.spec.index >= fn.spec.worker_cap:
            return f"past the cap of {fn.spec.worker_cap} workers"
        if worker.status.state is WorkerState.FAILED:
            return f"its start failed: {worker.status.message}"
        created = worker.metadata.created_at
        if (
            worker.status.state is WorkerState.STARTING
            and created is not None
            and (self.now() - created).total_seconds() > fn.spec.timeout_s + START_LIMIT_S
        ):
            return "it did not become ready in time"
        return None

    async def _scale(
        self,
        fn: Function,
        mine: list[FunctionWorker],
        everyone: list[FunctionWorker],
        functions: dict[str, Function],
        nodes: dict[str, Node],
        alive: set[str],
    ) -> list[FunctionWorker]:
        spec = fn.spec
        now = self.now()
        in_flight = sum(w.status.in_flight for w in mine)
        ready = [w for w in mine if w.status.state is WorkerState.READY]
        wanted = math.ceil(in_flight / spec.per_worker)
        # Every slot busy pass after pass: load waits at the gateways, so one more
        # worker (sustained saturation, not one long call, adds capacity ahead of it).
        name = fn.metadata.name
        if ready and len(ready) == len(mine) and in_flight >= len(ready) * spec.per_worker:
            self._saturated[name] = self._saturated.get(name, 0) + 1
        else:
            self._saturated.pop(name, None)
        if self._saturated.get(name, 0) >= SATURATED_PASSES:
            wanted = max(wanted, len(mine) + 1)
        wanted = min(spec.worker_cap, max(spec.min_instances, wanted))
        if len(mine) < wanted:
            created = await self._add(fn, mine, everyone, functions, nodes, alive)
            if created is not None:
                mine = [*mine, created]
                everyone.append(created)
            return mine
        idle = sorted(
            (
                w
                for w in ready
                if w.status.in_flight == 0
                and (now - (w.status.last_used_at or w.status.ready_at or now)).total_seconds()
                >= spec.scale_down_delay_s
            ),
            key=lambda w: w.status.last_used_at or w.status.ready_at or now,
        )
        removable = max(0, len(mine) - max(spec.min_instances, wanted))
        for worker in idle[:removable]:
            await self._remove(worker, f"idle for {spec.scale_down_delay_s:g}s")
            mine = [w for w in mine if w.metadata.name != worker.metadata.name]
        return mine

    async def _add(
        self,
        fn: Function,
        mine: list[FunctionWorker],
        everyone: list[FunctionWorker],
        functions: dict[str, Function],
        nodes: dict[str, Node],
        alive: set[str],
    ) -> FunctionWorker | None:
        name = fn.metadata.name
        taken = {w.spec.index for w in mine}
        index = next((i for i in range(fn.spec.worker_cap) if i not in taken), None)
        if index is None:
            return None
        views = worker_views(
            nodes.values(),
            alive,
            everyone,
            {n: f.spec for n, f in functions.items()},
            runtime=fn.spec.runtime,
        )
        request = worker_request(fn.spec)
        decision = place(views, request, limit=default_limit(len(views), request))
        if decision.node is None:
            log.info("no node for a warm worker", function=name, reason=decision.reason)
            return None
        record = FunctionWorker(
            metadata=ObjectMeta(
                name=worker_name(name, index),
                uid=uuid.uuid4(),
                generation=1,
                created_at=self.now(),
            ),
            spec=FunctionWorkerSpec(
                function=name,
                function_uid=fn.metadata.uid,
                generation=fn.metadata.generation,
                index=index,
                node=decision.node,
                reason="autoscaler",
            ),
        )
        try:
            created = await self.objects.create(record)
        except AlreadyExists:
            return None  # a gateway took the index in the meantime
        log.info("worker added", function=name, worker=record.metadata.name, node=decision.node)
        return created

    async def _remove(self, worker: FunctionWorker, why: str) -> None:
        try:
            await self.objects.delete(worker)
        except (Conflict, NotFound):
            return  # it changed (e.g. just got busy): judged again next pass
        log.info("worker removed", worker=worker.metadata.name, reason=why)

    async def _publish(self, fn: Function, mine: list[FunctionWorker]) -> None:
        ready = [w for w in mine if w.status.state is WorkerState.READY]
        where: dict[str, int] = {}
        for w in ready:
            where[w.spec.node] = where.get(w.spec.node, 0) + 1
        busy = sum(1 for w in ready if w.status.in_flight > 0)
        status = FunctionStatus(
            phase=fn.status.phase,
            message=fn.status.message,
            workers=len(mine),
            warm_workers=len(ready) - busy,
            busy_workers=busy,
            nodes=dict(sorted(where.items())),
            observed_generation=fn.metadata.generation,
        )
        if status.phase is FunctionPhase.PENDING:
            status = status.model_copy(update={"phase": FunctionPhase.READY})
        if status == fn.status:
            return
        with contextlib.suppress(Conflict, NotFound):  # the user changed it: next pass
            await self.objects.update(fn.model_copy(update={"status": status}))
