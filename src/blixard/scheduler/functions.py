"""Placing function workers: the request a worker makes and the views it is placed against.

Pure like the rest of the scheduler: callers (the gateway on a cold start,
the autoscaler) pass what they read from the store. A worker claims its
function's memory on its node; the node's stored ``allocated`` (what the VM
controller placed) plus the workers already there is what is in use, so
functions and VMs share one memory budget. vCPUs are not claimed: a warm
worker uses CPU only while it runs an invocation, so function workers
overcommit CPU (as the design brief asks for serverless), and the
concurrency caps, not the placement, bound how much CPU they take at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from blixard.domain.function import FunctionSpec, FunctionWorker, Runtime
from blixard.domain.node import Node, Resources
from blixard.domain.vm import Hypervisor
from blixard.scheduler.interface import NodeView, Request


def worker_request(spec: FunctionSpec, near_zone: str | None = None) -> Request:
    """What one worker of ``spec`` needs: a microVM runtime needs QEMU, the others processes."""
    hypervisor = Hypervisor.QEMU if spec.runtime is Runtime.MICROVM else Hypervisor.PROCESS
    return Request(
        resources=Resources(vcpus=0, memory_mib=spec.memory_mib),
        hypervisor=hypervisor,
        placement=spec.placement,
        near_zone=near_zone,
        workload="function",
    )


def can_host(node: Node, runtime: Runtime) -> bool:
    """Whether ``node`` runs a gateway with ``runtime``: only there can a worker start."""
    return node.spec.gateway_url is not None and runtime.value in node.spec.function_runtimes


def worker_views(
    nodes: Iterable[Node],
    alive: set[str],
    workers: Iterable[FunctionWorker],
    specs: Mapping[str, FunctionSpec],
    runtime: Runtime | None = None,
) -> list[NodeView]:
    """One view per node: its stored allocation plus the claims of the workers on it.

    ``specs`` maps function names to their specs (a worker of a function no longer
    known claims nothing: it is about to be removed). With ``runtime``, only the
    nodes that can host a worker of it (:func:`can_host`) are in the list.
    """
    if runtime is not None:
        nodes = [n for n in nodes if can_host(n, runtime)]
    claims: dict[str, int] = {}
    for worker in workers:
        spec = specs.get(worker.spec.function)
        if spec is None:
            continue
        claims[worker.spec.node] = claims.get(worker.spec.node, 0) + spec.memory_mib
    views = []
    for node in sorted(nodes, key=lambda n: n.metadata.name):
        name = node.metadata.name
        stored = node.status.allocated
        allocated = Resources(
            vcpus=stored.vcpus,
            memory_mib=stored.memory_mib + claims.get(name, 0),
            disk_mib=stored.disk_mib,
        )
        views.append(NodeView(node, name in alive, allocated))
    return views
