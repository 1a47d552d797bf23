"""A small HTTP/1.1 client on asyncio streams, made for etcd's JSON gateway.

Why not httpx: with 64 concurrent callers httpx did about 45-100 puts/s against
etcd where a minimal client on asyncio streams did 1,000-2,500, and single puts
waited up to 6-9 s (docs/benchmarks.md): httpcore's pool scans every connection
for every queued request, each time a request starts or ends. EtcdStore needs a
client that scales with concurrency and tells it *whether a failed request can
have reached the server*; this module is that client and nothing more (no
redirects, cookies, proxies, compression or HTTP/2).

One :class:`ConnectionPool` per endpoint (``http://host:port`` or ``https://``
with an :class:`ssl.SSLContext`, which carries client certificates):

* **Bounded.** At most ``max_connections`` connections; a caller beyond that
  waits in a FIFO queue and is handed the next connection released (or the
  slot of one closed). Acquiring and releasing are O(1): nothing is scanned.
  Idle connections are reused last-in first-out, so a burst's extra
  connections go idle, expire after ``idle_timeout_s`` and are closed.
* **Keep-alive, and only after a complete answer.** A connection goes back to
  the pool only once its response was read to its end (Content-Length or
  chunked framing, and no ``Connection: close``). On any error, timeout or
  cancellation it is closed, never reused, so a half-read answer can never be
  taken for the next request's.
* **TCP_NODELAY** on every socket: a request is one small write and must not
  wait for the ACK of the previous segment (Nagle plus delayed ACK cost 40 ms
  per request on the node's API before it set this).
* **Streams** (:meth:`ConnectionPool.stream`, for ``/v3/watch``) run on a
  connection of their own, outside the bound (a watch holds its connection for
  its whole life and must not starve unary calls), closed when the stream ends.
* **No timeouts but the connect timeout.** Callers bound a request with
  ``async with asyncio.timeout(...)`` (EtcdStore bounds every call, queueing
  for a connection included); the cancellation closes the connection.

What a failure means, which EtcdStore's failover rests on ("a write moves to
another endpoint only if it provably did not reach etcd"):

* :class:`NotSent`: the request provably never reached the server. The TCP
  connect or the TLS handshake failed or timed out, or, on a connection that
  had carried no request yet, the server answered with a TLS alert before any
  HTTP byte (TLS 1.3 reports a refused client certificate on the client's
  first read, after the request was written; the server's TLS layer refused
  the connection, so its HTTP server never saw the request).
* :class:`OutcomeUnknown`: anything after the request's bytes were handed to a
  connection: the server may have acted on it.

A pooled keep-alive connection may have been closed by the server while idle,
and then fails on write or on the first read although the server never saw the
request. That failure is **not** reported as NotSent: the server cannot be told
apart from one that did see the request and then failed. This module takes two
measures instead:

1. Before reusing an idle connection the pool checks it: the stream is not at
   EOF and has no error, and a non-blocking ``recv(MSG_PEEK)`` on its socket
   finds neither EOF nor unexpected bytes (the kernel knows of a FIN before the
   event loop has processed it). A connection failing the check is dropped.
2. The race left (the server closes just as the request goes out) is handled
   as urllib3 and aiohttp do: if a *reused* connection fails before any byte
   of the response arrived, an *idempotent* request (the caller says which) is
   sent once more on a fresh connection; a non-idempotent one raises
   OutcomeUnknown. etcd never closes idle client connections, so with it this
   path should only see a member that restarted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

#: Connections per endpoint unless the caller says otherwise. Measured on the
#: 2-core development machine with EtcdStore puts from 64 and 128 concurrent
#: writers, bounds 16/32/64/128 interleaved (6 rounds of 1,500 puts, load 3-6):
#: on one etcd member 64 connections did about 3,000-3,700 puts/s, 32 about
#: 1,900-2,500 and 16 about 1,600 (etcd batches what is in flight at once); on
#: three members 32, 64 and 128 were alike (about 1,050-1,270/s), 16 slower.
DEFAULT_MAX_CONNECTIONS = 64
#: How long an idle connection is kept. etcd itself never closes idle client
#: connections; the bound sheds a burst's extra connections and keeps us clear of
#: middleboxes that drop idle connections silently.
DEFAULT_IDLE_TIMEOUT_S = 30.0
_READ_SIZE = 65536
#: Longest response head (status line and headers) accepted; asyncio's default
#: StreamReader limit, well above what etcd sends.
_HEAD_LIMIT = 65536
#: How long close() waits for connections to shut down cleanly before aborting them.
_CLOSE_WAIT_S = 1.0
#: One encoder for every JSON body: json.dumps with arguments builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))
# RFC 9110 tokens (methods, header names); what may not appear in a target or a value.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
#: recv flags of the liveness check, as a plain int: OR-ing the IntFlags costs more
#: than the system call.
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

# How a response body is delimited.
_NO_BODY = 0
_LENGTH = 1
_CHUNKED = 2
_UNTIL_EOF = 3


class HttpError(Exception):
    """A request did not get a complete HTTP response."""


class NotSent(HttpError):
    """The request provably never reached the server: safe to send it elsewhere."""


class OutcomeUnknown(HttpError):
    """The request was sent (or may have been), and no complete answer came back.

    The server may have acted on it; only an idempotent request may be repeated.
    """


class _ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.x response this client understands."""


