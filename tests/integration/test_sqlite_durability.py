"""SqliteStore against real process deaths and real lock holders.

* A writer process is SIGKILLed in the middle of its loop, several times over
  the same file: every write it acknowledged must be there after reopening,
  and the store must be consistent (one revision per put, history intact).
* Another process holding SQLite's lock (``BEGIN EXCLUSIVE``) must turn every
  call into StoreUnavailable within the timeout, never a hang; the store
  recovers once the lock is gone.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blixard.domain.errors import StoreUnavailable
from blixard.store.protocol import Compare, Put
from blixard.store.sqlite import SqliteStore

pytestmark = pytest.mark.slow

# Writes "/durable/NNNNNN" = "value-N" forever, continuing after the keys already
# there; odd keys are attached to a long lease. Prints each acknowledged write.
WRITER = """
import asyncio, sys
from blixard.store.sqlite import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1], timeout_s=10)
    lease = int(sys.argv[2]) if len(sys.argv) > 2 else (await store.lease_grant(3600)).id
    print(f"lease {lease}", flush=True)
    i = len((await store.range("/durable/", keys_only=True)).kvs)
    while True:
        key = f"/durable/{i:06d}"
        rev = await store.put(key, f"value-{i}".encode(), lease=lease if i % 2 else 0)
        print(f"ack {key} {rev}", flush=True)
        i += 1

asyncio.run(main())
"""

LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


def run_writer_and_kill(
    path: Path, lease: int | None, acks_before_kill: int
) -> tuple[int, list[tuple[str, int]]]:
    """Start the writer, SIGKILL it after ``acks_before_kill`` acks; return its lease and acks."""
    args = [sys.executable, "-c", WRITER, str(path)] + ([str(lease)] if lease else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked: list[tuple[str, int]] = []
    try:
        first = proc.stdout.readline().split()
        assert first and first[0] == "lease", f"writer failed to start: {first}"
        lease_id = int(first[1])
        while len(acked) < acks_before_kill:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            _, key, rev = line.split()
            acked.append((key, int(rev)))
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop: most likely inside a put
        proc.wait(10)
        # Lines written before the kill still count as acknowledged.
        for line in proc.stdout:
            _, key, rev = line.split()
            acked.append((key, int(rev)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return lease_id, acked


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    rng = random.Random(os.getpid())
    lease: int | None = None
    acked: list[tuple[str, int]] = []
    for kills in range(1, 4):
        lease, more = run_writer_and_kill(path, lease, rng.randint(50, 250))
        acked += more
        asyncio.run(check_consistent(path, acked, lease, kills))


async def check_consistent(
    path: Path, acked: list[tuple[str, int]], lease: int, kills: int
) -> None:
    store = await SqliteStore.open(path)
    try:
        for key, rev in acked:
            kv = await store.get(key)
            assert kv is not None, f"acknowledged {key} is lost"
            i = int(key.rsplit("/", 1)[1])
            assert kv.value == f"value-{i}".encode()
            assert kv.mod_revision == kv.create_revision == rev and kv.version == 1
            assert kv.lease == (lease if i % 2 else 0)
        listed = (await store.range("/durable/")).kvs
        # Each kill may have come after a write was applied but before its ack was
        # printed: at most one such write per kill (the next writer continues after it).
        assert len(acked) <= len(listed) <= len(acked) + kills
        assert [kv.key for kv in listed] == [f"/durable/{i:06d}" for i in range(len(listed))]
        # One revision per put, nothing else: revision 1 is the empty store.
        head = await store.head_revision()
        assert head == 1 + len(listed)
        assert [kv.mod_revision for kv in listed] == list(range(2, head + 1))
        # The history agrees with the keys, event for event.
        events = []
        async for ev in store.watch("/durable/", from_revision=2):
            events.append(ev)
            if len(events) == len(listed):
                break
        assert [(e.kv.key, e.revision) for e in events] == [
            (kv.key, kv.mod_revision) for kv in listed
        ]
        # The lease survived too, with its keys attached.
        assert await store.lease_keepalive(lease) == 3600
    finally:
        await store.close()


async def start_locker(path: Path) -> asyncio.subprocess.Process:
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert locker.stdout is not None
    assert (await asyncio.wait_for(locker.stdout.readline(), 30)).strip() == b"locked"
    return locker


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def test_exclusive_lock_elsewhere_gives_unavailable_within_timeout(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    timeout = 1.0
    store = await SqliteStore.open(path, timeout_s=timeout)
    try:
        await store.put("/k", b"before")
        start = await store.head_revision()
        locker = await start_locker(path)
        try:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "put": lambda: store.put("/k", b"during"),
                "get": lambda: store.get("/k"),
                "range": lambda: store.range("/"),
                "txn": lambda: store.txn([Compare.absent("/n")], [Put("/n", b"x")]),
                "lease_grant": lambda: store.lease_grant(10),
                "watch": lambda: anext(store.watch("/", from_revision=1)),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                elapsed = time.monotonic() - started
                assert elapsed < timeout + 0.75, f"{name} took {elapsed:.2f}s"
        finally:
            await stop(locker)
        # The lock is gone: the store works again, and nothing was half-applied.
        kv = await store.get("/k")
        assert kv is not None and kv.value == b"before"
        assert await store.head_revision() == start
        assert await store.put("/k", b"after") == start + 1
    finally:
        await store.close()


async def test_opening_a_locked_file_fails_in_time_and_leaves_nothing_held(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    locker = await start_locker(path)  # the locker created the file; it has no schema yet
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await SqliteStore.open(path, timeout_s=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        await stop(locker)
    store = await SqliteStore.open(path, timeout_s=1.0)
    try:
        assert await store.put("/k", b"v") == 2
    finally:
        await store.close()
