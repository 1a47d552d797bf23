"""The store's own HTTP/1.1 client (``blixard.store.http1``) against real servers on
127.0.0.1: a real etcd member, and small asyncio servers written here for the edge
cases etcd does not produce on demand (idle closes, stalls, chunk layouts, counting
connections)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blixard.domain.errors import StoreUnavailable
from blixard.store.etcd import EtcdStore, TlsConfig
from blixard.store.etcd_member import EtcdMember, MemberTls
from blixard.store.http1 import ConnectionPool, NotSent, OutcomeUnknown
from blixard.store.protocol import prefix_end
from tests.support.etcd_cluster import EtcdCluster, free_port
from tests.support.tls import make_pki

# --- a tiny HTTP/1.1 server to script the other side ------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Conn:
    """One accepted connection, as a handler sees it."""

    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    served: int = 0  # requests answered on it before this one


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection, or None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


def answer(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


#: A handler answers one request; it returns False to close the connection after it.
Handler = Callable[[Conn, Request], Awaitable[bool]]


@dataclass
class Server:
    """Serves requests with ``handler``, recording connections and requests."""

    handler: Handler
    accepted: int = 0
    open_now: int = 0
    max_open: int = 0
    requests: list[tuple[int, Request]] = field(default_factory=list)
    closed_by_client: list[int] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self.accepted, reader, writer)
        self.accepted += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        self._writers.append(writer)
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    self.closed_by_client.append(conn.id)
                    break
                self.requests.append((conn.id, req))
                keep = await self.handler(conn, req)
                conn.served += 1
                if not keep:
                    break
        except ConnectionError:
            self.closed_by_client.append(conn.id)
        finally:
            self.open_now -= 1
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[Server, str]]:
    server = Server(handler)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.close()


async def echo(conn: Conn, req: Request) -> bool:
    """Answers each request with its own body and path, on a kept-alive connection."""
    conn.writer.write(answer(json.dumps({"path": req.path, "body": req.body.decode()}).encode()))
    await conn.writer.drain()
    return True


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.005)


# --- against a real etcd ----------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def test_etcd_requests_reuse_one_connection(etcd1: EtcdCluster) -> None:
    pool = ConnectionPool(etcd1.endpoints[0])
    try:
        for i in range(20):
            resp = await pool.request(
                "POST", "/v3/kv/put", json_body={"key": b64(b"/h1/k"), "value": b64(b"%d" % i)}
            )
            assert resp.status == 200
        got = await pool.request("POST", "/v3/kv/range", json_body={"key": b64(b"/h1/k")})
        assert base64.b64decode(got.json()["kvs"][0]["value"]) == b"19"
        assert pool.connects == 1  # keep-alive: 21 sequential requests, one connection
        # etcd's error answers are responses, not transport errors.
        bad = await pool.request("POST", "/v3/kv/put", json_body={"key": ""})
        assert bad.status == 400 and "key" in bad.json()["message"]
    finally:
        await pool.close()


async def test_etcd_chunked_response(etcd1: EtcdCluster) -> None:
    """Go's server chunks any answer longer than 2 KiB: a range over 30 keys."""
    pool = ConnectionPool(etcd1.endpoints[0])
    prefix = b"/h1/chunked/"
    values = {prefix + b"%02d" % i: bytes([65 + i]) * 300 for i in range(30)}
    try:
        for k, v in values.items():
            await pool.request("POST", "/v3/kv/put", json_body={"key": b64(k), "value": b64(v)})
        resp = await pool.request(
            "POST",
            "/v3/kv/range",
            json_body={"key": b64(prefix), "range_end": b64(prefix_end(prefix))},
        )
        assert resp.headers.get("transfer-encoding") == "chunked"
        kvs = resp.json()["kvs"]
        got = {base64.b64decode(kv["key"]): base64.b64decode(kv["value"]) for kv in kvs}
        assert got == values
        again = await pool.request("POST", "/v3/kv/range", json_body={"key": b64(prefix + b"00")})
        assert again.status == 200
        assert pool.connects == 1  # the chunked body was read to its end, then reused
    finally:
        await pool.close()


