"""Real etcd clusters on 127.0.0.1 for tests, built on Blixard's own member supervisor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from pathlib import Path

from blixard.store.etcd import EtcdStore
from blixard.store.etcd_member import EtcdMember


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (closed again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    """``size`` etcd members bootstrapped statically, each on its own ports and data dir."""

    def __init__(self, base: Path, size: int) -> None:
        self.base = base
        self.members = [
            EtcdMember(
                name=f"m{i}",
                data_dir=base / f"m{i}",
                client_url=f"http://127.0.0.1:{free_port()}",
                peer_url=f"http://127.0.0.1:{free_port()}",
            )
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _spawn_all(self) -> None:
        initial = {m.name: m.peer_url for m in self.members}
        for m in self.members:
            m.start_static(initial)

    async def _wait_all(self) -> None:
        await asyncio.gather(*(m.wait_healthy(30) for m in self.members))

    async def start(self) -> None:
        self._spawn_all()
        await self._wait_all()

    def start_blocking(self) -> None:
        """Start from synchronous code, even when an event loop runs in this thread.

        The members are spawned from this thread (their parent-death signal is
        tied to the spawning thread); only the health wait runs elsewhere.
        """
        self._spawn_all()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self._wait_all()).result()

    def client(self, timeout_s: float = 2.0, endpoints: list[str] | None = None) -> EtcdStore:
        return EtcdStore(endpoints or self.endpoints, timeout_s=timeout_s)

    def stop(self) -> None:
        for m in self.members:
            m.stop(timeout_s=5)
