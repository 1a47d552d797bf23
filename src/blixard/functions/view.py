"""The gateway's picture of functions, their workers and the nodes, kept by watches.

Routing an invocation must not cost a store read: the gateway reads this
view, fed by one list-then-watch per prefix (functions, workers, nodes, node
liveness). Its own writes are put in at once (:meth:`put_worker`) so a
worker it just created is seen before the watch brings it back. Every
change wakes the invocations waiting for a free worker (``changed``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from blixard.domain.errors import BlixardError, StoreError
from blixard.domain.function import Function, FunctionWorker, WorkerState
from blixard.domain.keys import NODE_LEASES_PREFIX, Kind, kind_prefix
from blixard.domain.meta import StoredObject
from blixard.domain.node import Node
from blixard.domain.parse import from_json_bytes
from blixard.store.protocol import EventType, KeyValue, StateStore

log = structlog.get_logger(__name__)


class FunctionView:
    """Functions, workers, nodes and liveness, as of the latest watch events."""

    def __init__(self, store: StateStore, changed: asyncio.Condition) -> None:
        self.store = store
        self.changed = changed
        self.functions: dict[str, Function] = {}
        self.workers: dict[str, FunctionWorker] = {}
        self.nodes: dict[str, Node] = {}
        self.alive: set[str] = set()
        self._seen: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        """Start following; returns once every prefix was listed once (or failed to be)."""
        follows: list[tuple[str, Callable[[KeyValue | None, str], None]]] = [
            (kind_prefix(Kind.FUNCTIONS), self._function),
            (kind_prefix(Kind.FUNCTION_WORKERS), self._worker),
            (kind_prefix(Kind.NODES), self._node),
            (NODE_LEASES_PREFIX, self._lease),
        ]
        listed = [asyncio.Event() for _ in follows]
        for (prefix, apply), done in zip(follows, listed, strict=True):
            self._tasks.append(asyncio.create_task(self._follow(prefix, apply, done)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                for done in listed:
                    await done.wait()
        self.loaded.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- reads ------------------------------------------------------------------------

    def workers_of(self, function: str) -> list[FunctionWorker]:
        return [w for w in self.workers.values() if w.spec.function == function]

    def gateway_url(self, node: str) -> str | None:
        record = self.nodes.get(node)
        return None if record is None else record.spec.gateway_url

    def ready_remote(self, fn: Function, me: str) -> list[FunctionWorker]:
        """Ready workers of ``fn``'s generation on other live nodes, least busy first."""
        found = [
            w
            for w in self.workers_of(fn.metadata.name)
            if w.spec.node != me
            and w.spec.generation == fn.metadata.generation
            and w.spec.function_uid in (None, fn.metadata.uid)
            and w.status.state is WorkerState.READY
            and w.spec.node in self.alive
            and self.gateway_url(w.spec.node)
        ]
        return sorted(found, key=lambda w: (w.status.in_flight, w.metadata.name))

    def route(self, path: str, method: str) -> Function | None:
        """The function with an HTTP trigger on ``method path``, if any."""
        for fn in self.functions.values():
            for trigger in fn.spec.triggers:
                if trigger.path == path and method in trigger.methods:
                    return fn
        return None

    # --- own writes ---------------------------------------------------------------------

    def put_worker(self, worker: FunctionWorker) -> None:
        key = worker.key()
        if worker.metadata.resource_version <= self._seen.get(key, 0):
            return
        self._seen[key] = worker.metadata.resource_version
        self.workers[worker.metadata.name] = worker

    def put_function(self, fn: Function) -> None:
        key = fn.key()
        if fn.metadata.resource_version <= self._seen.get(key, 0):
            return
        self._seen[key] = fn.metadata.resource_version
        self.functions[fn.metadata.name] = fn

    # --- following ----------------------------------------------------------------------

    async def _follow(
        self,
        prefix: str,
        apply: Callable[[KeyValue | None, str], None],
        listed: asyncio.Event,
    ) -> None:
        while True:
            try:
                result = await self.store.range(prefix)
                names = set()
                for kv in result.kvs:
                    names.add(kv.key)
                    self._apply(apply, kv, kv.key, kv.mod_revision)
                for key in [k for k in self._seen if k.startswith(prefix) and k not in names]:
                    self._apply(apply, None, key, result.revision)
                listed.set()
                await self._notify()
                async for event in self.store.watch(prefix, from_revision=result.revision + 1):
                    got = None if event.type is EventType.DELETE else event.kv
                    self._apply(apply, got, event.kv.key, event.revision)
                    await self._notify()
            except StoreError as exc:
                listed.set()
                log.info("gateway view watch restarting", prefix=prefix, error=str(exc))
                await asyncio.sleep(0.5)

    def _apply(
        self,
        apply: Callable[[KeyValue | None, str], None],
        kv: KeyValue | None,
        key: str,
        revision: int,
    ) -> None:
        if revision < self._seen.get(key, 0):
            return
        self._seen[key] = revision
        with contextlib.suppress(BlixardError):  # unreadable: not routable, not fatal
            apply(kv, key)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _function(self, kv: KeyValue | None, key: str) -> None:
        _put_or_drop(self.functions, Function, kv, key)

    def _worker(self, kv: KeyValue | None, key: str) -> None:
        _put_or_drop(self.workers, FunctionWorker, kv, key)

    def _node(self, kv: KeyValue | None, key: str) -> None:
        _put_or_drop(self.nodes, Node, kv, key)

    def _lease(self, kv: KeyValue | None, key: str) -> None:
        node = key[len(NODE_LEASES_PREFIX) :]
        if kv is None:
            self.alive.discard(node)
        else:
            self.alive.add(node)


def _put_or_drop(
    into: dict[str, Any], cls: type[StoredObject], kv: KeyValue | None, key: str
) -> None:
    name = key.rpartition("/")[2]
    if kv is None:
        into.pop(name, None)
    else:
        into[name] = from_json_bytes(cls, kv.value).with_resource_version(kv.mod_revision)
