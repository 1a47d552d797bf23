"""Nodes: spec written by operators, status measured by agents."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.node import KvmState, Node, NodeRole, Resources
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes
from blixard.domain.vm import Hypervisor


def node(
    spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"metadata": {"name": "node1", "labels": {"storage": "nvme"}}}
    if spec is not None:
        data["spec"] = spec
    if status is not None:
        data["status"] = status
    return data


def test_minimal_node_defaults() -> None:
    n = parse(Node, node())
    assert n.spec.roles == [NodeRole.AGENT]
    assert n.spec.cordoned is False
    assert n.status.kvm is KvmState.ABSENT
    assert n.key() == "/blixard/v1/nodes/node1"


def test_full_node_round_trip() -> None:
    n = parse(
        Node,
        node(
            spec={
                "roles": ["server", "agent", "etcd"],
                "zone": "eu-west-1a",
                "cordoned": True,
                "addresses": ["10.0.0.4", "fe80::1", "node1.lan"],
                "api_url": "https://10.0.0.4:7443",
            },
            status={
                "ready": True,
                "capacity": {"vcpus": 16, "memory_mib": "64G", "disk_mib": "2T"},
                "allocated": {"vcpus": 4, "memory_mib": 4096},
                "hypervisors": ["qemu", "process", "systemd"],
                "kvm": "unusable",
                "kvm_detail": "probe guest hung",
                "last_heartbeat": "2024-05-01T12:00:00Z",
            },
        ),
    )
    assert n.status.capacity == Resources(vcpus=16, memory_mib=65536, disk_mib=2 * 1024 * 1024)
    assert n.status.hypervisors == [Hypervisor.QEMU, Hypervisor.PROCESS, Hypervisor.SYSTEMD]
    assert n.status.kvm is KvmState.UNUSABLE
    assert n.status.free() == Resources(vcpus=12, memory_mib=61440, disk_mib=2 * 1024 * 1024)
    assert n.status.capacity.fits(n.status.allocated)
    assert not n.status.allocated.fits(n.status.capacity)
    assert from_json_bytes(Node, to_json_bytes(n)) == n


@pytest.mark.parametrize(
    ("spec", "field", "reason_part"),
    [
        ({"roles": ["master"]}, "spec.roles[0]", "'server', 'agent' or 'etcd'"),
        ({"roles": ["agent", "agent"]}, "spec.roles", "more than once"),
        ({"zone": "eu west"}, "spec.zone", "label value"),
        ({"addresses": ["10.0.0.256"]}, "spec.addresses[0]", "IP address or a DNS host name"),
        ({"addresses": ["host_name"]}, "spec.addresses[0]", "IP address or a DNS host name"),
        ({"api_url": "ftp://x:1"}, "spec.api_url", "http:// or https://"),
        ({"api_url": "http://x:99999"}, "spec.api_url", "http(s) URL"),
        ({"api_url": "http://:80"}, "spec.api_url", "with a host"),
        ({"cordon": True}, "spec.cordon", "unknown field"),
    ],
)
def test_bad_node_spec(spec: dict[str, Any], field: str, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Node, node(spec=spec))
    assert info.value.field == field
    assert reason_part in info.value.reason, info.value.reason


@pytest.mark.parametrize(
    ("status", "field", "reason_part"),
    [
        ({"capacity": {"vcpus": -1}}, "status.capacity.vcpus", "greater than or equal to 0"),
        ({"capacity": {"memory_mib": "-1G"}}, "status.capacity.memory_mib", "negative"),
        ({"capacity": {"memory_mib": "2E"}}, "status.capacity.memory_mib", "a size needs a unit"),
        ({"hypervisors": ["vmware"]}, "status.hypervisors[0]", "'qemu'"),
        ({"kvm": "maybe"}, "status.kvm", "'available', 'unusable' or 'absent'"),
    ],
)
def test_bad_node_status(status: dict[str, Any], field: str, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Node, node(status=status))
    assert info.value.field == field
    assert reason_part in info.value.reason, info.value.reason


def test_node_name_is_a_dns_label() -> None:
    with pytest.raises(ValidationError) as info:
        parse(Node, {"metadata": {"name": "Node_1"}})
    assert info.value.field == "metadata.name"


def test_ipv6_address_is_normalised() -> None:
    n = parse(Node, node(spec={"addresses": ["FE80:0:0::1"]}))
    assert n.spec.addresses == ["fe80::1"]
