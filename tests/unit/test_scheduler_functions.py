"""Placing function workers: claims of existing workers count, runtimes need their hypervisor."""

from __future__ import annotations

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.function import (
    FunctionSpec,
    FunctionWorker,
    FunctionWorkerSpec,
    Runtime,
    worker_name,
)
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec, NodeStatus, Resources
from blixard.domain.parse import parse
from blixard.domain.vm import Hypervisor
from blixard.scheduler.functions import worker_request, worker_views
from blixard.scheduler.placement import place


def node(name: str, memory_mib: int, *hypervisors: Hypervisor, **labels: str) -> Node:
    return Node(
        metadata=ObjectMeta(name=name, resource_version=1, labels=labels),
        spec=NodeSpec(),
        status=NodeStatus(
            ready=True,
            capacity=Resources(vcpus=8, memory_mib=memory_mib),
            hypervisors=list(hypervisors) or [Hypervisor.PROCESS],
        ),
    )


def spec(**fields: object) -> FunctionSpec:
    return parse(FunctionSpec, {"runtime": "command", "handler": "/bin/cat", **fields})


def worker(function: str, index: int, on: str) -> FunctionWorker:
    return FunctionWorker(
        metadata=ObjectMeta(name=worker_name(function, index)),
        spec=FunctionWorkerSpec(function=function, index=index, node=on),
    )


def test_workers_already_placed_claim_memory_on_their_node() -> None:
    fns = {"f": spec(memory_mib="512M")}
    nodes = [node("a", 1024), node("b", 1024)]
    views = worker_views(nodes, {"a", "b"}, [worker("f", 0, "a"), worker("f", 1, "a")], fns)
    assert [v.allocated.memory_mib for v in views] == [1024, 0]
    decision = place(views, worker_request(fns["f"]))
    assert decision.node == "b"
    full = worker_views(nodes, {"a", "b"}, [worker("f", i, n) for i, n in enumerate("aabb")], fns)
    refused = place(full, worker_request(fns["f"]))
    assert refused.node is None and "memory" in refused.reason


def test_a_dead_node_and_a_missing_hypervisor_are_not_chosen() -> None:
    nodes = [node("a", 4096), node("b", 4096, Hypervisor.PROCESS, Hypervisor.QEMU)]
    micro = spec(runtime="microvm", handler="cat")
    assert worker_request(micro).hypervisor is Hypervisor.QEMU
    assert place(worker_views(nodes, {"a", "b"}, [], {}), worker_request(micro)).node == "b"
    assert place(worker_views(nodes, {"a"}, [], {}), worker_request(micro)).node is None


def test_only_nodes_with_a_gateway_and_the_runtime_take_workers() -> None:
    gateway = node("gw", 4096)
    gateway.spec.gateway_url = "http://127.0.0.1:7480"
    gateway.spec.function_runtimes = ["command"]
    bare = node("bare", 8192)  # no gateway: a worker there would never start
    views = worker_views([gateway, bare], {"gw", "bare"}, [], {}, runtime=Runtime.COMMAND)
    assert [v.name for v in views] == ["gw"]
    assert worker_views([gateway, bare], {"gw", "bare"}, [], {}, runtime=Runtime.NIX) == []


def test_preferred_labels_steer_a_worker() -> None:
    nodes = [node("a", 4096), node("gpu", 4096, gpu="available")]
    wants_gpu = spec(placement={"preferred_labels": {"gpu": "available"}})
    assert place(worker_views(nodes, {"a", "gpu"}, [], {}), worker_request(wants_gpu)).node == "gpu"


@pytest.mark.parametrize(
    ("fields", "per_worker", "cap"),
    [
        ({}, 1, 10),  # max_instances 10, max_concurrency 100
        ({"max_concurrency": 2}, 1, 2),
        ({"max_concurrency": 3, "target_concurrency": 2}, 2, 1),  # rounded down, at least one
        ({"max_concurrency": 8, "target_concurrency": 4, "max_instances": 5}, 4, 2),
        ({"runtime": "microvm", "handler": "cat", "target_concurrency": 4}, 1, 10),
    ],
)
def test_the_worker_cap_keeps_cluster_slots_within_max_concurrency(
    fields: dict[str, object], per_worker: int, cap: int
) -> None:
    s = spec(**fields)
    assert s.per_worker == per_worker and s.worker_cap == cap
    assert s.worker_cap * s.per_worker <= s.max_concurrency or s.worker_cap == 1


def test_worker_records_refuse_bad_fields() -> None:
    with pytest.raises(ValidationError, match="index"):
        parse(FunctionWorkerSpec, {"function": "f", "index": -1, "node": "a"})
    with pytest.raises(ValidationError, match="node"):
        parse(FunctionWorkerSpec, {"function": "f", "index": 0, "node": "Not A Name"})
    assert Runtime("nix") is Runtime.NIX
