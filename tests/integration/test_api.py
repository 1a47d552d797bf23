"""The API through a real uvicorn on 127.0.0.1: log streaming end to end.

The log source is an injected async generator that waits for the test between
chunks, so these tests fail if the API buffered the stream instead of sending
each chunk as it comes, or if it did not close the source when the client left.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from blixard.api.app import create_app
from blixard.api.auth import TokenAuthority
from blixard.client.http import BlixardClient
from blixard.domain.errors import NotFound
from blixard.domain.instance import Instance, InstanceSpec
from blixard.domain.meta import ObjectMeta
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore


@dataclass
class Source:
    """Yields 'first', waits for the test's go-ahead, yields 'second', then (follow) waits."""

    go_on: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[tuple[str, bool]] = field(default_factory=list)

    async def __call__(self, instance: str, follow: bool) -> AsyncIterator[bytes]:
        self.calls.append((instance, follow))
        if instance != "web-0":
            raise NotFound(f"no task for instance {instance!r} on node n1")
        try:
            yield b"first\n"
            await asyncio.wait_for(self.go_on.wait(), 10)
            yield b"second\n"
            if follow:
                await asyncio.Event().wait()  # a quiet task: only the client leaving ends this
        finally:
            self.closed.set()


@dataclass
class Live:
    url: str
    token: str
    source: Source
    objects: ObjectStore

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    store = await SqliteStore.open(tmp_path / "state.db")
    objects = ObjectStore(store)
    auth = TokenAuthority(objects)
    token = await auth.ensure_admin_token(tmp_path / "admin.token")
    source = Source()
    app = create_app(
        store,
        node_id="n1",
        store_description={"backend": "sqlite"},
        registered=lambda: True,
        auth=auth,
        logs=source,
        image_exists=lambda _: False,
        known_images=list,
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "uvicorn stopped during start-up"
        await asyncio.sleep(0.01)
    doc = {
        "metadata": {"name": "web"},
        "spec": {"hypervisor": "process", "boot": {"command": ["sleep", "9"]}},
    }
    async with httpx.AsyncClient() as c:
        resp = await c.post(f"{url}/v1/vms", json=doc, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 201
    await objects.create(
        Instance(metadata=ObjectMeta(name="web-0"), spec=InstanceSpec(vm="web", index=0))
    )
    yield Live(url, token, source, objects)
    server.should_exit = True
    await serving
    await store.close()


async def test_chunks_arrive_as_the_source_yields_them(live: Live) -> None:
    async with (
        httpx.AsyncClient(timeout=15) as client,
        client.stream(
            "GET", f"{live.url}/v1/vms/web/logs", params={"follow": "false"}, headers=live.headers
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/plain; charset=utf-8"
        chunks = resp.aiter_bytes()
        first = await asyncio.wait_for(anext(chunks), 5)
        # The source is still blocked before "second": the first chunk was not buffered.
        assert first == b"first\n" and not live.source.go_on.is_set()
        live.source.go_on.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"second\n"
    assert live.source.calls == [("web-0", False)]
    await asyncio.wait_for(live.source.closed.wait(), 5)


async def test_follow_ends_and_closes_the_source_when_the_client_leaves(live: Live) -> None:
    live.source.go_on.set()
    got = b""
    async with (
        httpx.AsyncClient(timeout=15) as client,
        client.stream(
            "GET", f"{live.url}/v1/vms/web/logs", params={"follow": "true"}, headers=live.headers
        ) as resp,
    ):
        async for chunk in resp.aiter_bytes():
            got += chunk
            if got == b"first\nsecond\n":
                break
    assert live.source.calls == [("web-0", True)]
    await asyncio.wait_for(live.source.closed.wait(), 10)  # the generator's finally ran


async def test_the_sync_client_streams_and_maps_errors(live: Live) -> None:
    def read(replica: int) -> list[bytes]:
        with BlixardClient(live.url, live.token, timeout_s=10) as client:
            return list(client.logs("web", replica=replica))

    live.source.go_on.set()
    assert b"".join(await asyncio.to_thread(read, 0)) == b"first\nsecond\n"
    with pytest.raises(NotFound, match="vm 'web' has no instance 'web-1'"):
        await asyncio.to_thread(read, 1)


async def test_a_source_that_fails_at_once_is_a_404_not_an_empty_stream(live: Live) -> None:
    await live.objects.create(
        Instance(metadata=ObjectMeta(name="web-1"), spec=InstanceSpec(vm="web", index=1))
    )
    async with httpx.AsyncClient(timeout=15) as client:
        resp = await client.get(
            f"{live.url}/v1/vms/web/logs", params={"replica": 1}, headers=live.headers
        )
    assert resp.status_code == 404
    assert resp.json() == {
        "error": {"code": "not_found", "message": "no task for instance 'web-1' on node n1"}
    }
    assert live.source.calls == [("web-1", False)]
