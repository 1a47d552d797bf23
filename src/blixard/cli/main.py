"""The `blixard` command line (typer + rich).

Exit codes, everywhere: 0 ok, 1 failed, 2 bad usage or bad input. Errors are
one clear line on stderr naming the field and the reason; never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from blixard import __version__
from blixard.domain.errors import BlixardError, ValidationError

app = typer.Typer(
    name="blixard",
    help="Blixard: microVMs and serverless functions across a cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
node_app = typer.Typer(help="Run and inspect this node.", no_args_is_help=True)
app.add_typer(node_app, name="node")

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: BlixardError) -> typer.Exit:
    """Print a Blixard error as one line and pick its exit code."""
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    return typer.Exit(EXIT_USAGE if isinstance(exc, ValidationError) else EXIT_FAILED)


@app.command()
def version() -> None:
    """Print Blixard's version."""
    out.print(__version__)


@node_app.command("start")
def node_start(
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the node keeps its state [env: BLIXARD_DATA_DIR]")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="This node's name, a DNS label [env: BLIXARD_NODE_ID]")
    ] = None,
    api_host: Annotated[
        str | None, typer.Option(help="Address the API listens on [default: 127.0.0.1]")
    ] = None,
    api_port: Annotated[int | None, typer.Option(help="API port [default: 7400]")] = None,
    store: Annotated[
        str | None, typer.Option(help="State store: sqlite (embedded, default) or etcd")
    ] = None,
    etcd_endpoints: Annotated[
        str | None, typer.Option(help="Comma-separated etcd client URLs (implies --store etcd)")
    ] = None,
) -> None:
    """Start this node: state store, registration and HTTP API, until SIGTERM/Ctrl-C."""
    import asyncio  # noqa: PLC0415 - keeps `blixard --help` fast

    from blixard.daemon.config import load_config  # noqa: PLC0415
    from blixard.daemon.logging import configure_logging  # noqa: PLC0415
    from blixard.daemon.node import run_node  # noqa: PLC0415

    endpoints = None
    if etcd_endpoints is not None:
        endpoints = [e.strip() for e in etcd_endpoints.split(",") if e.strip()]
    try:
        config = load_config(
            {
                "data_dir": str(data_dir) if data_dir is not None else None,
                "node_id": node_id,
                "api_host": api_host,
                "api_port": api_port,
                "store": store,
                "etcd_endpoints": endpoints,
            }
        )
    except BlixardError as exc:
        raise fail(exc) from None
    configure_logging()

    def ready(url: str) -> None:
        where = config.sqlite_path if config.store == "sqlite" else ",".join(config.etcd_endpoints)
        err.print(
            f"Blixard node [bold]{config.node_id}[/bold] ready: API {url} "
            f"(health: {url}/health), store {config.store} at {where}",
            soft_wrap=True,
        )

    try:
        asyncio.run(run_node(config, on_ready=ready))
    except BlixardError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        pass


def main() -> None:
    """Console-script entry point: no traceback reaches a user unless BLIXARD_DEBUG=1."""
    try:
        app()
    except BlixardError as exc:  # anything a command did not catch itself
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:
        if os.environ.get("BLIXARD_DEBUG") == "1":
            raise
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} "
            "(run with BLIXARD_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(EXIT_FAILED)
