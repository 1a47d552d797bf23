"""The StateStore protocol: etcd's data model, spoken by every backend.

Blixard keeps all cluster state in one revisioned key-value store. The model is
etcd's on purpose, so the embedded SQLite backend and a real etcd cluster are
interchangeable and judged by one conformance suite:

* one global revision, bumped by every write (a transaction is one revision);
* every key carries create_revision, mod_revision, version and its lease;
* transactions compare those numbers (compare-and-swap) and then run puts,
  deletes and reads atomically;
* watches replay history from a revision, resume across reconnects without
  losing or repeating events, and raise :class:`Compacted` when the asked-for
  history is gone;
* leases expire unless kept alive, and their expiry deletes attached keys.

Nothing outside ``blixard.store`` imports an etcd or SQLite library.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from blixard.domain.errors import ValidationError

#: Longest key accepted, in bytes (etcd accepts more; we keep keys readable).
MAX_KEY_BYTES = 1024
#: Largest value accepted, in bytes: etcd's default request limit is 1.5 MiB,
#: and a value must fit in one request together with its key and framing.
MAX_VALUE_BYTES = 1_400_000
#: Most operations in one transaction branch: etcd's default ``--max-txn-ops``.
MAX_TXN_OPS = 128
#: Lease ids are etcd's int64, positive.
MAX_LEASE_ID = 2**63 - 1
#: Default bound on every store call, in seconds.
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored, with etcd's bookkeeping."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Keys read at one revision of the store (``revision`` is the store's head)."""

    kvs: list[KeyValue]
    revision: int
    more: bool = False


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch.

    For a delete, ``kv.value`` is empty and ``kv.mod_revision`` is the revision
    of the delete, as in etcd.
    """

    type: EventType
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


CompareTarget = Literal["mod", "create", "version", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, as in etcd's ``Compare``.

    A missing key has create/mod revision 0 and version 0, so
    ``Compare.created(key, 0)`` means "the key does not exist".
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    @staticmethod
    def mod(key: str, revision: int, op: CompareOp = "==") -> Compare:
        return Compare(key, "mod", op, revision)

    @staticmethod
    def created(key: str, revision: int, op: CompareOp = "==") -> Compare:
        return Compare(key, "create", op, revision)

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "create", "==", 0)

    @staticmethod
    def version(key: str, version: int, op: CompareOp = "==") -> Compare:
        return Compare(key, "version", op, version)

    @staticmethod
    def value(key: str, value: bytes, op: CompareOp = "==") -> Compare:
        return Compare(key, "value", op, value)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


TxnOp = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """What a transaction did.

    ``responses`` has one entry per operation of the branch that ran: the
    revision for a put, the number of keys deleted for a delete, and the list
    of key-values for a get.
    """

    succeeded: bool
    revision: int
    responses: list[int | list[KeyValue]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl_s: int


@runtime_checkable
class StateStore(Protocol):
    """The interface every backend implements; see the module docstring."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, prefix: str, *, limit: int = 0, keys_only: bool = False) -> RangeResult:
        """Keys under ``prefix`` in key order (``limit`` 0 = all), at the head revision."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write one key; returns the revision of the write."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or all keys under a prefix); returns how many went."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult: ...

    def watch(self, prefix: str, *, from_revision: int = 0) -> AsyncIterator[Event]:
        """Stream events on keys under ``prefix`` from ``from_revision``.

        ``from_revision=0`` means "from now on". The stream survives reconnects
        without losing or repeating events; it raises :class:`Compacted` if
        ``from_revision`` (or the resume point) is older than the history kept.
        It ends (without error) when the store is closed.
        """
        ...

    async def head_revision(self) -> int:
        """The store's current revision."""
        ...

    async def compact(self, revision: int) -> None:
        """Drop history older than ``revision`` (watches from before it fail)."""
        ...

    async def lease_grant(self, ttl_s: int) -> Lease:
        """A new lease. Its TTL may be longer than asked: etcd raises TTLs below
        its floor (1.5 x the election timeout, 2 s by default)."""
        ...

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease; returns its TTL. Raises LeaseNotFound once it expired."""
        ...

    async def lease_revoke(self, lease_id: int) -> None:
        """End a lease now, deleting its keys. Unknown leases are ignored."""
        ...

    async def close(self) -> None: ...


# --- validation shared by every backend -------------------------------------------------


def check_key(key: str, field_name: str = "key") -> bytes:
    """Refuse keys that could not round-trip through every backend.

    A key is an absolute, printable path: it starts with "/", holds no control
    characters or whitespace, and is at most MAX_KEY_BYTES long in UTF-8.
    Returns the UTF-8 encoding, which is what the backends store.
    """
    if not isinstance(key, str):
        raise ValidationError(field_name, f"must be a string, got {type(key).__name__}")
    if not key.startswith("/"):
        raise ValidationError(field_name, f"must start with '/', got {key!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ValidationError(
            field_name, f"must not contain whitespace or control characters: {key!r}"
        )
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise ValidationError(field_name, f"is {len(raw)} bytes long; the limit is {MAX_KEY_BYTES}")
    return raw


def check_value(value: bytes, field_name: str = "value") -> bytes:
    """Refuse values that are not bytes or too large for one etcd request."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationError(field_name, f"must be bytes, got {type(value).__name__}")
    raw = bytes(value)
    if len(raw) > MAX_VALUE_BYTES:
        raise ValidationError(
            field_name, f"is {len(raw)} bytes long; the limit is {MAX_VALUE_BYTES}"
        )
    return raw


