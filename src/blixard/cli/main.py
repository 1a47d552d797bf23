"""The `blixard` command line (typer + rich).

Exit codes, everywhere: 0 ok, 1 failed, 2 bad usage or bad input. Errors are
one clear line on stderr naming the field and the reason; never a traceback.

The command groups live in their own modules (``vm.py``, ``node.py``,
``cluster.py``); this
one assembles them and keeps the names the daemon's entry point imports
(``app``, ``node_app``, ``err``, ``fail``, ``main``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer
from rich.markup import escape

from blixard import __version__
from blixard.cli.cluster import cluster_app
from blixard.cli.console import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    err,
    exit_code,
    fail,
    out,
    print_error,
)
from blixard.cli.function import function_app
from blixard.cli.importer import import_command
from blixard.cli.node import node_app
from blixard.cli.service import service_app
from blixard.cli.vm import vm_app
from blixard.domain.errors import BlixardError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "app",
    "err",
    "fail",
    "main",
    "node_app",
    "out",
    "print_error",
    "vm_app",
]

app = typer.Typer(
    name="blixard",
    help="Blixard: microVMs and serverless functions across a cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(node_app, name="node")
app.add_typer(vm_app, name="vm")
app.add_typer(cluster_app, name="cluster")
app.add_typer(service_app, name="service")
app.command("import")(import_command)
app.add_typer(function_app, name="function")


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
    run_guarded(app)


def run_guarded(run: Callable[[], object]) -> None:
    """Run a typer app: a Blixard error is one line and its exit code, never a traceback."""
    try:
        run()
    except BlixardError as exc:  # anything a command did not catch itself
        print_error(exc)
        sys.exit(exit_code(exc))
    except Exception as exc:
        if os.environ.get("BLIXARD_DEBUG") == "1":
            raise
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc))} "
            "(run with BLIXARD_DEBUG=1 for the traceback)",
            soft_wrap=True,
        )
        sys.exit(EXIT_FAILED)
