"""Services on a real 3-node cluster (its own 3-member etcd), units run as real processes.

* a placed service (``--replicas 1``, only on worker nodes) whose node is killed with
  ``kill -9`` comes back on the other worker, and never runs twice at once;
* an all-nodes service runs on every node; the dead node's copy is not moved anywhere
  (pinning forbids other nodes): its entry shows the node down.

The service verbs go through the CLI as a user types them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_cluster_failover import task_copies
from tests.support.cluster import Cluster, wait_until

TTL_S = 3
CONFIG = f"""
[store]
lease_ttl_s = {TTL_S}
timeout_s = 3
[microvm]
build_default_image = false
[functions]
runtimes = ["command"]
"""
UNIT = """[Unit]
Description=a unit that must run once in the cluster

[Service]
ExecStart=/bin/sleep 3600
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("service-failover")
    units = base / "units"
    units.mkdir()
    (units / "ha.service").write_text(UNIT)
    (units / "everywhere.service").write_text(UNIT)
    config = base / "config.toml"
    config.write_text(CONFIG)
    c = Cluster(base, config)
    services = ("--service-driver", "process", "--unit-dir", str(units))
    a = c.daemon("a")
    a.start("--cluster-init", "--label", "tier=init", *services)
    try:
        a.wait_healthy()
        token = c.join_token()
        for name in ("b", "c"):  # one at a time: etcd adds one member at a time
            d = c.daemon(name)
            d.start("--join", a.url, "--join-token", token, "--label", "tier=worker", *services)
            d.wait_healthy()
        yield c
    finally:
        with contextlib.suppress(Exception):
            for item in c.get("/v1/services")["items"]:
                c.call("DELETE", f"/v1/services/{item['metadata']['name']}")
            wait_until(lambda: not c.get("/v1/instances")["items"], 30, "instances gone")
        for d in c.nodes.values():
            d.terminate()
        for d in c.nodes.values():
            if d.proc is not None:
                try:
                    d.wait_stopped(30)
                finally:
                    d.kill()


def service(c: Cluster, name: str) -> dict[str, Any]:
    data: dict[str, Any] = c.get(f"/v1/services/{name}")
    return data


def running_nodes(c: Cluster, name: str) -> list[str]:
    nodes = service(c, name)["status"]["nodes"]
    return sorted(n for n, s in nodes.items() if (s["active_state"], s["sub_state"]) == (
        "active", "running"))  # fmt: skip


def test_a_placed_service_comes_back_on_another_node(cluster: Cluster) -> None:
    res = cluster.cli(
        "service", "start", "ha", "--replicas", "1", "--node-selector", "tier=worker",
        "--timeout", "60s",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (first,) = running_nodes(cluster, "ha")
    assert first in {"b", "c"}
    assert task_copies(cluster, "svc-ha-0") == {first}
    res = cluster.cli("service", "start", "everywhere", "--all-nodes", "--timeout", "60s")
    assert res.returncode == 0, res.stderr
    assert running_nodes(cluster, "everywhere") == ["a", "b", "c"]

    victim = cluster.nodes[first]
    victim.kill()  # kill -9: its etcd member dies with it; its tasks' shims live on
    killed_at = time.monotonic()
    while True:
        copies = task_copies(cluster, "svc-ha-0")
        assert len(copies) <= 1, f"two copies of the unit at once: {copies}"
        if running_nodes(cluster, "ha") not in ([], [first]):
            break
        assert time.monotonic() - killed_at < 60, service(cluster, "ha")["status"]
        time.sleep(0.1)
    (second,) = running_nodes(cluster, "ha")
    assert second in {"b", "c"} and second != first
    assert task_copies(cluster, "svc-ha-0") == {second}
    print(f"failover took {time.monotonic() - killed_at:.1f}s")

    status = json.loads(cluster.cli("service", "status", "ha", "-o", "json").stdout)
    assert status["status"]["phase"] == "running"
    # The all-nodes service stays where it is: the dead node's entry says so.
    nodes = service(cluster, "everywhere")["status"]["nodes"]
    assert nodes[first]["active_state"] == "unknown" and not nodes[first]["node_alive"]
    assert sorted(n for n in nodes if n != first) == sorted({"a", "b", "c"} - {first})
    table = cluster.cli("service", "status", "everywhere").stdout
    assert "is down" in table

    victim.start()  # no --join: it re-attaches to its member
    victim.wait_healthy()
    wait_until(lambda: running_nodes(cluster, "everywhere") == ["a", "b", "c"], 30, "back")
    assert task_copies(cluster, "svc-ha-0") == {second}


def test_list_cluster_shows_the_nodes(cluster: Cluster) -> None:
    res = cluster.cli("service", "list-cluster", "-o", "json")
    assert res.returncode == 0, res.stderr
    names = sorted(i["node"]["metadata"]["name"] for i in json.loads(res.stdout)["items"])
    assert names == ["a", "b", "c"]
