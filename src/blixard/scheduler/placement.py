"""Pure placement: a snapshot of nodes and a request in, a decision out. No I/O.

A controller builds the snapshot from the store, calls :func:`place`, and
commits the result with compare-and-swap; a stale decision fails the CAS and
is recomputed. Filters say *why* a node is refused, so a VM that cannot be
placed tells its user what to change.

Today: the filters every placement needs (alive, not cordoned, offers the
hypervisor, has the free capacity) and a best-fit weigher. The cluster issue
adds labels and constraints, (anti-)affinity, spread and the other weighers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from blixard.domain.node import Node, Resources
from blixard.domain.vm import Hypervisor


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it: its record, liveness and what is allocated."""

    node: Node
    alive: bool
    allocated: Resources

    @property
    def name(self) -> str:
        return self.node.metadata.name

    def free(self) -> Resources:
        cap = self.node.status.capacity
        return Resources(
            vcpus=max(0, cap.vcpus - self.allocated.vcpus),
            memory_mib=max(0, cap.memory_mib - self.allocated.memory_mib),
            disk_mib=max(0, cap.disk_mib - self.allocated.disk_mib),
        )


@dataclass(frozen=True, slots=True)
class Request:
    """What one instance needs."""

    resources: Resources
    hypervisor: Hypervisor


@dataclass(frozen=True, slots=True)
class Decision:
    node: str | None
    #: Why this node, or why none: shown to the user in `vm status`.
    reason: str
    rejections: dict[str, str] = field(default_factory=dict)


class Filter(Protocol):
    def check(self, node: NodeView, request: Request) -> str | None:
        """None if the node can take the request, else why not."""
        ...


class Weigher(Protocol):
    def weigh(self, node: NodeView, request: Request) -> float:
        """0..1: how good the node is for the request."""
        ...


class AliveFilter:
    def check(self, node: NodeView, request: Request) -> str | None:
        return None if node.alive else "node is down (its liveness lease expired)"


class CordonFilter:
    def check(self, node: NodeView, request: Request) -> str | None:
        return "node is cordoned" if node.node.spec.cordoned else None


class HypervisorFilter:
    def check(self, node: NodeView, request: Request) -> str | None:
        offered = node.node.status.hypervisors
        if request.hypervisor in offered:
            return None
        have = ", ".join(h.value for h in offered) or "none"
        return f"does not offer hypervisor {request.hypervisor.value} (offers {have})"


class CapacityFilter:
    def check(self, node: NodeView, request: Request) -> str | None:
        free, want = node.free(), request.resources
        short = []
        if want.vcpus > free.vcpus:
            short.append(f"vcpus {want.vcpus} > {free.vcpus} free")
        if want.memory_mib > free.memory_mib:
            short.append(f"memory {want.memory_mib}MiB > {free.memory_mib}MiB free")
        if want.disk_mib > free.disk_mib:
            short.append(f"disk {want.disk_mib}MiB > {free.disk_mib}MiB free")
        return "not enough capacity: " + ", ".join(short) if short else None


class BestFitWeigher:
    """Prefer the node left with the least free memory: packs nodes, keeps big holes."""

    def weigh(self, node: NodeView, request: Request) -> float:
        cap = max(node.node.status.capacity.memory_mib, 1)
        left = node.free().memory_mib - request.resources.memory_mib
        return 1.0 - max(0, left) / cap


DEFAULT_FILTERS: tuple[Filter, ...] = (
    AliveFilter(),
    CordonFilter(),
    HypervisorFilter(),
    CapacityFilter(),
)
DEFAULT_WEIGHERS: tuple[tuple[Weigher, float], ...] = ((BestFitWeigher(), 1.0),)


def place(
    nodes: Sequence[NodeView],
    request: Request,
    *,
    filters: Sequence[Filter] = DEFAULT_FILTERS,
    weighers: Sequence[tuple[Weigher, float]] = DEFAULT_WEIGHERS,
) -> Decision:
    """The best node for ``request``, or None with every node's reason for refusing."""
    rejections: dict[str, str] = {}
    candidates: list[NodeView] = []
    for view in nodes:
        for f in filters:
            why = f.check(view, request)
            if why is not None:
                rejections[view.name] = why
                break
        else:
            candidates.append(view)
    if not candidates:
        if not nodes:
            return Decision(None, "no nodes are registered", rejections)
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(rejections.items()))
        return Decision(None, f"no node can run it: {detail}", rejections)
    scored = sorted(
        candidates,
        key=lambda v: (-sum(w.weigh(v, request) * factor for w, factor in weighers), v.name),
    )
    best = scored[0]
    free = best.free()
    reason = (
        f"placed on {best.name} (best fit of {len(candidates)} eligible node(s); "
        f"{free.vcpus} vcpus and {free.memory_mib}MiB free before this instance)"
    )
    return Decision(best.name, reason, rejections)


def allocated_by(node: str, instances: Sequence[tuple[str | None, Resources]]) -> Resources:
    """Sum of the resources of the instances assigned to ``node``."""
    total = Resources()
    for assigned, res in instances:
        if assigned == node:
            total = Resources(
                vcpus=total.vcpus + res.vcpus,
                memory_mib=total.memory_mib + res.memory_mib,
                disk_mib=total.disk_mib + res.disk_mib,
            )
    return total
