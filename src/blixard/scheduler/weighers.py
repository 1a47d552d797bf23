"""Weighers: soft preferences, each a score from 0 (worst) to 1 (best) for one node.

A weigher whose preference the request does not express returns 0.5 for
every node (neutral: it moves no node ahead of another); strategies leave
such weighers out anyway, so they cost nothing. Scores only rank the nodes
that passed every filter; they never make an infeasible node feasible.
Which weighers a request gets, and with which factors, is decided in
scheduler/strategies.py.

As with the filters, each weigher scores a batch of node facts at once
(:meth:`~FactWeigher.scores`, a list comprehension: no Python call per
node), and :meth:`~FactWeigher.weigh`, DESIGN.md's per-node plugin protocol,
is that batch method applied to one node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from blixard.scheduler.compiled import RequestFacts, request_facts
from blixard.scheduler.interface import NodeFacts, NodeView, Request

NEUTRAL = 0.5


class FactWeigher(ABC):
    """Base of the built-in weighers."""

    def weigh(self, node: NodeView, request: Request) -> float:
        """0..1: how good the node is for the request; multiplied by a factor."""
        return self.scores([node.facts], request_facts(request))[0]

    @abstractmethod
    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        """The score of each node, in order."""
        ...


class BestFitWeigher(FactWeigher):
    """Prefer the node left with the least free memory: packs nodes, keeps big holes.

    Score: ``1 - (free memory after placing) / memory capacity``. Filling the
    fullest node that still fits leaves whole nodes free for large VMs.
    """

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        want = request.memory_mib
        # No max(): a builtin call per node costs more than the arithmetic. A node with
        # free memory left over has capacity > 0, so the division is safe.
        return [
            1.0 - (n.free_memory_mib - want) / n.cap_memory_mib if n.free_memory_mib > want else 1.0
            for n in nodes
        ]


class SpreadWeigher(FactWeigher):
    """Prefer the emptiest node: the least allocated fraction (mean of vcpus and memory).

    Spreading keeps load even and limits what one node failure takes down;
    it is the opposite of best fit, and the two are not meant to be combined.
    A node without capacity scores 0. The score depends on the node alone, so
    it is computed once per view (``NodeFacts.emptiness``).
    """

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        return [n.emptiness for n in nodes]


class DataLocalityWeigher(FactWeigher):
    """1 when the node holds the request's ``data_hint``, else 0; 0.5 for all without a hint.

    A node holds the data when it carries the label key ``data_label(hint)``
    (``data.blixard.io/`` + the hint with every character other than letters,
    digits, ``-``, ``_`` and ``.`` replaced by ``.``; see scheduler/labels.py).
    """

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        key = request.data_key
        if key is None:
            return [NEUTRAL] * len(nodes)
        return [1.0 if key in n.labels else 0.0 for n in nodes]


class NetworkProximityWeigher(FactWeigher):
    """1 when the node is in the request's ``near_zone``, else 0; 0.5 without a zone to be near."""

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        zone = request.near_zone
        if zone is None:
            return [NEUTRAL] * len(nodes)
        return [1.0 if n.zone == zone else 0.0 for n in nodes]


class SpecializationWeigher(FactWeigher):
    """Put requests for special hardware on it, and keep everyone else off it.

    With W the special-hardware labels the request asks for (node_selector,
    preferred_labels or ``=`` constraints naming a pair of
    :data:`~blixard.scheduler.labels.SPECIAL_HARDWARE`) and S those the node
    has: ``0.5 + 0.5 * |S & W| / |W| - 0.5 * |S - W| / |S|`` (each term 0 when
    its set is empty). A plain node scores 0.5; a GPU node scores 1 for a GPU
    request and 0 for a request that needs no GPU; a GPU+high-memory node
    scores 0.75 for a GPU request, so a GPU-only node is used first.
    """

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        wants = request.wants_special
        return [_specialization(n.special, wants) if n.special or wants else NEUTRAL for n in nodes]


class PreferredLabelsWeigher(FactWeigher):
    """The fraction of the request's ``preferred_labels`` that the node has (key and value)."""

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        preferred = request.preferred
        if not preferred:
            return [NEUTRAL] * len(nodes)
        share = 1.0 / len(preferred)
        return [share * sum(n.labels.get(k) == v for k, v in preferred) for n in nodes]


class AffinityWeigher(FactWeigher):
    """The fraction of the request's ``affinity_groups`` with a member already on the node."""

    def scores(self, nodes: list[NodeFacts], request: RequestFacts) -> list[float]:
        affinity = request.affinity
        if not affinity:
            return [NEUTRAL] * len(nodes)
        share = 1.0 / len(affinity)
        return [share * len(affinity & n.groups) if n.groups else 0.0 for n in nodes]


def _specialization(has: frozenset[tuple[str, str]], wants: frozenset[tuple[str, str]]) -> float:
    hits = len(has & wants) / len(wants) if wants else 0.0
    waste = len(has - wants) / len(has) if has else 0.0
    return NEUTRAL + 0.5 * hits - 0.5 * waste


BEST_FIT = BestFitWeigher()
SPREAD = SpreadWeigher()
DATA_LOCALITY = DataLocalityWeigher()
NETWORK_PROXIMITY = NetworkProximityWeigher()
SPECIALIZATION = SpecializationWeigher()
PREFERRED_LABELS = PreferredLabelsWeigher()
AFFINITY = AffinityWeigher()
