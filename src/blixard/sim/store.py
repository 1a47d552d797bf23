"""An in-memory model of the state store: etcd's data model, at one point in virtual time.

Why a model and not ``SqliteStore``: the real backends are asynchronous and
serialise every value to JSON; here an operation is applied at the instant
its request reaches the store (the caller's latency is added around it by
:mod:`blixard.sim.node`), which is what lets thousands of steps run per
second and lets requests and responses be lost separately.

What is kept from the real store (DESIGN.md "Consensus"):

* one global revision; every write gets the next one and each object's
  ``metadata.resource_version`` is its key's mod revision (as
  ``store/objects.py`` sets it on every read);
* transactions: all compares, then all writes, or nothing. ``create``
  compares the key absent, ``update``/``delete`` compare the mod revision
  with the object's resource_version (``controllers/vms.py`` lines 166-175);
* leases with a TTL that restarts when a keepalive *reaches* the store, and
  whose expiry deletes the attached keys (the node liveness keys,
  ``/blixard/v1/leases/nodes/<id>``);
* watches: every change is handed to the subscribers in revision order.

It holds the real domain objects (:class:`VM`, :class:`Instance`,
:class:`Node`), never copies of their fields, and never mutates one: every
write stores a new object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from blixard.domain.errors import LeaseNotFound
from blixard.domain.instance import Instance
from blixard.domain.node import Node
from blixard.domain.vm import VM
from blixard.sim.clock import Clock, Timer

Obj = VM | Instance | Node
KindName = Literal["vms", "instances", "nodes", "live"]


def kind_of(obj: Obj) -> KindName:
    if isinstance(obj, Instance):
        return "instances"
    if isinstance(obj, VM):
        return "vms"
    return "nodes"


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a transaction (see the module docstring for its compare)."""

    obj: Obj
    op: Literal["create", "update", "delete"]


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One change, as a watch delivers it. ``kind == "live"``: a node's liveness key."""

    revision: int
    kind: KindName
    name: str
    #: The object after the change; None for a delete (and for liveness keys).
    obj: Obj | None
    #: The object before the change (None if it was absent).
    prev: Obj | None
    deleted: bool


@dataclass
class Lease:
    id: int
    ttl: int
    expires_at: float
    #: Names of the nodes whose liveness key is attached to this lease.
    keys: set[str]
    timer: Timer | None = None


