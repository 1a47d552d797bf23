"""Store benchmark: each Blixard StateStore backend beside the raw layer under it.

Run from the repository root::

    .venv/bin/python -m benchmarks.store [--ops N] [--backends sqlite,etcd-1,etcd-3] [--json]
    .venv/bin/python -m benchmarks.store --breakdown    # where SqliteStore's put time goes

For every backend it measures, with 64-byte values on distinct keys, the same
work done twice on the same database, in the same run:

* ``blixard``: Blixard's store (``SqliteStore`` or ``EtcdStore``);
* ``raw``: the thinnest client of the same layer. For etcd, a minimal HTTP/1.1
  client on asyncio streams (keep-alive connections in an unbounded LIFO list,
  Content-Length or chunked bodies, nothing else) posting the same JSON
  requests to the same gateway endpoint of the same member (no validation, no
  failover, no error mapping, no bound on connections).
  For SQLite, Python's ``sqlite3`` on a second file with the store's settings
  (WAL, ``synchronous=FULL``) and schema, doing the equivalent work per put
  (an UPSERT of the key row plus a history row, one transaction, one commit)
  on one worker thread reached through ``run_in_executor``.

Metrics: sequential put latency (p50, p99) and throughput; throughput and
latency with 64 concurrent writers (asyncio tasks); sequential get latency;
sequential CAS transaction latency (compare mod_revision, then put).

The two clients are interleaved: every phase is cut into ``--rounds`` chunks
that alternate blixard/raw (ABBA order), after a warm-up of both, so a noisy
neighbour on a shared machine hits both alike. The sequential phases run first
and the 64-writer phase last, each of its chunks starting from an emptied and
then primed connection pool (see :func:`measure`): under 64 writers httpx's CPU
cost per request depends on how many connections its pool holds, so the pool
state must be equal too.

On etcd a third client takes part in the put phases, the 64-writer phase
included, as a reference outside the ratio: a bare ``httpx.AsyncClient`` with
the pool limits EtcdStore had when it used httpx, showing in the same run what
EtcdStore's own HTTP/1.1 client (``blixard.store.http1``) replaced. Every etcd
cluster is started
by the benchmark with Blixard's ``EtcdMember`` supervisor on free 127.0.0.1
ports in a temporary directory, and stopped at the end, also on Ctrl-C or an
error. Nothing printed is hard-coded: every figure is measured in the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import httpx
from tests.support.etcd_cluster import EtcdCluster

from blixard.store.etcd import EtcdStore
from blixard.store.protocol import (
    DEFAULT_TIMEOUT_S,
    Compare,
    Put,
    StateStore,
    check_key,
    check_op,
    check_value,
)
from blixard.store.sqlite import SqliteStore

BACKENDS = ("sqlite", "etcd-1", "etcd-3")
#: Operations per client and per phase unless --ops says otherwise: sized so the
#: whole run takes about two minutes on a 2-core machine.
DEFAULT_OPS = {"sqlite": 4000, "etcd": 800}
VALUE_BYTES = 64
CONCURRENCY = 64
#: The goal: Blixard's sequential put latency at most this times the raw layer's.
GOAL_RATIO = 1.3
#: What EtcdStore sends with every request (etcd refuses it on a member without a
#: leader); the raw client sends it too, so etcd does the same work for both.
ETCD_HEADERS = {"Grpc-Metadata-hasleader": "true"}
#: The httpx pool limits EtcdStore used before it had its own client; the httpx
#: reference client gets them, so it shows what EtcdStore did then.
ETCD_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64)
#: Every client's bound on one call. Not Blixard's default (DEFAULT_TIMEOUT_S, 5 s):
#: with 64 concurrent writers single etcd puts through httpx were measured taking
#: more than 5 s on a loaded 2-core machine, and the run would end there. Puts slower
#: than the default are counted and reported instead.
TIMEOUT_S = 30.0
#: Rest before each chunk of the 64-writer phase on etcd: longer than httpx's
#: keep-alive expiry, so every chunk of the httpx reference starts with an empty
#: pool (see measure()). The other clients rest as long, which costs them nothing.
POOL_IDLE_S = (ETCD_LIMITS.keepalive_expiry or 0.0) + 0.5
MS = 1000.0


class CasFailed(Exception):
    """A compare-and-swap the benchmark expected to win lost: a broken run."""


# --- the two clients of each backend, behind one small interface ------------------------------


class Client(Protocol):
    """The operations timed. ``put`` and ``cas`` return the revision of the write."""

    async def put(self, key: str, value: bytes) -> int: ...

    async def get(self, key: str) -> bytes | None: ...

    async def cas(self, key: str, mod_revision: int, value: bytes) -> int: ...

    async def close(self) -> None: ...


class BlixardClient:
    """Any Blixard StateStore, called exactly as the rest of Blixard calls it."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def put(self, key: str, value: bytes) -> int:
        return await self.store.put(key, value)

    async def get(self, key: str) -> bytes | None:
        kv = await self.store.get(key)
        return kv.value if kv is not None else None

    async def cas(self, key: str, mod_revision: int, value: bytes) -> int:
        result = await self.store.txn([Compare.mod(key, mod_revision)], [Put(key, value)])
        if not result.succeeded:
            raise CasFailed(key)
        return result.revision

    async def close(self) -> None:
        await self.store.close()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class HttpxEtcdClient:
    """Reference only (not in the ratio): the same requests through a bare httpx client.

    Post the JSON, read the JSON, with the pool limits EtcdStore had on httpx: what
    EtcdStore's transport cost before ``blixard.store.http1``.
    """

    def __init__(self, endpoint: str) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT_S), limits=ETCD_LIMITS)
        self._put_url = endpoint + "/v3/kv/put"
        self._range_url = endpoint + "/v3/kv/range"
        self._txn_url = endpoint + "/v3/kv/txn"

    async def put(self, key: str, value: bytes) -> int:
        body = {"key": _b64(key.encode()), "value": _b64(value)}
        resp = await self._client.post(self._put_url, json=body, headers=ETCD_HEADERS)
        return int(resp.json()["header"]["revision"])

    async def get(self, key: str) -> bytes | None:
        body = {"key": _b64(key.encode())}
        resp = await self._client.post(self._range_url, json=body, headers=ETCD_HEADERS)
        kvs = resp.json().get("kvs")
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    async def cas(self, key: str, mod_revision: int, value: bytes) -> int:
        k = _b64(key.encode())
        body = {
            "compare": [
                {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}
            ],
            "success": [{"request_put": {"key": k, "value": _b64(value)}}],
            "failure": [],
        }
        resp = await self._client.post(self._txn_url, json=body, headers=ETCD_HEADERS)
        data = resp.json()
        if not data.get("succeeded"):
            raise CasFailed(key)
        return int(data["header"]["revision"])

    async def close(self) -> None:
        await self._client.aclose()


