"""One seeded run of a whole cluster, and many of them.

A run: ``nodes`` hosts boot their daemons in the first half second, a
controller leads, users create VMs; from 10 s on, faults and workload
changes arrive until the last ``quiet_s`` seconds, which are fault-free; then
the liveness invariant is checked. Invariants 1 and 2 are checked after every
event. The result carries the trace's hash (same seed, same hash), the
events and their rate, and the failover figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial

from blixard.sim.agent import start_daemon
from blixard.sim.config import SimConfig
from blixard.sim.controller import Leadership
from blixard.sim.faults import Faults
from blixard.sim.host import Host
from blixard.sim.invariants import Checker, Violation
from blixard.sim.workload import Workload
from blixard.sim.world import Metrics, World


@dataclass
class RunResult:
    seed: int
    events: int
    virtual_s: float
    wall_s: float
    trace_hash: str
    trace_lines: int
    metrics: Metrics
    store_ops: dict[str, int]
    violation: Violation | None = None

    @property
    def ok(self) -> bool:
        return self.violation is None


class Simulation:
    def __init__(self, config: SimConfig, echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.world = world = World(config, echo)
        drift = config.timing.clock_drift
        for i in range(config.nodes):
            name = f"n{i:02d}"
            rate = 1.0 + world.fault_rng.uniform(-drift, drift)
            world.hosts[name] = Host(world, name, rate)
        self.checker = Checker(world)
        self.leadership = Leadership(world)
        self.faults = Faults(world, self.leadership)
        self.workload = Workload(world)
        #: instance -> (new epoch, when its node's trouble started, when it was seen down)
        self._failing_over: dict[str, tuple[int, float, float]] = {}
        world.on_failover = self._failover_committed
        world.on_running = self._replica_running

    def _failover_committed(self, instance: str, epoch: int, node: str, down_since: float) -> None:
        """Failover figures count from the fault that took the node away: the one that
        started around the last keepalive the store received from it (otherwise, e.g. a
        slow disk let the lease run out, from that keepalive)."""
        renewed = self.world.store.last_renewed.get(node, down_since)
        started = self.faults.started.get(node)
        window = self.world.timing.lease_ttl_s / 3 + 1.0
        if started is None or not renewed - 1.0 <= started <= renewed + window:
            started = renewed
        self._failing_over[instance] = (epoch, min(started, down_since), down_since)

    def _replica_running(self, instance: str, epoch: int, node: str) -> None:
        pending = self._failing_over.get(instance)
        if pending is None or pending[0] != epoch:
            return
        del self._failing_over[instance]
        _, started, seen_down = pending
        metrics = self.world.metrics
        metrics.detection_s.append(seen_down - started)
        metrics.running_elsewhere_s.append(self.world.clock.now - started)

    def _boot(self, host: Host) -> None:
        start_daemon(self.world, host)

    def run(self) -> RunResult:
        """Run to the end; a broken invariant ends the run and is in the result."""
        world, config, clock = self.world, self.config, self.world.clock
        for name in sorted(world.hosts):
            host = world.hosts[name]
            clock.at(world.uniform(world.fault_rng, (0.0, 0.5)), partial(self._boot, host))
        clock.at(0.05, self.leadership.start)
        initial = max(1, round(config.nodes * config.load.vms_per_node))
        clock.at(1.0, lambda: self.workload.start(initial))
        self.faults.start()
        checker = self.checker
        started = time.perf_counter()
        step = 0
        violation: Violation | None = None
        try:
            while True:
                due = clock.next_time()
                if due is None or due > config.duration_s:
                    break
                clock.step()
                step += 1
                checker.after_event(step)
            clock.now = config.duration_s
            checker.step = step
            checker.liveness()
        except Violation as exc:
            violation = exc
        wall = time.perf_counter() - started
        return RunResult(
            seed=config.seed,
            events=step,
            virtual_s=clock.now,
            wall_s=wall,
            trace_hash=world.trace.digest(),
            trace_lines=world.trace.lines,
            metrics=world.metrics,
            store_ops=dict(world.store.ops),
            violation=violation,
        )


def run_one(config: SimConfig, echo: Callable[[str], None] | None = None) -> RunResult:
    return Simulation(config, echo).run()


@dataclass
class Summary:
    runs: int = 0
    events: int = 0
    virtual_s: float = 0.0
    wall_s: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    workload: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    fenced: int = 0
    starts: int = 0
    plan_calls: int = 0
    detection_s: list[float] = field(default_factory=list)
    running_elsewhere_s: list[float] = field(default_factory=list)
    failures: list[RunResult] = field(default_factory=list)

    def add(self, result: RunResult) -> None:
        m = result.metrics
        self.runs += 1
        self.events += result.events
        self.virtual_s += result.virtual_s
        self.wall_s += result.wall_s
        for table, src in ((self.faults, m.faults), (self.workload, m.workload)):
            for key, value in src.items():
                table[key] = table.get(key, 0) + value
        self.failovers += m.failovers
        self.fenced += m.fenced
        self.starts += m.starts
        self.plan_calls += m.plan_calls
        self.detection_s += m.detection_s
        self.running_elsewhere_s += m.running_elsewhere_s
        if not result.ok:
            self.failures.append(result)

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    def report(self) -> str:
        def spread(values: list[float]) -> str:
            if not values:
                return "none"
            ordered = sorted(values)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            return (
                f"median {statistics.median(ordered):.2f}s, p99 {p99:.2f}s, "
                f"max {ordered[-1]:.2f}s (n={len(ordered)})"
            )

        speedup = self.virtual_s / max(self.wall_s, 1e-9)
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        changes = ", ".join(f"{k} {v}" for k, v in sorted(self.workload.items())) or "none"
        lines = [
            f"runs: {self.runs}, failed: {len(self.failures)}",
            f"events: {self.events} in {self.wall_s:.1f}s wall = {self.events_per_s:,.0f} events/s "
            f"({self.virtual_s:.0f} virtual s, {speedup:.0f}x real time)",
            f"faults: {faults}",
            f"workload changes: {changes}",
            f"task starts: {self.starts}, fenced by shims: {self.fenced}, "
            f"controller passes (plan calls): {self.plan_calls}",
            f"failovers: {self.failovers}",
            f"  fault -> controller saw the node down: {spread(self.detection_s)}",
            f"  fault -> replica running elsewhere:   {spread(self.running_elsewhere_s)}",
        ]
        for failed in self.failures:
            assert failed.violation is not None
            v = failed.violation
            lines.append(
                f"FAILED seed {failed.seed}: invariant {v.invariant} at step {v.step}, "
                f"t={v.time:.3f}s: {v.detail}"
            )
        return "\n".join(lines)


def run_seeds(
    seeds: Iterable[int],
    base: SimConfig,
    progress: Callable[[RunResult], None] | None = None,
) -> Summary:
    summary = Summary()
    for seed in seeds:
        result = run_one(replace(base, seed=seed))
        summary.add(result)
        if progress is not None:
            progress(result)
    return summary
