"""Scheduler filters: each refuses what it should, with a message a user can act on."""

from __future__ import annotations

import pytest

from blixard.domain.placement import Constraint
from blixard.scheduler.compiled import request_facts
from blixard.scheduler.constraints import check_constraint, compile_constraint, meets, size_text
from blixard.scheduler.filters import (
    ALIVE,
    ALL_FILTERS,
    ANTI_AFFINITY,
    CAPACITY,
    CONSTRAINTS,
    CORDON,
    HYPERVISOR,
    KVM,
    NODE_SELECTOR,
    filters_for,
    refusal,
    screen,
)
from blixard.scheduler.interface import facts_of
from tests.unit.test_scheduler_support import GIB, request, view


def test_alive() -> None:
    assert ALIVE.check(view(), request()) is None
    assert ALIVE.check(view(alive=False), request()) == "node is down (its liveness lease expired)"


def test_cordoned_and_draining() -> None:
    assert CORDON.check(view(), request()) is None
    assert CORDON.check(view(cordoned=True), request()) == "node is cordoned"
    # A draining node is cordoned even when its cordon flag was not set.
    assert CORDON.check(view(draining=True), request()) == "node is draining (cordoned)"
    assert CORDON.check(view(cordoned=True, draining=True), request()) == (
        "node is draining (cordoned)"
    )


def test_hypervisor() -> None:
    assert HYPERVISOR.check(view(hypervisors=["qemu", "process"]), request()) is None
    assert HYPERVISOR.check(view(hypervisors=["process", "firecracker"]), request()) == (
        "does not offer hypervisor qemu (offers firecracker, process)"
    )
    assert HYPERVISOR.check(view(hypervisors=[]), request()) == (
        "does not offer hypervisor qemu (offers none)"
    )


def test_kvm_only_when_asked() -> None:
    tcg_only = view(kvm="unusable", kvm_detail="probe guest did not boot\nsecond line")
    assert KVM.check(tcg_only, request()) is None
    assert KVM.check(view(kvm="available"), request(needs_kvm=True)) is None
    assert KVM.check(tcg_only, request(needs_kvm=True)) == (
        "needs KVM (accel kvm) but KVM is unusable here: probe guest did not boot"
    )
    assert KVM.check(view(kvm="absent"), request(needs_kvm=True)) == (
        "needs KVM (accel kvm) but KVM is absent here"
    )


def test_kvm_detail_is_shortened() -> None:
    long = view(kvm="unusable", kvm_detail="x" * 300)
    why = KVM.check(long, request(needs_kvm=True))
    assert why is not None
    assert why.endswith("...")
    assert len(why) < 150


def test_capacity_each_dimension() -> None:
    node = view(vcpus=4, memory_mib=4096, disk_mib=10_000, used=(2, 2048, 9_000))
    assert CAPACITY.check(node, request(vcpus=2, memory_mib=2048, disk_mib=1000)) is None
    assert CAPACITY.check(node, request(vcpus=3)) == "not enough capacity: vcpus 3 > 2 free"
    assert CAPACITY.check(node, request(memory_mib=4096)) == (
        "not enough capacity: memory 4096MiB > 2048MiB free"
    )
    assert CAPACITY.check(node, request(disk_mib=1001)) == (
        "not enough capacity: disk 1001MiB > 1000MiB free"
    )
    assert CAPACITY.check(node, request(vcpus=3, memory_mib=4096)) == (
        "not enough capacity: vcpus 3 > 2 free, memory 4096MiB > 2048MiB free"
    )


def test_capacity_overallocated_node_has_nothing_free() -> None:
    node = view(vcpus=2, memory_mib=1024, used=(4, 2048, 0))
    assert CAPACITY.check(node, request(vcpus=1, memory_mib=1)) == (
        "not enough capacity: vcpus 1 > 0 free, memory 1MiB > 0MiB free"
    )


def test_node_selector_exact_match() -> None:
    req = request(node_selector={"storage": "nvme", "gpu": "available"})
    assert NODE_SELECTOR.check(view(labels={"storage": "nvme", "gpu": "available"}), req) is None
    assert NODE_SELECTOR.check(view(labels={"storage": "nvme"}), req) == (
        "node selector gpu=available not met (label gpu absent)"
    )
    assert NODE_SELECTOR.check(view(labels={"storage": "ssd", "gpu": "available"}), req) == (
        "node selector storage=nvme not met (label storage is ssd)"
    )
    assert NODE_SELECTOR.check(view(labels={"storage": "", "gpu": "available"}), req) == (
        "node selector storage=nvme not met (label storage is empty)"
    )


