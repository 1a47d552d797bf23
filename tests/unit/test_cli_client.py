"""The client's configuration and its mapping of API answers to Blixard errors."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from blixard.client.config import (
    DEFAULT_API_URL,
    default_data_dir,
    resolve,
    resolve_api_url,
    resolve_token,
)
from blixard.client.errors import ApiError, ApiUnreachable, error_from_response
from blixard.client.http import BlixardClient
from blixard.domain.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
    StoreUnavailable,
    ValidationError,
)
from blixard.domain.token import Unauthorized


def test_api_url_order() -> None:
    assert resolve_api_url(None, {}) == DEFAULT_API_URL
    assert resolve_api_url(None, {"BLIXARD_API": "http://h:1/"}) == "http://h:1"
    assert resolve_api_url("https://x:2", {"BLIXARD_API": "http://h:1"}) == "https://x:2"
    with pytest.raises(ValidationError) as info:
        resolve_api_url("h:1", {})
    assert info.value.field == "--api"


def test_token_order_and_file(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("blx_file_token\n")
    env = {"BLIXARD_DATA_DIR": str(tmp_path)}
    assert resolve_token(None, env) == ("blx_file_token", str(tmp_path / "admin.token"))
    assert resolve_token(None, {**env, "BLIXARD_TOKEN": "blx_env"}) == ("blx_env", "BLIXARD_TOKEN")
    assert resolve_token("blx_flag", {**env, "BLIXARD_TOKEN": "blx_env"}) == ("blx_flag", "--token")
    settings = resolve(None, None, env)
    assert settings.api_url == DEFAULT_API_URL and settings.token == "blx_file_token"
    (tmp_path / "admin.token").write_text("  \n")
    with pytest.raises(ValidationError, match="is empty"):
        resolve_token(None, env)
    with pytest.raises(ValidationError) as info:
        resolve_token(None, {"BLIXARD_DATA_DIR": str(tmp_path / "none")})
    assert info.value.field == "token" and "does not exist; pass --token" in info.value.reason


def test_default_data_dir_is_shared_with_the_daemon() -> None:
    from blixard.daemon import config  # noqa: PLC0415 - the daemon may import the client

    assert config.default_data_dir is default_data_dir


def _answer(status: int, body: object) -> httpx.Response:
    request = httpx.Request("GET", "http://t/v1/vms/web")
    if isinstance(body, bytes):
        return httpx.Response(status, content=body, request=request)
    return httpx.Response(status, json=body, request=request)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("not_found", NotFound),
        ("already_exists", AlreadyExists),
        ("conflict", Conflict),
        ("store_unavailable", StoreUnavailable),
        ("unauthorized", Unauthorized),
    ],
)
def test_error_codes_map_back_to_their_classes(code: str, cls: type[Exception]) -> None:
    exc = error_from_response(_answer(400, {"error": {"code": code, "message": "m"}}))
    assert type(exc) is cls and str(exc) == "m"


def test_validation_errors_keep_field_and_reason() -> None:
    body = {"error": {"code": "invalid", "message": "spec.vcpus: too many", "field": "spec.vcpus"}}
    exc = error_from_response(_answer(400, body))
    assert isinstance(exc, ValidationError)
    assert (exc.field, exc.reason, str(exc)) == ("spec.vcpus", "too many", "spec.vcpus: too many")


def test_unknown_codes_and_foreign_bodies() -> None:
    exc = error_from_response(_answer(500, {"error": {"code": "internal", "message": "boom"}}))
    assert isinstance(exc, ApiError) and exc.status == 500 and exc.code == "internal"
    exc = error_from_response(_answer(502, b"<html>Bad Gateway</html>"))
    assert isinstance(exc, ApiError)
    assert str(exc) == "HTTP 502 from http://t/v1/vms/web: <html>Bad Gateway</html>"


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with BlixardClient(url, "t", 2) as client, pytest.raises(ApiUnreachable) as info:
            client.list_vms()
    assert str(info.value) == (
        f"cannot reach the Blixard API at {url}: is `blixard node start` running?"
    )