class _Failure(Exception):
    """Internal: an exchange failed; ``started`` says whether any response byte arrived."""

    def __init__(self, cause: BaseException, *, started: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.started = started


# What reading or writing a connection raises on a broken connection or bad response.
# ssl.SSLError is an OSError; asyncio.IncompleteReadError an EOFError.
_IO_ERRORS = (OSError, EOFError, asyncio.LimitOverrunError, _ProtocolError)


class Response(NamedTuple):
    """A complete response. Header names are lower-case; repeated headers are joined.

    A NamedTuple, not a frozen dataclass: one is built per request, and a tuple is
    the cheapest immutable record to build.
    """

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (ValueError if it is not)."""
        return json.loads(self.body)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        text = f"connection closed after {len(exc.partial)} bytes of the response"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Alerts a server's TLS layer sends when it refuses the handshake, the client's
#: certificate above all (OpenSSL's reason names: SSLV3_ALERT_BAD_CERTIFICATE,
#: TLSV13_ALERT_CERTIFICATE_REQUIRED, TLSV1_ALERT_UNKNOWN_CA, ...).
_REFUSAL_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "HANDSHAKE_FAILURE")


def _is_tls_refusal(exc: BaseException) -> bool:
    """A handshake refusal alert from the server. In TLS 1.3 the client finishes
    its side of the handshake first, so a refused client certificate shows up
    on the first read, after the request was written: but the server's TLS
    layer refused the connection, and its HTTP server never saw that request.
    Any other TLS error after the request was written is not a proof of that."""
    reason = getattr(exc, "reason", None)
    return (
        isinstance(exc, ssl.SSLError)
        and isinstance(reason, str)
        and any(alert in reason for alert in _REFUSAL_ALERTS)
    )


def _response_arrived(exc: BaseException) -> bool:
    """Whether the error itself proves response bytes arrived (EOF after some, or
    bytes that did not parse)."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return bool(exc.partial)
    return isinstance(exc, asyncio.LimitOverrunError | _ProtocolError)


def _header_lines(headers: Mapping[str, str]) -> str:
    """Header lines, each ending in CRLF; ValueError for text that would break the
    request's framing (a name that is not a token, a CR, LF or NUL in a value)."""
    lines = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"invalid HTTP header {name!r}: {value!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


class _Connection:
    """One keep-alive connection: its stream pair, its raw socket (for the liveness
    peek), how many requests it carried and since when it is idle."""

    __slots__ = ("idle_since", "reader", "sock", "used", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock: socket.socket
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = sock
        self.used = 0
        self.idle_since = 0.0

    def looks_alive(self) -> bool:
        """True if nothing says the server closed this idle connection (see the module
        docstring): no EOF or error seen by the stream, and the kernel holds neither
        a FIN nor unexpected bytes for it."""
        if (
            self.writer.transport.is_closing()
            or self.reader.at_eof()
            or self.reader.exception() is not None
        ):
            return False
        try:
            self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return True  # nothing to read: the connection is open and quiet
        except OSError:
            return False
        # recv returned b"" (EOF) or bytes nobody asked for (or a TLS alert), which
        # the next response would be mistaken for: either way, not reused.
        return False

    def abort(self) -> None:
        """Close at once, dropping anything unsent: for broken or abandoned connections."""
        self.writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bool]:
    """Status, headers, and whether the server allows reusing the connection.

    Interim 1xx answers (other than 101) are skipped, as RFC 9110 asks.
    """
    while True:
        # One decode and one split for the whole head: this runs for every response.
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        first = lines[0]
        code = first[9:12]
        if not first.startswith("HTTP/1.") or first[8:9] != " " or not code.isdigit():
            raise _ProtocolError(f"not an HTTP/1.x status line: {first[:80]!r}")
        status = int(code)
        if 100 <= status < 200 and status != 101:
            continue
        headers: dict[str, str] = {}
        for line in lines[1:-2]:  # the head ends with two empty strings
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _ProtocolError(f"bad header line: {line[:80]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        # HTTP/1.1 keeps connections open unless told not to; HTTP/1.0 the reverse.
        connection = headers.get("connection")
        tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
        keep_alive = "close" not in tokens if first[7] == "1" else "keep-alive" in tokens
        return status, headers, keep_alive


def _framing(status: int, headers: dict[str, str]) -> tuple[int, int]:
    """How the body is delimited (RFC 9112 section 6.3), and its length if known."""
    if status in (101, 204, 304) or 100 <= status < 200:
        return _NO_BODY, 0
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        last = encoding.rsplit(",", 1)[-1].strip().lower()
        return (_CHUNKED, 0) if last == "chunked" else (_UNTIL_EOF, 0)
    length = headers.get("content-length")
    if length is None:
        return _UNTIL_EOF, 0
    values = {v.strip() for v in length.split(",")}
    value = values.pop()
    if values or not value.isdigit():
        raise _ProtocolError(f"bad Content-Length: {length!r}")
    return _LENGTH, int(value)


async def _chunk_size(reader: asyncio.StreamReader) -> int:
    line = await reader.readuntil(b"\r\n")
    text = line.split(b";", 1)[0].strip()
    try:
        size = int(text, 16)
    except ValueError:
        raise _ProtocolError(f"bad chunk size line: {line[:80]!r}") from None
    if size < 0:
        raise _ProtocolError(f"bad chunk size line: {line[:80]!r}")
    return size


async def _chunk(reader: asyncio.StreamReader, size: int) -> bytes:
    data = await reader.readexactly(size + 2)
    if data[-2:] != b"\r\n":
        raise _ProtocolError("chunk not followed by CRLF")
    return data[:-2]


async def _skip_trailers(reader: asyncio.StreamReader) -> None:
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass


async def _read_body(reader: asyncio.StreamReader, framing: int, length: int) -> bytes:
    if framing == _LENGTH:
        return await reader.readexactly(length) if length else b""
    if framing == _CHUNKED:
        parts = []
        while size := await _chunk_size(reader):
            parts.append(await _chunk(reader, size))
        await _skip_trailers(reader)
        return b"".join(parts)
    if framing == _UNTIL_EOF:
        return await reader.read()
    return b""


async def _iter_body(
    reader: asyncio.StreamReader, framing: int, length: int
) -> AsyncGenerator[bytes, None]:
    """The body piece by piece: each chunk of a chunked body as it arrives."""
    if framing == _CHUNKED:
        while size := await _chunk_size(reader):
            yield await _chunk(reader, size)
        await _skip_trailers(reader)
    elif framing == _LENGTH:
        remaining = length
        while remaining:
            data = await reader.read(min(remaining, _READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data
    elif framing == _UNTIL_EOF:
        while data := await reader.read(_READ_SIZE):
            yield data


class StreamResponse:
    """A response whose body is read as it arrives (see :meth:`ConnectionPool.stream`)."""

    def __init__(
        self,
        origin: str,
        status: int,
        headers: dict[str, str],
        body: AsyncGenerator[bytes, None],
    ) -> None:
        self.status = status
        self.headers = headers
        self._origin = origin
        self._body = body

    async def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        """The body's pieces (each chunk of a chunked body); OutcomeUnknown if it breaks."""
        try:
            # aclosing: each generator here closes the one it reads when it is
            # closed itself, instead of leaving that to the garbage collector.
            async with contextlib.aclosing(self._body):
                async for piece in self._body:
                    yield piece
        except _IO_ERRORS as exc:
            raise OutcomeUnknown(f"{self._origin}: stream broken: {_describe(exc)}") from exc

    async def aiter_lines(self) -> AsyncGenerator[str, None]:
        """The body split into lines (without their ``\\n`` or ``\\r\\n``), a line
        split over several chunks joined again; a last unterminated line is
        yielded at the end. Decoded as UTF-8, bad bytes replaced."""
        parts: list[bytes] = []
        pieces = self.aiter_bytes()
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                if b"\n" not in piece:
                    parts.append(piece)
                    continue
                lines = piece.split(b"\n")
                if parts:
                    lines[0] = b"".join([*parts, lines[0]])
                tail = lines.pop()
                parts = [tail] if tail else []
                for line in lines:
                    yield line.removesuffix(b"\r").decode("utf-8", "replace")
        if parts:
            yield b"".join(parts).removesuffix(b"\r").decode("utf-8", "replace")

    async def read(self) -> bytes:
        """The rest of the body."""
        return b"".join([piece async for piece in self.aiter_bytes()])


class ConnectionPool:
    """HTTP/1.1 connections to one origin (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``headers`` go with every request (encoded once, here); ``request`` and
        ``stream`` may add more."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base_path = parts.path.rstrip("/")
        self._fixed_headers = f"Host: {parts.netloc}\r\n" + _header_lines(headers or {})
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self.max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        # Idle connections, least recently used on the left; reused from the right.
        self._idle: collections.deque[_Connection] = collections.deque()
        # Callers waiting for a connection, in arrival order. Each future gets either
        # a connection handed over or None: "a slot is yours, open a connection".
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        # Connections counted against the bound: idle, in use, or being opened.
        self._count = 0
        self._streams: set[_Connection] = set()
        self._closed = False
        #: Connections opened so far (pooled and streams): lets tests see reuse.
        self.connects = 0

    @property
    def open_connections(self) -> int:
        """Pooled connections open or being opened now (streams not included)."""
        return self._count

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    # --- requests ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        idempotent: bool = False,
    ) -> Response:
        """Send one request and read its whole response.

        ``json_body`` (if not None) is sent as JSON, otherwise ``body``.
        ``idempotent`` allows the one retry on a fresh connection after a reused
        connection failed before any response byte (module docstring). Raises
        NotSent or OutcomeUnknown; any HTTP status is a Response, not an error.
        No timeout of its own beyond the connect timeout: bound the call with
        ``asyncio.timeout``, and a cancelled request closes its connection.
        """
        payload = self._encode(method, path, json_body, body, headers)
        fresh = False
        while True:
            # The common case, an idle connection, without the checkout coroutine.
            conn = None if fresh else self._take_idle()
            if conn is None:
                conn = await self._checkout(fresh=fresh)
            reused = conn.used > 0
            conn.used += 1
            try:
                response, keep_alive = await self._exchange(conn, payload)
            except _Failure as failure:
                self._discard(conn)
                if reused and idempotent and not fresh and not failure.started:
                    fresh = True  # the server probably closed it while idle: once more
                    continue
                if not reused and not failure.started and _is_tls_refusal(failure.cause):
                    raise NotSent(
                        f"{self.origin}: TLS handshake refused: {_describe(failure.cause)}"
                    ) from failure.cause
                raise OutcomeUnknown(
                    f"{self.origin}: {'reused ' if reused else ''}connection failed after the"
                    f" request was sent: {_describe(failure.cause)}"
                ) from failure.cause
            except BaseException:
                self._discard(conn)  # cancelled or timed out mid-exchange
                raise
            if keep_alive:
                self._checkin(conn)
            else:
                self._discard(conn)
            return response

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamResponse]:
        """Send one request and give its response with the body still to read.

        It runs on a connection of its own, outside ``max_connections``, closed
        when the block ends: meant for long streams like etcd's watch. NotSent and
        OutcomeUnknown as for :meth:`request` (the head is read before the block
        starts); a body that breaks raises OutcomeUnknown while it is iterated.
        """
        payload = self._encode(method, path, json_body, body, headers)
        if self._closed:
            raise NotSent(f"{self.origin}: the connection pool is closed")
        conn = await self._connect()
        self._streams.add(conn)
        try:
            started = False
            try:
                conn.writer.write(payload)
                await conn.writer.drain()
                status, response_headers, _ = await _read_head(conn.reader)
                started = True
                framing, length = _framing(status, response_headers)
            except _IO_ERRORS as exc:
                started = started or _response_arrived(exc)
                if not started and _is_tls_refusal(exc):
                    raise NotSent(
                        f"{self.origin}: TLS handshake refused: {_describe(exc)}"
                    ) from exc
                raise OutcomeUnknown(
                    f"{self.origin}: stream failed after the request was sent: {_describe(exc)}"
                ) from exc
            yield StreamResponse(
                self.origin, status, response_headers, _iter_body(conn.reader, framing, length)
            )
        finally:
            self._streams.discard(conn)
            conn.abort()

    async def close(self) -> None:
        """Close every connection; waiting and later requests raise NotSent.

        Streams are cut at once. A request in flight keeps its connection until
        it ends, then closes it.
        """
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(NotSent(f"{self.origin}: the connection pool is closed"))
        for conn in list(self._streams):
            conn.abort()
        idle = list(self._idle)
        self._idle.clear()
        self._count -= len(idle)
        for conn in idle:
            conn.writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await asyncio.gather(
                    *(conn.writer.wait_closed() for conn in idle), return_exceptions=True
                )
        for conn in idle:
            conn.abort()  # a no-op if closed cleanly; else do not wait any longer

    # --- the pool ---------------------------------------------------------------------------

    async def _checkout(self, *, fresh: bool) -> _Connection:
        """A connection for one request: an idle one that still looks alive, or a new
        one if the bound allows, or the next one released (FIFO). ``fresh``: never
        an idle one (used for the single retry after a stale one)."""
        if self._closed:
            raise NotSent(f"{self.origin}: the connection pool is closed")
        if fresh:
            if self._idle and self._count >= self.max_connections:
                # Drop one to make room: the retry needs a new connection.
                self._idle.pop().abort()
                self._count -= 1
        elif (conn := self._take_idle()) is not None:
            return conn
        if self._count < self.max_connections:
            self._count += 1
            got: _Connection | None = None
        else:
            fut: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                # Handed a connection or slot in the same instant: pass it on.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    handed = fut.result()
                    if handed is None:
                        self._free_slot()
                    else:
                        self._checkin(handed)
                raise
            if got is not None and (fresh or not got.looks_alive()):
                got.abort()  # keep its slot, open a new connection in it
                got = None
        if got is not None:
            return got
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection that still looks alive; dead ones
        found on the way are closed."""
        while self._idle:
            conn = self._idle.pop()
            if conn.looks_alive():
                return conn
            conn.abort()
            self._count -= 1
        return None

    def _checkin(self, conn: _Connection) -> None:
        """A connection whose response was read completely: to the first waiter, or idle."""
        if self._closed:
            conn.writer.close()
            self._count -= 1
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        now = time.monotonic()
        conn.idle_since = now
        self._idle.append(conn)
        # Shed connections idle too long, oldest first (no waiter exists here).
        while self._idle and now - self._idle[0].idle_since > self._idle_timeout_s:
            self._idle.popleft().abort()
            self._count -= 1

    def _discard(self, conn: _Connection) -> None:
        """A connection that must not be reused: close it, and give its slot on."""
        conn.abort()
        self._free_slot()

    def _free_slot(self) -> None:
        self._count -= 1
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._count += 1
                fut.set_result(None)
                return

    # --- one connection ---------------------------------------------------------------------

    def _encode(
        self,
        method: str,
        path: str,
        json_body: Any,
        body: bytes,
        headers: Mapping[str, str] | None,
    ) -> bytes:
        if not _TOKEN.fullmatch(method) or not path.startswith("/") or _CONTROL.search(path):
            raise ValueError(f"invalid request line: {method!r} {path!r}")
        extra = _header_lines(headers) if headers else ""
        if json_body is not None:
            body = _JSON.encode(json_body).encode()
            extra += "Content-Type: application/json\r\n"
        head = (
            f"{method} {self._base_path}{path} HTTP/1.1\r\n{self._fixed_headers}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def _connect(self) -> _Connection:
        """A new connection (TCP, then TLS if https); NotSent if it cannot be made."""
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                sock = await self._open_socket(loop)
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                    limit=_HEAD_LIMIT,
                )
        except TimeoutError:
            if sock is not None:
                sock.close()
            raise NotSent(
                f"{self.origin}: connect timed out after {self._connect_timeout_s:g}s"
            ) from None
        except ssl.SSLError as exc:
            if sock is not None:
                sock.close()
            raise NotSent(f"{self.origin}: TLS handshake failed: {exc}") from exc
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise NotSent(f"{self.origin}: connect failed: {_describe(exc)}") from exc
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.connects += 1
        return _Connection(reader, writer, sock)

    async def _open_socket(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A connected non-blocking TCP socket with TCP_NODELAY; addresses tried in order."""
        addresses: list[tuple[socket.AddressFamily, Any]]
        try:
            ip = ipaddress.ip_address(self._host)
        except ValueError:  # a name: resolve it (in a thread, as asyncio does)
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            addresses = [(family, addr) for family, _, _, _, addr in infos]
        else:  # an address: no resolver round trip
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            addresses = [(family, (self._host, self._port))]
        last: OSError = OSError(f"no address for {self._host}")
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last

    async def _exchange(self, conn: _Connection, payload: bytes) -> tuple[Response, bool]:
        """Write the request, read the whole response; _Failure on a broken connection."""
        started = False
        try:
            conn.writer.write(payload)
            if conn.writer.transport.get_write_buffer_size():
                await conn.writer.drain()  # only a large body waits for the socket
            status, headers, keep_alive = await _read_head(conn.reader)
            started = True
            framing, length = _framing(status, headers)
            if framing == _LENGTH:  # etcd's usual answer: read it without another coroutine
                body = await conn.reader.readexactly(length)
            else:
                body = await _read_body(conn.reader, framing, length)
        except _IO_ERRORS as exc:
            raise _Failure(exc, started=started or _response_arrived(exc)) from exc
        return Response(status, headers, body), keep_alive and framing != _UNTIL_EOF
