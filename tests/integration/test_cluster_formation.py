"""Cluster formation with real daemons: `blixard node start --cluster-init|--join` processes
on 127.0.0.1, each supervising its own etcd member, driven through the CLI.

One cluster serves the whole module (the tests run in order and build on each other):

1. node a alone (--cluster-init): the refusals a one-member cluster must give;
2. b and c join a -> three etcd members; d joins -> agent only;
3. bad joins (wrong token, same name twice) change nothing;
4. cordon / uncordon / drain, removing a SIGKILLed agent, restarting a member
   without --join, and a member leaving.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from tests.support.cluster import CONFIG, Cluster, Daemon, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    config = base / "config.toml"
    config.write_text(CONFIG)
    c = Cluster(base, config)
    a = c.daemon("a")
    a.start("--cluster-init", "--zone", "zone-a", "--label", "disk=ssd")
    try:
        a.wait_healthy()
        yield c
    finally:
        if a.running():  # a test that failed before deleting its VM: its task must go too
            with contextlib.suppress(Exception):
                for vm in c.get("/v1/vms")["items"]:
                    c.delete_vm(vm["vm"]["metadata"]["name"])
        for d in c.nodes.values():  # all at once: the last members lose quorum together
            d.terminate()
        for d in c.nodes.values():
            if d.proc is not None:
                try:
                    d.wait_stopped(30)
                finally:
                    d.kill()


def test_a_one_member_cluster_refuses_to_lose_its_member(cluster: Cluster) -> None:
    res = cluster.cli("cluster", "remove-node", "a", "--force")
    assert res.returncode == 1
    assert "cannot remove a: it holds the last etcd member" in res.stderr
    res = cluster.cli("cluster", "leave")
    assert res.returncode == 1 and "a cannot leave: it holds the last etcd member" in res.stderr
    assert cluster.members() == ["a"] and cluster.alive() == {"a": True}
    assert cluster.a.running()


def test_draining_the_only_node_with_instances_is_refused(cluster: Cluster) -> None:
    doc = {
        "kind": "VM",
        "metadata": {"name": "web"},
        "spec": {"hypervisor": "process", "boot": {"command": ["sleep", "600"]}},
    }
    resp = cluster.call("POST", "/v1/vms", json=doc)  # `blixard vm create` does the same
    assert resp.status_code == 201, resp.text

    def placed() -> bool:
        instances = cluster.get("/v1/instances")["items"]
        return any(i["spec"]["node"] == "a" for i in instances)

    wait_until(placed, what="web-0 placed on a")
    res = cluster.cli("cluster", "drain", "a")
    assert res.returncode == 1
    assert (
        "cannot drain a: no other schedulable node to take its 1 instance(s); nothing was changed"
        in res.stderr
    )
    node = cluster.get("/v1/nodes/a")["node"]
    assert node["spec"]["cordoned"] is False and node["spec"]["draining"] is False
    cluster.delete_vm("web")


def test_two_nodes_join_as_members_and_a_fourth_as_agent(cluster: Cluster) -> None:
    token = cluster.join_token()
    for name in ("b", "c"):
        cluster.daemon(name).start("--join", cluster.a.url, "--join-token", token)
    for name in ("b", "c"):
        cluster.nodes[name].wait_healthy(90)
    assert cluster.members() == ["a", "b", "c"]
    d = cluster.daemon("d")
    token_file = cluster.base / "token-for-d"
    token_file.write_text(token + "\n")
    d.start("--join", cluster.nodes["b"].url, "--join-token-file", str(token_file))
    d.wait_healthy()
    assert cluster.members() == ["a", "b", "c"]  # d is no etcd member
    assert json.loads((d.data_dir / "cluster.json").read_text())["role"] == "agent"
    assert not (d.data_dir / "etcd").exists()

    items = cluster.cli_json("cluster", "nodes")["items"]
    by_name = {i["node"]["metadata"]["name"]: i for i in items}
    assert sorted(by_name) == ["a", "b", "c", "d"]
    assert all(i["alive"] for i in items)
    assert "etcd" in by_name["b"]["node"]["spec"]["roles"]
    assert "etcd" not in by_name["d"]["node"]["spec"]["roles"]
    assert by_name["a"]["node"]["spec"]["zone"] == "zone-a"
    assert by_name["a"]["node"]["metadata"]["labels"] == {"disk": "ssd"}
    assert by_name["d"]["node"]["status"]["capacity"]["vcpus"] > 0

    status = cluster.get("/v1/cluster")
    assert status["nodes"]["alive"] == 4 and status["target_members"] == 3
    assert sum(m["leader"] for m in status["members"]) == 1
    assert all(m["healthy"] for m in status["members"])
    assert status["controller_leader"] in {"a", "b", "c", "d"}
    table = cluster.cli("cluster", "status", api=d)
    assert table.returncode == 0 and "d (agent)" in table.stdout


def test_bad_joins_are_refused_and_change_nothing(cluster: Cluster) -> None:
    wrong = cluster.daemon("e")  # a well-formed token the cluster never issued
    wrong.start("--join", cluster.a.url, "--join-token", "blx_000000000000_" + "x" * 43)
    twin = Daemon("b", cluster.base / "twin", cluster.config)  # b's name, while b is alive
    twin.data_dir.parent.mkdir()
    twin.start("--join", cluster.a.url, "--join-token", cluster.join_token())
    assert wrong.wait_stopped(30) == 1 and twin.wait_stopped(30) == 1
    log = wrong.log.read_text()
    assert f"cannot join {cluster.a.url}: the join token was refused" in log
    log = twin.log.read_text()
    assert f"cannot join {cluster.a.url}: node b is already a member of the cluster" in log
    for d in (wrong, twin):
        assert "Traceback" not in d.log.read_text()
        assert not (d.data_dir / "etcd").exists() and not (d.data_dir / "cluster.json").exists()
    assert cluster.members() == ["a", "b", "c"]
    assert cluster.alive() == {"a": True, "b": True, "c": True, "d": True}


def test_cordon_uncordon_and_drain(cluster: Cluster) -> None:
    res = cluster.cli("cluster", "cordon", "b")
    assert res.returncode == 0 and "node b cordoned" in res.stdout
    assert cluster.get("/v1/nodes/b")["node"]["spec"]["cordoned"] is True
    res = cluster.cli("cluster", "uncordon", "b")
    assert res.returncode == 0 and "node b uncordoned" in res.stdout
    assert cluster.get("/v1/nodes/b")["node"]["spec"]["cordoned"] is False
    res = cluster.cli("cluster", "drain", "c", "--timeout", "20s")
    assert res.returncode == 0, res.stderr
    assert "node c drained" in res.stdout
    spec = cluster.get("/v1/nodes/c")["node"]["spec"]
    assert spec["cordoned"] is True and spec["draining"] is True


def test_remove_a_killed_agent(cluster: Cluster) -> None:
    d = cluster.nodes["d"]
    res = cluster.cli("cluster", "remove-node", "d")
    assert res.returncode == 1 and "cannot remove d: it is alive" in res.stderr
    d.kill()
    wait_until(lambda: not cluster.alive()["d"], what="d's liveness lease to expire")
    res = cluster.cli("cluster", "remove-node", "d")
    assert res.returncode == 0, res.stderr
    assert "node d removed" in res.stdout
    assert cluster.node_names() == ["a", "b", "c"] and cluster.members() == ["a", "b", "c"]


def test_a_member_restarts_without_join(cluster: Cluster) -> None:
    b = cluster.nodes["b"]
    before = {m["name"]: m["id"] for m in cluster.get("/v1/cluster")["members"]}
    b.terminate()
    assert b.wait_stopped() == 0
    b.start(ports=False)  # no --join, no ports: cluster.json says how
    b.wait_healthy()
    assert "re-attached to the cluster" in b.log.read_text()
    after = {m["name"]: m["id"] for m in cluster.get("/v1/cluster")["members"]}
    assert after == before
    wait_until(lambda: cluster.alive().get("b") is True, what="b alive again")


def test_a_member_leaves(cluster: Cluster) -> None:
    c = cluster.nodes["c"]
    res = cluster.cli("cluster", "leave", api=c)
    assert res.returncode == 0, res.stderr
    assert "node c left the cluster (its etcd member removed)" in res.stdout
    assert c.wait_stopped() == 0
    assert cluster.members() == ["a", "b"] and cluster.node_names() == ["a", "b"]
    assert not (c.data_dir / "cluster.json").exists() and not (c.data_dir / "etcd").exists()
