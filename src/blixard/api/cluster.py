"""The cluster routes: joining, membership, and taking nodes out of service.

``/v1/cluster/...`` answers ``blixard cluster status|nodes|cordon|uncordon|
drain|remove-node|leave|join-token`` and the join request a starting node
sends (``blixard node start --join URL``).

What the API cannot do by itself is injected as :class:`ClusterOps`: etcd
membership (member list/add/remove, health of each member), where this node
keeps its join token, and stopping this node's daemon after it left. The
daemon implements it over its supervised etcd member; without one (the
embedded SQLite store) :class:`NoCluster` answers that there is no cluster.

The bearer middleware lets a join token reach the join route and nothing else;
the route itself admits only join and admin tokens. Everything else here needs
an admin token. A joining node reports any 401 as "the join token was refused".
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from blixard.api.auth import TokenAuthority
from blixard.api.errors import COMMON_ERRORS, ErrorResponse
from blixard.api.reads import live_nodes, stored
from blixard.api.vms import checked_name
from blixard.domain.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
    StoreError,
    ValidationError,
)
from blixard.domain.fields import Name
from blixard.domain.instance import Instance
from blixard.domain.keys import node_lease_key
from blixard.domain.node import ApiUrl, Node
from blixard.domain.parse import ROOT_FIELD, parse
from blixard.domain.token import TokenRole, Unauthorized
from blixard.store.election import ELECTION_PREFIX
from blixard.store.objects import ObjectStore

log = structlog.get_logger(__name__)

#: The election whose key names the node running the controllers (daemon/node.py).
CONTROLLERS_ELECTION = "controllers"
_MAX_JOIN_BODY = 16 * 1024

ClusterRole = Literal["standalone", "external", "member", "agent"]


# --------------------------------------------------------------------------- shapes


class JoinRequest(BaseModel):
    """What a joining node sends: its name, and its etcd URLs if it can hold a member."""

    model_config = ConfigDict(extra="forbid")

    node_id: Name
    #: Absent: the node only wants to be an agent (e.g. it has no etcd binary).
    peer_url: ApiUrl | None = None
    client_url: ApiUrl | None = None


class JoinAnswer(BaseModel):
    """``member``: start an etcd member with ``initial_cluster`` (state "existing");
    otherwise use ``endpoints`` as an etcd client (an agent-only node)."""

    member: bool
    member_id: str | None = None
    initial_cluster: dict[str, str] = Field(default_factory=dict)
    endpoints: list[str]
    target_members: int | None = None


class MemberInfo(BaseModel):
    """One etcd member, as the cluster lists it and as its own /health answers."""

    name: str
    id: str
    peer_urls: list[str]
    client_urls: list[str]
    leader: bool = False
    #: None when it could not be asked (no client URL yet: announced, not started).
    healthy: bool | None = None
    started: bool = True
    learner: bool = False


class NodeCounts(BaseModel):
    total: int = 0
    alive: int = 0
    down: int = 0
    cordoned: int = 0
    draining: int = 0


class ThisNode(BaseModel):
    name: str
    role: ClusterRole


class ClusterStatus(BaseModel):
    """``GET /v1/cluster``."""

    backend: str
    store: dict[str, Any]
    #: True when Blixard supervises the etcd members (--cluster-init/--join).
    managed: bool
    target_members: int | None = None
    members: list[MemberInfo]
    nodes: NodeCounts
    controller_leader: str | None = None
    this_node: ThisNode
    #: This node's join token (admins only reach this route), when it has one.
    join_token: str | None = None


class ClusterNode(BaseModel):
    """A node record, its liveness and how many instances are assigned to it."""

    node: Node
    alive: bool
    instances: int


class ClusterNodeList(BaseModel):
    items: list[ClusterNode]


class DrainAnswer(BaseModel):
    node: Node
    #: Instances still assigned to the node when the drain was recorded.
    instances: int


class RemoveAnswer(BaseModel):
    node: str
    removed_member: bool
    removed_record: bool


class LeaveAnswer(BaseModel):
    node: str
    removed_member: bool
    removed_record: bool
    stopping: bool = True


class JoinTokenAnswer(BaseModel):
    token: str
    path: str | None = None


# --------------------------------------------------------------------------- injected


class ClusterOps(Protocol):
    """What the daemon does for the cluster routes (etcd membership, its own shutdown)."""

    @property
    def role(self) -> ClusterRole: ...

    @property
    def join_token_path(self) -> Path | None:
        """Where this node keeps the cluster's join token; None without a cluster."""
        ...

    async def members(self) -> list[MemberInfo]:
        """The etcd members with leader and health marked; [] without etcd."""
        ...

    async def target_members(self) -> int | None: ...

    async def admit(self, request: JoinRequest) -> JoinAnswer:
        """Add the joining node's etcd member if the cluster is below its size, or not.

        AlreadyExists when a member of that name exists; Conflict when this node
        cannot admit nodes (no cluster).
        """
        ...

    async def remove_member(self, node: str) -> bool:
        """Remove the etcd member named ``node``; False if there is none.

        Conflict when it is the last member.
        """
        ...

    async def leave(self) -> LeaveAnswer:
        """This node leaves: its member (if any) removed through another member, then
        its node record and admin token deleted. Conflict when it holds the last member."""
        ...

    def shutdown(self) -> None:
        """Stop this node's daemon (after it left), cleanly."""
        ...


