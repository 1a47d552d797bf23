"""Scheduler benchmark: placements per second of ``place()`` beside a raw first-fit loop.

Run from the repository root::

    .venv/bin/python -m benchmarks.scheduler [--rounds N] [--batch N] [--json]

The scheduler is pure, so this measures CPU only: no store, no network.
For clusters of 100 and 1,000 nodes it times, interleaved ABBA over
``--rounds`` rounds of ``--batch`` placements each:

* **raw**: the "raw layer", a bare loop over the same node views that returns
  the first node with enough free memory (no other check, no scoring, no
  reason text);
* **place, no limit**: ``place(nodes, request)``, every node filtered and
  every feasible node weighed;
* **place, limit**: ``place(nodes, request, limit=default_limit(n, request),
  seed=i)`` (20 at 1,000 nodes, 40 for functions, which weigh spread);
* **same, new views**: the same on node views never placed against before, so
  that every node visited reads its facts from the pydantic models during the
  placement (a controller that builds a new snapshot for each placement pays
  this; one that keeps its views between placements pays the row above).

The synthetic cluster (fixed seed) mixes node sizes (16-64 vCPUs, 64-256 GiB),
three zones, 2% down and 1% cordoned nodes, 5% GPU nodes, a few
``data.blixard.io/`` labels, group members and a random fill of 0-95%. The
snapshot does not change between placements (committing is the
controller's job), and requests cycle through 64 prepared ones with
different seeds, so each placement visits a different sample.

Workloads (each its own rows):

* ``vm``: a plain VM (1-4 vCPUs, 512 MiB-8 GiB, qemu): the default strategy
  (best fit), four filters;
* ``vm-hard``: node_selector ``storage=nvme``, constraint ``memory>=128G`` and
  an anti-affinity group: the hard filters at work, more nodes refused;
* ``function``: a function worker (serverless mix) with a ``data_hint`` and a
  ``near_zone``: the promising-first pass and four weighers.

The quality of the limited search is shown as how often it picks the same node
as the full search, and the mean score (by the request's own strategy) of the
node each picks.

Times are the CPU time of this process (``time.process_time``), so that other
processes on a shared machine do not count; the figures are the median of the
rounds, with the best round beside them. The garbage collector is paused while
a batch is timed (after a collection), as ``timeit`` does. Every figure
printed is measured in the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blixard.domain.node import KvmState, Node, Resources
from blixard.domain.placement import Placement
from blixard.domain.vm import Hypervisor
from blixard.scheduler.labels import data_label
from blixard.scheduler.placement import NodeView, Request, default_limit, place
from blixard.scheduler.strategies import plan_for

SIZES = (100, 1000)
WORKLOADS = ("vm", "vm-hard", "function")
GIB_MIB = 1024
HINTS = ("ceph-pool:raw-data", "ceph-pool:models", "s3:logs/2026")
#: The cluster issue's goal: placements committed per second at 1,000 nodes.
GOAL_PER_S = 3750


def build_cluster(n: int, seed: int = 1) -> list[NodeView]:
    """``n`` node views with a realistic mix of sizes, labels, zones, fill and failures."""
    rng = random.Random(seed)
    views = []
    for i in range(n):
        vcpus = rng.choice((16, 32, 64))
        memory = rng.choice((64, 128, 256)) * GIB_MIB
        labels = {"storage": rng.choice(("ssd", "nvme", "hdd"))}
        if rng.random() < 0.05:
            labels["gpu"] = "available"
        if rng.random() < 0.02:
            labels[data_label(rng.choice(HINTS))] = "replica"
        node = Node.model_validate(
            {
                "metadata": {"name": f"node-{i:04d}", "labels": labels},
                "spec": {"zone": f"zone-{i % 3}", "cordoned": rng.random() < 0.01},
                "status": {
                    "ready": True,
                    "capacity": {"vcpus": vcpus, "memory_mib": memory, "disk_mib": 2_000_000},
                    "hypervisors": ["qemu", "process"] if rng.random() < 0.9 else ["firecracker"],
                    "kvm": KvmState.AVAILABLE,
                },
            }
        )
        fill = rng.uniform(0.0, 0.95)
        allocated = Resources(
            vcpus=int(vcpus * fill), memory_mib=int(memory * fill), disk_mib=int(500_000 * fill)
        )
        groups = frozenset({f"g{rng.randrange(40)}"}) if rng.random() < 0.3 else frozenset()
        views.append(NodeView(node, rng.random() >= 0.02, allocated, groups))
    return views


def build_requests(workload: str, count: int = 64, seed: int = 2) -> list[Request]:
    """``count`` varied requests of one workload kind."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        res = Resources(
            vcpus=rng.choice((1, 2, 4)), memory_mib=rng.choice((512, 1024, 2048, 4096, 8192))
        )
        if workload == "vm":
            out.append(Request(res, Hypervisor.QEMU))
        elif workload == "vm-hard":
            placement = Placement.model_validate(
                {
                    "node_selector": {"storage": "nvme"},
                    "constraints": "memory>=128G",
                    "anti_affinity_groups": [f"g{rng.randrange(40)}"],
                }
            )
            out.append(Request(res, Hypervisor.QEMU, placement))
        else:
            placement = Placement.model_validate({"data_hint": rng.choice(HINTS)})
            zone = f"zone-{rng.randrange(3)}"
            out.append(
                Request(res, Hypervisor.QEMU, placement, near_zone=zone, workload="function")
            )
    return out


