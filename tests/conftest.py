"""Fixtures shared by every test layer: real stores, real etcd processes on 127.0.0.1."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blixard.store.protocol import StateStore
from blixard.store.sqlite import SqliteStore
from tests.support.etcd_cluster import EtcdCluster

# etcd is installed by .ci/run; a missing binary fails these tests, it never skips them.
BACKENDS = ["sqlite", "etcd-1", "etcd-3"]
_prefix_counter = itertools.count()


@pytest.fixture(scope="session")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd1"), 1)
    cluster.start_blocking()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd3"), 3)
    cluster.start_blocking()
    yield cluster
    cluster.stop()


@pytest.fixture
async def fresh_etcd3(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """A 3-member cluster of the test's own, for tests that kill members."""
    cluster = EtcdCluster(tmp_path / "etcd3", 3)
    await cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def fresh_etcd1(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd1", 1)
    await cluster.start()
    yield cluster
    cluster.stop()


@dataclass
class Backend:
    """One backend under test: its primary store, and how to get more clients of it.

    ``prefix`` is unique per test so tests sharing a session-wide etcd never
    see each other's keys.
    """

    kind: str
    store: StateStore
    prefix: str
    cluster: EtcdCluster | None = None
    sqlite_path: Path | None = None
    _extra: list[StateStore] = field(default_factory=list)

    async def client(self, endpoint_index: int | None = None, timeout_s: float = 2.0) -> StateStore:
        """Another client of the same store (for SQLite: the same embedded store)."""
        if self.cluster is None:
            return self.store
        endpoints = self.cluster.endpoints
        if endpoint_index is not None:
            endpoints = endpoints[endpoint_index:] + endpoints[:endpoint_index]
        c = self.cluster.client(timeout_s=timeout_s, endpoints=endpoints)
        self._extra.append(c)
        return c

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def close(self) -> None:
        for c in self._extra:
            await c.close()
        await self.store.close()


async def make_backend(kind: str, tmp_path: Path, cluster: EtcdCluster | None) -> Backend:
    prefix = f"/test/{next(_prefix_counter)}-{tmp_path.name}/"
    if kind == "sqlite":
        path = tmp_path / "state.db"
        return Backend(kind, await SqliteStore.open(path, timeout_s=2.0), prefix, sqlite_path=path)
    assert cluster is not None
    return Backend(kind, cluster.client(), prefix, cluster=cluster)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    cluster = None
    if kind == "etcd-1":
        cluster = request.getfixturevalue("etcd1")
    elif kind == "etcd-3":
        cluster = request.getfixturevalue("etcd3")
    b = await make_backend(kind, tmp_path, cluster)
    yield b
    await b.close()
