"""Filters: the hard rules. Each says *why* it refuses a node, in words a user can act on.

A node is refused by the first filter that objects, in the order of
:data:`ALL_FILTERS`: the facts that do not depend on the request (down,
cordoned) first, then what the node is (the user's node selector and
constraints, which usually rule out most nodes and so are worth checking
early, then hypervisor and KVM), then who runs there (anti-affinity), and
capacity last, since "not enough memory" is the least useful thing to tell
someone whose workload could never have run on that node anyway.

Every filter has two halves: :meth:`~FactFilter.select`, which keeps the
nodes that pass from a batch of node facts (``place()`` hands it every node
it visits), and :meth:`~FactFilter.why`, which builds the message and runs
only for a refused node. :meth:`~FactFilter.check`, the per-node plugin
protocol of DESIGN.md, is the two applied to a batch of one, so each rule has
a single definition. :func:`filters_for` drops the filters a request cannot
trip, so a plain request passes four filters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import lru_cache

from blixard.domain.node import KvmState
from blixard.domain.placement import NODE_NAME_KEY
from blixard.scheduler.compiled import RequestFacts, request_facts
from blixard.scheduler.constraints import check_constraint, meets, node_value
from blixard.scheduler.interface import NodeFacts, NodeView, Request

_MAX_DETAIL = 80


class FactFilter(ABC):
    """Base of the built-in filters: a batch test on facts, and the words for a refusal."""

    def check(self, node: NodeView, request: Request) -> str | None:
        """None if the node can take the request, else why not (shown to users)."""
        facts, rf = node.facts, request_facts(request)
        return None if self.select([facts], rf) else self.why(facts, rf)

    @abstractmethod
    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        """The nodes that pass, in the order given.

        A list comprehension per filter instead of a call per node: on the
        reference machine a Python call costs about 0.3 us, a comprehension
        step a sixth of that, and ``place()`` runs this for every node visited.
        """
        ...

    @abstractmethod
    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        """Why the node is refused; called only for a node that :meth:`select` dropped."""
        ...


class AliveFilter(FactFilter):
    """Refuse a node whose liveness lease expired: its agent would never start the instance."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        return [n for n in nodes if n.alive]

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        return "node is down (its liveness lease expired)"


class CordonFilter(FactFilter):
    """Refuse cordoned nodes; a draining node is cordoned too, whatever its cordon flag says."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        return [n for n in nodes if not (n.cordoned or n.draining)]

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        return "node is draining (cordoned)" if node.draining else "node is cordoned"


class HypervisorFilter(FactFilter):
    """Refuse a node whose agent did not report the requested hypervisor."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        hypervisor = request.hypervisor
        return [n for n in nodes if hypervisor in n.hypervisors]

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        cause = ("hypervisor", node.hypervisors)
        text = request.notes.get(cause)
        if text is None:
            have = ", ".join(sorted(node.hypervisors)) or "none"
            text = f"does not offer hypervisor {request.hypervisor} (offers {have})"
            request.notes[cause] = text
        return text


class KvmFilter(FactFilter):
    """With ``accel: kvm`` only nodes whose KVM probe guest booted will do."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        if not request.needs_kvm:
            return nodes
        return [n for n in nodes if n.kvm is KvmState.AVAILABLE]

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        detail = node.node.status.kvm_detail.strip()
        detail = detail.splitlines()[0] if detail else ""
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        suffix = f": {detail}" if detail else ""
        return f"needs KVM (accel kvm) but KVM is {node.kvm.value} here{suffix}"


class NodeSelectorFilter(FactFilter):
    """Every ``node_selector`` label must be present on the node with exactly that value."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        for key, want in request.selector:
            if key == NODE_NAME_KEY:  # every node's own name (domain/placement.py)
                nodes = [n for n in nodes if n.name == want]
            else:
                nodes = [n for n in nodes if n.labels.get(key) == want]
        return nodes

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        labels = node.labels
        for key, want in request.selector:
            have = node.name if key == NODE_NAME_KEY else labels.get(key)
            if have != want:
                cause = ("selector", key, have)
                text = request.notes.get(cause)
                if text is None:
                    shown = "absent" if have is None else (f"is {have}" if have else "is empty")
                    text = f"node selector {key}={want} not met (label {key} {shown})"
                    request.notes[cause] = text
                return text
        raise AssertionError("why() called for a node that meets the node selector")