def test_anti_affinity() -> None:
    req = request(anti_affinity_groups=["db", "cache"])
    assert ANTI_AFFINITY.check(view(groups=["web"]), req) is None
    assert ANTI_AFFINITY.check(view(groups=["web", "db"]), req) == (
        "anti-affinity: node already runs a member of group db"
    )
    assert ANTI_AFFINITY.check(view(groups=["db", "cache"]), req) == (
        "anti-affinity: node already runs a member of group cache, db"
    )
    # Affinity groups on the node do not matter to a request without anti-affinity.
    assert ANTI_AFFINITY.check(view(groups=["db"]), request()) is None


# --- constraints ----------------------------------------------------------------------------


def constraint_refusal(constraint: str, **node: object) -> str | None:
    return CONSTRAINTS.check(view(**node), request(constraints=constraint))  # type: ignore[arg-type]


def test_label_equality() -> None:
    assert constraint_refusal("storage=nvme", labels={"storage": "nvme"}) is None
    assert constraint_refusal("storage=nvme", labels={"storage": "ssd"}) == (
        "constraint storage=nvme not met (label storage is ssd)"
    )
    assert (
        constraint_refusal("storage=nvme") == "constraint storage=nvme not met (no label storage)"
    )


def test_label_inequality_passes_without_the_label() -> None:
    assert constraint_refusal("storage!=hdd", labels={"storage": "ssd"}) is None
    assert constraint_refusal("storage!=hdd") is None
    assert constraint_refusal("storage!=hdd", labels={"storage": "hdd"}) == (
        "constraint storage!=hdd not met (label storage is hdd)"
    )


@pytest.mark.parametrize(
    ("constraint", "memory_mib", "ok"),
    [
        ("memory>=32G", 32 * GIB, True),
        ("memory>=32G", 32 * GIB - 1, False),
        ("memory>32G", 32 * GIB, False),
        ("memory<=32G", 32 * GIB, True),
        ("memory<32G", 32 * GIB, False),
        ("memory>=1.5G", 1536, True),
        ("memory>=512M", 512, True),
    ],
)
def test_memory_against_capacity_not_free(constraint: str, memory_mib: int, ok: bool) -> None:
    # Full allocation: the constraint reads the capacity, the kind of node it is.
    why = constraint_refusal(constraint, memory_mib=memory_mib, used=(0, memory_mib, 0))
    assert (why is None) is ok


def test_capacity_constraint_messages() -> None:
    assert constraint_refusal("memory>=32G", memory_mib=16 * GIB) == (
        "constraint memory>=32G not met (capacity memory is 16G)"
    )
    assert constraint_refusal("disk>=1T", disk_mib=1536) == (
        "constraint disk>=1T not met (capacity disk is 1536M)"
    )
    assert constraint_refusal("vcpus>=16", vcpus=8) == (
        "constraint vcpus>=16 not met (capacity vcpus is 8)"
    )
    assert constraint_refusal("vcpus>=8", vcpus=8) is None
    assert constraint_refusal("vcpus<4", vcpus=2) is None


def test_capacity_constraint_of_the_wrong_sort() -> None:
    assert constraint_refusal("memory>=32768") == (
        "constraint memory>=32768 not met "
        "(memory needs a size with a unit such as memory>=32G, not a plain number)"
    )
    assert constraint_refusal("vcpus>=8G") == (
        "constraint vcpus>=8G not met "
        "(vcpus is a count of CPUs: give a number such as vcpus>=8, not a size)"
    )


def test_ordering_on_labels() -> None:
    assert constraint_refusal("gpu.memory>=8G", labels={"gpu.memory": "16G"}) is None
    assert constraint_refusal("gpu.memory>=8G", labels={"gpu.memory": "4G"}) == (
        "constraint gpu.memory>=8G not met (label gpu.memory is 4G)"
    )
    assert constraint_refusal("gpu.memory>=8G") == (
        "constraint gpu.memory>=8G not met (no label gpu.memory)"
    )
    assert constraint_refusal("cores>4", labels={"cores": "4.5"}) is None
    assert constraint_refusal("cores>4", labels={"cores": "4"}) == (
        "constraint cores>4 not met (label cores is 4)"
    )


