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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from blixard.domain.errors import LeaseNotFound, StoreError
from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import KvmState, Node, NodeSpec, NodeStatus
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
        ttl_s: int = 5,
        clock: Callable[[], float] = time.monotonic,
        version: str = "",
        hypervisors: Sequence[Hypervisor] = (),
        kvm: KvmState = KvmState.ABSENT,
        kvm_detail: str = "",
        vcpu_overcommit: float = 1.0,
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.node_id = node_id
        self.data_dir = data_dir
        self.api_url = api_url
        self.ttl_s = ttl_s
        self.clock = clock
        self.version = version
        self.hypervisors = list(hypervisors)
        self.kvm = kvm
        self.kvm_detail = kvm_detail
        self.vcpu_overcommit = vcpu_overcommit
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

        def refresh(node: Node) -> Node:
            spec = node.spec.model_copy(update={"api_url": self.api_url})
            status = node.status.model_copy(update=facts)
            return node.model_copy(update={"spec": spec, "status": status})

        existing = await self.objects.find(Node, self.node_id)
        if existing is None:
            node = Node(
                metadata=ObjectMeta(name=self.node_id, generation=1, created_at=now),
                spec=NodeSpec(api_url=self.api_url),
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

    def alive(self) -> bool:
        """True while the last keepalive proves our lease still lives."""
        return self.lease_id != 0 and self.clock() < self.valid_until

    async def _keepalive(self, ttl_s: int) -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
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

    async def close(self) -> None:
        """Leave cleanly: stop keepalives and revoke the lease (the liveness key goes with it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease_id:
            with contextlib.suppress(StoreError):
                await self.store.lease_revoke(self.lease_id)
        self.lease_id = 0
