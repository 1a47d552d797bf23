"""Instances: one replica of a VM, bound to one node at one epoch.

The spec is written by controllers (scheduler, failover), the status by the
agent of the assigned node. ``epoch`` is the fencing token: it grows at every
reassignment, an agent runs an instance only at the epoch it read, and an
agent that sees a newer epoch for an instance it runs destroys its copy. That
is what keeps one VM from ever running on two nodes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, Field, model_validator

from blixard.domain.fields import Name, refuse
from blixard.domain.keys import Kind, instance_name
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.node import Resources
from blixard.domain.vm import MAX_REPLICAS, Fencing


class DesiredState(StrEnum):
    """What the controllers want the instance to be doing."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class ObservedState(StrEnum):
    """What the agent last saw."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    UNKNOWN = "unknown"


class InstanceSpec(SpecModel):
    """Assignment of one replica: ``node`` is None until the scheduler places it."""

    vm: Name
    #: The uid of the VM this replica belongs to: a VM deleted and created again
    #: under the same name does not inherit the old incarnation's replicas.
    vm_uid: UUID | None = None
    index: int = Field(ge=0, lt=MAX_REPLICAS, strict=True)
    node: Name | None = None
    epoch: int = Field(default=0, ge=0, strict=True)
    desired_state: DesiredState = DesiredState.RUNNING
    #: Copied from the VM's restart_generation; the agent restarts the task when
    #: it exceeds the generation it last applied (``status.restart_generation``).
    restart_generation: int = Field(default=0, ge=0, strict=True)
    assigned_at: AwareDatetime | None = None
    #: What the replica holds on its node, copied from its VM at creation, so the
    #: controllers still count it once the VM is deleted and until its task stops.
    resources: Resources | None = None
    #: The VM's fencing policy, for the same reason.
    fencing: Fencing = Fencing.STOP


class InstanceStatus(StatusModel):
    """Reported by the agent of the node that runs (or ran) the replica.

    ``node`` and ``epoch`` say which assignment the report is about, so a late
    report from a fenced node cannot be mistaken for the current one.
    """

    state: ObservedState = ObservedState.PENDING
    node: str | None = None
    epoch: int = 0
    message: str = ""
    restarts: int = 0
    restart_generation: int = 0
    #: Where the task runs on its node, as the driver reports it (pid, sockets, log).
    handle: dict[str, str] = Field(default_factory=dict)
    ready: bool = False
    exit_code: int | None = None
    started_at: AwareDatetime | None = None
    updated_at: AwareDatetime | None = None


class Instance(StoredObject):
    """Stored under ``/blixard/v1/instances/<vm>-<index>``."""

    STORE_KIND = Kind.INSTANCES

    kind: Literal["Instance"] = "Instance"
    spec: InstanceSpec
    status: InstanceStatus = Field(default_factory=InstanceStatus)

    @model_validator(mode="after")
    def _name_matches(self) -> Instance:
        expected = instance_name(self.spec.vm, self.spec.index)
        if self.metadata.name != expected:
            raise refuse(
                f"an instance is named '<vm>-<index>', expected {expected!r}, "
                f"got {self.metadata.name!r}",
                subfield="metadata.name",
            )
        return self
