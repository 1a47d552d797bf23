"""Read-only instance routes.

Instances are written by controllers and agents, never through the API. The
list is what lets a client see a VM's replicas after the VM record itself is
gone (``vm delete`` waits until they are garbage-collected).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from blixard.api.errors import COMMON_ERRORS
from blixard.api.reads import all_instances, instances_of
from blixard.api.schemas import InstanceList
from blixard.api.vms import checked_name
from blixard.store.objects import ObjectStore


def instances_router(objects: ObjectStore) -> APIRouter:
    """The routes under ``/v1/instances``."""
    router = APIRouter(prefix="/v1/instances", tags=["instances"], responses=COMMON_ERRORS)

    @router.get("", response_model=InstanceList, summary="List instances, optionally of one VM")
    async def list_instances(
        vm: Annotated[str | None, Query(description="Only the instances of this VM")] = None,
    ) -> InstanceList:
        if vm is not None:
            return InstanceList(items=await instances_of(objects, checked_name(vm, "vm")))
        grouped = await all_instances(objects)
        return InstanceList(items=[i for name in sorted(grouped) for i in grouped[name]])

    return router
