"""The OpenAPI description as Blixard serves it.

FastAPI documents a 422 answer for every route with parameters; Blixard never
sends one (request validation answers 400 in the common error shape), so
those entries go. The bearer scheme is declared so ``/docs`` offers to send a
token, and so generated clients know every route but ``/health`` needs one.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from blixard.api.auth import OPEN_PATHS

_UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one producing Blixard's description (cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if path in OPEN_PATHS:
                    operation["security"] = []
        components = schema.setdefault("components", {})
        for name in _UNUSED_SCHEMAS:
            components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "blx_<id>_<secret>"}
        }
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
