"""A real API for the CLI tests: uvicorn on 127.0.0.1 in a thread, over a real SqliteStore.

No test lives here; test_cli_* modules import the ``server`` fixture and helpers.
The store belongs to the server thread's event loop, so test code that writes
to it (standing in for controllers and agents) runs there via :meth:`Server.run`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from typer.testing import CliRunner

from blixard.api.app import create_app
from blixard.api.auth import TokenAuthority
from blixard.cli.main import app as cli_app
from blixard.domain.errors import NotFound
from blixard.domain.instance import Instance, InstanceSpec, InstanceStatus, ObservedState
from blixard.domain.keys import instance_name, node_lease_key
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec, NodeStatus, Resources
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore

T = TypeVar("T")
NODE = "n1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """The API of one node, served from its own thread and event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs: dict[str, list[bytes]] = {}
        self.token = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: SqliteStore | None = None
        self._server: uvicorn.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    async def _log_source(self, instance: str, follow: bool) -> AsyncIterator[bytes]:
        if instance not in self.logs:
            raise NotFound(f"no task for instance {instance!r} on node {NODE}")
        for chunk in self.logs[instance]:
            yield chunk

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._store = await SqliteStore.open(self.data_dir / "state.db", timeout_s=5.0)
        objects = ObjectStore(self._store)
        auth = TokenAuthority(objects)
        self.token = await auth.ensure_admin_token(self.data_dir / "admin.token")
        await objects.create(
            Node(
                metadata=ObjectMeta(name=NODE),
                spec=NodeSpec(api_url=self.url),
                status=NodeStatus(ready=True, capacity=Resources(vcpus=2, memory_mib=4096)),
            )
        )
        lease = await self._store.lease_grant(600)
        await self._store.put(node_lease_key(NODE), b"", lease=lease.id)
        app = create_app(
            self._store,
            node_id=NODE,
            store_description={"backend": "sqlite"},
            registered=lambda: True,
            auth=auth,
            logs=self._log_source,
            image_exists=lambda name: name == "alpine",
            known_images=lambda: ["alpine"],
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        serving = asyncio.create_task(self._server.serve())
        while not self._server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await serving
        finally:
            await self._store.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(20)
        if self._error is not None:
            raise self._error
        assert self._server is not None and self._server.started

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(10)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server's loop (where its store lives) and return its result."""
        assert self._loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    @property
    def objects(self) -> ObjectStore:
        assert self._store is not None
        return ObjectStore(self._store)

    def add_instance(
        self, vm: str, index: int, state: ObservedState, message: str = "", restarts: int = 0
    ) -> Instance:
        """Stand in for the controllers and the agent: an instance in ``state``."""

        async def write() -> Instance:
            instance = Instance(
                metadata=ObjectMeta(name=instance_name(vm, index)),
                spec=InstanceSpec(vm=vm, index=index, node=NODE, epoch=1),
                status=InstanceStatus(
                    state=state, node=NODE, epoch=1, message=message, restarts=restarts
                ),
            )
            return await self.objects.create(instance)

        return self.run(write())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data")
    srv.data_dir.mkdir()
    srv.start()
    yield srv
    srv.stop()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def env_for(server: Server, **extra: str) -> dict[str, str]:
    """The environment a user on the node has: only the data dir points at the node."""
    env = {
        "BLIXARD_DATA_DIR": str(server.data_dir),
        "BLIXARD_API": server.url,
        "BLIXARD_TOKEN": "",
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    env.update(extra)
    return env


def blixard(server: Server, *args: str, input: str | None = None, **env: str) -> Result:
    """Run the CLI in-process as a user types it (exit code, stdout, stderr)."""
    runner = CliRunner()
    result = runner.invoke(
        cli_app, list(args), input=input, env=env_for(server, **env), catch_exceptions=False
    )
    return Result(result.exit_code, result.stdout, result.stderr)
