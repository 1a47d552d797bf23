"""Waiting until a change is observed, by polling the API.

The API answers as soon as a wish is stored; controllers and agents act on it
later. A lifecycle command therefore polls (every 0.2 s) until the instances
show the outcome, and on timeout says what it last saw, so "it did not start"
comes with the agent's reason.

What counts as observed, per goal:

* ``running`` (create, start): every replica index ``0..replicas-1`` has an
  instance whose agent reports ``running`` for its current assignment.
* ``restarted``: as ``running``, and each replica's agent has applied the
  VM's ``restart_generation`` (``status.restart_generation``), i.e. the task
  was restarted after the request.
* ``stopped``: every instance of the VM is wanted stopped by the controllers
  (``spec.desired_state``) and its agent reports it not running (stopped,
  failed, or never started); no instances at all also counts.
* ``gone`` (delete): the VM record is gone and no instance of it remains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from blixard.client.http import BlixardClient
from blixard.client.models import VMDetails
from blixard.domain.errors import BlixardError, NotFound
from blixard.domain.instance import DesiredState, Instance, ObservedState
from blixard.domain.keys import instance_name
from blixard.domain.units import format_duration
from blixard.domain.vm import VM, VMPhase

POLL_INTERVAL_S = 0.2
_DOWN = frozenset({ObservedState.STOPPED, ObservedState.FAILED, ObservedState.PENDING})


class Goal(StrEnum):
    RUNNING = "running"
    RESTARTED = "restarted"
    STOPPED = "stopped"
    GONE = "gone"
    #: ``vm scale``: the wanted replicas run (if the VM runs) and the extra ones are gone.
    SCALED = "scaled"


class WaitTimeout(BlixardError):
    """The change was not observed in time; the message says what was last seen."""

    code = "timeout"


@dataclass(frozen=True, slots=True)
class Observation:
    done: bool
    seen: str


def describe(instance: Instance) -> str:
    """One instance as a user wants to read it: ``web-0: starting on n1 (booting)``."""
    st = instance.status
    text = f"{instance.metadata.name}: {st.state.value}"
    if instance.spec.node is None:
        text += " (not placed on a node yet)"
    else:
        text += f" on {instance.spec.node}"
    if st.message:
        text += f" ({st.message})"
    return text


def _current(instance: Instance) -> bool:
    """Whether the agent's report is about the instance's current assignment."""
    st = instance.status
    return st.node is None or (st.node == instance.spec.node and st.epoch == instance.spec.epoch)


def _up(instance: Instance, restart_generation: int | None) -> bool:
    st = instance.status
    if st.state is not ObservedState.RUNNING or not _current(instance):
        return False
    return restart_generation is None or st.restart_generation >= restart_generation


def _down(instance: Instance) -> bool:
    return instance.spec.desired_state is DesiredState.STOPPED and instance.status.state in _DOWN


def observe(goal: Goal, vm: VM | None, instances: list[Instance]) -> Observation:
    """Whether ``goal`` is reached by ``vm`` (None: gone) and its ``instances``."""
    if goal is Goal.GONE:
        if vm is None and not instances:
            return Observation(True, "the vm and its instances are gone")
        parts = [] if vm is None else ["the vm record still exists"]
        parts += [describe(i) for i in instances]
        return Observation(False, "; ".join(parts))
    if vm is None:
        return Observation(False, "the vm was deleted")
    if goal is Goal.STOPPED:
        lacking = [describe(i) for i in instances if not _down(i)]
        return Observation(not lacking, "; ".join(lacking) or "no instance runs")
    if goal is Goal.SCALED:
        extra = [describe(i) for i in instances if i.spec.index >= vm.spec.replicas]
        if not vm.spec.running:
            return Observation(not extra, "; ".join(extra) or "no extra replica left")
        seen = observe(Goal.RUNNING, vm, instances)
        if extra:
            return Observation(False, "; ".join([*extra, seen.seen]))
        return seen
    wanted = vm.spec.restart_generation if goal is Goal.RESTARTED else None
    by_index = {i.spec.index: i for i in instances}
    lacking = []
    for index in range(vm.spec.replicas):
        instance = by_index.get(index)
        if instance is None:
            lacking.append(f"{instance_name(vm.metadata.name, index)}: not created yet")
        elif not _up(instance, wanted):
            text = describe(instance)
            if wanted is not None and instance.status.restart_generation < wanted:
                text += " (restart not applied yet)"
            lacking.append(text)
    if not lacking:
        return Observation(True, f"{vm.spec.replicas}/{vm.spec.replicas} replicas running")
    status = vm.status
    summary = f"vm {status.phase.value}" + (f": {status.message}" if status.message else "")
    return Observation(False, f"{'; '.join(lacking)} ({summary})")


def wait_for(
    client: BlixardClient,
    name: str,
    goal: Goal,
    timeout_s: float,
    *,
    poll_s: float = POLL_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> VMDetails | None:
    """Poll until ``goal`` is observed; the VM's details then (None once gone)."""
    deadline = clock() + timeout_s
    while True:
        details: VMDetails | None
        if goal is Goal.GONE:
            try:
                details = client.get_vm(name)
            except NotFound:
                details = None
            instances = client.list_instances(vm=name)
        else:
            details = client.get_vm(name)
            instances = details.instances
        seen = observe(goal, details.vm if details else None, instances)
        if seen.done:
            return details
        if clock() >= deadline:
            raise WaitTimeout(
                f"timed out after {format_duration(timeout_s)} waiting for vm {name!r} to be "
                f"{goal.value}; last seen: {seen.seen}"
            )
        sleep(min(poll_s, max(0.0, deadline - clock())))


#: The VM's own status follows its instances one controller pass later.
SETTLE_S = 1.0


def settle(
    client: BlixardClient,
    details: VMDetails,
    *,
    within_s: float = SETTLE_S,
    poll_s: float = POLL_INTERVAL_S / 4,
) -> VMDetails:
    """After a goal is observed, give the VM's summary a moment to catch up, so what
    is printed agrees with what was waited for. Never fails: it only waits a little."""
    deadline = time.monotonic() + within_s
    while details.vm.status.observed_generation < details.vm.metadata.generation or (
        details.vm.status.phase is VMPhase.PENDING and details.instances
    ):
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
        details = client.get_vm(details.vm.metadata.name)
    return details
