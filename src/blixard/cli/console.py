"""Where the CLI writes, and how a Blixard error becomes one line and an exit code.

Exit codes, everywhere: 0 ok, 1 failed (the server refused or failed, not
found, timed out), 2 bad usage or bad input (typer's own usage errors are 2,
and so is every ValidationError, local or from the API). An error is one line
on stderr naming the field and the reason; never a traceback.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from blixard.domain.errors import BlixardError, ValidationError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def exit_code(exc: BlixardError) -> int:
    """2 for bad input (a ValidationError), 1 for every other failure."""
    return EXIT_USAGE if isinstance(exc, ValidationError) else EXIT_FAILED


def print_error(exc: BlixardError) -> None:
    """One line on stderr; the message is escaped so '[...]' in it prints as typed."""
    err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)


def fail(exc: BlixardError) -> typer.Exit:
    """Print a Blixard error as one line and pick its exit code."""
    print_error(exc)
    return typer.Exit(exit_code(exc))
