"""Pure placement: a snapshot of nodes and a request in, a decision out. No I/O.

A controller builds the snapshot from the store, calls :func:`place`, and
commits the result with compare-and-swap; a stale decision fails the CAS and
is recomputed. Filters say *why* a node is refused, so a workload that cannot
be placed tells its user what to change.

How a decision is made:

1. **Visit** the nodes: all of them, or, with ``limit``, in a seeded order
   (promising nodes first) until ``limit`` feasible ones were found
   (scheduler/sampling.py).
2. **Filter** each visited node: the first filter that refuses it gives its
   rejection (scheduler/filters.py).
3. **Weigh** the feasible nodes with the request's strategy
   (scheduler/strategies.py, scheduler/weighers.py): the highest normalised
   score wins, ties go to the smallest node name.
4. **Explain**: the reason names the strategy, the top two scores and how many
   nodes were eligible, or groups the refusals (scheduler/reasons.py).

The other modules hold the parts; this one keeps the entry point and
re-exports the interface types so that callers import from one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from blixard.domain.node import Resources
from blixard.scheduler import reasons
from blixard.scheduler.compiled import RequestFacts, request_facts
from blixard.scheduler.filters import FactFilter, filters_for, screen
from blixard.scheduler.interface import (
    Decision,
    Filter,
    NodeFacts,
    NodeView,
    Request,
    Weigher,
    facts_of,
)
from blixard.scheduler.sampling import VisitOrder, candidates, default_limit, seed_for
from blixard.scheduler.strategies import plan_for

__all__ = [
    "Decision",
    "Filter",
    "NodeView",
    "Request",
    "Weigher",
    "allocated_by",
    "default_limit",
    "place",
    "seed_for",
]

#: Scores are compared in units of 1/_SCALE.
_SCALE = 1_000_000_000
#: The smallest share of feasible nodes assumed when sizing the next batch of a sample.
_MIN_SHARE = 0.05


def place(
    nodes: Sequence[NodeView],
    request: Request,
    *,
    limit: int | None = None,
    seed: int = 0,
) -> Decision:
    """The best node for ``request``, or None with the reason each visited node refused.

    ``limit``: stop after this many feasible nodes (see :func:`default_limit`);
    None scores every feasible node. ``seed`` picks the visiting order when
    ``limit`` is smaller than the snapshot (see :func:`seed_for`). The same
    snapshot (in the same order), request, limit and seed always give the
    same decision.

    A view reads its node's facts the first time it is placed against and
    keeps them, so a caller placing many instances should build the views
    once per pass and, after each placement, replace only the chosen node's
    view (``dataclasses.replace(view, allocated=...)``): rebuilding every view
    for every placement makes each placement read the models again.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    total = len(nodes)
    rf = request_facts(request)
    filters = filters_for(request)
    rejections: dict[str, str] = {}
    sampled = limit is not None and limit < total
    if limit is None or limit >= total:
        feasible = screen(facts_of(nodes), rf, filters, rejections)
        visited = total
    else:
        feasible, visited = _sample(
            candidates(nodes, request, seed), total, limit, rf, filters, rejections
        )
    if not feasible:
        return Decision(None, reasons.refused(rejections, total), rejections)

    plan = plan_for(request)
    weighers = plan.weighers
    weigher, factor = weighers[0]
    totals = weigher.scores(feasible, rf)
    if len(weighers) > 1:
        totals = [factor * t for t in totals]
        for weigher, factor in weighers[1:]:
            totals = [
                t + factor * x for t, x in zip(totals, weigher.scores(feasible, rf), strict=True)
            ]
    # Scores are compared as integers in units of 1e-9: float noise in a sum of
    # factors never decides between two equally good nodes (ties go by name).
    scale = _SCALE / plan.total
    best = runner_up = -1
    best_name = ""
    for nf, t in zip(feasible, totals, strict=True):
        score = int(t * scale + 0.5)
        if score > best or (score == best and nf.name < best_name):
            best, runner_up, best_name = score, best, nf.name
        elif score > runner_up:
            runner_up = score
    reason = reasons.placed(
        best_name,
        plan.name,
        best / _SCALE,
        runner_up / _SCALE if len(feasible) > 1 else None,
        len(feasible),
        visited,
        total,
        limit if sampled else None,
    )
    return Decision(best_name, reason, rejections)


def _sample(
    order: VisitOrder,
    total: int,
    limit: int,
    rf: RequestFacts,
    filters: tuple[FactFilter, ...],
    rejections: dict[str, str],
) -> tuple[list[NodeFacts], int]:
    """The first ``limit`` feasible nodes of ``order``, and how many nodes were visited.

    Nodes are screened in batches sized from the share of feasible nodes seen
    so far (about 25% more than should be needed), so a few nodes past the
    ``limit``-th feasible one may be visited, and their refusals recorded;
    only the first ``limit`` feasible ones are scored.
    """
    feasible: list[NodeFacts] = []
    visited = 0
    while len(feasible) < limit and not order.exhausted:
        need = limit - len(feasible)
        share = max(len(feasible) / visited, _MIN_SHARE) if visited else 1.0
        size = max(1, min(total - visited, math.ceil(need / share * 1.25) + 2))
        batch = facts_of(order.take(size))
        visited += len(batch)
        feasible += screen(batch, rf, filters, rejections)
    return feasible[:limit], visited


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
