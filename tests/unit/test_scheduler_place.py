"""place(): the whole decision, its reason, determinism and the sampling limit."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest

from blixard.domain.node import Resources
from blixard.domain.vm import Hypervisor
from blixard.scheduler import reasons
from blixard.scheduler.labels import data_label
from blixard.scheduler.placement import (
    Decision,
    NodeView,
    Request,
    allocated_by,
    default_limit,
    place,
    seed_for,
)
from blixard.scheduler.sampling import candidates, visit_order
from tests.unit.test_scheduler_support import GIB, request, view


def test_interface_positional_forms_still_work() -> None:
    """The controller builds NodeView(node, alive, allocated) and Request(resources, hv)."""
    v = view("n1")
    again = NodeView(v.node, True, Resources(vcpus=1, memory_mib=GIB))
    req = Request(Resources(vcpus=1, memory_mib=GIB), Hypervisor.QEMU)
    decision = place([again], req)
    assert isinstance(decision, Decision)
    assert decision.node == "n1"
    assert decision.rejections == {}
    assert again.name == "n1"
    assert again.groups == frozenset()
    assert again.free() == Resources(vcpus=7, memory_mib=15 * GIB, disk_mib=100 * GIB)
    assert req.workload == "vm"
    assert not req.needs_kvm
    assert req.near_zone is None


def test_no_nodes() -> None:
    decision = place([], request())
    assert decision == Decision(None, "no nodes are registered", {})
    assert place([], request(), limit=3).node is None


def test_success_reason() -> None:
    views = [
        view("a", memory_mib=8 * GIB),
        view("b", memory_mib=4 * GIB),
        view("c", cordoned=True),
    ]
    decision = place(views, request(memory_mib=2 * GIB))
    assert decision.node == "b"
    assert decision.reason == (
        "placed on b (strategy best-fit; score 0.50 vs 0.25 next; 2 of 3 nodes eligible)"
    )
    assert decision.rejections == {"c": "node is cordoned"}


def test_success_reason_with_one_eligible_node() -> None:
    decision = place([view("a"), view("b", alive=False)], request())
    assert decision.reason.startswith("placed on a (strategy best-fit; score ")
    assert decision.reason.endswith(", the only eligible node; 1 of 2 nodes eligible)")


def test_ties_break_by_name() -> None:
    views = [view(name) for name in ("n3", "n1", "n2")]
    assert place(views, request()).node == "n1"
    assert place(list(reversed(views)), request()).node == "n1"


def test_never_places_on_a_refused_node() -> None:
    views = [
        view("down", alive=False),
        view("cordoned", cordoned=True),
        view("draining", draining=True),
        view("fc", hypervisors=["firecracker"]),
        view("small", memory_mib=GIB),
        view("ok", memory_mib=64 * GIB),
    ]
    decision = place(views, request(memory_mib=2 * GIB))
    assert decision.node == "ok"
    assert set(decision.rejections) == {"down", "cordoned", "draining", "fc", "small"}


def test_node_selector_constraints_anti_affinity_and_kvm_together() -> None:
    views = [
        view("a", labels={"storage": "nvme"}, memory_mib=64 * GIB, groups=["db"]),
        view("b", labels={"storage": "nvme"}, memory_mib=16 * GIB),
        view("c", labels={"storage": "ssd"}, memory_mib=64 * GIB),
        view("d", labels={"storage": "nvme"}, memory_mib=64 * GIB, kvm="unusable"),
        view("e", labels={"storage": "nvme"}, memory_mib=64 * GIB),
    ]
    req = request(
        node_selector={"storage": "nvme"},
        constraints="memory>=32G",
        anti_affinity_groups=["db"],
        needs_kvm=True,
    )
    decision = place(views, req)
    assert decision.node == "e"
    assert decision.rejections == {
        "a": "anti-affinity: node already runs a member of group db",
        "b": "constraint memory>=32G not met (capacity memory is 16G)",
        "c": "node selector storage=nvme not met (label storage is ssd)",
        "d": "needs KVM (accel kvm) but KVM is unusable here",
    }


# --- failure reasons ------------------------------------------------------------------------


def test_failure_reason_groups_by_reason() -> None:
    views = [
        view("m1", memory_mib=2 * GIB),
        view("m2", memory_mib=2 * GIB),
        view("m3", memory_mib=3 * GIB),
        view("s1", labels={"storage": "ssd"}),
        view("s2", labels={"storage": "ssd"}),
        view("c1", labels={"storage": "nvme"}, cordoned=True),
    ]
    decision = place(views, request(memory_mib=4 * GIB, constraints="storage=nvme"))
    assert decision.node is None
    # The constraint filter runs before capacity: m1..m3 have no storage label at all.
    assert decision.reason == (
        "no node can run it (6 nodes): "
        "3 nodes: constraint storage=nvme not met (no label storage) [m1, m2, m3]; "
        "2 nodes: constraint storage=nvme not met (label storage is ssd) [s1, s2]; "
        "1 node: node is cordoned [c1]"
    )
    assert len(decision.rejections) == 6


def test_failure_reason_merges_figures_and_shows_the_largest() -> None:
    views = [
        view("a", memory_mib=2 * GIB),
        view("b", memory_mib=3 * GIB),
        view("c", memory_mib=2 * GIB),
    ]
    decision = place(views, request(memory_mib=4 * GIB))
    assert decision.reason == (
        "no node can run it (3 nodes): 3 nodes: not enough capacity: memory 4096MiB > "
        "3072MiB free (figures of b, the largest of the group) [a, b, c]"
    )


def test_failure_reason_stays_short_for_1000_nodes() -> None:
    views = [
        view(f"n{i:04d}", memory_mib=(1 + i % 7) * GIB, labels={"r": str(i % 13)})
        for i in range(1000)
    ]
    decision = place(views, request(memory_mib=64 * GIB))
    assert decision.node is None
    assert len(decision.rejections) == 1000
    assert decision.reason.startswith("no node can run it (1000 nodes): 1000 nodes: ")
    assert "[n0000, n0001, n0002, +997 more]" in decision.reason
    assert len(decision.reason) < 300


def test_failure_reason_caps_the_number_of_groups() -> None:
    rejections = {f"n{i}": f"reason {chr(97 + i)}" for i in range(reasons.MAX_GROUPS + 3)}
    text = reasons.refused(rejections, len(rejections))
    assert text.count("1 node:") == reasons.MAX_GROUPS
    assert text.endswith("; 3 other reasons on 3 nodes")


def test_failure_reason_orders_groups_by_size() -> None:
    text = reasons.refused({"a": "x", "b": "y", "c": "y", "d": "z", "e": "z", "f": "z"}, 6)
    assert text == (
        "no node can run it (6 nodes): 3 nodes: z [d, e, f]; 2 nodes: y [b, c]; 1 node: x [a]"
    )


# --- determinism and the limit --------------------------------------------------------------


def big_cluster(n: int = 200) -> list[NodeView]:
    return [
        view(
            f"n{i:04d}",
            memory_mib=(4 + i % 29) * GIB,
            used=(0, (i * 7919 % 97) * GIB // 10, 0),
            vcpus=16,
            labels={"storage": ("nvme", "ssd", "hdd")[i % 3]},
            zone=f"z{i % 4}",
            alive=i % 17 != 0,
        )
        for i in range(n)
    ]


def test_same_inputs_same_decision() -> None:
    views = big_cluster()
    req = request(memory_mib=2 * GIB, workload="function", near_zone="z1")
    for limit in (None, 5, 20):
        first = place(views, req, limit=limit, seed=42)
        again = place(big_cluster(), req, limit=limit, seed=42)
        assert first == again


def test_seed_changes_the_sample() -> None:
    views = big_cluster()
    chosen = {place(views, request(memory_mib=GIB), limit=3, seed=s).node for s in range(40)}
    assert len(chosen) > 5


def test_limit_scores_at_most_limit_nodes() -> None:
    views = big_cluster()
    decision = place(views, request(memory_mib=GIB), limit=7, seed=1)
    assert decision.node is not None
    assert " 7 eligible of " in decision.reason
    assert "limit 7 of 200 nodes" in decision.reason


def test_limit_not_smaller_than_the_cluster_scores_everything() -> None:
    views = big_cluster(30)
    req = request(memory_mib=GIB)
    assert place(views, req, limit=30, seed=9) == place(views, req)
    assert place(views, req, limit=1000, seed=9) == place(views, req)


def test_limit_finds_the_one_feasible_node() -> None:
    views = [view(f"n{i:04d}", memory_mib=GIB) for i in range(999)]
    views.insert(517, view("big", memory_mib=64 * GIB))
    for seed in range(5):
        decision = place(views, request(memory_mib=8 * GIB), limit=default_limit(1000), seed=seed)
        assert decision.node == "big"
        # Every node had to be visited, so the reason reads as for a full scan.
        assert "1 of 1000 nodes eligible" in decision.reason
        assert len(decision.rejections) == 999


def test_limit_result_is_always_feasible() -> None:
    views = big_cluster()
    req = request(memory_mib=12 * GIB, node_selector={"storage": "nvme"})
    for seed in range(30):
        decision = place(views, req, limit=3, seed=seed)
        assert decision.node is not None
        chosen = next(v for v in views if v.name == decision.node)
        assert chosen.alive
        assert chosen.node.metadata.labels["storage"] == "nvme"
        assert chosen.free().memory_mib >= 12 * GIB


def test_limit_visits_promising_nodes_first() -> None:
    views = [view(f"n{i:04d}", memory_mib=32 * GIB) for i in range(1000)]
    views[733] = view("holder", memory_mib=32 * GIB, labels={data_label("pool:raw"): ""})
    views[101] = view("mate", memory_mib=32 * GIB, groups=["web"])
    for seed in range(5):
        data = request(workload="function", data_hint="pool:raw")
        assert place(views, data, limit=20, seed=seed).node == "holder"
        affinity = request(affinity_groups=["web"])
        assert place(views, affinity, limit=20, seed=seed).node == "mate"


def test_limit_ends_when_the_last_positions_hold_promising_nodes() -> None:
    """Regression (found by hypothesis): the visit used to spin once only promoted positions
    were left in the permutation, since every node had been handed out already."""
    views = [view(f"n{i}", memory_mib=GIB) for i in range(6)]
    views[2] = view("holder", memory_mib=GIB, labels={data_label("pool:raw"): ""})
    for seed in range(20):
        decision = place(
            views, request(memory_mib=8 * GIB, data_hint="pool:raw"), limit=3, seed=seed
        )
        assert decision.node is None
        assert len(decision.rejections) == 6


def test_candidates_put_promising_nodes_first_in_seeded_order() -> None:
    views = [view(f"n{i}", labels={"rack": "r1"} if i % 10 == 0 else {}) for i in range(50)]
    order = candidates(views, request(preferred_labels={"rack": "r1"}), seed=3)
    names: list[str] = []
    while not order.exhausted:
        names += [v.name for v in order.take(7)]
    assert sorted(names) == sorted(v.name for v in views)
    assert set(names[:5]) == {f"n{i}" for i in range(0, 50, 10)}


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        place([view()], request(), limit=0)


def test_visit_order_is_a_seeded_permutation() -> None:
    for n in (0, 1, 2, 3, 10, 97, 1000):
        for seed in (0, 1, 2**70):
            order = visit_order(n, seed)
            assert sorted(order) == list(range(n))
            assert order == visit_order(n, seed)
    assert visit_order(1000, 1) != visit_order(1000, 2)


def test_default_limit() -> None:
    assert default_limit(1000) == 20
    assert default_limit(100) == 14
    assert default_limit(0) == 4
    assert default_limit(1) == 4
    assert default_limit(4) == 4
    for n in (2, 50, 5000, 100_000):
        assert default_limit(n) == 2 * max(2, math.ceil(math.log2(n)))
    assert default_limit(1000, request(strategy="spread")) == 40
    assert default_limit(1000, request(workload="function")) == 40
    assert default_limit(1000, request(workload="function", strategy="best-fit")) == 20
    assert default_limit(1000, request(anti_affinity_groups=["db"])) == 20


def test_seed_for_is_stable() -> None:
    assert seed_for("web-0", "3") == seed_for("web-0", "3")
    assert seed_for("web-0", "3") != seed_for("web-0", "4")
    assert seed_for("a", "bc") != seed_for("ab", "c")
    # Not hash(): the same in every process (zlib.crc32 of the parts joined by NUL).
    assert seed_for("web-0", "3") == zlib.crc32(b"web-0\x003")


# --- node views -------------------------------------------------------------------------------


def test_a_view_reads_its_node_once_and_a_replaced_view_reads_it_again() -> None:
    v = view("n1", memory_mib=8 * GIB)
    assert v.facts is v.facts
    assert v.facts.free_memory_mib == 8 * GIB
    fuller = dataclasses.replace(v, allocated=Resources(memory_mib=6 * GIB))
    assert fuller.facts.free_memory_mib == 2 * GIB
    assert place([fuller], request(memory_mib=4 * GIB)).node is None


def test_views_compare_without_their_cache() -> None:
    a, b = view("n1"), view("n1")
    _ = a.facts
    assert a == b


def test_allocated_by() -> None:
    claims = [
        ("n1", Resources(vcpus=1, memory_mib=512, disk_mib=10)),
        ("n2", Resources(vcpus=4, memory_mib=4096)),
        (None, Resources(vcpus=8)),
        ("n1", Resources(vcpus=2, memory_mib=1024)),
    ]
    assert allocated_by("n1", claims) == Resources(vcpus=3, memory_mib=1536, disk_mib=10)
    assert allocated_by("n3", claims) == Resources()
