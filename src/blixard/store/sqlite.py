"""The embedded, durable, single-node StateStore: SQLite with etcd v3's semantics.

A first run of Blixard needs no server: this backend keeps the whole store in
one SQLite file in the data dir. It must be interchangeable with etcd (one
conformance suite judges both), so it reproduces etcd's data model rather than
anything SQLite would suggest:

* An empty store is at revision 1; every write transaction that changes
  something bumps the one global revision by exactly 1, whatever the number
  of operations; a transaction (or delete) that changes nothing does not.
* Keys are stored as UTF-8 BLOBs, so SQLite's ``memcmp`` ordering is etcd's
  byte order, and a prefix range is ``[prefix, prefix_end(prefix))``.
* A ``history`` table holds one row per change (revision, position within its
  transaction, key, type and the key-value as written). Watches replay from it
  and then follow live writes by reading it again after each commit, so a slow
  watcher holds one bounded batch in memory, never a backlog. ``compact``
  deletes history rows older than a revision; an optional automatic compaction
  keeps the last N revisions so the file does not grow forever.
* Leases live in a ``leases`` table (id, ttl); their deadlines live in memory,
  measured with the injected clock, and restart at now+ttl when the store is
  reopened, as etcd's do after a restart or a leader change.

Durability: WAL journal with ``synchronous=FULL``, so a write acknowledged to
the caller has been fsynced and survives SIGKILL or power loss.

Concurrency: every SQLite call runs on one dedicated worker thread (a
single-thread executor). That serialises writes without locks of our own,
keeps fsync off the event loop, and makes each job atomic with respect to the
others, so in-memory mirrors of the head revision, compact revision and lease
deadlines stay exact. Only this worker touches them.

Exclusivity: an advisory ``flock`` on ``<path>.lock`` (holding the owner's pid)
makes a second process opening the same store fail at once with a clear
:class:`StoreUnavailable`, instead of two writers each trusting their own
in-memory head revision.

Bounded calls: every call is bounded by ``timeout_s``. The worker sets SQLite's
busy timeout to what is left of the caller's budget, jobs whose caller already
gave up are skipped, and the caller stops waiting at the deadline whatever the
worker does. Every statement, reads included, runs inside ``BEGIN IMMEDIATE``:
the flock means no other Blixard process uses this file, so a foreign process
holding the database lock (say, ``sqlite3`` with ``BEGIN EXCLUSIVE``) is a fault,
and it is reported as StoreUnavailable on every call, as an unreachable etcd
would be, rather than letting reads succeed while writes fail. It costs no
fsync: a transaction that wrote nothing commits without touching the disk.

Every ``sqlite3`` error becomes a Blixard error before leaving this module:
lock contention and I/O failures become :class:`StoreUnavailable`, anything
else (a corrupt file, a schema we do not know) :class:`StoreError`.

Differences from etcd, on purpose:

* ``lease_grant`` keeps the TTL asked for; etcd raises TTLs below its minimum
  (about 2 s with default flags) to that minimum.
* ``compact(r)`` keeps every event at revision ``r``; etcd may drop a deletion
  event at exactly ``r``. Watching from the compact revision replays all of it.
* ``lease_revoke`` of an unknown lease is ignored (the protocol says so); etcd
  answers "lease not found".
* No limit on the number of operations in a transaction (etcd's default
  ``--max-txn-ops`` is 128).
* When the store is closed, its watches end (``StopAsyncIteration``) after the
  events they already read; a watch started on a closed store, like any other
  call, raises StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import heapq
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from blixard.domain.errors import (
    BlixardError,
    Compacted,
    LeaseNotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from blixard.store.protocol import (
    DEFAULT_TIMEOUT_S,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Lease,
    Put,
    RangeResult,
    TxnOp,
    TxnResult,
    check_key,
    check_lease_id,
    check_revision,
    check_ttl,
    check_txn,
    prefix_end,
)

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA_VERSION = 1
#: Lease ids are positive and fit SQLite's signed 64-bit INTEGER (as etcd's int64).
_MAX_LEASE_ID = 2**63 - 1
#: One watch batch holds at most this many events ...
_WATCH_BATCH_EVENTS = 256
#: ... and stops growing past this many bytes of keys and values (one huge value
#: still goes through on its own).
_WATCH_BATCH_BYTES = 4 * 1024 * 1024
#: Leave this much of a call's budget to report a lock as a lock, not as a timeout.
_BUSY_MARGIN_S = 0.05
#: How much longer than ``timeout_s`` ``close`` waits for the worker to finish.
_CLOSE_GRACE_S = 1.0

_TYPE_PUT = 0
_TYPE_DELETE = 1

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # Column order puts the value last, so scans that only test keys never
    # read a large value's overflow pages.
    "CREATE TABLE kv ("
    " key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,"
    " version INTEGER NOT NULL, lease INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX kv_lease ON kv(lease) WHERE lease != 0",
    # AUTOINCREMENT: ids never go back, even if compaction empties the table,
    # so a watcher's cursor (the last id it read) stays valid.
    "CREATE TABLE history ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL,"
    " sub INTEGER NOT NULL, key BLOB NOT NULL, type INTEGER NOT NULL,"
    " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,"
    " lease INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX history_revision ON history(revision)",
    "CREATE TABLE leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL)",
    f"INSERT INTO meta(name, value) VALUES ('schema_version', {_SCHEMA_VERSION})",
    # etcd: an empty store is at revision 1, and nothing is compacted yet (-1),
    # so compact(0) is accepted once.
    "INSERT INTO meta(name, value) VALUES ('head', 1)",
    "INSERT INTO meta(name, value) VALUES ('compact', -1)",
)

_KV_COLUMNS = "key, create_rev, mod_rev, version, lease, value"
_KEY_COLUMNS = "key, create_rev, mod_rev, version, lease, x''"


# --- validated, normalised requests ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Op:
    """A txn operation after validation: keys and values as the bytes we store."""

    kind: type[Put] | type[Delete] | type[Get]
    key: bytes
    value: bytes = b""
    lease: int = 0
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class _Cmp:
    key: bytes
    target: str
    op: str
    operand: int | bytes


def _normalise_op(op: TxnOp) -> _Op:
    """Encode an operation already validated by ``check_txn`` (no second validation)."""
    if isinstance(op, Put):
        return _Op(Put, op.key.encode(), bytes(op.value), op.lease)
    if isinstance(op, Delete):
        return _Op(Delete, op.key.encode(), prefix=bool(op.prefix))
    return _Op(Get, op.key.encode(), prefix=bool(op.prefix))


def _normalise_compare(c: Compare) -> _Cmp:
    """Encode a compare already validated by ``check_txn``."""
    operand = bytes(c.operand) if isinstance(c.operand, bytes | bytearray) else c.operand
    return _Cmp(c.key.encode(), c.target, c.op, operand)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValidationError(name, f"must be a positive number, got {value!r}")
    return float(value)


# --- the advisory lock -----------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _acquire_lock(path: Path) -> int:
    """Take the store's flock, or explain who holds it.

    flock (not fcntl record locks) because it belongs to the open file, so a
    second opener in this very process is refused as well, and the kernel
    drops it when the process dies, even by SIGKILL.
    """
    lock_path = _lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open the lock file {lock_path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            if holder == str(os.getpid()):
                raise StoreUnavailable(
                    f"store {path} is in use: it is already open in this process (pid {holder})"
                ) from None
            raise StoreUnavailable(
                f"store {path} is in use by another process (pid {holder})"
            ) from None
        raise StoreUnavailable(f"cannot lock {lock_path}: {exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # the lock is ours; the pid is only informative
        log.warning("could not record our pid in %s: %s", lock_path, exc)
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


# --- sqlite errors -----------------------------------------------------------------------------


def _map_sqlite_error(exc: sqlite3.Error, path: Path) -> BlixardError:
    """Translate a sqlite3 failure into the Blixard error tree."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc):
        return StoreUnavailable(
            f"store {path} is locked by another process, which did not release it in time ({exc})"
        )
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailable(f"store {path} failed: {exc}")
    return StoreError(f"store {path} failed: {exc}")