class StreamsEtcdClient:
    """The raw etcd client: the thinnest client of etcd's JSON gateway.

    A minimal HTTP/1.1 client on asyncio streams: keep-alive connections in an
    unbounded LIFO list (a new one whenever none is idle), Content-Length or
    chunked bodies, and nothing else: no bound, no liveness check, no error
    handling, no timeout. Post the JSON, read the JSON.
    """

    def __init__(self, endpoint: str) -> None:
        host_port = endpoint.removeprefix("http://")
        host, _, port = host_port.partition(":")
        self._host, self._port = host, int(port)
        self._host_header = host_port.encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def _post(self, path: bytes, body: dict[str, Any]) -> dict[str, Any]:
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self._host, self._port)
            self._all.append(writer)
        payload = json.dumps(body).encode()
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Grpc-Metadata-hasleader: true\r\nContent-Length: %d\r\n\r\n%s"
            % (path, self._host_header, len(payload), payload)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        headers = head.lower()
        if b"transfer-encoding: chunked" in headers:
            chunks = []
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")
            data = b"".join(chunks)
        else:
            length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
            data = await reader.readexactly(length)
        self._idle.append((reader, writer))
        result: dict[str, Any] = json.loads(data)
        return result

    async def put(self, key: str, value: bytes) -> int:
        data = await self._post(b"/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(value)})
        return int(data["header"]["revision"])

    async def get(self, key: str) -> bytes | None:
        data = await self._post(b"/v3/kv/range", {"key": _b64(key.encode())})
        kvs = data.get("kvs")
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    async def cas(self, key: str, mod_revision: int, value: bytes) -> int:
        k = _b64(key.encode())
        data = await self._post(
            b"/v3/kv/txn",
            {
                "compare": [
                    {
                        "key": k,
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(mod_revision),
                    }
                ],
                "success": [{"request_put": {"key": k, "value": _b64(value)}}],
                "failure": [],
            },
        )
        if not data.get("succeeded"):
            raise CasFailed(key)
        return int(data["header"]["revision"])

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# The raw SQLite file has the tables SqliteStore writes on a put (same columns and
# indexes, copied from src/blixard/store/sqlite.py), so the database does the same work.
RAW_SQLITE_SCHEMA = (
    "CREATE TABLE kv ("
    " key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,"
    " version INTEGER NOT NULL, lease INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX kv_lease ON kv(lease) WHERE lease != 0",
    "CREATE TABLE history ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL,"
    " sub INTEGER NOT NULL, key BLOB NOT NULL, type INTEGER NOT NULL,"
    " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,"
    " lease INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX history_revision ON history(revision)",
)
_RAW_UPSERT = (
    "INSERT INTO kv(key, create_rev, mod_rev, version, lease, value) VALUES (?, ?, ?, 1, 0, ?)"
    " ON CONFLICT(key) DO UPDATE SET mod_rev = excluded.mod_rev, version = version + 1,"
    " lease = 0, value = excluded.value RETURNING create_rev, version"
)
_RAW_HISTORY = (
    "INSERT INTO history(revision, sub, key, type, create_rev, mod_rev, version, lease, value)"
    " VALUES (?, 0, ?, 0, ?, ?, ?, 0, ?)"
)


class RawSqliteClient:
    """sqlite3 with the store's settings, on one worker thread, via run_in_executor.

    The head revision lives in a Python int (SqliteStore also keeps it in a
    ``meta`` row); each put is BEGIN IMMEDIATE, UPSERT ... RETURNING, INSERT
    into history, COMMIT.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._head = 1

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @classmethod
    async def open(cls, path: Path) -> RawSqliteClient:
        client = cls(path)
        await client._run(client._open)
        return client

    def _open(self) -> None:
        conn = sqlite3.connect(str(self._path), timeout=TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        for statement in RAW_SQLITE_SCHEMA:
            conn.execute(statement)
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _write(self, conn: sqlite3.Connection, key: bytes, value: bytes) -> int:
        rev = self._head + 1
        create_rev, version = conn.execute(_RAW_UPSERT, (key, rev, rev, value)).fetchone()
        conn.execute(_RAW_HISTORY, (rev, key, create_rev, rev, version, value))
        return rev

    def _put(self, key: bytes, value: bytes) -> int:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        rev = self._write(conn, key, value)
        conn.execute("COMMIT")
        self._head = rev
        return rev

    def _get(self, key: bytes) -> bytes | None:
        sql = "SELECT create_rev, mod_rev, version, lease, value FROM kv WHERE key = ?"
        row = self._db().execute(sql, (key,)).fetchone()
        return bytes(row[4]) if row is not None else None

    def _cas(self, key: bytes, mod_revision: int, value: bytes) -> int:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] != mod_revision:
            conn.execute("COMMIT")
            raise CasFailed(key.decode())
        rev = self._write(conn, key, value)
        conn.execute("COMMIT")
        self._head = rev
        return rev

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._run(self._put, key.encode(), value))

    async def get(self, key: str) -> bytes | None:
        result: bytes | None = await self._run(self._get, key.encode())
        return result

    async def cas(self, key: str, mod_revision: int, value: bytes) -> int:
        return int(await self._run(self._cas, key.encode(), mod_revision, value))

    async def close(self) -> None:
        await self._run(self._close)
        self._pool.shutdown(wait=True)


#: The steps --breakdown adds, one at a time, to the raw SQLite put: what SqliteStore
#: does on a put beyond the raw client's UPSERT + history row + commit.
BREAKDOWN_STEPS = (
    "raw (as in the main table)",
    "+ UPDATE meta SET head (revision kept in a row)",
    "+ PRAGMA busy_timeout before each call",
    "+ SELECT create_rev, version before the UPSERT",
    "+ asyncio.wait_for around the executor future",
    "+ call_soon_threadsafe after each commit (watchers)",
    "+ validation on the event loop (Put, check_op, ...)",
)


class LadderSqliteClient(RawSqliteClient):
    """The raw client plus the first ``level`` extra steps of BREAKDOWN_STEPS.

    Each step imitates what SqliteStore does (src/blixard/store/sqlite.py), with
    public functions only, so the differences between consecutive levels split
    Blixard's overhead into its parts.
    """

    def __init__(self, path: Path, level: int) -> None:
        super().__init__(path)
        self.level = level
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commit_event = asyncio.Event()

    @classmethod
    async def open_level(cls, path: Path, level: int) -> LadderSqliteClient:
        client = cls(path, level)
        client._loop = asyncio.get_running_loop()
        await client._run(client._open)
        return client

    def _open(self) -> None:
        super()._open()
        conn = self._db()
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        conn.execute("INSERT INTO meta(name, value) VALUES ('head', 1)")

    def _notify(self) -> None:
        event, self._commit_event = self._commit_event, asyncio.Event()
        event.set()

    def _put(self, key: bytes, value: bytes) -> int:
        conn, level = self._db(), self.level
        if level >= 2:
            conn.execute(f"PRAGMA busy_timeout = {int(TIMEOUT_S * 1000) - 50}")
        conn.execute("BEGIN IMMEDIATE")
        if level >= 3:
            conn.execute("SELECT create_rev, version FROM kv WHERE key = ?", (key,)).fetchone()
        rev = self._write(conn, key, value)
        if level >= 1:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'head'", (rev,))
        conn.execute("COMMIT")
        self._head = rev
        if level >= 5 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._notify)
        return rev

    async def put(self, key: str, value: bytes) -> int:
        if self.level >= 6:
            # What SqliteStore.put/txn do before the worker: build a Put, check_op it,
            # check_key and check_value it again, and look for a key written twice in
            # each branch (success and the empty failure).
            op = Put(key, value)
            check_op(op)
            raw_key, raw_value = check_key(op.key), check_value(op.value)
            for branch in ([raw_key], []):
                seen: set[bytes] = set()
                for k in branch:
                    if k in seen:
                        raise CasFailed(key)
                    seen.add(k)
        else:
            raw_key, raw_value = key.encode(), value
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, self._put, raw_key, raw_value
        )
        if self.level >= 4:
            return int(await asyncio.wait_for(future, TIMEOUT_S))
        return int(await future)


# --- timing -----------------------------------------------------------------------------------


@dataclass
class Series:
    """The latencies (seconds) of one client in one phase, and the wall time it took."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    #: CPU time of the whole process (every thread) while this client ran.
    cpu_s: float = 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, ``q`` in (0, 100]."""
        ordered = sorted(self.latencies)
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
        return ordered[int(rank) - 1]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s


Op = Callable[[int], Awaitable[object]]


async def _sequential(op: Op, indices: range, out: Series) -> None:
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    for i in indices:
        t0 = clock()
        await op(i)
        out.latencies.append(clock() - t0)
    out.wall_s += clock() - start
    out.cpu_s += time.process_time() - cpu0


async def _concurrent(op: Op, indices: range, out: Series, writers: int) -> None:
    clock = time.perf_counter
    todo: Iterator[int] = iter(indices)  # shared: each writer takes the next index

    async def writer() -> None:
        for i in todo:
            t0 = clock()
            await op(i)
            out.latencies.append(clock() - t0)

    cpu0 = time.process_time()
    start = clock()
    await asyncio.gather(*(writer() for _ in range(writers)))
    out.wall_s += clock() - start
    out.cpu_s += time.process_time() - cpu0


async def measure(
    ops: dict[str, Op],
    n: int,
    rounds: int,
    writers: int = 1,
    prime: dict[str, Op] | None = None,
    idle_s: float = 0.0,
) -> dict[str, Series]:
    """Run ``n`` operations per client, the clients alternating in ABBA rounds.

    With ``prime``, each timed chunk of a client is preceded by ``writers``
    untimed operations of ``prime[name]`` run by ``writers`` concurrent writers,
    and, with ``idle_s``, by at least that long without using the client. Both
    together make every chunk start from the same state of an HTTP pool: its
    idle connections expired (httpx keeps them 5 s), then one fresh connection
    per writer. That matters: httpx's pool costs several times more CPU per
    request with 64 connections than with the dozen or so it shrinks to under a
    steady load, so without this the ABBA order itself (one client running two
    chunks back to back) decided the 64-writer figures.
    """
    names = list(ops)
    series = {name: Series() for name in names}
    bounds = [n * r // rounds for r in range(rounds + 1)]
    last_used: dict[str, float] = {}
    gc.collect()
    for r in range(rounds):
        chunk = range(bounds[r], bounds[r + 1])
        for name in names if r % 2 == 0 else names[::-1]:
            if name in last_used and idle_s > 0:
                await asyncio.sleep(max(0.0, last_used[name] + idle_s - time.monotonic()))
            if prime is not None:
                primer = range(r * writers, (r + 1) * writers)
                await _concurrent(prime[name], primer, Series(), writers)
            if writers == 1:
                await _sequential(ops[name], chunk, series[name])
            else:
                await _concurrent(ops[name], chunk, series[name], writers)
            last_used[name] = time.monotonic()
    return series


# --- one backend ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lower_is_better: bool


METRICS = (
    Metric("put p50 (sequential)", "ms", True),
    Metric("put p99 (sequential)", "ms", True),
    Metric("put throughput (sequential)", "ops/s", False),
    Metric(f"put throughput ({CONCURRENCY} writers)", "ops/s", False),
    Metric(f"put p50 ({CONCURRENCY} writers)", "ms", True),
    Metric(f"put p99 ({CONCURRENCY} writers)", "ms", True),
    Metric(f"put max ({CONCURRENCY} writers)", "ms", True),
    Metric("get p50 (sequential)", "ms", True),
    Metric("get p99 (sequential)", "ms", True),
    Metric("cas txn p50 (sequential)", "ms", True),
    Metric("cas txn p99 (sequential)", "ms", True),
)


@dataclass
class BackendResult:
    backend: str
    target: str
    figures: dict[str, dict[str, float]]  # metric name -> {"blixard": x, "raw": y}
    notes: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Put figures of the reference client (outside the ratio), and what it is.
    reference: dict[str, float] = field(default_factory=dict)
    reference_label: str = ""
    ops: int = 0

    def ratio(self, metric: str) -> float:
        fig = self.figures[metric]
        return fig["blixard"] / fig["raw"]

    @property
    def goal_met(self) -> bool:
        return all(
            self.ratio(m) <= GOAL_RATIO for m in ("put p50 (sequential)", "put p99 (sequential)")
        )


def _keys(tag: str, phase: str, n: int) -> list[str]:
    # Same length for both clients, so etcd and SQLite see keys of one size.
    return [f"/bench/{tag}/{phase}/{i:08d}" for i in range(n)]


def _concurrent_rounds(n: int, rounds: int) -> int:
    """ABBA rounds for the concurrent phase: at least 2, each chunk big enough (about
    8 operations per writer) that the writers spend most of it all busy."""
    return max(2, min(rounds, n // (8 * CONCURRENCY)))


async def run_pair(
    clients: dict[str, Client],
    n: int,
    rounds: int,
    warmup: int,
    reference: Client | None = None,
    pool_idle_s: float = 0.0,
) -> tuple[dict[str, dict[str, float]], dict[str, float], list[str]]:
    """The whole measurement for one backend; ``clients`` is {"blixard": .., "raw": ..}.

    ``reference``, if given, takes part in the two put phases only (interleaved
    with the others); its figures are returned apart, outside the ratio.
    ``pool_idle_s``: how long each client rests before each chunk of the
    concurrent phase (see :func:`measure`).
    """
    value = os.urandom(VALUE_BYTES)
    new_value = os.urandom(VALUE_BYTES)
    tags = {"blixard": "bx", "raw": "rw", "reference": "rf"}
    # The reference goes between the two: in ABBA order the clients at the ends run
    # two chunks back to back at each round boundary and the middle one never does,
    # so blixard and raw must be the ends to be treated alike.
    first, *rest = clients
    putters: dict[str, Client] = {first: clients[first]}
    if reference is not None:
        putters["reference"] = reference
    putters |= {name: clients[name] for name in rest}

    # Warm-up of every client (connection, caches, code paths), sequential only. The
    # sequential phases come first and the 64-writer phase last: with a burst of
    # concurrent writers before a sequential phase, the client that burst last came
    # out up to 40% slower in it (measured on etcd; httpx then holds the burst's idle
    # connections for 5 s), which made the order of the clients decide the ratio.
    for name, c in putters.items():
        wkeys = _keys(tags[name], "w", warmup)
        revs = [await c.put(k, value) for k in wkeys]
        if name in clients:
            for k in wkeys:
                await c.get(k)
            for k, rev in zip(wkeys, revs, strict=True):
                await c.cas(k, rev, new_value)

    seq_keys = {name: _keys(tags[name], "s", n) for name in putters}
    conc_keys = {name: _keys(tags[name], "c", n) for name in putters}
    revisions = {name: [0] * n for name in putters}

    put_seq = await measure(
        {name: _op_put(c, seq_keys[name], value, revisions[name]) for name, c in putters.items()},
        n,
        rounds,
    )
    get_seq = await measure(
        {name: _op_get(c, seq_keys[name]) for name, c in clients.items()}, n, rounds
    )
    cas_seq = await measure(
        {
            name: _op_cas(c, seq_keys[name], revisions[name], new_value)
            for name, c in clients.items()
        },
        n,
        rounds,
    )
    conc_rounds = _concurrent_rounds(n, rounds)
    prime_keys = {name: _keys(tags[name], "p", conc_rounds * CONCURRENCY) for name in putters}
    put_conc = await measure(
        {name: _op_put(c, conc_keys[name], value, None) for name, c in putters.items()},
        n,
        conc_rounds,
        CONCURRENCY,
        prime={name: _op_put(c, prime_keys[name], value, None) for name, c in putters.items()},
        idle_s=pool_idle_s,
    )

    # Spot check, untimed: every client wrote what we think it wrote.
    for name, c in clients.items():
        for i in (0, n // 2, n - 1):
            got = await c.get(seq_keys[name][i])
            if got != new_value:
                raise RuntimeError(f"{name}: {seq_keys[name][i]} holds {got!r} after the CAS")

    def put_figures(name: str) -> dict[str, float]:
        return {
            "put p50 (sequential)": put_seq[name].percentile(50) * MS,
            "put p99 (sequential)": put_seq[name].percentile(99) * MS,
            "put throughput (sequential)": put_seq[name].throughput,
            f"put throughput ({CONCURRENCY} writers)": put_conc[name].throughput,
            f"put p50 ({CONCURRENCY} writers)": put_conc[name].percentile(50) * MS,
            f"put p99 ({CONCURRENCY} writers)": put_conc[name].percentile(99) * MS,
            f"put max ({CONCURRENCY} writers)": max(put_conc[name].latencies) * MS,
        }

    figures: dict[str, dict[str, float]] = {m.name: {} for m in METRICS}
    for name in clients:
        f = put_figures(name) | {
            "get p50 (sequential)": get_seq[name].percentile(50) * MS,
            "get p99 (sequential)": get_seq[name].percentile(99) * MS,
            "cas txn p50 (sequential)": cas_seq[name].percentile(50) * MS,
            "cas txn p99 (sequential)": cas_seq[name].percentile(99) * MS,
        }
        for metric, v in f.items():
            figures[metric][name] = v
    notes = []
    for name, series in (("sequential", put_seq), (f"{CONCURRENCY} writers", put_conc)):
        slow = {c: sum(x > DEFAULT_TIMEOUT_S for x in series[c].latencies) for c in putters}
        if any(slow.values()):
            counts = ", ".join(f"{c} {k}" for c, k in slow.items())
            notes.append(
                f"puts ({name}) slower than {DEFAULT_TIMEOUT_S:g} s: {counts}, of {n} each;"
                f" {DEFAULT_TIMEOUT_S:g} s is Blixard's default timeout_s, which bounds the"
                " whole call: with it, such a Blixard put fails with StoreUnavailable"
            )
    return figures, put_figures("reference") if reference is not None else {}, notes


def _op_put(c: Client, keys: list[str], value: bytes, revs: list[int] | None) -> Op:
    if revs is None:

        async def put(i: int) -> object:
            return await c.put(keys[i], value)

        return put

    async def put_recording(i: int) -> object:
        revs[i] = await c.put(keys[i], value)
        return None

    return put_recording


def _op_get(c: Client, keys: list[str]) -> Op:
    async def get(i: int) -> object:
        return await c.get(keys[i])

    return get


def _op_cas(c: Client, keys: list[str], revs: list[int], value: bytes) -> Op:
    async def cas(i: int) -> object:
        return await c.cas(keys[i], revs[i], value)

    return cas


async def bench_sqlite(tmp: Path, n: int, rounds: int, warmup: int) -> BackendResult:
    store = await SqliteStore.open(tmp / "blixard.db", timeout_s=TIMEOUT_S)
    clients: dict[str, Client] = {"blixard": BlixardClient(store)}
    try:
        clients["raw"] = await RawSqliteClient.open(tmp / "raw.db")
        load_before = os.getloadavg()
        figures, _, notes = await run_pair(clients, n, rounds, warmup)
        load_after = os.getloadavg()
    finally:
        for c in clients.values():
            await c.close()
    return BackendResult(
        "sqlite",
        f"two files in {tmp} (WAL, synchronous=FULL)",
        figures,
        notes,
        load_before=load_before,
        load_after=load_after,
    )


async def _leader_url(cluster: EtcdCluster) -> str:
    """The client URL of the member the cluster reports as its leader."""
    store = cluster.client(timeout_s=TIMEOUT_S)
    try:
        leader = await store.leader_id()
        members = await store.member_list()
    finally:
        await store.close()
    for m in members:
        if m.id == leader and m.client_urls:
            return m.client_urls[0].rstrip("/")
    raise RuntimeError(f"leader {leader:x} is not in the member list {members}")


async def bench_etcd(
    tmp: Path, size: int, n: int, rounds: int, warmup: int, clusters: list[EtcdCluster]
) -> BackendResult:
    cluster = EtcdCluster(tmp / f"etcd{size}", size)
    clusters.append(cluster)  # registered before starting: stopped even if start fails
    try:
        await cluster.start()
        url = await _leader_url(cluster)
        clients: dict[str, Client] = {
            "blixard": BlixardClient(EtcdStore([url], timeout_s=TIMEOUT_S)),
            "raw": StreamsEtcdClient(url),
        }
        httpx_client = HttpxEtcdClient(url)
        try:
            load_before = os.getloadavg()
            figures, reference, notes = await run_pair(
                clients, n, rounds, warmup, httpx_client, POOL_IDLE_S
            )
            load_after = os.getloadavg()
        finally:
            for c in (*clients.values(), httpx_client):
                await c.close()
        after = await _leader_url(cluster)
        if after != url:
            notes.append(f"the leader moved during the run ({url} -> {after}): figures suspect")
    finally:
        cluster.stop()
    which = "the leader" if size > 1 else "the only member"
    return BackendResult(
        f"etcd-{size}",
        f"{size} member(s), every client on {which} at {url}",
        figures,
        notes,
        load_before,
        load_after,
        reference,
        "the same puts, same member, through a bare httpx.AsyncClient (EtcdStore's transport"
        " before blixard.store.http1)",
    )


async def breakdown(tmp: Path, n: int, rounds: int, warmup: int) -> str:
    """Sequential SQLite puts: raw, raw plus each of Blixard's extra steps, and Blixard."""
    clients: dict[str, Client] = {}
    try:
        for level, step in enumerate(BREAKDOWN_STEPS):
            clients[step] = await LadderSqliteClient.open_level(tmp / f"step{level}.db", level)
        blixard = "Blixard SqliteStore"
        clients[blixard] = BlixardClient(await SqliteStore.open(tmp / "blixard.db"))
        value = os.urandom(VALUE_BYTES)
        tags = {name: f"{i:02d}" for i, name in enumerate(clients)}
        for name, c in clients.items():
            for k in _keys(tags[name], "w", warmup):
                await c.put(k, value)
        keys = {name: _keys(tags[name], "s", n) for name in clients}
        ops = {name: _op_put(c, keys[name], value, None) for name, c in clients.items()}
        series = await measure(ops, n, rounds)
    finally:
        for c in clients.values():
            await c.close()
    base = series[BREAKDOWN_STEPS[0]]
    lines = [
        f"== sqlite breakdown: sequential puts, {n} per step, {rounds} ABBA rounds over all steps",
        f"   {'step':<52} {'p50 ms':>8} {'p99 ms':>8} {'p50/raw':>8} {'CPU us/put':>11}",
    ]
    for name, sr in series.items():
        lines.append(
            f"   {name:<52} {sr.percentile(50) * MS:>8.3f} {sr.percentile(99) * MS:>8.3f}"
            f" {sr.percentile(50) / base.percentile(50):>7.2f}x"
            f" {sr.cpu_s / len(sr.latencies) * 1e6:>11.0f}"
        )
    lines.append("   (CPU: the whole process, every thread, per put)")
    return "\n".join(lines)


# --- report -----------------------------------------------------------------------------------


def _command_output(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return out.stdout.strip()


def environment() -> dict[str, str]:
    etcd_version = _command_output(["etcd", "--version"]).splitlines()
    debian = Path("/etc/debian_version")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpus": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}"
        + (f", Debian {debian.read_text().strip()}" if debian.exists() else ""),
        "python": platform.python_version(),
        "etcd": etcd_version[0] if etcd_version else "unavailable",
        "httpx": httpx.__version__,
        "sqlite": sqlite3.sqlite_version,
        # httpcore tries "import sniffio" on every request; without it that failed
        # import (never cached by Python) is paid each time, by both etcd clients.
        "sniffio": "installed" if importlib.util.find_spec("sniffio") else "not installed",
    }


def _fmt(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit == "ops/s" else f"{value:.3f}"


def render(result: BackendResult) -> str:
    lines = [
        f"== {result.backend}: {result.target}; {result.ops} ops per client per phase",
        f"   load average before/after: {result.load_before[0]:.2f} / {result.load_after[0]:.2f}",
    ]
    header = f"   {'metric':<36} {'unit':>6} {'blixard':>10} {'raw':>10} {'blixard/raw':>12}"
    lines += [header, "   " + "-" * (len(header) - 3)]
    for m in METRICS:
        fig = result.figures[m.name]
        lines.append(
            f"   {m.name:<36} {m.unit:>6} {_fmt(fig['blixard'], m.unit):>10}"
            f" {_fmt(fig['raw'], m.unit):>10} {result.ratio(m.name):>11.2f}x"
        )
    p50 = result.ratio("put p50 (sequential)")
    p99 = result.ratio("put p99 (sequential)")
    verdict = "MET" if result.goal_met else "NOT MET"
    lines.append(
        f"   goal: sequential put at most {GOAL_RATIO}x the raw latency (p50 and p99):"
        f" p50 {p50:.2f}x, p99 {p99:.2f}x -> {verdict}"
    )
    if result.reference:
        lines.append(f"   reference, not in the ratio: {result.reference_label}")
        lines.append(
            f"   {'metric':<36} {'unit':>6} {'reference':>10} {'blixard':>10} {'blixard/ref':>12}"
        )
        for m in METRICS:
            if m.name in result.reference:
                ref, ours = result.reference[m.name], result.figures[m.name]["blixard"]
                lines.append(
                    f"   {m.name:<36} {m.unit:>6} {_fmt(ref, m.unit):>10}"
                    f" {_fmt(ours, m.unit):>10} {ours / ref:>11.2f}x"
                )
    lines += [f"   note: {note}" for note in result.notes]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.store",
        description="Blixard's StateStore backends measured beside the raw layer.",
    )
    parser.add_argument(
        "--ops",
        type=int,
        default=None,
        help="operations per client and per phase, for every backend (default: 4000 on"
        " sqlite, whose operations are about ten times cheaper, 800 on etcd)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated, from %(default)s (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="ABBA rounds per phase")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up operations per client")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead, split SqliteStore's put overhead: sequential puts of the raw client,"
        " the raw client plus each of Blixard's extra steps in turn, and Blixard",
    )
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if (args.ops is not None and args.ops < args.rounds) or args.rounds < 1:
        parser.error("--ops must be at least --rounds, and --rounds at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    return args


async def run(
    args: argparse.Namespace, tmp: Path, clusters: list[EtcdCluster]
) -> list[BackendResult]:
    results: list[BackendResult] = []
    for backend in args.backends:
        start = time.monotonic()
        if backend == "sqlite":
            ops = args.ops or DEFAULT_OPS["sqlite"]
            result = await bench_sqlite(tmp / "sqlite", ops, args.rounds, args.warmup)
        else:
            ops = args.ops or DEFAULT_OPS["etcd"]
            size = int(backend.split("-")[1])
            result = await bench_etcd(tmp, size, ops, args.rounds, args.warmup, clusters)
        result.ops = ops
        result.notes.append(f"measured in {time.monotonic() - start:.1f} s")
        print(render(result), end="\n\n", flush=True)
        results.append(result)
    return results


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop etcd


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    ops_text = (
        str(args.ops)
        if args.ops
        else f"{DEFAULT_OPS['sqlite']} (sqlite) or {DEFAULT_OPS['etcd']} (etcd)"
    )
    print("Blixard store benchmark: Blixard's StateStore beside the raw layer, same run")
    for k, v in env.items():
        print(f"  {k:<7} {v}")
    if not args.breakdown:
        print(
            f"  work    {ops_text} ops per client per phase, {VALUE_BYTES}-byte values, distinct"
            f" keys, {args.rounds} ABBA rounds, {args.warmup} warm-up ops; {CONCURRENCY} writers"
            " = asyncio tasks"
        )
    print(flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="blixard-bench-") as tmpdir:
            n = args.ops or DEFAULT_OPS["sqlite"]
            print(asyncio.run(breakdown(Path(tmpdir), n, args.rounds, args.warmup)))
        return 0
    clusters: list[EtcdCluster] = []
    with tempfile.TemporaryDirectory(prefix="blixard-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "sqlite").mkdir()
        try:
            results = asyncio.run(run(args, tmp, clusters))
        except KeyboardInterrupt:
            print("interrupted: stopping etcd", file=sys.stderr)
            return 130
        finally:
            for cluster in clusters:
                with contextlib.suppress(Exception):
                    cluster.stop()
    summary = ", ".join(
        f"{r.backend} {'met' if r.goal_met else 'NOT met'}"
        f" (p50 {r.ratio('put p50 (sequential)'):.2f}x, p99 {r.ratio('put p99 (sequential)'):.2f}x)"
        for r in results
    )
    print(f"goal (sequential put <= {GOAL_RATIO}x raw, p50 and p99): {summary}")
    if args.json:
        doc = {
            "environment": env,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "value_bytes": VALUE_BYTES,
            "concurrency": CONCURRENCY,
            "goal_ratio": GOAL_RATIO,
            "backends": [
                {
                    "backend": r.backend,
                    "target": r.target,
                    "ops": r.ops,
                    "goal_met": r.goal_met,
                    "notes": r.notes,
                    "reference": {"label": r.reference_label, "metrics": r.reference},
                    "metrics": [
                        {
                            "metric": m.name,
                            "unit": m.unit,
                            "blixard": r.figures[m.name]["blixard"],
                            "raw": r.figures[m.name]["raw"],
                            "ratio": r.ratio(m.name),
                        }
                        for m in METRICS
                    ],
                }
                for r in results
            ],
        }
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
