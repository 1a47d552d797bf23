"""The deterministic cluster simulation (blixard.sim): seeds in CI, determinism, and
proof that its checker fails when the rules it checks are broken.

The CI seeds run the code as it is plus the one proposed fix not made yet
that the simulation showed to be needed (config.Model.fixed();
docs/architecture.md "Simulation" lists the findings). The rules the
simulation found unsafe, since fixed in the code, come back through their
switch in config.Model: each must still break invariant 1 (the checker
catches it) while the rule as it is now keeps every invariant on that seed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from blixard.sim.__main__ import main
from blixard.sim.clock import Clock
from blixard.sim.config import Load, Model, SimConfig, Timing
from blixard.sim.host import Host, RunDir
from blixard.sim.invariants import Violation
from blixard.sim.run import RunResult, Summary, run_one
from blixard.sim.world import World

ROOT = Path(__file__).resolve().parents[2]
CI_SEEDS = range(12)
CI = SimConfig(nodes=8, duration_s=150.0, model=Model.fixed())
#: A store that answers a slow node in 1 to 4 s, with keepalives paced by the answers
#: (as they were): leases then run out on a node that still reaches the store, which
#: is what the rules about late answers and fence-paused tasks must survive.
SLOW = replace(
    CI,
    model=replace(Model.fixed(), keepalive_after_answer=True),
    timing=Timing(slow_store_latency_s=(1.0, 4.0)),
    load=replace(Load(), fault_weights=(("slow_disk", 1.0),), fault_interval_s=3.0),
)


@pytest.fixture(scope="module")
def ci_results() -> list[RunResult]:
    return [run_one(replace(CI, seed=seed)) for seed in CI_SEEDS]


def first_violation(config: SimConfig, seeds: range, invariant: str) -> Violation | None:
    """The first violation of ``invariant`` ("1", "2" or "3") among ``seeds``."""
    for seed in seeds:
        found = run_one(replace(config, seed=seed)).violation
        if found is not None and found.invariant.startswith(invariant):
            return found
    return None


# --- the CI seeds -----------------------------------------------------------------------


def test_ci_seeds_keep_every_invariant(ci_results: list[RunResult]) -> None:
    failed = [str(r.violation) for r in ci_results if r.violation is not None]
    assert not failed, "\n\n".join(failed)


def test_ci_seeds_see_every_fault_and_change(ci_results: list[RunResult]) -> None:
    summary = Summary()
    for result in ci_results:
        summary.add(result)
    never = [kind for kind, _ in Load().fault_weights if summary.faults.get(kind, 0) == 0]
    assert not never, f"fault kinds that never happened: {never}"
    changes = {"create", "scale", "delete", "power", "restart", "drain", "cordon"}
    assert changes <= set(summary.workload), changes - set(summary.workload)
    assert summary.failovers > 0
    assert summary.fenced > 0
    assert summary.detection_s and summary.running_elsewhere_s
    # A failover cannot be seen before the lease could expire (TTL from the last keepalive).
    assert min(summary.running_elsewhere_s) >= CI.timing.failover_grace_s


def test_ci_seeds_run_thousands_of_events_per_second(ci_results: list[RunResult]) -> None:
    events = sum(r.events for r in ci_results)
    wall = sum(r.wall_s for r in ci_results)
    assert events / wall > 1000, f"{events / wall:.0f} events/s"


# --- determinism ------------------------------------------------------------------------


def test_same_seed_same_trace() -> None:
    config = replace(CI, duration_s=60.0)
    a, b = run_one(replace(config, seed=3)), run_one(replace(config, seed=3))
    assert (a.trace_hash, a.events, a.trace_lines) == (b.trace_hash, b.events, b.trace_lines)
    assert run_one(replace(config, seed=4)).trace_hash != a.trace_hash


def test_same_trace_in_another_process_with_another_hash_seed() -> None:
    """Nothing depends on set or dict order that PYTHONHASHSEED changes."""
    here = run_one(replace(CI, seed=5, duration_s=60.0))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-m", "blixard.sim", "--seed", "5", "--duration", "60", "--fixed"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    ).stdout
    found = re.search(r"trace ([0-9a-f]{16})", out)
    assert found is not None, out
    assert found.group(1) == here.trace_hash[:16]


def test_paranoid_and_incremental_checks_agree() -> None:
    """Checking what each event touched finds what checking everything finds."""
    for model in (Model.fixed(), replace(Model.fixed(), shim_ignores_fence=True)):
        for seed in (0, 1):
            config = replace(CI, seed=seed, duration_s=60.0, model=model)
            quick, full = run_one(config), run_one(replace(config, paranoid=True))
            assert quick.trace_hash == full.trace_hash
            assert (quick.violation is None) == (full.violation is None)
            if quick.violation is not None and full.violation is not None:
                assert (quick.violation.step, quick.violation.detail) == (
                    full.violation.step,
                    full.violation.detail,
                )


# --- the checker can fail ---------------------------------------------------------------


def test_checker_catches_a_shim_that_ignores_the_fencing_deadline() -> None:
    broken = replace(CI, model=replace(Model.fixed(), shim_ignores_fence=True))
    found = first_violation(broken, range(10), "1")
    assert found is not None
    text = str(found)
    assert f"seed {found.seed}" in text and f"step {found.step}" in text
    assert "virtual time" in text and len(found.recent) == 50
    again = run_one(replace(broken, seed=found.seed)).violation
    assert again is not None
    assert (again.step, again.time, again.detail) == (found.step, found.time, found.detail)


def test_checker_catches_a_negative_grace_without_margin() -> None:
    unsafe = replace(CI, timing=replace(Timing(), failover_grace_s=-3.0, fence_margin_s=0.0))
    assert first_violation(unsafe, range(10), "1") is not None


def test_checker_catches_clocks_drifting_beyond_the_assumption() -> None:
    """Safe while a slow clock's rate r keeps (ttl - margin) / r under ttl + grace."""
    drifting = replace(CI, timing=replace(Timing(), clock_drift=0.6))
    assert first_violation(drifting, range(10), "1") is not None