# --- in-memory state of the worker -------------------------------------------------------------


@dataclass(slots=True)
class _LeaseState:
    ttl: int
    deadline: float


@dataclass(slots=True)
class _Revision:
    """The changes of one write transaction, numbered in the order they happen."""

    revision: int
    changes: int = 0


@dataclass(frozen=True, slots=True)
class _WatchBatch:
    events: list[Event]
    after_id: int
    next_rev: int


def _kv_from_row(row: tuple[bytes, int, int, int, int, bytes]) -> KeyValue:
    key, create_rev, mod_rev, version, lease, value = row
    return KeyValue(bytes(key).decode("utf-8"), bytes(value), create_rev, mod_rev, version, lease)


class SqliteStore:
    """The StateStore protocol on one SQLite file; see the module docstring.

    Create it with :meth:`open`, use it from the event loop that opened it,
    and :meth:`close` it to stop the lease checker and release the file.
    """

    def __init__(
        self,
        *,
        path: Path,
        timeout_s: float,
        clock: Callable[[], float],
        lease_check_interval_s: float,
        auto_compact_keep: int | None,
        lock_fd: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Private: use :meth:`open`, which takes the lock and loads the file."""
        self._path = path
        self._timeout_s = timeout_s
        self._clock = clock
        self._lease_check_interval_s = lease_check_interval_s
        self._auto_compact_keep = auto_compact_keep
        self._lock_fd = lock_fd
        self._loop = loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blixard-sqlite")
        self._closed = False
        self._commit_event = asyncio.Event()
        #: Watchers between "about to read history" and "woken": only then does a
        #: commit need to wake the event loop (the worker thread reads this int).
        self._waiting = 0
        self._maintenance: asyncio.Task[None] | None = None
        # Owned by the worker thread (the event loop only reads the ints).
        self._conn: sqlite3.Connection | None = None
        self._head = 1
        self._compact_rev = -1
        self._leases: dict[int, _LeaseState] = {}
        self._lease_heap: list[tuple[float, int]] = []
        self._busy_budget_s = timeout_s

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        lease_check_interval_s: float = 0.1,
        auto_compact_keep: int | None = 10_000,
    ) -> SqliteStore:
        """Open (or create) the store at ``path``.

        ``clock`` measures lease deadlines (inject a fake one to drive expiry
        in tests or the simulation); ``lease_check_interval_s`` is how often
        expired leases are looked for; ``auto_compact_keep`` keeps that many
        most recent revisions of history (``None`` turns automatic compaction
        off). Raises StoreUnavailable if another process holds the store or
        the file cannot be opened within ``timeout_s``.
        """
        path = Path(path)
        timeout_s = _check_positive("timeout_s", timeout_s)
        lease_check_interval_s = _check_positive("lease_check_interval_s", lease_check_interval_s)
        if auto_compact_keep is not None and (
            isinstance(auto_compact_keep, bool)
            or not isinstance(auto_compact_keep, int)
            or auto_compact_keep < 1
        ):
            raise ValidationError(
                "auto_compact_keep",
                f"must be a positive integer or None, got {auto_compact_keep!r}",
            )
        lock_fd = _acquire_lock(path)
        store = cls(
            path=path,
            timeout_s=timeout_s,
            clock=clock,
            lease_check_interval_s=lease_check_interval_s,
            auto_compact_keep=auto_compact_keep,
            lock_fd=lock_fd,
            loop=asyncio.get_running_loop(),
        )
        now = clock()
        try:
            await store._call(lambda: store._job_open(now), needs_conn=False)
        except BaseException:
            await store._shutdown()
            raise
        store._maintenance = asyncio.create_task(
            store._maintain(), name=f"blixard-sqlite-leases:{path}"
        )
        return store

    async def close(self) -> None:
        """Stop the lease checker, end watches, close the file and release the lock.

        Calls made after this raise StoreUnavailable. Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        self._notify_watchers()
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Close the connection on the worker (after the jobs queued before it)."""
        self._closed = True
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._job_close)
        try:
            async with asyncio.timeout(self._timeout_s + _CLOSE_GRACE_S):
                await asyncio.shield(future)
        except TimeoutError:
            log.warning("store %s: the worker did not finish in time; closing anyway", self._path)
        except Exception as exc:
            log.warning("store %s: closing failed: %s", self._path, exc)
        self._executor.shutdown(wait=False)
        _release_lock(self._lock_fd)

    # --- calls into the worker ---------------------------------------------------------------

    async def _call(self, job: Callable[[], T], *, needs_conn: bool = True) -> T:
        """Run ``job`` on the worker thread, bounded by ``timeout_s``."""
        if self._closed and needs_conn:
            raise StoreUnavailable(f"store {self._path} is closed")
        deadline = time.monotonic() + self._timeout_s
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run_job, deadline, job, needs_conn
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            raise StoreUnavailable(
                f"store {self._path} did not answer within {self._timeout_s:g}s; "
                "a write may or may not have been applied"
            ) from None

    def _run_job(self, deadline: float, job: Callable[[], T], needs_conn: bool) -> T:
        """Worker side of :meth:`_call`: skip stale jobs, bound lock waits, map errors."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # The caller gave up while this job waited its turn: doing it now
            # would apply a write nobody is waiting for.
            raise StoreUnavailable(f"store {self._path} was too busy to start the call in time")
        conn = self._conn
        if needs_conn and conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        self._busy_budget_s = max(remaining - _BUSY_MARGIN_S, 0.0)
        try:
            if conn is not None:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_budget_s * 1000)}")
            return job()
        except sqlite3.Error as exc:
            self._rollback()
            raise _map_sqlite_error(exc, self._path) from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        return self._conn

    # --- worker: open and close --------------------------------------------------------------

    def _job_open(self, now: float) -> None:
        conn = sqlite3.connect(str(self._path), timeout=self._busy_budget_s, isolation_level=None)
        self._conn = conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"store {self._path}: SQLite refused WAL mode (got {mode!r}); "
                "is the data dir on a file system without shared memory support?"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("BEGIN IMMEDIATE")
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            for statement in _SCHEMA:
                conn.execute(statement)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("schema_version") != _SCHEMA_VERSION:
            raise StoreError(
                f"store {self._path} has schema version {meta.get('schema_version')!r}; "
                f"this Blixard reads version {_SCHEMA_VERSION}"
            )
        self._head = int(meta["head"])
        self._compact_rev = int(meta["compact"])
        # Deadlines do not survive a restart (the clock is monotonic): like
        # etcd after a restart, every lease gets its full TTL again.
        for lease_id, ttl in conn.execute("SELECT id, ttl FROM leases").fetchall():
            self._track_lease(int(lease_id), int(ttl), now + ttl)
        conn.execute("COMMIT")

    def _job_close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._rollback_conn(conn)
        with contextlib.suppress(sqlite3.Error):
            # Best effort, and never a wait: if another process holds the
            # database, closing must not block on it.
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @staticmethod
    def _rollback_conn(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()

    # --- worker: notifications and automatic compaction --------------------------------------

    def _after_commit(self, revision: int) -> None:
        """A new revision is durable: publish it, wake watchers, maybe compact."""
        self._head = revision
        if self._waiting:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to wake
                self._loop.call_soon_threadsafe(self._notify_watchers)
        self._auto_compact()

    def _auto_compact(self) -> None:
        """Keep the last ``auto_compact_keep`` revisions of history.

        It compacts in steps of a tenth of that, so the cost is one bulk
        delete now and then, not a small one on every write. A failure is
        logged, never raised: the write that triggered it is already durable.
        """
        keep = self._auto_compact_keep
        if keep is None:
            return
        target = self._head - keep + 1
        if target - max(self._compact_rev, 0) < max(1, keep // 10):
            return
        try:
            self._compact_to(target)
        except sqlite3.Error as exc:
            self._rollback()
            log.warning("store %s: automatic compaction failed: %s", self._path, exc)

    def _compact_to(self, revision: int) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM history WHERE revision < ?", (revision,))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'compact'", (revision,))
        conn.execute("COMMIT")
        self._compact_rev = revision

    def _notify_watchers(self) -> None:
        """Event-loop side: wake every watcher waiting for the next commit."""
        event, self._commit_event = self._commit_event, asyncio.Event()
        event.set()

    # --- worker: key-value primitives (inside a transaction) ---------------------------------

    def _record(
        self,
        rev: _Revision,
        key: bytes,
        kind: int,
        *,
        create_rev: int,
        version: int,
        lease: int,
        value: bytes,
    ) -> None:
        self._db().execute(
            "INSERT INTO history(revision, sub, key, type, create_rev, mod_rev, version, lease,"
            " value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rev.revision, rev.changes, key, kind, create_rev, rev.revision, version, lease, value),
        )
        rev.changes += 1

    def _apply_put(self, rev: _Revision, key: bytes, value: bytes, lease: int) -> None:
        conn = self._db()
        row = conn.execute("SELECT create_rev, version FROM kv WHERE key = ?", (key,)).fetchone()
        create_rev, version = (rev.revision, 1) if row is None else (row[0], row[1] + 1)
        conn.execute(
            "INSERT INTO kv(key, create_rev, mod_rev, version, lease, value)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
            " create_rev = excluded.create_rev, mod_rev = excluded.mod_rev,"
            " version = excluded.version, lease = excluded.lease, value = excluded.value",
            (key, create_rev, rev.revision, version, lease, value),
        )
        self._record(
            rev, key, _TYPE_PUT, create_rev=create_rev, version=version, lease=lease, value=value
        )

    def _delete_keys(self, rev: _Revision, keys: Iterable[bytes]) -> int:
        """Delete keys (in the order given), each a delete event of ``rev``.

        A delete event carries only the key and the deleting revision, as
        etcd's tombstones do: create revision, version and lease are 0.
        """
        conn = self._db()
        count = 0
        for key in keys:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._record(rev, key, _TYPE_DELETE, create_rev=0, version=0, lease=0, value=b"")
            count += 1
        return count

    def _select(
        self, key: bytes, *, prefix: bool, limit: int = 0, keys_only: bool = False
    ) -> list[tuple[bytes, int, int, int, int, bytes]]:
        columns = _KEY_COLUMNS if keys_only else _KV_COLUMNS
        args: tuple[bytes, ...]
        if prefix:
            where, args = "key >= ? AND key < ?", (key, prefix_end(key))
        else:
            where, args = "key = ?", (key,)
        rows = self._db().execute(
            f"SELECT {columns} FROM kv WHERE {where} ORDER BY key LIMIT ?",
            (*args, limit if limit > 0 else -1),
        )
        return list(rows)

    def _compare(self, c: _Cmp) -> bool:
        """etcd's compare: a missing key has create=mod=version=lease=0, and no value."""
        row = (
            self._db()
            .execute(
                "SELECT create_rev, mod_rev, version, lease, value FROM kv WHERE key = ?", (c.key,)
            )
            .fetchone()
        )
        actual: int | bytes
        if row is None:
            if c.target == "value":
                return False
            actual = 0
        else:
            fields = {"create": 0, "mod": 1, "version": 2, "lease": 3, "value": 4}
            actual = row[fields[c.target]]
            if isinstance(actual, memoryview | bytearray):
                actual = bytes(actual)
        operand = c.operand
        if isinstance(actual, bytes) != isinstance(operand, bytes):
            return False
        if c.op == "==":
            return actual == operand
        if c.op == "!=":
            return actual != operand
        if c.op == "<":
            return actual < operand  # type: ignore[operator]
        return actual > operand  # type: ignore[operator]

    # --- worker: leases ----------------------------------------------------------------------

    def _track_lease(self, lease_id: int, ttl: int, deadline: float) -> None:
        self._leases[lease_id] = _LeaseState(ttl, deadline)
        heapq.heappush(self._lease_heap, (deadline, lease_id))

    def _expire_due(self, now: float) -> None:
        """Revoke, each in its own revision, every lease whose deadline has passed.

        Run by the periodic checker and before every write or lease call, so a
        lease past its deadline is gone for any caller even if the checker has
        not run yet (etcd: an expired lease cannot be renewed or attached).
        The heap holds stale entries (older deadlines of renewed leases); they
        are skipped when they surface.
        """
        heap = self._lease_heap
        while heap:
            deadline, lease_id = heap[0]
            if deadline > now:
                return
            state = self._leases.get(lease_id)
            if state is None or state.deadline != deadline:
                heapq.heappop(heap)
                continue
            self._revoke(lease_id)  # on failure the entry stays, to be retried

    def _revoke(self, lease_id: int) -> None:
        """Delete the lease and its keys: one revision, delete events in key order."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        keys = [
            bytes(row[0])
            for row in conn.execute(
                "SELECT key FROM kv WHERE lease = ? AND lease != 0 ORDER BY key", (lease_id,)
            )
        ]
        rev = _Revision(self._head + 1)
        self._delete_keys(rev, keys)
        conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        if rev.changes:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'head'", (rev.revision,))
        conn.execute("COMMIT")
        del self._leases[lease_id]
        if rev.changes:
            self._after_commit(rev.revision)

    def _job_lease_grant(self, now: float, ttl: int) -> Lease:
        self._expire_due(now)
        lease_id = 0
        while lease_id == 0 or lease_id in self._leases:
            lease_id = secrets.randbelow(_MAX_LEASE_ID) + 1
        self._db().execute("INSERT INTO leases(id, ttl) VALUES (?, ?)", (lease_id, ttl))
        self._track_lease(lease_id, ttl, now + ttl)
        return Lease(lease_id, ttl)

    def _job_lease_keepalive(self, now: float, lease_id: int) -> int:
        self._expire_due(now)
        state = self._leases.get(lease_id)
        if state is None:
            raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")
        state.deadline = now + state.ttl
        heapq.heappush(self._lease_heap, (state.deadline, lease_id))
        return state.ttl

    def _job_lease_revoke(self, now: float, lease_id: int) -> None:
        self._expire_due(now)
        if lease_id in self._leases:
            self._revoke(lease_id)

    def _job_expire(self, now: float) -> None:
        self._expire_due(now)

    # --- worker: reads, transactions, compaction, watches ------------------------------------

    def _job_get(self, key: bytes) -> KeyValue | None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        rows = self._select(key, prefix=False)
        conn.execute("COMMIT")
        return _kv_from_row(rows[0]) if rows else None

    def _job_range(self, prefix: bytes, limit: int, keys_only: bool) -> RangeResult:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        rows = self._select(
            prefix, prefix=True, limit=limit + 1 if limit else 0, keys_only=keys_only
        )
        conn.execute("COMMIT")
        more = bool(limit) and len(rows) > limit
        if more:
            rows = rows[:limit]
        return RangeResult([_kv_from_row(row) for row in rows], self._head, more)

    def _job_txn(
        self, now: float, compares: Sequence[_Cmp], success: Sequence[_Op], failure: Sequence[_Op]
    ) -> TxnResult:
        self._expire_due(now)
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        succeeded = all(self._compare(c) for c in compares)
        ops = success if succeeded else failure
        for op in ops:
            # Only the branch that runs needs its leases (as in etcd).
            if op.kind is Put and op.lease and op.lease not in self._leases:
                raise LeaseNotFound(f"lease {op.lease} not found (expired or revoked)")
        rev = _Revision(self._head + 1)
        responses: list[int | list[KeyValue]] = []
        for op in ops:
            if op.kind is Put:
                self._apply_put(rev, op.key, op.value, op.lease)
                responses.append(rev.revision)
            elif op.kind is Delete:
                keys = [bytes(row[0]) for row in self._select(op.key, prefix=op.prefix)]
                responses.append(self._delete_keys(rev, keys))
            else:  # a Get sees the writes made before it in this transaction
                responses.append([_kv_from_row(r) for r in self._select(op.key, prefix=op.prefix)])
        if rev.changes:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'head'", (rev.revision,))
            conn.execute("COMMIT")
            self._after_commit(rev.revision)
            return TxnResult(succeeded, rev.revision, responses)
        conn.execute("COMMIT")  # nothing was written: no new revision
        return TxnResult(succeeded, self._head, responses)

    def _job_compact(self, revision: int) -> None:
        if revision <= self._compact_rev:
            raise Compacted(revision, self._compact_rev)
        if revision > self._head:
            raise ValidationError(
                "revision", f"{revision} is a future revision; the store is at {self._head}"
            )
        self._compact_to(revision)

    def _job_watch_batch(
        self, lo: bytes, hi: bytes, from_rev: int, after_id: int, next_rev: int
    ) -> _WatchBatch:
        """The next events of one watcher, read from the history table.

        ``after_id`` is the last history row the watcher has passed;
        ``next_rev`` the oldest revision it may still need, which must not be
        compacted away (etcd's rule: start < compact revision is an error).
        """
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        if next_rev < self._compact_rev:
            raise Compacted(next_rev, self._compact_rev)
        cursor = conn.execute(
            "SELECT id, revision, type, key, create_rev, mod_rev, version, lease, value"
            " FROM history WHERE id > ? AND revision >= ? AND key >= ? AND key < ?"
            " ORDER BY id LIMIT ?",
            (after_id, from_rev, lo, hi, _WATCH_BATCH_EVENTS + 1),
        )
        events: list[Event] = []
        size = 0
        last_id, last_rev = after_id, 0
        peek: tuple[int, int] | None = None
        for row_id, revision, kind, *kv in cursor:
            if len(events) >= _WATCH_BATCH_EVENTS or size >= _WATCH_BATCH_BYTES:
                peek = (row_id, revision)
                break
            event_type = EventType.PUT if kind == _TYPE_PUT else EventType.DELETE
            events.append(Event(event_type, _kv_from_row(tuple(kv))))
            size += len(kv[0]) + len(kv[-1])
            last_id, last_rev = row_id, revision
        cursor.close()
        if peek is None:
            # Caught up: skip past rows of other keys too, so they are not rescanned.
            max_id = conn.execute("SELECT max(id) FROM history").fetchone()[0] or 0
            batch = _WatchBatch(events, max(last_id, max_id), max(next_rev, self._head + 1))
        else:
            # Cut inside revision ``last_rev``: its remaining events are still needed.
            batch = _WatchBatch(events, last_id, last_rev if peek[1] == last_rev else last_rev + 1)
        conn.execute("COMMIT")
        return batch

    # --- the StateStore protocol --------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        raw = check_key(key)
        return await self._call(lambda: self._job_get(raw))

    async def range(self, prefix: str, *, limit: int = 0, keys_only: bool = False) -> RangeResult:
        """Keys starting with ``prefix``, in byte order, at the head revision."""
        raw = check_key(prefix, "prefix")
        check_revision(limit, "limit")
        only = bool(keys_only)
        return await self._call(lambda: self._job_range(raw, limit, only))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        result = await self.txn((), (Put(key, value, lease),))
        response = result.responses[0]
        assert isinstance(response, int)
        return response

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        result = await self.txn((), (Delete(key, prefix),))
        response = result.responses[0]
        assert isinstance(response, int)
        return response

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        """etcd's Txn: if every compare holds run ``success``, else ``failure``; one revision.

        Everything is validated before the database is touched, so bad input
        raises ValidationError and writes nothing.
        """
        check_txn(compares, success, failure)  # the rules every backend shares
        cmps = [_normalise_compare(c) for c in compares]
        ok_ops = [_normalise_op(op) for op in success]
        fail_ops = [_normalise_op(op) for op in failure]
        now = self._clock()
        return await self._call(lambda: self._job_txn(now, cmps, ok_ops, fail_ops))

    def watch(self, prefix: str, *, from_revision: int = 0) -> AsyncIterator[Event]:
        """Events on keys starting with ``prefix``, from ``from_revision`` (0: from now).

        Bad arguments and a closed store raise at once; a compacted start
        raises :class:`Compacted` from the first ``__anext__``. The stream ends
        when the store is closed.
        """
        raw = check_key(prefix, "prefix")
        check_revision(from_revision, "from_revision")
        if self._closed:
            raise StoreUnavailable(f"store {self._path} is closed")
        # "Now" is fixed when watch() is called, not when iteration starts, so
        # a write made between the two is not missed.
        start = from_revision or self._head + 1
        return _Watch(self, raw, prefix_end(raw), start)

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (kept: ``revision`` and later).

        A future revision is a ValidationError; one at or below the current
        compact revision raises Compacted, as in etcd.
        """
        check_revision(revision)
        await self._call(lambda: self._job_compact(revision))

    async def lease_grant(self, ttl_s: int) -> Lease:
        ttl = check_ttl(ttl_s)
        now = self._clock()
        return await self._call(lambda: self._job_lease_grant(now, ttl))

    async def lease_keepalive(self, lease_id: int) -> int:
        check_lease_id(lease_id, "lease_id")
        now = self._clock()
        return await self._call(lambda: self._job_lease_keepalive(now, lease_id))

    async def lease_revoke(self, lease_id: int) -> None:
        check_lease_id(lease_id, "lease_id")
        now = self._clock()
        await self._call(lambda: self._job_lease_revoke(now, lease_id))

    # --- beyond the protocol -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    async def head_revision(self) -> int:
        """The store's current revision (as EtcdStore.head_revision)."""
        if self._closed:
            raise StoreUnavailable(f"store {self._path} is closed")
        return self._head

    @property
    def compact_revision(self) -> int:
        """The revision history starts at (-1 before any compaction, as in etcd)."""
        return self._compact_rev

    async def _maintain(self) -> None:
        """Expire leases every ``lease_check_interval_s``, using the injected clock."""
        while not self._closed:
            await asyncio.sleep(self._lease_check_interval_s)
            now = self._clock()
            try:
                await self._call(functools.partial(self._job_expire, now))
            except StoreError as exc:
                if self._closed:
                    return
                log.warning("store %s: lease expiry check failed: %s", self._path, exc)
            except Exception:
                log.exception("store %s: lease expiry check failed", self._path)


class _Watch(AsyncIterator[Event]):
    """One watch: a cursor into the history table plus one bounded batch.

    It reads its next batch on the worker thread; when it has caught up it
    waits for the store's commit signal. A watcher that falls behind costs a
    position, not a queue; if compaction overtakes it, it raises Compacted
    and the caller re-lists, as with etcd.
    """

    def __init__(self, store: SqliteStore, lo: bytes, hi: bytes, from_rev: int) -> None:
        self._store = store
        self._lo = lo
        self._hi = hi
        self._from_rev = from_rev
        self._next_rev = from_rev
        self._after_id = 0
        self._buffer: deque[Event] = deque()
        self._done = False

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> Event:
        store = self._store
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._done or store._closed:
                self._done = True
                raise StopAsyncIteration
            # Count ourselves as waiting *before* reading: a commit after the read
            # then always wakes us; one before it is in what we read.
            store._waiting += 1
            try:
                waiter = store._commit_event
                lo, hi, from_rev = self._lo, self._hi, self._from_rev
                after_id, next_rev = self._after_id, self._next_rev
                try:
                    batch = await store._call(
                        functools.partial(
                            store._job_watch_batch, lo, hi, from_rev, after_id, next_rev
                        )
                    )
                except StoreUnavailable:
                    if store._closed:
                        self._done = True
                        raise StopAsyncIteration from None
                    raise  # the watch may be resumed by calling __anext__ again
                except Compacted:
                    self._done = True
                    raise
                self._after_id, self._next_rev = batch.after_id, batch.next_rev
                if batch.events:
                    self._buffer.extend(batch.events)
                    continue
                await waiter.wait()
            finally:
                store._waiting -= 1

    async def aclose(self) -> None:
        """Stop the watch (nothing to release: it holds no database resources)."""
        self._done = True
        self._buffer.clear()
