"""Nodes: the hosts of the cluster.

The spec is what an operator decides (roles, zone, cordon, addresses); the
status is what the node's agent measured (capacity, hypervisors, KVM) and
what the controllers allocated on it. Units are in the field names
(``memory_mib``, ``disk_mib``) so nobody has to guess.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AwareDatetime, BeforeValidator, Field, field_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import HostMiB, LabelValue, bridge, refuse
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.names import validate_dns_subdomain
from blixard.domain.vm import Hypervisor


class NodeRole(StrEnum):
    """What a node's daemon takes part in."""

    SERVER = "server"  # API server; may run the leader-elected controllers
    AGENT = "agent"  # runs workloads
    ETCD = "etcd"  # supervises a local etcd member


class KvmState(StrEnum):
    """Whether hardware virtualisation works here.

    ``unusable`` means ``/dev/kvm`` exists but a probe guest did not boot with
    it (e.g. nested PVM hosts), so drivers must fall back to TCG.
    """

    AVAILABLE = "available"
    UNUSABLE = "unusable"
    ABSENT = "absent"


def validate_address(value: Any, field: str) -> str:
    """An IP address or a DNS host name (no port, no scheme)."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {value!r}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if value.rpartition(".")[2].isdigit():
        # A numeric last label ("10.0.0.256") is a mistyped IPv4 address, not a host name.
        raise ValidationError(field, f"must be an IP address or a DNS host name, got {value!r}")
    try:
        return validate_dns_subdomain(value, field)
    except ValidationError:
        raise ValidationError(
            field, f"must be an IP address or a DNS host name, got {value!r}"
        ) from None


def validate_api_url(value: Any, field: str) -> str:
    """The node's API base URL, ``http(s)://host:port``."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValidationError(field, f"must be an http(s) URL, got {value!r}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationError(
            field, f"must be an http:// or https:// URL with a host, got {value!r}"
        )
    if port == 0 or parts.query or parts.fragment or parts.username:
        raise ValidationError(
            field, f"must be scheme://host[:port][/path] with a port above 0, got {value!r}"
        )
    return value


Address = Annotated[str, BeforeValidator(bridge(validate_address))]
ApiUrl = Annotated[str, BeforeValidator(bridge(validate_api_url))]


class Resources(SpecModel):
    """An amount of host resources: capacity, allocation or a request."""

    vcpus: int = Field(default=0, ge=0, le=1_000_000, strict=True)
    memory_mib: HostMiB = 0
    disk_mib: HostMiB = 0

    def fits(self, other: Resources) -> bool:
        """True when ``other`` is no larger than this in every dimension."""
        return (
            other.vcpus <= self.vcpus
            and other.memory_mib <= self.memory_mib
            and other.disk_mib <= self.disk_mib
        )


class NodeSpec(SpecModel):
    """What operators decide about a node."""

    roles: list[NodeRole] = Field(default_factory=lambda: [NodeRole.AGENT])
    zone: LabelValue | None = None
    cordoned: bool = False
    #: Set by `cluster drain` (with ``cordoned``): the controllers move this node's
    #: instances elsewhere, each stopped here before it starts on its new node.
    draining: bool = False
    addresses: list[Address] = Field(default_factory=list, max_length=16)
    api_url: ApiUrl | None = None
    #: Where this node's function gateway serves HTTP triggers (and other gateways
    #: forward invocations to its workers); None while the node runs no gateway.
    gateway_url: ApiUrl | None = None
    #: Function runtimes this node's gateway runs workers of (``nix``, ``command``,
    #: ``microvm``); a worker is placed only on a node with a gateway and its runtime.
    function_runtimes: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("roles")
    @classmethod
    def _roles_unique(cls, roles: list[NodeRole]) -> list[NodeRole]:
        if len(set(roles)) != len(roles):
            raise refuse(f"lists a role more than once: {[r.value for r in roles]}")
        return roles


class NodeStatus(StatusModel):
    """What the node's agent measured and what is allocated on it."""

    ready: bool = False
    capacity: Resources = Field(default_factory=Resources)
    allocated: Resources = Field(default_factory=Resources)
    hypervisors: list[Hypervisor] = Field(default_factory=list)
    kvm: KvmState = KvmState.ABSENT
    #: Why KVM is unusable or absent, as the probe saw it.
    kvm_detail: str = ""
    agent_version: str = ""
    last_heartbeat: AwareDatetime | None = None

    def free(self) -> Resources:
        """Capacity minus allocation, floored at zero."""
        return Resources(
            vcpus=max(0, self.capacity.vcpus - self.allocated.vcpus),
            memory_mib=max(0, self.capacity.memory_mib - self.allocated.memory_mib),
            disk_mib=max(0, self.capacity.disk_mib - self.allocated.disk_mib),
        )


class Node(StoredObject):
    """Stored under ``/blixard/v1/nodes/<id>``; node ids are DNS labels."""

    STORE_KIND = Kind.NODES

    kind: Literal["Node"] = "Node"
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)
