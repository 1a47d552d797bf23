"""The service controller: keeps each Service's VMs as the Service says.

A Service is realised by VMs of the ``systemd`` hypervisor (see
:mod:`blixard.domain.service`); from there the VM controller places them,
fails them over and summarises them, and agents run the units. This
controller only keeps the set of VMs right:

* creates the VMs a service needs (:func:`~blixard.domain.service.desired_vms`),
  updates those whose spec or labels differ (state, restart generation,
  nodes, placement), and deletes the ones it no longer needs (a node left an
  all-nodes service, a pinned node was dropped);
* deletes the VMs of services that are gone (the API deletes them with the
  service; this catches any that a race left behind);
* never touches a VM it does not own (no ``blixard.io/service`` label naming
  the service): a user's VM with the wanted name is left alone and the
  service's status says so.

An all-nodes service runs on every *registered* node that offers the
``systemd`` hypervisor, not only the live ones: a node that is down for a
while keeps its VM (fencing ``none``: its unit keeps running there), and only
leaving the cluster (``cluster leave``, ``remove-node``) removes it.

Decisions are one pure function (:func:`plan_services`); the loop reads
services, VMs and nodes afresh at each pass (a few hundred objects: cheap),
after a change that can alter a decision (:func:`wakes`; one watch) and every
``resync_s``.
Writes are compare-and-swap; a conflict is decided again on the next pass.
Only the elected leader runs it, next to the VM controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from blixard.domain.errors import (
    AlreadyExists,
    BlixardError,
    Compacted,
    Conflict,
    NotFound,
    StoreError,
)
from blixard.domain.keys import ROOT, Kind, kind_prefix
from blixard.domain.node import Node
from blixard.domain.service import Service, desired_vms, owner_of
from blixard.domain.vm import VM, Hypervisor, VMStatus
from blixard.store.objects import ObjectStore
from blixard.store.protocol import Event, EventType, StateStore

log = structlog.get_logger(__name__)

_SERVICES, _NODES, _VMS = (kind_prefix(k) for k in (Kind.SERVICES, Kind.NODES, Kind.VMS))


def wakes(event: Event) -> bool:
    """Whether a change can alter a decision: any service or node change, and a VM
    created or deleted. A VM's own updates (the VM controller writes its status at
    every instance change) cannot, so they do not cost a pass; a user's edit of a
    service's VM is put right by the periodic pass."""
    key = event.kv.key
    if key.startswith((_SERVICES, _NODES)):
        return True
    if key.startswith(_VMS):
        return event.type is EventType.DELETE or event.kv.version == 1
    return False


@dataclass(frozen=True, slots=True)
class VmWrite:
    """One change to a VM: ``create``, ``update`` (CAS on its resource_version) or ``delete``."""

    op: str
    vm: VM


def systemd_nodes(nodes: Iterable[Node]) -> list[str]:
    """The registered nodes that can run units: where an all-nodes service runs."""
    return sorted(n.metadata.name for n in nodes if Hypervisor.SYSTEMD in n.status.hypervisors)


def plan_services(
    services: Iterable[Service],
    vms: Iterable[VM],
    nodes: Iterable[Node],
    *,
    now: datetime,
    new_uid: Callable[[], uuid.UUID] = uuid.uuid4,
) -> list[VmWrite]:
    """The VM writes that make the stored VMs match the services (pure)."""
    by_name = {vm.metadata.name: vm for vm in vms}
    where = systemd_nodes(nodes)
    writes: list[VmWrite] = []
    wanted: set[str] = set()
    known = set()
    for service in services:
        name = service.metadata.name
        known.add(name)
        for want in desired_vms(service, where):
            vm_name = want.metadata.name
            wanted.add(vm_name)
            have = by_name.get(vm_name)
            if have is None:
                meta = want.metadata.model_copy(
                    update={"uid": new_uid(), "generation": 1, "created_at": now}
                )
                writes.append(VmWrite("create", want.model_copy(update={"metadata": meta})))
            elif owner_of(have) != name:
                continue  # not ours: the service's status reports the clash
            elif have.spec != want.spec or have.metadata.labels != want.metadata.labels:
                meta = have.metadata.model_copy(
                    update={
                        "labels": want.metadata.labels,
                        "generation": have.metadata.generation + 1,
                    }
                )
                writes.append(
                    VmWrite("update", have.model_copy(update={"metadata": meta, "spec": want.spec}))
                )
    for vm in by_name.values():
        owner = owner_of(vm)
        if owner is not None and vm.metadata.name not in wanted:
            writes.append(VmWrite("delete", vm))
            if owner in known:
                log.info("service no longer needs vm", service=owner, vm=vm.metadata.name)
    return writes


class ServiceController:
    """Runs :func:`plan_services` on every change (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        *,
        resync_s: float = 5.0,
        coalesce_s: float = 0.02,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.resync_s = resync_s
        self.coalesce_s = coalesce_s
        self.now = now
        self._kick = asyncio.Event()
        self.passes = 0

    async def run(self) -> None:
        """Reconcile until cancelled; a watch failure restarts from a fresh read."""
        while True:
            try:
                revision = (await self.store.range(ROOT, limit=1, keys_only=True)).revision
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._follow(revision))
                    group.create_task(self._loop())
            except* (Compacted, StoreError, Conflict) as errors:
                log.info("service controller restarting", error=str(errors.exceptions[0]))
                await asyncio.sleep(0.2)

    async def _follow(self, revision: int) -> None:
        async for event in self.store.watch(ROOT, from_revision=revision + 1):
            if wakes(event):
                self._kick.set()

    async def _loop(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.sync()
            except BlixardError as exc:
                # A store hiccup or an object that does not decode: try again later, and
                # never take the VM controller (which shares the leadership) down with us.
                log.warning("service controller pass failed; retrying", error=str(exc))
                await asyncio.sleep(1.0)
                self._kick.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync_s):
                    await self._kick.wait()
            await asyncio.sleep(self.coalesce_s)  # one pass for a burst of changes

    async def sync(self) -> list[VmWrite]:
        """One pass: read everything, plan, write; returns the writes that landed."""
        services = await self.objects.list(Service)
        vms = await self.objects.list(VM)
        nodes = await self.objects.list(Node)
        done: list[VmWrite] = []
        for write in plan_services(services, vms, nodes, now=self.now()):
            try:
                if write.op == "create":
                    await self.objects.create(write.vm.model_copy(update={"status": VMStatus()}))
                elif write.op == "update":
                    await self.objects.update(write.vm)
                else:
                    await self.objects.delete(write.vm)
            except (AlreadyExists, Conflict, NotFound):
                self._kick.set()  # changed meanwhile: decide again from a fresh read
                continue
            log.info("service vm", op=write.op, vm=write.vm.metadata.name)
            done.append(write)
        self.passes += 1
        return done
