"""Scoring a sample of the nodes instead of all of them (Nomad's "limit"), deterministically.

Filtering and weighing all 1,000 nodes of a large cluster for every instance
costs milliseconds in Python; the cluster's goal (3,750 placements committed
per second) leaves the scheduler a small fraction of 0.27 ms. So, as Nomad
does, the scheduler may stop once it has found ``limit`` feasible nodes, and
pick the best of those.

**Which nodes.** The visiting order is a pseudo-random permutation of the
snapshot determined by ``seed``: a start and a stride coprime with the number
of nodes, both drawn from the seed by SplitMix64, visiting index
``(start + i * stride) % n``. It costs O(1) to set up and O(1) per node
visited, where on the reference machine ``random.Random(seed).shuffle``
costs 0.55-0.65 ms for 1,000 nodes (twice the whole budget) and merely
seeding ``random.Random`` 9 us. Same snapshot (in the same order), request and seed:
same order, same decision. Callers should vary the seed per instance
(:func:`seed_for`), so that concurrent placements look at different samples
instead of all piling onto the same few nodes.

**How many.** :func:`default_limit` is ``2 * max(2, ceil(log2 n))``: 20 at
1,000 nodes, 14 at 100. The chosen node is the best of k random feasible
nodes, so it is among the best q of all feasible nodes with probability
``1 - (1 - q)**k``: with Nomad's plain ``log2 n`` (k = 10) that is 65% for the
top 10% and 40% for the top 5%; with k = 20 it is 88% and 64%, for twice
the cost, which still is a small part of the budget (docs/benchmarks.md,
"Scheduler"). Requests that weigh spread get twice as many again (k = 40:
98.5% for the top 10%) because spreading is about the whole cluster's
balance, which a small sample judges poorly. Anti-affinity needs no larger
limit: it is a filter, refused nodes do not count, and the visit goes on
until ``limit`` feasible nodes were found (or every node was visited: a
sample never fails where a full scan would succeed). Nodes are screened in
batches sized from the share of feasible nodes seen so far, so a few nodes
past the ``limit``-th feasible one may be visited; only ``limit`` are scored.

**Promising nodes first.** A random sample of 20 out of 1,000 nodes almost
never contains the one node that holds the request's data, or the two that
already run its affinity group. So when a request names such a target
(``data_hint``, ``affinity_groups``, ``preferred_labels``), :func:`candidates`
first visits the nodes that match one (in the seeded order), then the rest.
This costs one pass over the snapshot, paid only by requests that name a
target. ``near_zone`` gets no such pass: a zone holds a large share of the
nodes, so a sample of 20 or more all but surely contains some of them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

from blixard.domain.placement import PlacementStrategy
from blixard.scheduler.compiled import request_facts
from blixard.scheduler.interface import NodeView, Request, labels_of

#: Multiplier of Nomad's ``max(2, ceil(log2 n))`` (see the module docstring).
LIMIT_FACTOR = 2
#: Further multiplier for requests that weigh spread.
SPREAD_LIMIT_FACTOR = 2


def default_limit(n_nodes: int, request: Request | None = None) -> int:
    """How many feasible nodes to score: ``2 * max(2, ceil(log2 n))``, doubled for spread."""
    base = max(2, math.ceil(math.log2(n_nodes))) if n_nodes > 1 else 2
    limit = LIMIT_FACTOR * base
    if request is not None and _weighs_spread(request):
        limit *= SPREAD_LIMIT_FACTOR
    return limit


def _weighs_spread(request: Request) -> bool:
    strategy = request.placement.strategy
    if strategy:
        return PlacementStrategy.SPREAD in strategy
    return request.workload == "function"  # the serverless mix weighs resources by spread


def seed_for(*parts: str) -> int:
    """A stable seed from names (e.g. instance name and epoch); ``hash()`` varies per process."""
    return zlib.crc32("\x00".join(parts).encode())


_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser: spreads the bits of a seed over 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def start_stride(n: int, seed: int) -> tuple[int, int]:
    """The start and the stride (coprime with ``n``) of the order that ``seed`` picks."""
    mixed = _mix(seed & _MASK64)
    if n <= 2:
        return (mixed % n if n else 0), 1
    stride = 1 + (mixed >> 32) % (n - 1)
    while math.gcd(stride, n) != 1:
        stride = stride % (n - 1) + 1  # the next candidate; 1 always qualifies
    return mixed % n, stride


def visit_order(n: int, seed: int) -> list[int]:
    """The indices ``0..n-1`` in the pseudo-random order determined by ``seed``."""
    start, stride = start_stride(n, seed)
    return [(start + i * stride) % n for i in range(n)]


class VisitOrder:
    """The nodes of a snapshot in the seeded order, promising ones first, handed out in batches.

    Batches (:meth:`take`) rather than an iterator: computing a batch of
    indices in one list comprehension costs a fraction of a generator step
    per node.
    """

    __slots__ = ("_first", "_left", "_n", "_nodes", "_pos", "_skip", "_start", "_stride")

    def __init__(self, nodes: Sequence[NodeView], seed: int, promoted: set[int]) -> None:
        self._nodes = nodes
        self._n = len(nodes)
        self._start, self._stride = start_stride(self._n, seed)
        self._pos = 0
        self._left = self._n
        first: list[int] = []
        if promoted:
            inverse = pow(self._stride, -1, self._n)
            start, n = self._start, self._n
            first = sorted(promoted, key=lambda i: ((i - start) * inverse) % n)
        self._first = [nodes[i] for i in first]
        self._skip = frozenset(promoted)

    @property
    def exhausted(self) -> bool:
        """True once every node was handed out (the last positions may be promoted ones)."""
        return self._left == 0

    def take(self, k: int) -> list[NodeView]:
        """Up to ``k`` more nodes (fewer only near the end, or when skipping promoted ones)."""
        out: list[NodeView] = []
        if self._first:
            out = self._first[:k]
            self._first = self._first[k:]
            k -= len(out)
        if k > 0 and self._pos < self._n:
            n, start, stride, nodes = self._n, self._start, self._stride, self._nodes
            end = min(n, self._pos + k)
            positions = range(self._pos, end)
            self._pos = end
            if self._skip:
                skip = self._skip
                indices = [(start + i * stride) % n for i in positions]
                out += [nodes[i] for i in indices if i not in skip]
            else:
                out += [nodes[(start + i * stride) % n] for i in positions]
        self._left -= len(out)
        return out


def candidates(nodes: Sequence[NodeView], request: Request, seed: int) -> VisitOrder:
    """``nodes`` in the seeded order, the ones matching the request's targets first."""
    rf = request_facts(request)
    data_key, affinity, preferred = rf.data_key, rf.affinity, rf.preferred
    promoted: set[int] = set()
    if data_key is not None or preferred:
        # One comprehension per kind of target: a combined condition per node costs
        # several times more, and this pass reads every node of the snapshot.
        labels = labels_of(nodes)
        if data_key is not None:
            promoted.update([i for i, have in enumerate(labels) if data_key in have])
        for key, value in preferred:
            promoted.update([i for i, have in enumerate(labels) if have.get(key) == value])
    if affinity:
        promoted.update(
            [i for i, v in enumerate(nodes) if v.groups and not affinity.isdisjoint(v.groups)]
        )
    return VisitOrder(nodes, seed, promoted)
