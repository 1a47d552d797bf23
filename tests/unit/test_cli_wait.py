"""What "observed" means for each lifecycle goal, and the polling loop's timeout."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.cli.wait import Goal, WaitTimeout, observe, wait_for
from blixard.client.models import VMDetails
from blixard.domain.errors import NotFound
from blixard.domain.instance import (
    DesiredState,
    Instance,
    InstanceSpec,
    InstanceStatus,
    ObservedState,
)
from blixard.domain.meta import ObjectMeta
from blixard.domain.parse import parse
from blixard.domain.vm import VM


def vm(replicas: int = 2, restart_generation: int = 0, running: bool = True) -> VM:
    return parse(
        VM,
        {
            "metadata": {"name": "web", "generation": 1},
            "spec": {
                "hypervisor": "process",
                "boot": {"command": ["sleep", "1"]},
                "replicas": replicas,
                "restart_generation": restart_generation,
                "running": running,
            },
        },
    )


def inst(
    index: int,
    state: ObservedState,
    *,
    desired: DesiredState = DesiredState.RUNNING,
    applied: int = 0,
    epoch: int = 1,
    reported_epoch: int = 1,
    node: str | None = "n1",
    message: str = "",
) -> Instance:
    return Instance(
        metadata=ObjectMeta(name=f"web-{index}"),
        spec=InstanceSpec(vm="web", index=index, node=node, epoch=epoch, desired_state=desired),
        status=InstanceStatus(
            state=state,
            node=node,
            epoch=reported_epoch,
            restart_generation=applied,
            message=message,
        ),
    )


R, S, F, P = (
    ObservedState.RUNNING,
    ObservedState.STOPPED,
    ObservedState.FAILED,
    ObservedState.PENDING,
)


def test_running_needs_every_replica_running() -> None:
    assert not observe(Goal.RUNNING, vm(), []).done
    seen = observe(Goal.RUNNING, vm(), [inst(0, R)])
    assert not seen.done and seen.seen == "web-1: not created yet (vm pending)"
    seen = observe(Goal.RUNNING, vm(), [inst(0, R), inst(1, F, message="exit code 1")])
    assert not seen.done and "web-1: failed on n1 (exit code 1)" in seen.seen
    assert observe(Goal.RUNNING, vm(), [inst(1, R), inst(0, R)]).done
    assert observe(Goal.RUNNING, vm(replicas=0), []).done
    # An extra replica being scaled away does not matter.
    assert observe(Goal.RUNNING, vm(replicas=1), [inst(0, R), inst(1, F)]).done


def test_a_report_about_an_older_assignment_does_not_count() -> None:
    stale = inst(0, R, epoch=2, reported_epoch=1)
    assert not observe(Goal.RUNNING, vm(replicas=1), [stale]).done
    unplaced = inst(0, P, node=None)
    seen = observe(Goal.RUNNING, vm(replicas=1), [unplaced])
    assert "web-0: pending (not placed on a node yet)" in seen.seen


def test_restarted_needs_the_restart_applied() -> None:
    v = vm(replicas=2, restart_generation=3)
    seen = observe(Goal.RESTARTED, v, [inst(0, R, applied=3), inst(1, R, applied=2)])
    assert not seen.done and "web-1: running on n1 (restart not applied yet)" in seen.seen
    assert observe(Goal.RESTARTED, v, [inst(0, R, applied=3), inst(1, R, applied=4)]).done
    # RUNNING does not care about restarts.
    assert observe(Goal.RUNNING, v, [inst(0, R), inst(1, R)]).done


def test_stopped_needs_controllers_and_agents_to_agree() -> None:
    stop = DesiredState.STOPPED
    assert observe(Goal.STOPPED, vm(running=False), []).done
    seen = observe(Goal.STOPPED, vm(running=False), [inst(0, S)])  # still wanted running
    assert not seen.done and seen.seen == "web-0: stopped on n1"
    assert not observe(Goal.STOPPED, vm(running=False), [inst(0, R, desired=stop)]).done
    done = [inst(0, S, desired=stop), inst(1, F, desired=stop), inst(2, P, desired=stop)]
    assert observe(Goal.STOPPED, vm(running=False), done).done


def test_gone_needs_the_vm_and_its_instances_gone() -> None:
    assert observe(Goal.GONE, None, []).done
    seen = observe(Goal.GONE, vm(), [])
    assert not seen.done and seen.seen == "the vm record still exists"
    seen = observe(Goal.GONE, None, [inst(0, S)])
    assert not seen.done and seen.seen == "web-0: stopped on n1"
    assert not observe(Goal.RUNNING, None, []).done


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Scripted:
    """A client answering from a script of VM states (only what wait_for calls)."""

    def __init__(self, states: list[VMDetails | None]) -> None:
        self.states = states
        self.calls = 0

    def _next(self) -> VMDetails | None:
        state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        return state

    def get_vm(self, name: str) -> VMDetails:
        state = self._next()
        if state is None:
            raise NotFound(f"vm {name!r} does not exist")
        return state

    def list_instances(self, vm: str | None = None) -> list[Instance]:
        return []


def test_wait_polls_until_observed_and_times_out_with_the_last_sight() -> None:
    clock = FakeClock()
    pending = VMDetails(vm=vm(replicas=1), instances=[inst(0, P)])
    running = VMDetails(vm=vm(replicas=1), instances=[inst(0, R)])
    client: Any = Scripted([pending, pending, running])
    got = wait_for(client, "web", Goal.RUNNING, 5.0, clock=clock, sleep=clock.sleep)
    assert got == running and client.calls == 3 and clock.sleeps == [0.2, 0.2]

    clock = FakeClock()
    client = Scripted([pending])
    with pytest.raises(WaitTimeout) as info:
        wait_for(client, "web", Goal.RUNNING, 1.0, clock=clock, sleep=clock.sleep)
    assert str(info.value) == (
        "timed out after 1s waiting for vm 'web' to be running; "
        "last seen: web-0: pending on n1 (vm pending)"
    )
    assert clock.now == pytest.approx(1.0) and client.calls == 6


def test_wait_for_gone_reads_instances_after_the_vm() -> None:
    clock = FakeClock()
    client: Any = Scripted([VMDetails(vm=vm(), instances=[]), None])
    assert wait_for(client, "web", Goal.GONE, 5.0, clock=clock, sleep=clock.sleep) is None
