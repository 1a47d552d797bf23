"""Scheduler strategies: which weighers rank a request's nodes, and what each strategy picks."""

from __future__ import annotations

import pytest

from blixard.scheduler.labels import data_label
from blixard.scheduler.placement import place
from blixard.scheduler.strategies import PREFERENCE_FACTOR, plan_for
from blixard.scheduler.weighers import (
    AFFINITY,
    BEST_FIT,
    DATA_LOCALITY,
    NETWORK_PROXIMITY,
    PREFERRED_LABELS,
    SPECIALIZATION,
    SPREAD,
)
from tests.unit.test_scheduler_support import GIB, request, view


def factors(**kwargs: object) -> dict[object, float]:
    return dict(plan_for(request(**kwargs)).weighers)  # type: ignore[arg-type]


def test_vm_default_is_best_fit() -> None:
    plan = plan_for(request())
    assert plan.name == "best-fit"
    assert dict(plan.weighers) == {BEST_FIT: 1.0}
    assert plan.total == 1.0


def test_function_default_is_the_serverless_mix() -> None:
    plan = plan_for(request(workload="function", data_hint="pool:x", near_zone="a"))
    assert plan.name == "serverless mix"
    assert dict(plan.weighers) == {
        SPREAD: 0.3,
        DATA_LOCALITY: 0.3,
        NETWORK_PROXIMITY: 0.2,
        SPECIALIZATION: 0.2,
    }
    assert plan.total == pytest.approx(1.0)


def test_neutral_weighers_are_left_out() -> None:
    # No hint and no zone: data locality and network proximity would score every node 0.5.
    assert factors(workload="function") == {SPREAD: 0.3, SPECIALIZATION: 0.2}


@pytest.mark.parametrize(
    ("strategy", "weigher"),
    [
        ("best-fit", BEST_FIT),
        ("spread", SPREAD),
        ("specialization", SPECIALIZATION),
    ],
)
def test_single_strategies(strategy: str, weigher: object) -> None:
    assert factors(strategy=strategy) == {weigher: 1.0}
    assert factors(strategy=strategy, workload="function") == {weigher: 1.0}


def test_strategies_are_combined_with_equal_weight() -> None:
    assert factors(strategy="best-fit,data-locality", data_hint="pool:x") == {
        BEST_FIT: 0.5,
        DATA_LOCALITY: 0.5,
    }
    plan = plan_for(
        request(strategy=["spread", "network-proximity", "specialization"], near_zone="z")
    )
    assert plan.name == "spread+network-proximity+specialization"
    assert dict(plan.weighers) == pytest.approx(
        {SPREAD: 1 / 3, NETWORK_PROXIMITY: 1 / 3, SPECIALIZATION: 1 / 3}
    )


def test_soft_preferences_join_any_strategy() -> None:
    plan = plan_for(
        request(
            preferred_labels={"rack": "r1"},
            affinity_groups=["web"],
            data_hint="pool:x",
            near_zone="a",
        )
    )
    assert plan.name == "best-fit + preferred labels, affinity, data locality, zone"
    assert dict(plan.weighers) == {
        BEST_FIT: 1.0,
        PREFERRED_LABELS: PREFERENCE_FACTOR,
        AFFINITY: PREFERENCE_FACTOR,
        DATA_LOCALITY: PREFERENCE_FACTOR,
        NETWORK_PROXIMITY: PREFERENCE_FACTOR,
    }
    # A weigher the strategy already has keeps the strategy's factor.
    assert factors(strategy="data-locality", data_hint="pool:x") == {DATA_LOCALITY: 1.0}


def test_nothing_to_weigh_falls_back_to_best_fit() -> None:
    plan = plan_for(request(strategy="network-proximity"))
    assert dict(plan.weighers) == {BEST_FIT: 1.0}
    assert "nothing to weigh" in plan.name


# --- what each strategy picks ----------------------------------------------------------------


def cluster() -> list:  # type: ignore[type-arg]
    return [
        view("empty", memory_mib=32 * GIB, zone="b"),
        view("tight", memory_mib=32 * GIB, used=(0, 30 * GIB, 0), zone="b"),
        view("holder", memory_mib=32 * GIB, used=(0, 16 * GIB, 0), zone="b",
             labels={data_label("pool:raw"): ""}),
        view("near", memory_mib=32 * GIB, used=(0, 16 * GIB, 0), zone="a"),
        view("gpu", memory_mib=32 * GIB, used=(0, 24 * GIB, 0), zone="b",
             labels={"gpu": "available"}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "tight"),
        ({"strategy": "best-fit"}, "tight"),
        ({"strategy": "spread"}, "empty"),
        ({"strategy": "data-locality", "data_hint": "pool:raw"}, "holder"),
        ({"strategy": "network-proximity", "near_zone": "a"}, "near"),
        ({"strategy": "specialization", "preferred_labels": {"gpu": "available"}}, "gpu"),
        ({"workload": "function", "data_hint": "pool:raw"}, "holder"),
        ({"workload": "function", "near_zone": "a"}, "near"),
        ({"workload": "function"}, "empty"),
        ({"preferred_labels": {"gpu": "available"}}, "gpu"),
    ],
)
def test_each_strategy_picks_its_node(kwargs: dict[str, object], expected: str) -> None:
    decision = place(cluster(), request(memory_mib=GIB, **kwargs))  # type: ignore[arg-type]
    assert decision.node == expected, decision.reason


def test_specialization_keeps_gpu_free_for_plain_requests() -> None:
    # gpu is the tightest fit after "tight"; without "tight", best fit alone would pick it.
    views = [v for v in cluster() if v.name != "tight"]
    assert place(views, request(memory_mib=GIB)).node == "gpu"
    spec = place(views, request(memory_mib=GIB, strategy="best-fit,specialization"))
    assert spec.node == "holder"
