"""SqliteStore behaviour beyond the shared conformance suite.

These run against real SQLite files in a temporary directory (no mocks of
sqlite): persistence across reopen, the exclusive flock, automatic compaction,
lease expiry driven by an injected clock, and the etcd details the
conformance suite does not pin down (revision bumps, duplicate keys, delete
events, compaction inside a large revision).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blixard.domain.errors import (
    Compacted,
    LeaseNotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from blixard.store.protocol import (
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Put,
    StateStore,
)
from blixard.store.sqlite import SqliteStore


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(
        tmp_path / "state.db", timeout_s=2.0, clock=clock, lease_check_interval_s=0.02
    )
    yield s
    await s.close()


async def take(it: AsyncIterator[Event], count: int, timeout_s: float = 5.0) -> list[Event]:
    out: list[Event] = []

    async def run() -> None:
        while len(out) < count:
            out.append(await anext(it))

    await asyncio.wait_for(run(), timeout_s)
    return out


async def wait_until_gone(store: SqliteStore, key: str, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if await store.get(key) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} still there after {timeout_s}s")


# --- basics -------------------------------------------------------------------------------------


async def test_is_a_state_store_and_starts_at_revision_1(store: SqliteStore) -> None:
    assert isinstance(store, StateStore)
    empty = await store.range("/")
    assert (empty.kvs, empty.revision, empty.more) == ([], 1, False)
    assert await store.head_revision() == 1
    assert await store.put("/a", b"x") == 2


async def test_writes_that_change_nothing_do_not_bump_the_revision(store: SqliteStore) -> None:
    rev = await store.put("/a", b"1")
    assert await store.delete("/missing") == 0
    assert await store.delete("/nothing/", prefix=True) == 0
    res = await store.txn([], [Delete("/missing"), Get("/a")])
    assert res.succeeded and res.revision == rev
    assert res.responses[0] == 0
    got = res.responses[1]
    assert isinstance(got, list) and got[0].value == b"1"
    failed = await store.txn([Compare.absent("/a")], [Put("/a", b"2")])
    assert not failed.succeeded and failed.revision == rev
    assert (await store.range("/")).revision == rev


async def test_txn_ops_see_earlier_writes_and_share_one_revision(store: SqliteStore) -> None:
    await store.put("/p/old", b"o")
    res = await store.txn(
        [],
        [
            Put("/p/a", b"1"),
            Delete("/p/old"),
            Put("/p/b", b"2"),
            Get("/p/", prefix=True),
        ],
    )
    assert res.responses[:3] == [res.revision, 1, res.revision]
    listed = res.responses[3]
    assert isinstance(listed, list)
    assert [(kv.key, kv.mod_revision) for kv in listed] == [
        ("/p/a", res.revision),
        ("/p/b", res.revision),
    ]
    assert await store.head_revision() == res.revision


async def test_versions_and_create_revision_across_delete(store: SqliteStore) -> None:
    r1 = await store.put("/v", b"1")
    await store.put("/v", b"2")
    r3 = await store.put("/v", b"3")
    kv = await store.get("/v")
    assert kv == KeyValue("/v", b"3", r1, r3, 3, 0)
    await store.delete("/v")
    r5 = await store.put("/v", b"again")
    assert await store.get("/v") == KeyValue("/v", b"again", r5, r5, 1, 0)


async def test_duplicate_keys_in_a_branch_are_refused_like_etcd(store: SqliteStore) -> None:
    refused: list[list[Put | Delete | Get]] = [
        [Put("/d/a", b"1"), Put("/d/a", b"2")],
        [Delete("/d/a"), Put("/d/a", b"1")],
        [Put("/d/a/x", b"1"), Delete("/d/a", prefix=True)],
    ]
    for ops in refused:
        with pytest.raises(ValidationError, match="duplicate key"):
            await store.txn([], ops)
        # etcd checks the branch that does not run as well
        with pytest.raises(ValidationError, match="duplicate key"):
            await store.txn([], [], ops)
    assert await store.head_revision() == 1
    # Overlapping deletes and a get of a put key are fine.
    await store.put("/d/a", b"0")
    res = await store.txn(
        [], [Delete("/d/a"), Delete("/d/a", prefix=True), Put("/d/b", b"1"), Get("/d/b")]
    )
    assert res.responses[:2] == [1, 0]


async def test_bad_input_writes_nothing(store: SqliteStore) -> None:
    with pytest.raises(ValidationError):
        await store.txn([Compare.absent("/ok")], [Put("/ok", b"1"), Put("/ok2", 7)])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await store.txn([Compare.mod("no-slash", 1)], [Put("/ok", b"1")])
    with pytest.raises(ValidationError):
        await store.range("/", limit=-1)
    with pytest.raises(ValidationError):
        await store.compact(-1)
    with pytest.raises(ValidationError):
        store.watch("relative")
    assert await store.head_revision() == 1
    assert (await store.range("/")).kvs == []


async def test_compares_on_missing_keys_and_values(store: SqliteStore) -> None:
    missing = "/missing"
    targets: list[CompareTarget] = ["create", "mod", "version", "lease"]
    for target in targets:
        assert (await store.txn([Compare(missing, target, "==", 0)], [])).succeeded
    # A value compare on a missing key is false, whatever the operator (etcd).
    ops: list[CompareOp] = ["==", "!=", "<", ">"]
    for op in ops:
        assert not (await store.txn([Compare(missing, "value", op, b"x")], [])).succeeded
    await store.put("/k", b"m")
    assert (await store.txn([Compare.value("/k", b"a", ">")], [])).succeeded
    assert (await store.txn([Compare.value("/k", b"z", "<")], [])).succeeded
    assert (await store.txn([Compare.value("/k", b"m", "!=")], [])).succeeded is False
    lease = await store.lease_grant(30)
    await store.put("/k", b"m", lease=lease.id)
    assert (await store.txn([Compare("/k", "lease", "==", lease.id)], [])).succeeded
    assert (await store.txn([Compare.version("/k", 2)], [])).succeeded


async def test_range_is_byte_ordered_with_limit_and_more(store: SqliteStore) -> None:
    for name in ["b", "a", "a0", "a/", "a/b", "\u00e9", "z"]:
        await store.put(f"/r/{name}", name.encode())
    await store.put("/r", b"not under /r/")
    await store.put("/s/x", b"outside")
    res = await store.range("/r/")
    expected = sorted(f"/r/{n}".encode() for n in ["b", "a", "a0", "a/", "a/b", "\u00e9", "z"])
    assert [kv.key.encode() for kv in res.kvs] == expected
    exact = await store.range("/r/a/", limit=2)
    assert [kv.key for kv in exact.kvs] == ["/r/a/", "/r/a/b"] and not exact.more
    cut = await store.range("/r/", limit=3, keys_only=True)
    assert cut.more and len(cut.kvs) == 3 and all(kv.value == b"" for kv in cut.kvs)
    assert cut.revision == await store.head_revision()


# --- watches ------------------------------------------------------------------------------------


async def test_watch_from_now_is_fixed_when_watch_is_called(store: SqliteStore) -> None:
    await store.put("/w/before", b"0")
    it = store.watch("/w/")
    rev = await store.put("/w/after", b"1")  # before the first __anext__
    (event,) = await take(it, 1)
    assert (event.kv.key, event.revision) == ("/w/after", rev)


async def test_delete_events_carry_only_key_and_revision(store: SqliteStore) -> None:
    lease = await store.lease_grant(60)
    start = await store.put("/e/a", b"1", lease=lease.id)
    rev = await store.delete("/e/a")
    assert rev == 1
    events = await take(store.watch("/e/", from_revision=start), 2)
    delete = events[1]
    assert delete.type is EventType.DELETE
    assert delete.kv == KeyValue("/e/a", b"", 0, start + 1, 0, 0)
    assert delete.revision == start + 1


async def test_watch_ends_when_the_store_closes(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "w.db")
    it = s.watch("/x/")

    async def next_event() -> Event:
        return await anext(it)

    waiting = asyncio.create_task(next_event())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await s.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 2)
    with pytest.raises(StoreUnavailable):
        s.watch("/x/")
    with pytest.raises(StoreUnavailable):
        await s.get("/x/1")


async def fill(store: SqliteStore, prefix: str, count: int) -> None:
    """``count`` keys, in transactions within etcd's 128-operation limit."""
    for start in range(0, count, 100):
        end = min(count, start + 100)
        await store.txn([], [Put(f"{prefix}{i:04d}", b"v") for i in range(start, end)])


