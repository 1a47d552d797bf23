"""Functions: runtime, sizes and durations from strings, scaling rules, triggers."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.function import Function, HttpTrigger, Runtime
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes


def fn(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"runtime": "nix", "handler": "./handler.nix"}
    base.update(spec)
    return {"kind": "Function", "metadata": {"name": "image-resizer"}, "spec": base}


def refused(data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(Function, data)
    return info.value


def test_defaults() -> None:
    f = parse(Function, fn())
    s = f.spec
    assert s.runtime is Runtime.NIX
    assert (s.memory_mib, s.timeout_s, s.min_instances, s.max_instances) == (128, 30.0, 0, 10)
    assert (s.max_concurrency, s.target_concurrency, s.scale_down_delay_s) == (100, 1, 60.0)
    assert s.triggers == []
    assert f.key() == "/blixard/v1/functions/image-resizer"


def test_seed_example_round_trip() -> None:
    f = parse(
        Function,
        fn(
            runtime="command",
            handler="/usr/bin/resize",
            args=["--quality", "80"],
            env={"LOG_LEVEL": "debug"},
            memory_mib="512M",
            timeout_s="30s",
            max_concurrency=100,
            min_instances=0,
            max_instances=100,
            target_concurrency=1,
            scale_down_delay_s="5m",
            triggers=[{"type": "http", "path": "/api/resize", "methods": ["post", "GET"]}],
            placement={"preferred_labels": {"gpu": "available"}, "data_hint": "ceph-pool:raw"},
        ),
    )
    assert f.spec.memory_mib == 512
    assert f.spec.timeout_s == 30.0
    assert f.spec.scale_down_delay_s == 300.0
    assert f.spec.triggers == [HttpTrigger(path="/api/resize", methods=["POST", "GET"])]
    assert f.spec.placement.preferred_labels == {"gpu": "available"}
    assert from_json_bytes(Function, to_json_bytes(f)) == f


def test_zero_scale_down_delay_means_immediately() -> None:
    assert parse(Function, fn(scale_down_delay_s=0)).spec.scale_down_delay_s == 0.0


def test_trigger_defaults_and_root_path() -> None:
    f = parse(Function, fn(triggers=[{"path": "/"}]))
    assert f.spec.triggers[0].methods == ["GET", "POST"]


@pytest.mark.parametrize(
    ("spec", "field", "reason_part"),
    [
        ({"runtime": "python"}, "spec.runtime", "'nix', 'command' or 'microvm'"),
        ({"handler": ""}, "spec.handler", "non-empty"),
        ({"handler": "   "}, "spec.handler", "non-empty"),
        ({"handler": "--eval"}, "spec.handler", "must not start with '-'"),
        ({"handler": "a\x00b"}, "spec.handler", "without NUL"),
        ({"memory_mib": "8M"}, "spec.memory_mib", "at least 16M"),
        ({"memory_mib": "128"}, "spec.memory_mib", "a size needs a unit"),
        ({"timeout_s": 0}, "spec.timeout_s", "greater than zero"),
        ({"timeout_s": "30"}, "spec.timeout_s", "a duration needs a unit"),
        ({"timeout_s": "2h"}, "spec.timeout_s", "at most 1h"),
        ({"timeout_s": "-1s"}, "spec.timeout_s", "must not be negative"),
        ({"scale_down_delay_s": "2d"}, "spec.scale_down_delay_s", "a duration needs a unit"),
        ({"max_concurrency": 0}, "spec.max_concurrency", "greater than or equal to 1"),
        ({"max_instances": 0}, "spec.max_instances", "greater than or equal to 1"),
        ({"min_instances": -1}, "spec.min_instances", "greater than or equal to 0"),
        (
            {"min_instances": 5, "max_instances": 2},
            "spec.min_instances",
            "must not exceed max_instances (2), got 5",
        ),
        (
            {"target_concurrency": 10, "max_concurrency": 5},
            "spec.target_concurrency",
            "must not exceed max_concurrency (5), got 10",
        ),
        ({"env": {"1BAD": "x"}}, "spec.env", "variable names"),
        ({"env": {"OK": 1}}, "spec.env", "must be a string"),
        ({"concurrency": 5}, "spec.concurrency", "unknown field"),
    ],
)
def test_bad_function_spec(spec: dict[str, Any], field: str, reason_part: str) -> None:
    err = refused(fn(**spec))
    assert err.field == field
    assert reason_part in err.reason, err.reason


@pytest.mark.parametrize(
    ("trigger", "field", "reason_part"),
    [
        ({"path": "api"}, "spec.triggers[0].path", "starting with '/'"),
        ({"path": "/api/../admin"}, "spec.triggers[0].path", "'..'"),
        ({"path": "/api//x"}, "spec.triggers[0].path", "no empty"),
        ({"path": "/api x"}, "spec.triggers[0].path", "path segments"),
        ({"path": "/a?b=c"}, "spec.triggers[0].path", "path segments"),
        ({"path": "/a", "methods": ["FETCH"]}, "spec.triggers[0].methods[0]", "'GET'"),
        ({"path": "/a", "methods": []}, "spec.triggers[0].methods", "at least 1"),
        ({"path": "/a", "methods": ["get", "GET"]}, "spec.triggers[0].methods", "more than once"),
        ({"type": "queue", "path": "/a"}, "spec.triggers[0].type", "'http'"),
        ({"methods": ["GET"]}, "spec.triggers[0].path", "is required"),
        ({"path": "/_blixard/v1/x"}, "spec.triggers[0].path", "the gateway's own"),
    ],
)
def test_bad_triggers(trigger: dict[str, Any], field: str, reason_part: str) -> None:
    err = refused(fn(triggers=[trigger]))
    assert err.field == field
    assert reason_part in err.reason, err.reason


def test_same_route_twice_refused() -> None:
    err = refused(fn(triggers=[{"path": "/a", "methods": ["GET"]}, {"path": "/a"}]))
    assert err.field == "spec.triggers"
    assert err.reason == "route GET /a is given twice"
