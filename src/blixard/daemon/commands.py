"""The commands that run the daemon, added to the CLI by the composition root.

``blixard`` is one command for users; this module is its console-script
entry point, so ``blixard node start`` can reach the daemon while the CLI
layer itself only knows the HTTP client and the domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from blixard.cli import main as cli
from blixard.cli.main import app, err, fail, node_app
from blixard.daemon.image_cmd import image_app
from blixard.domain.errors import BlixardError, ValidationError

_CLUSTER = "Cluster"
_SERVICES = "Services"


def parse_labels(items: list[str]) -> dict[str, str]:
    """``--label k=v`` flags as a map (the keys and values are checked with the config)."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError("labels", f"--label must be KEY=VALUE, got {item!r}")
        if key in labels:
            raise ValidationError("labels", f"--label {key!r} is given more than once")
        labels[key] = value
    return labels


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
    gateway_port: Annotated[
        int | None,
        typer.Option(
            help="Function gateway port: HTTP triggers and forwarded invocations, on the "
            "API's host; 0 = no gateway [default: 7480]"
        ),
    ] = None,
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
        str | None,
        typer.Option(
            help="Comma-separated client URLs of an external etcd (implies --store etcd)",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    cluster_init: Annotated[
        bool | None,
        typer.Option(
            "--cluster-init",
            help="Start a new cluster: this node runs its first etcd member",
            show_default=False,
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    join: Annotated[
        str | None,
        typer.Option(
            help="Join a cluster through a node's API URL, e.g. http://10.0.0.1:7400",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            help="The cluster's join token (`blixard cluster join-token`) "
            "[env: BLIXARD_JOIN_TOKEN]",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    join_token_file: Annotated[
        Path | None,
        typer.Option(help="Read the join token from this file", rich_help_panel=_CLUSTER),
    ] = None,
    advertise_address: Annotated[
        str | None,
        typer.Option(
            help="The address other nodes reach this one at [default: the API host]",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    etcd_client_port: Annotated[
        int | None,
        typer.Option(
            help="Client port of this node's etcd member [default: 2379]", rich_help_panel=_CLUSTER
        ),
    ] = None,
    etcd_peer_port: Annotated[
        int | None,
        typer.Option(
            help="Peer port of this node's etcd member [default: 2380]", rich_help_panel=_CLUSTER
        ),
    ] = None,
    etcd_members: Annotated[
        int | None,
        typer.Option(
            help="etcd members the cluster grows to; later nodes join as agents only "
            "(with --cluster-init) [default: 3]",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    zone: Annotated[
        str | None, typer.Option(help="This node's zone (a label value)", rich_help_panel=_CLUSTER)
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="A node label KEY=VALUE (repeatable)",
            show_default=False,
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    service_driver: Annotated[
        str | None,
        typer.Option(
            help="What runs services' units: systemd, process (their ExecStart=, no "
            "systemd needed), none, or auto [default: auto: systemd if it answers]",
            rich_help_panel=_SERVICES,
        ),
    ] = None,
    unit_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="Where the process service driver reads unit files (repeatable, first "
            "match wins) [default: /etc/systemd/system]",
            show_default=False,
            rich_help_panel=_SERVICES,
        ),
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
                "gateway_port": gateway_port,
                "store": store,
                "etcd_endpoints": endpoints,
                "cluster_init": cluster_init,
                "join": join,
                "join_token": join_token,
                "join_token_file": join_token_file,
                "advertise_address": advertise_address,
                "etcd_client_port": etcd_client_port,
                "etcd_peer_port": etcd_peer_port,
                "etcd_members": etcd_members,
                "zone": zone,
                "labels": parse_labels(label) if label else None,
                "service_driver": service_driver,
                "unit_dirs": [str(d) for d in unit_dir] if unit_dir else None,
            },
            config_path=config,
        )
    except BlixardError as exc:
        raise fail(exc) from None
    configure_logging(settings.log_level)

    def ready(url: str, store_description: dict[str, Any]) -> None:
        backend = store_description.get("backend", settings.store)
        where = store_description.get("path") or ",".join(store_description.get("endpoints", []))
        role = store_description.get("role")
        err.print(
            f"Blixard node [bold]{settings.node_id}[/bold] ready: API {url} "
            f"(health: {url}/health), store {backend} at {where}"
            + (f", cluster role {role}" if role else ""),
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
