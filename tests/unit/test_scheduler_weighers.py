"""Scheduler weighers: each orders nodes the way its preference says, within 0..1."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from blixard.domain.names import validate_label_key
from blixard.scheduler.labels import DATA_LABEL_PREFIX, SPECIAL_HARDWARE, data_label
from blixard.scheduler.placement import NodeView, Request
from blixard.scheduler.weighers import (
    AFFINITY,
    BEST_FIT,
    DATA_LOCALITY,
    NETWORK_PROXIMITY,
    NEUTRAL,
    PREFERRED_LABELS,
    SPECIALIZATION,
    SPREAD,
    FactWeigher,
)
from tests.unit.test_scheduler_support import GIB, request, view


def ranked(weigher: FactWeigher, views: list[NodeView], req: Request) -> list[str]:
    """Node names from the best score to the worst (ties by name)."""
    return [v.name for v in sorted(views, key=lambda v: (-weigher.weigh(v, req), v.name))]


def test_best_fit_prefers_the_tightest_node() -> None:
    views = [
        view("roomy", memory_mib=64 * GIB),
        view("tight", memory_mib=4 * GIB, used=(0, 3 * GIB, 0)),
        view("medium", memory_mib=16 * GIB, used=(0, 8 * GIB, 0)),
    ]
    req = request(memory_mib=GIB)
    assert ranked(BEST_FIT, views, req) == ["tight", "medium", "roomy"]
    assert BEST_FIT.weigh(views[1], req) == 1.0  # filled exactly
    assert BEST_FIT.weigh(views[0], req) == pytest.approx(1 - 63 / 64)


def test_spread_prefers_the_emptiest_node() -> None:
    views = [
        view("half", vcpus=8, memory_mib=8 * GIB, used=(4, 4 * GIB, 0)),
        view("empty", vcpus=8, memory_mib=8 * GIB),
        view("full", vcpus=8, memory_mib=8 * GIB, used=(8, 8 * GIB, 0)),
        view("cpu-busy", vcpus=8, memory_mib=8 * GIB, used=(8, 0, 0)),
    ]
    req = request()
    assert ranked(SPREAD, views, req) == ["empty", "cpu-busy", "half", "full"]
    assert SPREAD.weigh(views[1], req) == 1.0
    assert SPREAD.weigh(views[2], req) == 0.0
    assert SPREAD.weigh(views[3], req) == 0.5
    assert SPREAD.weigh(view(vcpus=0, memory_mib=0), req) == 0.0
    # Over-allocation counts as full, never below 0.
    assert SPREAD.weigh(view(vcpus=2, memory_mib=GIB, used=(4, 4 * GIB, 0)), req) == 0.0


def test_data_locality_reads_the_data_label() -> None:
    hint = "ceph-pool:raw-data"
    holder = view("holder", labels={data_label(hint): "primary"})
    other = view("other", labels={data_label("ceph-pool:other"): ""})
    req = request(data_hint=hint)
    assert ranked(DATA_LOCALITY, [other, holder], req) == ["holder", "other"]
    assert DATA_LOCALITY.weigh(holder, req) == 1.0
    assert DATA_LOCALITY.weigh(other, req) == 0.0
    assert DATA_LOCALITY.weigh(holder, request()) == NEUTRAL


def test_data_label_rule() -> None:
    assert data_label("ceph-pool:raw-data") == "data.blixard.io/ceph-pool.raw-data"
    assert data_label("s3:logs/2026") == "data.blixard.io/s3.logs.2026"
    assert data_label("plain") == "data.blixard.io/plain"
    # Not a valid label name once replaced (ends with '.', or too long): a hash instead.
    digest = hashlib.sha256(b"bucket/").hexdigest()[:32]
    assert data_label("bucket/") == f"{DATA_LABEL_PREFIX}sha256-{digest}"
    long = "x" * 64
    assert (
        data_label(long)
        == DATA_LABEL_PREFIX + "sha256-" + hashlib.sha256(b"x" * 64).hexdigest()[:32]
    )
    for hint in ("ceph-pool:raw-data", "bucket/", long, "~!@#$%", "a" * 253):
        validate_label_key(data_label(hint), "labels")  # always a usable node label


def test_network_proximity() -> None:
    near, far, unzoned = view("near", zone="a"), view("far", zone="b"), view("none")
    req = request(near_zone="a")
    assert ranked(NETWORK_PROXIMITY, [far, unzoned, near], req)[0] == "near"
    assert NETWORK_PROXIMITY.weigh(near, req) == 1.0
    assert NETWORK_PROXIMITY.weigh(far, req) == 0.0
    assert NETWORK_PROXIMITY.weigh(unzoned, req) == 0.0
    # Without a zone to be near, every node is neutral.
    assert {NETWORK_PROXIMITY.weigh(v, request()) for v in (near, far, unzoned)} == {NEUTRAL}


def test_specialization_steers_special_requests_to_special_nodes() -> None:
    gpu = view("gpu", labels={"gpu": "available"})
    both = view("both", labels={"gpu": "available", "memory-class": "high-memory"})
    plain = view("plain")
    bigmem = view("bigmem", labels={"memory-class": "high-memory"})
    wants_gpu = request(preferred_labels={"gpu": "available"})
    assert ranked(SPECIALIZATION, [plain, both, bigmem, gpu], wants_gpu) == [
        "gpu",
        "both",
        "plain",
        "bigmem",
    ]
    assert SPECIALIZATION.weigh(gpu, wants_gpu) == 1.0
    assert SPECIALIZATION.weigh(both, wants_gpu) == 0.75
    assert SPECIALIZATION.weigh(plain, wants_gpu) == 0.5
    assert SPECIALIZATION.weigh(bigmem, wants_gpu) == 0.0


def test_specialization_keeps_special_nodes_free() -> None:
    gpu = view("gpu", labels={"gpu": "available"})
    plain = view("plain")
    req = request()
    assert ranked(SPECIALIZATION, [gpu, plain], req) == ["plain", "gpu"]
    assert SPECIALIZATION.weigh(plain, req) == NEUTRAL
    assert SPECIALIZATION.weigh(gpu, req) == 0.0


@pytest.mark.parametrize(
    "asks",
    [
        {"node_selector": {"gpu": "available"}},
        {"preferred_labels": {"gpu": "available"}},
        {"constraints": "gpu=available"},
    ],
)
def test_specialization_hears_every_way_of_asking(asks: dict[str, Any]) -> None:
    assert SPECIALIZATION.weigh(view(labels={"gpu": "available"}), request(**asks)) == 1.0


def test_special_hardware_table_is_small_and_label_shaped() -> None:
    assert ("gpu", "available") in SPECIAL_HARDWARE
    for key, value in SPECIAL_HARDWARE:
        validate_label_key(key, "labels")
        assert value


def test_preferred_labels_fraction() -> None:
    req = request(preferred_labels={"storage": "nvme", "rack": "r1"})
    both = view("both", labels={"storage": "nvme", "rack": "r1"})
    one = view("one", labels={"storage": "nvme", "rack": "r2"})
    none = view("none")
    assert ranked(PREFERRED_LABELS, [none, one, both], req) == ["both", "one", "none"]
    assert [PREFERRED_LABELS.weigh(v, req) for v in (both, one, none)] == [1.0, 0.5, 0.0]
    assert PREFERRED_LABELS.weigh(both, request()) == NEUTRAL


def test_affinity_fraction() -> None:
    req = request(affinity_groups=["web", "cache"])
    both = view("both", groups=["web", "cache", "db"])
    one = view("one", groups=["web"])
    none = view("none", groups=["db"])
    assert ranked(AFFINITY, [none, one, both], req) == ["both", "one", "none"]
    assert [AFFINITY.weigh(v, req) for v in (both, one, none)] == [1.0, 0.5, 0.0]
    assert AFFINITY.weigh(both, request()) == NEUTRAL


@pytest.mark.parametrize(
    "weigher",
    [
        BEST_FIT,
        SPREAD,
        DATA_LOCALITY,
        NETWORK_PROXIMITY,
        SPECIALIZATION,
        PREFERRED_LABELS,
        AFFINITY,
    ],
)
def test_scores_stay_within_0_and_1(weigher: FactWeigher) -> None:
    views = [
        view("a", memory_mib=0, vcpus=0),
        view("b", used=(100, 100 * GIB, 0), labels={"gpu": "available", "fpga": "available"}),
        view("c", zone="z", groups=["g"], labels={data_label("d:x"): "", "k": "v"}),
    ]
    reqs = [
        request(),
        request(memory_mib=64 * GIB, near_zone="z", data_hint="d:x", preferred_labels={"k": "v"}),
        request(affinity_groups=["g"], node_selector={"gpu": "available"}),
    ]
    for v in views:
        for r in reqs:
            assert 0.0 <= weigher.weigh(v, r) <= 1.0
