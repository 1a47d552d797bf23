"""Store keys: the layout of DESIGN.md, and names that could escape their prefix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixard.domain.errors import ValidationError
from blixard.domain.keys import (
    Kind,
    instance_name,
    kind_prefix,
    node_lease_key,
    object_key,
    parse_object_key,
)


def test_layout() -> None:
    assert object_key(Kind.VMS, "web") == "/blixard/v1/vms/web"
    assert object_key("function-workers", "f-1") == "/blixard/v1/function-workers/f-1"
    assert kind_prefix(Kind.FUNCTIONS) == "/blixard/v1/functions/"
    assert node_lease_key("node1") == "/blixard/v1/leases/nodes/node1"
    assert instance_name("web", 2) == "web-2"


def test_every_kind_of_design() -> None:
    assert [k.value for k in Kind] == [
        "nodes",
        "vms",
        "instances",
        "functions",
        "function-workers",
        "services",
        "volumes",
        "tokens",
        "roles",
        "audit",
        "events",
    ]


def test_prefixes_do_not_overlap() -> None:
    prefixes = [kind_prefix(k) for k in Kind]
    for a in prefixes:
        for b in prefixes:
            assert a == b or not b.startswith(a)


def test_unknown_kind() -> None:
    with pytest.raises(ValidationError) as info:
        kind_prefix("vm")
    assert info.value.field == "kind"
    assert info.value.reason.startswith("must be one of nodes, vms, instances")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("a/b", "must not contain '/'"),
        ("..", "must not contain '/' or be '.' or '..'"),
        (".", "must not contain '/' or be '.' or '..'"),
        ("a b", "printable ASCII without spaces"),
        ("é", "printable ASCII without spaces"),
        ("x" * 254, "at most 253 characters"),
    ],
)
def test_bad_names(name: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        object_key(Kind.VMS, name)
    assert info.value.field == "name"
    assert fragment in info.value.reason


def test_parse_object_key() -> None:
    assert parse_object_key("/blixard/v1/instances/web-0") == (Kind.INSTANCES, "web-0")
    for bad, fragment in [
        ("/other/vms/x", "must start with"),
        ("/blixard/v1/vms", "must be /blixard/v1/<kind>/<name>"),
        ("/blixard/v1/leases/nodes/n1", "unknown kind 'leases'"),
        ("/blixard/v1/vms/a/b", "must not contain '/'"),
    ]:
        with pytest.raises(ValidationError) as info:
            parse_object_key(bad)
        assert info.value.field == "key"
        assert fragment in info.value.reason


def test_negative_replica_index() -> None:
    with pytest.raises(ValidationError) as info:
        instance_name("web", -1)
    assert (info.value.field, info.value.reason) == ("index", "must not be negative, got -1")


@given(
    st.sampled_from(list(Kind)),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=50),
)
def test_property_key_round_trip(kind: Kind, name: str) -> None:
    if "/" in name or name in {".", ".."}:
        return
    assert parse_object_key(object_key(kind, name)) == (kind, name)
