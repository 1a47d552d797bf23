"""What the scheduler reads and returns: node views, a request, a decision, plugin protocols.

These types are the contract with the controllers that build snapshots from
the store and commit decisions with compare-and-swap. They hold no rules
(every rule lives in a filter or a weigher, where it can be tested alone),
only accessors and the per-view cache of plain facts that keeps a placement
over 1,000 nodes cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from blixard.domain.node import KvmState, Node, Resources
from blixard.domain.placement import Placement
from blixard.domain.vm import Hypervisor
from blixard.scheduler.labels import special_hardware

Workload = Literal["vm", "function"]


@dataclass(slots=True)
class NodeFacts:
    """What the filters and weighers read from one node view, as plain Python values.

    Reading a field of a pydantic model costs about four times a plain
    attribute, and a placement reads a dozen of them per node; a view computes
    these once (:attr:`NodeView.facts`) and every later placement against the
    same view reads them from here. Treat it as read-only; it is not frozen
    only because a frozen dataclass takes three times as long to build.
    """

    name: str
    #: The record itself, for the rare reads that need more (a refusal's details).
    node: Node
    alive: bool
    cordoned: bool
    draining: bool
    #: Hypervisor values (plain strings: hashing a StrEnum member runs Python code).
    hypervisors: frozenset[str]
    kvm: KvmState
    cap_vcpus: int
    cap_memory_mib: int
    cap_disk_mib: int
    used_vcpus: int
    used_memory_mib: int
    free_vcpus: int
    free_memory_mib: int
    free_disk_mib: int
    labels: Mapping[str, str]
    zone: str | None
    groups: frozenset[str]
    #: The special-hardware labels of the node (see scheduler/labels.py).
    special: frozenset[tuple[str, str]]
    #: 1 - the mean allocated fraction of vcpus and memory (0 without capacity): what the
    #: spread weigher prefers; it depends on the node alone, so it is computed once here.
    emptiness: float


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it: its record, liveness and what is allocated.

    ``allocated`` is passed in rather than read from ``node.status`` because the
    controller adds the placements it made earlier in the same pass (which the
    stored status does not show yet); ``groups`` likewise names the affinity
    and anti-affinity groups of the workloads already assigned here.

    A view is a snapshot: it remembers what it read from ``node`` the first
    time it is placed against (:attr:`facts`), so build a new view (e.g. with
    ``dataclasses.replace``) rather than changing its node in place.
    """

    node: Node
    alive: bool
    allocated: Resources
    #: names of the affinity/anti-affinity groups of the workloads already assigned to this node
    groups: frozenset[str] = frozenset()
    _facts: NodeFacts | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.node.metadata.name

    def free(self) -> Resources:
        """Capacity minus ``allocated``, floored at zero."""
        cap = self.node.status.capacity
        return Resources(
            vcpus=max(0, cap.vcpus - self.allocated.vcpus),
            memory_mib=max(0, cap.memory_mib - self.allocated.memory_mib),
            disk_mib=max(0, cap.disk_mib - self.allocated.disk_mib),
        )

    @property
    def facts(self) -> NodeFacts:
        """The view's facts, read from the models on first use and kept."""
        facts = self._facts
        if facts is None:
            facts = self._read_facts()
            object.__setattr__(self, "_facts", facts)  # a cache: frozen for everyone else
        return facts

    def _read_facts(self) -> NodeFacts:
        # Every pydantic field is read once into a local; this runs once per view.
        node, used = self.node, self.allocated
        spec, status, meta = node.spec, node.status, node.metadata
        cap = status.capacity
        labels = meta.labels
        cap_cpu, cap_mem, cap_disk = cap.vcpus, cap.memory_mib, cap.disk_mib
        used_cpu, used_mem, used_disk = used.vcpus, used.memory_mib, used.disk_mib
        return NodeFacts(
            meta.name,
            node,
            self.alive,
            spec.cordoned,
            spec.draining,
            # str() of a StrEnum member is its value, without the enum's slow .value property.
            frozenset(map(str, status.hypervisors)),
            status.kvm,
            cap_cpu,
            cap_mem,
            cap_disk,
            used_cpu,
            used_mem,
            cap_cpu - used_cpu if cap_cpu > used_cpu else 0,
            cap_mem - used_mem if cap_mem > used_mem else 0,
            cap_disk - used_disk if cap_disk > used_disk else 0,
            labels,
            spec.zone,
            self.groups,
            special_hardware(labels) if labels else _NO_SPECIAL,
            _emptiness(cap_cpu, used_cpu, cap_mem, used_mem),
        )


_NO_SPECIAL: frozenset[tuple[str, str]] = frozenset()


def facts_of(views: Iterable[NodeView]) -> list[NodeFacts]:
    """The facts of each view, in order (the cached ones read without a property call)."""
    return [v._facts or v.facts for v in views]


def labels_of(views: Iterable[NodeView]) -> list[Mapping[str, str]]:
    """The node labels of each view, without building the facts of views that have none yet.

    A pass over the whole snapshot (finding the nodes that hold a request's
    data) reads only the labels, which costs a tenth of reading every fact.
    """
    return [v._facts.labels if v._facts is not None else v.node.metadata.labels for v in views]


def _emptiness(cap_cpu: int, used_cpu: int, cap_mem: int, used_mem: int) -> float:
    """1 - the mean allocated fraction of vcpus and memory (each at most 1); 0 without capacity."""
    if cap_cpu > 0 and cap_mem > 0:
        return 1.0 - (min(1.0, used_cpu / cap_cpu) + min(1.0, used_mem / cap_mem)) / 2
    if cap_cpu > 0:
        return 1.0 - min(1.0, used_cpu / cap_cpu)
    if cap_mem > 0:
        return 1.0 - min(1.0, used_mem / cap_mem)
    return 0.0


@dataclass(frozen=True, slots=True)
class Request:
    """What one instance (a VM replica or a function worker) needs and prefers."""

    resources: Resources
    hypervisor: Hypervisor
    placement: Placement = field(default_factory=Placement)
    #: VMSpec.accel == kvm: only nodes whose status.kvm is available.
    needs_kvm: bool = False
    #: Network proximity: prefer nodes in this zone (e.g. the zone of the caller).
    near_zone: str | None = None
    #: Picks the default strategy when ``placement.strategy`` is empty.
    workload: Workload = "vm"


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen node, or None; ``reason`` is shown to users in ``vm status``."""

    node: str | None
    #: Why this node (which strategy, top scores), or why none.
    reason: str
    #: node -> why it was refused, for every node that was looked at.
    rejections: dict[str, str] = field(default_factory=dict)


class Filter(Protocol):
    """A hard rule: a node either may or may not take the request."""

    def check(self, node: NodeView, request: Request) -> str | None:
        """None if the node can take the request, else why not (shown to users)."""
        ...


class Weigher(Protocol):
    """A soft preference: how good a node is for the request, from 0 to 1."""

    def weigh(self, node: NodeView, request: Request) -> float:
        """0..1: how good the node is for the request; multiplied by a factor."""
        ...
