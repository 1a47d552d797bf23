"""The commands that run the daemon, added to the CLI by the composition root.

``blixard`` is one command for users; this module is its console-script
entry point, so ``blixard node start`` can reach the daemon while the CLI
layer itself only knows the HTTP client and the domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blixard.cli import main as cli
from blixard.cli.main import app, err, fail, node_app
from blixard.daemon.image_cmd import image_app
from blixard.domain.errors import BlixardError


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
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML config file [env: BLIXARD_CONFIG; default /etc/blixard/config.toml]"
        ),
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
        settings = load_config(
            {
                "data_dir": str(data_dir) if data_dir is not None else None,
                "node_id": node_id,
                "api_host": api_host,
                "api_port": api_port,
                "store": store,
                "etcd_endpoints": endpoints,
            },
            config_path=config,
        )
    except BlixardError as exc:
        raise fail(exc) from None
    configure_logging(settings.log_level)

    def ready(url: str) -> None:
        sqlite = settings.store == "sqlite"
        where = settings.sqlite_path if sqlite else ",".join(settings.etcd_endpoints)
        err.print(
            f"Blixard node [bold]{settings.node_id}[/bold] ready: API {url} "
            f"(health: {url}/health), store {settings.store} at {where}",
            soft_wrap=True,
        )

    try:
        asyncio.run(run_node(settings, on_ready=ready))
    except BlixardError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        pass


app.add_typer(image_app, name="image")


def main() -> None:
    """Console-script entry point."""
    cli.main()
