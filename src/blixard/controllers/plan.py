"""The VM controller's decisions, as a pure function: a snapshot in, the writes to make out.

Why pure: the same code decides in the real controller (which commits the
writes with compare-and-swap) and in :mod:`blixard.sim` (which applies them
to its model at thousands of steps per second), so the simulation checks the
logic that runs in production, seeded faults and all.

Per VM it keeps instances ``<vm>-0 .. <vm>-(replicas-1)``:

* a missing or unplaced instance is placed by the scheduler (epoch + 1);
* an instance on a node that is down (no liveness key, or no node record)
  is reassigned elsewhere with epoch + 1, but only once the node has been
  seen down for ``failover_grace_s``: its agent fenced itself before its
  lease could expire, and the grace (longer than the agents' fencing margin)
  covers clock-rate drift. ``fencing: none`` VMs are never failed over;
* an instance on a draining node is first stopped there (desired state
  ``stopped``) and reassigned once its node reports it no longer active,
  and only when another node can take it: a drain never stops what it
  cannot place again;
* an instance to remove (scale down, VM deleted) is stopped first and its
  record deleted once the node reports it stopped, so its resources stay
  counted until they are free (or at once when its node is down);
* desired power state and restart generation are copied into instances;
* the VM's status and each node's allocated resources are summarised.

Capacity is counted from instance assignments: an instance holds its node's
resources while it should run there or its node still reports it active.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from blixard.domain.instance import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceStatus,
    ObservedState,
)
from blixard.domain.keys import instance_name
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, Resources
from blixard.domain.vm import VM, Fencing, Hypervisor, VMPhase, VMStatus
from blixard.scheduler.placement import Decision, NodeView, Request, place

#: Observed states in which a task holds its node's resources.
ACTIVE = frozenset(
    {ObservedState.STARTING, ObservedState.RUNNING, ObservedState.PAUSED, ObservedState.STOPPING}
)
#: A new instance's status; shared, as nothing mutates models in place.
_NO_STATUS = InstanceStatus()
#: A VM's placement_reason is shown to users; keep it readable at 1,000 replicas.
MAX_REASON = 2000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the controller knows at one moment.

    ``down_since`` holds, for every node name that instances refer to and that
    is not alive, when the controller first saw it down (its own monotonic
    clock ``now``); ``wall`` stamps assignments for users.
    """

    vms: Mapping[str, VM]
    instances: Mapping[str, Instance]
    nodes: Mapping[str, Node]
    alive: Collection[str]
    down_since: Mapping[str, float]
    now: float
    wall: datetime


@dataclass(frozen=True, slots=True)
class Create:
    obj: Instance


@dataclass(frozen=True, slots=True)
class Update:
    """Write ``obj`` if the stored one still has ``obj.metadata.resource_version``."""

    obj: Instance | VM | Node


@dataclass(frozen=True, slots=True)
class Delete:
    obj: Instance


Action = Create | Update | Delete


@dataclass(frozen=True, slots=True)
class Policy:
    failover_grace_s: float = 1.5
    #: How many feasible nodes the scheduler scores (None: all); see scheduler/.
    placement_limit: Callable[[int], int | None] = lambda n: None


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    #: When (controller clock) a pass should run again on its own, e.g. when a
    #: failover grace ends; None if only a change needs a new pass.
    wake_at: float | None = None
    placements: int = 0


def resources_of(vm: VM) -> Resources:
    # model_construct: sums of validated values need no validation, and placing
    # thousands of instances per pass must not parse sizes again each time.
    if vm.spec.hypervisor is Hypervisor.SYSTEMD:
        # A host's systemd unit (a Service) uses the host's resources, not a reservation:
        # counting 1 vCPU each would cap a node at a handful of services.
        return _NOTHING
    return Resources.model_construct(vcpus=vm.spec.vcpus, memory_mib=vm.spec.memory_mib)


_NOTHING = Resources.model_construct(vcpus=0, memory_mib=0)