def check_ttl(ttl_s: int) -> int:
    if not isinstance(ttl_s, int) or isinstance(ttl_s, bool):
        raise ValidationError("ttl_s", f"must be an integer, got {type(ttl_s).__name__}")
    if not 1 <= ttl_s <= 9_000_000_000:
        raise ValidationError("ttl_s", f"must be between 1 and 9000000000 seconds, got {ttl_s}")
    return ttl_s


def check_revision(revision: int, field_name: str = "revision") -> int:
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise ValidationError(field_name, f"must be a non-negative integer, got {revision!r}")
    return revision


def check_lease_id(lease_id: int, field_name: str = "lease") -> int:
    """0 means "no lease" where a lease is optional; ids are positive int64."""
    if (
        not isinstance(lease_id, int)
        or isinstance(lease_id, bool)
        or not 0 <= lease_id <= MAX_LEASE_ID
    ):
        raise ValidationError(
            field_name, f"must be a lease id between 1 and 2^63-1, got {lease_id!r}"
        )
    return lease_id


def check_compare(compare: Compare) -> None:
    check_key(compare.key, "compare.key")
    if compare.target not in ("mod", "create", "version", "value", "lease"):
        raise ValidationError("compare.target", f"unknown target {compare.target!r}")
    if compare.op not in ("==", "!=", "<", ">"):
        raise ValidationError("compare.op", f"unknown operator {compare.op!r}")
    if compare.target == "value":
        check_value(compare.operand, "compare.operand")  # type: ignore[arg-type]
    elif not isinstance(compare.operand, int) or isinstance(compare.operand, bool):
        raise ValidationError("compare.operand", f"must be an integer for target {compare.target}")


def check_op(op: TxnOp) -> None:
    if isinstance(op, Put):
        check_key(op.key)
        check_value(op.value)
        check_lease_id(op.lease)
    elif isinstance(op, Delete | Get):
        check_key(op.key)
    else:
        raise ValidationError("txn", f"unknown operation {type(op).__name__}")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for a prefix: the prefix with its last byte incremented."""
    buf = bytearray(prefix)
    while buf:
        if buf[-1] < 0xFF:
            buf[-1] += 1
            return bytes(buf)
        buf.pop()
    return b"\x00"  # the whole keyspace


def check_txn(
    compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp]
) -> None:
    """Validate a whole transaction before any backend touches its data.

    Besides each part, etcd refuses a branch that writes one key twice (two
    puts, or a put and a delete covering it): "duplicate key given in txn
    request". Every backend applies the same rule so they agree.
    """
    for compare in compares:
        if not isinstance(compare, Compare):
            raise ValidationError("txn.compares", f"unknown compare {type(compare).__name__}")
        check_compare(compare)
    if len(compares) > MAX_TXN_OPS:
        raise ValidationError(
            "txn.compares", f"has {len(compares)} entries; the limit is {MAX_TXN_OPS}"
        )
    for branch_name, branch in (("success", success), ("failure", failure)):
        if len(branch) > MAX_TXN_OPS:
            raise ValidationError(
                f"txn.{branch_name}", f"has {len(branch)} operations; the limit is {MAX_TXN_OPS}"
            )
        puts: set[str] = set()
        deletes: list[Delete] = []
        for op in branch:
            check_op(op)
            if isinstance(op, Put):
                if op.key in puts:
                    raise ValidationError(
                        f"txn.{branch_name}",
                        f"duplicate key given in txn request: {op.key!r} is written twice",
                    )
                puts.add(op.key)
            elif isinstance(op, Delete):
                deletes.append(op)
        for d in deletes:
            for key in puts:
                if key == d.key or (d.prefix and key.startswith(d.key)):
                    raise ValidationError(
                        f"txn.{branch_name}",
                        f"duplicate key given in txn request: {key!r} is both put and deleted",
                    )
