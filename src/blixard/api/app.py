"""The node's HTTP API: health, VMs, instances, nodes.

Health answers without a token (it is what load balancers and the quickstart
probe) and says whether this node can reach its state store right now, within
the store's own timeout: a node that cannot reach its store is not healthy,
even if its HTTP server is. Every other path, the OpenAPI description
included, needs a bearer token (see :mod:`blixard.api.auth`).

What the API cannot know by itself is injected: the token authority, the
source of task output (the agent), and which guest images this node has (the
image builder). That keeps the API layer free of the agent and the drivers,
as the import rules require, and lets tests pass plain functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from blixard import __version__
from blixard.api.auth import BearerAuthMiddleware, TokenAuthority
from blixard.api.checks import NodeFacts
from blixard.api.cluster import ClusterOps, NoCluster, cluster_router
from blixard.api.errors import CatchAllMiddleware, install_error_handlers
from blixard.api.functions import functions_router
from blixard.api.instances import instances_router
from blixard.api.logs import LogSource
from blixard.api.nodes import nodes_router
from blixard.api.openapi import install_openapi
from blixard.api.services import services_router
from blixard.api.vms import vms_router
from blixard.domain.errors import StoreError
from blixard.domain.function import Runtime
from blixard.functions.gateway import Gateway
from blixard.functions.runtime import Runtime as FunctionRuntime
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

_TAGS = [
    {"name": "health", "description": "Liveness of this node and its store (no token needed)."},
    {"name": "vms", "description": "Long-lived VMs: desired state, written by users."},
    {"name": "instances", "description": "Replicas of VMs, written by controllers and agents."},
    {"name": "nodes", "description": "The hosts of the cluster and their liveness."},
    {
        "name": "functions",
        "description": "Serverless functions: documents, invoke, HTTP triggers, metrics, logs.",
    },
    {
        "name": "services",
        "description": "systemd units kept running on chosen nodes (the older "
        "service_manager verbs), and import of the older system's services.",
    },
    {
        "name": "cluster",
        "description": "Joining, etcd membership, cordon, drain, removal (admin tokens; "
        "the join route also takes a join token).",
    },
]


def create_app(
    store: StateStore,
    *,
    node_id: str,
    store_description: dict[str, Any],
    registered: Callable[[], bool],
    auth: TokenAuthority,
    logs: LogSource,
    image_exists: Callable[[str], bool],
    known_images: Callable[[], list[str]],
    cluster: ClusterOps | None = None,
    gateway: Gateway | None = None,
    runtimes: Mapping[Runtime, FunctionRuntime] | None = None,
) -> FastAPI:
    """The API of node ``node_id`` over ``store``.

    ``logs(instance, follow)`` streams a task's output (NotFound if this node
    has no such task); ``image_exists``/``known_images`` answer for the guest
    images built on this node; ``cluster`` does etcd membership for the
    cluster routes (default: no cluster, as on the embedded SQLite store).
    """
    app = FastAPI(
        title="Blixard",
        version=__version__,
        description="Orchestrates microVMs. Every route but `/health` needs "
        '`Authorization: Bearer <token>`; errors are `{"error": {code, message, field?}}`.',
        openapi_tags=_TAGS,
    )
    install_error_handlers(app)
    # Added last = outermost: crashes anywhere, the token check included, answer in shape.
    app.add_middleware(BearerAuthMiddleware, authority=auth)
    app.add_middleware(CatchAllMiddleware)

    @app.get("/health", tags=["health"], summary="Is this node serving and reaching its store?")
    async def health() -> JSONResponse:
        """200 when this node answers and reaches its state store; 503 otherwise."""
        body: dict[str, Any] = {
            "node": node_id,
            "version": __version__,
            "store": dict(store_description),
            "registered": registered(),
        }
        try:
            head = await store.range("/blixard/v1/nodes/", limit=1, keys_only=True)
        except StoreError as exc:
            body["status"] = "unavailable"
            body["store"]["error"] = str(exc)
            return JSONResponse(body, status_code=503)
        body["status"] = "ok" if body["registered"] else "starting"
        body["store"]["revision"] = head.revision
        return JSONResponse(body, status_code=200 if body["registered"] else 503)

    objects = ObjectStore(store)
    facts = NodeFacts(node_id=node_id, image_exists=image_exists, known_images=known_images)
    app.include_router(vms_router(objects, facts, logs))
    app.include_router(instances_router(objects))
    app.include_router(nodes_router(objects))
    app.include_router(functions_router(objects, gateway, runtimes or {}))

    @app.get("/metrics", tags=["functions"], summary="Prometheus metrics of this node")
    async def metrics() -> Response:
        """Function invocations, starts, durations, queue time (Prometheus text format)."""
        body = gateway.metrics.exposition() if gateway is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(services_router(objects, node_id))
    app.include_router(
        cluster_router(
            objects,
            cluster if cluster is not None else NoCluster(node_id),
            auth,
            node_id=node_id,
            store_description=store_description,
        )
    )
    install_openapi(app)
    return app
