"""One conformance suite for every StateStore backend: SQLite, etcd with 1 and 3 members.

Everything here runs against real processes and real files: the same
assertions must hold for the embedded store and for etcd, or the rest of
Blixard could not treat them as one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from blixard.domain.errors import (
    Compacted,
    LeaseNotFound,
    StoreUnavailable,
    ValidationError,
)
from blixard.store.election import Election, current_leader
from blixard.store.protocol import (
    MAX_KEY_BYTES,
    MAX_TXN_OPS,
    MAX_VALUE_BYTES,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    Put,
    StateStore,
)
from blixard.store.sqlite import SqliteStore
from tests.conftest import Backend
from tests.support.etcd_cluster import EtcdCluster


async def collect(
    store: StateStore, prefix: str, from_revision: int, count: int, timeout_s: float = 10
) -> list[Event]:
    """The first ``count`` events of a watch, or fail after ``timeout_s``."""
    events: list[Event] = []

    async def run() -> None:
        async for ev in store.watch(prefix, from_revision=from_revision):
            events.append(ev)
            if len(events) >= count:
                return

    await asyncio.wait_for(run(), timeout_s)
    return events


# --- key-value basics and revisions --------------------------------------------------------


async def test_put_get_revisions(backend: Backend) -> None:
    s = backend.store
    k = backend.key("a")
    rev1 = await s.put(k, b"one")
    kv = await s.get(k)
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"one", rev1, rev1, 1)
    rev2 = await s.put(k, b"two")
    assert rev2 == rev1 + 1
    kv2 = await s.get(k)
    assert kv2 is not None
    assert (kv2.value, kv2.create_revision, kv2.mod_revision, kv2.version) == (
        b"two",
        rev1,
        rev2,
        2,
    )
    assert await s.get(backend.key("missing")) is None


async def test_head_revision_follows_writes(backend: Backend) -> None:
    s = backend.store
    rev = await s.put(backend.key("h"), b"1")
    assert await s.head_revision() >= rev
    res = await s.txn([], [Put(backend.key("h"), b"2"), Put(backend.key("i"), b"3")])
    assert res.revision == rev + 1 or backend.kind != "sqlite"  # others may share etcd
    assert await s.head_revision() >= res.revision
    await s.txn([Compare.absent(backend.key("h"))], [Put(backend.key("h"), b"no")])
    if backend.kind == "sqlite":  # a transaction that changes nothing keeps the revision
        assert await s.head_revision() == res.revision


async def test_range_prefix_order_limit(backend: Backend) -> None:
    s = backend.store
    for name in ["c", "a", "b", "a/x"]:
        await s.put(backend.key(name), name.encode())
    await s.put(backend.prefix.rstrip("/") + "-outside", b"no")
    r = await s.range(backend.prefix)
    assert [kv.key for kv in r.kvs] == [backend.key(n) for n in ["a", "a/x", "b", "c"]]
    assert r.revision >= max(kv.mod_revision for kv in r.kvs)
    assert not r.more
    limited = await s.range(backend.prefix, limit=2)
    assert [kv.key for kv in limited.kvs] == [backend.key("a"), backend.key("a/x")]
    assert limited.more
    keys_only = await s.range(backend.prefix, keys_only=True)
    assert all(kv.value == b"" for kv in keys_only.kvs) and len(keys_only.kvs) == 4


async def test_delete_and_recreate(backend: Backend) -> None:
    s = backend.store
    k = backend.key("d")
    first = await s.put(k, b"1")
    await s.put(k, b"2")
    assert await s.delete(k) == 1
    assert await s.get(k) is None
    assert await s.delete(k) == 0
    again = await s.put(k, b"3")
    kv = await s.get(k)
    assert kv is not None and kv.create_revision == again and again > first and kv.version == 1
    await s.put(backend.key("d/1"), b"x")
    await s.put(backend.key("d/2"), b"x")
    assert await s.delete(backend.key("d/"), prefix=True) == 2
    assert await s.get(k) is not None  # the prefix "…/d/" does not cover "…/d"


# --- transactions ---------------------------------------------------------------------------


async def test_txn_is_one_revision(backend: Backend) -> None:
    s = backend.store
    res = await s.txn([], [Put(backend.key("t1"), b"1"), Put(backend.key("t2"), b"2")])
    assert res.succeeded
    kv1, kv2 = await s.get(backend.key("t1")), await s.get(backend.key("t2"))
    assert kv1 is not None and kv2 is not None
    assert kv1.mod_revision == kv2.mod_revision == res.revision
    assert res.responses == [res.revision, res.revision]


async def test_cas_conflict(backend: Backend) -> None:
    """Two writers read the same revision; only the first compare-and-swap wins."""
    a, b = backend.store, await backend.client()
    k = backend.key("cas")
    await a.put(k, b"v0")
    seen = await a.get(k)
    assert seen is not None
    won = await a.txn([Compare.mod(k, seen.mod_revision)], [Put(k, b"from-a")], [Get(k)])
    lost = await b.txn([Compare.mod(k, seen.mod_revision)], [Put(k, b"from-b")], [Get(k)])
    assert won.succeeded and not lost.succeeded
    current = lost.responses[0]
    assert isinstance(current, list) and current[0].value == b"from-a"
    final = await a.get(k)
    assert final is not None and final.value == b"from-a"


async def test_txn_compares(backend: Backend) -> None:
    s = backend.store
    k = backend.key("cmp")
    created = await s.txn([Compare.absent(k)], [Put(k, b"x")])
    assert created.succeeded
    again = await s.txn([Compare.absent(k)], [Put(k, b"y")])
    assert not again.succeeded
    assert (await s.txn([Compare.value(k, b"x")], [Get(k)])).succeeded
    assert not (await s.txn([Compare.value(k, b"nope")], [Get(k)])).succeeded
    assert (await s.txn([Compare.version(k, 1)], [])).succeeded
    assert (await s.txn([Compare.mod(k, created.revision, ">")], [])).succeeded is False
    assert (await s.txn([Compare.mod(k, created.revision + 1, "<")], [])).succeeded
    missing = backend.key("never")
    assert (await s.txn([Compare.version(missing, 0)], [])).succeeded
    assert not (await s.txn([Compare.value(missing, b"")], [])).succeeded
    kv = await s.get(k)
    assert kv is not None and kv.value == b"x"


async def test_no_lost_update_under_concurrent_writers(backend: Backend) -> None:
    """Many writers increment one counter with CAS retries: every increment lands once."""
    k = backend.key("counter")
    await backend.store.put(k, b"0")
    writers, increments = 8, 15
    clients = [await backend.client(endpoint_index=i % 3) for i in range(writers)]
    conflicts = 0

    async def writer(store: StateStore) -> None:
        nonlocal conflicts
        for _ in range(increments):
            while True:
                kv = await store.get(k)
                assert kv is not None
                res = await store.txn(
                    [Compare.mod(k, kv.mod_revision)], [Put(k, str(int(kv.value) + 1).encode())]
                )
                if res.succeeded:
                    break
                conflicts += 1

    await asyncio.gather(*(writer(c) for c in clients))
    final = await backend.store.get(k)
    assert final is not None and int(final.value) == writers * increments
    assert final.version == writers * increments + 1


# --- watches --------------------------------------------------------------------------------


async def test_watch_replays_then_follows(backend: Backend) -> None:
    s = backend.store
    start = await s.put(backend.key("w/a"), b"1")
    await s.put(backend.key("w/b"), b"2")
    await s.put(backend.key("other"), b"not watched")
    await s.delete(backend.key("w/a"))
    watcher = asyncio.create_task(collect(s, backend.key("w/"), start, 4))
    await asyncio.sleep(0.2)
    await s.put(backend.key("w/c"), b"3")
    events = await watcher
    assert [(e.type, e.kv.key) for e in events] == [
        (EventType.PUT, backend.key("w/a")),
        (EventType.PUT, backend.key("w/b")),
        (EventType.DELETE, backend.key("w/a")),
        (EventType.PUT, backend.key("w/c")),
    ]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert events[2].kv.value == b""


async def test_watch_from_now_and_order(backend: Backend) -> None:
    s = backend.store
    await s.put(backend.key("old"), b"before the watch")
    watcher = asyncio.create_task(collect(s, backend.prefix, 0, 20))
    await asyncio.sleep(0.3)  # let the watch start at "now"
    revs = [await s.put(backend.key(f"k{i % 4}"), str(i).encode()) for i in range(20)]
    events = await watcher
    assert [e.revision for e in events] == revs
    assert [e.kv.value for e in events] == [str(i).encode() for i in range(20)]
    assert all(e.kv.key != backend.key("old") for e in events)


async def test_watch_txn_events_share_revision(backend: Backend) -> None:
    s = backend.store
    start = await s.put(backend.key("x"), b"0")
    res = await s.txn([], [Put(backend.key("y"), b"1"), Delete(backend.key("x"))])
    events = await collect(s, backend.prefix, start, 3)
    assert [e.revision for e in events] == [start, res.revision, res.revision]
    assert {(e.type, e.kv.key) for e in events[1:]} == {
        (EventType.PUT, backend.key("y")),
        (EventType.DELETE, backend.key("x")),
    }


async def test_compaction_reported_to_watchers(backend: Backend) -> None:
    s = backend.store
    first = await s.put(backend.key("c"), b"1")
    await s.put(backend.key("c"), b"2")
    third = await s.put(backend.key("c"), b"3")
    await s.compact(third)
    with pytest.raises(Compacted) as info:
        await collect(s, backend.prefix, first, 1)
    assert info.value.compact_revision == third
    events = await collect(s, backend.prefix, third, 1)  # the compact revision itself is kept
    assert events[0].kv.value == b"3"
    with pytest.raises(Compacted):
        await s.compact(third)  # already compacted
    with pytest.raises(ValidationError):
        await s.compact(third + 10_000)  # a future revision
    kv = await s.get(backend.key("c"))
    assert kv is not None and kv.value == b"3"


# --- leases ---------------------------------------------------------------------------------


async def test_lease_expiry_deletes_attached_keys(backend: Backend) -> None:
    s = backend.store
    lease = await s.lease_grant(1)
    assert lease.ttl_s >= 1
    k = backend.key("leased")
    rev = await s.put(k, b"alive", lease=lease.id)
    kv = await s.get(k)
    assert kv is not None and kv.lease == lease.id
    events = await collect(s, backend.prefix, rev + 1, 1, timeout_s=lease.ttl_s + 8)
    assert events[0].type is EventType.DELETE and events[0].kv.key == k
    assert await s.get(k) is None
    with pytest.raises(LeaseNotFound):
        await s.lease_keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await s.put(k, b"again", lease=lease.id)


async def test_lease_keepalive_and_revoke(backend: Backend) -> None:
    s = backend.store
    lease = await s.lease_grant(2)
    k = backend.key("kept")
    await s.put(k, b"x", lease=lease.id)
    deadline = time.monotonic() + lease.ttl_s * 2 + 1
    while time.monotonic() < deadline:
        assert await s.lease_keepalive(lease.id) >= 1
        await asyncio.sleep(0.4)
    assert await s.get(k) is not None  # kept alive past twice its TTL
    await s.lease_revoke(lease.id)
    assert await s.get(k) is None
    await s.lease_revoke(lease.id)  # revoking an unknown lease is not an error


async def test_put_without_lease_detaches(backend: Backend) -> None:
    s = backend.store
    lease = await s.lease_grant(5)
    k = backend.key("detach")
    await s.put(k, b"1", lease=lease.id)
    await s.put(k, b"2")
    await s.lease_revoke(lease.id)
    kv = await s.get(k)
    assert kv is not None and kv.value == b"2" and kv.lease == 0


# --- election -------------------------------------------------------------------------------


async def test_election_handover_on_resign_and_on_lease_end(backend: Backend) -> None:
    name = "e" + backend.prefix.strip("/").replace("/", "-")
    a = Election(backend.store, name, "node-a", ttl_s=2)
    b = Election(await backend.client(endpoint_index=1), name, "node-b", ttl_s=2)
    c = Election(await backend.client(endpoint_index=2), name, "node-c", ttl_s=2)
    await a.campaign()
    assert a.is_leader()
    b_task = asyncio.create_task(b.campaign())
    await asyncio.sleep(0.5)
    assert not b_task.done()  # only one leader at a time
    leader = await current_leader(backend.store, name)
    assert leader is not None and leader.value == b"node-a"

    await a.resign()
    await asyncio.wait_for(b_task, 5)
    assert b.is_leader() and not a.is_leader()

    # Now b "crashes": its keepalives stop, nobody revokes its lease.
    c_task = asyncio.create_task(c.campaign())
    await asyncio.sleep(0.3)
    assert not c_task.done()
    await b._stop_keepalive()
    started = time.monotonic()
    await asyncio.wait_for(c_task, 10)
    took = time.monotonic() - started
    assert c.is_leader()
    leader = await current_leader(backend.store, name)
    assert leader is not None and leader.value == b"node-c"
    assert took < 2 + 4  # within the TTL plus the backend's expiry granularity
    await c.resign()


# --- bad input ------------------------------------------------------------------------------

BAD_KEYS = ["", "no-leading-slash", "/with space", "/tab\tkey", "/nl\n", "/" + "x" * MAX_KEY_BYTES]


@pytest.mark.parametrize("bad", BAD_KEYS)
async def test_bad_keys_refused(backend: Backend, bad: str) -> None:
    s = backend.store
    with pytest.raises(ValidationError) as info:
        await s.put(bad, b"x")
    assert info.value.field == "key"
    with pytest.raises(ValidationError):
        await s.txn([], [Put(backend.key("ok"), b"1"), Put(bad, b"2")])
    assert (await s.range(backend.prefix)).kvs == []  # nothing half-written


async def test_bad_values_and_arguments_refused(backend: Backend) -> None:
    s = backend.store
    k = backend.key("v")
    with pytest.raises(ValidationError) as info:
        await s.put(k, "a str, not bytes")  # type: ignore[arg-type]
    assert info.value.field == "value"
    with pytest.raises(ValidationError) as info:
        await s.put(k, b"x" * (MAX_VALUE_BYTES + 1))
    assert info.value.field == "value" and "limit" in info.value.reason
    with pytest.raises(ValidationError):
        await s.lease_grant(0)
    with pytest.raises(ValidationError):
        await s.txn([], [Put(k, b"1"), Put(k, b"2")])  # one key twice in one branch
    with pytest.raises(ValidationError):
        await s.txn([Compare("/ok", "mod", "~", 1)], [])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        async for _ in s.watch(k, from_revision=-1):
            pass
    with pytest.raises(ValidationError) as info:
        await s.txn([], [Put(backend.key(f"many/{i}"), b"x") for i in range(MAX_TXN_OPS + 1)])
    assert "limit" in info.value.reason
    with pytest.raises(ValidationError):
        await s.put(k, b"x", lease=2**63)
    with pytest.raises(ValidationError):
        await s.lease_keepalive(-1)
    with pytest.raises(LeaseNotFound):
        await s.put(k, b"x", lease=123456789)
    with pytest.raises(LeaseNotFound):
        await s.lease_keepalive(123456789)
    assert await s.get(k) is None


# --- unavailability -------------------------------------------------------------------------


async def test_unreachable_store_answers_unavailable_in_time(backend: Backend) -> None:
    """A store that cannot answer gives StoreUnavailable within its timeout, never a hang."""
    if backend.kind == "sqlite":
        assert backend.sqlite_path is not None
        blocker = await asyncio.create_subprocess_exec(
            "python3",
            "-c",
            "import sqlite3,sys,time\n"
            f"c=sqlite3.connect({str(backend.sqlite_path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)",
            stdout=asyncio.subprocess.PIPE,
        )
        assert blocker.stdout is not None
        assert (await blocker.stdout.readline()).strip() == b"locked"
        store = backend.store
    else:
        blocker = None
        # A listener that accepts connections and never answers: the worst case.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert backend.cluster is not None
        store = backend.cluster.client(timeout_s=1.0, endpoints=[f"http://127.0.0.1:{port}"])
    try:
        timeout = 2.0 if backend.kind == "sqlite" else 1.0
        for call in (
            lambda: store.put(backend.key("u"), b"x"),
            lambda: store.get(backend.key("u")),
            lambda: store.txn([Compare.absent(backend.key("u"))], [Put(backend.key("u"), b"x")]),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < timeout + 1.5
    finally:
        if blocker is not None:
            blocker.kill()
            await blocker.wait()
        else:
            await store.close()
            server.close()


async def test_dead_etcd1_answers_unavailable_in_time(fresh_etcd1: EtcdCluster) -> None:
    await _dead_cluster_answers_unavailable(fresh_etcd1)


async def test_dead_etcd3_answers_unavailable_in_time(fresh_etcd3: EtcdCluster) -> None:
    await _dead_cluster_answers_unavailable(fresh_etcd3)


async def _dead_cluster_answers_unavailable(cluster: EtcdCluster) -> None:
    store = cluster.client(timeout_s=1.0)
    await store.put("/dead/k", b"x")
    for m in cluster.members:
        m.kill()
    try:
        for call in (lambda: store.put("/dead/k", b"y"), lambda: store.get("/dead/k")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 2.5
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async for _ in store.watch("/dead/", from_revision=1):
                pass
        assert time.monotonic() - started < 3.5
    finally:
        await store.close()


# --- watch resume across a member kill ------------------------------------------------------


@pytest.mark.parametrize("victim", ["leader", "follower"])
async def test_watch_resumes_across_member_kill_without_loss_or_repeat(
    fresh_etcd3: EtcdCluster, victim: str
) -> None:
    cluster = fresh_etcd3
    probe = cluster.client()
    leader_id = await probe.leader_id()
    by_name = {m.name: m.id for m in await probe.member_list()}
    await probe.close()
    is_leader = [by_name[m.name] == leader_id for m in cluster.members]
    target = is_leader.index(victim == "leader")
    others = [e for i, e in enumerate(cluster.endpoints) if i != target]
    # The watch connects to the victim first; the writer never talks to it.
    watcher_store = cluster.client(timeout_s=2.0, endpoints=[cluster.endpoints[target], *others])
    writer = cluster.client(timeout_s=3.0, endpoints=others)
    total = 300
    start = await writer.put("/resume/start", b"")
    got: list[Event] = []

    async def watch() -> None:
        async for ev in watcher_store.watch("/resume/", from_revision=start + 1):
            got.append(ev)
            if len(got) >= total:
                return

    async def write_once(key: str, value: bytes) -> int:
        """Put, resolving an ambiguous failure as a careful caller must: by reading back.

        Killing the Raft leader leaves a write in flight with an unknown outcome,
        which the client reports instead of retrying blindly.
        """
        while True:
            try:
                return await writer.put(key, value)
            except StoreUnavailable:
                kv = await writer.get(key)
                if kv is not None:
                    return kv.mod_revision

    task = asyncio.create_task(watch())
    revs = []
    for i in range(total):
        revs.append(await write_once(f"/resume/{i:04d}", str(i).encode()))
        if i == total // 3:
            cluster.members[target].kill()  # the member the watch is connected to
    await asyncio.wait_for(task, 20)
    assert [e.revision for e in got] == revs  # nothing lost, nothing repeated, in order
    assert [e.kv.value for e in got] == [str(i).encode() for i in range(total)]
    await watcher_store.close()
    await writer.close()


async def test_watch_resumes_after_single_member_restart(fresh_etcd1: EtcdCluster) -> None:
    cluster = fresh_etcd1
    store = cluster.client(timeout_s=10.0)
    start = await store.put("/r1/a", b"0")
    got: list[Event] = []

    async def watch() -> None:
        async for ev in store.watch("/r1/", from_revision=start):
            got.append(ev)
            if len(got) >= 4:
                return

    task = asyncio.create_task(watch())
    await store.put("/r1/b", b"1")
    member = cluster.members[0]
    member.kill()
    await asyncio.sleep(0.5)
    await member.restart()
    writer = cluster.client(timeout_s=5.0)
    r3 = await writer.put("/r1/c", b"2")
    r4 = await writer.put("/r1/d", b"3")
    await asyncio.wait_for(task, 15)
    assert [e.kv.value for e in got] == [b"0", b"1", b"2", b"3"]
    assert [e.revision for e in got][2:] == [r3, r4]
    await store.close()
    await writer.close()


async def test_sqlite_watch_resumes_across_reopen(tmp_path: Path) -> None:
    """SQLite has no reconnect, but a restarted daemon resumes its watches from a revision."""
    path = tmp_path / "s.db"
    s = await SqliteStore.open(path)
    revs = [await s.put(f"/r/{i}", b"x") for i in range(5)]
    seen = await collect(s, "/r/", revs[0], 3)
    await s.close()
    s = await SqliteStore.open(path)
    revs.append(await s.put("/r/5", b"x"))
    rest = await collect(s, "/r/", seen[-1].revision + 1, 3)
    assert [e.revision for e in seen + rest] == revs
    await s.close()