async def test_large_revision_streams_in_batches_and_in_order(store: SqliteStore) -> None:
    await fill(store, "/big/", 700)
    start = await store.head_revision()
    assert await store.delete("/big/", prefix=True) == 700
    events = await take(store.watch("/big/", from_revision=start + 1), 700)
    assert [e.kv.key for e in events] == [f"/big/{i:04d}" for i in range(700)]
    assert {e.revision for e in events} == {start + 1}


async def test_compaction_overtaking_a_slow_watcher_mid_revision(store: SqliteStore) -> None:
    """A watcher that read part of a big revision must not skip the rest silently."""
    await fill(store, "/m/", 600)
    assert await store.delete("/m/", prefix=True) == 600  # one revision of 600 events
    big = await store.head_revision()
    after = await store.put("/m/zzz", b"later")
    it = store.watch("/m/", from_revision=big)
    first = await take(it, 10)
    assert all(e.revision == big for e in first)
    await store.compact(after)  # the rest of revision ``big`` is gone
    with pytest.raises(Compacted) as info:
        await take(it, 600)
    assert info.value.compact_revision == after
    assert info.value.requested_revision == big


async def test_watcher_that_finished_a_revision_survives_compaction_past_it(
    store: SqliteStore,
) -> None:
    r1 = await store.put("/c/a", b"1")
    r2 = await store.put("/c/b", b"2")
    it = store.watch("/c/", from_revision=r1)
    assert [e.revision for e in await take(it, 2)] == [r1, r2]
    r3 = await store.put("/c/c", b"3")
    await store.compact(r3)
    assert [e.revision for e in await take(it, 1)] == [r3]


