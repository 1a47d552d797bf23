"""The node routes: node records joined with their liveness.

A node record outlives its daemon (it holds what the node offers); whether
the node is alive is the separate liveness key attached to its lease, which
the store deletes by itself when the lease expires.
"""

from __future__ import annotations

from fastapi import APIRouter

from blixard.api.errors import COMMON_ERRORS, ErrorResponse
from blixard.api.reads import live_nodes, stored
from blixard.api.schemas import NodeDetails, NodeList
from blixard.api.vms import checked_name
from blixard.domain.node import Node
from blixard.store.objects import ObjectStore


def nodes_router(objects: ObjectStore) -> APIRouter:
    """The routes under ``/v1/nodes``."""
    router = APIRouter(
        prefix="/v1/nodes",
        tags=["nodes"],
        responses={**COMMON_ERRORS, 404: {"model": ErrorResponse, "description": "No such node"}},
    )

    @router.get("", response_model=NodeList, summary="List nodes and whether each is alive")
    async def list_nodes() -> NodeList:
        nodes = await stored(objects.list(Node))
        alive = await live_nodes(objects)
        return NodeList(items=[NodeDetails(node=n, alive=n.metadata.name in alive) for n in nodes])

    @router.get("/{name}", response_model=NodeDetails, summary="One node and whether it is alive")
    async def get_node(name: str) -> NodeDetails:
        node = await stored(objects.get(Node, checked_name(name)))
        return NodeDetails(node=node, alive=name in await live_nodes(objects))

    return router