class NoCluster:
    """The cluster side of a node on the embedded SQLite store: there is none."""

    role: ClusterRole = "standalone"
    join_token_path: Path | None = None

    def __init__(self, node_id: str = "") -> None:
        self.node_id = node_id

    async def members(self) -> list[MemberInfo]:
        return []

    async def target_members(self) -> int | None:
        return None

    async def admit(self, request: JoinRequest) -> JoinAnswer:
        raise Conflict(
            "this node runs the embedded SQLite store: there is no cluster to join "
            "(start the first node with --cluster-init)"
        )

    async def remove_member(self, node: str) -> bool:
        return False

    async def leave(self) -> LeaveAnswer:
        raise Conflict(
            f"{self.node_id or 'this node'} is not in a cluster: it runs the embedded SQLite store"
        )

    def shutdown(self) -> None:
        return None


# --------------------------------------------------------------------------- helpers


async def _read_small_json(request: Request) -> Any:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_JOIN_BODY:
            raise ValidationError(ROOT_FIELD, f"the request body exceeds {_MAX_JOIN_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ValidationError(ROOT_FIELD, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValidationError(ROOT_FIELD, "the request body is not valid JSON") from None


def assigned_counts(instances: list[Instance]) -> Counter[str]:
    """How many instances are assigned to each node."""
    return Counter(i.spec.node for i in instances if i.spec.node is not None)


def schedulable_others(nodes: list[Node], alive: set[str], name: str) -> list[str]:
    """Alive, uncordoned nodes other than ``name``: where a drained node's work can go."""
    return [
        n.metadata.name
        for n in nodes
        if n.metadata.name != name and n.metadata.name in alive and not n.spec.cordoned
    ]


def _set_flags(**flags: bool) -> Any:
    def change(node: Node) -> Node:
        return node.model_copy(update={"spec": node.spec.model_copy(update=flags)})

    return change


# --------------------------------------------------------------------------- routes


def cluster_router(
    objects: ObjectStore,
    ops: ClusterOps,
    auth: TokenAuthority,
    *,
    node_id: str,
    store_description: dict[str, Any],
) -> APIRouter:
    """The routes under ``/v1/cluster``."""
    router = APIRouter(prefix="/v1/cluster", tags=["cluster"], responses={**COMMON_ERRORS})
    conflict: dict[int | str, dict[str, Any]] = {
        409: {"model": ErrorResponse, "description": "Refused: the message says why"}
    }
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorResponse, "description": "No such node"}
    }

    async def node_or_404(name: str) -> Node:
        return await stored(objects.get(Node, checked_name(name)))

    async def instances() -> list[Instance]:
        return await stored(objects.list(Instance))

    @router.post(
        "/join",
        response_model=JoinAnswer,
        summary="Admit a node (join token or admin token)",
        responses={**conflict},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JoinRequest.model_json_schema()}},
            }
        },
    )
    async def join(request: Request) -> JoinAnswer:
        """Answers whether the node becomes an etcd member, and how to reach etcd."""
        token = request.scope.get("state", {}).get("token")  # set by the bearer middleware
        if token is None or token.spec.role not in {TokenRole.JOIN, TokenRole.ADMIN}:
            role = token.spec.role if token is not None else "missing"
            raise Unauthorized(f"the join token was refused (a {role} token cannot join nodes)")
        req = parse(JoinRequest, await _read_small_json(request))
        if (req.peer_url is None) != (req.client_url is None):
            raise ValidationError("peer_url", "peer_url and client_url go together")
        if await objects.store.get(node_lease_key(req.node_id)) is not None:
            raise AlreadyExists(
                f"node {req.node_id} is already a member of the cluster "
                "(it is alive: its liveness key is present)"
            )
        answer = await ops.admit(req)
        log.info("node admitted", node=req.node_id, member=answer.member, by=node_id)
        return answer

    @router.get("", response_model=ClusterStatus, summary="The cluster: store, members, nodes")
    async def status() -> ClusterStatus:
        nodes = await stored(objects.list(Node))
        alive = await live_nodes(objects)
        counts = NodeCounts(
            total=len(nodes),
            alive=sum(1 for n in nodes if n.metadata.name in alive),
            down=sum(1 for n in nodes if n.metadata.name not in alive),
            cordoned=sum(1 for n in nodes if n.spec.cordoned),
            draining=sum(1 for n in nodes if n.spec.draining),
        )
        leader_kv = await objects.store.get(ELECTION_PREFIX + CONTROLLERS_ELECTION)
        token_path = ops.join_token_path
        join_token = None
        if token_path is not None:
            try:
                join_token = token_path.read_text(encoding="utf-8").strip() or None
            except OSError:
                join_token = None
        role = ops.role
        return ClusterStatus(
            backend=str(store_description.get("backend", "unknown")),
            store=dict(store_description),
            managed=role in {"member", "agent"},
            target_members=await ops.target_members(),
            members=await ops.members(),
            nodes=counts,
            controller_leader=leader_kv.value.decode() if leader_kv is not None else None,
            this_node=ThisNode(name=node_id, role=role),
            join_token=join_token,
        )

    @router.get("/nodes", response_model=ClusterNodeList, summary="Every node, with its load")
    async def nodes() -> ClusterNodeList:
        records = await stored(objects.list(Node))
        alive = await live_nodes(objects)
        counts = assigned_counts(await instances())
        return ClusterNodeList(
            items=[
                ClusterNode(
                    node=n,
                    alive=n.metadata.name in alive,
                    instances=counts.get(n.metadata.name, 0),
                )
                for n in records
            ]
        )

    async def details(node: Node) -> ClusterNode:
        counts = assigned_counts(await instances())
        alive = await live_nodes(objects)
        name = node.metadata.name
        return ClusterNode(node=node, alive=name in alive, instances=counts.get(name, 0))

    @router.post(
        "/nodes/{name}/cordon",
        response_model=ClusterNode,
        summary="Place nothing new on a node",
        responses={**not_found},
    )
    async def cordon(name: str) -> ClusterNode:
        await node_or_404(name)
        node = await objects.modify(Node, name, _set_flags(cordoned=True))
        log.info("node cordoned", node=name)
        return await details(node)

    @router.post(
        "/nodes/{name}/uncordon",
        response_model=ClusterNode,
        summary="Schedule on a node again (ends a drain)",
        responses={**not_found},
    )
    async def uncordon(name: str) -> ClusterNode:
        await node_or_404(name)
        node = await objects.modify(Node, name, _set_flags(cordoned=False, draining=False))
        log.info("node uncordoned", node=name)
        return await details(node)

    @router.post(
        "/nodes/{name}/drain",
        response_model=DrainAnswer,
        summary="Cordon a node and move its instances away",
        responses={**not_found, **conflict},
    )
    async def drain(name: str) -> DrainAnswer:
        await node_or_404(name)
        assigned = assigned_counts(await instances()).get(name, 0)
        if assigned:
            records = await stored(objects.list(Node))
            alive = await live_nodes(objects)
            if not schedulable_others(records, alive, name):
                raise Conflict(
                    f"cannot drain {name}: no other schedulable node to take its "
                    f"{assigned} instance(s); nothing was changed"
                )
        node = await objects.modify(Node, name, _set_flags(cordoned=True, draining=True))
        log.info("node draining", node=name, instances=assigned)
        return DrainAnswer(node=node, instances=assigned)

    @router.delete(
        "/nodes/{name}",
        response_model=RemoveAnswer,
        summary="Remove a node that is down (its etcd member, then its record)",
        responses={**not_found, **conflict},
    )
    async def remove_node(name: str, force: bool = False) -> RemoveAnswer:
        checked_name(name)
        record = await stored(objects.find(Node, name))
        # Only members Blixard runs are named after nodes (an external etcd's are not).
        members = await ops.members() if ops.role in {"member", "agent"} else []
        is_member = any(m.name == name for m in members)
        if record is None and not is_member:
            raise NotFound(f"node {name!r} does not exist")
        if is_member and len(members) <= 1:
            raise Conflict(f"cannot remove {name}: it holds the last etcd member")
        if name == node_id:
            raise Conflict(
                f"cannot remove {name}: it is the node answering this request; "
                f"to take it out, run `blixard cluster leave` against its API"
            )
        liveness = await objects.store.get(node_lease_key(name))
        if liveness is not None and not force:
            raise Conflict(
                f"cannot remove {name}: it is alive (its liveness key is present); stop it "
                "first, drain it and run `blixard cluster leave` on it, or use --force"
            )
        removed_member = await ops.remove_member(name) if is_member else False
        removed_record = False
        if record is not None:
            await _delete_node(objects, name)
            removed_record = True
        if liveness is not None and liveness.lease:
            # --force on a live node: its liveness goes with the record, at once.
            try:
                await objects.store.lease_revoke(liveness.lease)
            except StoreError as exc:
                log.warning("could not revoke the removed node's lease", error=str(exc))
        log.info("node removed", node=name, member=removed_member, forced=force)
        return RemoveAnswer(node=name, removed_member=removed_member, removed_record=removed_record)

    @router.post(
        "/leave",
        response_model=LeaveAnswer,
        summary="This node leaves the cluster, then its daemon stops",
        responses={**conflict},
    )
    async def leave() -> JSONResponse:
        assigned = assigned_counts(await instances()).get(node_id, 0)
        if assigned:
            raise Conflict(
                f"{node_id} still has {assigned} instance(s) assigned; "
                f"drain it first: blixard cluster drain {node_id}"
            )
        answer = await ops.leave()
        log.info("node left the cluster; stopping", node=node_id, member=answer.removed_member)
        # The answer goes out first; then the daemon stops (uvicorn finishes the response).
        return JSONResponse(answer.model_dump(mode="json"), background=BackgroundTask(ops.shutdown))

    @router.post(
        "/join-token",
        response_model=JoinTokenAnswer,
        summary="The cluster's join token, as this node keeps it (created if missing)",
        responses={**conflict},
    )
    async def join_token() -> JoinTokenAnswer:
        path = ops.join_token_path
        if path is None:
            raise Conflict(
                "this node runs the embedded SQLite store: there is no cluster to join, "
                "so there is no join token (start the first node with --cluster-init)"
            )
        text = await auth.ensure_token(path, TokenRole.JOIN, "join token of the cluster")
        return JoinTokenAnswer(token=text, path=str(path))

    return router


async def _delete_node(objects: ObjectStore, name: str, attempts: int = 10) -> None:
    """Delete a node record with CAS, retrying when it changed between read and delete."""
    for _ in range(attempts):
        node = await objects.find(Node, name)
        if node is None:
            return
        try:
            await objects.delete(node)
            return
        except Conflict:
            continue
    raise Conflict(f"node {name!r} kept changing under {attempts} attempts to delete it")