class SimStore:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.revision = 0
        self.vms: dict[str, VM] = {}
        self.instances: dict[str, Instance] = {}
        self.nodes: dict[str, Node] = {}
        #: node name -> (lease id, mod revision) of its liveness key.
        self.alive: dict[str, tuple[int, int]] = {}
        self.leases: dict[int, Lease] = {}
        self._next_lease = 0x1000
        self.subscribers: list[Callable[[StoreEvent], None]] = []
        #: Requests applied, by operation (for the run's summary).
        self.ops: dict[str, int] = {}
        #: node -> when the store last heard from it (renewal of the lease that expired).
        self.last_renewed: dict[str, float] = {}
        #: Called with a node's name whenever its record is written (invariant 2 looks).
        self.on_node_write: Callable[[str], None] | None = None

    # --- reads --------------------------------------------------------------------------

    def _count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1

    def get_instance(self, name: str) -> Instance | None:
        self._count("get")
        return self.instances.get(name)

    def get_vm(self, name: str) -> VM | None:
        self._count("get")
        return self.vms.get(name)

    def get_node(self, name: str) -> Node | None:
        self._count("get")
        return self.nodes.get(name)

    def list_instances(self) -> tuple[int, list[Instance]]:
        """A range over the instances prefix: sorted by key, at the current revision."""
        self._count("range")
        return self.revision, [self.instances[k] for k in sorted(self.instances)]

    def head(self) -> int:
        self._count("head")
        return self.revision

    # --- writes -------------------------------------------------------------------------

    def _table(self, kind: KindName) -> dict[str, Obj]:
        table: dict[str, Obj]
        if kind == "instances":
            table = self.instances  # type: ignore[assignment]
        elif kind == "vms":
            table = self.vms  # type: ignore[assignment]
        else:
            table = self.nodes  # type: ignore[assignment]
        return table

    def txn(self, writes: Sequence[Write]) -> tuple[bool, int]:
        """Compare every write, then apply them all at one new revision: (succeeded, revision)."""
        self._count("txn")
        for w in writes:
            current = self._table(kind_of(w.obj)).get(w.obj.metadata.name)
            if w.op == "create":
                if current is not None:
                    return False, self.revision
            elif current is None or current.metadata.resource_version != (
                w.obj.metadata.resource_version
            ):
                return False, self.revision
        self.revision += 1
        rev = self.revision
        for w in writes:
            kind = kind_of(w.obj)
            table = self._table(kind)
            name = w.obj.metadata.name
            prev = table.get(name)
            if w.op == "delete":
                del table[name]
                self._emit(StoreEvent(rev, kind, name, None, prev, True))
            else:
                stored = w.obj.with_resource_version(rev)
                table[name] = stored
                self._emit(StoreEvent(rev, kind, name, stored, prev, False))
            if kind == "nodes" and self.on_node_write is not None:
                self.on_node_write(name)
        return True, rev

    def cas(self, obj: Obj, op: Literal["create", "update", "delete"]) -> tuple[bool, int]:
        return self.txn([Write(obj, op)])

    def update(self, obj: Obj) -> Literal["ok", "conflict", "absent"]:
        """store/objects.py ``update``: CAS on the resource_version, saying why it failed."""
        ok, _ = self.txn([Write(obj, "update")])
        if ok:
            return "ok"
        present = obj.metadata.name in self._table(kind_of(obj))
        return "conflict" if present else "absent"

    def _emit(self, event: StoreEvent) -> None:
        for subscriber in self.subscribers:
            subscriber(event)

    # --- leases -------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        self._count("lease_grant")
        self._next_lease += 1
        lease = Lease(self._next_lease, ttl, self.clock.now + ttl, set())
        self.leases[lease.id] = lease
        self._arm(lease)
        return lease.id, ttl

    def lease_keepalive(self, lease_id: int) -> int:
        """The TTL restarts now, when the request reaches the store."""
        self._count("keepalive")
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        lease.expires_at = self.clock.now + lease.ttl
        return lease.ttl

    def lease_revoke(self, lease_id: int) -> None:
        self._count("lease_revoke")
        lease = self.leases.get(lease_id)
        if lease is not None:
            self._expire(lease)

    def put_alive(self, node: str, lease_id: int) -> int:
        """Put ``node``'s liveness key attached to ``lease_id`` (etcd refuses a missing lease)."""
        self._count("put")
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        old = self.alive.get(node)
        if old is not None and old[0] in self.leases:
            self.leases[old[0]].keys.discard(node)
        self.revision += 1
        self.alive[node] = (lease_id, self.revision)
        lease.keys.add(node)
        self._emit(StoreEvent(self.revision, "live", node, None, None, False))
        return self.revision

    def _arm(self, lease: Lease) -> None:
        lease.timer = self.clock.at(lease.expires_at, lambda: self._check_expiry(lease))

    def _check_expiry(self, lease: Lease) -> None:
        if self.leases.get(lease.id) is not lease:
            return
        if lease.expires_at > self.clock.now:
            self._arm(lease)  # kept alive meanwhile: look again when it could end
            return
        self._expire(lease)

    def _expire(self, lease: Lease) -> None:
        del self.leases[lease.id]
        if lease.timer is not None:
            lease.timer.cancel()
        for node in sorted(lease.keys):
            if self.alive.get(node, (0, 0))[0] == lease.id:
                self.last_renewed[node] = min(self.clock.now, lease.expires_at - lease.ttl)
                del self.alive[node]
                self.revision += 1
                self._emit(StoreEvent(self.revision, "live", node, None, None, True))
