"""The node's place in a cluster: which store it opens, its etcd member, and the
membership operations its API needs (:class:`blixard.api.cluster.ClusterOps`).

How ``open_cluster`` finds the store, first match wins:

1. ``<data dir>/cluster.json`` exists: the node formed or joined a cluster
   before. A *member* restarts its etcd member from ``<data dir>/etcd/<id>``
   and opens the store on it (and the other members); an *agent* reconnects
   to the endpoints it knew. No --cluster-init/--join is needed again.
2. ``--cluster-init``: start a new one-member etcd cluster here (member name =
   node id), record the cluster's size target in the store, write cluster.json.
3. ``--join URL``: ``POST URL/v1/cluster/join`` with the join token. The
   answering node either announced our member (``member add``: we start it
   with state "existing" and the member list it returned) or tells us to be an
   agent only, with the etcd client URLs to use. A refusal leaves nothing
   behind: the member is announced only once the token and the name are
   accepted, and our etcd directory exists only once the member starts.
4. Otherwise: the embedded SQLite store, or an external etcd (--etcd-endpoints).

Leaving (``blixard cluster leave``) removes the member through another member,
deletes the node record and the node's admin token, and, once the daemon has
stopped, cluster.json, the join token and the etcd data: a node that left
needs --join (or --cluster-init) again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import structlog
from pydantic import BaseModel, ConfigDict

from blixard.api.auth import TokenAuthority, write_secret_file
from blixard.api.cluster import (
    ClusterRole,
    JoinAnswer,
    JoinRequest,
    LeaveAnswer,
    MemberInfo,
)
from blixard.client.config import token_file
from blixard.client.http import BlixardClient, JoinReply
from blixard.daemon.config import NodeConfig, url_host
from blixard.domain.errors import (
    AlreadyExists,
    BlixardError,
    Conflict,
    NotFound,
    StoreError,
    ValidationError,
)
from blixard.domain.node import Node, NodeRole
from blixard.domain.parse import parse
from blixard.domain.token import TokenRole, Unauthorized
from blixard.store.etcd import EtcdStore, Member
from blixard.store.etcd_member import (
    EtcdMember,
    add_member,
    initial_cluster,
    member_data_dir,
    remove_member,
)
from blixard.store.objects import ObjectStore
from blixard.store.protocol import Compare, Put, StateStore
from blixard.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

CLUSTER_FILE_NAME = "cluster.json"
JOIN_TOKEN_FILE_NAME = "join.token"
#: Cluster-wide settings fixed at --cluster-init (the etcd size target).
SETTINGS_KEY = "/blixard/v1/cluster/settings"
#: How long a join request may take (the answering node may wait for etcd's quorum rule).
JOIN_REQUEST_TIMEOUT_S = 60.0
#: A member membership change is retried while etcd says "unhealthy cluster" (5 s rule).
MEMBERSHIP_TIMEOUT_S = 20.0
#: A (re)started member must see a leader within this time: on a cluster-wide restart
#: the members wait for each other.
MEMBER_START_TIMEOUT_S = 60.0
#: SIGTERM, then SIGKILL after this long (see NodeCluster.close).
MEMBER_STOP_TIMEOUT_S = 3.0


class ClusterError(BlixardError):
    """Forming, joining or re-attaching to the cluster failed (exit 1)."""

    code = "cluster"


def cluster_file(data_dir: Path) -> Path:
    return data_dir / CLUSTER_FILE_NAME


def join_token_file(data_dir: Path) -> Path:
    return data_dir / JOIN_TOKEN_FILE_NAME


class ClusterFile(BaseModel):
    """``<data dir>/cluster.json``: how this node belongs to its cluster."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["member", "agent"]
    node_id: str
    client_url: str | None = None
    peer_url: str | None = None
    #: etcd client URLs known at the last start (a member's own first).
    endpoints: list[str]


