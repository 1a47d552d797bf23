"""The VM controller: turns each VM into its instances and reports the VM's status.

Level-triggered, like a Kubernetes controller: every pass reads the whole
picture (VMs, instances, nodes, liveness) and moves the store one step
toward it; a watch only makes the next pass come sooner. Every write is a
compare-and-swap, so a pass computed on stale data fails and the next one
starts from a fresh read. Only the elected leader runs it.

Per VM it keeps instances ``<vm>-0 .. <vm>-(replicas-1)``: creates missing
ones (placed by the scheduler, epoch 1), deletes extra ones, copies the
desired power state and restart generation into them, retries placing
unplaced ones, deletes instances whose VM is gone (their agents then destroy
the tasks), and summarises the instances into ``VM.status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from blixard.domain.errors import AlreadyExists, Compacted, Conflict, NotFound, StoreError
from blixard.domain.instance import (
    DesiredState,
    Instance,
    InstanceSpec,
    ObservedState,
)
from blixard.domain.keys import NODE_LEASES_PREFIX, ROOT, instance_name
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, Resources
from blixard.domain.vm import VM, VMPhase, VMStatus
from blixard.scheduler.placement import NodeView, Request, allocated_by, place
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

log = structlog.get_logger(__name__)

#: Observed states that hold a node's resources.
_ACTIVE = {ObservedState.STARTING, ObservedState.RUNNING, ObservedState.PAUSED}


def instance_resources(vm: VM) -> Resources:
    return Resources(vcpus=vm.spec.vcpus, memory_mib=vm.spec.memory_mib)


class VmController:
    def __init__(
        self,
        store: StateStore,
        *,
        resync_s: float = 5.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.resync_s = resync_s
        self.now = now
        self._kick = asyncio.Event()

    async def run(self) -> None:
        """Reconcile until cancelled: after every change seen, and every ``resync_s``."""
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                self._kick.clear()
                try:
                    await self.sync_all()
                except (Conflict, StoreError) as exc:
                    log.info("vm controller pass ended early; retrying", error=str(exc))
                    await asyncio.sleep(0.2)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_s):
                        await self._kick.wait()
                await asyncio.sleep(0.02)  # coalesce a burst of events into one pass
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self) -> None:
        while True:
            try:
                async for _ in self.store.watch(ROOT):
                    self._kick.set()
            except (Compacted, StoreError):
                self._kick.set()
                await asyncio.sleep(0.5)

    async def sync_all(self) -> None:
        vms = {vm.metadata.name: vm for vm in await self.objects.list(VM)}
        instances = await self.objects.list(Instance)
        nodes = await self.objects.list(Node)
        alive = {
            kv.key[len(NODE_LEASES_PREFIX) :]
            for kv in (await self.store.range(NODE_LEASES_PREFIX, keys_only=True)).kvs
        }
        by_vm: dict[str, list[Instance]] = {}
        for inst in instances:
            by_vm.setdefault(inst.spec.vm, []).append(inst)
        claims = [
            (inst.spec.node, instance_resources(vms[inst.spec.vm]))
            for inst in instances
            if inst.spec.vm in vms and inst.spec.desired_state is not DesiredState.STOPPED
        ]
        for name, owned in by_vm.items():
            if name not in vms:
                for inst in owned:
                    await self._delete(inst)
        for vm in vms.values():
            await self.sync_vm(vm, by_vm.get(vm.metadata.name, []), nodes, alive, claims)
        await self._publish_allocations(nodes, claims)

    async def _publish_allocations(
        self, nodes: list[Node], claims: list[tuple[str | None, Resources]]
    ) -> None:
        """Write each node's allocated resources (what placement counted) to its record."""
        for node in nodes:
            allocated = allocated_by(node.metadata.name, claims)
            if node.status.allocated == allocated:
                continue
            status = node.status.model_copy(update={"allocated": allocated})
            with contextlib.suppress(Conflict, NotFound):  # the agent wrote first: next pass
                await self.objects.update(node.model_copy(update={"status": status}))

    async def sync_vm(
        self,
        vm: VM,
        owned: list[Instance],
        nodes: list[Node],
        alive: set[str],
        claims: list[tuple[str | None, Resources]],
    ) -> None:
        """One VM's step. ``claims`` (node, resources) grows with every placement made."""
        want = vm.spec.replicas
        desired = DesiredState.RUNNING if vm.spec.running else DesiredState.STOPPED
        by_index = {inst.spec.index: inst for inst in owned}
        reasons: list[str] = []
        current: list[Instance] = []
        for index in range(want):
            inst = by_index.get(index)
            if inst is None or inst.spec.node is None:
                views = [
                    NodeView(n, n.metadata.name in alive, allocated_by(n.metadata.name, claims))
                    for n in nodes
                ]
                decision = place(views, Request(instance_resources(vm), vm.spec.hypervisor))
                reasons.append(decision.reason)
                if decision.node is not None:
                    claims.append((decision.node, instance_resources(vm)))
                inst = await self._assign(vm, index, inst, decision.node, desired)
            elif (
                inst.spec.desired_state is not desired
                or inst.spec.restart_generation != vm.spec.restart_generation
            ):
                spec = inst.spec.model_copy(
                    update={
                        "desired_state": desired,
                        "restart_generation": vm.spec.restart_generation,
                    }
                )
                inst = await self.objects.update(inst.model_copy(update={"spec": spec}))
            if inst is not None:
                current.append(inst)
        for index, inst in by_index.items():
            if index >= want:
                await self._delete(inst)
        await self._report(vm, current, reasons)

    async def _assign(
        self,
        vm: VM,
        index: int,
        existing: Instance | None,
        node: str | None,
        desired: DesiredState,
    ) -> Instance | None:
        spec = InstanceSpec(
            vm=vm.metadata.name,
            index=index,
            node=node,
            epoch=(existing.spec.epoch if existing else 0) + (1 if node else 0),
            desired_state=desired,
            restart_generation=vm.spec.restart_generation,
            assigned_at=self.now() if node else None,
        )
        if existing is None:
            inst = Instance(
                metadata=ObjectMeta(
                    name=instance_name(vm.metadata.name, index),
                    uid=uuid.uuid4(),
                    generation=1,
                    created_at=self.now(),
                    labels=dict(vm.metadata.labels),
                ),
                spec=spec,
            )
            try:
                return await self.objects.create(inst)
            except AlreadyExists:
                return None  # someone else made it; the next pass sees it
        if node is None:
            return existing  # still unplaceable
        return await self.objects.update(existing.model_copy(update={"spec": spec}))

    async def _delete(self, inst: Instance) -> None:
        with contextlib.suppress(Conflict, NotFound):
            await self.objects.delete(inst)

    async def _report(self, vm: VM, instances: list[Instance], reasons: list[str]) -> None:
        status = summarise(vm, instances, reasons)
        if status == vm.status:
            return
        with contextlib.suppress(Conflict, NotFound):
            await self.objects.update(vm.model_copy(update={"status": status}))