def test_ordering_on_labels_of_the_wrong_sort() -> None:
    assert constraint_refusal("gpu.memory>=8G", labels={"gpu.memory": "16"}) == (
        "constraint gpu.memory>=8G not met (label gpu.memory is 16, not a size)"
    )
    assert constraint_refusal("cores>=4", labels={"cores": "4G"}) == (
        "constraint cores>=4 not met (label cores is 4G, not a number)"
    )
    assert constraint_refusal("cores>=4", labels={"cores": "many"}) == (
        "constraint cores>=4 not met (label cores is many, not a number or a size)"
    )


def test_first_failing_constraint_is_named() -> None:
    node = view(labels={"storage": "nvme"}, memory_mib=16 * GIB)
    req = request(constraints="storage=nvme,memory>=32G,vcpus>=64")
    assert CONSTRAINTS.check(node, req) == (
        "constraint memory>=32G not met (capacity memory is 16G)"
    )


def test_meets_agrees_with_the_refusal_text() -> None:
    """meets() is the filter's fast yes/no; check_constraint() words the refusal."""
    constraints = [
        "storage=nvme",
        "storage!=nvme",
        "storage=",
        "memory>=16G",
        "memory<16G",
        "memory>=16384",
        "disk<=1T",
        "vcpus>4",
        "vcpus>=4G",
        "gpu.memory>=8G",
        "gpu.memory<8",
        "cores>=4",
    ]
    nodes = [
        view("a"),
        view("b", labels={"storage": "nvme", "gpu.memory": "16G", "cores": "4"}),
        view("c", labels={"storage": "", "gpu.memory": "8", "cores": "x"}, vcpus=2),
        view("d", memory_mib=16 * GIB, disk_mib=2 * 1024 * GIB, vcpus=5),
        view("e", labels={"gpu.memory": "4G", "cores": "8G"}, memory_mib=0, vcpus=0),
    ]
    for text in constraints:
        compiled = compile_constraint(Constraint.model_validate(text))
        for node in nodes:
            assert meets(compiled, node.facts) == (
                check_constraint(compiled, node.facts) is None
            ), (
                text,
                node.name,
            )


def test_size_text() -> None:
    assert size_text(16 * 1024**3) == "16G"
    assert size_text(1536 * 1024**2) == "1536M"
    assert size_text(1024**4) == "1T"
    assert size_text(3) == "3B"
    assert size_text(0) == "0B"


# --- composition ----------------------------------------------------------------------------


def test_filters_for_skips_what_cannot_refuse() -> None:
    assert filters_for(request()) == (ALIVE, CORDON, HYPERVISOR, CAPACITY)
    everything = request(
        needs_kvm=True,
        node_selector={"a": "b"},
        constraints="c=d",
        anti_affinity_groups=["g"],
    )
    assert filters_for(everything) == ALL_FILTERS


def test_refusal_reports_the_first_filter_in_order() -> None:
    node = view(alive=False, cordoned=True, hypervisors=["process"], memory_mib=256)
    assert refusal(node, request(), ALL_FILTERS) == "node is down (its liveness lease expired)"
    alive = view(cordoned=True, hypervisors=["process"], memory_mib=256)
    assert refusal(alive, request(), ALL_FILTERS) == "node is cordoned"


def test_screen_agrees_with_check() -> None:
    """The batch path place() uses refuses exactly what the per-node protocol refuses."""
    views = [
        view("a"),
        view("b", alive=False),
        view("c", labels={"storage": "ssd"}),
        view("d", labels={"storage": "nvme"}, memory_mib=256),
        view("e", labels={"storage": "nvme"}, groups=["db"]),
        view("f", labels={"storage": "nvme"}),
        view("g", labels={"storage": "nvme"}, kvm="absent"),
    ]
    req = request(
        memory_mib=1024,
        needs_kvm=True,
        node_selector={"storage": "nvme"},
        anti_affinity_groups=["db"],
    )
    active = filters_for(req)
    rejections: dict[str, str] = {}
    kept = screen(facts_of(views), request_facts(req), active, rejections)
    assert [n.name for n in kept] == ["f"]
    assert rejections == {v.name: refusal(v, req, active) for v in views if v.name != "f"}