def read_cluster_file(data_dir: Path) -> ClusterFile | None:
    path = cluster_file(data_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClusterError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse(ClusterFile, json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ClusterError(
            f"{path} is damaged ({exc}); delete it and start with --join or --cluster-init"
        ) from None


def write_cluster_file(data_dir: Path, record: ClusterFile) -> None:
    write_secret_file(cluster_file(data_dir), record.model_dump_json(indent=2) + "\n")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_member_can_start(config: NodeConfig, member: EtcdMember) -> None:
    """Before announcing a member: the etcd binary exists and its ports are free."""
    if shutil.which(member.binary) is None:
        raise ClusterError(
            f"the etcd binary {member.binary!r} is not on PATH "
            "(Debian: apt-get install etcd-server)"
        )
    for name, port in (
        ("etcd_client_port", config.etcd_client_port),
        ("etcd_peer_port", config.etcd_peer_port),
    ):
        if not _port_free(config.advertise, port):
            raise ClusterError(
                f"{name}: {url_host(config.advertise)}:{port} is already in use "
                f"(give --{name.replace('_', '-')})"
            )


def _client_urls(members: list[Member]) -> list[str]:
    return [url for m in members for url in m.client_urls]


def _own_first(own: str | None, urls: list[str]) -> list[str]:
    rest = [u for u in urls if u != own]
    return [own, *rest] if own else rest


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class NodeCluster:
    """This node's cluster side: the store it opened and the ClusterOps of its API."""

    config: NodeConfig
    role: ClusterRole
    store: StateStore
    description: dict[str, Any]
    etcd: EtcdStore | None = None
    member: EtcdMember | None = None
    #: True once this node left the cluster: close() clears its cluster state.
    left: bool = False
    _shutdown: Callable[[], None] | None = None
    _extra: list[EtcdStore] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- what the daemon reads ----------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def roles(self) -> list[NodeRole]:
        """The node record's roles: every node serves the API and runs workloads."""
        roles = [NodeRole.SERVER, NodeRole.AGENT]
        return [*roles, NodeRole.ETCD] if self.member is not None else roles

    @property
    def join_token_path(self) -> Path | None:
        if self.role == "standalone":
            return None
        return join_token_file(self.config.data_dir)

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        """What ``shutdown()`` calls (run_node: stop the API server, so the node stops)."""
        self._shutdown = callback

    async def ensure_join_token(self, auth: TokenAuthority) -> None:
        """Keep (or create) the cluster's join token in ``<data dir>/join.token`` (0600)."""
        path = self.join_token_path
        if path is not None:
            await auth.ensure_token(path, TokenRole.JOIN, "join token of the cluster")

    # --- ClusterOps -----------------------------------------------------------------------

    async def target_members(self) -> int | None:
        if self.role in {"standalone", "external"}:
            return None
        kv = await self.store.get(SETTINGS_KEY)
        if kv is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                return int(json.loads(kv.value)["etcd_members"])
        return self.config.etcd_members

    async def members(self) -> list[MemberInfo]:
        if self.etcd is None:
            return []
        members = sorted(await self.etcd.member_list(), key=lambda m: (not m.name, m.name, m.id))
        try:
            leader = await self.etcd.leader_id()
        except StoreError:
            leader = 0
        health = await asyncio.gather(*(_member_health(m) for m in members))
        return [
            MemberInfo(
                name=m.name,
                id=f"{m.id:x}",
                peer_urls=m.peer_urls,
                client_urls=m.client_urls,
                leader=m.id == leader,
                healthy=healthy,
                started=bool(m.name),
                learner=m.is_learner,
            )
            for m, healthy in zip(members, health, strict=True)
        ]

    async def admit(self, request: JoinRequest) -> JoinAnswer:
        if self.etcd is None:
            raise Conflict(
                "this node runs the embedded SQLite store: there is no cluster to join "
                "(start the first node with --cluster-init)"
            )
        async with self._lock:  # one join at a time here: the size check holds until the add
            members = await self.etcd.member_list()
            if any(m.name == request.node_id for m in members):
                raise AlreadyExists(
                    f"node {request.node_id} is already a member of the cluster (it holds an "
                    f"etcd member; to join afresh, first: blixard cluster remove-node "
                    f"{request.node_id})"
                )
            if self.role == "external":
                endpoints = list(self.config.etcd_endpoints)
            else:
                endpoints = _client_urls(members)
            target = await self.target_members()
            if (
                self.role == "external"
                or target is None
                or request.peer_url is None
                or len(members) >= target
            ):
                return JoinAnswer(member=False, endpoints=endpoints, target_members=target)
            for m in members:
                label = m.name or f"{m.id:x} (not started)"
                if request.peer_url in m.peer_urls or request.client_url in m.client_urls:
                    raise Conflict(
                        f"the etcd URLs of {request.node_id} are already used by etcd member "
                        f"{label}"
                    )
            new, after = await add_member(self.etcd, request.peer_url, MEMBERSHIP_TIMEOUT_S)
            log.info("etcd member added", node=request.node_id, member=f"{new.id:x}")
            return JoinAnswer(
                member=True,
                member_id=f"{new.id:x}",
                initial_cluster=initial_cluster(after, new.id, request.node_id),
                endpoints=endpoints,
                target_members=target,
            )

    async def remove_member(self, node: str) -> bool:
        if self.etcd is None or self.role == "external":
            return False
        async with self._lock:
            members = await self.etcd.member_list()
            found = next((m for m in members if m.name == node), None)
            if found is None:
                return False
            if len(members) <= 1:
                raise Conflict(f"cannot remove {node}: it holds the last etcd member")
            try:
                await remove_member(self.etcd, found.id, MEMBERSHIP_TIMEOUT_S)
            except ValidationError as exc:  # it went, or became the last, meanwhile
                raise Conflict(f"cannot remove {node}: {exc.reason}") from None
            log.info("etcd member removed", node=node, member=f"{found.id:x}")
            return True

    async def leave(self) -> LeaveAnswer:
        if self.role == "standalone":
            raise Conflict(f"{self.node_id} is not in a cluster: it runs the embedded SQLite store")
        async with self._lock:
            through: StateStore = self.store
            removed_member = False
            if self.member is not None and self.etcd is not None:
                members = await self.etcd.member_list()
                mine = next((m for m in members if m.name == self.node_id), None)
                if mine is not None:
                    if len(members) <= 1:
                        raise Conflict(
                            f"{self.node_id} cannot leave: it holds the last etcd member"
                        )
                    others = [u for m in members if m.id != mine.id for u in m.client_urls]
                    if not others:
                        raise Conflict(
                            f"{self.node_id} cannot leave: no other etcd member has started "
                            "to leave through"
                        )
                    other = EtcdStore(others, timeout_s=self.config.store_timeout_s)
                    self._extra.append(other)
                    try:
                        await remove_member(other, mine.id, MEMBERSHIP_TIMEOUT_S)
                    except ValidationError as exc:
                        raise Conflict(f"{self.node_id} cannot leave: {exc.reason}") from None
                    removed_member, through = True, other
            # From here on the node is out: whatever else fails, it stops and forgets.
            self.left = True
            removed_record = await self._forget_node(ObjectStore(through))
            return LeaveAnswer(
                node=self.node_id, removed_member=removed_member, removed_record=removed_record
            )

    async def _forget_node(self, objects: ObjectStore) -> bool:
        """Delete this node's record and its admin token (the store keeps the others')."""
        removed = False
        try:
            for _ in range(10):
                node = await objects.find(Node, self.node_id)
                if node is None:
                    break
                try:
                    await objects.delete(node)
                    removed = True
                    break
                except Conflict:
                    continue
            admin = token_file(self.config.data_dir)
            with contextlib.suppress(OSError):
                await TokenAuthority(objects).revoke_text(admin.read_text(encoding="utf-8"))
        except BlixardError as exc:
            log.warning("leaving: could not delete the node record or token", error=str(exc))
        return removed

    def shutdown(self) -> None:
        if self._shutdown is not None:
            self._shutdown()

    # --- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """After the store is closed: stop the member; after a leave, forget the cluster."""
        for extra in self._extra:
            with contextlib.suppress(Exception):
                await extra.close()
        if self.member is not None:
            # A stopping leader hands leadership over first: milliseconds in a healthy
            # cluster, but etcd waits ~7 s when the other members are stopping too (a
            # whole-cluster stop). Its data is on disk either way.
            await asyncio.to_thread(self.member.stop, MEMBER_STOP_TIMEOUT_S)
        if self.left:
            data_dir = self.config.data_dir
            _remove_tree(data_dir / "etcd")
            for path in (
                cluster_file(data_dir),
                join_token_file(data_dir),
                token_file(data_dir),
            ):
                path.unlink(missing_ok=True)
            log.info("left the cluster: cluster.json, join token and etcd data removed")


async def _member_health(member: Member) -> bool | None:
    urls = [u for u in member.client_urls if u.startswith("http://")]
    if not urls:
        return None
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            resp = await client.get(urls[0] + "/health")
        return resp.status_code == 200 and resp.json().get("health") == "true"
    except (httpx.HTTPError, ValueError):
        return False


# ------------------------------------------------------------------------------ opening


async def open_cluster(config: NodeConfig) -> NodeCluster:
    """The store this node runs on, with its cluster side (see the module docstring)."""
    record = read_cluster_file(config.data_dir)
    if record is not None:
        if config.etcd_endpoints:
            raise ValidationError(
                "etcd_endpoints",
                f"this data dir belongs to a cluster this node formed or joined "
                f"({cluster_file(config.data_dir)}); start it without --etcd-endpoints",
            )
        if config.cluster_init or config.join:
            log.info("already in a cluster (cluster.json): --cluster-init/--join ignored")
        return await _reattach(config, record)
    if config.cluster_init:
        return await _init(config)
    if config.join is not None:
        return await _join(config)
    if config.store == "etcd":
        if not config.etcd_endpoints:
            raise ValidationError("etcd_endpoints", "the etcd store needs at least one endpoint")
        etcd = EtcdStore(config.etcd_endpoints, timeout_s=config.store_timeout_s)
        description = {"backend": "etcd", "endpoints": config.etcd_endpoints, "role": "external"}
        return NodeCluster(config, "external", etcd, description, etcd=etcd)
    sqlite = await SqliteStore.open(config.sqlite_path, timeout_s=config.store_timeout_s)
    return NodeCluster(
        config, "standalone", sqlite, {"backend": "sqlite", "path": str(config.sqlite_path)}
    )


def _member(config: NodeConfig, client_url: str, peer_url: str) -> EtcdMember:
    return EtcdMember(
        name=config.node_id,
        data_dir=member_data_dir(config.data_dir, config.node_id),
        client_url=client_url,
        peer_url=peer_url,
    )


def _etcd_cluster(
    config: NodeConfig, role: ClusterRole, endpoints: list[str], member: EtcdMember | None
) -> NodeCluster:
    etcd = EtcdStore(endpoints, timeout_s=config.store_timeout_s)
    description = {"backend": "etcd", "endpoints": endpoints, "role": role}
    return NodeCluster(config, role, etcd, description, etcd=etcd, member=member)


async def _start_or_clean(member: EtcdMember, etcd_dir: Path, start: Awaitable[None]) -> None:
    """Run ``start``; on failure stop the member and remove the etcd dir if we made it."""
    existed = etcd_dir.exists()
    try:
        await start
    except BaseException:
        await asyncio.to_thread(member.stop)
        if not existed:
            _remove_tree(etcd_dir)
        raise


async def _init(config: NodeConfig) -> NodeCluster:
    member = _member(config, config.etcd_client_url, config.etcd_peer_url)
    if not member.has_data():
        _check_member_can_start(config, member)
    try:
        await _start_or_clean(
            member,
            config.data_dir / "etcd",
            member.start_new_cluster(timeout_s=MEMBER_START_TIMEOUT_S),
        )
    except StoreError as exc:
        raise ClusterError(f"cannot start the cluster's first etcd member: {exc}") from None
    cluster = _etcd_cluster(config, "member", [member.client_url], member)
    try:
        settings = json.dumps({"etcd_members": config.etcd_members}).encode()
        await cluster.store.txn([Compare.absent(SETTINGS_KEY)], [Put(SETTINGS_KEY, settings)])
        write_cluster_file(
            config.data_dir,
            ClusterFile(
                role="member",
                node_id=config.node_id,
                client_url=member.client_url,
                peer_url=member.peer_url,
                endpoints=[member.client_url],
            ),
        )
    except BaseException:
        await cluster.store.close()
        await asyncio.to_thread(member.stop)
        raise
    log.info("new cluster started", node=config.node_id, etcd=member.client_url)
    return cluster


def _ask_to_join(url: str, token: str, config: NodeConfig) -> JoinReply:
    """``POST <url>/v1/cluster/join`` (blocking: run in a thread)."""
    with BlixardClient(url, token, timeout_s=JOIN_REQUEST_TIMEOUT_S) as client:
        return client.join_cluster(config.node_id, config.etcd_peer_url, config.etcd_client_url)


async def _join(config: NodeConfig) -> NodeCluster:
    url, token = config.join, (config.join_token or "").strip()
    assert url is not None and token  # load_config requires a token with --join
    member = _member(config, config.etcd_client_url, config.etcd_peer_url)
    if member.has_data():
        raise ClusterError(
            f"cannot join {url}: {member.data_dir} holds etcd data of an earlier cluster "
            "(without its cluster.json); remove it to join afresh"
        )
    _check_member_can_start(config, member)
    try:
        answer = await asyncio.to_thread(_ask_to_join, url, token, config)
    except Unauthorized:
        raise ClusterError(f"cannot join {url}: the join token was refused") from None
    except BlixardError as exc:  # 409 (name taken, no cluster), unreachable, ...
        raise ClusterError(f"cannot join {url}: {exc}") from None
    if answer.member:
        try:
            await _start_or_clean(
                member,
                config.data_dir / "etcd",
                member.start_joined(answer.initial_cluster, timeout_s=MEMBER_START_TIMEOUT_S),
            )
        except (StoreError, ValidationError) as exc:
            await _withdraw(answer)
            raise ClusterError(
                f"cannot join {url}: this node's etcd member did not start: {exc}"
            ) from None
        endpoints = _own_first(member.client_url, answer.endpoints)
        record = ClusterFile(
            role="member",
            node_id=config.node_id,
            client_url=member.client_url,
            peer_url=member.peer_url,
            endpoints=endpoints,
        )
        cluster = _etcd_cluster(config, "member", endpoints, member)
    else:
        if not answer.endpoints:
            raise ClusterError(f"cannot join {url}: it named no etcd endpoint to use")
        record = ClusterFile(role="agent", node_id=config.node_id, endpoints=answer.endpoints)
        cluster = _etcd_cluster(config, "agent", list(answer.endpoints), None)
    write_cluster_file(config.data_dir, record)
    write_secret_file(join_token_file(config.data_dir), token + "\n")
    log.info(
        "joined the cluster",
        node=config.node_id,
        through=url,
        role=record.role,
        endpoints=record.endpoints,
    )
    return cluster


async def _withdraw(answer: JoinReply) -> None:
    """Best effort: take back the member announced for us when it could not start."""
    if not answer.member_id or not answer.endpoints:
        return
    store = EtcdStore(answer.endpoints, timeout_s=5.0)
    try:
        await store.member_remove(int(answer.member_id, 16))
        log.info("withdrew the etcd member announced for this node", member=answer.member_id)
    except (StoreError, NotFound, ValueError) as exc:
        log.error(
            "the cluster counts an etcd member for this node that never started; remove it "
            "with `etcdctl member remove`",
            member=answer.member_id,
            error=str(exc),
        )
    finally:
        await store.close()


async def _reattach(config: NodeConfig, record: ClusterFile) -> NodeCluster:
    if record.node_id != config.node_id:
        raise ValidationError(
            "node_id",
            f"this data dir belongs to node {record.node_id} of its cluster "
            f"({cluster_file(config.data_dir)}); start it with --node-id {record.node_id}",
        )
    member = None
    if record.role == "member":
        if record.client_url is None or record.peer_url is None:
            raise ClusterError(f"{cluster_file(config.data_dir)} names no etcd URLs for a member")
        member = _member(config, record.client_url, record.peer_url)
        if not member.has_data():
            raise ClusterError(
                f"{cluster_file(config.data_dir)} says this node holds an etcd member, but "
                f"{member.data_dir} has no member data; delete cluster.json and start with --join"
            )
        try:
            await member.restart(timeout_s=MEMBER_START_TIMEOUT_S)
        except StoreError as exc:
            await asyncio.to_thread(member.stop)
            raise ClusterError(
                f"this node's etcd member did not restart: {exc}. If it was removed from the "
                f"cluster (blixard cluster remove-node), delete {cluster_file(config.data_dir)} "
                f"and {config.data_dir / 'etcd'} and start with --join"
            ) from None
    endpoints = _own_first(record.client_url, record.endpoints)
    try:  # learn the members that joined since the last start
        probe = EtcdStore(endpoints, timeout_s=config.store_timeout_s)
        try:
            known = _own_first(record.client_url, _client_urls(await probe.member_list()))
        finally:
            await probe.close()
        if known and known != record.endpoints:
            write_cluster_file(config.data_dir, record.model_copy(update={"endpoints": known}))
            endpoints = known
    except StoreError as exc:
        log.warning("could not refresh the etcd endpoints", error=str(exc))
    log.info("re-attached to the cluster", node=config.node_id, role=record.role)
    return _etcd_cluster(config, record.role, endpoints, member)
