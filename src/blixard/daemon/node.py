"""`blixard node start`: the composition root of one node.

Wires the state store, the node's registration (record + liveness lease) and
the HTTP API, and owns the process lifecycle: SIGTERM/SIGINT stop the API,
revoke the liveness lease (so the cluster sees a clean leave at once, not
after a TTL) and close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable
from typing import Any

import structlog
import uvicorn

from blixard import __version__
from blixard.agent.registration import NodeRegistration
from blixard.api.app import create_app
from blixard.daemon.config import NodeConfig
from blixard.domain.errors import BlixardError, StoreError, ValidationError
from blixard.store.etcd import EtcdStore
from blixard.store.protocol import StateStore
from blixard.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)


class StartupError(BlixardError):
    code = "startup_failed"


async def open_store(config: NodeConfig) -> tuple[StateStore, dict[str, Any]]:
    """The configured backend, and how to describe it to a user."""
    if config.store == "etcd":
        if not config.etcd_endpoints:
            raise ValidationError("etcd_endpoints", "the etcd store needs at least one endpoint")
        etcd = EtcdStore(config.etcd_endpoints, timeout_s=config.store_timeout_s)
        return etcd, {"backend": "etcd", "endpoints": config.etcd_endpoints}
    sqlite = await SqliteStore.open(config.sqlite_path, timeout_s=config.store_timeout_s)
    return sqlite, {"backend": "sqlite", "path": str(config.sqlite_path)}


def bind_api_socket(host: str, port: int) -> socket.socket:
    """Bind the API port ourselves, so "port in use" is a clear error, not a server log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"api_port: {host}:{port} is already in use") from None
        raise StartupError(f"api_host: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def run_node(config: NodeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the node until SIGTERM or SIGINT."""
    sock = bind_api_socket(config.api_host, config.api_port)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sock.close()
        raise StartupError(f"data_dir: cannot create {config.data_dir}: {exc.strerror}") from None
    try:
        store, description = await open_store(config)
    except BaseException:
        sock.close()
        raise
    registration = NodeRegistration(
        store,
        config.node_id,
        config.data_dir,
        api_url=config.api_url,
        ttl_s=config.lease_ttl_s,
        version=__version__,
    )
    try:
        await registration.register()
        app = create_app(
            store,
            node_id=config.node_id,
            store_description=description,
            registered=registration.alive,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            raise StartupError("the API server stopped during start-up")
        if on_ready is not None:
            on_ready(config.api_url)
        await serving
        log.info("node stopping", node=config.node_id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(sig)
        with contextlib.suppress(StoreError):
            await registration.close()
        await store.close()
        sock.close()
