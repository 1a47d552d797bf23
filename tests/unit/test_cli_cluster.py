"""`blixard cluster ...` against a real API (one node on SQLite: no etcd cluster)."""

from __future__ import annotations

import json

import yaml

from blixard.domain.instance import ObservedState
from blixard.domain.keys import node_lease_key
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node
from tests.unit.test_cli_fixtures import NODE, Server, blixard, server

__all__ = ["server"]


def lines(text: str) -> list[str]:
    """Output lines without the in-process server's own log lines (same stdout here)."""
    return [line for line in text.strip().splitlines() if "[info     ]" not in line]


def add_alive_node(server: Server, name: str) -> None:
    async def write() -> None:
        assert server._store is not None
        await server.objects.create(Node(metadata=ObjectMeta(name=name, labels={"gpu": "a1"})))
        lease = await server._store.lease_grant(600)
        await server._store.put(node_lease_key(name), b"", lease=lease.id)

    server.run(write())


def test_status_in_every_format(server: Server) -> None:
    res = blixard(server, "cluster", "status")
    assert res.code == 0, res.stderr
    assert "This node" in res.stdout and f"{NODE} (standalone)" in res.stdout
    assert "1 total: 1 alive, 0 down" in res.stdout
    as_json = json.loads(blixard(server, "cluster", "status", "-o", "json").stdout)
    assert as_json["this_node"] == {"name": NODE, "role": "standalone"}
    assert as_json["members"] == [] and as_json["nodes"]["alive"] == 1
    assert yaml.safe_load(blixard(server, "cluster", "status", "-o", "yaml").stdout) == as_json


def test_nodes_table_and_json(server: Server) -> None:
    add_alive_node(server, "n2")
    server.add_instance("web", 0, ObservedState.RUNNING)
    res = blixard(server, "cluster", "nodes")
    assert res.code == 0, res.stderr
    header, *rows = res.stdout.strip().splitlines()
    assert header.split()[:5] == ["NAME", "ALIVE", "ROLES", "ZONE", "LABELS"]
    assert rows[0].split()[0] == NODE and rows[0].split()[-1] == "1"  # one instance on n1
    assert "gpu=a1" in rows[1]
    items = json.loads(blixard(server, "cluster", "nodes", "-o", "json").stdout)["items"]
    assert [(i["node"]["metadata"]["name"], i["instances"]) for i in items] == [
        (NODE, 1),
        ("n2", 0),
    ]


def test_cordon_uncordon(server: Server) -> None:
    res = blixard(server, "cluster", "cordon", NODE)
    assert res.code == 0 and lines(res.stdout) == [f"node {NODE} cordoned (cordoned)"]
    res = blixard(server, "cluster", "uncordon", NODE, "-o", "json")
    assert res.code == 0
    assert json.loads("\n".join(lines(res.stdout)))["node"]["spec"]["cordoned"] is False
    res = blixard(server, "cluster", "cordon", "n9")
    assert res.code == 1 and res.stderr.strip() == "error: node 'n9' does not exist"
    res = blixard(server, "cluster", "cordon", "Bad_Name")
    assert res.code == 2 and "name:" in res.stderr


def test_drain_the_only_node_with_instances_exits_1_and_changes_nothing(server: Server) -> None:
    server.add_instance("web", 0, ObservedState.RUNNING)
    server.add_instance("web", 1, ObservedState.RUNNING)
    res = blixard(server, "cluster", "drain", NODE)
    assert res.code == 1
    assert res.stderr.strip() == (
        f"error: cannot drain {NODE}: no other schedulable node to take its 2 instance(s); "
        "nothing was changed"
    )
    node = server.run(server.objects.get(Node, NODE))
    assert not node.spec.cordoned and not node.spec.draining


def test_drain_waits_and_says_what_is_left(server: Server) -> None:
    add_alive_node(server, "n2")
    server.add_instance("web", 0, ObservedState.RUNNING)
    res = blixard(server, "cluster", "drain", NODE, "--timeout", "0.5s")
    assert res.code == 1
    assert "node n1 draining: 1 instance(s) to move" in res.stdout
    assert f"node {NODE} still has 1 instance(s) assigned after 500ms: web-0" in res.stderr
    res = blixard(server, "cluster", "drain", NODE, "--no-wait", "-o", "json")
    assert res.code == 0
    assert json.loads("\n".join(lines(res.stdout)))["node"]["spec"]["draining"] is True
    res = blixard(server, "cluster", "drain", NODE, "--timeout", "soon")
    assert res.code == 2 and "--timeout" in res.stderr


def test_drain_of_an_idle_node_finishes_at_once(server: Server) -> None:
    res = blixard(server, "cluster", "drain", NODE)
    assert res.code == 0, res.stderr
    assert lines(res.stdout) == [
        f"node {NODE} draining: 0 instance(s) to move",
        f"node {NODE} drained",
    ]


def test_commands_that_need_a_cluster_say_so(server: Server) -> None:
    res = blixard(server, "cluster", "join-token")
    assert res.code == 1 and "no join token" in res.stderr
    res = blixard(server, "cluster", "leave")
    assert res.code == 1 and "not in a cluster" in res.stderr
    res = blixard(server, "cluster", "remove-node", NODE)
    assert res.code == 1 and "the node answering this request" in res.stderr


def test_remove_a_down_node(server: Server) -> None:
    server.run(server.objects.create(Node(metadata=ObjectMeta(name="n3"))))
    res = blixard(server, "cluster", "remove-node", "n3")
    assert res.code == 0 and lines(res.stdout) == ["node n3 removed"]
    res = blixard(server, "cluster", "remove-node", "n3")
    assert res.code == 1 and "'n3' does not exist" in res.stderr