def active_at_epoch(inst: Instance) -> bool:
    """True while the assigned node reports the current assignment's task as active."""
    st = inst.status
    return st.node == inst.spec.node and st.epoch == inst.spec.epoch and st.state in ACTIVE


def holds_resources(inst: Instance) -> bool:
    return inst.spec.node is not None and (
        inst.spec.desired_state is not DesiredState.STOPPED or active_at_epoch(inst)
    )


@dataclass(frozen=True, slots=True)
class Need:
    """What one instance holds on its node, for the pass's capacity bookkeeping."""

    vcpus: int
    memory_mib: int
    groups: frozenset[str]


def _groups(vm: VM) -> frozenset[str]:
    p = vm.spec.placement
    return frozenset(p.affinity_groups) | frozenset(p.anti_affinity_groups)


class Planner:
    """One pass of decisions; placements made early in the pass count for later ones."""

    def __init__(
        self,
        snap: Snapshot,
        policy: Policy | None = None,
        new_uid: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        self.snap = snap
        self.policy = policy or Policy()
        self.new_uid = new_uid
        self.plan = Plan()
        #: node -> [vcpus, memory_mib, disk_mib] claimed (plain ints: this is the hot path)
        self._allocated: dict[str, list[int]] = {}
        self._requests: dict[str, Request] = {}
        self._groups: dict[str, dict[str, int]] = {}
        for inst in snap.instances.values():
            need = self._need_of(inst)
            if need is not None and inst.spec.node is not None and holds_resources(inst):
                self._claim(inst.spec.node, need, +1)
        self._names = sorted(snap.nodes)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._views = [self._view(name) for name in self._names]

    # --- capacity bookkeeping ---------------------------------------------------------------

    @staticmethod
    def need(vm: VM) -> Need:
        res = resources_of(vm)
        return Need(res.vcpus, res.memory_mib, _groups(vm))

    def _need_of(self, inst: Instance) -> Need | None:
        """What ``inst`` holds: from its VM, or from its own record once the VM is gone
        (its task may still run until its node stops it)."""
        vm = self.snap.vms.get(inst.spec.vm)
        if vm is not None and (inst.spec.vm_uid is None or inst.spec.vm_uid == vm.metadata.uid):
            return self.need(vm)
        res = inst.spec.resources
        return None if res is None else Need(res.vcpus, res.memory_mib, frozenset())

    def _claim(self, node: str, need: Need, sign: int) -> None:
        total = self._allocated.setdefault(node, [0, 0, 0])
        total[0] = max(0, total[0] + sign * need.vcpus)
        total[1] = max(0, total[1] + sign * need.memory_mib)
        counts = self._groups.setdefault(node, {})
        for group in need.groups:
            counts[group] = counts.get(group, 0) + sign
            if counts[group] <= 0:
                del counts[group]

    def _view(self, name: str) -> NodeView:
        return NodeView(
            self.snap.nodes[name],
            name in self.snap.alive,
            self.allocated(name),
            frozenset(self._groups.get(name, {})),
        )

    def _move_claim(self, what: VM | Need, old: str | None, new: str | None) -> None:
        need = self.need(what) if isinstance(what, VM) else what
        for node, sign in ((old, -1), (new, +1)):
            if node is None:
                continue
            self._claim(node, need, sign)
            if node in self._index:
                self._views[self._index[node]] = self._view(node)

    def allocated(self, node: str) -> Resources:
        vcpus, memory_mib, disk_mib = self._allocated.get(node, (0, 0, 0))
        return Resources.model_construct(vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib)

    # --- placement ----------------------------------------------------------------------

    def _request(self, vm: VM) -> Request:
        request = self._requests.get(vm.metadata.name)
        if request is None:
            request = Request(
                resources_of(vm),
                vm.spec.hypervisor,
                placement=vm.spec.placement,
                needs_kvm=vm.spec.accel.value == "kvm",
            )
            self._requests[vm.metadata.name] = request
        return request

    def place(self, vm: VM, name: str) -> Decision:
        request = self._request(vm)
        seed = zlib.crc32(name.encode())
        limit = self.policy.placement_limit(len(self._views))
        return place(self._views, request, limit=limit, seed=seed)

    def node_down(self, node: str) -> bool:
        return node not in self.snap.nodes or node not in self.snap.alive

    # --- one VM -------------------------------------------------------------------------

    def sync_vm(self, vm: VM, owned: Iterable[Instance]) -> None:
        snap = self.snap
        want = vm.spec.replicas
        desired = DesiredState.RUNNING if vm.spec.running else DesiredState.STOPPED
        by_index: dict[int, Instance] = {}
        leftover: set[int] = set()
        for mine in owned:
            if mine.spec.vm_uid is not None and mine.spec.vm_uid != vm.metadata.uid:
                self.remove(mine, None)  # left by an earlier VM of the same name
                leftover.add(mine.spec.index)
            else:
                by_index[mine.spec.index] = mine
        placed: list[str] = []
        problems: list[str] = []
        current: list[Instance] = []
        for index in range(want):
            name = instance_name(vm.metadata.name, index)
            inst = by_index.get(index)
            if inst is None and index in leftover:
                problems.append(f"{name}: waiting for the replica of an earlier VM of this name")
                continue
            if inst is None:
                decision = self.place(vm, name)
                self._note(decision, name, placed, problems)
                created = self._new_instance(vm, index, decision.node, desired)
                self.plan.actions.append(Create(created))
                self._move_claim(vm, None, decision.node)
                current.append(created)
                continue
            node = inst.spec.node
            if node is None:
                decision = self.place(vm, name)
                self._note(decision, name, placed, problems)
                if decision.node is not None:
                    inst = self._reassign(vm, inst, decision.node, desired, holds=False)
                current.append(inst)
                continue
            if self.node_down(node):
                current.append(self._failover(vm, inst, node, desired, placed, problems))
                continue
            if snap.nodes[node].spec.draining:
                moved = self._drain(vm, inst, node, desired, placed, problems)
                if moved is not None:
                    current.append(moved)
                    continue
            current.append(self._sync_spec(vm, inst, desired, problems))
        for index, inst in sorted(by_index.items()):
            if index >= want:
                self.remove(inst, vm)
        self._report(vm, current, placed, problems)

    def _note(self, decision: Decision, name: str, placed: list[str], problems: list[str]) -> None:
        if decision.node is None:
            problems.append(f"{name}: {decision.reason}")
        else:
            self.plan.placements += 1
            placed.append(f"{name}: {decision.reason}")

    def _failover(
        self,
        vm: VM,
        inst: Instance,
        node: str,
        desired: DesiredState,
        placed: list[str],
        problems: list[str],
    ) -> Instance:
        name = inst.metadata.name
        if vm.spec.fencing is Fencing.NONE:
            problems.append(f"{name}: node {node} is down; not failed over (fencing: none)")
            return inst
        since = self.snap.down_since.get(node, self.snap.now)
        left = since + self.policy.failover_grace_s - self.snap.now
        if left > 0:
            problems.append(f"{name}: node {node} is down; failing over in {left:.1f}s")
            self._wake(since + self.policy.failover_grace_s)
            return inst
        decision = self.place(vm, name)
        if decision.node is None:
            # It stays bound to its node: it runs again there if the node comes back,
            # and the next pass tries again to fail it over.
            problems.append(f"{name}: node {node} is down; cannot fail over: {decision.reason}")
            return inst
        self._move_claim(vm, node if holds_resources(inst) else None, None)
        self.plan.placements += 1
        placed.append(f"{name}: failed over from {node} (down); {decision.reason}")
        return self._reassign(vm, inst, decision.node, desired, holds=False)

    def _drain(
        self,
        vm: VM,
        inst: Instance,
        node: str,
        desired: DesiredState,
        placed: list[str],
        problems: list[str],
    ) -> Instance | None:
        """Move ``inst`` off its draining node; None leaves it to the ordinary sync."""
        name = inst.metadata.name
        decision = self.place(vm, name)
        if decision.node is None:
            problems.append(f"{name}: stays on draining node {node}: {decision.reason}")
            return None
        if active_at_epoch(inst):
            if inst.spec.desired_state is not DesiredState.STOPPED:
                inst = self._update_spec(inst, desired_state=DesiredState.STOPPED)
            problems.append(f"{name}: stopping on draining node {node} to move it")
            return inst
        self.plan.placements += 1
        placed.append(f"{name}: moved off draining node {node}; {decision.reason}")
        return self._reassign(vm, inst, decision.node, desired, holds=holds_resources(inst))

    def _sync_spec(
        self, vm: VM, inst: Instance, desired: DesiredState, problems: list[str]
    ) -> Instance:
        if (
            inst.spec.desired_state is desired
            and inst.spec.restart_generation == vm.spec.restart_generation
        ):
            return inst
        before = holds_resources(inst)
        node = inst.spec.node
        if not before and desired is DesiredState.RUNNING and node is not None:
            # Started again: its node's resources were free for others meanwhile.
            view = self._views[self._index[node]] if node in self._index else None
            need = self.need(vm)
            free = view.free() if view is not None else None
            if free is None or need.vcpus > free.vcpus or need.memory_mib > free.memory_mib:
                decision = self.place(vm, inst.metadata.name)
                if decision.node is not None:
                    self.plan.placements += 1
                    return self._reassign(vm, inst, decision.node, desired, holds=False)
                # No room anywhere, its old node included: it stays stopped until there is.
                name = inst.metadata.name
                problems.append(f"{name}: waiting for room to start: {decision.reason}")
                return inst
        updated = self._update_spec(
            inst, desired_state=desired, restart_generation=vm.spec.restart_generation
        )
        after = holds_resources(updated)
        if before != after:
            node = inst.spec.node
            self._move_claim(vm, node if before else None, node if after else None)
        return updated

    def remove(self, inst: Instance, vm: VM | None) -> None:
        """Stop ``inst`` where it runs, then delete its record (see the module docstring).

        On a node that is down, the record goes only once the node's fencing has
        surely stopped the task (the failover grace); a ``fencing: none`` task is
        never stopped by fencing, so its record waits for its node to come back.
        """
        node = inst.spec.node
        if node is not None and not self.node_down(node) and active_at_epoch(inst):
            if inst.spec.desired_state is not DesiredState.STOPPED:
                self._update_spec(inst, desired_state=DesiredState.STOPPED)
            return
        if node is not None and self.node_down(node) and active_at_epoch(inst):
            if inst.spec.fencing is Fencing.NONE:
                return
            since = self.snap.down_since.get(node, self.snap.now)
            if self.snap.now < since + self.policy.failover_grace_s:
                self._wake(since + self.policy.failover_grace_s)
                return
        need = self._need_of(inst) if vm is None else self.need(vm)
        if need is not None and node is not None and holds_resources(inst):
            self._move_claim(need, node, None)
        self.plan.actions.append(Delete(inst))

    # --- writes -------------------------------------------------------------------------

    def _new_instance(
        self, vm: VM, index: int, node: str | None, desired: DesiredState
    ) -> Instance:
        # Built from validated parts (the VM's name and labels, a scheduler's node
        # name): constructed without validation, which was a third of a placement.
        return Instance.model_construct(
            metadata=ObjectMeta.model_construct(
                name=instance_name(vm.metadata.name, index),
                uid=self.new_uid(),
                labels=dict(vm.metadata.labels),
                generation=1,
                resource_version=0,
                created_at=self.snap.wall,
            ),
            spec=InstanceSpec.model_construct(
                vm=vm.metadata.name,
                vm_uid=vm.metadata.uid,
                index=index,
                node=node,
                epoch=1 if node else 0,
                desired_state=desired,
                restart_generation=vm.spec.restart_generation,
                assigned_at=self.snap.wall if node else None,
                resources=self._request(vm).resources,
                fencing=vm.spec.fencing,
            ),
            status=_NO_STATUS,
        )

    def _reassign(
        self, vm: VM, inst: Instance, node: str | None, desired: DesiredState, *, holds: bool
    ) -> Instance:
        """Bind ``inst`` to ``node`` (None: unbind) at a new epoch; claims move with it."""
        if holds:
            self._move_claim(vm, inst.spec.node, None)
        updated = self._update_spec(
            inst,
            node=node,
            epoch=inst.spec.epoch + (1 if node is not None else 0),
            desired_state=desired,
            restart_generation=vm.spec.restart_generation,
            assigned_at=self.snap.wall if node is not None else None,
        )
        if node is not None:
            self._move_claim(vm, None, node)
        return updated

    def _update_spec(self, inst: Instance, **changes: object) -> Instance:
        spec = inst.spec.model_copy(update=changes)
        updated = inst.model_copy(update={"spec": spec})
        self.plan.actions.append(Update(updated))
        return updated

    def _wake(self, at: float) -> None:
        if self.plan.wake_at is None or at < self.plan.wake_at:
            self.plan.wake_at = at

    def _report(
        self, vm: VM, instances: list[Instance], placed: list[str], problems: list[str]
    ) -> None:
        status = summarise(vm, instances, placed, problems)
        if status != vm.status:
            self.plan.actions.append(Update(vm.model_copy(update={"status": status})))

    # --- the whole pass -----------------------------------------------------------------

    def run(self, only: Collection[str] | None = None) -> Plan:
        """Decide for every VM (or those named in ``only``) and every node's allocation."""
        by_vm: dict[str, list[Instance]] = {}
        for inst in self.snap.instances.values():
            by_vm.setdefault(inst.spec.vm, []).append(inst)
        for vm_name, owned in sorted(by_vm.items()):
            if vm_name not in self.snap.vms and (only is None or vm_name in only):
                for inst in owned:
                    self.remove(inst, None)
        names = sorted(self.snap.vms) if only is None else sorted(n for n in only)
        for vm_name in names:
            vm = self.snap.vms.get(vm_name)
            if vm is not None:
                self.sync_vm(vm, by_vm.get(vm_name, []))
        for name, node in sorted(self.snap.nodes.items()):
            allocated = self.allocated(name)
            if node.status.allocated != allocated:
                status = node.status.model_copy(update={"allocated": allocated})
                self.plan.actions.append(Update(node.model_copy(update={"status": status})))
        return self.plan


def plan(
    snap: Snapshot,
    policy: Policy | None = None,
    *,
    only: Collection[str] | None = None,
    new_uid: Callable[[], uuid.UUID] = uuid.uuid4,
) -> Plan:
    """The writes that move the store one step toward every VM's spec."""
    return Planner(snap, policy, new_uid).run(only)


def summarise(
    vm: VM, instances: list[Instance], placed: list[str], problems: list[str]
) -> VMStatus:
    """The VM's phase and message from its instances' observed states (pure; see the tests)."""
    want = vm.spec.replicas
    current = [i for i in instances if i.status.epoch == i.spec.epoch and i.spec.node is not None]
    states = [i.status.state for i in current]
    ready = sum(1 for i in current if i.status.ready and i.status.state is ObservedState.RUNNING)
    failed = [i for i in current if i.status.state is ObservedState.FAILED]
    if not vm.spec.running or want == 0:
        busy = any(s in ACTIVE for s in states)
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
    if problems:
        message = problems[0]
    elif failed:
        message = f"{failed[0].metadata.name}: {failed[0].status.message}"
    else:
        for inst in current:
            if not inst.status.ready and inst.status.message:
                message = f"{inst.metadata.name}: {inst.status.message}"
                break
    reasons = placed + problems
    placement_reason = vm.status.placement_reason
    if reasons:
        placement_reason = "; ".join(reasons)
        if len(placement_reason) > MAX_REASON:
            placement_reason = placement_reason[: MAX_REASON - 20] + f" ... ({len(reasons)} in all)"
    return VMStatus(
        phase=phase,
        message=message[:MAX_REASON],
        placement_reason=placement_reason,
        ready_replicas=ready,
        observed_generation=vm.metadata.generation,
    )
