"""The VM controller's pure decisions: placement, failover with grace, drain, scale, deletes."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from blixard.controllers.plan import (
    Create,
    Delete,
    Plan,
    Policy,
    Snapshot,
    Update,
    active_at_epoch,
    plan,
)
from blixard.domain.instance import DesiredState, Instance, InstanceStatus, ObservedState
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec, NodeStatus, Resources
from blixard.domain.parse import parse
from blixard.domain.vm import VM, Hypervisor, VMPhase

WALL = datetime(2026, 11, 22, tzinfo=UTC)
GRACE = 1.5


def node(name: str, *, vcpus: int = 8, memory_mib: int = 4096, **spec: object) -> Node:
    return Node(
        metadata=ObjectMeta(name=name, resource_version=1),
        spec=NodeSpec(**spec),  # type: ignore[arg-type]
        status=NodeStatus(
            ready=True,
            capacity=Resources(vcpus=vcpus, memory_mib=memory_mib),
            hypervisors=[Hypervisor.PROCESS, Hypervisor.QEMU],
        ),
    )


def vm(name: str, *, replicas: int = 1, memory: str = "512M", **spec: object) -> VM:
    doc = {
        "metadata": {"name": name, "resource_version": 1, "generation": 1},
        "spec": {
            "hypervisor": "process",
            "replicas": replicas,
            "memory_mib": memory,
            "boot": {"command": ["sleep", "600"]},
            **spec,
        },
    }
    return parse(VM, doc)


def snap(
    vms: Iterable[VM],
    instances: Iterable[Instance],
    nodes: Iterable[Node],
    *,
    alive: Iterable[str] | None = None,
    down_since: dict[str, float] | None = None,
    now: float = 100.0,
) -> Snapshot:
    nodes = list(nodes)
    return Snapshot(
        vms={v.metadata.name: v for v in vms},
        instances={i.metadata.name: i for i in instances},
        nodes={n.metadata.name: n for n in nodes},
        alive=set(alive) if alive is not None else {n.metadata.name for n in nodes},
        down_since=down_since or {},
        now=now,
        wall=WALL,
    )


_uids = (uuid.UUID(int=i) for i in itertools.count(1))


def decide(s: Snapshot, **kwargs: object) -> Plan:
    return plan(s, Policy(failover_grace_s=GRACE), new_uid=lambda: next(_uids), **kwargs)  # type: ignore[arg-type]


def apply(s: Snapshot, p: Plan) -> list[Instance]:
    """The instances after ``p``'s writes (resource versions bumped)."""
    out = dict(s.instances)
    for action in p.actions:
        if isinstance(action, Create):
            out[action.obj.metadata.name] = action.obj.with_resource_version(2)
        elif isinstance(action, Update) and isinstance(action.obj, Instance):
            rv = action.obj.metadata.resource_version + 1
            out[action.obj.metadata.name] = action.obj.with_resource_version(rv)
        elif isinstance(action, Delete):
            del out[action.obj.metadata.name]
    return sorted(out.values(), key=lambda i: i.metadata.name)


def running(inst: Instance, state: ObservedState = ObservedState.RUNNING) -> Instance:
    """``inst`` as its agent reports it at its current assignment."""
    status = InstanceStatus(
        state=state,
        node=inst.spec.node,
        epoch=inst.spec.epoch,
        ready=state is ObservedState.RUNNING,
    )
    return inst.model_copy(update={"status": status})


def instance_updates(p: Plan) -> list[Instance]:
    return [a.obj for a in p.actions if isinstance(a, Update) and isinstance(a.obj, Instance)]


def vm_status(p: Plan, name: str) -> VM:
    found = [
        a.obj
        for a in p.actions
        if isinstance(a, Update) and isinstance(a.obj, VM) and a.obj.metadata.name == name
    ]
    assert found, f"no status update for {name}"
    return found[-1]


