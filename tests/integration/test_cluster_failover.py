"""Failover on a real 3-node cluster: three `blixard node start` daemons on 127.0.0.1
forming their own 3-member etcd, VMs on the process driver and a real QEMU microVM.

The tests run in order on one cluster:

1. VMs are placed and run (node selectors keep the QEMU VM off node a, whose API
   the tests read, and pin one process VM to a);
2. kill -9 of the node running the microVM: it runs elsewhere at a new epoch, and
   at no moment do two copies run; the node comes back and keeps no stale copy;
   a drain moves a node's instances away (stopped there first);
3. kill -9 of the node holding the etcd leader: the other nodes' APIs keep answering;
4. node a cut off from the store (its own etcd member, its only endpoint, stopped):
   it fences its instance before its lease could expire, and runs it again once
   the store answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import Cluster, Daemon, wait_until

TTL_S = 3
CONFIG = f"""
[store]
lease_ttl_s = {TTL_S}
timeout_s = 3
[microvm]
accel = "tcg"
"""


def task_copies(c: Cluster, instance: str) -> set[str]:
    """The nodes (by data dir) on which a process of ``instance``'s task lives."""
    found = set()
    marker = f"/vms/{instance}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker not in cmdline:
            continue
        for name, d in c.nodes.items():
            if str(d.data_dir).encode() + b"/" in cmdline:
                found.add(name)
    return found


def instance(c: Cluster, name: str) -> dict[str, Any]:
    result: dict[str, Any] = c.get(f"/v1/instances?vm={name.rsplit('-', 1)[0]}")
    for item in result["items"]:
        if item["metadata"]["name"] == name:
            return item
    raise AssertionError(f"no instance {name}")


def running_on(c: Cluster, name: str) -> str | None:
    """The node running ``name`` for its current assignment, else None."""
    inst = instance(c, name)
    spec, st = inst["spec"], inst["status"]
    current = st["node"] == spec["node"] and st["epoch"] == spec["epoch"]
    return spec["node"] if current and st["state"] == "running" else None


def create(c: Cluster, name: str, spec: dict[str, Any]) -> None:
    resp = c.call("POST", "/v1/vms", json={"metadata": {"name": name}, "spec": spec})
    assert resp.status_code == 201, resp.text


