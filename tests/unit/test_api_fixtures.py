"""Shared fixtures of the API tests: a real SqliteStore, a real token, the ASGI app.

No test lives here; the test_api_* modules import what they need.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from blixard.api.app import create_app
from blixard.api.auth import TokenAuthority
from blixard.api.logs import LogSource
from blixard.domain.errors import NotFound
from blixard.domain.instance import Instance, InstanceSpec, InstanceStatus, ObservedState
from blixard.domain.keys import instance_name
from blixard.domain.meta import ObjectMeta
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore

NODE = "n1"
IMAGES = ["alpine", "debian:12"]


@dataclass
class LogBook:
    """An injected log source: per-instance chunks; unknown instances raise NotFound."""

    chunks: dict[str, list[bytes]] = field(default_factory=dict)
    calls: list[tuple[str, bool]] = field(default_factory=list)
    #: Raised when the instance's stream starts (to test crashes).
    errors: dict[str, Exception] = field(default_factory=dict)

    async def __call__(self, instance: str, follow: bool) -> AsyncIterator[bytes]:
        self.calls.append((instance, follow))
        if instance in self.errors:
            raise self.errors[instance]
        if instance not in self.chunks:
            raise NotFound(f"no task for instance {instance!r} on node {NODE}")
        for chunk in self.chunks[instance]:
            yield chunk


@dataclass
class Api:
    """One app over one real store, a client for it and the admin token."""

    client: httpx.AsyncClient
    store: SqliteStore
    objects: ObjectStore
    token: str
    tmp: Path
    logs: LogBook

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def keys(self, prefix: str = "/blixard/v1/vms/") -> list[str]:
        return [kv.key for kv in (await self.store.range(prefix)).kvs]

    async def add_instance(
        self, vm: str, index: int, state: ObservedState = ObservedState.RUNNING
    ) -> Instance:
        name = instance_name(vm, index)
        instance = Instance(
            metadata=ObjectMeta(name=name),
            spec=InstanceSpec(vm=vm, index=index, node=NODE, epoch=1),
            status=InstanceStatus(state=state, node=NODE, epoch=1),
        )
        return await self.objects.create(instance)


def make_app(
    store: SqliteStore, auth: TokenAuthority, logs: LogSource, registered: Callable[[], bool]
) -> Any:
    return create_app(
        store,
        node_id=NODE,
        store_description={"backend": "sqlite"},
        registered=registered,
        auth=auth,
        logs=logs,
        image_exists=lambda name: name in IMAGES,
        known_images=lambda: list(IMAGES),
    )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = await SqliteStore.open(tmp_path / "state.db", timeout_s=2.0)
    objects = ObjectStore(store)
    auth = TokenAuthority(objects)
    token = await auth.ensure_admin_token(tmp_path / "admin.token")
    logs = LogBook()
    app = make_app(store, auth, logs, lambda: True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://blixard.test") as client:
        yield Api(client, store, objects, token, tmp_path, logs)
    await store.close()


def vm_doc(name: str = "web", **spec: Any) -> dict[str, Any]:
    """A VM document running a command (the process hypervisor): needs no guest files."""
    body: dict[str, Any] = {
        "hypervisor": "process",
        "boot": {"command": ["sleep", "1000"]},
        **spec,
    }
    return {"kind": "VM", "metadata": {"name": name}, "spec": body}
