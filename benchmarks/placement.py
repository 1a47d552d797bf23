"""Placements committed per second by the VM controller, beside the raw store writes.

Run from the repository root::

    .venv/bin/python -m benchmarks.placement [--nodes 100,1000] [--instances 4000]
        [--backends sqlite,etcd3] [--rounds 3]

For each backend and node count, on a fresh store:

* ``N`` node records (64 vcpus, 256 GiB each, hypervisor ``process``) with
  their liveness keys on one lease, and ``--instances`` replicas to place,
  as VMs of 100 replicas of 256 MiB (the records only: nothing is started);
* **blixard**: one VM controller pass over everything, from its loaded cache
  (the watch-fed cache of controllers/cache.py), which places every replica
  with the real scheduler and commits the instance records with
  compare-and-swap in transactions of ``BATCH`` writes, plus the VMs'
  status and the nodes' allocations. Placements per second = replicas
  placed / wall time of the pass; the pass is split into deciding (CPU,
  pure) and committing;
* **raw**: the same number of instance-sized values written by
  ``store.txn`` with the same batch size and one "absent" compare per key,
  i.e. the store's own rate for those commits.

Rounds alternate blixard and raw (ABBA). Everything printed is measured in
the run; the goal from the cluster issue is at least 3,750 placements/s at
1,000 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tests.support.etcd_cluster import EtcdCluster

from blixard.controllers.plan import Policy, plan
from blixard.controllers.vms import BATCH, VmController
from blixard.domain.instance import Instance, InstanceSpec
from blixard.domain.keys import node_lease_key
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeStatus, Resources
from blixard.domain.parse import parse, to_json_bytes
from blixard.domain.vm import VM, Hypervisor
from blixard.scheduler.placement import default_limit
from blixard.store.objects import ObjectStore
from blixard.store.protocol import Compare, Delete, Put, StateStore
from blixard.store.sqlite import SqliteStore

GOAL = 3750.0
REPLICAS_PER_VM = 100


async def open_backend(kind: str, work: Path) -> tuple[StateStore, EtcdCluster | None]:
    if kind == "sqlite":
        return await SqliteStore.open(work / "state.db"), None
    size = int(kind.removeprefix("etcd"))
    cluster = EtcdCluster(work / "etcd", size)
    await cluster.start()
    return cluster.client(timeout_s=30), cluster


async def populate(store: StateStore, nodes: int, instances: int) -> None:
    objects = ObjectStore(store)
    lease = await store.lease_grant(600)
    now = datetime.now(UTC)
    puts: list[Put] = []
    for i in range(nodes):
        node = Node(
            metadata=ObjectMeta(name=f"n{i:04d}", generation=1, created_at=now),
            status=NodeStatus(
                ready=True,
                capacity=Resources(vcpus=64, memory_mib=256 * 1024),
                hypervisors=[Hypervisor.PROCESS],
            ),
        )
        puts.append(Put(node.key(), to_json_bytes(node)))
        puts.append(Put(node_lease_key(node.metadata.name), b"1", lease=lease.id))
    for start in range(0, len(puts), BATCH):
        await store.txn([], puts[start : start + BATCH])
    for v in range(instances // REPLICAS_PER_VM):
        doc = {
            "metadata": {"name": f"vm{v:03d}", "generation": 1, "created_at": now.isoformat()},
            "spec": {
                "hypervisor": "process",
                "replicas": REPLICAS_PER_VM,
                "memory_mib": "256M",
                "boot": {"command": ["sleep", "600"]},
            },
        }
        await objects.create(parse(VM, doc))


async def blixard_round(store: StateStore, nodes: int) -> dict[str, float]:
    policy = Policy(placement_limit=default_limit)
    controller = VmController(store, policy=policy)
    await controller.cache.load(store)
    snapshot = controller.snapshot()
    t0 = time.perf_counter()
    decided = plan(snapshot, policy)
    t1 = time.perf_counter()
    await controller.commit(decided)
    t2 = time.perf_counter()
    placed = decided.placements
    # Clean up for the next round: delete the instance records (not timed).
    instances = await ObjectStore(store).list(Instance)
    for start in range(0, len(instances), BATCH):
        await store.txn([], [Delete(i.key()) for i in instances[start : start + BATCH]])
    return {
        "placements": placed,
        "decide_s": t1 - t0,
        "commit_s": t2 - t1,
        "rate": placed / (t2 - t0),
        "decide_rate": placed / (t1 - t0),
    }


async def raw_round(store: StateStore, count: int, round_no: int) -> dict[str, float]:
    now = datetime.now(UTC)
    sample = Instance(
        metadata=ObjectMeta(name="vm000-0", uid=uuid.uuid4(), generation=1, created_at=now),
        spec=InstanceSpec(vm="vm000", index=0, node="n0000", epoch=1, assigned_at=now),
    )
    value = to_json_bytes(sample)
    keys = [f"/bench/raw/{round_no}/{i}" for i in range(count)]
    t0 = time.perf_counter()
    for start in range(0, count, BATCH):
        chunk = keys[start : start + BATCH]
        await store.txn([Compare.absent(k) for k in chunk], [Put(k, value) for k in chunk])
    elapsed = time.perf_counter() - t0
    await store.delete(f"/bench/raw/{round_no}/", prefix=True)
    return {"rate": count / elapsed}


async def run_case(kind: str, nodes: int, instances: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="blixard-placement-") as tmp:
        store, cluster = await open_backend(kind, Path(tmp))
        try:
            await populate(store, nodes, instances)
            ours: list[dict[str, float]] = []
            raw: list[dict[str, float]] = []
            for r in range(rounds):
                order = ("blixard", "raw") if r % 2 == 0 else ("raw", "blixard")
                for which in order:
                    if which == "blixard":
                        ours.append(await blixard_round(store, nodes))
                    else:
                        raw.append(await raw_round(store, instances, r))
        finally:
            await store.close()
            if cluster is not None:
                cluster.stop()
    rate = statistics.median(o["rate"] for o in ours)
    raw_rate = statistics.median(o["rate"] for o in raw)
    return {
        "backend": kind,
        "nodes": nodes,
        "placed": ours[0]["placements"],
        "rate": rate,
        "raw_rate": raw_rate,
        "decide_rate": statistics.median(o["decide_rate"] for o in ours),
        "decide_ms": statistics.median(o["decide_s"] for o in ours) * 1000,
        "commit_ms": statistics.median(o["commit_s"] for o in ours) * 1000,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="100,1000")
    parser.add_argument("--instances", type=int, default=4000)
    parser.add_argument("--backends", default="sqlite,etcd3")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"placements committed per second: {args.instances} replicas of 256 MiB, "
        f"batches of {BATCH}, median of {args.rounds} ABBA rounds "
        f"(goal {GOAL:,.0f}/s at 1,000 nodes)"
    )
    print(
        f"{'backend':8} {'nodes':>6} {'placed':>7} {'blixard/s':>10} {'raw txn/s':>10} "
        f"{'ratio':>6} {'decide/s':>9} {'decide ms':>10} {'commit ms':>10}"
    )
    for kind in args.backends.split(","):
        for nodes in (int(n) for n in args.nodes.split(",")):
            r = asyncio.run(run_case(kind, nodes, args.instances, args.rounds))
            print(
                f"{r['backend']:8} {r['nodes']:>6} {r['placed']:>7} {r['rate']:>10,.0f} "
                f"{r['raw_rate']:>10,.0f} {r['raw_rate'] / r['rate']:>6.2f} "
                f"{r['decide_rate']:>9,.0f} {r['decide_ms']:>10.1f} {r['commit_ms']:>10.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