async def test_compact_rules(store: SqliteStore) -> None:
    await store.compact(0)  # etcd accepts compacting to 0 once on a fresh store
    with pytest.raises(Compacted):
        await store.compact(0)
    r = await store.put("/k", b"1")
    with pytest.raises(ValidationError):
        await store.compact(r + 1)
    await store.compact(r)
    assert store.compact_revision == r
    with pytest.raises(Compacted) as info:
        await store.compact(r)
    assert (info.value.requested_revision, info.value.compact_revision) == (r, r)
    with pytest.raises(Compacted):
        await take(store.watch("/", from_revision=r - 1), 1)
    (event,) = await take(store.watch("/", from_revision=r), 1)
    assert event.revision == r


async def test_auto_compaction_keeps_the_last_revisions(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "auto.db", auto_compact_keep=20)
    try:
        for i in range(100):
            await s.put(f"/a/{i % 3}", str(i).encode())
        head = await s.head_revision()
        assert head == 101
        # At least the last 20 revisions are kept, and compaction did happen.
        assert 1 < s.compact_revision <= head - 20 + 1
        with pytest.raises(Compacted):
            await take(s.watch("/a/", from_revision=2), 1)
        kept = await take(s.watch("/a/", from_revision=head - 19), 20)
        assert [e.revision for e in kept] == list(range(head - 19, head + 1))
    finally:
        await s.close()
    # The history table really shrank (rows are gone, not just hidden).
    s = await SqliteStore.open(tmp_path / "auto.db", auto_compact_keep=None)
    try:
        rows = await s._call(
            lambda: s._db().execute("SELECT count(*), min(revision) FROM history").fetchone()
        )
        assert rows[0] <= 30 and rows[1] == s.compact_revision
    finally:
        await s.close()


