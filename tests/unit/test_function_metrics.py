"""Function metrics: what one node counts, the Prometheus text, and sums across nodes."""

from __future__ import annotations

from blixard.domain.errors import HandlerFailed
from blixard.functions.metrics import FunctionMetrics, summarise
from blixard.functions.runtime import parse_response


def test_raw_numbers_of_one_function_and_the_exposition() -> None:
    m = FunctionMetrics()
    m.invocations.labels("f", "ok").inc(3)
    m.invocations.labels("f", "error").inc()
    m.invocations.labels("g", "ok").inc(7)
    m.starts.labels("f", "cold").inc()
    m.starts.labels("f", "warm").inc(3)
    for seconds in (0.001, 0.002, 0.004, 0.5):
        m.duration.labels("f").observe(seconds)
    raw = m.raw("f")
    assert raw["counters"] == {"ok": 3.0, "error": 1.0, "timeout": 0.0, "rejected": 0.0}
    assert raw["starts"] == {"cold": 1.0, "warm": 3.0}
    assert raw["histograms"]["duration"]["buckets"][-1] == 4.0
    text = m.exposition().decode()
    assert 'blixard_function_invocations_total{function="f",outcome="ok"} 3.0' in text
    assert 'blixard_function_invocations_total{function="g",outcome="ok"} 7.0' in text
    assert "blixard_function_duration_seconds_bucket" in text


def test_summaries_add_nodes_and_estimate_quantiles_from_buckets() -> None:
    a, b = FunctionMetrics(), FunctionMetrics()
    for _ in range(98):
        a.duration.labels("f").observe(0.0018)  # bucket <= 2 ms
    for _ in range(2):
        b.duration.labels("f").observe(0.9)  # bucket <= 1 s
    a.invocations.labels("f", "ok").inc(98)
    b.invocations.labels("f", "timeout").inc(2)
    b.invocations.labels("f", "rejected").inc(5)
    b.cold_start.labels("f").observe(0.04)
    out = summarise("f", [("n1", a.raw("f")), ("n2", b.raw("f"))])
    assert out["nodes"] == ["n1", "n2"]
    assert out["invocations"] == 100 and out["timeouts"] == 2 and out["rejected"] == 5
    assert out["duration_ms"]["count"] == 100
    assert out["duration_ms"]["p50"] == 2.0 and out["duration_ms"]["p99"] == 1000.0
    assert out["cold_start_ms"] == {"count": 1, "avg": 40.0, "p50": 50.0, "p99": 50.0}
    assert out["queue_ms"]["count"] == 0 and out["queue_ms"]["p50"] is None


def test_forgetting_a_function_starts_it_again_at_zero() -> None:
    m = FunctionMetrics()
    m.invocations.labels("f", "ok").inc()
    m.duration.labels("f").observe(0.1)
    m.forget("f")
    m.forget("never-seen")
    assert summarise("f", [("n1", m.raw("f"))])["invocations"] == 0


def test_handler_headers_must_be_valid_http() -> None:
    ok = parse_response(b'{"statusCode": 201, "headers": {"X-Ok": "yes"}, "body": "b"}')
    assert ok.status_code == 201 and ok.headers == {"X-Ok": "yes"}
    assert parse_response(b"[1, 2]").body == [1, 2]  # any JSON value: a 200 body
    for bad in (
        b'{"statusCode": 200, "headers": {"X-Split": "a\\r\\nSet-Cookie: x"}}',
        b'{"statusCode": 200, "headers": {"Bad Name": "v"}}',
        b'{"statusCode": 700}',
        b'{"statusCode": true}',
        b"not json",
    ):
        try:
            parse_response(bad)
        except HandlerFailed:
            continue
        raise AssertionError(f"accepted {bad!r}")
