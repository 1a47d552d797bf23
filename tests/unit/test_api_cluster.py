"""The cluster routes against a real SQLite store, with etcd membership faked.

What is checked here needs no daemon: who may join, how a join request is
validated, and that every refusal (alive duplicate, last member, only node
with instances, instances still assigned) changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from blixard.api.app import create_app
from blixard.api.auth import TokenAuthority
from blixard.api.cluster import (
    ClusterRole,
    JoinAnswer,
    JoinRequest,
    LeaveAnswer,
    MemberInfo,
)
from blixard.domain.errors import Conflict
from blixard.domain.instance import Instance, InstanceSpec
from blixard.domain.keys import node_lease_key
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec
from blixard.domain.token import TokenRole
from blixard.store.election import ELECTION_PREFIX
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore
from tests.unit.test_api_fixtures import IMAGES, LogBook

NODE = "n1"


@dataclass
class FakeOps:
    """etcd membership as a list of names; records what the routes asked."""

    token_dir: Path
    member_names: list[str] = field(default_factory=lambda: [NODE])
    target: int = 3
    role: ClusterRole = "member"
    admitted: list[JoinRequest] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    left: int = 0
    stopped: int = 0

    @property
    def join_token_path(self) -> Path | None:
        return self.token_dir / "join.token"

    async def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                name=n,
                id=f"{i + 1:x}",
                peer_urls=[f"http://127.0.0.1:{2380 + 10 * i}"],
                client_urls=[f"http://127.0.0.1:{2379 + 10 * i}"],
                leader=i == 0,
                healthy=True,
            )
            for i, n in enumerate(self.member_names)
        ]

    async def target_members(self) -> int | None:
        return self.target

    async def admit(self, request: JoinRequest) -> JoinAnswer:
        self.admitted.append(request)
        endpoints = [m.client_urls[0] for m in await self.members()]
        if request.peer_url is None or len(self.member_names) >= self.target:
            return JoinAnswer(member=False, endpoints=endpoints, target_members=self.target)
        self.member_names.append(request.node_id)
        return JoinAnswer(
            member=True,
            member_id="ff",
            initial_cluster={request.node_id: request.peer_url},
            endpoints=endpoints,
            target_members=self.target,
        )

    async def remove_member(self, node: str) -> bool:
        if node not in self.member_names:
            return False
        if len(self.member_names) <= 1:
            raise Conflict(f"cannot remove {node}: it holds the last etcd member")
        self.member_names.remove(node)
        self.removed.append(node)
        return True

    async def leave(self) -> LeaveAnswer:
        if self.member_names == [NODE]:
            raise Conflict(f"{NODE} cannot leave: it holds the last etcd member")
        self.left += 1
        return LeaveAnswer(node=NODE, removed_member=True, removed_record=True)

    def shutdown(self) -> None:
        self.stopped += 1


@dataclass
class Cluster:
    client: httpx.AsyncClient
    store: SqliteStore
    objects: ObjectStore
    auth: TokenAuthority
    admin: str
    ops: FakeOps

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.admin}"}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def add_node(self, name: str, *, alive: bool = True, cordoned: bool = False) -> None:
        await self.objects.create(
            Node(metadata=ObjectMeta(name=name), spec=NodeSpec(cordoned=cordoned))
        )
        if alive:
            lease = await self.store.lease_grant(60)
            await self.store.put(node_lease_key(name), name.encode(), lease=lease.id)

    async def add_instance(self, vm: str, index: int, node: str) -> None:
        await self.objects.create(
            Instance(
                metadata=ObjectMeta(name=f"{vm}-{index}"),
                spec=InstanceSpec(vm=vm, index=index, node=node, epoch=1),
            )
        )

    async def node(self, name: str) -> Node | None:
        return await self.objects.find(Node, name)


async def _serve(tmp_path: Path, ops: FakeOps | None) -> AsyncIterator[Cluster]:
    store = await SqliteStore.open(tmp_path / "state.db", timeout_s=2.0)
    objects = ObjectStore(store)
    auth = TokenAuthority(objects)
    admin = await auth.ensure_admin_token(tmp_path / "admin.token")
    app = create_app(
        store,
        node_id=NODE,
        store_description={"backend": "etcd", "endpoints": ["http://127.0.0.1:2379"]},
        registered=lambda: True,
        auth=auth,
        logs=LogBook(),
        image_exists=lambda name: name in IMAGES,
        known_images=lambda: list(IMAGES),
        cluster=ops,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://blixard.test") as client:
        yield Cluster(client, store, objects, auth, admin, ops or FakeOps(tmp_path))
    await store.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in _serve(tmp_path, FakeOps(tmp_path)):
        yield c


@pytest.fixture
async def standalone(tmp_path: Path) -> AsyncIterator[Cluster]:
    """create_app without cluster ops: a node on the embedded store."""
    async for c in _serve(tmp_path, None):
        yield c


JOIN_BODY = {
    "node_id": "n2",
    "peer_url": "http://127.0.0.1:2390",
    "client_url": "http://127.0.0.1:2389",
}


# ------------------------------------------------------------------------------ join


async def test_join_token_admits_a_member_while_the_cluster_is_small(cluster: Cluster) -> None:
    join = await cluster.auth.ensure_token(
        cluster.ops.token_dir / "join.token", TokenRole.JOIN, "join"
    )
    resp = await cluster.call("POST", "/v1/cluster/join", token=join, json=JOIN_BODY)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["member"] is True and body["initial_cluster"] == {"n2": JOIN_BODY["peer_url"]}
    assert body["endpoints"] == ["http://127.0.0.1:2379"]
    assert [r.node_id for r in cluster.ops.admitted] == ["n2"]


async def test_join_past_the_target_is_agent_only(cluster: Cluster) -> None:
    cluster.ops.member_names = ["n1", "n2", "n3"]
    resp = await cluster.call("POST", "/v1/cluster/join", json={**JOIN_BODY, "node_id": "n4"})
    assert resp.status_code == 200 and resp.json()["member"] is False
    assert len(resp.json()["endpoints"]) == 3
    assert cluster.ops.member_names == ["n1", "n2", "n3"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing bearer token"),
        ("blx_abcdef012345_" + "x" * 43, "invalid token"),
        ("not-a-token", "invalid token"),
    ],
)
async def test_join_with_a_wrong_token_is_401_and_admits_nothing(
    cluster: Cluster, token: str | None, reason: str
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await cluster.client.post("/v1/cluster/join", json=JOIN_BODY, headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"] == {"code": "unauthorized", "message": reason}
    assert cluster.ops.admitted == [] and cluster.ops.member_names == [NODE]


async def test_a_join_token_opens_no_other_route(cluster: Cluster) -> None:
    join = await cluster.auth.ensure_token(
        cluster.ops.token_dir / "join.token", TokenRole.JOIN, "join"
    )
    for method, path in [
        ("GET", "/v1/cluster"),
        ("GET", "/v1/vms"),
        ("POST", "/v1/cluster/join-token"),
        ("DELETE", "/v1/cluster/nodes/n1"),
    ]:
        resp = await cluster.call(method, path, token=join)
        assert resp.status_code == 401, path
        assert "a join token may only call /v1/cluster/join" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"node_id": "Bad_Name"}, "node_id"),
        ({}, "node_id"),
        ({"node_id": "n2", "peer_url": "127.0.0.1:2380", "client_url": "http://a:1"}, "peer_url"),
        ({"node_id": "n2", "peer_url": "http://127.0.0.1:2380"}, "peer_url"),
        ({"node_id": "n2", "extra": 1}, "extra"),
        ([1, 2], "(root)"),
    ],
)
async def test_bad_join_requests_name_the_field(cluster: Cluster, body: Any, field: str) -> None:
    resp = await cluster.call("POST", "/v1/cluster/join", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == field
    assert cluster.ops.admitted == []


async def test_malformed_json_is_400(cluster: Cluster) -> None:
    resp = await cluster.call("POST", "/v1/cluster/join", content=b"{nope")
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


async def test_an_alive_node_cannot_join_twice(cluster: Cluster) -> None:
    await cluster.add_node("n2", alive=True)
    resp = await cluster.call("POST", "/v1/cluster/join", json=JOIN_BODY)
    assert resp.status_code == 409
    assert "node n2 is already a member of the cluster" in resp.json()["error"]["message"]
    assert cluster.ops.admitted == []


async def test_a_dead_agent_may_join_again_under_its_name(cluster: Cluster) -> None:
    await cluster.add_node("n2", alive=False)
    resp = await cluster.call("POST", "/v1/cluster/join", json=JOIN_BODY)
    assert resp.status_code == 200 and resp.json()["member"] is True


async def test_there_is_no_cluster_to_join_on_the_embedded_store(standalone: Cluster) -> None:
    resp = await standalone.call("POST", "/v1/cluster/join", json=JOIN_BODY)
    assert resp.status_code == 409
    assert "embedded SQLite store: there is no cluster to join" in resp.json()["error"]["message"]
    token = await standalone.call("POST", "/v1/cluster/join-token")
    assert token.status_code == 409 and "no join token" in token.json()["error"]["message"]


# ------------------------------------------------------------------------------ reads


async def test_status_counts_nodes_and_names_the_leader(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    await cluster.add_node("n2", alive=False, cordoned=True)
    await cluster.store.put(ELECTION_PREFIX + "controllers", b"n1")
    (cluster.ops.token_dir / "join.token").write_text("blx_x_y\n")
    resp = await cluster.call("GET", "/v1/cluster")
    assert resp.status_code == 200
    body = resp.json()
    assert body["backend"] == "etcd" and body["managed"] is True and body["target_members"] == 3
    assert body["nodes"] == {"total": 2, "alive": 1, "down": 1, "cordoned": 1, "draining": 0}
    assert body["controller_leader"] == "n1"
    assert body["this_node"] == {"name": "n1", "role": "member"}
    assert body["join_token"] == "blx_x_y"
    assert [(m["name"], m["leader"]) for m in body["members"]] == [("n1", True)]


async def test_status_without_a_cluster(standalone: Cluster) -> None:
    body = (await standalone.call("GET", "/v1/cluster")).json()
    assert body["members"] == [] and body["managed"] is False and body["join_token"] is None
    assert body["this_node"]["role"] == "standalone"


async def test_nodes_carry_liveness_and_instance_counts(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    await cluster.add_node("n2", alive=False)
    await cluster.add_instance("web", 0, "n1")
    await cluster.add_instance("web", 1, "n1")
    await cluster.add_instance("db", 0, "n2")
    items = (await cluster.call("GET", "/v1/cluster/nodes")).json()["items"]
    assert [(i["node"]["metadata"]["name"], i["alive"], i["instances"]) for i in items] == [
        ("n1", True, 2),
        ("n2", False, 1),
    ]


# ------------------------------------------------------------------------------ cordon, drain


async def test_cordon_and_uncordon_round_trip(cluster: Cluster) -> None:
    await cluster.add_node("n2")
    resp = await cluster.call("POST", "/v1/cluster/nodes/n2/cordon")
    assert resp.status_code == 200 and resp.json()["node"]["spec"]["cordoned"] is True
    node = await cluster.node("n2")
    assert node is not None and node.spec.cordoned and not node.spec.draining
    await cluster.call("POST", "/v1/cluster/nodes/n2/drain")
    resp = await cluster.call("POST", "/v1/cluster/nodes/n2/uncordon")
    assert resp.status_code == 200
    node = await cluster.node("n2")
    assert node is not None and not node.spec.cordoned and not node.spec.draining


async def test_unknown_or_bad_node_names(cluster: Cluster) -> None:
    for verb in ("cordon", "uncordon", "drain"):
        resp = await cluster.call("POST", f"/v1/cluster/nodes/n9/{verb}")
        assert resp.status_code == 404 and "'n9' does not exist" in resp.json()["error"]["message"]
    resp = await cluster.call("POST", "/v1/cluster/nodes/Bad_Name/cordon")
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "name"
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n9")
    assert resp.status_code == 404


async def test_draining_the_only_schedulable_node_with_instances_changes_nothing(
    cluster: Cluster,
) -> None:
    await cluster.add_node("n1")
    await cluster.add_node("n2", alive=False)  # down: cannot take work
    await cluster.add_node("n3", cordoned=True)  # cordoned: cannot take work
    await cluster.add_instance("web", 0, "n1")
    await cluster.add_instance("web", 1, "n1")
    before = await cluster.node("n1")
    resp = await cluster.call("POST", "/v1/cluster/nodes/n1/drain")
    assert resp.status_code == 409
    assert resp.json()["error"]["message"] == (
        "cannot drain n1: no other schedulable node to take its 2 instance(s); nothing was changed"
    )
    assert await cluster.node("n1") == before


async def test_drain_marks_the_node_when_another_can_take_its_work(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    await cluster.add_node("n2")
    await cluster.add_instance("web", 0, "n1")
    resp = await cluster.call("POST", "/v1/cluster/nodes/n1/drain")
    assert resp.status_code == 200 and resp.json()["instances"] == 1
    node = await cluster.node("n1")
    assert node is not None and node.spec.cordoned and node.spec.draining


async def test_draining_an_idle_only_node_is_allowed(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    resp = await cluster.call("POST", "/v1/cluster/nodes/n1/drain")
    assert resp.status_code == 200 and resp.json()["instances"] == 0


# ------------------------------------------------------------------------------ remove, leave


async def test_remove_node_refuses_the_last_member(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n1", params={"force": "true"})
    assert resp.status_code == 409
    assert resp.json()["error"]["message"] == "cannot remove n1: it holds the last etcd member"
    assert await cluster.node("n1") is not None and cluster.ops.member_names == ["n1"]


async def test_remove_node_refuses_a_live_node_unless_forced(cluster: Cluster) -> None:
    await cluster.add_node("n2")
    cluster.ops.member_names = ["n1", "n2"]
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n2")
    assert resp.status_code == 409 and "it is alive" in resp.json()["error"]["message"]
    assert await cluster.node("n2") is not None and cluster.ops.removed == []
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n2", params={"force": "true"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"node": "n2", "removed_member": True, "removed_record": True}
    assert await cluster.node("n2") is None
    assert await cluster.store.get(node_lease_key("n2")) is None  # its lease was revoked


async def test_remove_a_down_agent(cluster: Cluster) -> None:
    await cluster.add_node("n4", alive=False)
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n4")
    assert resp.status_code == 200
    assert resp.json() == {"node": "n4", "removed_member": False, "removed_record": True}
    assert await cluster.node("n4") is None and cluster.ops.removed == []


async def test_remove_node_refuses_the_answering_node(cluster: Cluster) -> None:
    await cluster.add_node("n1")
    cluster.ops.member_names = ["n1", "n2"]
    resp = await cluster.call("DELETE", "/v1/cluster/nodes/n1", params={"force": "true"})
    assert resp.status_code == 409 and "cluster leave" in resp.json()["error"]["message"]


async def test_leave_refuses_while_instances_are_assigned(cluster: Cluster) -> None:
    cluster.ops.member_names = ["n1", "n2"]
    await cluster.add_node("n1")
    await cluster.add_instance("web", 0, "n1")
    resp = await cluster.call("POST", "/v1/cluster/leave")
    assert resp.status_code == 409
    assert "drain it first: blixard cluster drain n1" in resp.json()["error"]["message"]
    assert cluster.ops.left == 0 and cluster.ops.stopped == 0


async def test_leave_of_the_last_member_is_refused(cluster: Cluster) -> None:
    resp = await cluster.call("POST", "/v1/cluster/leave")
    assert resp.status_code == 409 and "last etcd member" in resp.json()["error"]["message"]
    assert cluster.ops.stopped == 0


async def test_leave_answers_then_stops_the_daemon(cluster: Cluster) -> None:
    cluster.ops.member_names = ["n1", "n2"]
    resp = await cluster.call("POST", "/v1/cluster/leave")
    assert resp.status_code == 200 and resp.json()["stopping"] is True
    assert cluster.ops.left == 1 and cluster.ops.stopped == 1


async def test_leave_without_a_cluster(standalone: Cluster) -> None:
    resp = await standalone.call("POST", "/v1/cluster/leave")
    assert resp.status_code == 409 and "not in a cluster" in resp.json()["error"]["message"]


async def test_join_token_is_kept_in_the_node_file(cluster: Cluster) -> None:
    first = await cluster.call("POST", "/v1/cluster/join-token")
    assert first.status_code == 200
    text = first.json()["token"]
    path = cluster.ops.token_dir / "join.token"
    assert path.read_text().strip() == text and path.stat().st_mode & 0o777 == 0o600
    again = await cluster.call("POST", "/v1/cluster/join-token")
    assert again.json()["token"] == text
    token = await cluster.auth.verify_text(text)
    assert token.spec.role is TokenRole.JOIN