class ConstraintFilter(FactFilter):
    """Every constraint must hold (see scheduler/constraints.py for the semantics)."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        for c in request.constraints:
            nodes = [n for n in nodes if meets(c, n)]
        return nodes

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        for c in request.constraints:
            if not meets(c, node):
                # The text depends only on the constraint and the node's value for its key.
                cause = ("constraint", c.text, node_value(c, node))
                text = request.notes.get(cause)
                if text is None:
                    text = check_constraint(c, node) or ""
                    request.notes[cause] = text
                return text
        raise AssertionError("why() called for a node that meets every constraint")


class AntiAffinityFilter(FactFilter):
    """Refuse a node that already runs a member of one of the request's anti-affinity groups."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        anti = request.anti_affinity
        return [n for n in nodes if anti.isdisjoint(n.groups)] if anti else nodes

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        clash = ", ".join(sorted(request.anti_affinity & node.groups))
        return f"anti-affinity: node already runs a member of group {clash}"


class CapacityFilter(FactFilter):
    """The node's free vcpus, memory and disk (capacity minus allocated) must hold the request."""

    def select(self, nodes: list[NodeFacts], request: RequestFacts) -> list[NodeFacts]:
        cpu, mem, disk = request.vcpus, request.memory_mib, request.disk_mib
        return [
            n
            for n in nodes
            if mem <= n.free_memory_mib and cpu <= n.free_vcpus and disk <= n.free_disk_mib
        ]

    def why(self, node: NodeFacts, request: RequestFacts) -> str:
        short = []
        if request.vcpus > node.free_vcpus:
            short.append(f"vcpus {request.vcpus} > {node.free_vcpus} free")
        if request.memory_mib > node.free_memory_mib:
            short.append(f"memory {request.memory_mib}MiB > {node.free_memory_mib}MiB free")
        if request.disk_mib > node.free_disk_mib:
            short.append(f"disk {request.disk_mib}MiB > {node.free_disk_mib}MiB free")
        return "not enough capacity: " + ", ".join(short)


ALIVE = AliveFilter()
CORDON = CordonFilter()
HYPERVISOR = HypervisorFilter()
KVM = KvmFilter()
NODE_SELECTOR = NodeSelectorFilter()
CONSTRAINTS = ConstraintFilter()
ANTI_AFFINITY = AntiAffinityFilter()
CAPACITY = CapacityFilter()

#: Every filter, in the order a node is checked (the first refusal is the one reported).
ALL_FILTERS: tuple[FactFilter, ...] = (
    ALIVE,
    CORDON,
    NODE_SELECTOR,
    CONSTRAINTS,
    HYPERVISOR,
    KVM,
    ANTI_AFFINITY,
    CAPACITY,
)


def filters_for(request: Request) -> tuple[FactFilter, ...]:
    """The filters that can refuse a node for ``request``, in :data:`ALL_FILTERS` order."""
    p = request.placement
    return _active(
        request.needs_kvm, bool(p.node_selector), bool(p.constraints), bool(p.anti_affinity_groups)
    )


@lru_cache(maxsize=16)
def _active(kvm: bool, selector: bool, constraints: bool, anti: bool) -> tuple[FactFilter, ...]:
    wanted = {id(KVM): kvm, id(NODE_SELECTOR): selector, id(CONSTRAINTS): constraints}
    wanted[id(ANTI_AFFINITY)] = anti
    return tuple(f for f in ALL_FILTERS if wanted.get(id(f), True))


def refusal(node: NodeView, request: Request, filters: tuple[FactFilter, ...]) -> str | None:
    """The first refusal of ``filters`` for ``node``, or None when it may take the request."""
    for f in filters:
        why = f.check(node, request)
        if why is not None:
            return why
    return None


def screen(
    nodes: list[NodeFacts],
    request: RequestFacts,
    filters: tuple[FactFilter, ...],
    rejections: dict[str, str],
) -> list[NodeFacts]:
    """The nodes that pass every filter, in order; the others' refusals go to ``rejections``.

    Each node is refused by the first filter that drops it, as with :func:`refusal`.
    """
    for f in filters:
        kept = f.select(nodes, request)
        if len(kept) != len(nodes):
            # ``kept`` is an ordered subsequence of ``nodes``: walk both to find the dropped.
            why = f.why
            rest = iter(kept)
            following = next(rest, None)
            for n in nodes:
                if n is following:
                    following = next(rest, None)
                else:
                    rejections[n.name] = why(n, request)
        nodes = kept
        if not nodes:
            break
    return nodes
