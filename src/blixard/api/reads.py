"""Reads the API joins into its answers (a VM's instances, node liveness).

A stored value that no longer decodes is the server's problem, never the
caller's: it is reported as a 500 (``StoredObjectUnreadable``), not as a 400
ValidationError that would blame the request.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from blixard.domain.errors import BlixardError, ValidationError
from blixard.domain.instance import Instance
from blixard.domain.keys import NODE_LEASES_PREFIX, Kind, kind_prefix
from blixard.domain.parse import from_json_bytes
from blixard.store.objects import ObjectStore

T = TypeVar("T")


class StoredObjectUnreadable(BlixardError):
    """A stored value does not decode as its kind (corruption or a newer writer)."""

    code = "stored_object_unreadable"


async def stored(read: Awaitable[T]) -> T:
    """Await a store read, turning a decode failure into StoredObjectUnreadable."""
    try:
        return await read
    except ValidationError as exc:
        raise StoredObjectUnreadable(f"a stored object cannot be read: {exc}") from None


async def instances_of(objects: ObjectStore, vm_name: str) -> list[Instance]:
    """The instances whose ``spec.vm`` is ``vm_name``, by index.

    The range is narrowed to ``<vm>-`` and then filtered on ``spec.vm``: VM
    ``web``'s prefix also covers VM ``web-1``'s instances (``web-1-0``).
    """
    result = await objects.store.range(kind_prefix(Kind.INSTANCES) + vm_name + "-")
    found = [await stored(_decode(kv.value, kv.mod_revision)) for kv in result.kvs]
    return sorted((i for i in found if i.spec.vm == vm_name), key=lambda i: i.spec.index)


async def all_instances(objects: ObjectStore) -> dict[str, list[Instance]]:
    """Every instance, grouped by VM name and sorted by index."""
    grouped: dict[str, list[Instance]] = {}
    for instance in await stored(objects.list(Instance)):
        grouped.setdefault(instance.spec.vm, []).append(instance)
    for items in grouped.values():
        items.sort(key=lambda i: i.spec.index)
    return grouped


async def live_nodes(objects: ObjectStore) -> set[str]:
    """Names of the nodes whose liveness key exists (their lease has not expired)."""
    result = await objects.store.range(NODE_LEASES_PREFIX, keys_only=True)
    return {kv.key[len(NODE_LEASES_PREFIX) :] for kv in result.kvs}


async def _decode(raw: bytes, revision: int) -> Instance:
    return from_json_bytes(Instance, raw).with_resource_version(revision)
