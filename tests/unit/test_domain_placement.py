"""Placement: constraint strings into structured form, strategies, groups, hints."""

from __future__ import annotations

from fractions import Fraction

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.parse import parse
from blixard.domain.placement import (
    Constraint,
    ConstraintOp,
    Placement,
    PlacementStrategy,
    parse_constraint,
    parse_constraints,
)
from blixard.domain.units import GIB


def test_cli_constraint_string_parsed() -> None:
    got = parse_constraints("storage=nvme,memory>=32G", "constraint")
    assert got == [
        Constraint(key="storage", op=ConstraintOp.EQ, value="nvme"),
        Constraint(key="memory", op=ConstraintOp.GE, value="32G"),
    ]
    assert got[0].quantity() is None
    assert got[1].quantity() == (Fraction(32 * GIB), True)
    assert [str(c) for c in got] == ["storage=nvme", "memory>=32G"]


@pytest.mark.parametrize(
    ("text", "key", "op", "value"),
    [
        ("storage==nvme", "storage", "=", "nvme"),
        (" zone != eu-1 ", "zone", "!=", "eu-1"),
        ("vcpus>8", "vcpus", ">", "8"),
        ("vcpus<=2.5", "vcpus", "<=", "2.5"),
        ("gpu.memory>=8GB", "gpu.memory", ">=", "8GB"),
        ("disk<1T", "disk", "<", "1T"),
        ("blixard.dev/role=edge", "blixard.dev/role", "=", "edge"),
        ("ssd=", "ssd", "=", ""),
    ],
)
def test_constraint_forms(text: str, key: str, op: str, value: str) -> None:
    c = parse_constraint(text, "c")
    assert (c.key, c.op.value, c.value) == (key, op, value)


def test_quantity_of_plain_number() -> None:
    assert parse_constraint("vcpus>=8", "c").quantity() == (Fraction(8), False)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("storage", "a constraint is key<op>value"),
        ("=nvme", "a constraint is key<op>value"),
        ("a=b=c", "a constraint is key<op>value"),
        ("memory=>32G", "a constraint is key<op>value"),
        ("", "empty constraint"),
        ("   ", "empty constraint"),
        ("memory>=lots", "must be a number or a size"),
        ("memory>=-1G", "must be a number or a size"),
        ("memory>=" + "9" * 40, "must be a number or a size"),
        ("Bad_Key-=x", "label key name must be"),
        ("storage=has space", "label value must be"),
    ],
)
def test_bad_constraints(text: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_constraint(text, "spec.placement.constraints")
    assert info.value.field == "spec.placement.constraints"
    assert fragment in info.value.reason, info.value.reason


def test_placement_model_accepts_string_list_or_structured() -> None:
    from_string = parse(Placement, {"constraints": "storage=nvme, memory>=32G"})
    from_list = parse(Placement, {"constraints": ["storage=nvme", "memory>=32G"]})
    structured = parse(
        Placement,
        {
            "constraints": [
                {"key": "storage", "op": "=", "value": "nvme"},
                {"key": "memory", "op": ">=", "value": "32G"},
            ]
        },
    )
    assert from_string == from_list == structured
    assert len(structured.constraints) == 2


def test_placement_errors_point_at_the_item() -> None:
    with pytest.raises(ValidationError) as info:
        parse(Placement, {"constraints": "storage=nvme,,memory>=32G"})
    assert info.value.field == "constraints[1]"
    assert info.value.reason == "empty constraint (look for a stray ',')"

    with pytest.raises(ValidationError) as info:
        parse(Placement, {"constraints": [{"key": "memory", "op": ">=", "value": "many"}]})
    assert info.value.field == "constraints[0]"
    assert "must be a number or a size" in info.value.reason

    with pytest.raises(ValidationError) as info:
        parse(Placement, {"constraints": [{"key": "memory", "op": "~", "value": "1"}]})
    assert info.value.field == "constraints[0].op"


def test_strategies() -> None:
    p = parse(Placement, {"strategy": "best-fit,data-locality"})
    assert p.strategy == [PlacementStrategy.BEST_FIT, PlacementStrategy.DATA_LOCALITY]
    assert parse(Placement, {}).strategy == []
    with pytest.raises(ValidationError) as info:
        parse(Placement, {"strategy": ["spread", "load-balanced"]})
    assert info.value.field == "strategy[1]"
    assert "'best-fit', 'spread'" in info.value.reason
    with pytest.raises(ValidationError) as info:
        parse(Placement, {"strategy": "spread,spread"})
    assert info.value.field == "strategy"
    assert "more than once" in info.value.reason


def test_groups_selector_hints() -> None:
    p = parse(
        Placement,
        {
            "node_selector": {"storage": "fast"},
            "preferred_labels": {"gpu": "available"},
            "data_hint": "ceph-pool:raw-data",
            "anti_affinity_groups": ["webapp"],
            "affinity_groups": ["cache"],
        },
    )
    assert p.node_selector == {"storage": "fast"}
    assert p.preferred_labels == {"gpu": "available"}
    assert p.data_hint == "ceph-pool:raw-data"
    assert p.anti_affinity_groups == ["webapp"]

    for data, field, fragment in [
        ({"anti_affinity_groups": ["Web App"]}, "anti_affinity_groups[0]", "DNS label"),
        ({"affinity_groups": ["a", "a"]}, "affinity_groups", "more than once"),
        ({"data_hint": "has space"}, "data_hint", "without spaces"),
        ({"node_selector": {"gpu": "yes please"}}, "node_selector", "label value"),
        ({"preferred": {"gpu": "x"}}, "preferred", "unknown field"),
    ]:
        with pytest.raises(ValidationError) as info:
            parse(Placement, data)
        assert info.value.field == field
        assert fragment in info.value.reason, info.value.reason
