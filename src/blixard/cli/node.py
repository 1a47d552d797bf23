"""``blixard node ...``: inspect nodes (``node start`` is added by the daemon).

``node status`` without a name shows the node whose API answers, as its
``/health`` names it: on a node's own machine that is "this node".
"""

from __future__ import annotations

from typing import Annotated

import typer

from blixard.cli.console import out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TokenOption,
    failures,
    session,
)
from blixard.cli.output import as_data, node_table, print_data, print_node

node_app = typer.Typer(help="Run and inspect nodes.", no_args_is_help=True)


@node_app.command("status")
def status(
    name: Annotated[
        str | None,
        typer.Argument(help="The node (default: the node answering the API)", show_default=False),
    ] = None,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show a node: liveness, capacity, hypervisors."""
    with failures(), session(api, token) as client:
        details = client.get_node(name if name is not None else client.health().node)
        if output is OutputFormat.TABLE:
            print_node(details)
        else:
            print_data(as_data(details), output)


@node_app.command("list")
def list_nodes(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List the nodes of the cluster."""
    with failures(), session(api, token) as client:
        items = client.list_nodes()
        if output is not OutputFormat.TABLE:
            print_data(as_data(items), output)
        elif items:
            out.print(node_table(items))
        else:
            out.print("No nodes.")