# --- rules the simulation found unsafe, and their fixes (docs/architecture.md) -------


@pytest.mark.parametrize(
    ("rule", "old", "scenario", "seeds"),
    [
        pytest.param("fencing_wired", False, CI, 10, id="daemon-wired-no-fencing"),
        pytest.param("revoke_on_stop", True, CI, 15, id="clean-stop-revoked-the-lease"),
        pytest.param("late_answers_trusted", True, SLOW, 20, id="late-answers-trusted"),
        pytest.param("stop_resumes_fenced", True, SLOW, 10, id="stop-resumed-fenced-task"),
    ],
)
def test_old_rule_runs_two_copies_and_the_current_one_does_not(
    rule: str, old: bool, scenario: SimConfig, seeds: int
) -> None:
    """With the rule as it was, some seed runs an instance twice; with the rule as the
    code has it now, the same seed keeps every invariant."""
    broken = replace(scenario, model=replace(scenario.model, **{rule: old}))
    found = first_violation(broken, range(seeds), "1")
    assert found is not None, f"{rule}={old}: no two copies in {seeds} seeds"
    assert run_one(replace(scenario, seed=found.seed)).violation is None


def test_keepalives_paced_by_the_clock_keep_a_slow_store_from_fencing() -> None:
    """As it was (a sleep after each answer), 100 ms-2 s answers let the fencing
    deadline pass while the lease lived: tasks were killed with no failover."""
    slow = replace(
        CI,
        duration_s=120.0,
        load=replace(Load(), fault_weights=(("slow_disk", 1.0),)),
    )
    before = Summary()
    now = Summary()
    for seed in range(4):
        old = replace(slow.model, keepalive_after_answer=True)
        before.add(run_one(replace(slow, seed=seed, model=old)))
        now.add(run_one(replace(slow, seed=seed)))
    assert not before.failures and not now.failures
    assert before.failovers == now.failovers == 0
    assert before.fenced > 0
    assert now.fenced == 0


#: Users who delete VMs often, and users who stop and start them often.
DELETES = replace(
    CI,
    duration_s=120.0,
    load=replace(
        Load(),
        workload_interval_s=3.0,
        workload_weights=(("create", 4), ("scale", 1), ("delete", 4), ("power", 0.5)),
    ),
)
RESTARTS = replace(
    DELETES,
    load=replace(
        DELETES.load,
        workload_weights=(("create", 3), ("scale", 1), ("delete", 0.5), ("power", 6)),
    ),
)


@pytest.mark.parametrize("scenario", [DELETES, RESTARTS], ids=["deletes", "restarts"])
def test_claims_of_deleted_and_restarted_vms_hold(scenario: SimConfig) -> None:
    """plan.py once freed a deleted VM's claims before its tasks stopped, and gave a
    restarted VM its old node back without looking at its room; the simulation
    overcommitted a node within two seeds of each of these scenarios."""
    failed = [str(v) for s in range(4) if (v := run_one(replace(scenario, seed=s)).violation)]
    assert not failed, "\n\n".join(failed)


# --- the models' own rules --------------------------------------------------------------


def test_clock_runs_ties_in_the_order_scheduled() -> None:
    clock, seen = Clock(), []
    for i in range(5):
        clock.at(1.0, lambda i=i: seen.append(i))  # type: ignore[misc]
    clock.at(0.5, lambda: seen.append(-1))
    cancelled = clock.at(0.7, lambda: seen.append(99))
    cancelled.cancel()
    while clock.step():
        pass
    assert seen == [-1, 0, 1, 2, 3, 4]
    assert clock.now == 1.0


