"""Functions across a real 2-node cluster (etcd, two daemons): an invocation arriving at
one node runs on a worker of the other, a cold start happens on the node the scheduler
picks, HTTP triggers work on every node's gateway, metrics and logs add up every node.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import CONFIG, Cluster, wait_until

NIX = '{ event, context }: { statusCode = 200; body = "hi ${event.who}"; }'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("fncluster")
    config = base / "config.toml"
    config.write_text(CONFIG)
    c = Cluster(base, config)
    a, b = c.daemon("a"), c.daemon("b")
    try:
        a.start("--cluster-init")
        a.wait_healthy()
        b.start("--join", a.url, "--join-token", c.join_token(), "--label", "pool=workers")
        b.wait_healthy()
        wait_until(lambda: c.alive() == {"a": True, "b": True}, what="a and b alive")
        yield c
    finally:
        for d in c.nodes.values():
            d.terminate()
        for d in c.nodes.values():
            if d.proc is not None:
                with contextlib.suppress(AssertionError):
                    d.wait_stopped(30)
                d.kill()


def invoke(c: Cluster, name: str, event: object) -> httpx.Response:
    resp = c.call("POST", f"/v1/functions/{name}/invoke", json=event)
    return resp


def test_a_call_at_one_node_cold_starts_and_runs_on_the_other(cluster: Cluster) -> None:
    spec = {
        "runtime": "nix",
        "handler": NIX,
        "placement": {"node_selector": {"pool": "workers"}},
        "triggers": [{"type": "http", "path": "/hi", "methods": ["POST"]}],
    }
    resp = cluster.call("POST", "/v1/functions", json={"metadata": {"name": "hi"}, "spec": spec})
    assert resp.status_code == 201, resp.text
    first = invoke(cluster, "hi", {"who": "one"})  # arrives at a, runs on b
    assert first.status_code == 200, first.text
    assert first.text == "hi one"
    assert first.headers["X-Blixard-Node"] == "b"
    assert first.headers["X-Blixard-Cold-Start"] == "true"
    second = invoke(cluster, "hi", {"who": "two"})
    assert second.headers["X-Blixard-Node"] == "b"
    assert second.headers["X-Blixard-Cold-Start"] == "false"
    # The trigger answers on a's gateway too (forwarded to b's worker).
    a_gateway = f"http://127.0.0.1:{cluster.a.gateway_port}/hi"
    via = httpx.post(a_gateway, json={"who": "web"}, timeout=30)
    assert via.status_code == 200 and via.text == "hi web"
    assert via.headers["X-Blixard-Node"] == "b"
    fn = cluster.get("/v1/functions/hi")
    wait_until(lambda: cluster.get("/v1/functions/hi")["status"]["nodes"] == {"b": 1},
               what="hi's worker reported on b")  # fmt: skip
    assert fn["status"]["workers"] >= 0


def test_metrics_and_logs_add_up_every_node(cluster: Cluster) -> None:
    failing = invoke(cluster, "hi", {"nobody": 1})
    assert failing.status_code == 502, failing.text
    summary = cluster.get("/v1/functions/hi/metrics")
    assert summary["nodes"] == ["a", "b"]
    assert summary["invocations"] == 4 and summary["errors"] == 1  # counted where they ran
    assert summary["cold_starts"] == 1 and summary["warm_starts"] == 3
    logs = cluster.call("GET", "/v1/functions/hi/logs").text
    assert " b hi-w" in logs and "who" in logs  # b's line about the missing attribute


def test_forwarded_calls_need_the_cluster_secret(cluster: Cluster) -> None:
    b_gateway = f"http://127.0.0.1:{cluster.nodes['b'].gateway_port}"
    resp = httpx.post(f"{b_gateway}/_blixard/v1/workers/hi-w0/invoke", json={}, timeout=10)
    assert resp.status_code == 401 and resp.headers["X-Blixard-Error"] == "unauthorized"
    raw = httpx.get(f"{b_gateway}/_blixard/v1/functions/hi/metrics-raw", timeout=10)
    assert raw.status_code == 401


def test_a_command_function_placed_anywhere_serves_from_both_entry_points(
    cluster: Cluster, tmp_path: Path
) -> None:
    handler = tmp_path / "h.py"
    handler.write_text(
        f"#!{sys.executable}\nimport json, os, sys\njson.load(sys.stdin)\n"
        "print(json.dumps({'pid': os.getpid()}))\n"
    )
    handler.chmod(0o755)
    doc = {
        "metadata": {"name": "anywhere"},
        "spec": {"runtime": "command", "handler": str(handler)},
    }
    assert cluster.call("POST", "/v1/functions", json=doc).status_code == 201
    at_a = invoke(cluster, "anywhere", {})
    assert at_a.status_code == 200 and at_a.json()["pid"] > 0
    token = (cluster.a.data_dir / "admin.token").read_text().strip()
    at_b = httpx.post(
        f"{cluster.nodes['b'].url}/v1/functions/anywhere/invoke",
        json={},
        headers={"Authorization": f"Bearer {token}"},  # tokens are cluster-wide
        timeout=30,
    )
    assert at_b.status_code == 200, at_b.text
    workers = {at_a.headers["X-Blixard-Worker"], at_b.headers["X-Blixard-Worker"]}
    assert workers <= {"anywhere-w0", "anywhere-w1"}
