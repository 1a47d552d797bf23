"""The function gateway of one node: admit, route, cold-start, forward, count.

An invocation arriving here (the invoke API or an HTTP trigger) goes to a
worker with a free slot: one of this node's first (no network hop), then a
ready worker on another node (forwarded to that node's gateway). When none
is free it waits in this gateway's queue for the function (at most
``queue_limit`` invocations; past it: 429) while, if the workers being
started cannot absorb the queue, it starts one more worker on the node the
scheduler picks (a cold start), up to the function's worker cap.

Creating a worker is "create if absent" on the name ``<fn>-w<i>`` with ``i``
below the cap, so gateways on many nodes and the autoscaler cannot together
start more than the cap; execution slots are counted by the host that runs
the worker, so the cap on concurrent executions (``max_concurrency``) holds
for the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from blixard.domain.errors import (
    AlreadyExists,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
)
from blixard.domain.function import (
    Function,
    FunctionWorker,
    FunctionWorkerSpec,
    WorkerState,
    worker_name,
)
from blixard.domain.keys import ROOT
from blixard.domain.meta import ObjectMeta
from blixard.functions import runtime as rt
from blixard.functions.host import FunctionHost, LocalWorker, WorkerBusy, WorkerNotHere
from blixard.functions.metrics import FunctionMetrics
from blixard.functions.view import FunctionView
from blixard.scheduler.functions import worker_request, worker_views
from blixard.scheduler.placement import default_limit, place
from blixard.store.objects import ObjectStore
from blixard.store.protocol import Compare, Get, Put, StateStore

log = structlog.get_logger(__name__)

#: Largest event accepted (bytes): past it, 413 before anything runs.
MAX_EVENT_BYTES = 6 * 1024 * 1024
#: Where the cluster's gateway secret lives (node-to-node forwarding proves it).
SECRET_KEY = ROOT + "gateway/secret"
#: Header carrying that secret on node-to-node calls.
SECRET_HEADER = "X-Blixard-Gateway-Secret"
#: Added to a function's timeout for how long an invocation may wait for a free slot:
#: room for a worker to start (a microVM booting without a template takes seconds).
START_ALLOWANCE_S = 30.0
#: How long a remote worker that answered "busy" is not asked again.
REMOTE_BUSY_S = 0.1
#: Marks an answer of a forwarded call as the remote gateway's (not a proxy's, not an error
#: page): anything without it is not a handler's answer.
FORWARDED_HEADER = "X-Blixard-Forwarded"
#: How long a waiting invocation sleeps between looks when nothing wakes it (remote slots
#: free without telling this node).
POLL_S = 0.02


@dataclass(frozen=True)
class Result:
    """An invocation's answer and how it was served."""

    response: rt.Response
    request_id: str
    cold: bool
    node: str
    worker: str
    duration_ms: float

    def headers(self) -> dict[str, str]:
        return {
            "X-Blixard-Request-Id": self.request_id,
            "X-Blixard-Cold-Start": "true" if self.cold else "false",
            "X-Blixard-Node": self.node,
            "X-Blixard-Worker": self.worker,
            "X-Blixard-Duration-Ms": f"{self.duration_ms:.3f}",
        }


@dataclass
class _Queue:
    """Invocations of one function waiting at this gateway."""

    waiting: int = 0


async def cluster_secret(store: StateStore) -> str:
    """The gateway secret shared by every node: read it, or create it if it is the first."""
    fresh = secrets.token_hex(32)
    res = await store.txn(
        [Compare.absent(SECRET_KEY)], [Put(SECRET_KEY, fresh.encode())], [Get(SECRET_KEY)]
    )
    if res.succeeded:
        return fresh
    found = res.responses[0]
    assert isinstance(found, list) and found, "the secret vanished between compare and get"
    return found[0].value.decode()