# --- leases -------------------------------------------------------------------------------------


async def test_lease_expiry_follows_the_injected_clock(
    store: SqliteStore, clock: FakeClock
) -> None:
    lease = await store.lease_grant(10)
    assert 0 < lease.id < 2**63 and lease.ttl_s == 10
    await store.put("/l/a", b"1", lease=lease.id)
    rev = await store.put("/l/b", b"2", lease=lease.id)
    await store.put("/l/free", b"3")
    clock.advance(9.9)
    await asyncio.sleep(0.2)  # the checker ran several times: not due yet
    assert await store.get("/l/a") is not None
    assert await store.lease_keepalive(lease.id) == 10  # deadline now at +19.9 from the start
    clock.advance(9.9)
    await asyncio.sleep(0.2)
    assert await store.get("/l/a") is not None
    clock.advance(0.2)
    await wait_until_gone(store, "/l/a")
    assert await store.get("/l/b") is None
    assert await store.get("/l/free") is not None
    events = await take(store.watch("/l/", from_revision=rev + 2), 2)
    assert [(e.type, e.kv.key, e.revision) for e in events] == [
        (EventType.DELETE, "/l/a", rev + 2),
        (EventType.DELETE, "/l/b", rev + 2),
    ]
    with pytest.raises(LeaseNotFound):
        await store.lease_keepalive(lease.id)


async def test_lease_past_deadline_is_gone_before_the_checker_runs(
    tmp_path: Path, clock: FakeClock
) -> None:
    s = await SqliteStore.open(tmp_path / "l.db", clock=clock, lease_check_interval_s=3600)
    try:
        lease = await s.lease_grant(5)
        await s.put("/k", b"1", lease=lease.id)
        clock.advance(5)
        with pytest.raises(LeaseNotFound):
            await s.put("/k2", b"x", lease=lease.id)
        assert await s.get("/k") is None  # revoked on the way, as its own revision
        assert await s.get("/k2") is None
        with pytest.raises(LeaseNotFound):
            await s.lease_keepalive(lease.id)
    finally:
        await s.close()


async def test_revoke_is_one_revision_and_empty_revoke_none(store: SqliteStore) -> None:
    lease = await store.lease_grant(60)
    await store.put("/rv/b", b"1", lease=lease.id)
    await store.put("/rv/a", b"1", lease=lease.id)
    before = await store.head_revision()
    await store.lease_revoke(lease.id)
    assert await store.head_revision() == before + 1
    events = await take(store.watch("/rv/", from_revision=before + 1), 2)
    assert [e.kv.key for e in events] == ["/rv/a", "/rv/b"]  # key order, as etcd
    empty = await store.lease_grant(60)
    await store.lease_revoke(empty.id)
    await store.lease_revoke(empty.id)  # unknown: ignored
    assert await store.head_revision() == before + 1
    with pytest.raises(ValidationError, match="lease id"):
        await store.put("/rv/c", b"1", lease=2**64)  # too big to be any lease id


async def test_unknown_lease_only_matters_in_the_branch_that_runs(store: SqliteStore) -> None:
    res = await store.txn([], [Put("/b/ok", b"1")], [Put("/b/bad", b"1", lease=42)])
    assert res.succeeded
    with pytest.raises(LeaseNotFound):
        await store.txn([], [Put("/b/x", b"1"), Put("/b/bad", b"1", lease=42)])
    assert await store.get("/b/x") is None


