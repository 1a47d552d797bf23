"""The one error shape: crashes, an unreachable store, unknown routes; and the OpenAPI text."""

from __future__ import annotations

from typing import Any

from blixard.api.errors import error_body, status_for
from blixard.domain.errors import (
    AlreadyExists,
    BlixardError,
    Compacted,
    Conflict,
    LeaseNotFound,
    NotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from blixard.domain.token import Unauthorized
from tests.unit.test_api_fixtures import Api, api, vm_doc

__all__ = ["api"]


def test_status_of_every_error_class() -> None:
    assert status_for(ValidationError("f", "r")) == 400
    assert status_for(Unauthorized("x")) == 401
    assert status_for(NotFound("x")) == 404
    assert status_for(LeaseNotFound("x")) == 404
    assert status_for(AlreadyExists("x")) == 409
    assert status_for(Conflict("x")) == 409
    assert status_for(StoreUnavailable("x")) == 503
    assert status_for(StoreError("x")) == 500
    assert status_for(Compacted(1, 2)) == 500
    assert status_for(BlixardError("x")) == 500
    assert error_body("c", "m") == {"error": {"code": "c", "message": "m"}}


async def test_a_crash_is_500_without_a_traceback(api: Api) -> None:
    await api.call("POST", "/v1/vms", json=vm_doc())
    await api.add_instance("web", 0)
    api.logs.errors["web-0"] = RuntimeError("secret internal detail")
    resp = await api.call("GET", "/v1/vms/web/logs")
    assert resp.status_code == 500
    assert resp.json() == {
        "error": {"code": "internal", "message": "internal error; the node's log has the details"}
    }
    assert "Traceback" not in resp.text and "secret internal detail" not in resp.text


async def test_a_blixard_error_without_its_own_status_is_500_with_its_message(api: Api) -> None:
    await api.call("POST", "/v1/vms", json=vm_doc())
    await api.add_instance("web", 0)
    api.logs.errors["web-0"] = StoreError("database disk image is malformed")
    resp = await api.call("GET", "/v1/vms/web/logs")
    assert resp.status_code == 500
    assert resp.json()["error"] == {
        "code": "store_error",
        "message": "database disk image is malformed",
    }


async def test_store_unreachable_is_503(api: Api) -> None:
    await api.store.close()  # every call now fails as an unreachable store would
    resp = await api.call("GET", "/v1/vms")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "store_unavailable"
    health = await api.client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


async def test_unknown_route_and_method_use_the_error_shape(api: Api) -> None:
    resp = await api.call("GET", "/v1/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = await api.call("PUT", "/v1/vms")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_describes_every_route(api: Api) -> None:
    doc = (await api.call("GET", "/openapi.json")).json()
    paths = doc["paths"]
    expected = {
        "/health": {"get"},
        "/v1/vms": {"get", "post"},
        "/v1/vms/{name}": {"get", "delete"},
        "/v1/vms/{name}/start": {"post"},
        "/v1/vms/{name}/stop": {"post"},
        "/v1/vms/{name}/restart": {"post"},
        "/v1/vms/{name}/scale": {"post"},
        "/v1/vms/{name}/logs": {"get"},
        "/v1/instances": {"get"},
        "/v1/nodes": {"get"},
        "/v1/nodes/{name}": {"get"},
        "/v1/cluster": {"get"},
        "/v1/cluster/join": {"post"},
        "/v1/cluster/join-token": {"post"},
        "/v1/cluster/leave": {"post"},
        "/v1/cluster/nodes": {"get"},
        "/v1/cluster/nodes/{name}": {"delete"},
        "/v1/cluster/nodes/{name}/cordon": {"post"},
        "/v1/cluster/nodes/{name}/uncordon": {"post"},
        "/v1/cluster/nodes/{name}/drain": {"post"},
        "/v1/services": {"get"},
        "/v1/services/import": {"post"},
        "/v1/services/{name}": {"get", "delete"},
        "/v1/services/{name}/start": {"post"},
        "/v1/services/{name}/stop": {"post"},
        "/v1/services/{name}/restart": {"post"},
        "/v1/functions": {"get", "post"},
        "/v1/functions/{name}": {"get", "put", "delete"},
        "/v1/functions/{name}/invoke": {"post"},
        "/v1/functions/{name}/triggers": {"post", "delete"},
        "/v1/functions/{name}/metrics": {"get"},
        "/v1/functions/{name}/logs": {"get"},
        "/metrics": {"get"},
    }
    assert {p: set(ops) for p, ops in paths.items()} == expected
    for path, ops in paths.items():
        for method, op in ops.items():
            assert op.get("summary") and op.get("tags"), (path, method)
            assert "422" not in op["responses"], (path, method)
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    body = paths["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/VM"}
    assert paths["/v1/vms"]["post"]["responses"]["201"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}] and paths["/health"]["get"]["security"] == []
    assert "text/plain" in paths["/v1/vms/{name}/logs"]["get"]["responses"]["200"]["content"]
