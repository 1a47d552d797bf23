"""A model of one node daemon: its registration (liveness lease) and its agent.

Why a model: the real agent is asyncio code over a real store and real
processes. Here the same steps run as generators on the virtual clock
(:mod:`blixard.sim.proc`), against the store model and the host model, in
the same order and with the same conditions. Each rule names the lines of
the real code it mirrors (line numbers as of this writing; the test
``test_mirrored_rules_still_exist`` checks that the quoted conditions are
still in those files, so a change there fails until this model follows).

agent/registration.py
  * ``register`` (83-130): write the node record, note ``sent`` (123), grant a
    lease (124), set ``valid_until = sent + ttl`` (126), *then* put the
    liveness key (127), then keep the lease alive.
  * ``_keepalive`` (154-173): keepalives paced by the clock (``next_at``), not
    by the answers; ``LeaseNotFound``: take a new lease (``_renew_lease``,
    175-180, same order as register); other store errors: try again at the
    next tick; success: ``valid_until = sent + ttl``.
  * ``close`` (182-196): a clean stop revokes the lease only off etcd
    (daemon/node.py); the simulated cluster is an etcd one.

agent/reconciler.py
  * fencing (177-226): ``may_run`` is ``remaining > fence_margin_s``; the
    deadline every shim obeys is ``now + remaining - margin`` =
    ``valid_until - margin``, rewritten by a keeper every 0.1 s when it moved
    by 0.05 s or more; when it moves out of the past, every task is woken.
    ``fence_deadline`` (184-191) bounds when an answer may be acted on.
  * ``_recover_all`` (230-276), ``_follow``/``_watch_from`` (280-313),
    ``_wake_up``/``_worker`` (315-336), ``reconcile`` (340-380),
    ``_ensure_running`` (382-466: a fence-paused task is resumed only after a
    CAS answered before the deadline), ``_ensure_stopped`` (468-480),
    ``_start`` (482-537: the start is announced with a CAS that checks node
    and epoch *before* the spawn, and an answer after the deadline starts
    nothing), ``_stop_task`` (539-548: a fence-paused task is killed),
    ``_remove`` (550-564: a moved instance is destroyed at once, a deleted one
    stopped first unless fence-paused), ``_fail`` (566-571), ``_watch_exit``
    (573-594), ``_report`` (613-654: a CAS through ``ObjectStore.modify``,
    only while the instance is ours at our epoch).

Shortcuts that change no outcome (they save events, not decisions):

* an instance event or listed instance that is neither assigned here, nor
  was, nor has a local task or worker, is not reconciled: the real
  ``reconcile`` reads it, finds it is not ours and has no local task, and
  returns;
* watch events are filtered when published with the same rule (plus a VM's
  events for nodes running one of its instances); the agent's 5 s re-list
  covers the rest as it covers a lost watch in the real agent;
* the fence keeper publishes when ``valid_until`` changes, on the keeper's
  next 0.1 s tick, instead of looking ten times a second.

The sim's VMs all use the ``process`` hypervisor and every node offers it, so
the "no driver" branches cannot happen and are left out.

Rules the simulation found unsafe (now fixed in the code) have a switch in
:class:`blixard.sim.config.Model` that brings the old rule back, and fixes
proposed but not made have one that models them: docs/architecture.md
"Simulation" says what each found.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from blixard.domain.errors import BlixardError, Conflict, LeaseNotFound, StoreError
from blixard.domain.instance import DesiredState, Instance, InstanceStatus, ObservedState
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec, NodeStatus
from blixard.domain.vm import VM, Fencing, Hypervisor, RestartMode, RestartPolicy
from blixard.drivers.protocol import BootFailed, TaskGone
from blixard.sim.clock import Timer
from blixard.sim.host import Exit, Host, Run, RunDir
from blixard.sim.proc import Actor, Call, Op, Proc, Sleep, WaitExit
from blixard.sim.store import StoreEvent
from blixard.sim.world import World

Gen = Generator[Op, Any, Any]
#: What a driver reports of a task: its state, and how it ended once EXITED.
Status = tuple[Run, Exit | None]


@dataclass
class LocalTask:
    """agent/reconciler.py ``LocalTask`` (lines 67-102)."""

    name: str
    vm: str
    epoch: int
    uid: str = ""
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    fencing: Fencing = Fencing.STOP
    fenced_out: bool = False
    #: The task's pid (the sim's TaskHandle).
    handle: int | None = None
    status: Status | None = None
    applied_restart_generation: int = 0
    started_mono: float = 0.0
    started_at: datetime | None = None
    failures: int = 0
    restarts: int = 0
    not_before: float = 0.0
    stopping: bool = False
    last_error: str = ""
    watcher: Watcher | None = None

    @property
    def running(self) -> bool:
        return (
            self.handle is not None and self.status is not None and self.status[0] is not Run.EXITED
        )


@dataclass
class Watcher:
    cancelled: bool = False


@dataclass
class Worker:
    busy: bool = False
    pending: bool = False
    #: Reconcile passes finished (the emulated ready_after_reconcile fix waits on it).
    runs: int = 0


def _observed(status: Status | None) -> ObservedState:
    if status is None:
        return ObservedState.PENDING
    return {
        Run.RUNNING: ObservedState.RUNNING,
        Run.STOPPED: ObservedState.PAUSED,
        Run.EXITED: ObservedState.STOPPED,
    }[status[0]]


def _describe(status: Status | None) -> str:
    if status is None:
        return ""
    if status[1] is not None:
        return status[1].describe()
    return status[0].value


def _exit_code(status: Status | None) -> int | None:
    return status[1].code if status is not None and status[1] is not None else None


def _should_restart(mode: RestartMode, status: Status) -> bool:
    if mode is RestartMode.ALWAYS:
        return True
    if mode is RestartMode.ON_FAILURE:
        return _exit_code(status) != 0
    return False


class Daemon(Actor):
    """One incarnation of ``blixard node start`` on ``host`` (registration + agent)."""

    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        super().__init__(world, f"{host.name}#{incarnation}", host)
        self.host: Host = host
        self.node_id = host.name
        timing = world.timing
        self.ttl = timing.lease_ttl_s
        self.margin = timing.fence_margin_s
        self.fencing_wired = world.model.fencing_wired
        # registration
        self.lease_id = 0
        self.valid_until = 0.0
        self.keepalive: Proc | None = None
        # agent
        self.tasks: dict[str, LocalTask] = {}
        self.workers: dict[str, Worker] = {}
        self.fence_written = -1.0
        self._keeper_phase = 0.0
        self._publish_timer: Timer | None = None
        self.started = False

    def log(self, what: str) -> None:
        self.world.log(self.node_id, what)

    def clock(self) -> float:
        return self.local_now()

    # --- lifecycle ------------------------------------------------------------------------

    def boot(self) -> None:
        """daemon/node.py ``run_node``: register, then start the agent.

        A start that fails (the store cannot be reached) ends the process; the
        service manager starts it again ``daemon_restart_s`` later.
        """
        world, host = self.world, self.host

        def failed(error: BlixardError) -> None:
            self.log(f"daemon start failed ({error}); restarting")
            self.kill()
            if host.daemon is self:
                host.daemon = None

            def again() -> None:
                if host.powered and host.wanted_up and host.daemon is None:
                    start_daemon(world, host)

            world.clock.after(world.timing.daemon_restart_s, again)

        self.spawn(self._boot(), on_error=failed)

    def _boot(self) -> Gen:
        yield from self._register()
        self._agent_start()

    def kill(self) -> None:
        """SIGKILL: nothing runs again; the tasks and their shims go on."""
        super().kill()
        if self._on_event in self.world.store.subscribers:
            self.world.store.subscribers.remove(self._on_event)

    def resume(self) -> None:
        super().resume()
        # The keeper's sleep ended while stopped: it runs at once, then every 0.1 s.
        self._keeper_phase = self.local_now()
        if self.started and self.fencing_wired:
            self.run(self._publish_fence_deadline)

    # --- registration (agent/registration.py) -------------------------------------------

    def _register(self) -> Gen:
        store, world = self.world.store, self.world
        existing: Node | None = yield Call(lambda: store.get_node(self.node_id))
        ready = not world.model.ready_after_reconcile
        facts = NodeStatus(
            ready=ready,
            capacity=self.host.capacity,
            hypervisors=[Hypervisor.PROCESS],
            last_heartbeat=world.wall(),
        )
        if existing is None:
            node = Node(
                metadata=ObjectMeta(name=self.node_id, generation=1, created_at=world.wall()),
                spec=NodeSpec(),
                status=facts,
            )
            ok, _ = yield Call(lambda: store.cas(node, "create"))
            if not ok:
                raise Conflict("node record appeared meanwhile")
        else:
            for _ in range(20):  # ObjectStore.modify
                current: Node | None = yield Call(lambda: store.get_node(self.node_id))
                if current is None:
                    raise StoreError("node record vanished")
                status = current.status.model_copy(
                    update={
                        "ready": ready,
                        "capacity": self.host.capacity,
                        "hypervisors": [Hypervisor.PROCESS],
                        "last_heartbeat": world.wall(),
                    }
                )
                changed = current.model_copy(update={"status": status})
                answer = yield Call(partial(store.update, changed))
                if answer == "ok":
                    break
        yield from self._take_lease()
        self.log(f"registered, lease {self.lease_id:x}")
        self.keepalive = self.spawn(self._keepalive(), on_error=self._keepalive_died)

    def _keepalive_died(self, error: BlixardError) -> None:
        """An exception ends the real keepalive task (nobody awaits it): no more keepalives."""
        self.log(f"keepalive task ended: {error!r}")

    def _take_lease(self) -> Gen:
        """register lines 123-127 and ``_renew_lease`` (175-180)."""
        store = self.world.store
        sent = self.clock()
        lease_id, ttl = yield Call(lambda: store.lease_grant(self.ttl))
        self.lease_id = lease_id
        if self.world.model.valid_before_liveness_key:
            self._set_valid_until(sent + ttl)
        yield Call(lambda: store.put_alive(self.node_id, lease_id))
        if not self.world.model.valid_before_liveness_key:
            self._set_valid_until(sent + ttl)

    def _keepalive(self) -> Gen:
        """registration.py ``_keepalive`` (154-173): paced by the clock, not by the answers."""
        store = self.world.store
        period = self.ttl / 3
        next_at = self.clock()
        while True:
            if self.world.model.keepalive_after_answer:
                yield Sleep(period)  # as it was: the sleep starts after each answer
            else:
                next_at = max(next_at + period, self.clock() - period)
                yield Sleep(max(0.0, next_at - self.clock()))
            sent = self.clock()
            try:
                ttl = yield Call(lambda: store.lease_keepalive(self.lease_id))
            except LeaseNotFound:
                self.log("liveness lease lost; registering again")
                # Only StoreError is suppressed, as in registration.py line 167; a
                # LeaseNotFound from the put would end the keepalive task (see spawn).
                with contextlib.suppress(StoreError):
                    if self.world.model.ready_after_reconcile:
                        yield from self._set_ready(False)
                    yield from self._take_lease()
                    if self.world.model.ready_after_reconcile:
                        self.spawn(self._settle(), on_error=lambda e: None)
                continue
            except StoreError:
                continue
            self._set_valid_until(sent + ttl)

    def _set_valid_until(self, value: float) -> None:
        self.valid_until = value
        self._lease_changed()

    def alive_lease(self) -> bool:
        return self.lease_id != 0 and self.clock() < self.valid_until

    # --- fencing (reconciler.py 177-226) ------------------------------------------------

    def lease_remaining(self) -> float | None:
        return (self.valid_until - self.clock()) if self.lease_id else None

    def may_run(self) -> bool:
        if not self.fencing_wired:
            return True
        remaining = self.lease_remaining()
        return remaining is not None and remaining > self.margin

    def _answer_deadline(self) -> float:
        """reconciler.py ``fence_deadline`` (184-191): until when an answer to a request
        sent now may be acted on."""
        if not self.fencing_wired:
            return math.inf
        remaining = self.lease_remaining()
        if remaining is None:
            return -math.inf
        return self.clock() + remaining - self.margin

    def _answer_in_time(self, deadline: float, name: str) -> bool:
        """An answer that comes back after the fencing deadline that held when it was
        asked proves nothing: the controller may have failed over since (reconciler.py
        ``_start`` 506-511, the resume 396-402). ``late_answers_trusted``: as it was."""
        if self.world.model.late_answers_trusted or self.clock() < deadline:
            return True
        self.log(f"answer for {name} came after the fencing deadline; deciding again")
        self._wake_up(name, after_s=0.5)
        return False

    def _fence_target(self, fencing: Fencing) -> str | None:
        if not self.fencing_wired or fencing is Fencing.NONE:
            return None
        return fencing.value

    def _publish_fence_deadline(self) -> None:
        remaining = self.lease_remaining()
        now = self.clock()
        deadline = 0.0 if remaining is None else now + remaining - self.margin
        if abs(deadline - self.fence_written) < 0.05:
            return
        self.host.write_fence(deadline)
        was_fenced = self.fence_written <= now
        self.fence_written = deadline
        if was_fenced and deadline > now:
            self.log("lease proven again; instances may run")
            for name in list(self.tasks):
                self._wake_up(name)

    def _lease_changed(self) -> None:
        """The keeper sees the new ``valid_until`` on its next 0.1 s tick."""
        if not self.started or not self.fencing_wired:
            return
        if self._publish_timer is not None and self._publish_timer.pending:
            return
        period = self.world.timing.fence_keeper_s
        now = self.clock()
        k = math.floor((now - self._keeper_phase) / period) + 1
        wait = self._keeper_phase + k * period - now

        def publish() -> None:
            self._publish_timer = None
            self._publish_fence_deadline()

        self._publish_timer = self.later(wait, publish)

    # --- agent lifecycle -----------------------------------------------------------------

    def _agent_start(self) -> None:
        """reconciler.py ``start`` (148-155)."""
        self.started = True
        self._keeper_phase = self.clock()
        if self.fencing_wired:
            self._publish_fence_deadline()
        self._recover_all()
        self.world.store.subscribers.append(self._on_event)
        self.spawn(self._follow())
        if self.world.model.ready_after_reconcile:
            self.spawn(self._settle(), on_error=lambda e: None)

    def _settle(self) -> Gen:
        """The emulated ready_after_reconcile fix: once every local task has been
        reconciled (stale copies destroyed), the node says it is ready again."""
        marks = {name: self.workers.get(name, Worker()).runs for name in self.tasks}
        for name in sorted(marks):
            self._wake_up(name)
        while True:
            waiting = [
                name
                for name, mark in marks.items()
                if name in self.tasks
                and (w := self.workers.get(name)) is not None
                and (w.runs <= mark or w.busy or w.pending)
            ]
            if not waiting:
                break
            yield Sleep(0.1)
        while True:
            try:
                yield from self._set_ready(True)
                return
            except StoreError:
                yield Sleep(0.5)

    def _set_ready(self, ready: bool) -> Gen:
        store = self.world.store
        for _ in range(20):
            current: Node | None = yield Call(lambda: store.get_node(self.node_id))
            if current is None or current.status.ready == ready:
                return
            status = current.status.model_copy(update={"ready": ready})
            changed = current.model_copy(update={"status": status})
            answer = yield Call(partial(store.update, changed))
            if answer == "ok":
                self.log(f"node {'ready' if ready else 'not ready'}")
                return

    def _recover_all(self) -> None:
        host = self.host
        for run_dir in sorted(host.run_dirs):
            rd = host.run_dirs[run_dir]
            record = rd.record
            if record is None:
                self.log(f"unreadable task record in {run_dir}; clearing it")
                host.kill_strays(run_dir)
                host.rmtree(run_dir)
                continue
            local = LocalTask(
                name=record["instance"],
                vm=record["vm"],
                epoch=int(record["epoch"]),
                uid=str(record["uid"]),
                applied_restart_generation=int(record["restart_generation"]),
                restarts=int(record["restarts"]),
                stopping=bool(record["stopping"]),
                fencing=Fencing(record["fencing"]),
            )
            raw_handle = record["handle"]
            if raw_handle is None:
                killed = host.kill_strays(run_dir)
                self.log(f"start of {local.name} was interrupted; cleared {killed} strays")
            else:
                status: Status | None
                try:
                    status = self._driver_recover(int(raw_handle), run_dir)
                except TaskGone:
                    host.kill_strays(run_dir)
                    status = None
                if status is not None:
                    local.handle, local.status = int(raw_handle), status
                    local.started_mono = self.clock()
                    if status[0] is not Run.EXITED:
                        self._watch_exit(local)
                    self.log(f"re-attached {local.name} ({status[0].value})")
            self.tasks[local.name] = local
            self._wake_up(local.name)

    def _follow(self) -> Gen:
        """``_follow`` + ``_watch_from``: re-list every resync_s; the watch runs meanwhile."""
        store = self.world.store
        while True:
            try:
                yield Call(store.head)
                _, listed = yield Call(store.list_instances)
                for inst in listed:
                    if self._concerns_me(inst.metadata.name, inst, None):
                        self._wake_up(inst.metadata.name)
                for name in list(self.tasks):
                    self._wake_up(name)
                yield Sleep(self.world.timing.agent_resync_s)
            except StoreError:
                yield Sleep(0.5)

    def _concerns_me(self, name: str, inst: Instance | None, prev: Instance | None) -> bool:
        if name in self.tasks:
            return True
        worker = self.workers.get(name)
        if worker is not None and (worker.busy or worker.pending):
            return True
        if inst is not None and inst.spec.node == self.node_id:
            return True
        return prev is not None and prev.spec.node == self.node_id

    def _on_event(self, event: StoreEvent) -> None:
        """A store change: filtered when published, delivered in order after the watch delay."""
        if event.kind == "instances":
            inst = event.obj if isinstance(event.obj, Instance) else None
            prev = event.prev if isinstance(event.prev, Instance) else None
            if not self._concerns_me(event.name, inst, prev):
                return
        elif event.kind == "vms":
            prefix = event.name + "-"
            if not any(t.vm == event.name for t in self.tasks.values()) and not any(
                n.startswith(prefix) and (w.busy or w.pending) for n, w in self.workers.items()
            ):
                return
        else:
            return
        self.deliver(lambda: self._delivered(event))

    def _delivered(self, event: StoreEvent) -> None:
        if event.kind == "instances":
            inst = event.obj if isinstance(event.obj, Instance) else None
            if self._concerns_me(event.name, inst, None):
                self._wake_up(event.name)
        else:
            for task in list(self.tasks.values()):
                if task.vm == event.name:
                    self._wake_up(task.name)

    def _wake_up(self, name: str, after_s: float = 0.0) -> None:
        if after_s > 0:
            self.later(after_s, lambda: self._wake_up(name))
            return
        worker = self.workers.setdefault(name, Worker())
        worker.pending = True
        if not worker.busy:
            self._run_worker(name, worker)

    def _run_worker(self, name: str, worker: Worker) -> None:
        worker.busy, worker.pending = True, False

        def finished(_: object = None) -> None:
            worker.busy = False
            worker.runs += 1
            if worker.pending:
                self._run_worker(name, worker)
            elif name not in self.tasks:
                self.workers.pop(name, None)

        def failed(error: BlixardError) -> None:
            if isinstance(error, StoreError | Conflict):
                self._wake_up(name, after_s=0.5)
            else:
                self._wake_up(name, after_s=2.0)
            finished()

        self.spawn(self.reconcile(name), on_done=finished, on_error=failed)

    # --- one step (reconciler.py 340-380) ----------------------------------------------

    def reconcile(self, name: str) -> Gen:
        store = self.world.store
        inst: Instance | None = yield Call(lambda: store.get_instance(name))
        local = self.tasks.get(name)
        mine = inst is not None and inst.spec.node == self.node_id
        vm: VM | None = None
        if inst is not None and mine:
            vm_name = inst.spec.vm
            vm = yield Call(lambda: store.get_vm(vm_name))
        if inst is None or not mine:
            if local is not None:
                why = "deleted" if inst is None else f"moved to {inst.spec.node}"
                yield from self._remove(local, graceful=inst is None, why=why)
            return
        if vm is None:
            if local is not None:
                yield from self._remove(local, graceful=True, why="its VM was deleted")
            gone = LocalTask(name, inst.spec.vm, epoch=inst.spec.epoch)
            yield from self._report(inst, gone, ObservedState.STOPPED, "its VM was deleted")
            return
        uid = str(inst.metadata.uid or "")
        if local is not None and (local.epoch != inst.spec.epoch or local.uid != uid):
            why = f"epoch {inst.spec.epoch} supersedes ours"
            if local.uid != uid:
                why = "the instance was deleted and created again"
            yield from self._remove(local, graceful=False, why=why)
            local = None
        if local is None:
            local = LocalTask(
                name=name,
                vm=vm.metadata.name,
                epoch=inst.spec.epoch,
                uid=uid,
                policy=vm.spec.restart,
                applied_restart_generation=inst.spec.restart_generation,
            )
            self.tasks[name] = local
        if inst.spec.desired_state is DesiredState.RUNNING:
            yield from self._ensure_running(inst, vm, local)
        else:
            yield from self._ensure_stopped(inst, local)

    def _ensure_running(self, inst: Instance, vm: VM, local: LocalTask) -> Gen:
        """reconciler.py 382-466."""
        host = self.host
        if local.running and local.handle is not None:
            rd = host.run_dirs.get(local.name)
            if rd is not None and rd.fenced_paused:
                if not self.may_run():
                    self._wake_up(local.name, after_s=0.5)
                    return
                asked_until = self._answer_deadline()
                resumed = yield from self._report(
                    inst, local, ObservedState.RUNNING, "resumed after fencing", force=True
                )
                if not resumed:
                    return
                if not self._answer_in_time(asked_until, local.name):
                    return
                task = host.tasks.get(local.handle)
                if task is not None and task.alive:
                    host.resume_fenced(task)
                else:
                    rd.fenced_paused = False
                self.log(f"resumed {local.name} after fencing")
        if local.running:
            if inst.spec.restart_generation > local.applied_restart_generation:
                self.log(f"restart of {local.name} requested")
                yield from self._stop_task(local)
                local.applied_restart_generation = inst.spec.restart_generation
                yield from self._start(inst, vm, local, reason="restarted on request", count=False)
                return
            if (
                local.failures
                and self.clock() - local.started_mono >= self.world.timing.stable_after_s
            ):
                local.failures = 0
            yield from self._report(inst, local, _observed(local.status), "")
            return
        asked = inst.spec.restart_generation > local.applied_restart_generation
        if asked:
            local.failures, local.not_before, local.last_error = 0, 0.0, ""
        crashed = (
            local.status is not None
            and local.status[0] is Run.EXITED
            and not local.stopping
            and not asked
        )
        boot_failed = local.status is None and bool(local.last_error) and not asked
        if (
            crashed
            and local.status is not None
            and not _should_restart(vm.spec.restart.mode, local.status)
        ):
            ok = _exit_code(local.status) == 0
            state = ObservedState.STOPPED if ok else ObservedState.FAILED
            why = f"{_describe(local.status)}; not restarted (restart policy)"
            yield from self._report(inst, local, state, why)
            return
        if boot_failed and vm.spec.restart.mode is RestartMode.NEVER:
            why = f"{local.last_error}; not restarted (restart policy)"
            yield from self._report(inst, local, ObservedState.FAILED, why)
            return
        now = self.clock()
        if now < local.not_before:
            wait = local.not_before - now
            cause = _describe(local.status) if crashed else local.last_error
            why = f"{cause}; restarting in {wait:.1f}s"
            yield from self._report(inst, local, ObservedState.FAILED, why)
            self._wake_up(local.name, after_s=wait)
            return
        if not self.may_run():
            why = "waiting: this node cannot prove its lease (fenced)"
            yield from self._report(inst, local, ObservedState.PENDING, why)
            self._wake_up(local.name, after_s=0.5)
            return
        local.applied_restart_generation = inst.spec.restart_generation
        again = crashed or boot_failed
        reason = "restarted" if again else ""
        if local.fenced_out:
            reason, local.fenced_out = "restarted after fencing", False
        yield from self._start(inst, vm, local, reason=reason, count=again)

    def _ensure_stopped(self, inst: Instance, local: LocalTask) -> Gen:
        """reconciler.py 468-480."""
        if local.running:
            yield from self._report(inst, local, ObservedState.STOPPING, "stopping")
            yield from self._stop_task(local)
        if not local.stopping:
            local.stopping = True
            if local.handle is not None:
                self._save(local)
        local.failures, local.not_before, local.last_error = 0, 0.0, ""
        message = _describe(local.status) if local.status is not None else ""
        yield from self._report(inst, local, ObservedState.STOPPED, message)

    def _start(self, inst: Instance, vm: VM, local: LocalTask, *, reason: str, count: bool) -> Gen:
        """reconciler.py 482-537."""
        host = self.host
        run_dir = local.name
        if local.handle is not None:
            self._driver_destroy(local.handle, run_dir)
            local.handle = None
        host.kill_strays(run_dir)
        host.run_dirs.setdefault(run_dir, RunDir())
        if count:
            local.restarts += 1
        local.stopping = False
        local.policy = vm.spec.restart
        local.fencing = vm.spec.fencing
        asked_until = self._answer_deadline()
        announced = yield from self._report(
            inst, local, ObservedState.STARTING, reason or "starting", force=True
        )
        if not announced:
            self.log(f"not starting {local.name}: the instance moved")
            return
        if not self._answer_in_time(asked_until, local.name):
            return
        self._save(local)
        host.run_dirs.setdefault(run_dir, RunDir()).fence = self._fence_target(vm.spec.fencing)
        try:
            handle = yield from self._driver_start(local, vm)
        except BootFailed as exc:
            local.status = None
            local.last_error = str(exc)
            self._fail(local)
            delay = max(0.0, local.not_before - self.clock())
            retry = (
                f"; restarting in {delay:.1f}s"
                if vm.spec.restart.mode is not RestartMode.NEVER
                else "; not restarted (restart policy)"
            )
            yield from self._report(inst, local, ObservedState.FAILED, f"{exc}{retry}")
            if vm.spec.restart.mode is not RestartMode.NEVER:
                self._wake_up(local.name, after_s=delay)
            return
        local.handle = handle
        local.status = (Run.RUNNING, None)
        local.started_mono = self.clock()
        local.started_at = self.world.wall()
        local.last_error = ""
        self._save(local)
        self._watch_exit(local)
        self.world.on_running(local.name, local.epoch, self.node_id)
        yield from self._report(inst, local, ObservedState.RUNNING, reason)

    def _fence_paused(self, handle: int) -> bool:
        """reconciler.py ``_fence_paused``; always False under the old rule (see Model)."""
        if self.world.model.stop_resumes_fenced:
            return False
        task = self.host.tasks.get(handle)
        rd = self.host.run_dirs.get(task.run_dir) if task is not None else None
        return rd is not None and rd.fenced_paused

    def _stop_task(self, local: LocalTask) -> Gen:
        """reconciler.py 539-548: a fence-paused task is killed, not resumed to stop."""
        if local.handle is None:
            return
        local.stopping = True
        if self._fence_paused(local.handle):
            task = self.host.tasks.get(local.handle)
            if task is not None:
                self.log(f"{local.name} is paused by fencing: killed, not resumed to stop")
                self.host.kill_group(task)
        local.status = yield from self._driver_stop(local.handle, self.world.timing.stop_timeout_s)

    def _remove(self, local: LocalTask, *, graceful: bool, why: str) -> Gen:
        """reconciler.py 550-564."""
        self.log(f"removing local task {local.name}: {why}")
        if local.watcher is not None:
            local.watcher.cancelled = True
        if local.handle is not None:
            if graceful and local.running and not self._fence_paused(local.handle):
                yield from self._driver_stop(
                    local.handle, min(self.world.timing.stop_timeout_s, 10.0)
                )
            self._driver_destroy(local.handle, local.name)
        self.host.kill_strays(local.name)
        self.host.rmtree(local.name)
        self.tasks.pop(local.name, None)

    def _fail(self, local: LocalTask) -> None:
        local.failures += 1
        policy = local.policy
        doublings = min(local.failures - 1, 30)
        delay = min(policy.backoff_initial_s * 2**doublings, policy.backoff_max_s)
        local.not_before = self.clock() + delay

    def _watch_exit(self, local: LocalTask) -> None:
        """reconciler.py 573-594: the exit watcher is a task of this process."""
        handle = local.handle
        assert handle is not None
        task = self.host.tasks.get(handle)
        watcher = Watcher()
        local.watcher = watcher

        def fired() -> None:
            if watcher.cancelled or local.handle != handle:
                return
            status = self.host.inspect(handle)
            local.status = status
            ended = status[1]
            if ended is not None and ended.fenced:
                self.log(f"task {local.name} fenced")
                local.stopping, local.fenced_out = True, True
            elif not local.stopping:
                self.log(f"task {local.name} exited: {_describe(status)}")
                if self.clock() - local.started_mono >= self.world.timing.stable_after_s:
                    local.failures = 0
                self._fail(local)
            self._wake_up(local.name)

        if task is None or not task.alive:
            self.later(0.0, fired)
        else:
            task.listeners.append(lambda: self.run(fired))

    # --- the process driver (drivers/process/driver.py) --------------------------------

    def _driver_start(self, local: LocalTask, vm: VM) -> Gen:
        world = self.world
        task = self.host.spawn(
            local.name,
            local.name,
            local.uid,
            local.epoch,
            vm.spec.vcpus,
            vm.spec.memory_mib,
        )
        boot = world.uniform(world.task_rng, world.timing.boot_s)
        fails = world.task_rng.random() < world.load.boot_failure_p
        exited = yield WaitExit(task, boot)
        if exited:
            raise BootFailed("it exited before printing its ready line")
        if fails:
            self.host.kill_group(task)
            raise BootFailed("no ready line within its boot timeout")
        return task.pid

    def _driver_stop(self, handle: int, timeout: float) -> Gen:
        host = self.host
        task = host.tasks.get(handle)
        if task is not None and task.alive:
            host.sigterm(task)
            exited = yield WaitExit(task, timeout)
            if not exited:
                host.kill_group(task)
        return host.inspect(handle)

    def _driver_destroy(self, handle: int, run_dir: str) -> None:
        task = self.host.tasks.get(handle)
        if task is not None:
            self.host.kill_group(task)
        self.host.rmtree(run_dir)

    def _driver_recover(self, handle: int, run_dir: str) -> Status:
        if run_dir not in self.host.run_dirs:
            raise TaskGone(f"run directory {run_dir} is gone")
        return self.host.inspect(handle)

    # --- reporting -------------------------------------------------------------------------

    def _save(self, local: LocalTask) -> None:
        self.host.run_dirs.setdefault(local.name, RunDir()).record = {
            "instance": local.name,
            "vm": local.vm,
            "epoch": local.epoch,
            "uid": local.uid,
            "stopping": local.stopping,
            "restart_generation": local.applied_restart_generation,
            "restarts": local.restarts,
            "fencing": local.fencing.value,
            "handle": local.handle,
        }

    def _report(
        self,
        inst: Instance,
        local: LocalTask,
        state: ObservedState,
        message: str,
        *,
        force: bool = False,
    ) -> Gen:
        """reconciler.py 613-654, with ObjectStore.modify (store/objects.py 73-86)."""
        status = InstanceStatus(
            state=state,
            node=self.node_id,
            epoch=local.epoch,
            message=message,
            restarts=local.restarts,
            restart_generation=local.applied_restart_generation,
            handle={"pid": str(local.handle)} if local.handle is not None else {},
            ready=state is ObservedState.RUNNING,
            exit_code=_exit_code(local.status),
            started_at=local.started_at,
            updated_at=inst.status.updated_at,
        )
        if status == inst.status and not force:
            return True
        status = status.model_copy(update={"updated_at": self.world.wall()})
        store, name = self.world.store, inst.metadata.name
        for _ in range(20):
            current: Instance | None = yield Call(lambda: store.get_instance(name))
            if current is None:
                return False
            if current.spec.node != self.node_id or current.spec.epoch != local.epoch:
                return False
            changed = current.model_copy(update={"status": status})
            answer = yield Call(partial(store.update, changed))
            if answer == "ok":
                self.log(f"report {name} epoch {local.epoch} {state.value} {message}".rstrip())
                return True
            if answer == "absent":
                return False
        raise Conflict(f"{name!r} kept changing under 20 attempts to modify it")


def start_daemon(world: World, host: Host) -> Daemon:
    """``blixard node start`` on ``host``: a new process, which registers and starts its agent."""
    host.incarnation += 1
    daemon = Daemon(world, host, host.incarnation)
    host.daemon = daemon
    host.wanted_up = True
    world.log(host.name, f"daemon starts (incarnation {host.incarnation})")
    daemon.boot()
    return daemon
