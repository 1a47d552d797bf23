"""The `blixard` command line (typer + rich).

Exit codes, everywhere: 0 ok, 1 failed, 2 bad usage or bad input. Errors are
one clear line on stderr naming the field and the reason; never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

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


def main() -> None:
    """Run the CLI: no traceback reaches a user unless BLIXARD_DEBUG=1.

    The console script enters through ``blixard.daemon.commands.main``, which
    adds the commands that run the daemon itself (the CLI layer may not
    import the daemon; the daemon, as composition root, may import the CLI).
    """
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
