"""Shapes of the API's answers that are not a single stored object.

Stored objects (VM, Instance, Node) travel as their domain models, so the JSON
a client reads is exactly what the store holds; these wrappers only add what
the API joins to them (a VM's instances, a node's liveness).
"""

from __future__ import annotations

from pydantic import BaseModel

from blixard.domain.instance import Instance
from blixard.domain.node import Node
from blixard.domain.vm import VM


class VMDetails(BaseModel):
    """A VM and the instances (replicas) the controllers made for it, by index."""

    vm: VM
    instances: list[Instance]


class VMList(BaseModel):
    items: list[VMDetails]


class InstanceList(BaseModel):
    items: list[Instance]


class NodeDetails(BaseModel):
    """A node record and whether its liveness lease is alive right now."""

    node: Node
    alive: bool


class NodeList(BaseModel):
    items: list[NodeDetails]
