"""The VM controller in the simulation: the REAL decisions, committed as vms.py commits them.

Why: the decisions (placement, failover after the grace, drain, scale,
deletes) are :func:`blixard.controllers.plan.plan` itself, called on a
snapshot of this controller's cache; only the plumbing around it is
modelled, line for line after controllers/vms.py (as of this writing):

* ``_follow`` (87-94): every watch event goes through the cache; a node or
  liveness change marks everything, an instance or VM change its VM;
* ``_loop`` (96-109): a pass, then wait for a change, the plan's ``wake_at``
  or the ``resync_s`` full pass, then sleep ``coalesce_s`` (a burst of
  events becomes one pass);
* ``snapshot`` (113-134): ``down_since`` is the controller's own record of
  when it first saw each referenced node down, so a new leader starts with
  an empty one and waits a whole grace again;
* ``commit``/``_commit_batch`` (154-191): batches of :data:`BATCH` writes in
  one transaction with a compare per key; a failed batch is retried write
  by write; a write that still conflicts is dropped and its VM (or
  everything) marked for the next pass.

The cache follows controllers/cache.py (``apply`` 56-78, ``wrote``/``deleted``
80-99): events older than what it holds for a key are ignored. It holds the
store's objects themselves (never a decoded copy): they are immutable here.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

from blixard.controllers.plan import (
    Create,
    Delete,
    Plan,
    Policy,
    Snapshot,
    Update,
    holds_resources,
    plan,
)
from blixard.controllers.vms import BATCH
from blixard.domain.instance import DesiredState, Instance
from blixard.domain.node import Node
from blixard.domain.vm import VM
from blixard.sim.clock import Timer
from blixard.sim.proc import Actor, Call, Op, Proc, Sleep
from blixard.sim.store import Obj, StoreEvent, Write
from blixard.sim.world import World

Gen = Generator[Op, Any, Any]


class WaitKick(Op):
    """``asyncio.timeout(deadline - now)`` around ``self._kick.wait()``."""

    def __init__(self, controller: SimController, deadline: float) -> None:
        self.controller = controller
        self.deadline = deadline

    def start(self, proc: Proc) -> None:
        c = self.controller
        if c.kick:
            c.later(0.0, lambda: proc.resume(None, None))
            return
        timer: list[Timer] = []

        def woken() -> None:
            c.waiter = None
            for t in timer:
                t.cancel()
            proc.resume(None, None)

        def timed_out() -> None:
            c.waiter = None
            proc.resume(None, None)

        c.waiter = woken
        timer.append(c.later(max(0.0, self.deadline - c.local_now()), timed_out))


class SimController(Actor):
    def __init__(self, world: World, generation: int) -> None:
        super().__init__(world, f"controller#{generation}", None)
        timing = world.timing
        self.policy = Policy(failover_grace_s=timing.failover_grace_s)
        self.resync_s = timing.controller_resync_s
        self.coalesce_s = timing.coalesce_s
        # cache.py
        self.vms: dict[str, VM] = {}
        self.instances: dict[str, Instance] = {}
        self.nodes: dict[str, Node] = {}
        self.live_nodes: set[str] = set()
        self.revision = 0
        self._seen: dict[tuple[str, str], int] = {}
        # vms.py
        self.down_since: dict[str, float] = {}
        self.dirty: set[str] = set()
        self.everything = True
        self.kick = False
        self.waiter: Any = None
        self._loading = True
        self._buffer: list[StoreEvent] = []

    def log(self, what: str) -> None:
        self.world.log("controller", what)

    def start(self) -> None:
        self.log(f"{self.name} leads")
        self.spawn(self._run())

    def kill(self) -> None:
        """Leadership lost: no further pass. A transaction already sent still lands."""
        super().kill()
        if self._on_event in self.world.store.subscribers:
            self.world.store.subscribers.remove(self._on_event)

    # --- the cache (controllers/cache.py) ----------------------------------------------

    def _load(self) -> Gen:
        store = self.world.store

        def read_and_watch() -> tuple[
            int, dict[str, VM], dict[str, Instance], dict[str, Node], dict[str, int]
        ]:
            # One range at one revision, and the watch from the next one.
            store.subscribers.append(self._on_event)
            alive = {name: rev for name, (_, rev) in sorted(store.alive.items())}
            return store.revision, dict(store.vms), dict(store.instances), dict(store.nodes), alive

        revision, vms, instances, nodes, alive = yield Call(read_and_watch)
        self.vms, self.instances, self.nodes, self.live_nodes = vms, instances, nodes, set(alive)
        self._seen = {}
        for kind, table in (("vms", vms), ("instances", instances), ("nodes", nodes)):
            for name, obj in table.items():
                self._seen[(kind, name)] = obj.metadata.resource_version
        for name, rev in alive.items():
            self._seen[("live", name)] = rev
        self.revision = revision
        self._loading = False
        buffered, self._buffer = self._buffer, []
        for event in buffered:
            self._follow(event)

    def _on_event(self, event: StoreEvent) -> None:
        self.deliver(lambda: self._follow(event))

    def _follow(self, event: StoreEvent) -> None:
        """vms.py ``_follow`` (87-94) over cache.py ``apply`` (56-78)."""
        if self._loading:
            self._buffer.append(event)
            return
        key = (event.kind, event.name)
        if event.revision <= self._seen.get(key, 0):
            return
        self.revision = max(self.revision, event.revision)
        everything = False
        vms: set[str] = set()
        name = event.name
        if event.kind in ("live", "nodes"):
            everything = True
        elif event.kind == "vms":
            vms.add(name)
        elif event.kind == "instances" and name in self.instances:
            vms.add(self.instances[name].spec.vm)
        self._seen[key] = event.revision
        if event.deleted:
            if event.kind == "live":
                self.live_nodes.discard(name)
            elif event.kind == "vms":
                self.vms.pop(name, None)
            elif event.kind == "instances":
                self.instances.pop(name, None)
            else:
                self.nodes.pop(name, None)
        elif event.kind == "live":
            self.live_nodes.add(name)
        elif isinstance(event.obj, Instance):
            self.instances[name] = event.obj
            vms.add(event.obj.spec.vm)
        elif isinstance(event.obj, VM):
            self.vms[name] = event.obj
        elif isinstance(event.obj, Node):
            self.nodes[name] = event.obj
        if everything:
            self.everything = True
        self.dirty |= vms
        if everything or vms:
            self._kick()

    def _kick(self) -> None:
        self.kick = True
        if self.waiter is not None:
            self.waiter()

    def _wrote(self, obj: Obj, revision: int, deleted: bool) -> None:
        """cache.py ``wrote``/``deleted`` (80-99)."""
        kind = (
            "instances" if isinstance(obj, Instance) else "vms" if isinstance(obj, VM) else "nodes"
        )
        name = obj.metadata.name
        if revision <= self._seen.get((kind, name), 0):
            return
        self._seen[(kind, name)] = revision
        if deleted:
            if isinstance(obj, Instance):
                self.instances.pop(name, None)
            return
        stored = obj.with_resource_version(revision)
        if isinstance(stored, Instance):
            self.instances[name] = stored
        elif isinstance(stored, VM):
            self.vms[name] = stored
        else:
            self.nodes[name] = stored

    # --- the loop (vms.py 73-109) -------------------------------------------------------

    def _run(self) -> Gen:
        yield from self._load()
        self.everything = True
        next_full = self.local_now() + self.resync_s
        while True:
            wake_at = yield from self.sync()
            deadline = min(next_full, wake_at if wake_at is not None else next_full)
            yield WaitKick(self, deadline)
            if self.local_now() >= next_full:
                self.everything = True
                next_full = self.local_now() + self.resync_s
            if wake_at is not None and self.local_now() >= wake_at:
                self.everything = True
            yield Sleep(self.coalesce_s)

    def snapshot(self) -> Snapshot:
        """vms.py ``snapshot`` (113-134)."""
        now = self.local_now()
        referenced = set(self.nodes) | {
            i.spec.node for i in self.instances.values() if i.spec.node is not None
        }
        for name in sorted(referenced):
            if name in self.live_nodes and name in self.nodes:
                self.down_since.pop(name, None)
            else:
                self.down_since.setdefault(name, now)
        for name in list(self.down_since):
            if name not in referenced:
                del self.down_since[name]
        return Snapshot(
            vms=self.vms,
            instances=self.instances,
            nodes=self.nodes,
            alive=self.live_nodes,
            down_since=dict(self.down_since),
            now=now,
            wall=self.world.wall(),
        )

    def sync(self) -> Gen:
        """vms.py ``sync`` (143-152)."""
        self.kick = False
        only = None if self.everything else set(self.dirty)
        self.everything = False
        self.dirty.clear()
        snap = self._with_fixes(self.snapshot())
        decided = plan(snap, self.policy, only=only, new_uid=self.world.new_uid)
        self._filter_for_fixes(decided, snap)
        metrics = self.world.metrics
        metrics.plan_calls += 1
        if decided.actions:
            self.log(
                f"pass over {'everything' if only is None else ','.join(sorted(only))}: "
                f"{len(decided.actions)} writes, {decided.placements} placements"
            )
        yield from self.commit(decided, snap)
        metrics.controller_passes += 1
        return decided.wake_at

    def _filter_for_fixes(self, decided: Plan, snap: Snapshot) -> None:
        """The writes the emulated fixes would not make (config.Model).

        ``ready_after_reconcile``: never write back the "not ready, so cordoned"
        view of :meth:`_with_fixes`. ``restart_waits_for_room``: a stopped instance
        that plan() starts again on its own node although the node's allocation
        after the pass exceeds its capacity stays stopped (its claim is taken off
        the node's allocation), and the next pass tries again.
        """
        model = self.world.model
        if not (model.ready_after_reconcile or model.restart_waits_for_room):
            return
        actions = decided.actions
        if model.restart_waits_for_room:
            actions = self._restarts_that_fit(actions, snap)
        if model.ready_after_reconcile:
            kept: list[Create | Update | Delete] = []
            for action in actions:
                obj = action.obj
                if isinstance(action, Update) and isinstance(obj, Node):
                    stored = self.nodes.get(obj.metadata.name)
                    if stored is not None and stored.spec != obj.spec:
                        kept.append(Update(obj.model_copy(update={"spec": stored.spec})))
                        continue
                kept.append(action)
            actions = kept
        decided.actions = actions

    @staticmethod
    def _restarts_that_fit(
        actions: list[Create | Update | Delete], snap: Snapshot
    ) -> list[Create | Update | Delete]:
        final: dict[str, list[int]] = {}
        for action in actions:
            if isinstance(action, Update) and isinstance(action.obj, Node):
                a = action.obj.status.allocated
                final[action.obj.metadata.name] = [a.vcpus, a.memory_mib]
        dropped: set[int] = set()
        for i in range(len(actions) - 1, -1, -1):
            obj = actions[i].obj
            if not (isinstance(actions[i], Update) and isinstance(obj, Instance)):
                continue
            old = snap.instances.get(obj.metadata.name)
            node = obj.spec.node
            if (
                old is None
                or node is None
                or old.spec.node != node
                or node not in snap.nodes
                or holds_resources(old)
                or obj.spec.desired_state is not DesiredState.RUNNING
            ):
                continue
            record = snap.nodes[node]
            alloc = final.get(node)
            if alloc is None:
                alloc = [record.status.allocated.vcpus, record.status.allocated.memory_mib]
            cap = record.status.capacity
            if alloc[0] <= cap.vcpus and alloc[1] <= cap.memory_mib:
                continue
            need = obj.spec.resources
            if need is None:
                continue
            dropped.add(i)
            alloc[0] -= need.vcpus
            alloc[1] -= need.memory_mib
            final[node] = alloc
        kept: list[Create | Update | Delete] = []
        for i, planned in enumerate(actions):
            if i in dropped:
                continue
            obj = planned.obj
            claims = final.get(obj.metadata.name) if isinstance(obj, Node) else None
            if isinstance(planned, Update) and isinstance(obj, Node) and dropped and claims:
                claimed = obj.status.allocated.model_copy(
                    update={"vcpus": claims[0], "memory_mib": claims[1]}
                )
                if claimed != obj.status.allocated:
                    status = obj.status.model_copy(update={"allocated": claimed})
                    kept.append(Update(obj.model_copy(update={"status": status})))
                    continue
            kept.append(planned)
        return kept

    def _with_fixes(self, snap: Snapshot) -> Snapshot:
        """The snapshot plan() sees under the emulated ``ready_after_reconcile`` fix
        (config.Model): a node that is not ready is shown cordoned, so nothing new is
        placed there, and nothing else changes. Unchanged by default."""
        if not self.world.model.ready_after_reconcile:
            return snap
        unready = [n for n, node in snap.nodes.items() if not node.status.ready]
        if not unready:
            return snap
        nodes = dict(snap.nodes)
        for name in unready:
            record = nodes[name]
            cordoned = record.spec.model_copy(update={"cordoned": True})
            nodes[name] = record.model_copy(update={"spec": cordoned})
        return replace(snap, nodes=nodes)

    def commit(self, decided: Plan, snap: Snapshot) -> Gen:
        for start in range(0, len(decided.actions), BATCH):
            batch = decided.actions[start : start + BATCH]
            ok = yield from self._commit_batch(batch, snap)
            if not ok:
                for action in batch:
                    yield from self._commit_batch([action], snap)

    def _commit_batch(self, actions: list[Create | Update | Delete], snap: Snapshot) -> Gen:
        writes: list[Write] = []
        for action in actions:
            op = (
                "create"
                if isinstance(action, Create)
                else "update"
                if isinstance(action, Update)
                else "delete"
            )
            writes.append(Write(action.obj, op))  # type: ignore[arg-type]
        store = self.world.store
        ok, revision = yield Call(lambda: store.txn(writes))
        if not ok:
            self.world.metrics.conflicts += 1
            for action in actions:
                if isinstance(action.obj, Instance):
                    self.dirty.add(action.obj.spec.vm)
                else:
                    self.everything = True
            if len(actions) == 1:
                self.log(f"write of {action.obj.metadata.name} conflicted; deciding again")
            return False
        for action in actions:
            obj = action.obj
            if isinstance(obj, Instance) and isinstance(action, Update):
                self._note_failover(obj, snap)
            if isinstance(obj, Instance) and not isinstance(action, Update):
                what = "create" if isinstance(action, Create) else "delete"
                self.log(f"{what} {obj.metadata.name} on {obj.spec.node} epoch {obj.spec.epoch}")
            self._wrote(obj, revision, deleted=isinstance(action, Delete))
        return True

    def _note_failover(self, new: Instance, snap: Snapshot) -> None:
        old = snap.instances.get(new.metadata.name)
        if old is None or old.spec.node == new.spec.node:
            if old is not None and old.spec.desired_state != new.spec.desired_state:
                self.log(f"{new.metadata.name}: desired {new.spec.desired_state.value}")
            return
        self.log(
            f"assign {new.metadata.name} {old.spec.node} -> {new.spec.node} epoch {new.spec.epoch}"
        )
        down = old.spec.node
        # A failover's figures count only replicas that should run (not a stopped VM's).
        if (
            down is not None
            and down in snap.down_since
            and new.spec.node
            and new.spec.desired_state is DesiredState.RUNNING
        ):
            self.world.metrics.failovers += 1
            self.world.on_failover(new.metadata.name, new.spec.epoch, down, snap.down_since[down])


class Leadership:
    """Who leads the controllers. A change ends the leader at once (an in-flight
    transaction still lands) and a new one starts after an election's delay, with
    an empty cache and an empty ``down_since``."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.generation = 0
        self.current: SimController | None = None

    def start(self) -> None:
        self.generation += 1
        self.current = SimController(self.world, self.generation)
        self.current.start()

    def change(self) -> None:
        if self.current is None:
            return  # an election is already under way
        self.world.log("controller", f"{self.current.name} loses the leadership")
        self.current.kill()
        self.current = None
        world = self.world
        world.clock.after(world.uniform(world.fault_rng, world.timing.election_s), self.start)
