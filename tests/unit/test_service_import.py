"""The older system's services file: accepted shapes, and every refusal names its place."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blixard.domain.errors import ValidationError
from blixard.domain.service import ServiceState
from blixard.domain.service_import import ImportedService, parse_import


def test_the_list_form() -> None:
    text = json.dumps(
        {
            "services": [
                {"name": "nginx", "state": "running", "nodes": ["n1"]},
                {"name": "redis.service", "state": "stopped", "nodes": "all"},
                {"name": "web", "unit": "my_web.service", "state": "running"},
            ]
        }
    )
    assert parse_import(text) == [
        ImportedService("nginx", "nginx.service", ServiceState.RUNNING, ["n1"]),
        ImportedService("redis", "redis.service", ServiceState.STOPPED, "all"),
        ImportedService("web", "my_web.service", ServiceState.RUNNING, None),
    ]


def test_the_flat_form_and_an_empty_file() -> None:
    assert parse_import('{"nginx": "running", "cron.service": "stopped"}') == [
        ImportedService("nginx", "nginx.service", ServiceState.RUNNING, None),
        ImportedService("cron", "cron.service", ServiceState.STOPPED, None),
    ]
    assert parse_import('{"services": []}') == []


BAD: list[tuple[Any, str, str]] = [
    ({"services": [{"name": "a", "state": "running"}, {"state": "running"}]},
     "services[1].name", "is required"),
    ({"services": [{"name": "a"}]}, "services[0].state", "is required"),
    ({"services": [{"name": "a", "state": "active"}]}, "services[0].state", "'running' or"),
    ({"services": [{"name": "a;reboot", "state": "running"}]}, "services[0].name", "';'"),
    ({"services": [{"name": "$(reboot)", "state": "running"}]}, "services[0].name", "'$'"),
    ({"services": [{"name": "../x", "state": "running"}]}, "services[0].name", "not a path"),
    ({"services": [{"name": "a b", "state": "running"}]}, "services[0].name", "spaces"),
    ({"services": [{"name": "a", "state": "running", "nodes": []}]},
     "services[0].nodes", "non-empty list"),
    ({"services": [{"name": "a", "state": "running", "nodes": ["N_1"]}]},
     "services[0].nodes", "DNS label"),
    ({"services": [{"name": "a", "state": "running", "node": ["n1"]}]},
     "services[0].node", "unknown key"),
    ({"services": [{"name": "a", "state": "running"}, {"name": "a.service", "state": "stopped"}]},
     "services[1].name", "listed twice"),
    ({"services": [{"name": "a", "state": "running"},
                   {"name": "b", "unit": "a.service", "state": "running"}]},
     "services[1].unit", "already belongs"),
    ({"services": ["nginx"]}, "services[0]", "must be an object"),
    ({"services": {"nginx": "running"}}, "services", "must be a list"),
    ({"services": [], "version": 2}, "version", "unknown top-level key"),
    ({"nginx;reboot": "running"}, "nginx;reboot", "';'"),
    ({"nginx": "up"}, "nginx", "'running' or 'stopped'"),
    ([{"name": "nginx"}], "(root)", "must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "field", "reason"), BAD)
def test_refusals_name_the_place(data: Any, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_import(json.dumps(data))
    assert info.value.field == field, info.value
    assert reason in info.value.reason, info.value


def test_a_syntax_error_names_line_and_column() -> None:
    with pytest.raises(ValidationError) as info:
        parse_import('{\n  "services": [\n    {"name": "a",}\n  ]\n}')
    assert info.value.field == "line 3 column 18", info.value
    assert "malformed JSON" in info.value.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["services", "name", "state", "nodes", "unit", "x"]),
                      children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_read_or_refused_with_a_place(data: Any) -> None:
    try:
        services = parse_import(json.dumps(data))
    except ValidationError as exc:
        assert exc.field and exc.reason
        return
    for service in services:
        assert service.unit.endswith(".service") or "." in service.unit


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_read_or_refused(text: str) -> None:
    try:
        parse_import(text)
    except ValidationError as exc:
        assert exc.field
