"""Tokens: the admin token file, its reuse, and the bearer check on every route."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from blixard.api.auth import TokenAuthority, write_secret_file
from blixard.domain.keys import kind_prefix
from blixard.domain.token import Token, TokenRole, Unauthorized, split_token
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore
from tests.unit.test_api_fixtures import Api, LogBook, api, make_app

__all__ = ["api"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_first_start_writes_a_0600_token_and_stores_only_its_hash(api: Api) -> None:
    path = api.tmp / "admin.token"
    assert _mode(path) == 0o600
    text = path.read_text().strip()
    assert text == api.token and text.startswith("blx_")
    token_id, secret = split_token(text)
    stored = await api.store.range(kind_prefix("tokens"))
    assert [kv.key for kv in stored.kvs] == [f"/blixard/v1/tokens/{token_id}"]
    raw = stored.kvs[0].value
    assert secret.encode() not in raw  # the secret never reaches the store
    token = await api.objects.get(Token, token_id)
    assert token.spec.role is TokenRole.ADMIN
    assert token.metadata.created_at is not None and token.spec.description
    # No temporary file is left behind.
    assert [p.name for p in api.tmp.iterdir() if "token" in p.name] == ["admin.token"]


async def test_token_file_is_never_world_readable_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret_file(tmp_path / "sub" / "t", "secret\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "sub" / "t") == 0o600
    assert _mode(tmp_path / "sub") == 0o700


async def test_restart_keeps_a_valid_token_and_replaces_a_missing_or_stale_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin.token"
    db = tmp_path / "state.db"
    store = await SqliteStore.open(db)
    try:
        first = await TokenAuthority(ObjectStore(store)).ensure_admin_token(path)
    finally:
        await store.close()

    store = await SqliteStore.open(db)  # a restart: same store, same file
    try:
        auth = TokenAuthority(ObjectStore(store))
        assert await auth.ensure_admin_token(path) == first
        await auth.verify(f"Bearer {first}")

        path.chmod(0o644)  # someone loosened it: narrowed again, token kept
        assert await auth.ensure_admin_token(path) == first
        assert _mode(path) == 0o600

        path.unlink()  # file lost: a new admin token, the old one still valid
        second = await auth.ensure_admin_token(path)
        assert second != first and path.read_text().strip() == second
        assert _mode(path) == 0o600
        await auth.verify(f"Bearer {second}")
    finally:
        await store.close()

    other = tmp_path / "fresh.db"  # the store was reset: the file's token is unknown there
    store = await SqliteStore.open(other)
    try:
        third = await TokenAuthority(ObjectStore(store)).ensure_admin_token(path)
        assert third != second and path.read_text().strip() == third
    finally:
        await store.close()


async def test_verify_refuses_every_malformed_or_wrong_token(api: Api) -> None:
    auth = TokenAuthority(api.objects)
    token_id, secret = split_token(api.token)
    wrong = [
        f"Bearer blx_{token_id}_{'A' * len(secret)}",  # right id, wrong secret
        f"Bearer blx_ffffffffffff_{secret}",  # unknown id
        f"Bearer {api.token}x",
        "Bearer blx_",
        "Bearer nonsense",
        f"Basic {api.token}",
    ]
    for header in wrong:
        with pytest.raises(Unauthorized):
            await auth.verify(header)
    for header in (None, "", "Bearer", "Bearer   "):
        with pytest.raises(Unauthorized, match="missing bearer token"):
            await auth.verify(header)
    assert (await auth.verify(f"bearer {api.token}")).metadata.name == token_id


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app serves: the documented ones and the docs themselves."""
    found = [
        (method.upper(), path.replace("{name}", "web"))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if path != "/health"
    ]
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            found.append(("GET", route.path))
    return found


async def test_every_route_but_health_needs_a_valid_token(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        auth = TokenAuthority(ObjectStore(store))
        token = await auth.ensure_admin_token(tmp_path / "admin.token")
        app = make_app(store, auth, LogBook(), lambda: True)
        routes = _routes(app)
        for expected in [
            ("POST", "/v1/vms"),
            ("GET", "/v1/vms"),
            ("GET", "/v1/vms/web"),
            ("DELETE", "/v1/vms/web"),
            ("POST", "/v1/vms/web/start"),
            ("POST", "/v1/vms/web/stop"),
            ("POST", "/v1/vms/web/restart"),
            ("GET", "/v1/vms/web/logs"),
            ("GET", "/v1/instances"),
            ("GET", "/v1/nodes"),
            ("GET", "/v1/nodes/web"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
            ("GET", "/redoc"),
        ]:
            assert expected in routes
        routes.append(("GET", "/no/such/route"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for method, path in routes:
                resp = await client.request(method, path)
                assert resp.status_code == 401, (method, path)
                assert resp.json() == {
                    "error": {"code": "unauthorized", "message": "missing bearer token"}
                }, (method, path)
                assert resp.headers["www-authenticate"] == "Bearer"
                resp = await client.request(
                    method, path, headers={"Authorization": "Bearer blx_abc_" + "x" * 43}
                )
                assert resp.status_code == 401, (method, path)
                assert resp.json()["error"] == {"code": "unauthorized", "message": "invalid token"}
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["node"] == "n1"
            docs = await client.get("/openapi.json", headers={"Authorization": f"Bearer {token}"})
            assert docs.status_code == 200
        assert (await store.range("/blixard/v1/vms/")).kvs == []  # nothing was written
    finally:
        await store.close()


async def test_health_is_unchanged_and_open(api: Api) -> None:
    resp = await api.client.get("/health")
    body = resp.json()
    assert resp.status_code == 200
    assert body["status"] == "ok" and body["registered"] is True
    assert body["store"]["backend"] == "sqlite" and body["store"]["revision"] >= 1


async def test_health_says_starting_until_registered(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        auth = TokenAuthority(ObjectStore(store))
        app = make_app(store, auth, LogBook(), lambda: False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            resp = await client.get("/health")
        assert resp.status_code == 503 and resp.json()["status"] == "starting"
    finally:
        await store.close()
