"""The VM controller: turns each VM into its instances, fails them over, reports status.

Level-triggered, like a Kubernetes controller: the decisions are a pure
function of a snapshot (:mod:`blixard.controllers.plan`); this module keeps
the snapshot current (:mod:`blixard.controllers.cache`, one watch) and
commits the decisions. Only the elected leader runs it.

Commits are compare-and-swap on every key, batched into transactions of up
to :data:`BATCH` writes (placing a thousand instances is then a handful of
round trips). A batch whose compares fail is retried write by write; a write
that still conflicts is dropped, its VM marked for the next pass, which
decides again from the newer state the watch brings. A pass never writes
blindly over a change it did not see.

Passes run after every change seen (only for the VMs it touched), after a
failover grace ends, and every ``resync_s`` for everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog

from blixard.controllers.cache import ClusterCache
from blixard.controllers.plan import Action, Create, Delete, Plan, Policy, Snapshot, Update, plan
from blixard.domain.errors import Compacted, Conflict, StoreError
from blixard.domain.instance import Instance
from blixard.domain.keys import ROOT
from blixard.domain.parse import to_json_bytes
from blixard.store.protocol import Compare, Put, StateStore, TxnOp
from blixard.store.protocol import Delete as DeleteOp

log = structlog.get_logger(__name__)

#: Writes per transaction (etcd's default limit is 128 operations).
BATCH = 64


class VmController:
    def __init__(
        self,
        store: StateStore,
        *,
        resync_s: float = 5.0,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        coalesce_s: float = 0.02,
        new_uid: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        self.store = store
        self.resync_s = resync_s
        self.policy = policy or Policy()
        self.clock = clock
        self.now = now
        self.coalesce_s = coalesce_s
        self.new_uid = new_uid
        self.cache = ClusterCache()
        self.down_since: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._everything = True
        self._kick = asyncio.Event()
        self.passes = 0

    # --- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled (see the module docstring)."""
        while True:
            try:
                await self.cache.load(self.store)
                self._everything = True
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._follow())
                    group.create_task(self._loop())
            except* (Compacted, StoreError, Conflict) as errors:
                first = errors.exceptions[0]
                log.info("vm controller restarting from a fresh read", error=str(first))
                await asyncio.sleep(0.2)

    async def _follow(self) -> None:
        async for event in self.store.watch(ROOT, from_revision=self.cache.revision + 1):
            change = self.cache.apply(event)
            if change.everything:
                self._everything = True
            self._dirty |= change.vms
            if change.everything or change.vms:
                self._kick.set()

    async def _loop(self) -> None:
        next_full = self.clock() + self.resync_s
        while True:
            wake_at = await self.sync()
            deadline = min(next_full, wake_at if wake_at is not None else next_full)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self.clock())):
                    await self._kick.wait()
            if self.clock() >= next_full:
                self._everything = True
                next_full = self.clock() + self.resync_s
            if wake_at is not None and self.clock() >= wake_at:
                self._everything = True
            await asyncio.sleep(self.coalesce_s)  # coalesce a burst of events into one pass

    # --- one pass -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        cache, now = self.cache, self.clock()
        referenced = set(cache.nodes) | {
            i.spec.node for i in cache.instances.values() if i.spec.node is not None
        }
        for name in referenced:
            if name in cache.alive and name in cache.nodes:
                self.down_since.pop(name, None)
            else:
                self.down_since.setdefault(name, now)
        for name in list(self.down_since):
            if name not in referenced:
                del self.down_since[name]
        return Snapshot(
            vms=cache.vms,
            instances=cache.instances,
            nodes=cache.nodes,
            alive=cache.alive,
            down_since=dict(self.down_since),
            now=now,
            wall=self.now(),
        )

    async def full_pass(self, *, reload: bool = True) -> float | None:
        """A pass over everything, from a fresh read of the store unless ``reload`` is False."""
        if reload:
            await self.cache.load(self.store)
        self._everything = True
        return await self.sync()

    async def sync(self) -> float | None:
        """One pass over what changed (or everything); returns when to wake on its own."""
        self._kick.clear()
        only = None if self._everything else set(self._dirty)
        self._everything = False
        self._dirty.clear()
        decided = plan(self.snapshot(), self.policy, only=only, new_uid=self.new_uid)
        await self.commit(decided)
        self.passes += 1
        return decided.wake_at

    async def commit(self, decided: Plan) -> None:
        for start in range(0, len(decided.actions), BATCH):
            batch = decided.actions[start : start + BATCH]
            if not await self._commit_batch(batch):
                for action in batch:
                    await self._commit_batch([action])

    async def _commit_batch(self, actions: Sequence[Action]) -> bool:
        """All of ``actions`` in one transaction, or none; False on a conflict."""
        compares: list[Compare] = []
        ops: list[TxnOp] = []
        for action in actions:
            key = action.obj.key()
            if isinstance(action, Create):
                compares.append(Compare.absent(key))
                ops.append(Put(key, to_json_bytes(action.obj)))
            elif isinstance(action, Update):
                compares.append(Compare.mod(key, action.obj.metadata.resource_version))
                ops.append(Put(key, to_json_bytes(action.obj)))
            else:
                compares.append(Compare.mod(key, action.obj.metadata.resource_version))
                ops.append(DeleteOp(key))
        result = await self.store.txn(compares, ops)
        if not result.succeeded:
            for action in actions:
                if isinstance(action.obj, Instance):
                    self._dirty.add(action.obj.spec.vm)
                else:
                    self._everything = True
            if len(actions) == 1:
                log.debug("write conflicted; deciding again", key=actions[0].obj.key())
            return False
        for action in actions:
            if isinstance(action, Delete):
                self.cache.deleted(action.obj, result.revision)
            else:
                self.cache.wrote(action.obj, result.revision)
        return True
