"""The node agent's local reconcile: instances assigned to this node <-> local tasks.

One worker per instance, woken by store events, task exits and timers, so a
VM that takes seconds to boot never delays another. Each pass compares the
instance (desired state, epoch, restart generation) with the local task and
takes one step: start, stop, restart, or destroy a copy that is no longer
ours. Observations go back to ``Instance.status`` with compare-and-swap, and
only while the instance is still assigned here at the same epoch, so a late
report can never overwrite a newer assignment.

Tasks outlive the agent (see drivers/executor.py). Each task's run directory
holds ``agent.json``: written *before* a start (no handle yet) and again with
the handle after it. A restarted agent re-attaches to every task it finds
there; a run directory whose start was interrupted is cleared of strays and
started afresh. Never a second launch of the same instance.

Restart policy (on the same node): ``always`` restarts any exit, ``on-failure``
restarts non-zero exits, signals and failed boots, ``never`` leaves the
instance failed or stopped. Restarts back off exponentially from
``backoff_initial_s`` to ``backoff_max_s``; the count resets once a task has
stayed up for ``stable_after_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from blixard.domain.errors import (
    BlixardError,
    Compacted,
    Conflict,
    NotFound,
    StoreError,
)
from blixard.domain.instance import DesiredState, Instance, InstanceStatus, ObservedState
from blixard.domain.keys import Kind, kind_prefix, parse_object_key
from blixard.domain.vm import VM, Fencing, Hypervisor, RestartMode, RestartPolicy
from blixard.drivers import executor
from blixard.drivers.protocol import (
    Driver,
    DriverError,
    TaskGone,
    TaskHandle,
    TaskState,
    TaskStatus,
)
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

log = structlog.get_logger(__name__)

RECORD = "agent.json"


@dataclass
class LocalTask:
    """What this agent knows of one instance's task on this node."""

    name: str
    vm: str
    hypervisor: Hypervisor
    epoch: int
    #: The instance object's uid: a VM deleted and created again under the same
    #: name gets new instances with new uids, never the old task.
    uid: str = ""
    #: The restart policy the task was started with (the exit watcher needs it at once).
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    fencing: Fencing = Fencing.STOP
    #: The task was ended by the fencing deadline: start it again without counting a failure.
    fenced_out: bool = False
    handle: TaskHandle | None = None
    status: TaskStatus | None = None
    applied_restart_generation: int = 0
    started_mono: float = 0.0
    started_at: datetime | None = None
    #: Consecutive failures, for the backoff; reset once a task stays up.
    failures: int = 0
    restarts: int = 0
    not_before: float = 0.0
    stopping: bool = False
    last_error: str = ""
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return (
            self.handle is not None
            and self.status is not None
            and self.status.state is not TaskState.EXITED
        )


class _NotOurs(Exception):
    """The instance moved (node or epoch) while we were about to report on it."""