def test_store_compare_and_swap_and_lease_expiry() -> None:
    world = World(SimConfig())
    store, clock = world.store, world.clock
    events: list[tuple[int, str, str, bool]] = []
    store.subscribers.append(lambda e: events.append((e.revision, e.kind, e.name, e.deleted)))
    lease, _ = store.lease_grant(5)
    store.put_alive("n1", lease)
    renewed: list[int] = []
    clock.at(4.0, lambda: renewed.append(store.lease_keepalive(lease)))
    while (due := clock.next_time()) is not None and due <= 8.9:
        clock.step()
    assert renewed == [5]
    assert "n1" in store.alive  # the keepalive at 4 s moved the expiry to 9 s
    while clock.step():
        pass
    assert "n1" not in store.alive and clock.now == 9.0
    assert events == [(1, "live", "n1", False), (2, "live", "n1", True)]


def test_shim_kills_at_its_first_check_past_the_deadline() -> None:
    world = World(SimConfig())
    host = Host(world, "n1", rate=1.0)
    world.hosts["n1"] = host
    host.run_dirs["vm-0"] = RunDir(fence="stop")
    host.write_fence(2.0)
    world.clock.at(0.03, lambda: None)
    world.clock.step()
    task = host.spawn("vm-0", "vm-0", "u", 1, 1, 256)
    world.clock.at(1.5, lambda: host.write_fence(3.25))  # a keepalive moved the deadline
    while world.clock.step():
        pass
    assert task.exit is not None and task.exit.fenced
    # Checks fall on 0.03 + k * 0.1: the first one after 3.25 is at 3.33.
    assert world.clock.now == pytest.approx(3.33)


def test_mirrored_rules_still_exist() -> None:
    """The model quotes these conditions; a change in the real code must update it."""
    quoted = {
        "src/blixard/agent/reconciler.py": [
            "return remaining is not None and remaining > self.fence_margin_s",
            "return self.clock() + remaining - self.fence_margin_s",
            "deadline = 0.0 if remaining is None else now + remaining - self.fence_margin_s",
            "if abs(deadline - self._fence_written) < 0.05:",
            "if current.spec.node != self.node_id or current.spec.epoch != local.epoch:",
            'inst, local, ObservedState.STARTING, reason or "starting", force=True',
            "if self.clock() >= deadline:",
            "await self._remove(local, graceful=inst is None, why=why)",
            "local.epoch != inst.spec.epoch or local.uid != uid",
            'inst, local, ObservedState.RUNNING, "resumed after fencing", force=True',
            "if _fence_paused(local.handle):",
            "if graceful and local.running and not _fence_paused(local.handle):",
        ],
        "src/blixard/agent/registration.py": [
            "self.valid_until = sent + lease.ttl_s",
            "next_at = max(next_at + ttl_s / 3, self.clock() - ttl_s / 3)",
            "if self.lease_id and revoke:",
        ],
        "src/blixard/daemon/node.py": [
            "lease_remaining=registration.lease_remaining if fencing else None",
            'await registration.close(revoke=description.get("backend") != "etcd")',
        ],
        "src/blixard/drivers/executor.py": [
            "late = time.monotonic() > float(deadline)",
            'if late and action == "pause" and not paused:',
            "signal.sigtimedwait([signal.SIGCHLD], 0.1)",
        ],
        "src/blixard/drivers/process/driver.py": [
            "_signal_group(handle, signal.SIGCONT)  # a paused task must run to act on SIGTERM",
        ],
        "src/blixard/controllers/vms.py": [
            "self.down_since.setdefault(name, now)",
            "await self._commit_batch([action])",
            "await asyncio.sleep(self.coalesce_s)",
        ],
    }
    missing = [
        f"{path}: {line}"
        for path, lines in quoted.items()
        for line in lines
        if line not in (ROOT / path).read_text()
    ]
    assert not missing, "the simulated model quotes code that changed:\n" + "\n".join(missing)


# --- the command ------------------------------------------------------------------------


def test_cli_replays_one_seed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "2", "--duration", "40", "--fixed"]) == 0
    out = capsys.readouterr().out
    assert "all invariants held" in out and "events/s" in out


def test_cli_summarises_many_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "0..1", "--duration", "40", "--fixed"]) == 0
    out = capsys.readouterr().out
    assert "runs: 2, failed: 0" in out and "events/s" in out and "failovers" in out


def test_cli_exits_1_and_names_the_seed_on_a_violation(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--seed", "0", "--fixed", "--model", "shim_ignores_fence=true"])
    assert code == 1
    err = capsys.readouterr().err
    assert "invariant 1 (never two copies) violated" in err
    assert "replay: python -m blixard.sim --seed 0 --trace" in err
