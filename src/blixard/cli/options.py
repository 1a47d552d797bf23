"""Options every API command shares, and the session that turns them into a client.

``--api`` and ``--token`` are per command (``blixard vm list --api URL``), as
users of kubectl expect, and both fall back to the environment and then to
what the node on this machine wrote (see :mod:`blixard.client.config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, TypeVar

import typer

from blixard.cli.console import fail
from blixard.client.config import resolve
from blixard.client.http import BlixardClient
from blixard.domain.errors import BlixardError
from blixard.domain.token import Unauthorized

_CONNECTION = "Connection"


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        help="API base URL (env BLIXARD_API; default: http://127.0.0.1:7400)",
        show_default=False,
        rich_help_panel=_CONNECTION,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API token (env BLIXARD_TOKEN; default: the node's <data dir>/admin.token, "
        "data dir from BLIXARD_DATA_DIR)",
        show_default=False,
        rich_help_panel=_CONNECTION,
    ),
]
OutputOption = Annotated[
    OutputFormat,
    typer.Option("--output", "-o", help="Output format", case_sensitive=False),
]
WaitOption = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Wait until the change is observed (instances running, stopped or gone)",
    ),
]
TimeoutOption = Annotated[
    str, typer.Option("--timeout", help="How long to wait, e.g. 120s, 5m", show_default=True)
]


@contextmanager
def failures() -> Iterator[None]:
    """Turn any Blixard error inside into its one-line message and exit code."""
    try:
        yield
    except BlixardError as exc:
        raise fail(exc) from None


C = TypeVar("C", bound=BlixardClient)


@contextmanager
def client_session(api: str | None, token: str | None, kind: type[C]) -> Iterator[C]:
    """A client of ``kind`` for the resolved API and token; a refused token names its source."""
    settings = resolve(api, token)
    client = kind(settings.api_url, settings.token)
    try:
        yield client
    except Unauthorized as exc:
        raise Unauthorized(
            f"{exc}: the API at {settings.api_url} refused the token from {settings.token_source}"
        ) from None
    finally:
        client.close()


@contextmanager
def session(api: str | None, token: str | None) -> Iterator[BlixardClient]:
    """A client for the resolved API and token (see :func:`client_session`)."""
    with client_session(api, token, BlixardClient) as client:
        yield client