def settled(vms: Sequence[VM], nodes: Sequence[Node]) -> list[Instance]:
    """Instances of ``vms`` placed and running."""
    s = snap(vms, [], nodes)
    return [running(i) for i in apply(s, decide(s))]


def test_a_new_vm_gets_one_placed_instance_per_replica_at_epoch_1() -> None:
    s = snap([vm("web", replicas=3)], [], [node("n1"), node("n2")])
    p = decide(s)
    created = [a.obj for a in p.actions if isinstance(a, Create)]
    assert [i.metadata.name for i in created] == ["web-0", "web-1", "web-2"]
    assert all(i.spec.node in {"n1", "n2"} and i.spec.epoch == 1 for i in created)
    assert p.placements == 3
    assert "placed on" in vm_status(p, "web").status.placement_reason


def test_capacity_is_never_overcommitted_within_one_pass() -> None:
    # 2 nodes x 1024 MiB hold four 512 MiB replicas; the fifth cannot be placed.
    nodes = [node("n1", memory_mib=1024), node("n2", memory_mib=1024)]
    s = snap([vm("web", replicas=5)], [], nodes)
    p = decide(s)
    created = [a.obj for a in p.actions if isinstance(a, Create)]
    placed = [i.spec.node for i in created if i.spec.node is not None]
    assert sorted(placed) == ["n1", "n1", "n2", "n2"]
    unplaced = [i for i in created if i.spec.node is None]
    assert len(unplaced) == 1 and unplaced[0].spec.epoch == 0
    status = vm_status(p, "web").status
    assert "web-4" in status.message and "capacity" in status.message
    allocated = {
        a.obj.metadata.name: a.obj.status.allocated
        for a in p.actions
        if isinstance(a, Update) and isinstance(a.obj, Node)
    }
    assert allocated["n1"].memory_mib == 1024 and allocated["n2"].memory_mib == 1024


def test_a_down_node_is_failed_over_only_after_the_grace() -> None:
    web = vm("web")
    nodes = [node("n1"), node("n2")]
    [inst] = settled([web], [node("n1")])
    assert inst.spec.node == "n1"
    # n1's liveness key is gone, seen 1 s ago: not yet.
    early = snap([web], [inst], nodes, alive={"n2"}, down_since={"n1": 99.0}, now=100.0)
    p = decide(early)
    assert instance_updates(p) == []
    assert p.wake_at == 99.0 + GRACE
    assert "failing over in 0.5s" in vm_status(p, "web").status.message
    # Past the grace: a new epoch on n2.
    late = snap([web], [inst], nodes, alive={"n2"}, down_since={"n1": 98.0}, now=100.0)
    [moved] = instance_updates(decide(late))
    assert (moved.spec.node, moved.spec.epoch) == ("n2", inst.spec.epoch + 1)
    assert moved.spec.desired_state is DesiredState.RUNNING


def test_a_deleted_node_record_counts_as_down() -> None:
    web = vm("web")
    [inst] = settled([web], [node("n1")])
    s = snap([web], [inst], [node("n2")], down_since={"n1": 0.0})
    [moved] = instance_updates(decide(s))
    assert moved.spec.node == "n2"


def test_fencing_none_is_never_failed_over() -> None:
    web = vm("web", fencing="none")
    [inst] = settled([web], [node("n1")])
    s = snap([web], [inst], [node("n1"), node("n2")], alive={"n2"}, down_since={"n1": 0.0})
    p = decide(s)
    assert instance_updates(p) == []
    assert "fencing: none" in vm_status(p, "web").status.message


def test_without_room_elsewhere_the_instance_stays_bound_to_its_down_node() -> None:
    web = vm("web", memory="4G")
    [inst] = settled([web], [node("n1")])
    small = node("n2", memory_mib=1024)
    s = snap([web], [inst], [node("n1"), small], alive={"n2"}, down_since={"n1": 0.0})
    p = decide(s)
    assert instance_updates(p) == []
    assert "cannot fail over" in vm_status(p, "web").status.message


