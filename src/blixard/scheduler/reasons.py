"""The text of ``Decision.reason``: why a node was chosen, or why none could be.

Users read it in ``vm status``, so it must stay short for 1,000 nodes. A
failure groups the refusals by reason and shows a count and a few node names
per group; refusals that differ only in numbers (free memory, capacity) are
one group, shown with the figures of the node that has the largest ones (for
capacity, the most free: what the request would have to shrink to).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: At most this many groups are listed; the rest are counted.
MAX_GROUPS = 6
#: At most this many node names are listed per group.
MAX_NAMES = 3

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def nodes_text(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def placed(
    node: str,
    strategy: str,
    score: float,
    runner_up: float | None,
    eligible: int,
    visited: int,
    total: int,
    limit: int | None,
) -> str:
    """Why ``node`` was chosen: the strategy, its score against the next best, the field."""
    if runner_up is None:
        scores = f"score {score:.2f}, the only eligible node"
    else:
        scores = f"score {score:.2f} vs {runner_up:.2f} next"
    if limit is None or visited >= total:
        field = f"{eligible} of {nodes_text(total)} eligible"
    else:
        field = f"{eligible} eligible of {visited} visited, limit {limit} of {nodes_text(total)}"
    return f"placed on {node} (strategy {strategy}; {scores}; {field})"


def refused(rejections: Mapping[str, str], total: int) -> str:
    """Why no node can take the request: refusals grouped by reason, largest group first."""
    if total == 0:
        return "no nodes are registered"
    groups: dict[str, list[str]] = {}
    for name, why in rejections.items():
        groups.setdefault(_NUMBER.sub("#", why), []).append(name)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    parts = [_group_text(names, rejections) for _, names in ordered[:MAX_GROUPS]]
    rest = ordered[MAX_GROUPS:]
    if rest:
        others = sum(len(names) for _, names in rest)
        kinds = "1 other reason" if len(rest) == 1 else f"{len(rest)} other reasons"
        parts.append(f"{kinds} on {nodes_text(others)}")
    return f"no node can run it ({nodes_text(total)}): " + "; ".join(parts)


def _group_text(names: list[str], rejections: Mapping[str, str]) -> str:
    names = sorted(names)
    first = rejections[names[0]]
    shown = ", ".join(names[:MAX_NAMES])
    if len(names) > MAX_NAMES:
        shown += f", +{len(names) - MAX_NAMES} more"
    if all(rejections[n] == first for n in names):
        return f"{nodes_text(len(names))}: {first} [{shown}]"
    # The same refusal with different figures: show the node with the largest ones,
    # which for capacity is the most free, the one closest to fitting.
    top = min(names, key=lambda n: ([-float(x) for x in _NUMBER.findall(rejections[n])], n))
    return (
        f"{nodes_text(len(names))}: {rejections[top]} (figures of {top}, the largest "
        f"of the group) [{shown}]"
    )