def raw_first_fit(nodes: Sequence[NodeView], memory_mib: int) -> str | None:
    """The raw layer: the first node with enough free memory, nothing else."""
    for view in nodes:
        if view.node.status.capacity.memory_mib - view.allocated.memory_mib >= memory_mib:
            return view.node.metadata.name
    return None


@dataclass
class Case:
    label: str
    run: Callable[[int], object]
    #: Called (untimed) before each timed batch with its size.
    prepare: Callable[[int], None] | None = None
    #: This case times ``batch // shrink`` placements per round (its preparation is costly).
    shrink: int = 1


def timed_batch(case: Case, batch: int, start: int) -> float:
    """Placements per second over ``batch`` calls."""
    batch = max(1, batch // case.shrink)
    if case.prepare is not None:
        case.prepare(batch)
    # As timeit does: a collection triggered by the preparation's garbage would land
    # in whichever case runs next and say nothing about the scheduler.
    gc.collect()
    gc.disable()
    try:
        t0 = time.process_time()
        for i in range(start, start + batch):
            case.run(i)
        return batch / max(time.process_time() - t0, 1e-9)
    finally:
        gc.enable()


def measure(cases: list[Case], rounds: int, batch: int) -> dict[str, list[float]]:
    """Per-round rates of every case, the order reversed every other round (ABBA)."""
    rates: dict[str, list[float]] = {c.label: [] for c in cases}
    for c in cases:  # warm-up: caches, branch predictors, lazily built strategy plans
        timed_batch(c, max(1, batch // 10), 0)
    for r in range(rounds):
        ordered = cases if r % 2 == 0 else list(reversed(cases))
        for c in ordered:
            rates[c.label].append(timed_batch(c, batch, r * batch))
    return rates


def cases_for(nodes: list[NodeView], requests: list[Request]) -> list[Case]:
    limit = default_limit(len(nodes), requests[0])  # every request of a workload has one shape
    k = len(requests)
    fresh: list[list[NodeView]] = []

    def raw(i: int) -> object:
        return raw_first_fit(nodes, requests[i % k].resources.memory_mib)

    def full(i: int) -> object:
        return place(nodes, requests[i % k])

    def limited(i: int) -> object:
        return place(nodes, requests[i % k], limit=limit, seed=i)

    def new_snapshots(count: int) -> None:
        # Views that were never placed against: the facts of every node visited are
        # read from the pydantic models during the placement, as with a new snapshot.
        fresh[:] = [
            [NodeView(v.node, v.alive, v.allocated, v.groups) for v in nodes] for _ in range(count)
        ]

    def limited_fresh(i: int) -> object:
        return place(fresh[i % len(fresh)], requests[i % k], limit=limit, seed=i)

    return [
        Case("raw first-fit", raw),
        Case("place, no limit", full),
        Case(f"place, limit {limit}", limited),
        Case("  same, new views", limited_fresh, new_snapshots, shrink=4),
    ]


def plan_score(view: NodeView, request: Request) -> float:
    """The request's own score of a node (its strategy's weighers), as place() computes it."""
    plan = plan_for(request)
    return sum(f * w.weigh(view, request) for w, f in plan.weighers) / plan.total


def quality(nodes: list[NodeView], requests: list[Request], samples: int) -> dict[str, float]:
    """How the limited search's pick compares with the full search's, by the request's score."""
    by_name = {v.name: v for v in nodes}
    limit = default_limit(len(nodes), requests[0])
    same = placed = 0
    full_scores: list[float] = []
    limited_scores: list[float] = []
    for i in range(samples):
        req = requests[i % len(requests)]
        a = place(nodes, req).node
        b = place(nodes, req, limit=limit, seed=i).node
        if a is None or b is None:
            continue
        placed += 1
        same += a == b
        full_scores.append(plan_score(by_name[a], req))
        limited_scores.append(plan_score(by_name[b], req))
    return {
        "same_node_pct": 100.0 * same / max(placed, 1),
        "score_full": statistics.mean(full_scores) if full_scores else 0.0,
        "score_limited": statistics.mean(limited_scores) if limited_scores else 0.0,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (default 6)")
    parser.add_argument("--batch", type=int, default=300, help="placements per round and case")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"scheduler benchmark: Python {platform.python_version()}, {platform.machine()}, "
        f"{args.rounds} rounds x {args.batch} placements per case; CPU time of this process"
    )
    doc: dict[str, Any] = {"rounds": args.rounds, "batch": args.batch, "results": []}
    header = (
        f"{'nodes':>5}  {'workload':<9} {'case':<18} {'placements/s':>13} "
        f"{'us/placement':>13} {'best round':>11}  vs raw"
    )
    for n in SIZES:
        nodes = build_cluster(n)
        for workload in WORKLOADS:
            requests = build_requests(workload)
            cases = cases_for(nodes, requests)
            rates = measure(cases, args.rounds, args.batch)
            print()
            print(header)
            raw_rate = statistics.median(rates[cases[0].label])
            for c in cases:
                rate = statistics.median(rates[c.label])
                best = max(rates[c.label])
                ratio = "" if c is cases[0] else f"  {raw_rate / rate:,.0f}x the time"
                print(
                    f"{n:>5}  {workload:<9} {c.label:<18} {rate:>13,.0f} {1e6 / rate:>13.1f} "
                    f"{1e6 / best:>11.1f}{ratio}"
                )
                doc["results"].append(
                    {
                        "nodes": n,
                        "workload": workload,
                        "case": c.label,
                        "placements_per_s": rate,
                        "us_per_placement": 1e6 / rate,
                        "rounds": rates[c.label],
                    }
                )
            q = quality(nodes, requests, 200)
            print(
                f"{'':>5}  {'':<9} limited pick = full pick in {q['same_node_pct']:.0f}% "
                f"of 200; mean score of the pick {q['score_limited']:.3f} "
                f"(full search {q['score_full']:.3f})"
            )
            doc["results"].append({"nodes": n, "workload": workload, "quality": q})
    budget_us = 1e6 / GOAL_PER_S
    print(f"\nbudget for a whole placement at the goal ({GOAL_PER_S:,}/s): {budget_us:.0f} us")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
