"""``blixard import``: bring the older system's services into the cluster, all or nothing.

The file is read and checked whole here (docs/services.md has its shape; a
refusal names the place and the reason, exit 2, and nothing is sent); the
API checks it again and writes every service in one transaction. Existing
services that are identical are left alone; different ones refuse the whole
import unless ``--overwrite``. ``--verify`` then waits until every imported
service reached its recorded state and prints a verdict per service (exit 1
if any did not).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from blixard.cli.console import EXIT_FAILED, out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TimeoutOption,
    TokenOption,
    failures,
    session,
)
from blixard.cli.output import print_data
from blixard.cli.service import describe, read_services_file
from blixard.cli.wait import POLL_INTERVAL_S
from blixard.client.http import BlixardClient
from blixard.domain.errors import ValidationError
from blixard.domain.service import Service
from blixard.domain.service_status import reached
from blixard.domain.units import parse_duration_s

FORMATS = ("json",)


def import_command(
    file: Annotated[
        Path,
        typer.Option(
            "--file", "-f", help="The exported services file ('-' for stdin)", show_default=False
        ),
    ],
    format_: Annotated[str, typer.Option("--format", help="The file's format (json)")] = "json",
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Wait until every service reaches its recorded state"),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace existing services whose settings differ"),
    ] = False,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Import services exported by the older Blixard (all or nothing)."""  # fmt: skip
    with failures():
        if format_ not in FORMATS:
            raise ValidationError(
                "--format", f"must be one of {', '.join(FORMATS)}, got {format_!r}"
            )
        timeout_s = parse_duration_s(timeout, "--timeout")
        entries = read_services_file(file, "--file")
        with session(api, token) as client:
            result = client.import_services([e.to_json() for e in entries], overwrite=overwrite)
            names = [e.name for e in entries]
            verdicts = verify_services(client, names, timeout_s) if verify else None
    report: dict[str, Any] = result.model_dump(mode="json")
    if verdicts is not None:
        report["verified"] = verdicts
    if output is not OutputFormat.TABLE:
        print_data(report, output)
    else:
        for key in ("created", "updated", "unchanged"):
            listed = ", ".join(report[key]) or "-"
            out.print(f"{key}: {listed}")
        for verdict in verdicts or []:
            mark = "ok" if verdict["reached"] else "NOT REACHED"
            out.print(f"{verdict['name']}: {mark}: {verdict['seen']}")
    if verdicts is not None and not all(v["reached"] for v in verdicts):
        raise typer.Exit(EXIT_FAILED)


def verify_services(
    client: BlixardClient, names: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    """Poll until every service reached its recorded state or the time is up; a verdict each."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {s.metadata.name: s for s in client.list_services()}
        states = {name: found.get(name) for name in names}
        done = {name: s is not None and reached(s, s.status) for name, s in states.items()}
        if all(done.values()) or time.monotonic() >= deadline:
            return [_verdict(name, states[name], done[name]) for name in names]
        time.sleep(POLL_INTERVAL_S)


def _verdict(name: str, service: Service | None, ok: bool) -> dict[str, Any]:
    if service is None:
        return {"name": name, "reached": False, "state": None, "seen": "not in the cluster"}
    state = service.spec.state.value
    seen = f"{state} on every node" if ok else describe(service)
    return {"name": name, "reached": ok, "state": state, "seen": seen}
