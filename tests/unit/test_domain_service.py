"""Cluster-wide systemd services: unit names reach systemctl, so they are held strictly."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes
from blixard.domain.placement import NODE_NAME_KEY
from blixard.domain.service import (
    SERVICE_LABEL,
    SERVICE_NODE_LABEL,
    Service,
    ServiceState,
    desired_vms,
    service_identity,
    service_vm_name,
)
from blixard.domain.vm import MAX_VM_NAME, VM, Fencing, Hypervisor, VMSpec


def svc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"unit": "nginx.service", "nodes": ["node1"]}
    base.update(spec)
    return {"metadata": {"name": "nginx"}, "spec": base}


def test_round_trip_and_defaults() -> None:
    s = parse(Service, svc(unit="nginx", nodes=["node1", "node2"]))
    assert s.spec.unit == "nginx.service"
    assert s.spec.state is ServiceState.RUNNING
    assert s.spec.nodes == ["node1", "node2"]
    assert s.key() == "/blixard/v1/services/nginx"
    assert from_json_bytes(Service, to_json_bytes(s)) == s


def test_all_nodes() -> None:
    s = parse(Service, svc(nodes="all", state="stopped"))
    assert s.spec.nodes == "all"
    assert s.spec.state is ServiceState.STOPPED
    assert from_json_bytes(Service, to_json_bytes(s)).spec.nodes == "all"


def test_status_per_node() -> None:
    data = svc()
    data["status"] = {"nodes": {"node1": {"active_state": "active", "sub_state": "running"}}}
    s = parse(Service, data)
    assert s.status.nodes["node1"].active_state == "active"


@pytest.mark.parametrize(
    ("unit", "reason_part"),
    [
        ("nginx; reboot", "contains ';'"),
        ("nginx;reboot", "contains ';'"),
        ("$(reboot)", "contains '$'"),
        ("/usr/lib/systemd/system/nginx.service", "not a path"),
        ("../nginx.service", "not a path"),
        ("nginx..service", "must not contain '..'"),
        ("my service", "must not contain spaces"),
        ("-H.service", "must start with a letter"),
        ("nginx.cfg", "unknown unit type"),
    ],
)
def test_bad_unit_names(unit: str, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Service, svc(unit=unit))
    assert info.value.field == "spec.unit"
    assert reason_part in info.value.reason, info.value.reason


@pytest.mark.parametrize(
    ("nodes", "reason_part"),
    [
        ([], "must be 'all' or a non-empty list"),
        ("node1", "must be 'all' or a non-empty list"),
        ("ALL", "must be 'all' or a non-empty list"),
        (["node1", "node1"], "more than once"),
        (["Node_1"], "DNS label"),
    ],
)
def test_bad_node_selection(nodes: object, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Service, svc(nodes=nodes))
    assert info.value.field == "spec.nodes"
    assert reason_part in info.value.reason, info.value.reason


def test_bad_state() -> None:
    with pytest.raises(ValidationError) as info:
        parse(Service, svc(state="restarting"))
    assert info.value.field == "spec.state"


def test_without_nodes_a_service_is_placed() -> None:
    data = svc(replicas=2, placement={"node_selector": {"disk": "ssd"}})
    del data["spec"]["nodes"]
    s = parse(Service, data)
    assert s.spec.mode == "placed" and s.spec.replicas == 2
    assert parse(Service, svc()).spec.mode == "pinned"
    assert parse(Service, svc(nodes="all")).spec.mode == "all"


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"replicas": 2}, "spec.replicas"), ({"placement": {"strategy": "spread"}}, "spec.placement")],
)
def test_pinned_services_refuse_placement(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Service, svc(**extra))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("text", "name", "unit"),
    [
        ("nginx", "nginx", "nginx.service"),
        ("nginx.service", "nginx", "nginx.service"),
        ("web-1", "web-1", "web-1.service"),
    ],
)
def test_service_identity(text: str, name: str, unit: str) -> None:
    assert service_identity(text, "name") == (name, unit)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("nginx;reboot", "contains ';'"),
        ("$(reboot)", "contains '$'"),
        ("a/b", "not a path"),
        ("..", "must not contain '..'"),
        ("my unit", "spaces"),
        ("my_app", "cannot name a service"),
        ("getty@tty1", "cannot name a service"),
        ("sshd.socket", "cannot name a service"),
    ],
)
def test_service_identity_refusals(text: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        service_identity(text, "name")
    assert info.value.field == "name" and reason in info.value.reason, info.value


def test_desired_vms_pinned_all_and_placed() -> None:
    pinned = parse(Service, svc(nodes=["n1", "n2"]))
    vms = desired_vms(pinned, ["n1", "n2", "n3"])
    assert [vm.metadata.name for vm in vms] == ["svc-nginx-n1", "svc-nginx-n2"]
    vm = vms[0]
    assert vm.spec.hypervisor is Hypervisor.SYSTEMD and vm.spec.boot.unit == "nginx.service"
    assert vm.spec.placement.node_selector == {NODE_NAME_KEY: "n1"}
    assert vm.spec.fencing is Fencing.NONE and vm.spec.replicas == 1
    assert vm.metadata.labels == {SERVICE_LABEL: "nginx", SERVICE_NODE_LABEL: "n1"}

    everywhere = parse(Service, svc(nodes="all", state="stopped"))
    vms = desired_vms(everywhere, ["n3", "n1"])
    assert [vm.metadata.name for vm in vms] == ["svc-nginx-n1", "svc-nginx-n3"]
    assert not any(vm.spec.running for vm in vms)

    data = svc(replicas=2, restart_generation=3)
    del data["spec"]["nodes"]
    (vm,) = desired_vms(parse(Service, data), ["n1"])
    assert vm.metadata.name == "svc-nginx" and vm.spec.replicas == 2
    assert vm.spec.fencing is Fencing.STOP and vm.spec.restart_generation == 3
    assert "svc-nginx" in vm.spec.placement.anti_affinity_groups  # one unit per host


def test_long_names_still_make_vm_names() -> None:
    name = "a" * 63
    vm_name = service_vm_name(name, "n" * 63)
    assert len(vm_name) <= MAX_VM_NAME and vm_name.startswith("svc-aaa")
    assert vm_name != service_vm_name(name, "n" * 62)


def test_a_systemd_vm_needs_a_unit_and_a_unit_needs_systemd() -> None:
    ok = parse(VMSpec, {"hypervisor": "systemd", "boot": {"unit": "nginx"}})
    assert ok.boot.unit == "nginx.service" and ok.boot.kind == "unit"
    with pytest.raises(ValidationError) as info:
        parse(VMSpec, {"hypervisor": "systemd", "boot": {"command": ["x"]}})
    assert "boot.command runs only on the process hypervisor" in info.value.reason
    with pytest.raises(ValidationError) as info:
        parse(VMSpec, {"hypervisor": "systemd", "boot": {"image": "default"}})
    assert info.value.field == "boot", info.value
    with pytest.raises(ValidationError) as info:
        parse(VMSpec, {"hypervisor": "qemu", "boot": {"unit": "nginx"}})
    assert info.value.field == "hypervisor"
    with pytest.raises(ValidationError) as info:
        parse(VMSpec, {"hypervisor": "systemd", "boot": {"unit": "x;reboot"}})
    assert info.value.field == "boot.unit"


def test_service_vms_read_back_as_stored() -> None:
    """What the controller stores must decode again (or the VM would be unreadable)."""
    data = svc(placement={"anti_affinity_groups": ["svc-nginx", "db"]})
    del data["spec"]["nodes"]
    for service in (parse(Service, svc(nodes="all")), parse(Service, data)):
        for vm in desired_vms(service, ["n1", "n2"]):
            assert from_json_bytes(VM, to_json_bytes(vm)) == vm