def summarise(vm: VM, instances: list[Instance], reasons: list[str]) -> VMStatus:
    """The VM's phase from its instances' observed states (pure; see the tests)."""
    want = vm.spec.replicas
    states = [i.status.state for i in instances if i.status.epoch == i.spec.epoch]
    ready = sum(
        1
        for i in instances
        if i.status.ready
        and i.status.state is ObservedState.RUNNING
        and i.status.epoch == i.spec.epoch
    )
    unplaced = [r for r in reasons if not r.startswith("placed on")]
    failed = [
        i
        for i in instances
        if i.status.state is ObservedState.FAILED and i.status.epoch == i.spec.epoch
    ]
    if not vm.spec.running or want == 0:
        busy = any(s in _ACTIVE or s is ObservedState.STOPPING for s in states)
        phase = VMPhase.PENDING if busy else VMPhase.STOPPED
    elif ready == want:
        phase = VMPhase.RUNNING
    elif failed and ready:
        phase = VMPhase.DEGRADED
    elif failed:
        phase = VMPhase.FAILED
    else:
        phase = VMPhase.PENDING
    message = ""
    if unplaced:
        message = unplaced[0]
    elif failed:
        message = f"{failed[0].metadata.name}: {failed[0].status.message}"
    else:
        for inst in instances:
            if not inst.status.ready and inst.status.message:
                message = f"{inst.metadata.name}: {inst.status.message}"
                break
    placement_reason = "; ".join(reasons) if reasons else vm.status.placement_reason
    return VMStatus(
        phase=phase,
        message=message,
        placement_reason=placement_reason,
        ready_replicas=ready,
        observed_generation=vm.metadata.generation,
    )
