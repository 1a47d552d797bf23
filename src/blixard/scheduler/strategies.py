"""Strategies: which weighers rank the feasible nodes of a request, and with which factors.

Factor table (a node's score is ``sum(factor * weigh) / sum(factor)``, so it
stays within 0..1 and can be shown to users):

================================  =================================================
``placement.strategy``            weighers and factors
================================  =================================================
``best-fit``                      best fit 1.0
``spread``                        spread 1.0
``data-locality``                 data locality 1.0
``network-proximity``             network proximity 1.0
``specialization``                specialization 1.0
empty, for a VM                   best fit 1.0 (as ``best-fit``)
empty, for a function             spread 0.3, data locality 0.3, network
                                  proximity 0.2, specialization 0.2
                                  (DESIGN.md's serverless mix)
================================  =================================================

* A list of several strategies combines their sets with equal weight: each
  set's factors are divided by the number of strategies (``[best-fit,
  data-locality]`` is best fit 0.5 + data locality 0.5).
* Soft preferences the request expresses are added to any strategy, each with
  factor :data:`PREFERENCE_FACTOR` (0.5) unless the strategy already weighs
  it: ``preferred_labels`` (preferred labels), ``affinity_groups``
  (affinity), ``data_hint`` (data locality) and ``near_zone`` (network
  proximity). 0.5 against the strategy's 1.0 means a preferred node wins
  unless another node is better by more than half the strategy's range.
* Weighers that would score every node the same (a data-locality weigher
  without a hint, a network weigher without a zone) are left out: they do
  not change the ranking and would cost a pass over the nodes. A strategy
  left with nothing to weigh (``network-proximity`` without a zone) falls
  back to best fit, so nodes are not ranked by name alone.

The serverless mix weighs resources with *spread* (the node with the most
room), not best fit: function workers are short-lived and bursty, so an
emptier node means less contention and a faster cold start, while packing
matters for the long-lived VMs that best fit serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from blixard.domain.placement import PlacementStrategy
from blixard.scheduler.interface import Request, Workload
from blixard.scheduler.weighers import (
    AFFINITY,
    BEST_FIT,
    DATA_LOCALITY,
    NETWORK_PROXIMITY,
    PREFERRED_LABELS,
    SPECIALIZATION,
    SPREAD,
    FactWeigher,
)

Weighted = tuple[tuple[FactWeigher, float], ...]

STRATEGY_SETS: dict[PlacementStrategy, Weighted] = {
    PlacementStrategy.BEST_FIT: ((BEST_FIT, 1.0),),
    PlacementStrategy.SPREAD: ((SPREAD, 1.0),),
    PlacementStrategy.DATA_LOCALITY: ((DATA_LOCALITY, 1.0),),
    PlacementStrategy.NETWORK_PROXIMITY: ((NETWORK_PROXIMITY, 1.0),),
    PlacementStrategy.SPECIALIZATION: ((SPECIALIZATION, 1.0),),
}
SERVERLESS_MIX: Weighted = (
    (SPREAD, 0.3),
    (DATA_LOCALITY, 0.3),
    (NETWORK_PROXIMITY, 0.2),
    (SPECIALIZATION, 0.2),
)
#: What an empty ``placement.strategy`` means, per kind of workload: (name, weighers).
DEFAULTS: dict[Workload, tuple[str, Weighted]] = {
    "vm": ("best-fit", STRATEGY_SETS[PlacementStrategy.BEST_FIT]),
    "function": ("serverless mix", SERVERLESS_MIX),
}
PREFERENCE_FACTOR = 0.5


@dataclass(frozen=True, slots=True)
class Plan:
    """The weighers of one request with their factors, and how to name them to users."""

    name: str
    weighers: Weighted
    #: Sum of the factors: dividing by it keeps a score within 0..1.
    total: float


def plan_for(request: Request) -> Plan:
    """The weighers that rank nodes for ``request`` (see the module's factor table)."""
    p = request.placement
    return _plan(
        tuple(p.strategy),
        request.workload,
        bool(p.preferred_labels),
        bool(p.affinity_groups),
        p.data_hint is not None,
        request.near_zone is not None,
    )


@lru_cache(maxsize=256)
def _plan(
    strategy: tuple[PlacementStrategy, ...],
    workload: Workload,
    preferred: bool,
    affinity: bool,
    data: bool,
    zone: bool,
) -> Plan:
    factors: dict[FactWeigher, float] = {}
    if strategy:
        name = "+".join(s.value for s in strategy)
        for s in strategy:
            for weigher, factor in STRATEGY_SETS[s]:
                factors[weigher] = factors.get(weigher, 0.0) + factor / len(strategy)
    else:
        name, chosen = DEFAULTS[workload]
        for weigher, factor in chosen:
            factors[weigher] = factors.get(weigher, 0.0) + factor
    extras = []
    for wanted, weigher, label in (
        (preferred, PREFERRED_LABELS, "preferred labels"),
        (affinity, AFFINITY, "affinity"),
        (data, DATA_LOCALITY, "data locality"),
        (zone, NETWORK_PROXIMITY, "zone"),
    ):
        if wanted and weigher not in factors:
            factors[weigher] = PREFERENCE_FACTOR
            extras.append(label)
    # Neutral for every node when the request gives nothing to be local or near to.
    if not data:
        factors.pop(DATA_LOCALITY, None)
    if not zone:
        factors.pop(NETWORK_PROXIMITY, None)
    if extras:
        name += " + " + ", ".join(extras)
    if not factors:
        # e.g. strategy network-proximity without a zone: rank by best fit, not by name.
        factors[BEST_FIT] = 1.0
        name += " (nothing to weigh: best-fit)"
    weighted = tuple(factors.items())
    return Plan(name, weighted, sum(f for _, f in weighted))
