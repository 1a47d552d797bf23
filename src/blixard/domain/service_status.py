"""A Service's live state, computed from its VMs and their instances when it is read.

Nothing here is stored: the instances already hold what each node's agent
saw of the unit (the driver's unit state is the instance's message), so the
API joins them on every read and the answer is never staler than the
instances. Unit states are given in systemd's words (``ActiveState`` /
``SubState`` as ``systemctl show`` prints them) because that is what the
older ``service_manager status`` users read:

================  ===============  ==========================================
instance state    active_state     sub_state
================  ===============  ==========================================
running           active           running
paused            active           paused (fenced)
starting          activating       start
stopping          deactivating     stop
stopped           inactive         dead
failed            failed           failed
pending           inactive         pending (not started on its node yet)
unknown           unknown          unknown
================  ===============  ==========================================

A node whose liveness lease is gone reports ``unknown`` / the last state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from blixard.domain.instance import Instance, ObservedState
from blixard.domain.keys import instance_name
from blixard.domain.service import (
    SERVICE_NODE_LABEL,
    Service,
    ServiceNodeStatus,
    ServicePhase,
    ServiceState,
    ServiceStatus,
    desired_vms,
    owner_of,
)
from blixard.domain.vm import VM

_SYSTEMD_WORDS: dict[ObservedState, tuple[str, str]] = {
    ObservedState.RUNNING: ("active", "running"),
    ObservedState.PAUSED: ("active", "paused"),
    ObservedState.STARTING: ("activating", "start"),
    ObservedState.STOPPING: ("deactivating", "stop"),
    ObservedState.STOPPED: ("inactive", "dead"),
    ObservedState.FAILED: ("failed", "failed"),
    ObservedState.PENDING: ("inactive", "pending"),
    ObservedState.UNKNOWN: ("unknown", "unknown"),
}
_NOT_RUNNING = frozenset({"inactive", "failed"})


def node_status(instance: Instance, alive: bool) -> ServiceNodeStatus:
    """The unit on the instance's node, from the agent's report of it."""
    spec, st = instance.spec, instance.status
    current = st.node == spec.node and st.epoch == spec.epoch
    if current:
        active, sub = _SYSTEMD_WORDS[st.state]
        message = st.message
    else:
        active, sub = "inactive", "pending"
        message = "assigned; waiting for the node's agent to report"
    if not alive:
        active = "unknown"
        message = f"node {spec.node} is down (its lease expired); last seen {sub}" + (
            f": {message}" if message else ""
        )
    return ServiceNodeStatus(
        active_state=active,
        sub_state=sub,
        message=message,
        instance=instance.metadata.name,
        epoch=spec.epoch,
        restart_generation=st.restart_generation if current else 0,
        node_alive=alive,
        updated_at=st.updated_at,
    )


def _waiting(vm: VM | None, why: str) -> ServiceNodeStatus:
    reason = why
    if vm is not None:
        reason = vm.status.placement_reason or vm.status.message or why
    return ServiceNodeStatus(active_state="inactive", sub_state="pending", message=reason)


def service_status(
    service: Service,
    vms: Mapping[str, VM],
    instances: Mapping[str, Sequence[Instance]],
    alive: Iterable[str],
    systemd_nodes: Iterable[str],
) -> ServiceStatus:
    """The live state of ``service``.

    ``vms`` by name (at least the service's), ``instances`` by VM name,
    ``alive`` the nodes whose lease lives, ``systemd_nodes`` the registered
    nodes offering the systemd hypervisor (where an all-nodes service runs).
    """
    live = set(alive)
    spec, name = service.spec, service.metadata.name
    nodes: dict[str, ServiceNodeStatus] = {}
    unplaced: list[str] = []
    notes: list[str] = []
    synced = True
    for want in desired_vms(service, systemd_nodes):
        vm_name = want.metadata.name
        vm = vms.get(vm_name)
        pinned = want.metadata.labels.get(SERVICE_NODE_LABEL)
        if vm is not None and owner_of(vm) != name:
            notes.append(f"VM {vm_name} exists and is not this service's; delete or rename it")
            vm = None
        if vm is None:
            synced = False
            if pinned is not None:
                nodes[pinned] = _waiting(None, "not created yet")
            else:
                unplaced += [instance_name(vm_name, i) for i in range(spec.replicas)]
            continue
        synced &= vm.spec == want.spec
        by_index = {i.spec.index: i for i in instances.get(vm_name, ())}
        for index in range(want.spec.replicas):
            inst = by_index.get(index)
            if inst is None or inst.spec.node is None:
                if pinned is not None:
                    nodes[pinned] = _waiting(vm, "not placed yet")
                else:
                    unplaced.append(instance_name(vm_name, index))
                    reason = vm.status.placement_reason or vm.status.message
                    if reason and reason not in notes:
                        notes.append(reason)
                continue
            nodes[inst.spec.node] = node_status(inst, inst.spec.node in live)
    phase = _phase(spec.state, nodes.values(), unplaced, synced)
    return ServiceStatus(
        phase=phase,
        message="; ".join(notes),
        nodes=dict(sorted(nodes.items())),
        unplaced=unplaced,
        synced=synced,
        observed_generation=service.metadata.generation if synced else 0,
    )


def _phase(
    state: ServiceState,
    nodes: Iterable[ServiceNodeStatus],
    unplaced: list[str],
    synced: bool,
) -> ServicePhase:
    entries = list(nodes)
    if state is ServiceState.STOPPED:
        done = synced and all(e.active_state in _NOT_RUNNING for e in entries)
        return ServicePhase.STOPPED if done else ServicePhase.STOPPING
    up = [e for e in entries if e.active_state == "active" and e.sub_state == "running"]
    if synced and not unplaced and entries and len(up) == len(entries):
        return ServicePhase.RUNNING
    if up:
        return ServicePhase.DEGRADED
    if entries and all(e.active_state == "failed" for e in entries):
        return ServicePhase.FAILED
    return ServicePhase.PENDING


def reached(service: Service, status: ServiceStatus) -> bool:
    """Whether the service is where its spec says: every node running (with the latest
    restart applied) or every node stopped."""
    if not status.synced:
        return False
    if service.spec.state is ServiceState.STOPPED:
        return status.phase is ServicePhase.STOPPED
    wanted = service.spec.restart_generation
    return status.phase is ServicePhase.RUNNING and all(
        e.restart_generation >= wanted for e in status.nodes.values()
    )