def test_drain_stops_first_then_moves_at_a_new_epoch() -> None:
    web = vm("web")
    [inst] = settled([web], [node("n1")])
    nodes = [node("n1", cordoned=True, draining=True), node("n2")]
    [stopping] = instance_updates(decide(snap([web], [inst], nodes)))
    assert stopping.spec.node == "n1" and stopping.spec.desired_state is DesiredState.STOPPED
    # The agent reports it stopped: now it moves.
    stopped = running(stopping.with_resource_version(5), ObservedState.STOPPED)
    [moved] = instance_updates(decide(snap([web], [stopped], nodes)))
    assert (moved.spec.node, moved.spec.epoch) == ("n2", inst.spec.epoch + 1)
    assert moved.spec.desired_state is DesiredState.RUNNING


def test_drain_never_stops_what_it_cannot_place_again() -> None:
    web = vm("web")
    [inst] = settled([web], [node("n1")])
    nodes = [node("n1", cordoned=True, draining=True)]
    p = decide(snap([web], [inst], nodes))
    assert instance_updates(p) == []
    assert "stays on draining node n1" in vm_status(p, "web").status.message


def test_scale_down_stops_extra_replicas_before_deleting_them() -> None:
    web3 = vm("web", replicas=3)
    instances = settled([web3], [node("n1")])
    web1 = vm("web", replicas=1)
    p = decide(snap([web1], instances, [node("n1")]))
    stopped = instance_updates(p)
    assert sorted(i.metadata.name for i in stopped) == ["web-1", "web-2"]
    assert all(i.spec.desired_state is DesiredState.STOPPED for i in stopped)
    assert not [a for a in p.actions if isinstance(a, Delete)]
    # Reported stopped: now deleted.
    after = [instances[0]] + [running(i, ObservedState.STOPPED) for i in stopped]
    p2 = decide(snap([web1], after, [node("n1")]))
    assert sorted(a.obj.metadata.name for a in p2.actions if isinstance(a, Delete)) == [
        "web-1",
        "web-2",
    ]


def test_instances_of_a_deleted_vm_on_a_down_node_are_deleted_at_once() -> None:
    instances = settled([vm("web")], [node("n1")])
    p = decide(snap([], instances, [node("n1")], alive=set(), down_since={"n1": 0.0}))
    assert [a.obj.metadata.name for a in p.actions if isinstance(a, Delete)] == ["web-0"]


def test_a_running_vm_reports_running_and_a_quiet_pass_writes_nothing() -> None:
    web = vm("web", replicas=2)
    instances = settled([web], [node("n1")])
    p = decide(snap([web], instances, [node("n1")]))
    status = vm_status(p, "web").status
    assert status.phase is VMPhase.RUNNING and status.ready_replicas == 2
    web_now = web.model_copy(update={"status": status})
    allocated = Resources(vcpus=2, memory_mib=1024)
    n1 = node("n1")
    n1 = n1.model_copy(update={"status": n1.status.model_copy(update={"allocated": allocated})})
    assert decide(snap([web_now], instances, [n1])).actions == []


def test_only_limits_the_pass_to_the_named_vms() -> None:
    a, b = vm("a"), vm("b")
    p = decide(snap([a, b], [], [node("n1")]), only={"b"})
    created = [x.obj.metadata.name for x in p.actions if isinstance(x, Create)]
    assert created == ["b-0"]


def test_active_at_epoch_ignores_a_report_about_an_older_assignment() -> None:
    [inst] = settled([vm("web")], [node("n1")])
    assert active_at_epoch(inst)
    moved = inst.model_copy(update={"spec": inst.spec.model_copy(update={"epoch": 2})})
    assert not active_at_epoch(moved)


