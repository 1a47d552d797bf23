"""Cluster-wide systemd services: unit names reach systemctl, so they are held strictly."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes
from blixard.domain.service import Service, ServiceState


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


def test_missing_nodes_and_bad_state() -> None:
    data = svc(state="restarting")
    del data["spec"]["nodes"]
    with pytest.raises(ValidationError) as info:
        parse(Service, data)
    assert info.value.field == "spec.state"
    assert "spec.nodes: is required" in info.value.reason
