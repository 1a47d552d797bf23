"""Cluster-wide systemd services: one unit kept running (or stopped) on chosen nodes.

This is the older, simpler workload than a VM: the unit must already be
installed on the hosts (by NixOS), Blixard only starts and stops it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BeforeValidator, Field

from blixard.domain.errors import ValidationError
from blixard.domain.fields import bridge
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.names import validate_dns_label, validate_unit_name

MAX_SERVICE_NODES = 1000


class ServiceState(StrEnum):
    """What the unit should be doing on every selected node."""

    RUNNING = "running"
    STOPPED = "stopped"


def validate_service_nodes(value: Any, field: str) -> list[str] | Literal["all"]:
    """``"all"``, or a non-empty list of distinct node ids.

    "This node" is not stored: the API (which knows which node it is) turns it
    into ``[that-node]``, so the stored spec means the same on every node.
    """
    if value == "all":
        return "all"
    if not isinstance(value, list) or not value:
        raise ValidationError(
            field, f"must be 'all' or a non-empty list of node ids, got {value!r}"
        )
    if len(value) > MAX_SERVICE_NODES:
        raise ValidationError(field, f"at most {MAX_SERVICE_NODES} nodes, got {len(value)}")
    nodes = [validate_dns_label(node, field) for node in value]
    if len(set(nodes)) != len(nodes):
        raise ValidationError(field, f"lists a node more than once: {nodes}")
    return nodes


UnitName = Annotated[str, BeforeValidator(bridge(validate_unit_name))]
ServiceNodes = Annotated[
    list[str] | Literal["all"], BeforeValidator(bridge(validate_service_nodes))
]


class ServiceSpec(SpecModel):
    """Which unit, in which state, on which nodes."""

    unit: UnitName
    state: ServiceState = ServiceState.RUNNING
    nodes: ServiceNodes


class ServiceNodeStatus(StatusModel):
    """The unit as ``systemctl show`` reported it on one node."""

    active_state: str = ""
    sub_state: str = ""
    message: str = ""
    updated_at: AwareDatetime | None = None


class ServiceStatus(StatusModel):
    """Per-node reports, keyed by node id."""

    nodes: dict[str, ServiceNodeStatus] = Field(default_factory=dict)
    observed_generation: int = 0


class Service(StoredObject):
    """Stored under ``/blixard/v1/services/<name>``."""

    STORE_KIND = Kind.SERVICES

    kind: Literal["Service"] = "Service"
    spec: ServiceSpec
    status: ServiceStatus = Field(default_factory=ServiceStatus)
