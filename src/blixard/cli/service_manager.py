"""``service_manager``: the older Blixard's command, kept so existing scripts work.

It takes the old commands and arguments exactly and runs the new ones, with
the same output and exit codes:

=================================  ====================================
service_manager                    blixard
=================================  ====================================
``start NAME``                     ``service start NAME``
``stop NAME``                      ``service stop NAME``
``restart NAME``                   ``service restart NAME``
``status NAME``                    ``service status NAME``
``list``                           ``service list``
``list-cluster``                   ``service list-cluster``
=================================  ====================================

Anything after the verb goes through as typed, so the new options
(``--node``, ``-o json``, ``--api``, ...) work here too.
"""

from __future__ import annotations

import sys

from blixard.cli.console import EXIT_USAGE, err
from blixard.cli.main import run_guarded
from blixard.cli.service import service_app

VERBS = ("start", "stop", "restart", "status", "list", "list-cluster")
USAGE = (
    "usage: service_manager start|stop|restart|status NAME\n"
    "       service_manager list | list-cluster"
)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: map the old verb to ``blixard service <verb>``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else EXIT_USAGE)
    if args[0] not in VERBS:
        err.print(f"[red]error:[/red] unknown command {args[0]!r}", soft_wrap=True)
        print(USAGE, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    run_guarded(lambda: service_app(args=args, prog_name="service_manager"))
