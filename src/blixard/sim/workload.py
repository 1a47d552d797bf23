"""What users do to the cluster during a run: create, scale, stop, restart, delete VMs; drain nodes.

Why: failover is only half the story; the controller's other decisions
(scale down while a node is down, delete a VM whose instance is fenced,
drain a node) meet faults too. Users write through the API, which reads
and writes with compare-and-swap (api/vms.py, store/objects.py ``modify``):
the model does the same, from a client process that is never faulted.

The VMs use the ``process`` hypervisor (every simulated node offers it) and
restart with backoff capped at 10 s instead of the default 300 s, so that
the liveness check at the end of a run (after 30 quiet seconds) is about
placement and failover, not about a backoff still running.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from blixard.domain.parse import parse
from blixard.domain.vm import VM
from blixard.sim.proc import Actor, Call, Op
from blixard.sim.store import Obj
from blixard.sim.world import World

Gen = Generator[Op, Any, Any]


class Workload(Actor):
    def __init__(self, world: World) -> None:
        super().__init__(world, "user", None)
        self.rng = world.work_rng
        self._next_vm = 0
        self.deleted_names: list[str] = []
        self.ends_at = world.config.duration_s - world.config.quiet_s

    def log(self, what: str) -> None:
        self.world.log("user", what)

    # --- VM documents -------------------------------------------------------------------

    def _demand(self) -> tuple[int, int]:
        vcpus = mem = 0
        for vm in self.world.store.vms.values():
            vcpus += vm.spec.replicas * vm.spec.vcpus
            mem += vm.spec.replicas * vm.spec.memory_mib
        return vcpus, mem

    def _room(self, vcpus: int, mem: int) -> bool:
        load = self.world.load
        n = len(self.world.hosts)
        have_v, have_m = self._demand()
        return (have_v + vcpus) <= load.max_demand * n * load.node_vcpus and (
            have_m + mem
        ) <= load.max_demand * n * load.node_memory_mib

    def new_vm(self) -> VM | None:
        rng = self.rng
        if self.deleted_names and rng.random() < 0.3:
            name = self.deleted_names.pop(rng.randrange(len(self.deleted_names)))
        else:
            self._next_vm += 1
            name = f"vm{self._next_vm}"
        vcpus = rng.choice((1, 1, 2))
        memory = rng.choice((256, 512, 512, 1024, 2048))
        replicas = rng.choice((1, 1, 2, 3, 4))
        if not self._room(vcpus * replicas, memory * replicas):
            return None
        fencing = rng.choices(("stop", "pause", "none"), weights=(7, 2, 1))[0]
        mode = rng.choices(("always", "on-failure"), weights=(4, 1))[0]
        placement: dict[str, Any] = {}
        if replicas > 1 and rng.random() < 0.25:
            placement["anti_affinity_groups"] = [name]
        doc = {
            "metadata": {
                "name": name,
                "uid": str(self.world.new_uid()),
                "generation": 1,
                "created_at": self.world.wall().isoformat(),
            },
            "spec": {
                "hypervisor": "process",
                "vcpus": vcpus,
                "memory_mib": memory,
                "replicas": replicas,
                "boot": {"command": ["sleep", "infinity"]},
                "fencing": fencing,
                "restart": {"mode": mode, "backoff_initial_s": 1.0, "backoff_max_s": 10.0},
                "placement": placement,
            },
        }
        return parse(VM, doc)

    # --- driving ------------------------------------------------------------------------

    def start(self, initial: int) -> None:
        for _ in range(initial):
            vm = self.new_vm()
            if vm is not None:
                self.spawn(self._create(vm))
        self._schedule()

    def _schedule(self) -> None:
        wait = self.rng.expovariate(1.0 / self.world.load.workload_interval_s)
        if self.world.clock.now + wait < self.ends_at:
            self.world.clock.after(wait, self._act)

    def _act(self) -> None:
        store, rng = self.world.store, self.rng
        vms = sorted(store.vms)
        nodes = sorted(store.nodes)
        kinds, weights = zip(*self.world.load.workload_weights, strict=True)
        kind = rng.choices(kinds, weights=weights)[0]
        self.world.metrics.count(self.world.metrics.workload, kind)
        if kind == "create" or not vms:
            vm = self.new_vm()
            if vm is not None:
                self.spawn(self._create(vm))
        elif kind == "scale":
            name = rng.choice(vms)
            current = store.vms[name]
            replicas = max(0, current.spec.replicas + rng.choice((-2, -1, 1, 2)))
            extra = replicas - current.spec.replicas
            if extra <= 0 or self._room(
                extra * current.spec.vcpus, extra * current.spec.memory_mib
            ):
                self.spawn(self._modify_vm(name, lambda vm: {"replicas": replicas}))
        elif kind == "delete":
            self.spawn(self._delete(rng.choice(vms)))
        elif kind == "power":
            name = rng.choice(vms)
            running = not store.vms[name].spec.running
            self.spawn(self._modify_vm(name, lambda vm: {"running": running}))
        elif kind == "restart":
            name = rng.choice(vms)
            self.spawn(
                self._modify_vm(
                    name, lambda vm: {"restart_generation": vm.spec.restart_generation + 1}
                )
            )
        elif nodes:
            name = rng.choice(nodes)
            spec = store.nodes[name].spec
            if kind == "drain":
                on = not spec.draining
                change = {"draining": on, "cordoned": on}
            else:
                change = {"cordoned": not spec.cordoned, "draining": False}
            self.spawn(self._modify_node(name, change))
        self._schedule()

    def _create(self, vm: VM) -> Gen:
        store = self.world.store
        name = vm.metadata.name

        ok, _ = yield Call(lambda: store.cas(vm, "create"))
        if not ok and name not in store.vms:
            self.deleted_names.append(name)
        self.log(f"create {vm.metadata.name} x{vm.spec.replicas} {vm.spec.fencing.value}: {ok}")

    def _modify_vm(self, name: str, change: Callable[[VM], dict[str, Any]]) -> Gen:
        """PATCH-like: read, change the spec, bump the generation, CAS; again on a conflict."""
        store = self.world.store
        for _ in range(20):
            current: VM | None = yield Call(lambda: store.get_vm(name))
            if current is None:
                return
            spec = current.spec.model_copy(update=change(current))
            meta = current.metadata.model_copy(
                update={"generation": current.metadata.generation + 1}
            )
            changed = current.model_copy(update={"spec": spec, "metadata": meta})
            answer = yield Call(partial(store.update, changed))
            if answer == "ok":
                self.log(f"change {name}: {self._diff(current, changed)}")
                return
            if answer == "absent":
                return

    @staticmethod
    def _diff(old: VM, new: VM) -> str:
        a, b = old.spec.model_dump(), new.spec.model_dump()
        return ", ".join(f"{k}={b[k]}" for k in sorted(b) if a.get(k) != b[k])

    def _delete(self, name: str) -> Gen:
        store = self.world.store
        current: VM | None = yield Call(lambda: store.get_vm(name))
        if current is None:
            return
        ok, _ = yield Call(lambda: store.cas(current, "delete"))
        if ok:
            self.deleted_names.append(name)
            self.log(f"delete {name}")

    def _modify_node(self, name: str, change: dict[str, bool]) -> Gen:
        store = self.world.store
        for _ in range(20):
            current = yield Call(lambda: store.get_node(name))
            if current is None:
                return
            spec = current.spec.model_copy(update=change)
            changed: Obj = current.model_copy(update={"spec": spec})
            answer = yield Call(partial(store.update, changed))
            if answer == "ok":
                self.log(f"node {name}: {change}")
                return
