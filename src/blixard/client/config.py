"""How a client on the node's own machine finds the API and its token, without flags.

Order, for each setting: the flag (``--api``, ``--token``), then the
environment (``BLIXARD_API``, ``BLIXARD_TOKEN``), then the default: the API at
``http://127.0.0.1:7400`` and the admin token the node wrote to
``<data dir>/admin.token``. The data dir is ``BLIXARD_DATA_DIR`` or the same
default the daemon uses (which is why the daemon imports
:func:`default_data_dir` from here: one definition, so they cannot drift).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blixard.domain.errors import ValidationError

DEFAULT_API_URL = "http://127.0.0.1:7400"
TOKEN_FILE_NAME = "admin.token"
API_ENV = "BLIXARD_API"
TOKEN_ENV = "BLIXARD_TOKEN"
DATA_DIR_ENV = "BLIXARD_DATA_DIR"


def default_data_dir() -> Path:
    """/var/lib/blixard for root (as packaged), else a directory under the user's home."""
    if os.geteuid() == 0:
        return Path("/var/lib/blixard")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "blixard"


API_URL_FILE_NAME = "api.url"


def api_url_file(data_dir: Path) -> Path:
    """Where a running node writes its API URL, so the CLI finds a node on any port."""
    return data_dir / API_URL_FILE_NAME


def token_file(data_dir: Path) -> Path:
    """Where the node writes its admin token: ``<data dir>/admin.token``."""
    return data_dir / TOKEN_FILE_NAME


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the API is, the token to send, and where that token came from (for messages)."""

    api_url: str
    token: str
    token_source: str


def resolve_api_url(api: str | None, env: Mapping[str, str] | None = None) -> str:
    """The API base URL: flag, then BLIXARD_API, then the local default."""
    env = os.environ if env is None else env
    url = api or env.get(API_ENV) or _url_from_data_dir(env) or DEFAULT_API_URL
    if not url.startswith(("http://", "https://")):
        field = "--api" if api else API_ENV
        raise ValidationError(field, f"must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _url_from_data_dir(env: Mapping[str, str]) -> str | None:
    """The API URL the local node wrote into its data dir, if it runs."""
    data_dir = Path(env[DATA_DIR_ENV]) if env.get(DATA_DIR_ENV) else default_data_dir()
    try:
        return api_url_file(data_dir).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def resolve_token(token: str | None, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(token, where it came from)``: flag, then BLIXARD_TOKEN, then the token file."""
    env = os.environ if env is None else env
    if token:
        return token.strip(), "--token"
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip(), TOKEN_ENV
    data_dir = Path(env[DATA_DIR_ENV]) if env.get(DATA_DIR_ENV) else default_data_dir()
    path = token_file(data_dir)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValidationError(
            "token",
            f"none given and {path} does not exist; pass --token, set {TOKEN_ENV}, "
            f"or set {DATA_DIR_ENV} to the node's data dir",
        ) from None
    except PermissionError:
        raise ValidationError(
            "token",
            f"cannot read {path} (permission denied); run as the node's user (root), "
            f"or pass --token / set {TOKEN_ENV}",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValidationError("token", f"cannot read {path}: {reason}") from None
    if not text:
        raise ValidationError("token", f"{path} is empty")
    return text, str(path)


def resolve(
    api: str | None = None, token: str | None = None, env: Mapping[str, str] | None = None
) -> ClientSettings:
    """Both settings at once (see the module docstring for the order)."""
    url = resolve_api_url(api, env)
    text, source = resolve_token(token, env)
    return ClientSettings(api_url=url, token=text, token_source=source)
