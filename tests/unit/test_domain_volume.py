"""Volumes: local or Ceph RBD, and the fields each backing needs."""

from __future__ import annotations

from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.parse import from_json_bytes, parse, to_json_bytes
from blixard.domain.volume import Volume, VolumeType


def vol(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "pgdata"}, "spec": spec}


def test_local_volume() -> None:
    v = parse(Volume, vol(size_mib="100G", node="node1"))
    assert v.spec.type is VolumeType.LOCAL
    assert v.spec.size_mib == 100 * 1024
    assert v.rbd_image() is None
    assert v.key() == "/blixard/v1/volumes/pgdata"
    assert from_json_bytes(Volume, to_json_bytes(v)) == v


def test_rbd_volume_image_defaults_to_name() -> None:
    v = parse(Volume, vol(type="ceph-rbd", size_mib=1024, pool="ssd-pool"))
    assert v.rbd_image() == "pgdata"
    v = parse(Volume, vol(type="ceph-rbd", size_mib=1024, pool="ssd-pool", image="pg.v2"))
    assert v.rbd_image() == "pg.v2"


@pytest.mark.parametrize(
    ("spec", "field", "reason_part"),
    [
        ({}, "spec.size_mib", "is required"),
        ({"size_mib": 0}, "spec.size_mib", "greater than zero"),
        ({"size_mib": "-5G"}, "spec.size_mib", "must not be negative"),
        ({"size_mib": "2048T"}, "spec.size_mib", "must be at most 1024T"),
        ({"size_mib": "100"}, "spec.size_mib", "a size needs a unit"),
        ({"size_mib": 1, "type": "nfs"}, "spec.type", "'local' or 'ceph-rbd'"),
        ({"size_mib": 1, "type": "ceph-rbd"}, "spec.pool", "needs a pool"),
        ({"size_mib": 1, "type": "ceph-rbd", "pool": "p", "node": "n1"}, "spec.node", "not tied"),
        ({"size_mib": 1, "pool": "p"}, "spec.pool", "only a ceph-rbd volume has a pool"),
        ({"size_mib": 1, "image": "i"}, "spec.image", "only a ceph-rbd volume has a image"),
        ({"size_mib": 1, "type": "ceph-rbd", "pool": "a/b"}, "spec.pool", "letters, digits"),
        (
            {"size_mib": 1, "type": "ceph-rbd", "pool": "p", "image": "img@snap"},
            "spec.image",
            "letters, digits",
        ),
    ],
)
def test_bad_volumes(spec: dict[str, Any], field: str, reason_part: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(Volume, vol(**spec))
    assert info.value.field == field
    assert reason_part in info.value.reason, info.value.reason