# --- persistence and exclusivity ----------------------------------------------------------------


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    clock = FakeClock()
    s = await SqliteStore.open(path, clock=clock, lease_check_interval_s=0.02)
    lease = await s.lease_grant(30)
    r1 = await s.put("/p/a", b"1")
    await s.put("/p/a", b"2")
    res = await s.txn([], [Put("/p/b", b"3", lease=lease.id), Delete("/p/none")])
    await s.delete("/p/a")
    await s.compact(r1 + 1)
    head, compact = await s.head_revision(), s.compact_revision
    before = await take(s.watch("/p/", from_revision=compact), head - compact + 1)
    clock.advance(25)  # 5 s of the lease left when the store closes
    await s.close()

    clock.advance(1000)  # a long downtime: the deadline restarts at reopen (etcd)
    s = await SqliteStore.open(path, clock=clock, lease_check_interval_s=0.02)
    try:
        assert await s.head_revision() == head and s.compact_revision == compact
        kv = await s.get("/p/b")
        assert kv == KeyValue("/p/b", b"3", res.revision, res.revision, 1, lease.id)
        assert await s.get("/p/a") is None
        after = await take(s.watch("/p/", from_revision=compact), len(before))
        assert after == before
        with pytest.raises(Compacted):
            await take(s.watch("/p/", from_revision=compact - 1), 1)
        assert await s.put("/p/c", b"4") == head + 1
        clock.advance(29)
        await asyncio.sleep(0.2)
        assert await s.get("/p/b") is not None  # full TTL again after the reopen
        assert await s.lease_keepalive(lease.id) == 30
        clock.advance(30)
        await wait_until_gone(s, "/p/b")
    finally:
        await s.close()


async def test_second_opener_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    s = await SqliteStore.open(path)
    try:
        await s.put("/k", b"mine")
        script = (
            "import asyncio, sys\n"
            "from blixard.store.sqlite import SqliteStore\n"
            "from blixard.domain.errors import StoreUnavailable\n"
            "async def main():\n"
            "    try:\n"
            "        await SqliteStore.open(sys.argv[1], timeout_s=1.0)\n"
            "    except StoreUnavailable as exc:\n"
            "        print(exc)\n"
            "        return 3\n"
            "    return 0\n"
            "sys.exit(asyncio.run(main()))\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 3
        assert f"is in use by another process (pid {os.getpid()})" in out.decode()
        # In this process too: a second SqliteStore on the same file is refused.
        with pytest.raises(StoreUnavailable, match="in use"):
            await SqliteStore.open(path)
        kv = await s.get("/k")
        assert kv is not None and kv.value == b"mine"
    finally:
        await s.close()
    again = await SqliteStore.open(path)  # released on close
    await again.close()


async def test_calls_after_close_are_unavailable(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "c.db")
    await s.close()
    await s.close()  # twice is harmless
    with pytest.raises(StoreUnavailable):
        await s.put("/k", b"1")
    with pytest.raises(StoreUnavailable):
        await s.lease_grant(5)


async def test_opens_in_wal_mode_with_full_sync(store: SqliteStore) -> None:
    """The durability promise rests on these two settings."""
    mode, sync = await store._call(
        lambda: (
            store._db().execute("PRAGMA journal_mode").fetchone()[0],
            store._db().execute("PRAGMA synchronous").fetchone()[0],
        )
    )
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


async def test_a_file_that_is_not_a_store_is_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an sqlite database, not at all" * 100)
    with pytest.raises(StoreError):
        await SqliteStore.open(path)
    # The lock was released: the path can be opened again (and fails the same way).
    with pytest.raises(StoreError):
        await SqliteStore.open(path)


async def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        await SqliteStore.open(tmp_path / "o.db", timeout_s=0)
    with pytest.raises(ValidationError):
        await SqliteStore.open(tmp_path / "o.db", auto_compact_keep=0)
    s = await SqliteStore.open(tmp_path / "o.db")  # nothing was left locked
    await s.close()
