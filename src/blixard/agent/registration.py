"""A node's presence in the cluster: its record, and a lease that proves it is alive.

The record (``/blixard/v1/nodes/<id>``) persists across restarts and holds
what the node offers; the liveness key (``/blixard/v1/leases/nodes/<id>``) is
attached to a lease kept alive every TTL/3. When the node dies, the lease
expires and the store deletes the liveness key by itself, which is how the
rest of the cluster learns of the death without trusting the dead node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from blixard.domain.errors import LeaseNotFound, StoreError
from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import KvmState, Node, NodeRole, NodeSpec, NodeStatus
from blixard.domain.vm import Hypervisor
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

from .host import host_capacity

log = structlog.get_logger(__name__)


class NodeRegistration:
    """Registers this node and keeps its liveness lease alive."""

    def __init__(
        self,
        store: StateStore,
        node_id: str,
        data_dir: Path,
        *,
        api_url: str | None = None,
        gateway_url: str | None = None,
        function_runtimes: Sequence[str] = (),
        ttl_s: int = 5,
        clock: Callable[[], float] = time.monotonic,
        version: str = "",
        hypervisors: Sequence[Hypervisor] = (),
        kvm: KvmState = KvmState.ABSENT,
        kvm_detail: str = "",
        vcpu_overcommit: float = 1.0,
        roles: Sequence[NodeRole] | None = None,
        zone: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """``roles``, ``labels`` and ``zone`` come from the node's configuration and
        replace the record's at every registration. ``roles=None`` keeps the record's
        roles; ``labels=None`` keeps its labels and zone (``zone`` counts only with labels).
        """
        self.store = store
        self.objects = ObjectStore(store)
        self.node_id = node_id
        self.data_dir = data_dir
        self.api_url = api_url
        self.gateway_url = gateway_url
        self.function_runtimes = list(function_runtimes) if gateway_url else []
        self.ttl_s = ttl_s
        self.clock = clock
        self.version = version
        self.hypervisors = list(hypervisors)
        self.kvm = kvm
        self.kvm_detail = kvm_detail
        self.vcpu_overcommit = vcpu_overcommit
        self.roles = list(roles) if roles is not None else None
        self.zone = zone
        self.labels = dict(labels) if labels is not None else None
        self.lease_id = 0
        #: Until when (own monotonic clock) the last keepalive proves the lease lives.
        self.valid_until = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def liveness_key(self) -> str:
        return NODE_LEASES_PREFIX + self.node_id

    async def register(self) -> Node:
        """Create or refresh the node record, then take a fresh liveness lease."""
        capacity = host_capacity(self.data_dir, vcpu_overcommit=self.vcpu_overcommit)
        now = datetime.now(UTC)
        facts = {
            "ready": True,
            "capacity": capacity,
            "hypervisors": self.hypervisors,
            "kvm": self.kvm,
            "kvm_detail": self.kvm_detail,
            "agent_version": self.version,
            "last_heartbeat": now,
        }

        configured: dict[str, object] = {
            "api_url": self.api_url,
            "gateway_url": self.gateway_url,
            "function_runtimes": self.function_runtimes,
        }
        if self.roles is not None:
            configured["roles"] = self.roles
        if self.labels is not None:  # the zone comes with the labels: both are configuration
            configured["zone"] = self.zone

        def refresh(node: Node) -> Node:
            spec = node.spec.model_copy(update=configured)
            status = node.status.model_copy(update=facts)
            meta = node.metadata
            if self.labels is not None:
                meta = meta.model_copy(update={"labels": self.labels})
            return node.model_copy(update={"metadata": meta, "spec": spec, "status": status})

        existing = await self.objects.find(Node, self.node_id)
        if existing is None:
            node = Node(
                metadata=ObjectMeta(
                    name=self.node_id, generation=1, created_at=now, labels=self.labels or {}
                ),
                spec=NodeSpec.model_validate(configured),
                status=NodeStatus.model_validate(facts),
            )
            record = await self.objects.create(node)
        else:
            record = await self.objects.modify(Node, self.node_id, refresh)
        sent = self.clock()
        lease = await self.store.lease_grant(self.ttl_s)
        self.lease_id = lease.id
        self.valid_until = sent + lease.ttl_s
        await self.store.put(self.liveness_key, self.node_id.encode(), lease=lease.id)
        self._task = asyncio.create_task(self._keepalive(lease.ttl_s))
        log.info("node registered", node=self.node_id, lease=f"{lease.id:x}", ttl_s=lease.ttl_s)
        return record

    async def update_facts(
        self, *, hypervisors: Sequence[Hypervisor], kvm: KvmState, kvm_detail: str
    ) -> None:
        """Publish new driver facts (e.g. once the KVM probe has a verdict)."""
        self.hypervisors, self.kvm, self.kvm_detail = list(hypervisors), kvm, kvm_detail

        def change(node: Node) -> Node:
            status = node.status.model_copy(
                update={"hypervisors": self.hypervisors, "kvm": kvm, "kvm_detail": kvm_detail}
            )
            return node.model_copy(update={"status": status})

        await self.objects.modify(Node, self.node_id, change)

    def lease_remaining(self) -> float | None:
        """How long our lease is still proven to live, by our own clock (None: no lease)."""
        return self.valid_until - self.clock() if self.lease_id else None

    def alive(self) -> bool:
        """True while the last keepalive proves our lease still lives."""
        return self.lease_id != 0 and self.clock() < self.valid_until

    async def _keepalive(self, ttl_s: int) -> None:
        # Paced by the clock, not by the answers: a slow answer must not push the next
        # keepalive past the fencing deadline (the simulation found tasks fenced
        # with their lease alive when each sleep started after a 1 s answer).
        next_at = self.clock()
        while True:
            next_at = max(next_at + ttl_s / 3, self.clock() - ttl_s / 3)
            await asyncio.sleep(max(0.0, next_at - self.clock()))
            sent = self.clock()
            try:
                ttl = await self.store.lease_keepalive(self.lease_id)
            except LeaseNotFound:
                log.warning("liveness lease lost; registering again", node=self.node_id)
                with contextlib.suppress(StoreError):
                    await self._renew_lease()
                continue
            except StoreError as exc:
                log.warning("liveness keepalive failed", node=self.node_id, error=str(exc))
                continue
            self.valid_until = sent + ttl

    async def _renew_lease(self) -> None:
        sent = self.clock()
        lease = await self.store.lease_grant(self.ttl_s)
        self.lease_id = lease.id
        self.valid_until = sent + lease.ttl_s
        await self.store.put(self.liveness_key, self.node_id.encode(), lease=lease.id)

    async def close(self, *, revoke: bool = True) -> None:
        """Stop keepalives; with ``revoke``, also end the lease (the liveness key goes with it).

        In a cluster the daemon does not revoke on a clean stop: its fenced tasks
        live until their deadline, and a revoked lease would let the controller
        start them elsewhere first (docs/failover.md, "What a daemon restart means").
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease_id and revoke:
            with contextlib.suppress(StoreError):
                await self.store.lease_revoke(self.lease_id)
        self.lease_id = 0
