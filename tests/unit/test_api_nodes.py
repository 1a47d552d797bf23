"""The node routes: records joined with liveness keys."""

from __future__ import annotations

from blixard.domain.keys import node_lease_key
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec
from tests.unit.test_api_fixtures import Api, api

__all__ = ["api"]


async def test_nodes_carry_their_liveness(api: Api) -> None:
    for name in ("n1", "n2"):
        await api.objects.create(
            Node(metadata=ObjectMeta(name=name), spec=NodeSpec(api_url="http://127.0.0.1:7400"))
        )
    lease = await api.store.lease_grant(30)
    await api.store.put(node_lease_key("n1"), b"alive", lease=lease.id)
    listed = (await api.call("GET", "/v1/nodes")).json()["items"]
    assert [(d["node"]["metadata"]["name"], d["alive"]) for d in listed] == [
        ("n1", True),
        ("n2", False),
    ]
    one = await api.call("GET", "/v1/nodes/n1")
    assert one.status_code == 200 and one.json()["alive"] is True
    assert one.json()["node"]["spec"]["api_url"] == "http://127.0.0.1:7400"
    await api.store.lease_revoke(lease.id)  # the lease ends: the node is no longer alive
    assert (await api.call("GET", "/v1/nodes/n1")).json()["alive"] is False


async def test_unknown_node_is_404(api: Api) -> None:
    resp = await api.call("GET", "/v1/nodes/n9")
    assert resp.status_code == 404
    assert resp.json()["error"] == {"code": "not_found", "message": "node 'n9' does not exist"}
    assert (await api.call("GET", "/v1/nodes")).json() == {"items": []}
