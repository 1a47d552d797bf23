"""What the client reads back from the API, as domain models.

These mirror the API's answer shapes (``{"vm", "instances"}``, ``{"node",
"alive"}``, ``{"items": [...]}``) with the client's own classes, since the
client layer may not import the API; the objects inside are the domain models
themselves, validated the same way on both sides.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from blixard.domain.instance import Instance
from blixard.domain.node import Node
from blixard.domain.service import Service
from blixard.domain.vm import VM


class VMDetails(BaseModel):
    """A VM and its instances (replicas), by index."""

    vm: VM
    instances: list[Instance]


class NodeDetails(BaseModel):
    """A node record and whether its liveness lease is alive."""

    node: Node
    alive: bool


class Health(BaseModel):
    """``GET /health``: the answering node, its version and its store."""

    model_config = ConfigDict(extra="allow")

    node: str
    version: str
    status: str
    registered: bool
    store: dict[str, Any]


class ServiceDeleted(BaseModel):
    """``DELETE /v1/services/{name}``: the service as it was and the VMs deleted with it."""

    model_config = ConfigDict(extra="allow")

    service: Service
    vms: list[str]


class ImportResult(BaseModel):
    """``POST /v1/services/import``: which services were created, updated or left alone."""

    model_config = ConfigDict(extra="allow")

    created: list[str] = []
    updated: list[str] = []
    unchanged: list[str] = []