def etcd_pid(d: Daemon) -> int:
    """The pid of the etcd member that ``d``'s daemon supervises."""
    marker = str(d.data_dir / "etcd").encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if os.path.basename(cmd[0]) == b"etcd" and any(marker in a for a in cmd):
                    return int(proc.name)
    raise AssertionError(f"no etcd member process for {d.name}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("failover")
    config = base / "config.toml"
    config.write_text(CONFIG)
    c = Cluster(base, config)
    a = c.daemon("a")
    a.start("--cluster-init", "--label", "tier=init")
    try:
        a.wait_healthy()
        token = c.join_token()
        for name in ("b", "c"):
            d = c.daemon(name)
            d.start("--join", a.url, "--join-token", token, "--label", "tier=worker")
            d.wait_healthy()
        assert c.members() == ["a", "b", "c"]
        yield c
    finally:
        with contextlib.suppress(Exception):
            for vm in c.get("/v1/vms")["items"]:
                c.delete_vm(vm["vm"]["metadata"]["name"])
        for d in c.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                if d.running():
                    os.kill(etcd_pid(d), signal.SIGCONT)
            d.terminate()
        for d in c.nodes.values():
            if d.proc is not None:
                try:
                    d.wait_stopped(30)
                finally:
                    d.kill()


def test_vms_are_placed_and_run(cluster: Cluster) -> None:
    worker = {"node_selector": {"tier": "worker"}}
    create(
        cluster, "micro", {"memory_mib": "128M", "boot": {"image": "default"}, "placement": worker}
    )
    create(
        cluster,
        "svc",
        {"hypervisor": "process", "replicas": 2, "memory_mib": "32M",
         "boot": {"command": ["sleep", "3600"]}, "placement": worker},
    )  # fmt: skip
    create(
        cluster,
        "pinned",
        {"hypervisor": "process", "memory_mib": "32M", "boot": {"command": ["sleep", "3600"]},
         "placement": {"node_selector": {"tier": "init"}}},
    )  # fmt: skip
    for name in ("micro-0", "svc-0", "svc-1", "pinned-0"):
        wait_until(lambda n=name: running_on(cluster, n), 90, f"{name} running")
    assert running_on(cluster, "micro-0") in {"b", "c"}
    assert running_on(cluster, "pinned-0") == "a"
    reason = cluster.get("/v1/vms/micro")["vm"]["status"]["placement_reason"]
    assert "placed on" in reason, reason


def test_a_killed_node_s_instances_run_elsewhere_never_twice(cluster: Cluster) -> None:
    victim_name = running_on(cluster, "micro-0")
    assert victim_name in {"b", "c"}
    victim = cluster.nodes[victim_name]
    before = instance(cluster, "micro-0")
    moving = [
        i["metadata"]["name"]
        for i in cluster.get("/v1/instances")["items"]
        if i["spec"]["node"] == victim_name
    ]
    assert task_copies(cluster, "micro-0") == {victim_name}
    victim.kill()  # kill -9: its etcd member dies with it, its tasks' shims live on
    killed_at = time.monotonic()
    most = 0
    fenced_at = None
    while True:
        copies = task_copies(cluster, "micro-0")
        most = max(most, len(copies))
        assert len(copies) <= 1, f"two copies of micro-0 at once: {copies}"
        if fenced_at is None and victim_name not in copies:
            fenced_at = time.monotonic()
        placed = [running_on(cluster, n) for n in moving]
        if all(p is not None and p != victim_name for p in placed):
            break
        assert time.monotonic() - killed_at < 90, f"not failed over: {placed}"
        time.sleep(0.1)
    assert fenced_at is not None and fenced_at - killed_at < TTL_S
    after = instance(cluster, "micro-0")
    assert after["spec"]["epoch"] == before["spec"]["epoch"] + 1
    assert after["spec"]["node"] not in {victim_name, "a"}  # the node selector still holds
    # The node comes back (no --join: it re-attaches to its member) with no stale copy.
    victim.start()
    victim.wait_healthy()
    wait_until(lambda: cluster.alive().get(victim_name), 30, f"{victim_name} alive again")
    # Restarted without --label: it keeps its labels (its VMs' selectors still match it).
    labels = cluster.get(f"/v1/nodes/{victim_name}")["node"]["metadata"]["labels"]
    assert labels == {"tier": "worker"}, labels
    time.sleep(1)
    assert task_copies(cluster, "micro-0") == {after["spec"]["node"]}


def test_drain_moves_instances_one_copy_at_a_time(cluster: Cluster) -> None:
    def on(node: str) -> list[str]:
        items = cluster.get("/v1/instances")["items"]
        return sorted(i["metadata"]["name"] for i in items if i["spec"]["node"] == node)

    wait_until(lambda: running_on(cluster, "svc-0") and running_on(cluster, "svc-1"), 60, "svc")
    target = next(n for n in ("b", "c") if on(n))
    moving = on(target)
    res = cluster.cli("cluster", "drain", target, "--timeout", "90s")
    assert res.returncode == 0, res.stderr
    assert on(target) == []
    other = "c" if target == "b" else "b"  # the node selector allows only b and c
    for name in moving:
        wait_until(lambda n=name: running_on(cluster, n) == other, 90, f"{name} on {other}")
        assert task_copies(cluster, name) == {other}
    node = cluster.get(f"/v1/nodes/{target}")["node"]
    assert node["spec"]["cordoned"] and node["spec"]["draining"]
    assert cluster.cli("cluster", "uncordon", target).returncode == 0


def test_killing_the_etcd_leader_keeps_the_api_answering(cluster: Cluster) -> None:
    members = cluster.get("/v1/cluster")["members"]
    leader = next(m["name"] for m in members if m.get("leader"))
    others = [d for n, d in cluster.nodes.items() if n != leader]
    token = (cluster.a.data_dir / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    cluster.nodes[leader].kill()
    killed_at = time.monotonic()
    answered = {d.name: False for d in others}
    while not all(answered.values()):
        assert time.monotonic() - killed_at < 20, f"APIs still not answering: {answered}"
        for d in others:
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(d.url + "/v1/vms", headers=headers, timeout=2)
                answered[d.name] = answered[d.name] or resp.status_code == 200
        time.sleep(0.1)
    # And a write goes through the new leader.
    resp = httpx.post(
        others[0].url + "/v1/vms",
        headers=headers,
        json={"metadata": {"name": "after"}, "spec": {"hypervisor": "process", "replicas": 0,
              "boot": {"command": ["sleep", "1"]}}},
        timeout=10,
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    cluster.nodes[leader].start()
    cluster.nodes[leader].wait_healthy()
    wait_until(lambda: all(cluster.alive().values()), 30, "all nodes alive again")


def test_a_node_cut_off_from_the_store_fences_itself(cluster: Cluster) -> None:
    wait_until(lambda: running_on(cluster, "pinned-0") == "a", 60, "pinned-0 running on a")
    assert task_copies(cluster, "pinned-0") == {"a"}
    member = etcd_pid(cluster.a)  # node a's only endpoint: its own member
    os.kill(member, signal.SIGSTOP)
    cut_at = time.monotonic()
    try:
        wait_until(lambda: not task_copies(cluster, "pinned-0"), 15, "a to fence pinned-0")
        fenced_after = time.monotonic() - cut_at
        # Fenced before a's lease could expire (its last keepalive was sent before the cut).
        assert fenced_after < TTL_S, fenced_after
    finally:
        os.kill(member, signal.SIGCONT)
    wait_until(lambda: running_on(cluster, "pinned-0") == "a", 60, "pinned-0 running again on a")
    assert task_copies(cluster, "pinned-0") == {"a"}