class Agent:
    """Runs the instances the store assigns to ``node_id`` (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        node_id: str,
        drivers: Mapping[Hypervisor, Driver],
        run_root: Path,
        *,
        stop_timeout_s: float = 30.0,
        resync_s: float = 5.0,
        stable_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        lease_remaining: Callable[[], float | None] | None = None,
        fence_margin_s: float = 1.0,
    ) -> None:
        self.store = store
        self.objects = ObjectStore(store)
        self.node_id = node_id
        self.drivers = dict(drivers)
        self.run_root = run_root
        self.stop_timeout_s = stop_timeout_s
        self.resync_s = resync_s
        self.stable_after_s = stable_after_s
        self.clock = clock
        #: How long this node's liveness lease is still proven to live (None: no lease);
        #: None as a whole means no fencing (a single node on its embedded store).
        self.lease_remaining = lease_remaining
        self.fence_margin_s = fence_margin_s
        self.tasks: dict[str, LocalTask] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._main: asyncio.Task[None] | None = None
        self._fence_keeper: asyncio.Task[None] | None = None
        self._fence_written = -1.0

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attach to the tasks left by a previous run, then follow the store."""
        self.run_root.mkdir(parents=True, exist_ok=True)
        if self.lease_remaining is not None:
            self._publish_fence_deadline()
            self._fence_keeper = asyncio.create_task(self._keep_fence_deadline())
        await self._recover_all()
        self._main = asyncio.create_task(self._follow())

    async def close(self) -> None:
        """Stop reconciling. Tasks keep running: the next agent re-attaches to them."""
        tasks = (self._main, self._fence_keeper, *self._workers.values())
        pending = [t for t in tasks if t is not None]
        pending += [t.watcher for t in self.tasks.values() if t.watcher is not None]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def logs(self, instance: str, follow: bool) -> AsyncIterator[bytes]:
        """The console/output of a task on this node."""
        local = self.tasks.get(instance)
        if local is None or local.handle is None:
            raise NotFound(f"instance {instance!r} has no task on node {self.node_id}")
        return self.drivers[local.hypervisor].logs(local.handle, follow=follow)

    # --- fencing ----------------------------------------------------------------------------

    def may_run(self) -> bool:
        """False while this node cannot prove its lease lives beyond the fencing margin."""
        if self.lease_remaining is None:
            return True
        remaining = self.lease_remaining()
        return remaining is not None and remaining > self.fence_margin_s

    def fence_deadline(self) -> float:
        """Until when (our clock) a store answer received now may still be acted on."""
        if self.lease_remaining is None:
            return float("inf")
        remaining = self.lease_remaining()
        if remaining is None:
            return float("-inf")
        return self.clock() + remaining - self.fence_margin_s

    def _fence_target(self, fencing: Fencing) -> Path | None:
        if self.lease_remaining is None or fencing is Fencing.NONE:
            return None
        return self.run_root / f"fence-{fencing.value}"

    def _publish_fence_deadline(self) -> None:
        """Write the deadline every fenced task's shim obeys: lease end minus the margin."""
        assert self.lease_remaining is not None
        remaining = self.lease_remaining()
        now = self.clock()
        deadline = 0.0 if remaining is None else now + remaining - self.fence_margin_s
        if abs(deadline - self._fence_written) < 0.05:
            return
        for fencing in (Fencing.STOP, Fencing.PAUSE):
            executor.write_fence(self.run_root / f"fence-{fencing.value}", deadline, fencing.value)
        was_fenced = 0 <= self._fence_written <= now  # (-1: nothing written yet)
        self._fence_written = deadline
        if was_fenced and deadline > now:
            log.info("lease proven again; instances may run", node=self.node_id)
            for name in list(self.tasks):
                self._wake_up(name)

    def _refresh_fence(self) -> None:
        """Write the current deadline now, before a task is started or resumed.

        The files are refreshed every 0.1 s; right after the lease is proven again
        they may still hold the passed deadline, and a shim reading that would end
        the new task at once (seen in CI as a restart counted after fencing).
        """
        if self.lease_remaining is not None:
            self._publish_fence_deadline()

    async def _keep_fence_deadline(self) -> None:
        fenced = False
        while True:
            self._publish_fence_deadline()
            late = self.clock() >= self._fence_written
            if late and not fenced:
                log.warning(
                    "cannot prove this node's lease: fencing its exclusive instances",
                    node=self.node_id,
                )
            fenced = late
            await asyncio.sleep(0.1)

    # --- recovery ---------------------------------------------------------------------------

    async def _recover_all(self) -> None:
        for run_dir in sorted(p for p in self.run_root.iterdir() if p.is_dir()):
            try:
                record = json.loads((run_dir / RECORD).read_text())
                local = LocalTask(
                    name=record["instance"],
                    vm=record["vm"],
                    hypervisor=Hypervisor(record["hypervisor"]),
                    epoch=int(record["epoch"]),
                    uid=str(record.get("uid", "")),
                    applied_restart_generation=int(record.get("restart_generation", 0)),
                    restarts=int(record.get("restarts", 0)),
                    stopping=bool(record.get("stopping", False)),
                    fencing=Fencing(record.get("fencing", Fencing.STOP.value)),
                )
            except (OSError, ValueError, KeyError) as exc:
                log.warning(
                    "unreadable task record; clearing it", run_dir=str(run_dir), error=str(exc)
                )
                executor.kill_strays(run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                continue
            raw_handle = record.get("handle")
            if raw_handle is None:
                killed = executor.kill_strays(run_dir)
                log.info(
                    "start was interrupted; cleared strays", instance=local.name, killed=killed
                )
            else:
                handle = TaskHandle.from_dict(raw_handle)
                driver = self.drivers.get(local.hypervisor)
                try:
                    if driver is None:
                        raise TaskGone(f"no {local.hypervisor.value} driver on this node")
                    status = await driver.recover(handle)
                except (TaskGone, DriverError) as exc:
                    log.warning("cannot re-attach; clearing", instance=local.name, error=str(exc))
                    executor.kill_strays(run_dir)
                    status = None
                if status is not None:
                    local.handle, local.status = handle, status
                    local.started_mono = self.clock()
                    if status.state is not TaskState.EXITED:
                        self._watch_exit(local)
                    log.info("re-attached", instance=local.name, state=status.state.value)
            self.tasks[local.name] = local
            self._wake_up(local.name)

    # --- following the store -----------------------------------------------------------------

    async def _follow(self) -> None:
        prefixes = (kind_prefix(Kind.INSTANCES), kind_prefix(Kind.VMS))
        while True:
            try:
                head = await self.store.head_revision()
                for inst in await self.objects.list(Instance):
                    self._wake_up(inst.metadata.name)
                for name in list(self.tasks):
                    self._wake_up(name)
                await self._watch_from(head + 1, prefixes)
            except* (Compacted, StoreError) as group:
                # Watch errors arrive wrapped by the TaskGroup; plain ones too with except*.
                log.info("agent watch restarting", error=str(group.exceptions[0]))
                await asyncio.sleep(0.5)

    async def _watch_from(self, revision: int, prefixes: tuple[str, str]) -> None:
        """Wake the instances an event touches; return after ``resync_s`` to re-list."""

        async def one(prefix: str) -> None:
            async for event in self.store.watch(prefix, from_revision=revision):
                kind, name = parse_object_key(event.kv.key)
                if kind is Kind.INSTANCES:
                    self._wake_up(name)
                else:
                    # A VM change reaches other instances through the controller's
                    # writes to them; local tasks of the VM are woken directly.
                    for task in self.tasks.values():
                        if task.vm == name:
                            self._wake_up(task.name)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.resync_s), asyncio.TaskGroup() as group:
                for prefix in prefixes:
                    group.create_task(one(prefix))

    def _wake_up(self, name: str, after_s: float = 0.0) -> None:
        event = self._wake.setdefault(name, asyncio.Event())
        if after_s > 0:
            asyncio.get_running_loop().call_later(after_s, event.set)
        else:
            event.set()
        worker = self._workers.get(name)
        if worker is None or worker.done():
            self._workers[name] = asyncio.create_task(self._worker(name, event))

    async def _worker(self, name: str, event: asyncio.Event) -> None:
        while True:
            await event.wait()
            event.clear()
            try:
                await self.reconcile(name)
            except (StoreError, Conflict) as exc:
                log.info("reconcile will retry", instance=name, error=str(exc))
                self._wake_up(name, after_s=0.5)
            except Exception:
                log.exception("reconcile failed", instance=name)
                self._wake_up(name, after_s=2.0)

    # --- one step ---------------------------------------------------------------------------

    async def reconcile(self, name: str) -> None:
        inst = await self.objects.find(Instance, name)
        local = self.tasks.get(name)
        mine = inst is not None and inst.spec.node == self.node_id
        vm = await self.objects.find(VM, inst.spec.vm) if inst is not None and mine else None
        if inst is None or not mine:
            if local is not None:
                # Deleted: stop it gracefully. Assigned elsewhere: kill it now, the
                # other node may already run it (never two copies).
                why = "deleted" if inst is None else f"moved to {inst.spec.node}"
                await self._remove(local, graceful=inst is None, why=why)
            return
        if vm is None:
            # The VM is gone; the controller deletes the instance once we report it stopped.
            if local is not None:
                await self._remove(local, graceful=True, why="its VM was deleted")
            gone = LocalTask(name, inst.spec.vm, Hypervisor.PROCESS, epoch=inst.spec.epoch)
            await self._report(inst, gone, ObservedState.STOPPED, "its VM was deleted")
            return
        uid = str(inst.metadata.uid or "")
        if local is not None and (local.epoch != inst.spec.epoch or local.uid != uid):
            why = f"epoch {inst.spec.epoch} supersedes ours"
            if local.uid != uid:
                why = "the instance was deleted and created again"
            await self._remove(local, graceful=False, why=why)
            local = None
        if local is None:
            local = LocalTask(
                name=name,
                vm=vm.metadata.name,
                hypervisor=vm.spec.hypervisor,
                epoch=inst.spec.epoch,
                uid=uid,
                policy=vm.spec.restart,
                applied_restart_generation=inst.spec.restart_generation,
            )
            self.tasks[name] = local
        if inst.spec.desired_state is DesiredState.RUNNING:
            await self._ensure_running(inst, vm, local)
        else:
            await self._ensure_stopped(inst, local)

    async def _ensure_running(self, inst: Instance, vm: VM, local: LocalTask) -> None:
        driver = self.drivers.get(vm.spec.hypervisor)
        if driver is None:
            why = f"node {self.node_id} has no {vm.spec.hypervisor.value} driver"
            await self._report(inst, local, ObservedState.FAILED, why)
            return
        if local.running and local.handle is not None:
            marker = Path(local.handle.run_dir) / executor.FENCED_PAUSED
            if marker.exists():
                if not self.may_run():
                    self._wake_up(local.name, after_s=0.5)
                    return
                # Still ours at this epoch (the report is a compare-and-swap): resume it,
                # unless the answer came after the deadline that held when we asked.
                deadline = self.fence_deadline()
                if not await self._report(
                    inst, local, ObservedState.RUNNING, "resumed after fencing", force=True
                ):
                    return
                if self.clock() >= deadline:
                    self._wake_up(local.name, after_s=0.5)
                    return
                self._refresh_fence()
                executor.signal_group(
                    local.handle.pid, local.handle.pid_start_ticks, signal.SIGCONT
                )
                marker.unlink(missing_ok=True)
                log.info("resumed after fencing", instance=local.name)
        if local.running:
            if inst.spec.restart_generation > local.applied_restart_generation:
                log.info("restart requested", instance=local.name)
                await self._stop_task(local)
                local.applied_restart_generation = inst.spec.restart_generation
                await self._start(
                    inst, vm, local, driver, reason="restarted on request", count=False
                )
                return
            if local.failures and self.clock() - local.started_mono >= self.stable_after_s:
                local.failures = 0
            await self._report(inst, local, _observed(local.status), "")
            return
        # Not running: never started for this epoch, stopped by us, crashed, or failed to boot.
        # A restart asked for (vm restart) overrides the policy and any earlier failure.
        asked = inst.spec.restart_generation > local.applied_restart_generation
        if asked:
            local.failures, local.not_before, local.last_error = 0, 0.0, ""
        crashed = (
            local.status is not None
            and local.status.state is TaskState.EXITED
            and not local.stopping
            and not asked
        )
        boot_failed = local.status is None and bool(local.last_error) and not asked
        if (
            crashed
            and local.status is not None
            and not _should_restart(vm.spec.restart.mode, local.status)
        ):
            ok = local.status.exit_code == 0
            state = ObservedState.STOPPED if ok else ObservedState.FAILED
            why = f"{_describe(local.status)}; not restarted (restart policy)"
            await self._report(inst, local, state, why)
            return
        if boot_failed and vm.spec.restart.mode is RestartMode.NEVER:
            why = f"{local.last_error}; not restarted (restart policy)"
            await self._report(inst, local, ObservedState.FAILED, why)
            return
        now = self.clock()
        if now < local.not_before:
            wait = local.not_before - now
            cause = _describe(local.status) if crashed else local.last_error
            why = f"{cause}; restarting in {wait:.1f}s"
            await self._report(inst, local, ObservedState.FAILED, why)
            self._wake_up(local.name, after_s=wait)
            return
        if not self.may_run():
            why = "waiting: this node cannot prove its lease (fenced)"
            await self._report(inst, local, ObservedState.PENDING, why)
            self._wake_up(local.name, after_s=0.5)
            return
        local.applied_restart_generation = inst.spec.restart_generation
        again = crashed or boot_failed
        reason = "restarted" if again else ""
        if local.fenced_out:
            reason = "restarted after fencing"
        await self._start(inst, vm, local, driver, reason=reason, count=again)

    async def _ensure_stopped(self, inst: Instance, local: LocalTask) -> None:
        if local.running:
            await self._report(inst, local, ObservedState.STOPPING, "stopping")
            await self._stop_task(local)
        if not local.stopping:
            # Whatever ended it, it is now stopped on purpose: a later start is a start,
            # not a restart the policy could refuse (also across agent restarts).
            local.stopping = True
            if local.handle is not None:
                self._save(local, self.run_root / local.name)
        local.failures, local.not_before, local.last_error = 0, 0.0, ""
        message = _describe(local.status) if local.status is not None else ""
        await self._report(inst, local, ObservedState.STOPPED, message)

    async def _start(
        self, inst: Instance, vm: VM, local: LocalTask, driver: Driver, *, reason: str, count: bool
    ) -> None:
        """Start the instance's task; ``count`` says it is a restart after a failure."""
        run_dir = self.run_root / local.name
        if local.handle is not None:  # the previous, exited task of this instance
            await driver.destroy(local.handle)
            local.handle = None
        executor.kill_strays(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The start is announced with a compare-and-swap that checks node and epoch
        # first: a controller that reassigned the instance meanwhile wins, and we
        # never start a copy it may already run elsewhere.
        deadline = self.fence_deadline()
        if not await self._report(
            inst, local, ObservedState.STARTING, reason or "starting", force=True
        ):
            log.info("not starting: the instance moved", instance=local.name)
            return
        if self.clock() >= deadline:
            # The store said "yours" after our lease could have expired: that answer
            # proves nothing any more (the instance may run elsewhere by now).
            log.info("not starting: the store answered after the fencing deadline")
            self._wake_up(local.name, after_s=0.5)
            return
        # Only now is this a start: until here, a refused or failed announcement must
        # leave the task as it was (a fenced task that looked crashed would be counted).
        if count:
            local.restarts += 1
        local.stopping, local.fenced_out = False, False
        local.policy = vm.spec.restart
        local.fencing = vm.spec.fencing
        self._save(local, run_dir)  # no handle yet: marks a start in progress
        self._refresh_fence()
        executor.link_fence(run_dir, self._fence_target(vm.spec.fencing))
        try:
            handle = await driver.start(local.name, vm.spec, run_dir)
        except (BlixardError, OSError) as exc:  # BootFailed, DriverError, bad spec, spawn
            local.status = None
            local.last_error = str(exc)
            self._fail(local)
            delay = max(0.0, local.not_before - self.clock())
            retry = (
                f"; restarting in {delay:.1f}s"
                if vm.spec.restart.mode is not RestartMode.NEVER
                else "; not restarted (restart policy)"
            )
            await self._report(inst, local, ObservedState.FAILED, f"{exc}{retry}")
            if vm.spec.restart.mode is not RestartMode.NEVER:
                self._wake_up(local.name, after_s=delay)
            return
        local.handle = handle
        local.status = TaskStatus(TaskState.RUNNING)
        local.started_mono = self.clock()
        local.started_at = datetime.now(UTC)
        local.last_error = ""
        self._save(local, run_dir)
        self._watch_exit(local)
        await self._report(inst, local, ObservedState.RUNNING, reason)

    async def _stop_task(self, local: LocalTask) -> None:
        if local.handle is None:
            return
        local.stopping = True
        driver = self.drivers[local.hypervisor]
        if _fence_paused(local.handle):
            # A graceful stop would let it run (SIGCONT, a guest shutdown) after its
            # fencing deadline, while the cluster may run it elsewhere: kill it.
            executor.kill_group(local.handle.pid, local.handle.pid_start_ticks)
        local.status = await driver.stop(local.handle, self.stop_timeout_s)

    async def _remove(self, local: LocalTask, *, graceful: bool, why: str) -> None:
        """Destroy our copy: stop it first when the instance was deleted, kill it when fenced."""
        log.info("removing local task", instance=local.name, why=why)
        if local.watcher is not None:
            local.watcher.cancel()
        if local.handle is not None:
            driver = self.drivers[local.hypervisor]
            if graceful and local.running and not _fence_paused(local.handle):
                with contextlib.suppress(BlixardError):
                    await driver.stop(local.handle, min(self.stop_timeout_s, 10.0))
            await driver.destroy(local.handle)
        run_dir = self.run_root / local.name
        executor.kill_strays(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        self.tasks.pop(local.name, None)

    def _fail(self, local: LocalTask) -> None:
        local.failures += 1
        policy = local.policy
        doublings = min(local.failures - 1, 30)  # 2**30 s outlasts any backoff_max_s
        delay = min(policy.backoff_initial_s * 2**doublings, policy.backoff_max_s)
        local.not_before = self.clock() + delay

    def _watch_exit(self, local: LocalTask) -> None:
        handle = local.handle
        assert handle is not None

        async def watch() -> None:
            status = await self.drivers[local.hypervisor].wait(handle)
            if local.handle is not handle:
                return
            local.status = status
            if status.fenced:
                log.warning("task fenced", instance=local.name)
                local.stopping, local.fenced_out = True, True
            elif not local.stopping:
                log.warning("task exited", instance=local.name, status=_describe(status))
                if self.clock() - local.started_mono >= self.stable_after_s:
                    local.failures = 0  # it had been up long enough: start the backoff afresh
                self._fail(local)
            self._wake_up(local.name)

        local.watcher = asyncio.create_task(watch())

    # --- reporting -------------------------------------------------------------------------

    def _save(self, local: LocalTask, run_dir: Path) -> None:
        record: dict[str, Any] = {
            "instance": local.name,
            "vm": local.vm,
            "hypervisor": local.hypervisor.value,
            "epoch": local.epoch,
            "uid": local.uid,
            "stopping": local.stopping,
            "restart_generation": local.applied_restart_generation,
            "restarts": local.restarts,
            "fencing": local.fencing.value,
            "handle": local.handle.to_dict() if local.handle is not None else None,
        }
        tmp = run_dir / (RECORD + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(run_dir / RECORD)

    async def _report(
        self,
        inst: Instance,
        local: LocalTask,
        state: ObservedState,
        message: str,
        *,
        force: bool = False,
    ) -> bool:
        """Write what we observe, if the instance is still ours at our epoch; say if it is.

        ``force`` writes even an unchanged status, so the answer is checked
        against the store now rather than against the instance as last read.
        """
        status = InstanceStatus(
            state=state,
            node=self.node_id,
            epoch=local.epoch,
            message=message,
            restarts=local.restarts,
            restart_generation=local.applied_restart_generation,
            handle=local.handle.to_dict() if local.handle is not None else {},
            ready=state is ObservedState.RUNNING,
            exit_code=local.status.exit_code if local.status is not None else None,
            started_at=local.started_at,
            updated_at=inst.status.updated_at,
        )
        if status == inst.status and not force:
            return True
        status = status.model_copy(update={"updated_at": datetime.now(UTC)})

        def change(current: Instance) -> Instance:
            if current.spec.node != self.node_id or current.spec.epoch != local.epoch:
                raise _NotOurs
            return current.model_copy(update={"status": status})

        try:
            await self.objects.modify(Instance, inst.metadata.name, change)
        except (_NotOurs, NotFound):
            return False
        return True


def _fence_paused(handle: TaskHandle) -> bool:
    return (Path(handle.run_dir) / executor.FENCED_PAUSED).exists()


def _observed(status: TaskStatus | None) -> ObservedState:
    if status is None:
        return ObservedState.PENDING
    return {
        TaskState.RUNNING: ObservedState.RUNNING,
        TaskState.PAUSED: ObservedState.PAUSED,
        TaskState.EXITED: ObservedState.STOPPED,
    }[status.state]


def _should_restart(mode: RestartMode, status: TaskStatus) -> bool:
    if mode is RestartMode.ALWAYS:
        return True
    if mode is RestartMode.ON_FAILURE:
        return status.exit_code != 0
    return False


def _describe(status: TaskStatus | None) -> str:
    if status is None:
        return ""
    if status.signal is not None:
        return f"killed by signal {status.signal}"
    if status.exit_code is not None:
        return f"exited with code {status.exit_code}"
    return status.message or status.state.value
