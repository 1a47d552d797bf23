"""The node's HTTP API. For now: the health check; the resource API grows here.

Health answers without a token (it is what load balancers and the quickstart
probe) and says whether this node can reach its state store right now, within
the store's own timeout: a node that cannot reach its store is not healthy,
even if its HTTP server is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from blixard import __version__
from blixard.domain.errors import StoreError
from blixard.store.protocol import StateStore


def create_app(
    store: StateStore,
    *,
    node_id: str,
    store_description: dict[str, Any],
    registered: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(title="Blixard", version=__version__)

    @app.get("/health", tags=["health"])
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

    return app