class Gateway:
    """Routes invocations of any function to workers anywhere in the cluster."""

    def __init__(
        self,
        store: StateStore,
        node_id: str,
        host: FunctionHost,
        metrics: FunctionMetrics,
        *,
        secret: str,
        clock: Callable[[], float] = time.monotonic,
        forward_timeout_s: float = 5.0,
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.node_id = node_id
        self.host = host
        self.metrics = metrics
        self.secret = secret
        self.clock = clock
        self.changed = host.changed
        self.view = FunctionView(store, self.changed)
        self.forward_timeout_s = forward_timeout_s
        self._queues: dict[str, _Queue] = {}
        #: Remote workers that answered "busy", and until when they are not asked again.
        self._busy_until: dict[str, float] = {}
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.forward_timeout_s))
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()
        if self._http is not None:
            await self._http.aclose()

    # --- the invocation path ----------------------------------------------------------------

    async def function(self, name: str) -> Function:
        """The function from the view, or from the store if the view has not seen it yet."""
        fn = self.view.functions.get(name)
        if fn is None:
            try:
                fn = await self.objects.get(Function, name)
            except NotFound:
                raise NotFound(f"function {name!r} does not exist") from None
            self.view.put_function(fn)
        return fn

    async def invoke(self, name: str, event: bytes, http: dict[str, Any] | None = None) -> Result:
        """Run ``name`` once on ``event`` (JSON bytes) and say how it was served."""
        if len(event) > MAX_EVENT_BYTES:
            self.metrics.invocations.labels(name, "rejected").inc()
            raise PayloadTooLarge(
                f"the event is {len(event)} bytes; the gateway accepts at most {MAX_EVENT_BYTES}"
            )
        fn = await self.function(name)
        request_id = uuid.uuid4().hex
        context = rt.event_context(name, request_id, http)
        arrived_mono, arrived = self.clock(), datetime.now(UTC)
        queue = self._queues.setdefault(name, _Queue())
        deadline = arrived_mono + fn.spec.timeout_s + START_ALLOWANCE_S
        queued = False
        try:
            while True:
                current = self.view.functions.get(name)
                if current is None:  # function() put it in the view: it was deleted since
                    raise NotFound(f"function {name!r} was deleted")
                fn = current
                served = await self._try_serve(fn, event, context, arrived, arrived_mono)
                if served is not None:
                    return served
                if not queued:
                    # Waiting for a worker that is starting (or may still start) is not
                    # queueing behind busy slots: those waits come on top of queue_limit.
                    if queue.waiting >= fn.spec.queue_limit + self._unstarted_slots(fn):
                        self.metrics.invocations.labels(name, "rejected").inc()
                        raise TooManyRequests(
                            f"function {name!r} is at its concurrency limit "
                            f"({fn.spec.max_concurrency} executions) and {queue.waiting} "
                            f"invocations wait at this gateway (queue_limit "
                            f"{fn.spec.queue_limit})"
                        )
                    queue.waiting += 1
                    queued = True
                await self._maybe_start_worker(fn, queue)
                if self.clock() >= deadline:
                    self.metrics.invocations.labels(name, "rejected").inc()
                    raise NoCapacity(
                        f"no worker of {name!r} was free within its timeout plus "
                        f"{START_ALLOWANCE_S:g}s to start one ({fn.spec.timeout_s:g}s)"
                    )
                await self._wait_for_change(min(POLL_S, max(0.0, deadline - self.clock())))
        finally:
            if queued:
                queue.waiting -= 1

    async def _try_serve(
        self,
        fn: Function,
        event: bytes,
        context: dict[str, Any],
        arrived: datetime,
        arrived_mono: float,
    ) -> Result | None:
        """Run on a free worker if there is one (this node's first); None if none is free."""
        name = fn.metadata.name
        cap = fn.spec.worker_cap
        for local in self.host.free_local(name, fn.metadata.generation, fn.metadata.uid):
            record = self.view.workers.get(local.name)
            if record is not None and record.spec.index >= cap:
                continue  # past a lowered cap: it drains and goes
            try:
                self.host.try_acquire(local.name)
            except (WorkerBusy, WorkerNotHere):
                continue
            self._count_start(local.ready_at, arrived, name, arrived_mono)
            began = self.clock()
            try:
                response = await self.host.run(local, event, context, fn.spec.timeout_s)
            except rt.WorkerGone:
                continue  # it died before running anything: another worker, or a new one
            return self._result(response, context, local.ready_at, arrived, local.name, began)
        now = self.clock()
        for worker in self.view.ready_remote(fn, self.node_id):
            if worker.spec.index >= cap or self._busy_until.get(worker.metadata.name, 0) > now:
                continue
            url = self.view.gateway_url(worker.spec.node)
            assert url is not None
            began = self.clock()
            try:
                response = await self._forward(url, worker, event, context, fn.spec.timeout_s)
            except WorkerBusy:
                # Its node does not tell us when a slot frees: leave it alone a moment
                # rather than send the whole event again every poll.
                self._busy_until[worker.metadata.name] = self.clock() + REMOTE_BUSY_S
                continue
            except WorkerNotHere:
                continue
            except (rt.HandlerFailed, rt.HandlerTimeout):
                self._count_start(worker.status.ready_at, arrived, name, arrived_mono)
                raise
            self._count_start(worker.status.ready_at, arrived, name, arrived_mono)
            return self._result(
                response, context, worker.status.ready_at, arrived, worker.metadata.name, began,
                node=worker.spec.node,
            )  # fmt: skip
        return None

    def _count_start(
        self, ready_at: datetime | None, arrived: datetime, name: str, arrived_mono: float
    ) -> None:
        cold = ready_at is None or ready_at >= arrived
        self.metrics.starts.labels(name, "cold" if cold else "warm").inc()
        self.metrics.queue.labels(name).observe(self.clock() - arrived_mono)

    def _result(
        self,
        response: rt.Response,
        context: dict[str, Any],
        ready_at: datetime | None,
        arrived: datetime,
        worker: str,
        began: float,
        node: str | None = None,
    ) -> Result:
        return Result(
            response=response,
            request_id=str(context["requestId"]),
            cold=ready_at is None or ready_at >= arrived,
            node=node or self.node_id,
            worker=worker,
            duration_ms=(self.clock() - began) * 1000.0,
        )

    def _unstarted_slots(self, fn: Function) -> int:
        """Execution slots of workers still starting, plus those the cap lets start."""
        current = [
            w
            for w in self.view.workers_of(fn.metadata.name)
            if _of_this(w, fn) and w.status.state is not WorkerState.FAILED
        ]
        starting = 0
        for w in current:
            local = self.host.workers.get(w.metadata.name)
            ready = (
                local.worker is not None
                if local is not None
                else (w.status.state is WorkerState.READY)
            )
            starting += 0 if ready else 1
        room = max(0, fn.spec.worker_cap - len(current))
        return (starting + room) * fn.spec.per_worker

    async def _wait_for_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self.changed:
                await self.changed.wait()

    # --- cold starts ------------------------------------------------------------------------

    async def _maybe_start_worker(self, fn: Function, queue: _Queue) -> None:
        """Start one more worker if the ones starting cannot take the queue, within the cap."""
        name, generation = fn.metadata.name, fn.metadata.generation
        workers = self.view.workers_of(name)
        current = [w for w in workers if _of_this(w, fn)]

        def failed(w: FunctionWorker) -> str | None:
            local = self.host.workers.get(w.metadata.name)
            if local is not None and local.failed:
                return local.failed
            if w.status.state is WorkerState.FAILED:
                return w.status.message or f"worker {w.metadata.name} failed to start"
            return None

        failures = [f for f in map(failed, current) if f is not None]
        live = [w for w in current if failed(w) is None]
        if failures and not live:
            # Its start failed: say why now; the autoscaler clears the record so a later
            # invocation tries again (a handler fixed by an update gets a new generation).
            raise rt.HandlerFailed(failures[0])
        starting = sum(fn.spec.per_worker for w in live if w.status.state is WorkerState.STARTING)
        if starting >= queue.waiting or len(live) >= fn.spec.worker_cap:
            return
        taken = {w.spec.index for w in workers}
        index = next((i for i in range(fn.spec.worker_cap) if i not in taken), None)
        if index is None:
            return  # every index is held (old generations go soon): wait
        views = worker_views(
            self.view.nodes.values(),
            self.view.alive,
            self.view.workers.values(),
            {n: f.spec for n, f in self.view.functions.items()},
            runtime=fn.spec.runtime,
        )
        if not views:
            self.metrics.invocations.labels(name, "rejected").inc()
            raise NoCapacity(
                f"no node runs a function gateway with the {fn.spec.runtime.value} runtime"
            )
        me = self.view.nodes.get(self.node_id)
        zone = me.spec.zone if me is not None else None
        request = worker_request(fn.spec, near_zone=zone)
        decision = place(views, request, limit=default_limit(len(views), request))
        if decision.node is None:
            self.metrics.invocations.labels(name, "rejected").inc()
            raise NoCapacity(f"no node can run a worker of {name!r}: {decision.reason}")
        record = FunctionWorker(
            metadata=ObjectMeta(
                name=worker_name(name, index),
                uid=uuid.uuid4(),
                generation=1,
                created_at=datetime.now(UTC),
            ),
            spec=FunctionWorkerSpec(
                function=name,
                function_uid=fn.metadata.uid,
                generation=generation,
                index=index,
                node=decision.node,
                reason="gateway",
            ),
        )
        try:
            created = await self.objects.create(record)
        except AlreadyExists:
            return  # another gateway took that index first: look again
        self.view.put_worker(created)
        log.info("cold start", function=name, worker=created.metadata.name, node=decision.node)
        if decision.node == self.node_id:
            self.host.ensure(created, fn.spec)

    # --- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self,
        url: str,
        worker: FunctionWorker,
        event: bytes,
        context: dict[str, Any],
        timeout_s: float,
    ) -> rt.Response:
        """Run on another node's worker through its gateway (one hop, never re-forwarded)."""
        assert self._http is not None
        target = f"{url}/_blixard/v1/workers/{worker.metadata.name}/invoke"
        headers = {
            SECRET_HEADER: self.secret,
            "X-Blixard-Context": json.dumps(context, separators=(",", ":")),
            "X-Blixard-Timeout": f"{timeout_s}",
            "Content-Type": "application/json",
        }
        try:
            resp = await self._http.post(
                target,
                content=event,
                headers=headers,
                timeout=httpx.Timeout(self.forward_timeout_s, read=timeout_s + 5.0),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing was sent: safe to try another worker.
            raise WorkerNotHere(f"node {worker.spec.node} did not answer: {exc}") from None
        except httpx.TimeoutException:
            # Sent, no answer in time: it may have run. Never run it a second time.
            raise rt.HandlerTimeout(
                f"node {worker.spec.node} did not answer within the function's timeout"
            ) from None
        except httpx.HTTPError as exc:
            raise rt.HandlerFailed(
                f"the call to node {worker.spec.node} failed after it was sent: {exc}"
            ) from None
        code = resp.headers.get("X-Blixard-Error")
        if code is not None:
            message = _error_message(resp)
            if code == WorkerBusy.code:
                raise WorkerBusy(message)
            if code in {WorkerNotHere.code, "not_found"}:
                raise WorkerNotHere(message)
            if code == rt.HandlerTimeout.code:
                raise rt.HandlerTimeout(message)
            raise rt.HandlerFailed(message)
        if resp.headers.get(FORWARDED_HEADER) != "1":
            raise rt.HandlerFailed(
                f"node {worker.spec.node} answered HTTP {resp.status_code} without a handler's "
                "answer (a proxy in between, or a request it could not read)"
            )
        try:
            own = json.loads(resp.headers.get("X-Blixard-Handler-Headers", "{}"))
            return rt.Response(resp.status_code, _body_of(resp), dict(own))
        except ValueError:
            raise rt.HandlerFailed(f"node {worker.spec.node} sent an unreadable answer") from None

    # --- serving forwarded calls (the other side of _forward) ---------------------------------

    def acquire_forwarded(self, worker: str) -> LocalWorker:
        """Take a slot for a call another gateway forwards (before its body is read)."""
        return self.host.try_acquire(worker)

    async def serve_forwarded(
        self, local: LocalWorker, event: bytes, context: dict[str, Any], timeout_s: float
    ) -> rt.Response:
        """Run a forwarded call on the slot :meth:`acquire_forwarded` took."""
        try:
            return await self.host.run(local, event, context, timeout_s)
        except rt.WorkerGone as exc:
            # Raised before anything ran (runtimes report a death mid-call as
            # HandlerFailed): the caller's gateway may try another worker.
            raise WorkerNotHere(str(exc)) from None


def _of_this(worker: FunctionWorker, fn: Function) -> bool:
    """A worker of this incarnation and generation of ``fn``, within its cap."""
    uid = worker.spec.function_uid
    return (
        worker.spec.generation == fn.metadata.generation
        and (uid is None or uid == fn.metadata.uid)
        and worker.spec.index < fn.spec.worker_cap
    )


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}"


