"""The etcd backend: a small asyncio client over etcd's JSON gateway (``/v3/...``).

Why our own client and not a library: the Python etcd clients measured on these
machines each fail a need (ENVIRONMENT.md): skipped events on watch resume,
hangs on compacted watches, blind retries of transactions, protobuf clashes.
etcd's gRPC gateway speaks the same v3 API as JSON over HTTP, which is what
Patroni does. The HTTP/1.1 under it is our own too (:mod:`blixard.store.http1`:
a bounded keep-alive pool per endpoint on asyncio streams, TLS client
certificates, chunked streams for watches). httpx, used before, managed 40-105
puts/s under 64 concurrent callers, with single puts waiting past the timeout;
this client does 15-25 times as many (docs/benchmarks.md, run L), and it tells
"provably not sent" from "outcome unknown", which the failover rule below needs.
All etcd calls fit in this one module, judged by the same conformance suite as
the SQLite backend.

Rules this module keeps:

* Every call is bounded by ``timeout_s``; a store that does not answer in time
  is :class:`StoreUnavailable`, never a hang.
* Several endpoints with failover. Reads and lease keepalives move on to the
  next endpoint on any transport failure. Writes move on only when the
  request provably did not reach etcd (connection refused, TLS handshake
  refused, or "no leader" answered before proposing: ``http1.NotSent``); any
  other failure of a write is ambiguous (``http1.OutcomeUnknown``) and raised
  as StoreUnavailable, never retried blindly.
* Watches track the revision of the last event they delivered and, after a
  broken stream, resume from the next one on another endpoint: no loss, no
  repeat. They ask etcd to cancel them when their member loses its leader
  (gRPC metadata ``hasleader``), so a member cut off from the quorum cannot
  hold a watch silently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blixard.domain.errors import (
    BlixardError,
    Compacted,
    LeaseNotFound,
    NotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from blixard.store.http1 import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectionPool,
    HttpError,
    NotSent,
)
from blixard.store.protocol import (
    DEFAULT_TIMEOUT_S,
    Compare,
    Delete,
    Event,
    EventType,
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
    check_value,
    prefix_end,
)

# gRPC status codes etcd answers with (carried in the gateway's JSON "code").
_INVALID_ARGUMENT = 3
_DEADLINE_EXCEEDED = 4
_NOT_FOUND = 5
_FAILED_PRECONDITION = 9
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14

_TARGETS = {
    "mod": "MOD",
    "create": "CREATE",
    "version": "VERSION",
    "value": "VALUE",
    "lease": "LEASE",
}
_TARGET_FIELDS = {
    "mod": "mod_revision",
    "create": "create_revision",
    "version": "version",
    "lease": "lease",
}
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
# Ask etcd to refuse/cancel requests on a member that has no leader.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
# How long a watch waits between reconnect attempts.
_WATCH_RETRY_S = 0.05


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(obj: dict[str, Any], name: str) -> int:
    """The gateway encodes int64 as strings and omits zero values."""
    return int(obj.get(name, 0))


def _kv(obj: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(obj.get("key")).decode("utf-8", "surrogateescape"),
        value=_unb64(obj.get("value")),
        create_revision=_int(obj, "create_revision"),
        mod_revision=_int(obj, "mod_revision"),
        version=_int(obj, "version"),
        lease=_int(obj, "lease"),
    )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Client TLS for etcd: the CA that signed the members, and our client certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


@dataclass(frozen=True, slots=True)
class Member:
    """One etcd cluster member as the cluster API reports it."""

    id: int
    name: str
    peer_urls: list[str] = field(default_factory=list)
    client_urls: list[str] = field(default_factory=list)
    is_learner: bool = False


class ClusterNotReady(StoreUnavailable):
    """etcd refused a membership change because too few members are healthy *long enough*.

    etcd counts only members connected for its health interval (5 s) toward the
    quorum a new member needs, so joins right after another join are refused,
    definitely (nothing was proposed), and may simply be tried again.
    """

    code = "cluster_not_ready"


class _EtcdAnswer(Exception):
    """An error answer from etcd (before mapping to the blixard error tree)."""

    def __init__(self, code: int, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class _NotSent(Exception):
    """The request provably never reached etcd; safe to try another endpoint."""


def _range_request(
    prefix: bytes, *, is_prefix: bool, limit: int = 0, keys_only: bool = False
) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _b64(prefix)}
    if is_prefix:
        req["range_end"] = _b64(prefix_end(prefix))
    if limit:
        req["limit"] = limit
    if keys_only:
        req["keys_only"] = True
    return req


def _op_request(op: TxnOp) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key.encode()), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        raw = op.key.encode()
        delete: dict[str, Any] = {"key": _b64(raw)}
        if op.prefix:
            delete["range_end"] = _b64(prefix_end(raw))
        return {"request_delete_range": delete}
    return {"request_range": _range_request(op.key.encode(), is_prefix=op.prefix)}


def _compare_request(c: Compare) -> dict[str, Any]:
    req: dict[str, Any] = {
        "key": _b64(c.key.encode()),
        "target": _TARGETS[c.target],
        "result": _RESULTS[c.op],
    }
    if c.target == "value":
        assert isinstance(c.operand, bytes)
        req["value"] = _b64(c.operand)
    else:
        req[_TARGET_FIELDS[c.target]] = str(c.operand)
    return req


def _op_response(resp: dict[str, Any]) -> int | list[KeyValue]:
    if "response_put" in resp:
        return _int(resp["response_put"].get("header", {}), "revision")
    if "response_delete_range" in resp:
        return _int(resp["response_delete_range"], "deleted")
    if "response_range" in resp:
        return [_kv(kv) for kv in resp["response_range"].get("kvs", [])]
    raise StoreError(f"etcd answered a transaction with an unknown response: {sorted(resp)}")


class EtcdStore:
    """StateStore on a real etcd cluster (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
    ) -> None:
        if not endpoints:
            raise ValidationError("etcd_endpoints", "at least one endpoint is required")
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValidationError(
                    "etcd_endpoints", f"{url!r} must start with http:// or https://"
                )
        if timeout_s <= 0:
            raise ValidationError("timeout_s", f"must be positive, got {timeout_s}")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout_s = timeout_s
        self._preferred = 0
        # https:// without TlsConfig verifies against the system's CAs.
        context = tls.context() if tls else None
        self._pools = [
            ConnectionPool(
                url,
                ssl_context=context,
                max_connections=DEFAULT_MAX_CONNECTIONS,
                connect_timeout_s=timeout_s,
                headers=_REQUIRE_LEADER,
            )
            for url in self.endpoints
        ]
        self._closed = False

    # --- transport -----------------------------------------------------------------------

    def _endpoint_order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    async def _post_once(
        self, index: int, path: str, body: dict[str, Any], *, idempotent: bool
    ) -> dict[str, Any]:
        try:
            resp = await self._pools[index].request(
                "POST", path, json_body=body, idempotent=idempotent
            )
        except NotSent as exc:
            # Connect refused or failed, TLS handshake refused: etcd never saw the request.
            raise _NotSent(str(exc)) from exc
        except HttpError as exc:
            raise StoreUnavailable(
                f"etcd {self.endpoints[index]}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            data = resp.json()
        except ValueError as exc:
            raise StoreUnavailable(
                f"etcd {self.endpoints[index]} answered HTTP {resp.status} with no JSON"
            ) from exc
        if not isinstance(data, dict):
            raise StoreUnavailable(
                f"etcd {self.endpoints[index]} answered HTTP {resp.status} with"
                f" {type(data).__name__}, not a JSON object"
            )
        if resp.status != 200 or "error" in data:
            raise _EtcdAnswer(
                int(data.get("code", 2)),
                str(data.get("message", data.get("error", ""))),
                resp.status,
            )
        return data

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        """One request, bounded by the timeout, with failover as the module docstring says."""
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        failures: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    for index in self._endpoint_order():
                        try:
                            data = await self._post_once(index, path, body, idempotent=idempotent)
                        except _NotSent as exc:
                            failures.append(str(exc))
                            continue
                        except StoreUnavailable as exc:
                            if not idempotent:
                                raise
                            failures.append(str(exc))
                            continue
                        except _EtcdAnswer as exc:
                            if exc.code == _UNAVAILABLE and "no leader" in exc.message:
                                failures.append(f"{self.endpoints[index]}: {exc.message}")
                                continue
                            if idempotent and exc.code in (_UNAVAILABLE, _DEADLINE_EXCEEDED):
                                failures.append(f"{self.endpoints[index]}: {exc.message}")
                                continue
                            raise self._map_error(exc) from None
                        self._preferred = index
                        return data
                    # Every endpoint failed in a retryable way: pause, then go round again.
                    await asyncio.sleep(0.05)
        except TimeoutError:
            last = failures[-1] if failures else "no answer"
            raise StoreUnavailable(
                f"etcd did not answer {path} within {self.timeout_s:g}s (last failure: {last})"
            ) from None

    @staticmethod
    def _map_error(exc: _EtcdAnswer) -> BlixardError:
        msg = exc.message
        if exc.code == _NOT_FOUND and "lease" in msg:
            return LeaseNotFound(msg)
        if exc.code == _NOT_FOUND:
            return NotFound(msg)
        if exc.code == _OUT_OF_RANGE and "compacted" in msg:
            return Compacted(0, 0)
        if exc.code in (_INVALID_ARGUMENT, _OUT_OF_RANGE, _FAILED_PRECONDITION):
            return ValidationError("request", f"etcd refused it: {msg}")
        if exc.code == _UNAVAILABLE and "unhealthy cluster" in msg:
            return ClusterNotReady(f"etcd: {msg}")
        if exc.code in (_UNAVAILABLE, _DEADLINE_EXCEEDED):
            return StoreUnavailable(f"etcd: {msg}")
        return StoreError(f"etcd error {exc.code}: {msg}")

    # --- key-value -----------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        raw = check_key(key)
        data = await self._call(
            "/v3/kv/range", _range_request(raw, is_prefix=False), idempotent=True
        )
        kvs = data.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    async def range(self, prefix: str, *, limit: int = 0, keys_only: bool = False) -> RangeResult:
        raw = check_key(prefix, "prefix")
        check_revision(limit, "limit")
        data = await self._call(
            "/v3/kv/range",
            _range_request(raw, is_prefix=True, limit=limit, keys_only=keys_only),
            idempotent=True,
        )
        return RangeResult(
            kvs=[_kv(kv) for kv in data.get("kvs", [])],
            revision=_int(data["header"], "revision"),
            more=bool(data.get("more", False)),
        )

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        raw_key = check_key(key)
        raw_value = check_value(value)
        check_lease_id(lease)
        body: dict[str, Any] = {"key": _b64(raw_key), "value": _b64(raw_value)}
        if lease:
            body["lease"] = str(lease)
        data = await self._call("/v3/kv/put", body, idempotent=False)
        return _int(data["header"], "revision")

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        raw = check_key(key)
        body: dict[str, Any] = {"key": _b64(raw)}
        if prefix:
            body["range_end"] = _b64(prefix_end(raw))
        data = await self._call("/v3/kv/deleterange", body, idempotent=False)
        return _int(data, "deleted")

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        check_txn(compares, success, failure)
        body = {
            "compare": [_compare_request(c) for c in compares],
            "success": [_op_request(op) for op in success],
            "failure": [_op_request(op) for op in failure],
        }
        writes = any(isinstance(op, Put | Delete) for op in (*success, *failure))
        data = await self._call("/v3/kv/txn", body, idempotent=not writes)
        return TxnResult(
            succeeded=bool(data.get("succeeded", False)),
            revision=_int(data["header"], "revision"),
            responses=[_op_response(r) for r in data.get("responses", [])],
        )

    async def compact(self, revision: int) -> None:
        check_revision(revision)
        try:
            await self._call(
                "/v3/kv/compaction", {"revision": str(revision), "physical": True}, idempotent=True
            )
        except Compacted:
            current = await self._compact_revision_hint()
            raise Compacted(revision, current) from None

    async def _compact_revision_hint(self) -> int:
        """etcd does not report the compact revision directly; a watch from 1 reveals it."""
        try:
            async for _ in self.watch("/", from_revision=1):
                break
        except Compacted as exc:
            return exc.compact_revision
        return 0

    async def head_revision(self) -> int:
        data = await self._call("/v3/kv/range", {"key": _b64(b"\x00"), "limit": 1}, idempotent=True)
        return _int(data["header"], "revision")

    # --- watch ---------------------------------------------------------------------------

    async def watch(self, prefix: str, *, from_revision: int = 0) -> AsyncIterator[Event]:
        """See StateStore.watch. Reconnects on any endpoint; StoreUnavailable after
        ``timeout_s`` without any endpoint accepting the watch."""
        raw = check_key(prefix, "prefix")
        check_revision(from_revision, "from_revision")
        next_rev = from_revision or (await self.head_revision()) + 1
        first_try_of_outage: float | None = None
        last_error = ""
        while True:
            if self._closed:
                return
            for index in self._endpoint_order():
                try:
                    # aclosing: a caller that stops watching closes the stream's
                    # connection now, not whenever the generator is collected.
                    stream = self._watch_stream(index, raw, next_rev)
                    async with contextlib.aclosing(stream):
                        async for events in stream:
                            first_try_of_outage = None  # the stream is up (or delivering)
                            if not events:
                                continue
                            for ev in events:
                                if ev.revision < next_rev:  # never repeat an event
                                    continue
                                yield ev
                            next_rev = max(next_rev, events[-1].revision + 1)
                except (_NotSent, _StreamBroken) as exc:
                    last_error = str(exc)
                    continue
            now = time.monotonic()
            if first_try_of_outage is None:
                first_try_of_outage = now
            elif now - first_try_of_outage > self.timeout_s:
                raise StoreUnavailable(
                    f"no etcd endpoint accepted a watch for {self.timeout_s:g}s "
                    f"(last: {last_error})"
                )
            await asyncio.sleep(_WATCH_RETRY_S)

    async def _watch_stream(
        self, index: int, key: bytes, start: int
    ) -> AsyncGenerator[list[Event], None]:
        """One watch stream on one endpoint; yields each response's events as a batch
        (an empty batch once the watch is created)."""
        body = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(prefix_end(key)),
                "start_revision": str(start),
            }
        }
        endpoint = self.endpoints[index]
        try:
            # A connection of its own, no read timeout: a watch may be idle for hours.
            async with self._pools[index].stream("POST", "/v3/watch", json_body=body) as resp:
                if resp.status != 200:
                    raise _StreamBroken(f"{endpoint}: HTTP {resp.status}")
                self._preferred = index
                lines = resp.aiter_lines()
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        if "error" in msg:
                            raise _StreamBroken(f"{endpoint}: {msg['error']}")
                        result = msg.get("result", {})
                        if result.get("created"):
                            yield []  # tells the caller the stream is established
                        compact_rev = _int(result, "compact_revision")
                        if compact_rev:
                            raise Compacted(start, compact_rev)
                        if result.get("canceled"):
                            reason = result.get("cancel_reason", "canceled by etcd")
                            raise _StreamBroken(f"{endpoint}: {reason}")
                        events = [
                            Event(
                                EventType.DELETE if ev.get("type") == "DELETE" else EventType.PUT,
                                _kv(ev["kv"]),
                            )
                            for ev in result.get("events", [])
                        ]
                        if events:
                            yield events
                raise _StreamBroken(f"{endpoint}: watch stream ended")
        except NotSent as exc:
            raise _NotSent(str(exc)) from exc
        except HttpError as exc:
            raise _StreamBroken(f"{endpoint}: {type(exc).__name__}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise _StreamBroken(f"{endpoint}: bad watch message: {exc}") from exc

    # --- leases --------------------------------------------------------------------------

    async def lease_grant(self, ttl_s: int) -> Lease:
        check_ttl(ttl_s)
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)}, idempotent=False)
        return Lease(id=_int(data, "ID"), ttl_s=_int(data, "TTL"))

    async def lease_keepalive(self, lease_id: int) -> int:
        check_lease_id(lease_id, "lease_id")
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, idempotent=True)
        ttl = _int(data.get("result", data), "TTL")
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id} expired or was revoked")
        return ttl

    async def lease_revoke(self, lease_id: int) -> None:
        check_lease_id(lease_id, "lease_id")
        with contextlib.suppress(LeaseNotFound):
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True)

    # --- cluster membership (used by the etcd member supervisor) -------------------------

    async def member_list(self) -> list[Member]:
        data = await self._call("/v3/cluster/member/list", {}, idempotent=True)
        return [_member(m) for m in data.get("members", [])]

    async def member_add(self, peer_urls: Sequence[str]) -> tuple[Member, list[Member]]:
        """Announce a new member; returns it and the member list to start it with."""
        data = await self._call(
            "/v3/cluster/member/add", {"peerURLs": list(peer_urls)}, idempotent=False
        )
        return _member(data["member"]), [_member(m) for m in data.get("members", [])]

    async def member_remove(self, member_id: int) -> None:
        try:
            await self._call("/v3/cluster/member/remove", {"ID": str(member_id)}, idempotent=False)
        except NotFound:
            raise NotFound(f"etcd member {member_id:x} is not in the cluster") from None

    async def leader_id(self) -> int:
        """The id of the member the answering endpoint believes is the leader."""
        data = await self._call("/v3/maintenance/status", {}, idempotent=True)
        return _int(data, "leader")

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(pool.close() for pool in self._pools))


class _StreamBroken(Exception):
    """A watch stream ended or failed; the watch resumes on another endpoint."""


def _member(obj: dict[str, Any]) -> Member:
    return Member(
        id=_int(obj, "ID"),
        name=str(obj.get("name", "")),
        peer_urls=list(obj.get("peerURLs", [])),
        client_urls=list(obj.get("clientURLs", [])),
        is_learner=bool(obj.get("isLearner", False)),
    )