@settings(max_examples=60, deadline=None)
@given(
    replicas=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6),
    memories=st.lists(st.sampled_from([256, 512, 1024, 2048]), min_size=6, max_size=6),
    capacities=st.lists(st.sampled_from([512, 1024, 3072]), min_size=1, max_size=4),
)
def test_property_placements_never_exceed_capacity(
    replicas: list[int], memories: list[int], capacities: list[int]
) -> None:
    vms = [vm(f"v{i}", replicas=r, memory=f"{memories[i]}M") for i, r in enumerate(replicas)]
    nodes = [node(f"n{i}", vcpus=64, memory_mib=c) for i, c in enumerate(capacities)]
    s = snap(vms, [], nodes)
    instances = apply(s, decide(s))
    used: dict[str, int] = {}
    mem = {v.metadata.name: v.spec.memory_mib for v in vms}
    for inst in instances:
        if inst.spec.node is not None:
            used[inst.spec.node] = used.get(inst.spec.node, 0) + mem[inst.spec.vm]
    capacity = {n.metadata.name: n.status.capacity.memory_mib for n in nodes}
    assert all(used[n] <= capacity[n] for n in used)
    # Every replica exists; an unplaced one only when no node had room for it.
    assert len(instances) == sum(replicas)
    for inst in instances:
        if inst.spec.node is None:
            need = mem[inst.spec.vm]
            assert all(capacity[n] - used.get(n, 0) < need for n in capacity)


def test_a_deleted_vm_s_running_replica_keeps_its_claim_until_it_stops() -> None:
    old = vm("old", memory="3G")
    [inst] = settled([old], [node("n1")])
    # "old" is deleted; its task still runs on n1 (4 GiB). A new 2 GiB VM must not fit there.
    p = decide(snap([vm("new", memory="2G")], [inst], [node("n1")]))
    [created] = [a.obj for a in p.actions if isinstance(a, Create)]
    assert created.spec.node is None
    assert any(isinstance(a, Update) and a.obj.metadata.name == "old-0" for a in p.actions)


def test_a_stopped_vm_started_again_moves_when_its_node_filled_up() -> None:
    web = vm("web", memory="3G")
    [inst] = settled([web], [node("n1")])
    stopped = running(
        inst.model_copy(
            update={"spec": inst.spec.model_copy(update={"desired_state": DesiredState.STOPPED})}
        ),
        ObservedState.STOPPED,
    )
    filler = vm("filler", memory="2G")
    [fill] = settled([filler], [node("n1")])
    nodes = [node("n1"), node("n2")]
    [moved] = instance_updates(decide(snap([web, filler], [stopped, fill], nodes)))
    assert (moved.spec.node, moved.spec.epoch) == ("n2", inst.spec.epoch + 1)


def test_records_on_a_down_node_wait_for_the_grace_and_never_go_for_fencing_none() -> None:
    for fencing, at, deleted in (("stop", 99.5, False), ("stop", 90.0, True), ("none", 0.0, False)):
        [inst] = settled([vm("web", fencing=fencing)], [node("n1")])
        s = snap([], [inst], [node("n1")], alive=set(), down_since={"n1": at})
        gone = [a for a in decide(s).actions if isinstance(a, Delete)]
        assert bool(gone) is deleted, (fencing, at)


def test_a_stopped_vm_started_again_waits_when_no_node_has_room() -> None:
    web = vm("web", memory="3G")
    [inst] = settled([web], [node("n1")])
    stopped = running(
        inst.model_copy(
            update={"spec": inst.spec.model_copy(update={"desired_state": DesiredState.STOPPED})}
        ),
        ObservedState.STOPPED,
    )
    filler = vm("filler", memory="2G")
    [fill] = settled([filler], [node("n1")])
    p = decide(snap([web, filler], [stopped, fill], [node("n1")]))
    assert instance_updates(p) == []  # not started over the filler on n1
    assert "waiting for room" in vm_status(p, "web").status.message
