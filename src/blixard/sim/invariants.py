"""The properties every run must keep, checked after every event and at the end.

1. **Never two copies** (safety): no instance name has a running task (not
   SIGSTOPped, not exited) on two nodes at once, nor twice on one node.
   Ground truth: the hosts' processes, not what the store says.
2. **No overcommit**: the live tasks on a host (running or SIGSTOPped: a
   paused VM still holds its memory) fit its capacity, and every node
   record's ``status.allocated`` (the controller's claims) fits its capacity.
3. **Liveness**, at the end of a run, after ``quiet_s`` seconds without faults
   or changes. For every VM that should run, every replica ``0..replicas-1``:

   * if its instance is assigned to a node that is alive (its liveness key
     is in the store), that node runs it at the current epoch;
   * otherwise (unassigned, or on a node that is down: a lost host) it may
     be missing only if the real scheduler cannot place it now, asked with
     the controller's own view of the claims (``Planner.place``), or if it is
     ``fencing: none`` (never failed over, by design);

   VMs that should not run have no running task; instances of deleted VMs,
   of an earlier VM of the same name, and beyond ``replicas`` are gone (a
   ``fencing: none`` one on a node that is down may wait for it, as plan.py's
   ``remove`` does), and no task runs on a live node for an instance that is
   not assigned there at that epoch.

Why "after every event" is cheap: every event records what it touched (a
task's instance and host, a node record) and only that is checked; the
``paranoid`` setting checks everything after every event, and the tests run
it on a few seeds to show both ways agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blixard.controllers.plan import Planner, Policy, Snapshot
from blixard.domain.instance import DesiredState, Instance
from blixard.domain.vm import Fencing
from blixard.sim.world import World

if TYPE_CHECKING:
    from blixard.sim.host import SimTask


class Violation(AssertionError):
    """An invariant broke: says which, where, when, and what led to it."""

    def __init__(self, invariant: str, detail: str, world: World, step: int) -> None:
        self.invariant = invariant
        self.detail = detail
        self.seed = world.config.seed
        self.step = step
        self.time = world.clock.now
        self.recent = list(world.trace.recent)
        lines = "\n".join("  " + line for line in self.recent)
        super().__init__(
            f"invariant {invariant} violated: {detail}\n"
            f"seed {self.seed}, step {self.step}, virtual time {self.time:.6f}s\n"
            f"replay: python -m blixard.sim --seed {self.seed} --trace\n"
            f"last {len(self.recent)} trace lines:\n{lines}"
        )


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.step = 0
        self._instances: set[str] = set()
        self._hosts: set[str] = set()
        self._records: set[str] = set()
        world.on_task_change = self._task_changed
        world.store.on_node_write = self._records.add

    def _task_changed(self, instance: str, host: str) -> None:
        self._instances.add(instance)
        self._hosts.add(host)

    def fail(self, invariant: str, detail: str) -> None:
        raise Violation(invariant, detail, self.world, self.step)

    # --- after every event ------------------------------------------------------------------

    def after_event(self, step: int) -> None:
        self.step = step
        if self.world.config.paranoid:
            self._instances.update(n for h in self.world.hosts.values() for n in h.live)
            self._hosts.update(self.world.hosts)
            self._records.update(self.world.store.nodes)
        if self._instances:
            names, self._instances = self._instances, set()
            for name in sorted(names):
                self.check_copies(name)
        if self._hosts:
            hosts, self._hosts = self._hosts, set()
            for name in sorted(hosts):
                self.check_host(name)
        if self._records:
            records, self._records = self._records, set()
            for name in sorted(records):
                self.check_record(name)

    def running_copies(self, instance: str) -> list[SimTask]:
        copies = []
        for host in self.world.hosts.values():
            for pid in host.live.get(instance, ()):
                task = host.tasks[pid]
                if task.running:
                    copies.append(task)
        return copies

    def check_copies(self, instance: str) -> None:
        copies = self.running_copies(instance)
        if len(copies) > 1:
            where = ", ".join(
                f"{t.host.name} (epoch {t.epoch}, pid {t.pid})"
                for t in sorted(copies, key=lambda t: t.pid)
            )
            self.fail("1 (never two copies)", f"instance {instance} runs on {where}")

    def check_host(self, name: str) -> None:
        host = self.world.hosts[name]
        cap = host.capacity
        if host.used_vcpus > cap.vcpus or host.used_memory_mib > cap.memory_mib:
            tasks = ", ".join(
                f"{t.instance}:{t.vcpus}cpu/{t.memory_mib}M"
                for t in sorted(host.tasks.values(), key=lambda t: t.pid)
                if t.alive
            )
            self.fail(
                "2 (no overcommit)",
                f"host {name} runs {host.used_vcpus} vCPUs / {host.used_memory_mib} MiB "
                f"over a capacity of {cap.vcpus} / {cap.memory_mib}: {tasks}",
            )

    def check_record(self, name: str) -> None:
        node = self.world.store.nodes.get(name)
        if node is not None and not node.status.capacity.fits(node.status.allocated):
            a, c = node.status.allocated, node.status.capacity
            self.fail(
                "2 (no overcommit)",
                f"node {name} record: allocated {a.vcpus} vCPUs / {a.memory_mib} MiB "
                f"over a capacity of {c.vcpus} / {c.memory_mib}",
            )

    # --- at the end -------------------------------------------------------------------------

    def _owned(self, inst: Instance) -> bool:
        """``inst`` belongs to the VM now stored under its VM's name (plan.py's vm_uid)."""
        vm = self.world.store.vms.get(inst.spec.vm)
        return vm is not None and inst.spec.vm_uid in (None, vm.metadata.uid)

    def liveness(self) -> None:
        world, store = self.world, self.world.store
        alive = set(store.alive)
        nodes = dict(store.nodes)
        if world.model.ready_after_reconcile:  # the emulated fix's scheduler refuses them
            for name, record in store.nodes.items():
                if not record.status.ready:
                    cordoned = record.spec.model_copy(update={"cordoned": True})
                    nodes[name] = record.model_copy(update={"spec": cordoned})
        snap = Snapshot(
            vms=store.vms,
            instances=store.instances,
            nodes=nodes,
            alive=alive,
            down_since={},
            now=world.clock.now,
            wall=world.wall(),
        )
        planner = Planner(snap, Policy(), world.new_uid)
        problems: list[str] = []
        for vm_name in sorted(store.vms):
            vm = store.vms[vm_name]
            for index in range(vm.spec.replicas):
                name = f"{vm_name}-{index}"
                inst = store.instances.get(name)
                node = inst.spec.node if inst is not None else None
                if inst is not None and not self._owned(inst):
                    # A replica of an earlier VM of this name: the new one waits for it,
                    # which only a node that is down (and cannot say it stopped) excuses.
                    if node is not None and node in alive:
                        problems.append(f"{name} of an earlier VM still holds live node {node}")
                    continue
                if not vm.spec.running:
                    if self.running_copies(name):
                        problems.append(f"{name} runs although its VM is stopped")
                    continue
                wanted = inst is not None and inst.spec.desired_state is DesiredState.RUNNING
                if inst is not None and node is not None and node in alive and wanted:
                    host = world.hosts.get(node)
                    ok = host is not None and any(
                        host.tasks[pid].running
                        and host.tasks[pid].epoch == inst.spec.epoch
                        and host.tasks[pid].uid == str(inst.metadata.uid or "")
                        for pid in host.live.get(name, ())
                    )
                    if not ok:
                        problems.append(
                            f"{name} is assigned to live node {node} (epoch {inst.spec.epoch}) "
                            f"but does not run there ({inst.status.state.value}: "
                            f"{inst.status.message})"
                        )
                    continue
                if inst is not None and node is not None and vm.spec.fencing is Fencing.NONE:
                    continue  # never failed over, by design
                decision = planner.place(vm, name)
                if decision.node is not None:
                    where = f"on down node {node}" if node else "unassigned"
                    problems.append(
                        f"{name} is {where} although it fits on {decision.node} ({decision.reason})"
                    )
        for name in sorted(store.instances):
            inst = store.instances[name]
            owner = store.vms.get(inst.spec.vm)
            if owner is None or inst.spec.index >= owner.spec.replicas or not self._owned(inst):
                node = inst.spec.node
                if node is not None and node not in alive and inst.spec.fencing is Fencing.NONE:
                    continue  # plan.remove keeps it until its node can say it stopped
                problems.append(f"{name} should have been removed (its VM or index is gone)")
        for host_name in sorted(alive):
            host = world.hosts.get(host_name)
            if host is None:
                continue
            for instance in sorted(host.live):
                inst = store.instances.get(instance)
                for pid in sorted(host.live[instance]):
                    task = host.tasks[pid]
                    stale = (
                        inst is None
                        or inst.spec.node != host_name
                        or inst.spec.epoch != task.epoch
                        or inst.spec.desired_state is DesiredState.STOPPED
                    )
                    if stale:
                        problems.append(f"{instance} (pid {pid}) still lives on {host_name}")
        if problems:
            shown = "; ".join(problems[:8])
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            self.fail("3 (liveness)", shown + more)