def _body_of(resp: httpx.Response) -> Any:
    """The handler's body as the worker's node sent it back (JSON or text)."""
    kind = resp.headers.get("X-Blixard-Body", "json")
    if kind == "text":
        return resp.text
    if not resp.content:
        return None
    return json.loads(resp.content)


async def gather(gateway: Gateway, path: str, local: Callable[[], Any]) -> list[tuple[str, Any]]:
    """``local()`` here and ``GET <gateway>/_blixard/v1/<path>`` on every other live node.

    A node that does not answer within a few seconds is left out (its figures
    are missing from the sum; the answer lists the nodes it covers).
    """
    assert gateway._http is not None
    answers: list[tuple[str, Any]] = [(gateway.node_id, local())]
    view = gateway.view
    others = sorted(n for n in view.alive if n != gateway.node_id and view.gateway_url(n))

    async def one(node: str) -> tuple[str, Any] | None:
        url = f"{view.gateway_url(node)}/_blixard/v1/{path}"
        try:
            assert gateway._http is not None
            resp = await gateway._http.get(
                url, headers={SECRET_HEADER: gateway.secret}, timeout=3.0
            )
            resp.raise_for_status()
            return node, resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.info("node left out of a gathered answer", node=node, error=str(exc))
            return None

    for found in await asyncio.gather(*(one(n) for n in others)):
        if found is not None:
            answers.append(found)
    return answers
