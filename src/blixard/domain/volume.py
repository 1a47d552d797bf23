"""Volumes: block storage a VM attaches, on a node's disk or in Ceph RBD.

A ``local`` volume lives on one node and pins the VMs that use it there; a
``ceph-rbd`` volume lives in a pool and can follow its VM to any node (the RBD
exclusive lock is the fencing for its writers).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import SIZE_SCHEMA, Name, bridge, refuse, size_mib
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.units import PIB

MAX_VOLUME_MIB = PIB // (1 << 20)
_CEPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class VolumeType(StrEnum):
    """Where the blocks live."""

    LOCAL = "local"
    CEPH_RBD = "ceph-rbd"


def validate_ceph_name(value: Any, field: str) -> str:
    """A Ceph pool or RBD image name: no '/', '@' or spaces, which RBD specs use as separators."""
    if not isinstance(value, str) or _CEPH_NAME.fullmatch(value) is None:
        raise ValidationError(
            field,
            "must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            f"got {value!r}",
        )
    return value


CephName = Annotated[str, BeforeValidator(bridge(validate_ceph_name))]
VolumeSizeMiB = Annotated[int, size_mib(minimum_mib=1, maximum_mib=MAX_VOLUME_MIB), SIZE_SCHEMA]


class VolumeSpec(SpecModel):
    """Size and backing of a volume.

    For ``ceph-rbd``, ``pool`` is required and ``image`` defaults to the
    volume's name (see :meth:`Volume.rbd_image`). For ``local``, ``node`` may
    pin the volume to a node; left empty, the scheduler picks one at first use.
    """

    type: VolumeType = VolumeType.LOCAL
    size_mib: VolumeSizeMiB
    pool: CephName | None = None
    image: CephName | None = None
    node: Name | None = None

    @model_validator(mode="after")
    def _backing_fields(self) -> VolumeSpec:
        if self.type is VolumeType.CEPH_RBD:
            if self.pool is None:
                raise refuse("a ceph-rbd volume needs a pool", subfield="pool")
            if self.node is not None:
                raise refuse("a ceph-rbd volume is not tied to a node", subfield="node")
        else:
            for name in ("pool", "image"):
                if getattr(self, name) is not None:
                    raise refuse(f"only a ceph-rbd volume has a {name}", subfield=name)
        return self


class VolumePhase(StrEnum):
    """Lifecycle of the backing storage."""

    PENDING = "pending"
    AVAILABLE = "available"
    ATTACHED = "attached"
    FAILED = "failed"


class VolumeStatus(StatusModel):
    """Written by the agent or controller that provisions the volume."""

    phase: VolumePhase = VolumePhase.PENDING
    node: str | None = None
    attached_to: str | None = None
    message: str = ""


class Volume(StoredObject):
    """Stored under ``/blixard/v1/volumes/<name>``."""

    STORE_KIND = Kind.VOLUMES

    kind: Literal["Volume"] = "Volume"
    spec: VolumeSpec
    status: VolumeStatus = Field(default_factory=VolumeStatus)

    def rbd_image(self) -> str | None:
        """The RBD image name (the volume name unless given), None for local volumes."""
        if self.spec.type is not VolumeType.CEPH_RBD:
            return None
        return self.spec.image or self.metadata.name
