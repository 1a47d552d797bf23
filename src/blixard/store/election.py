"""Leader election, built once on the StateStore's leases, transactions and watches.

Why not etcd's own election API: it must work on every backend, and the
library helpers measured here do not keep their lease alive. The recipe is
etcd's: the leader is whoever created ``/blixard/v1/election/<name>`` with
its lease; candidates watch the key and try again when it is deleted (the
leader resigned, or its lease expired).

The leader must stop acting as leader *before* the store could hand the role
to someone else. A keepalive sent at local time ``t`` proves the lease lives
at least until ``t + ttl`` (the store restarts the TTL when it receives the
request, which is later). So the holder's leadership is valid only until
``t + ttl - safety_margin`` of the last successful keepalive, on its own
monotonic clock; :meth:`Election.is_leader` is false past that even if the
store cannot be reached to say so. This assumes clocks on different hosts run
at the same *rate* within the margin (no assumption on wall-clock offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from blixard.domain.errors import LeaseNotFound, StoreError, ValidationError
from blixard.store.protocol import (
    Compare,
    EventType,
    Get,
    KeyValue,
    Put,
    StateStore,
)

ELECTION_PREFIX = "/blixard/v1/election/"


class Election:
    """One candidate in the election called ``name``."""

    def __init__(
        self,
        store: StateStore,
        name: str,
        candidate: str,
        *,
        ttl_s: int = 5,
        safety_margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not name or "/" in name:
            raise ValidationError("election", f"name must be non-empty without '/', got {name!r}")
        if not candidate:
            raise ValidationError("candidate", "must be non-empty")
        self.store = store
        self.key = ELECTION_PREFIX + name
        self.candidate = candidate
        self.ttl_s = ttl_s
        self.safety_margin_s = ttl_s / 5 if safety_margin_s is None else safety_margin_s
        self.clock = clock
        self.lease_id = 0
        self._valid_until = 0.0
        self._leader_revision = 0
        self._keepalive_task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    # --- the candidate's side -------------------------------------------------------------

    async def campaign(self) -> int:
        """Block until this candidate leads; returns the revision it was elected at.

        The campaign holds a lease for its whole life, so a crashed candidate's
        claim disappears with its lease.
        """
        await self._ensure_lease()
        value = self.candidate.encode()
        while True:
            result = await self.store.txn(
                [Compare.absent(self.key)],
                [Put(self.key, value, lease=self.lease_id)],
                [Get(self.key)],
            )
            if result.succeeded:
                self._leader_revision = result.revision
                self.lost.clear()
                return result.revision
            current = result.responses[0]
            assert isinstance(current, list)
            if current and current[0].lease == self.lease_id:  # our own claim from before
                self._leader_revision = current[0].create_revision
                self.lost.clear()
                return self._leader_revision
            await self._wait_for_delete(result.revision + 1)
            await self._ensure_lease()

    async def _wait_for_delete(self, from_revision: int) -> None:
        async for event in self.store.watch(self.key, from_revision=from_revision):
            if event.kv.key == self.key and event.type is EventType.DELETE:
                return

    def is_leader(self) -> bool:
        """True only while the last keepalive proves the lease still lives, with margin."""
        return (
            self._leader_revision > 0
            and not self.lost.is_set()
            and self.clock() < self._valid_until - self.safety_margin_s
        )

    async def resign(self) -> None:
        """Give up leadership now (the next candidate takes over without waiting a TTL)."""
        self._leader_revision = 0
        if self.lease_id:
            # Revoking the lease deletes our claim in the same revision.
            with contextlib.suppress(StoreError):
                await self.store.lease_revoke(self.lease_id)
        await self._stop_keepalive()
        self.lease_id = 0

    async def close(self) -> None:
        await self.resign()

    # --- the lease --------------------------------------------------------------------------

    async def _ensure_lease(self) -> None:
        if self.lease_id and self._keepalive_task is not None and not self._keepalive_task.done():
            return
        await self._stop_keepalive()
        sent = self.clock()
        lease = await self.store.lease_grant(self.ttl_s)
        self.lease_id = lease.id
        self._valid_until = sent + lease.ttl_s
        self.lost.clear()
        self._keepalive_task = asyncio.create_task(self._keepalive_loop(lease.ttl_s))

    async def _keepalive_loop(self, ttl_s: int) -> None:
        interval = max(ttl_s / 3, 0.05)
        try:
            while True:
                await asyncio.sleep(interval)
                sent = self.clock()
                left = self._valid_until - self.safety_margin_s - sent
                if left <= 0:
                    break
                try:
                    # Never wait past the point where leadership stops being proven:
                    # "lost" must be set before the store could elect someone else.
                    async with asyncio.timeout(left):
                        ttl = await self.store.lease_keepalive(self.lease_id)
                except LeaseNotFound:
                    break
                except (StoreError, TimeoutError):
                    if self.clock() >= self._valid_until - self.safety_margin_s:
                        break
                    continue
                self._valid_until = sent + ttl
        finally:
            self._leader_revision = 0
            self.lost.set()

    async def _stop_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def current_leader(store: StateStore, name: str) -> KeyValue | None:
    """Who leads ``name`` right now (None while nobody does)."""
    return await store.get(ELECTION_PREFIX + name)
