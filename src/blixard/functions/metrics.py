"""Function metrics of one node: Prometheus collectors, and a summary that sums across nodes.

Each node counts what its gateway routed and its workers ran (invocations by
outcome, cold and warm starts) and keeps histograms of execution duration,
cold-start time and queue time. ``/metrics`` serves them in Prometheus' text
format (one registry per node, not the process-global one, so several nodes
in one test process stay apart). ``blixard function metrics`` needs one
figure for the whole cluster: :func:`raw` gives a node's numbers in a
mergeable form (counters and cumulative bucket counts) and :func:`summarise`
adds several nodes' and estimates quantiles from the merged buckets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

#: Seconds. Dense below 0.1 s, where warm invocations and template clones land.
BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, math.inf,
)  # fmt: skip

OUTCOMES = ("ok", "error", "timeout", "rejected")
HISTOGRAMS = ("duration", "cold_start", "queue")


class FunctionMetrics:
    """The collectors of one node."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter(
            "blixard_function_invocations",
            "Invocations by outcome: ok (any answer of the handler), error (crash or bad "
            "output: 502), timeout (504), rejected (429/413/503 before running).",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.starts = Counter(
            "blixard_function_starts",
            "Invocations by start kind: cold (a worker had to be started) or warm.",
            ["function", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "blixard_function_duration_seconds",
            "Execution time of the handler on its worker.",
            ["function"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.cold_start = Histogram(
            "blixard_function_cold_start_seconds",
            "From the decision to start a worker to that worker being ready.",
            ["function"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "blixard_function_queue_seconds",
            "Time an invocation waited at the gateway for a free execution slot.",
            ["function"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._histograms = {
            "duration": self.duration,
            "cold_start": self.cold_start,
            "queue": self.queue,
        }

    def exposition(self) -> bytes:
        """The Prometheus text format of everything this node counted."""
        return generate_latest(self.registry)

    def forget(self, function: str) -> None:
        """Drop a deleted function's series, so a new function of that name starts at zero."""
        for outcome in OUTCOMES:
            _remove(self.invocations, function, outcome)
        for kind in ("cold", "warm"):
            _remove(self.starts, function, kind)
        for histogram in self._histograms.values():
            _remove(histogram, function)

    def raw(self, function: str) -> dict[str, Any]:
        """This node's numbers for ``function`` in a form :func:`summarise` can add up."""
        counters = {outcome: 0.0 for outcome in OUTCOMES}
        starts = {"cold": 0.0, "warm": 0.0}
        histograms: dict[str, dict[str, Any]] = {
            name: {"buckets": [0.0] * len(BUCKETS), "sum": 0.0} for name in HISTOGRAMS
        }
        by_metric = {
            "blixard_function_duration_seconds": "duration",
            "blixard_function_cold_start_seconds": "cold_start",
            "blixard_function_queue_seconds": "queue",
        }
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.labels.get("function") != function:
                    continue
                if sample.name == "blixard_function_invocations_total":
                    counters[sample.labels["outcome"]] = sample.value
                elif sample.name == "blixard_function_starts_total":
                    starts[sample.labels["kind"]] = sample.value
                elif sample.name.endswith("_bucket") and metric.name in by_metric:
                    index = BUCKETS.index(float(sample.labels["le"]))
                    histograms[by_metric[metric.name]]["buckets"][index] = sample.value
                elif sample.name.endswith("_sum") and metric.name in by_metric:
                    histograms[by_metric[metric.name]]["sum"] = sample.value
        return {"counters": counters, "starts": starts, "histograms": histograms}


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never observed on this node
        metric.remove(*labels)


def _quantile(buckets: list[float], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile ``q`` of cumulative ``buckets``."""
    total = buckets[-1]
    if total <= 0:
        return None
    rank = q * total
    for bound, cumulative in zip(BUCKETS, buckets, strict=True):
        if cumulative >= rank:
            # Past the last finite bucket the best honest answer is "more than that".
            return (bound if math.isfinite(bound) else BUCKETS[-2]) * 1000.0
    return BUCKETS[-2] * 1000.0


def summarise(function: str, nodes: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Add the raw numbers of several nodes: the answer of ``GET .../metrics``."""
    counters = {outcome: 0.0 for outcome in OUTCOMES}
    starts = {"cold": 0.0, "warm": 0.0}
    buckets = {name: [0.0] * len(BUCKETS) for name in HISTOGRAMS}
    sums = dict.fromkeys(HISTOGRAMS, 0.0)
    names: list[str] = []
    for node, data in nodes:
        names.append(node)
        for key in OUTCOMES:
            counters[key] += float(data["counters"].get(key, 0.0))
        for key in starts:
            starts[key] += float(data["starts"].get(key, 0.0))
        for name in HISTOGRAMS:
            hist = data["histograms"][name]
            buckets[name] = [
                a + float(b) for a, b in zip(buckets[name], hist["buckets"], strict=True)
            ]
            sums[name] += float(hist["sum"])

    def shape(name: str) -> dict[str, Any]:
        total = buckets[name][-1]
        return {
            "count": int(total),
            "avg": round(sums[name] / total * 1000.0, 3) if total else None,
            "p50": _quantile(buckets[name], 0.5),
            "p99": _quantile(buckets[name], 0.99),
        }

    return {
        "function": function,
        "nodes": sorted(names),
        "invocations": int(counters["ok"] + counters["error"] + counters["timeout"]),
        "errors": int(counters["error"]),
        "timeouts": int(counters["timeout"]),
        "rejected": int(counters["rejected"]),
        "cold_starts": int(starts["cold"]),
        "warm_starts": int(starts["warm"]),
        "duration_ms": shape("duration"),
        "cold_start_ms": shape("cold_start"),
        "queue_ms": shape("queue"),
    }
