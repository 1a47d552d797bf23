"""Builders for the scheduler tests: node views and requests from a few keywords.

Named ``test_scheduler_*`` only to live beside the tests it serves; it holds no
tests itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from blixard.domain.node import Node, Resources
from blixard.domain.placement import Placement
from blixard.domain.vm import Hypervisor
from blixard.scheduler.placement import NodeView, Request

GIB = 1024  # in MiB


def view(
    name: str = "n1",
    *,
    vcpus: int = 8,
    memory_mib: int = 16 * GIB,
    disk_mib: int = 100 * GIB,
    used: tuple[int, int, int] = (0, 0, 0),
    labels: Mapping[str, str] | None = None,
    zone: str | None = None,
    cordoned: bool = False,
    draining: bool = False,
    hypervisors: Iterable[str] = ("qemu",),
    kvm: str = "available",
    kvm_detail: str = "",
    alive: bool = True,
    groups: Iterable[str] = (),
) -> NodeView:
    """A node view; ``used`` is the allocated (vcpus, memory MiB, disk MiB)."""
    node = Node.model_validate(
        {
            "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": {"zone": zone, "cordoned": cordoned, "draining": draining},
            "status": {
                "ready": True,
                "capacity": {"vcpus": vcpus, "memory_mib": memory_mib, "disk_mib": disk_mib},
                "hypervisors": list(hypervisors),
                "kvm": kvm,
                "kvm_detail": kvm_detail,
            },
        }
    )
    allocated = Resources(vcpus=used[0], memory_mib=used[1], disk_mib=used[2])
    return NodeView(node, alive, allocated, frozenset(groups))


def request(
    *,
    vcpus: int = 1,
    memory_mib: int = 512,
    disk_mib: int = 0,
    hypervisor: str = "qemu",
    needs_kvm: bool = False,
    near_zone: str | None = None,
    workload: Literal["vm", "function"] = "vm",
    **placement: Any,
) -> Request:
    """A request; the remaining keywords are Placement fields (``constraints="a=b"``...)."""
    return Request(
        Resources(vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib),
        Hypervisor(hypervisor),
        Placement.model_validate(placement),
        needs_kvm=needs_kvm,
        near_zone=near_zone,
        workload=workload,
    )