async def test_etcd_watch_stream(etcd1: EtcdCluster) -> None:
    pool = ConnectionPool(etcd1.endpoints[0], max_connections=1)
    key = b"/h1/watched/"
    body = {"create_request": {"key": b64(key), "range_end": b64(prefix_end(key))}}
    try:
        async with asyncio.timeout(10), pool.stream("POST", "/v3/watch", json_body=body) as resp:
            assert resp.status == 200
            lines = resp.aiter_lines()
            created = json.loads(await anext(lines))
            assert created["result"]["created"] is True
            # The stream is outside the bound: a unary call still gets the one slot.
            for v in (b"1", b"2"):
                await pool.request(
                    "POST", "/v3/kv/put", json_body={"key": b64(key + b"a"), "value": b64(v)}
                )
            seen: list[bytes] = []
            while len(seen) < 2:
                line = await anext(lines)
                if line.strip():
                    events = json.loads(line)["result"].get("events", [])
                    seen += [base64.b64decode(ev["kv"]["value"]) for ev in events]
            assert seen == [b"1", b"2"]
        assert pool.open_connections == 1  # the unary connection; the stream's is gone
    finally:
        await pool.close()


async def test_bound_holds_against_etcd(etcd1: EtcdCluster) -> None:
    pool = ConnectionPool(etcd1.endpoints[0], max_connections=4)

    async def put(i: int) -> int:
        resp = await pool.request(
            "POST", "/v3/kv/put", json_body={"key": b64(b"/h1/many/%d" % i), "value": b64(b"x")}
        )
        return int(resp.json()["header"]["revision"])

    try:
        revisions = await asyncio.gather(*(put(i) for i in range(200)))
        assert len(set(revisions)) == 200  # every put applied once, each its own answer
        assert pool.connects == 4
        assert pool.open_connections == 4 and pool.idle_connections == 4
    finally:
        await pool.close()


