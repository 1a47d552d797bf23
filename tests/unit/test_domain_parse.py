"""parse/from_json_bytes: pydantic's errors become Blixard's, with a dotted field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blixard.domain.errors import ValidationError
from blixard.domain.function import Function
from blixard.domain.keys import Kind
from blixard.domain.objects import decode_stored, model_for, parse_object
from blixard.domain.parse import dotted, from_json_bytes, parse, to_json_bytes
from blixard.domain.service import Service
from blixard.domain.vm import VM
from blixard.domain.volume import Volume

VM_DOC: dict[str, Any] = {
    "kind": "VM",
    "metadata": {"name": "web"},
    "spec": {"boot": {"image": "alpine"}, "memory_mib": "1G"},
}


def test_dotted() -> None:
    assert dotted(("spec", "triggers", 0, "path")) == "spec.triggers[0].path"
    assert dotted((0, "a")) == "[0].a"
    assert dotted(()) == "(root)"


def test_not_a_mapping() -> None:
    with pytest.raises(ValidationError) as info:
        parse(VM, ["not", "a", "dict"])
    assert info.value.field == "(root)"
    assert info.value.reason.startswith("must be an object (a mapping)")


def test_missing_top_level() -> None:
    with pytest.raises(ValidationError) as info:
        parse(VM, {"metadata": {"name": "web"}})
    assert (info.value.field, info.value.reason) == ("spec", "is required")


def test_json_errors() -> None:
    with pytest.raises(ValidationError) as info:
        from_json_bytes(VM, b"{nope")
    assert info.value.field == "(root)"
    assert info.value.reason.startswith("Invalid JSON")
    raw = json.dumps({**VM_DOC, "spec": {**VM_DOC["spec"], "vcpus": 0}}).encode()
    with pytest.raises(ValidationError) as info:
        from_json_bytes(VM, raw)
    assert info.value.field == "spec.vcpus"


def test_many_errors_are_capped_in_the_message() -> None:
    spec = {f"typo{i}": 1 for i in range(15)}
    with pytest.raises(ValidationError) as info:
        parse(Volume, {"metadata": {"name": "v"}, "spec": {"size_mib": 1, **spec}})
    assert info.value.field == "spec.typo0"
    assert "(also 14 more:" in info.value.reason
    assert info.value.reason.endswith("; and 4 more)")


def test_json_bytes_are_compact_utf8() -> None:
    raw = to_json_bytes(parse(VM, VM_DOC))
    assert isinstance(raw, bytes)
    assert raw.startswith(b'{"kind":"VM","metadata":{"name":"web"')
    assert b" " not in raw


def test_parse_object_dispatches_on_kind() -> None:
    obj = parse_object(VM_DOC)
    assert isinstance(obj, VM)
    svc = parse_object(
        {"kind": "Service", "metadata": {"name": "s"}, "spec": {"unit": "a", "nodes": "all"}}
    )
    assert isinstance(svc, Service)
    for data, reason in [
        ({"metadata": {"name": "x"}}, "is required (one of Node, VM, Instance"),
        ({**VM_DOC, "kind": "Pod"}, "must be one of Node, VM, Instance"),
        ({**VM_DOC, "kind": 3}, "must be one of"),
    ]:
        with pytest.raises(ValidationError) as info:
            parse_object(data)
        assert info.value.field == "kind"
        assert reason in info.value.reason


def test_registry() -> None:
    assert model_for("VM") is VM
    assert model_for(Kind.FUNCTIONS) is Function
    assert model_for("volumes") is Volume
    with pytest.raises(ValidationError) as info:
        model_for("tokens")
    assert info.value.field == "kind"
    obj = decode_stored(Kind.VMS, to_json_bytes(parse(VM, VM_DOC)))
    assert isinstance(obj, VM)
    assert obj.spec.memory_mib == 1024


names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", fullmatch=True)


@settings(max_examples=50)
@given(
    name=names,
    vcpus=st.integers(min_value=1, max_value=256),
    memory=st.integers(min_value=16, max_value=4 * 1024 * 1024),
    replicas=st.integers(min_value=0, max_value=1000),
    labels=st.dictionaries(names, names, max_size=4),
)
def test_property_vm_json_round_trip(
    name: str, vcpus: int, memory: int, replicas: int, labels: dict[str, str]
) -> None:
    vm = parse(
        VM,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "vcpus": vcpus,
                "memory_mib": memory,
                "replicas": replicas,
                "boot": {"flake": f"github:me/vms#{name}"},
            },
        },
    )
    raw = to_json_bytes(vm)
    assert from_json_bytes(VM, raw) == vm
    assert parse(VM, json.loads(raw)) == vm
