"""Cluster-wide systemd services: one unit kept running (or stopped) on chosen nodes.

This is the older Blixard's workload (``service_manager start nginx``): the
unit must already be installed on the hosts (by NixOS, a package), Blixard
only starts, stops and restarts it. A Service is realised by the VM machinery
(placement, failover, fencing, restarts and status come from there): the
service controller keeps, for each Service, VMs of the ``systemd``
hypervisor labelled ``blixard.io/service=<name>`` (:func:`desired_vms`).

Three ways to say where the unit runs (``docs/services.md``):

* ``nodes: [n1, n2]`` (pinned): one VM per node, restricted to that node,
  never failed over (fencing ``none``: pinning forbids other nodes);
* ``nodes: all``: one VM per node of the cluster, kept up to date as nodes
  join and leave (a DaemonSet);
* no ``nodes`` (placed): one VM of ``replicas`` replicas placed by the
  scheduler under ``placement``, with fencing ``stop``, so a dead node's
  replica comes back on another node. Replicas never share a node (one unit
  per host).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BeforeValidator, Field, model_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import bridge, refuse
from blixard.domain.keys import Kind
from blixard.domain.meta import ObjectMeta, SpecModel, StatusModel, StoredObject
from blixard.domain.names import is_dns_label, validate_dns_label, validate_unit_name
from blixard.domain.placement import MAX_GROUPS, NODE_NAME_KEY, Placement
from blixard.domain.vm import (
    MAX_REPLICAS,
    MAX_VM_NAME,
    VM,
    BootSource,
    Fencing,
    Hypervisor,
    RestartMode,
    RestartPolicy,
    VMSpec,
)

MAX_SERVICE_NODES = 1000
#: Label on every VM a service owns: its value is the service's name.
SERVICE_LABEL = "blixard.io/service"
#: Label on a pinned (or all-nodes) service VM: the node it is pinned to.
SERVICE_NODE_LABEL = "blixard.io/service-node"
#: What a service's VMs reserve on their node (the unit's resources are the host's
#: business, so the controllers count none for the systemd hypervisor; see plan.py).
SERVICE_VM_MEMORY_MIB = 16
#: Restart backoff of a failed unit: short, as systemd's own RestartSec is.
SERVICE_BACKOFF_MAX_S = 30.0


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
    """Which unit, in which state, on which nodes (or placed: no ``nodes``)."""

    unit: UnitName
    state: ServiceState = ServiceState.RUNNING
    #: Pinned nodes, ``"all"``, or None: placed by the scheduler.
    nodes: ServiceNodes | None = None
    #: How many nodes run the unit when placed (never two on one node).
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS, strict=True)
    #: Where a placed service may and should run (as a VM's placement).
    placement: Placement = Field(default_factory=Placement)
    #: Bumped by ``service restart``; copied to the VMs' restart_generation.
    restart_generation: int = Field(default=0, ge=0, strict=True)

    @model_validator(mode="after")
    def _placement_only_when_placed(self) -> ServiceSpec:
        if len(self.placement.anti_affinity_groups) >= MAX_GROUPS:
            raise refuse(
                f"at most {MAX_GROUPS - 1} anti-affinity groups for a service (its VM adds "
                "one of its own, so its replicas never share a node)",
                subfield="placement.anti_affinity_groups",
            )
        if self.nodes is not None:
            if self.replicas != 1:
                raise refuse(
                    "only a placed service (without nodes) has replicas; pinned and "
                    "all-nodes services run once per node",
                    subfield="replicas",
                )
            if self.placement != Placement():
                raise refuse(
                    "placement rules apply to a placed service (without nodes); "
                    "nodes already say where it runs",
                    subfield="placement",
                )
        return self

    @property
    def mode(self) -> Literal["pinned", "all", "placed"]:
        if self.nodes is None:
            return "placed"
        return "all" if self.nodes == "all" else "pinned"


class ServiceNodeStatus(StatusModel):
    """The unit on one node, in systemd's words (``systemctl show``'s ActiveState/SubState).

    Computed from the instance of the service's VM there and what the node's
    agent reported of it (the driver's unit state is in ``message``).
    """

    active_state: str = ""
    sub_state: str = ""
    message: str = ""
    #: The instance that runs the unit there, its epoch and the restarts it applied.
    instance: str = ""
    epoch: int = 0
    restart_generation: int = 0
    node_alive: bool = True
    updated_at: AwareDatetime | None = None


class ServicePhase(StrEnum):
    """The service as a whole."""

    PENDING = "pending"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class ServiceStatus(StatusModel):
    """Per-node reports, keyed by node id, and a summary (computed when read)."""

    phase: ServicePhase = ServicePhase.PENDING
    message: str = ""
    nodes: dict[str, ServiceNodeStatus] = Field(default_factory=dict)
    #: Replicas (placed) or pinned nodes that have no node running them yet.
    unplaced: list[str] = Field(default_factory=list)
    #: True once every VM of the service carries its current spec (the controller
    #: caught up): until then the live state may describe the previous wish.
    synced: bool = False
    observed_generation: int = 0


class Service(StoredObject):
    """Stored under ``/blixard/v1/services/<name>``."""

    STORE_KIND = Kind.SERVICES

    kind: Literal["Service"] = "Service"
    spec: ServiceSpec
    status: ServiceStatus = Field(default_factory=ServiceStatus)


# ------------------------------------------------------------------ names


def service_identity(text: Any, field: str) -> tuple[str, str]:
    """``(service name, unit)`` for the older commands' argument (``nginx``, ``nginx.service``).

    The unit is checked by the domain's rule (no shell metacharacters, paths,
    ``..``, spaces) and gets ``.service`` when it has no type; the service is
    named after the unit without ``.service``, which must then be a DNS label
    like every object name (``getty@tty1`` cannot be: name it yourself and give
    the unit apart).
    """
    unit = validate_unit_name(text, field)
    name = unit.removesuffix(".service")
    if not is_dns_label(name):
        raise ValidationError(
            field,
            f"the unit {unit!r} cannot name a service: a service name is a DNS label "
            "(lowercase letters, digits and '-'); name the service and give the unit "
            f"apart, e.g. `blixard service start my-service --unit {unit}`",
        )
    return name, unit


def _vm_name(base: str) -> str:
    """``base`` if it fits a VM name, else cut short with a hash of the whole."""
    if len(base) <= MAX_VM_NAME:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[: MAX_VM_NAME - 9].rstrip('-')}-{digest}"


def service_vm_name(service: str, node: str | None = None) -> str:
    """The VM of a placed service (``svc-<name>``) or of one pinned node (``svc-<name>-<node>``).

    Names are only for people: the controller finds a service's VMs by their
    labels, and refuses to adopt a VM of that name that another owner made.
    """
    return _vm_name(f"svc-{service}" if node is None else f"svc-{service}-{node}")


def desired_vms(service: Service, cluster_nodes: Iterable[str]) -> list[VM]:
    """The VMs (not yet stored: no uid, generation 0) that realise ``service``.

    ``cluster_nodes`` are the nodes an all-nodes service runs on (the caller
    picks them: the controller passes the registered nodes that offer the
    ``systemd`` hypervisor).
    """
    spec, name = service.spec, service.metadata.name
    restart = RestartPolicy(mode=RestartMode.ALWAYS, backoff_max_s=SERVICE_BACKOFF_MAX_S)
    common: dict[str, Any] = {
        "hypervisor": Hypervisor.SYSTEMD,
        "vcpus": 1,
        "memory_mib": SERVICE_VM_MEMORY_MIB,
        "boot": BootSource(unit=spec.unit),
        "restart": restart,
        "running": spec.state is ServiceState.RUNNING,
        "restart_generation": spec.restart_generation,
    }
    if spec.nodes is None:
        vm_name = service_vm_name(name)
        groups = spec.placement.anti_affinity_groups
        placement = spec.placement.model_copy(
            update={"anti_affinity_groups": groups if vm_name in groups else [*groups, vm_name]}
        )
        vm_spec = VMSpec(
            **common, replicas=spec.replicas, placement=placement, fencing=Fencing.STOP
        )
        return [_vm(vm_name, {SERVICE_LABEL: name}, vm_spec)]
    nodes = sorted(set(cluster_nodes)) if spec.nodes == "all" else spec.nodes
    vms = []
    for node in nodes:
        vm_spec = VMSpec(
            **common,
            replicas=1,
            placement=Placement(node_selector={NODE_NAME_KEY: node}),
            fencing=Fencing.NONE,
        )
        labels = {SERVICE_LABEL: name, SERVICE_NODE_LABEL: node}
        vms.append(_vm(service_vm_name(name, node), labels, vm_spec))
    return vms


def _vm(name: str, labels: dict[str, str], spec: VMSpec) -> VM:
    return VM(metadata=ObjectMeta(name=name, labels=labels), spec=spec)


def owner_of(vm: VM) -> str | None:
    """The service that owns ``vm`` (its label), or None for a user's VM."""
    return vm.metadata.labels.get(SERVICE_LABEL)
