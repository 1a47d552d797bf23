"""Properties of place() over random clusters and requests (hypothesis)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blixard.scheduler.filters import ALL_FILTERS, refusal
from blixard.scheduler.labels import data_label
from blixard.scheduler.placement import NodeView, Request, place
from blixard.scheduler.strategies import plan_for
from tests.unit.test_scheduler_support import GIB, request, view

HYPERVISORS = ["qemu", "firecracker", "process"]
LABELS = {"storage": ["nvme", "ssd", "hdd"], "gpu": ["available"], "gpu.memory": ["8G", "16G", "4"]}
GROUPS = ["web", "db", "cache"]
CONSTRAINTS = [
    "storage=nvme",
    "storage!=hdd",
    "memory>=16G",
    "memory<64G",
    "vcpus>=8",
    "disk>100G",
    "gpu.memory>=8G",
    "gpu=available",
]


@st.composite
def node_views(draw: st.DrawFn, index: int) -> NodeView:
    vcpus = draw(st.integers(0, 32))
    memory = draw(st.integers(0, 64)) * GIB
    disk = draw(st.integers(0, 400)) * GIB
    labels = {
        key: draw(st.sampled_from(values)) for key, values in LABELS.items() if draw(st.booleans())
    }
    if draw(st.integers(0, 4)) == 0:
        labels[data_label("pool:raw")] = ""
    return view(
        f"n{index:03d}",
        vcpus=vcpus,
        memory_mib=memory,
        disk_mib=disk,
        used=(
            draw(st.integers(0, vcpus + 4)),
            draw(st.integers(0, memory + GIB)),
            draw(st.integers(0, disk)),
        ),
        labels=labels,
        zone=draw(st.sampled_from([None, "a", "b"])),
        cordoned=draw(st.integers(0, 9)) == 0,
        draining=draw(st.integers(0, 9)) == 0,
        hypervisors=draw(st.lists(st.sampled_from(HYPERVISORS), unique=True, max_size=3)),
        kvm=draw(st.sampled_from(["available", "available", "unusable", "absent"])),
        alive=draw(st.integers(0, 9)) != 0,
        groups=draw(st.lists(st.sampled_from(GROUPS), unique=True, max_size=2)),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeView]:
    n = draw(st.integers(0, 25))
    return [draw(node_views(i)) for i in range(n)]


@st.composite
def requests(draw: st.DrawFn) -> Request:
    placement: dict[str, Any] = {}
    if draw(st.booleans()):
        placement["constraints"] = draw(st.lists(st.sampled_from(CONSTRAINTS), max_size=3))
    if draw(st.integers(0, 3)) == 0:
        placement["node_selector"] = {"storage": draw(st.sampled_from(LABELS["storage"]))}
    if draw(st.integers(0, 3)) == 0:
        placement["preferred_labels"] = {"gpu": "available"}
    if draw(st.integers(0, 2)) == 0:
        placement["anti_affinity_groups"] = draw(
            st.lists(st.sampled_from(GROUPS), unique=True, max_size=2)
        )
    if draw(st.integers(0, 2)) == 0:
        placement["affinity_groups"] = draw(st.lists(st.sampled_from(GROUPS), unique=True))
    if draw(st.booleans()):
        placement["data_hint"] = "pool:raw"
    placement["strategy"] = draw(
        st.lists(
            st.sampled_from(
                ["best-fit", "spread", "data-locality", "network-proximity", "specialization"]
            ),
            unique=True,
            max_size=3,
        )
    )
    return request(
        vcpus=draw(st.integers(0, 16)),
        memory_mib=draw(st.integers(0, 48)) * GIB,
        disk_mib=draw(st.integers(0, 200)) * GIB,
        hypervisor=draw(st.sampled_from(HYPERVISORS)),
        needs_kvm=draw(st.booleans()),
        near_zone=draw(st.sampled_from([None, "a", "b"])),
        workload=draw(st.sampled_from(["vm", "function"])),
        **placement,
    )


limits = st.one_of(st.none(), st.integers(1, 30))
seeds = st.integers(0, 2**64)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(clusters(), requests(), limits, seeds)
def test_decision_is_always_feasible(
    views: list[NodeView], req: Request, limit: int | None, seed: int
) -> None:
    decision = place(views, req, limit=limit, seed=seed)
    by_name = {v.name: v for v in views}
    if decision.node is not None:
        chosen = by_name[decision.node]
        # No filter refuses it, and it never exceeds free capacity.
        assert refusal(chosen, req, ALL_FILTERS) is None
        free = chosen.free()
        assert req.resources.vcpus <= free.vcpus
        assert req.resources.memory_mib <= free.memory_mib
        assert req.resources.disk_mib <= free.disk_mib
        assert decision.node not in decision.rejections
        assert decision.reason.startswith(f"placed on {decision.node} ")


@SETTINGS
@given(clusters(), requests(), limits, seeds)
def test_none_only_when_every_node_is_refused(
    views: list[NodeView], req: Request, limit: int | None, seed: int
) -> None:
    decision = place(views, req, limit=limit, seed=seed)
    feasible = [v for v in views if refusal(v, req, ALL_FILTERS) is None]
    assert (decision.node is None) == (not feasible)
    if decision.node is None:
        assert set(decision.rejections) == {v.name for v in views}
        assert decision.reason.startswith(
            "no node can run it" if views else "no nodes are registered"
        )


@SETTINGS
@given(clusters(), requests(), limits, seeds)
def test_every_rejection_is_the_first_filter_refusal(
    views: list[NodeView], req: Request, limit: int | None, seed: int
) -> None:
    decision = place(views, req, limit=limit, seed=seed)
    by_name = {v.name: v for v in views}
    for name, why in decision.rejections.items():
        assert why == refusal(by_name[name], req, ALL_FILTERS)


@SETTINGS
@given(clusters(), requests())
def test_without_limit_the_best_scored_node_wins(views: list[NodeView], req: Request) -> None:
    decision = place(views, req)
    if decision.node is None:
        return
    plan = plan_for(req)

    def score(v: NodeView) -> float:
        return sum(f * w.weigh(v, req) for w, f in plan.weighers) / plan.total

    feasible = [v for v in views if refusal(v, req, ALL_FILTERS) is None]
    best = max(score(v) for v in feasible)
    chosen = next(v for v in feasible if v.name == decision.node)
    assert score(chosen) >= best - 1e-9
    # Among the equally good, the smallest name.
    assert decision.node == min(v.name for v in feasible if score(v) >= best - 1e-9)


@SETTINGS
@given(clusters(), requests(), limits, seeds, st.randoms(use_true_random=False))
def test_deterministic(
    views: list[NodeView], req: Request, limit: int | None, seed: int, rnd: random.Random
) -> None:
    decision = place(views, req, limit=limit, seed=seed)
    assert place(views, req, limit=limit, seed=seed) == decision
    if limit is None:
        shuffled = list(views)
        rnd.shuffle(shuffled)
        assert place(shuffled, req).node == decision.node
