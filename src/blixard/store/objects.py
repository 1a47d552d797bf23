"""Domain objects in the store: JSON values, compare-and-swap on resource_version.

DESIGN.md's rule lives here once: a writer sends back the resource_version it
read, and the write succeeds only if nobody wrote in between (a ``Conflict``
otherwise, to be retried from a fresh read, never overwritten blindly).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from blixard.domain.errors import AlreadyExists, Conflict, NotFound
from blixard.domain.keys import kind_prefix, object_key
from blixard.domain.meta import StoredObject
from blixard.domain.parse import from_json_bytes, to_json_bytes
from blixard.store.protocol import Compare, Delete, Get, KeyValue, Put, StateStore

T = TypeVar("T", bound=StoredObject)


def _decode(cls: type[T], kv: KeyValue) -> T:
    return from_json_bytes(cls, kv.value).with_resource_version(kv.mod_revision)


class ObjectStore:
    """Typed reads and CAS writes of stored objects on any StateStore backend."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def get(self, cls: type[T], name: str) -> T:
        kv = await self.store.get(object_key(cls.STORE_KIND, name))
        if kv is None:
            raise NotFound(f"{cls.STORE_KIND.value[:-1]} {name!r} does not exist")
        return _decode(cls, kv)

    async def find(self, cls: type[T], name: str) -> T | None:
        kv = await self.store.get(object_key(cls.STORE_KIND, name))
        return None if kv is None else _decode(cls, kv)

    async def list(self, cls: type[T]) -> list[T]:
        result = await self.store.range(kind_prefix(cls.STORE_KIND))
        return [_decode(cls, kv) for kv in result.kvs]

    async def create(self, obj: T, *, lease: int = 0) -> T:
        """Store a new object; AlreadyExists if the name is taken."""
        key = obj.key()
        res = await self.store.txn(
            [Compare.absent(key)], [Put(key, to_json_bytes(obj), lease=lease)]
        )
        if not res.succeeded:
            raise AlreadyExists(f"{obj.STORE_KIND.value[:-1]} {obj.metadata.name!r} already exists")
        return obj.with_resource_version(res.revision)

    async def update(self, obj: T, *, lease: int = 0) -> T:
        """Write ``obj`` if the stored one still has ``obj.metadata.resource_version``."""
        key = obj.key()
        expected = obj.metadata.resource_version
        res = await self.store.txn(
            [Compare.mod(key, expected)], [Put(key, to_json_bytes(obj), lease=lease)], [Get(key)]
        )
        if not res.succeeded:
            current = res.responses[0]
            if isinstance(current, list) and not current:
                raise NotFound(f"{obj.STORE_KIND.value[:-1]} {obj.metadata.name!r} does not exist")
            raise Conflict(
                f"{obj.STORE_KIND.value[:-1]} {obj.metadata.name!r} changed since it was read "
                f"(resource_version {expected}); read it again and retry"
            )
        return obj.with_resource_version(res.revision)

    async def modify(
        self, cls: type[T], name: str, change: Callable[[T], Awaitable[T] | T], attempts: int = 20
    ) -> T:
        """Read, change, write with CAS; on a conflict start again from a fresh read."""
        for _ in range(attempts):
            current = await self.get(cls, name)
            changed = change(current)
            if isinstance(changed, Awaitable):
                changed = await changed
            try:
                return await self.update(changed)
            except Conflict:
                continue
        raise Conflict(f"{name!r} kept changing under {attempts} attempts to modify it")

    async def delete(self, obj: StoredObject) -> None:
        """Delete ``obj`` if unchanged since read (resource_version 0: unconditionally)."""
        key = obj.key()
        compares = [Compare.mod(key, obj.metadata.resource_version)]
        if obj.metadata.resource_version == 0:
            compares = [Compare.created(key, 0, ">")]
        res = await self.store.txn(compares, [Delete(key)])
        if not res.succeeded:
            raise Conflict(f"{obj.metadata.name!r} changed or vanished since it was read")
