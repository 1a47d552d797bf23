"""VMs and their instances: defaults, boot sources, bounds, and where errors point."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.instance import DesiredState, Instance, ObservedState
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes
from blixard.domain.placement import ConstraintOp
from blixard.domain.vm import VM, Fencing, Hypervisor, RestartMode, VMPhase

BASE: dict[str, Any] = {
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {"boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img"}},
}


def vm_with(**spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(spec)
    return data


def refused(data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(VM, data)
    return info.value


def test_defaults() -> None:
    vm = parse(VM, BASE)
    assert vm.kind == "VM"
    assert vm.spec.hypervisor is Hypervisor.QEMU
    assert (vm.spec.vcpus, vm.spec.memory_mib, vm.spec.replicas) == (1, 512, 1)
    assert vm.spec.restart.mode is RestartMode.ALWAYS
    assert vm.spec.fencing is Fencing.STOP
    assert vm.spec.boot.kind == "kernel"
    assert vm.status.phase is VMPhase.PENDING
    assert vm.key() == "/blixard/v1/vms/web"


def test_full_spec_round_trip() -> None:
    data = vm_with(
        hypervisor="cloud-hypervisor",
        vcpus=4,
        memory_mib="2G",
        replicas=3,
        volumes=["pgdata"],
        placement={
            "constraints": "storage=nvme,memory>=32G",
            "anti_affinity_groups": ["webapp"],
            "strategy": "spread",
        },
        restart={"mode": "on-failure", "backoff_initial_s": "500ms", "backoff_max_s": "5m"},
        fencing="pause",
    )
    vm = parse(VM, data)
    assert vm.spec.memory_mib == 2048
    assert vm.spec.restart.backoff_initial_s == 0.5
    assert vm.spec.restart.backoff_max_s == 300.0
    assert vm.spec.placement.constraints[1].op is ConstraintOp.GE
    raw = to_json_bytes(vm)
    assert b'"memory_mib":2048' in raw
    again = from_json_bytes(VM, raw)
    assert again == vm
    assert to_json_bytes(again) == raw


@pytest.mark.parametrize(
    ("boot", "kind"),
    [
        ({"kernel": "/k", "disk": "/var/lib/d.img", "cmdline": "console=ttyS0 quiet"}, "kernel"),
        ({"image": "alpine"}, "image"),
        ({"image": "base:1.2"}, "image"),
        ({"flake": "github:me/vms#web"}, "flake"),
        ({"flake": "/etc/vms#nixosConfigurations.web"}, "flake"),
        ({"flake": ".#web"}, "flake"),
    ],
)
def test_boot_sources(boot: dict[str, str], kind: str) -> None:
    assert parse(VM, vm_with(boot=boot)).spec.boot.kind == kind


@pytest.mark.parametrize(
    ("boot", "field", "reason_part"),
    [
        ({}, "spec.boot", "needs exactly one boot source: kernel"),
        ({"kernel": "/k", "image": "alpine"}, "spec.boot", "got kernel and image"),
        ({"image": "a", "flake": "x#y"}, "spec.boot", "got image and flake"),
        (
            {"kernel": "/k", "image": "a", "flake": "x#y"},
            "spec.boot",
            "got kernel and image and flake",
        ),
        ({"image": "alpine", "initrd": "/i"}, "spec.boot", "initrd can only be given with kernel"),
        ({"flake": "x#y", "cmdline": "q"}, "spec.boot", "cmdline can only be given with kernel"),
        ({"kernel": "boot/vmlinuz"}, "spec.boot.kernel", "must be an absolute path"),
        ({"kernel": "/boot/../etc/shadow"}, "spec.boot.kernel", "'..' components"),
        ({"kernel": "/k\n"}, "spec.boot.kernel", "control characters"),
        ({"kernel": "/k", "cmdline": "a\nb"}, "spec.boot.cmdline", "one line"),
        ({"image": "Alpine"}, "spec.boot.image", "must be an image name"),
        ({"image": "alpine:"}, "spec.boot.image", "must be an image name"),
        ({"flake": "github:me/vms"}, "spec.boot.flake", "must be a flake reference"),
        ({"flake": "-x#y"}, "spec.boot.flake", "must be a flake reference"),
        ({"flake": "a b#y"}, "spec.boot.flake", "must be a flake reference"),
        ({"kernel": "/k", "bios": "/b"}, "spec.boot.bios", "unknown field"),
    ],
)
def test_bad_boot(boot: dict[str, str], field: str, reason_part: str) -> None:
    err = refused(vm_with(boot=boot))
    assert err.field == field
    assert reason_part in err.reason, err.reason


def test_missing_boot() -> None:
    data = copy.deepcopy(BASE)
    del data["spec"]["boot"]
    err = refused(data)
    assert (err.field, err.reason) == ("spec.boot", "is required")


@pytest.mark.parametrize(
    ("spec", "field", "reason_part"),
    [
        ({"vcpus": 0}, "spec.vcpus", "greater than or equal to 1, got 0"),
        ({"vcpus": 257}, "spec.vcpus", "less than or equal to 256, got 257"),
        ({"vcpus": "4"}, "spec.vcpus", "valid integer, got '4'"),
        ({"vcpus": True}, "spec.vcpus", "valid integer, got True"),
        ({"memory_mib": 0}, "spec.memory_mib", "must be greater than zero"),
        ({"memory_mib": 8}, "spec.memory_mib", "must be at least 16M, got 8"),
        ({"memory_mib": "5T"}, "spec.memory_mib", "must be at most 4T, got '5T'"),
        ({"memory_mib": "512"}, "spec.memory_mib", "a size needs a unit"),
        ({"memory_mib": "lots"}, "spec.memory_mib", "a size needs a unit"),
        ({"replicas": -1}, "spec.replicas", "greater than or equal to 0"),
        ({"replicas": 1001}, "spec.replicas", "less than or equal to 1000"),
        ({"hypervisor": "vmware"}, "spec.hypervisor", "'qemu', 'firecracker'"),
        ({"fencing": "kill"}, "spec.fencing", "'stop', 'pause' or 'none'"),
        ({"restart": {"mode": "sometimes"}}, "spec.restart.mode", "'always'"),
        ({"restart": {"backoff_initial_s": "0s"}}, "spec.restart.backoff_initial_s", "zero"),
        (
            {"restart": {"backoff_initial_s": "1m", "backoff_max_s": "10s"}},
            "spec.restart.backoff_max_s",
            "must not be smaller than backoff_initial_s",
        ),
        ({"volumes": ["data", "Data"]}, "spec.volumes[1]", "DNS label"),
        ({"memroy_mib": 512}, "spec.memroy_mib", "unknown field; known fields here: hypervisor"),
    ],
)
def test_bad_spec(spec: dict[str, Any], field: str, reason_part: str) -> None:
    err = refused(vm_with(**spec))
    assert err.field == field
    assert reason_part in err.reason, err.reason


def test_zero_replicas_is_allowed() -> None:
    assert parse(VM, vm_with(replicas=0)).spec.replicas == 0


def test_name_rules() -> None:
    data = copy.deepcopy(BASE)
    data["metadata"]["name"] = "My_VM"
    err = refused(data)
    assert err.field == "metadata.name"
    assert err.reason.endswith("got 'My_VM'")

    data["metadata"]["name"] = "v" * 60
    err = refused(data)
    assert err.field == "metadata.name"
    assert "at most 59 characters" in err.reason
    data["metadata"]["name"] = "v" * 59
    assert parse(VM, data).metadata.name == "v" * 59


def test_metadata_is_strict_too() -> None:
    data = copy.deepcopy(BASE)
    data["metadata"]["nmae"] = "x"
    assert refused(data).field == "metadata.nmae"
    data = copy.deepcopy(BASE)
    data["metadata"]["resource_version"] = -1
    assert refused(data).field == "metadata.resource_version"
    data = copy.deepcopy(BASE)
    data["metadata"]["created_at"] = "2024-01-01T00:00:00"
    assert refused(data).field == "metadata.created_at"


def test_several_errors_are_all_listed() -> None:
    err = refused(vm_with(vcpus=0, memory_mib=-1, fencing="kill"))
    assert err.field == "spec.vcpus"
    assert (
        "(also 2 more: spec.memory_mib: must not be negative, got -1; spec.fencing:" in err.reason
    )


def test_with_resource_version_copies() -> None:
    vm = parse(VM, BASE)
    newer = vm.with_resource_version(42)
    assert newer.metadata.resource_version == 42
    assert vm.metadata.resource_version == 0
    assert newer.spec == vm.spec


# ------------------------------------------------------------------ instances


def instance(name: str = "web-2", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"vm": "web", "index": 2, **spec}}


def test_instance_round_trip() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    inst = parse(
        Instance,
        instance(node="node1", epoch=7, assigned_at=now.isoformat(), desired_state="paused"),
    )
    assert inst.spec.node == "node1"
    assert inst.spec.epoch == 7
    assert inst.spec.assigned_at == now
    assert inst.spec.desired_state is DesiredState.PAUSED
    assert inst.status.state is ObservedState.PENDING
    assert inst.key() == "/blixard/v1/instances/web-2"
    assert from_json_bytes(Instance, to_json_bytes(inst)) == inst


@pytest.mark.parametrize(
    ("data", "field", "reason_part"),
    [
        (instance(name="web-3"), "metadata.name", "expected 'web-2', got 'web-3'"),
        (instance(epoch=-1), "spec.epoch", "greater than or equal to 0"),
        (instance(node="Node 1"), "spec.node", "DNS label"),
        (instance(desired_state="exploded"), "spec.desired_state", "'running'"),
        (instance(assigned_at="2024-05-01T12:00:00"), "spec.assigned_at", "timezone"),
        ({"metadata": {"name": "web-0"}, "spec": {"vm": "web"}}, "spec.index", "is required"),
    ],
)
def test_bad_instances(data: dict[str, Any], field: str, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Instance, data)
    assert info.value.field == field
    assert reason_part in info.value.reason, info.value.reason


def test_instance_status_tolerates_newer_fields() -> None:
    data = instance()
    data["status"] = {"state": "running", "epoch": 3, "added_by_a_newer_agent": True}
    inst = parse(Instance, data)
    assert inst.status.state is ObservedState.RUNNING
    assert inst.status.epoch == 3


def test_process_hypervisor_runs_a_command() -> None:
    vm = parse(VM, vm_with(hypervisor="process", boot={"command": ["/bin/sleep", "60"]}))
    assert vm.spec.boot.kind == "command" and vm.spec.boot.command == ["/bin/sleep", "60"]
    assert vm.spec.running is True and vm.spec.restart_generation == 0
    assert vm.spec.accel.value == "auto" and vm.spec.boot_timeout_s == 60.0


@pytest.mark.parametrize(
    ("spec", "field", "reason_part"),
    [
        ({"hypervisor": "process"}, "spec.boot", "the process hypervisor runs boot.command"),
        ({"boot": {"command": ["/bin/true"]}}, "spec.hypervisor", "only on the process"),
        ({"hypervisor": "process", "boot": {"command": []}}, "spec.boot.command", "at least 1"),
        (
            {"hypervisor": "process", "boot": {"command": ["/bin/echo", "a\nb"]}},
            "spec.boot.command[1]",
            "newline",
        ),
        ({"boot": {"command": ["/x"], "kernel": "/k"}}, "spec.boot", "got kernel and command"),
        ({"accel": "hvf"}, "spec.accel", "'auto', 'kvm' or 'tcg'"),
        ({"boot_timeout_s": "forever"}, "spec.boot_timeout_s", ""),
        ({"boot_timeout_s": 0}, "spec.boot_timeout_s", ""),
        ({"ready_line": ""}, "spec.ready_line", "at least 1"),
        ({"restart_generation": -1}, "spec.restart_generation", "greater than or equal"),
    ],
)
def test_bad_runtime_fields(spec: dict[str, Any], field: str, reason_part: str) -> None:
    err = refused(vm_with(**spec))
    assert err.field == field
    assert reason_part in err.reason