async def test_tls_refused_handshake_is_not_sent(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server_cert, server_key = pki.issue("member")
    client_cert, client_key = pki.issue("client")
    member = EtcdMember(
        name="h1tls",
        data_dir=tmp_path / "etcd",
        client_url=f"https://127.0.0.1:{free_port()}",
        peer_url=f"https://127.0.0.1:{free_port()}",
        tls=MemberTls(pki.ca_cert, server_cert, server_key),
    )
    await member.start_new_cluster()
    try:
        anonymous = ConnectionPool(member.client_url, ssl_context=TlsConfig(pki.ca_cert).context())
        with pytest.raises(NotSent, match="TLS"):
            await anonymous.request("POST", "/v3/kv/put", json_body={"key": b64(b"/t")})
        await anonymous.close()
        good = ConnectionPool(
            member.client_url, ssl_context=TlsConfig(pki.ca_cert, client_cert, client_key).context()
        )
        resp = await good.request(
            "POST", "/v3/kv/put", json_body={"key": b64(b"/t"), "value": b64(b"v")}
        )
        assert resp.status == 200
        await good.close()
    finally:
        member.stop()


# --- edge cases on scripted servers -----------------------------------------------------


async def test_connect_refused_is_not_sent() -> None:
    pool = ConnectionPool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(NotSent, match="connect failed"):
        await pool.request("POST", "/x", body=b"1")
    assert pool.open_connections == 0


async def test_idle_connection_closed_by_server_is_not_reused() -> None:
    """The server closes a kept-alive connection while it is idle: the next request,
    even a non-idempotent one, goes out once, on a new connection."""

    async def answer_then_close_when_idle(conn: Conn, req: Request) -> bool:
        await echo(conn, req)
        await asyncio.sleep(0.05)
        return False  # closes the connection 50 ms after answering

    async with serving(answer_then_close_when_idle) as (server, url):
        pool = ConnectionPool(url)
        first = await pool.request("POST", "/one", body=b"1")
        await until(lambda: server.open_now == 0)
        await asyncio.sleep(0.05)
        second = await pool.request("POST", "/two", body=b"2", idempotent=False)
        assert first.json()["path"] == "/one" and second.json()["path"] == "/two"
        assert [(c, r.path) for c, r in server.requests] == [(0, "/one"), (1, "/two")]
        await pool.close()


async def close_on_second_request(conn: Conn, req: Request) -> bool:
    """Answers the first request of a connection; closes it unanswered on the next:
    the race of a server closing an idle connection as a request goes out."""
    if conn.served:
        return False
    return await echo(conn, req)


async def test_reused_connection_failing_before_any_answer() -> None:
    async with serving(close_on_second_request) as (server, url):
        pool = ConnectionPool(url)
        await pool.request("POST", "/warm", body=b"")
        # Idempotent: sent again, once, on a fresh connection.
        again = await pool.request("POST", "/read", body=b"r", idempotent=True)
        assert again.json()["path"] == "/read"
        assert [(c, r.path) for c, r in server.requests] == [
            (0, "/warm"),
            (0, "/read"),
            (1, "/read"),
        ]
        # Not idempotent: the outcome is unknown, and it is not sent again.
        with pytest.raises(OutcomeUnknown, match="reused connection"):
            await pool.request("POST", "/write", body=b"w", idempotent=False)
        assert [r.path for _, r in server.requests].count("/write") == 1
        assert server.accepted == 2
        await pool.close()


async def test_no_retry_once_the_answer_started() -> None:
    async def half_answer_on_second(conn: Conn, req: Request) -> bool:
        if conn.served:
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await conn.writer.drain()
            return False
        return await echo(conn, req)

    async with serving(half_answer_on_second) as (server, url):
        pool = ConnectionPool(url)
        await pool.request("POST", "/warm", body=b"")
        with pytest.raises(OutcomeUnknown):
            await pool.request("POST", "/read", body=b"", idempotent=True)
        assert [r.path for _, r in server.requests] == ["/warm", "/read"]
        await pool.close()


async def test_fresh_connection_closed_after_the_request_is_ambiguous() -> None:
    async def read_then_close(conn: Conn, req: Request) -> bool:
        return False

    async with serving(read_then_close) as (server, url):
        pool = ConnectionPool(url)
        for idempotent in (False, True):
            with pytest.raises(OutcomeUnknown):
                await pool.request("POST", "/x", body=b"", idempotent=idempotent)
        assert len(server.requests) == 2  # each sent once: a fresh connection is not retried
        assert pool.open_connections == 0
        await pool.close()


async def test_chunked_body_and_lines() -> None:
    lines = [b'{"n":1}', b'{"n":2,"long":"' + b"x" * 5000 + b'"}', b"", b'{"n":3}']
    wire = b"\n".join(lines) + b"\n"
    # Cut so that one chunk ends mid-line, another holds two line ends, with a chunk
    # extension and a trailer, as RFC 9112 allows.
    cuts = [0, 3, 5020, 5025, len(wire)]
    chunks = [wire[a:b] for a, b in itertools.pairwise(cuts)]

    async def chunked(conn: Conn, req: Request) -> bool:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, c in enumerate(chunks):
            conn.writer.write(b"%x;ext=%d\r\n%s\r\n" % (len(c), i, c))
            await conn.writer.drain()
            await asyncio.sleep(0.01)
        conn.writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        await conn.writer.drain()
        return True

    async with serving(chunked) as (_, url):
        pool = ConnectionPool(url)
        whole = await pool.request("GET", "/whole")
        assert whole.body == wire
        async with pool.stream("GET", "/lines") as resp:
            got = [line async for line in resp.aiter_lines()]
        assert got == [line.decode() for line in lines]
        again = await pool.request("GET", "/again")
        assert again.body == wire
        assert pool.connects == 2  # the unary requests shared one; the stream had its own
        await pool.close()


async def test_server_that_never_answers_is_bounded_by_the_timeout() -> None:
    async def never(conn: Conn, req: Request) -> bool:
        await conn.reader.read()  # until the client gives up and closes
        return False

    async with serving(never) as (server, url):
        pool = ConnectionPool(url)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pool.request("POST", "/x", body=b"")
        assert time.monotonic() - start < 1.0
        assert pool.open_connections == 0
        await until(lambda: server.open_now == 0)  # the handler saw EOF: closed
        await pool.close()

        # Through EtcdStore: a write is bounded by timeout_s and not sent twice.
        store = EtcdStore([url], timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"0\.5s"):
            await store.put("/k", b"v")
        assert time.monotonic() - start < 1.5
        assert len(server.requests) == 2  # one from the pool above, one put
        await store.close()


async def test_bound_is_honoured_and_answers_are_not_mixed() -> None:
    async def slow_echo(conn: Conn, req: Request) -> bool:
        await asyncio.sleep(0.005)
        return await echo(conn, req)

    async with serving(slow_echo) as (server, url):
        pool = ConnectionPool(url, max_connections=8)

        async def call(i: int) -> str:
            resp = await pool.request("POST", f"/r{i}", body=str(i).encode())
            return str(resp.json()["body"])

        results = await asyncio.gather(*(call(i) for i in range(100)))
        assert results == [str(i) for i in range(100)]
        assert server.max_open == 8  # the bound was reached, never passed
        assert server.accepted == 8 and pool.connects == 8
        await pool.close()


async def test_waiters_are_served_in_arrival_order() -> None:
    gate = asyncio.Event()

    async def gated_echo(conn: Conn, req: Request) -> bool:
        if req.path == "/hold":
            await gate.wait()
        return await echo(conn, req)

    async with serving(gated_echo) as (server, url):
        pool = ConnectionPool(url, max_connections=1)
        holder = asyncio.create_task(pool.request("POST", "/hold"))
        await until(lambda: len(server.requests) == 1)
        queued = []
        for i in range(5):
            queued.append(asyncio.create_task(pool.request("POST", f"/q{i}")))
            await asyncio.sleep(0.005)
        gate.set()
        await asyncio.gather(holder, *queued)
        assert [r.path for _, r in server.requests] == ["/hold"] + [f"/q{i}" for i in range(5)]
        await pool.close()


async def test_cancelled_mid_response_closes_that_connection() -> None:
    async def stall_first(conn: Conn, req: Request) -> bool:
        if req.path == "/stall":
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await conn.writer.drain()
            await conn.reader.read()  # the rest never comes; wait for the client to leave
            return False
        return await echo(conn, req)

    async with serving(stall_first) as (server, url):
        pool = ConnectionPool(url, max_connections=1)
        stalled = asyncio.create_task(pool.request("POST", "/stall"))
        await until(lambda: len(server.requests) == 1)
        await asyncio.sleep(0.05)  # the partial answer has arrived
        # A waiter for the only slot, cancelled while it waits: must not leak the slot.
        waiter = asyncio.create_task(pool.request("POST", "/never-sent"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        stalled.cancel()
        for task in (stalled, waiter):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert pool.open_connections == 0
        # The handler ends only once it read EOF: the client closed that connection.
        await until(lambda: server.open_now == 0)
        resp = await pool.request("POST", "/after", body=b"ok")
        assert resp.json() == {"path": "/after", "body": "ok"}
        assert [(c, r.path) for c, r in server.requests] == [(0, "/stall"), (1, "/after")]
        await pool.close()


async def test_connection_close_and_close_of_the_pool() -> None:
    async def close_each(conn: Conn, req: Request) -> bool:
        conn.writer.write(answer(b"{}", extra="Connection: close\r\n"))
        await conn.writer.drain()
        return True  # the client must not reuse it anyway

    async with serving(close_each) as (_, url):
        pool = ConnectionPool(url)
        for _ in range(3):
            assert (await pool.request("GET", "/")).status == 200
        assert pool.connects == 3 and pool.open_connections == 0
        await pool.close()
        with pytest.raises(NotSent, match="closed"):
            await pool.request("GET", "/")
