"""A service's live state from its VMs and instances, and pinning to a node by its name."""

from __future__ import annotations

from typing import Any

from blixard.controllers.plan import resources_of
from blixard.domain.instance import Instance, InstanceSpec, InstanceStatus, ObservedState
from blixard.domain.meta import ObjectMeta
from blixard.domain.parse import parse
from blixard.domain.placement import NODE_NAME_KEY
from blixard.domain.service import Service, ServicePhase, desired_vms
from blixard.domain.service_status import reached, service_status
from blixard.domain.vm import VM
from blixard.scheduler.filters import NODE_SELECTOR
from blixard.scheduler.placement import place
from tests.unit.test_scheduler_support import request, view


def service(**spec: Any) -> Service:
    data = {"unit": "nginx", **spec}
    return parse(Service, {"metadata": {"name": "nginx", "generation": 1}, "spec": data})


def stored(svc: Service, nodes: list[str]) -> dict[str, VM]:
    return {vm.metadata.name: vm for vm in desired_vms(svc, nodes)}


def inst(vm: str, node: str, state: ObservedState, *, epoch: int = 1, **status: Any) -> Instance:
    return Instance(
        metadata=ObjectMeta(name=f"{vm}-0"),
        spec=InstanceSpec(vm=vm, index=0, node=node, epoch=epoch),
        status=InstanceStatus(state=state, node=node, epoch=epoch, **status),
    )


def test_running_everywhere_then_a_node_down() -> None:
    svc = service(nodes=["a", "b"])
    vms = stored(svc, [])
    instances = {
        "svc-nginx-a": [inst("svc-nginx-a", "a", ObservedState.RUNNING)],
        "svc-nginx-b": [inst("svc-nginx-b", "b", ObservedState.RUNNING)],
    }
    status = service_status(svc, vms, instances, {"a", "b"}, [])
    assert status.phase is ServicePhase.RUNNING and status.synced and reached(svc, status)
    assert status.nodes["a"].active_state == "active" and status.nodes["a"].sub_state == "running"

    status = service_status(svc, vms, instances, {"a"}, [])
    assert status.phase is ServicePhase.DEGRADED and not reached(svc, status)
    assert status.nodes["b"].active_state == "unknown" and not status.nodes["b"].node_alive
    assert "node b is down" in status.nodes["b"].message


def test_stopped_failed_pending_and_restarts() -> None:
    svc = service(nodes=["a"], state="stopped")
    vms = stored(svc, [])
    stopped = {"svc-nginx-a": [inst("svc-nginx-a", "a", ObservedState.STOPPED)]}
    status = service_status(svc, vms, stopped, {"a"}, [])
    assert status.phase is ServicePhase.STOPPED and reached(svc, status)
    assert (status.nodes["a"].active_state, status.nodes["a"].sub_state) == ("inactive", "dead")

    running = service(nodes=["a"], restart_generation=2)
    failed = {"svc-nginx-a": [inst("svc-nginx-a", "a", ObservedState.FAILED, message="exit 3")]}
    status = service_status(running, stored(running, []), failed, {"a"}, [])
    assert status.phase is ServicePhase.FAILED and status.nodes["a"].message == "exit 3"
    up = {"svc-nginx-a": [inst("svc-nginx-a", "a", ObservedState.RUNNING, restart_generation=1)]}
    status = service_status(running, stored(running, []), up, {"a"}, [])
    assert status.phase is ServicePhase.RUNNING and not reached(running, status)  # restart due

    # The VMs still carry the previous wish: not synced, never "reached".
    status = service_status(running, stored(svc, []), up, {"a"}, [])
    assert not status.synced and not reached(running, status)
    # No VM yet: the pinned node waits.
    status = service_status(running, {}, {}, {"a"}, [])
    assert status.phase is ServicePhase.PENDING and status.nodes["a"].sub_state == "pending"


def test_a_placed_service_lists_what_is_not_placed() -> None:
    svc = service(replicas=2)
    status = service_status(svc, stored(svc, []), {}, set(), [])
    assert status.unplaced == ["svc-nginx-0", "svc-nginx-1"]
    assert status.phase is ServicePhase.PENDING


def test_the_node_name_key_pins_without_a_label() -> None:
    pinned = request(hypervisor="systemd", node_selector={NODE_NAME_KEY: "n2"})
    nodes = [view(name, hypervisors=["systemd"]) for name in ("n1", "n2", "n3")]
    decision = place(nodes, pinned)
    assert decision.node == "n2"
    assert NODE_SELECTOR.check(nodes[0], pinned) == (
        f"node selector {NODE_NAME_KEY}=n2 not met (label {NODE_NAME_KEY} is n1)"
    )
    assert place(nodes[:1], pinned).node is None


def test_service_vms_reserve_nothing() -> None:
    (vm,) = desired_vms(service(nodes=["a"]), [])
    assert resources_of(vm).vcpus == 0 and resources_of(vm).memory_mib == 0
