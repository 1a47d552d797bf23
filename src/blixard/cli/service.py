"""``blixard service ...``: the older ``service_manager`` verbs over the cluster.

``start NAME`` starts the systemd unit NAME (``nginx`` or ``nginx.service``)
on this node by default, on ``--node N`` (repeatable), on ``--all-nodes``,
or wherever the scheduler places it (``--replicas``, placement flags), and
records the wish in the store; ``stop``, ``restart``, ``status``, ``list``,
``list-cluster`` (the cluster's nodes) and ``delete`` follow. Lifecycle verbs
wait until the change is observed on every node (``--no-wait`` to return at
once). docs/services.md has the whole story.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from blixard.cli import cluster as cluster_cli
from blixard.cli.console import out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TimeoutOption,
    TokenOption,
    WaitOption,
    failures,
    session,
)
from blixard.cli.output import as_data, print_data
from blixard.cli.wait import POLL_INTERVAL_S, WaitTimeout
from blixard.client.http import BlixardClient
from blixard.domain.errors import ValidationError
from blixard.domain.names import validate_dns_label, validate_unit_name
from blixard.domain.service import Service, ServiceState, service_identity
from blixard.domain.service_import import ImportedService, parse_import
from blixard.domain.service_status import reached
from blixard.domain.units import format_duration, parse_duration_s

service_app = typer.Typer(
    help="Run systemd units across the cluster (the older service_manager verbs).",
    no_args_is_help=True,
)

_PLACE = "Where it runs (default: this node)"
NameArg = Annotated[
    str,
    typer.Argument(
        help="The service: a unit name (nginx or nginx.service) or, with --unit, any DNS label",
        show_default=False,
    ),
]


# ------------------------------------------------------------------ reading and waiting


def service_name(text: str) -> str:
    """The service a user means by ``nginx`` or ``nginx.service`` (checked like a unit)."""
    return service_identity(text, "name")[0]


def _where(service: Service) -> str:
    spec = service.spec
    if spec.nodes is None:
        return f"placed, {spec.replicas} replica{'s' if spec.replicas != 1 else ''}"
    return "all nodes" if spec.nodes == "all" else ",".join(spec.nodes)


def _running(service: Service) -> str:
    nodes = service.status.nodes.values()
    up = sum(1 for n in nodes if n.active_state == "active" and n.sub_state == "running")
    return f"{up}/{len(nodes) + len(service.status.unplaced)}"


def service_table(items: Sequence[Service]) -> Table:
    """``service list``: one row per service."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "UNIT", "RECORDED", "LIVE", "RUNNING", "WHERE"):
        table.add_column(column, no_wrap=True)
    for s in items:
        table.add_row(
            s.metadata.name,
            s.spec.unit,
            s.spec.state.value,
            s.status.phase.value,
            _running(s),
            Text(_where(s)),
        )
    return table


def print_service(service: Service) -> None:
    """``service status``: the recorded state, then the live state per node."""
    spec, st = service.spec, service.status
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows = [
        ("Name", service.metadata.name),
        ("Unit", spec.unit),
        ("Recorded", spec.state.value),
        ("Live", st.phase.value + (f" ({st.message})" if st.message else "")),
        ("Where", _where(service)),
        ("Restarts asked", str(spec.restart_generation)),
    ]
    if st.unplaced:
        rows.append(("Not placed", ", ".join(st.unplaced)))
    for key, value in rows:
        grid.add_row(key, Text(value))
    out.print(grid)
    out.print()
    if not st.nodes:
        out.print("No node runs it yet.")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NODE", "ACTIVE", "SUB", "INSTANCE"):
        table.add_column(column, no_wrap=True)
    table.add_column("MESSAGE")
    for node, n in st.nodes.items():
        table.add_row(node, n.active_state, n.sub_state, n.instance or "-", Text(n.message))
    out.print(table)


def describe(service: Service) -> str:
    """What a waiting user last saw: each node's state, what is not placed."""
    st = service.status
    parts = [f"{node}: {n.active_state}/{n.sub_state}" + (f" ({n.message})" if n.message else "")
             for node, n in st.nodes.items()]  # fmt: skip
    parts += [f"{name}: not placed" for name in st.unplaced]
    if st.message:
        parts.append(st.message)
    if not st.synced:
        parts.append("the controller has not applied the change yet")
    return "; ".join(parts) or f"service {st.phase.value}"


def wait_until(
    client: BlixardClient,
    name: str,
    done: Callable[[Service], bool],
    timeout_s: float,
    what: str,
) -> Service:
    """Poll the service until ``done``; WaitTimeout saying what was last seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        service = client.get_service(name)
        if done(service):
            return service
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"timed out after {format_duration(timeout_s)} waiting for service {name!r} "
                f"to be {what}; last seen: {describe(service)} (the request itself was "
                f"accepted; `blixard service status {name}` shows progress)"
            )
        time.sleep(POLL_INTERVAL_S)


def _show(service: Service, line: str, output: OutputFormat) -> None:
    if output is not OutputFormat.TABLE:
        print_data(as_data(service), output)
        return
    out.print(line)
    print_service(service)


def _lifecycle(
    client: BlixardClient,
    service: Service,
    verb: str,
    wait: bool,
    timeout_s: float,
    output: OutputFormat,
) -> None:
    name = service.metadata.name
    goal = "stopped" if service.spec.state is ServiceState.STOPPED else "running"
    if wait:
        service = wait_until(client, name, lambda s: reached(s, s.status), timeout_s, goal)
        line = f"service [bold]{name}[/bold] {verb}: {goal} on every node"
    else:
        service = client.get_service(name)
        line = f"service [bold]{name}[/bold] {verb} (not waiting for it to take effect)"
    _show(service, line, output)


# ------------------------------------------------------------------ commands


def start_body(
    unit: str | None,
    node: list[str] | None,
    all_nodes: bool,
    replicas: int | None,
    node_selector: str | None,
    constraint: str | None,
    strategy: str | None,
) -> dict[str, Any]:
    """The body of the start request from the flags; contradictions are exit 2."""
    placing = [
        flag
        for flag, value in (
            ("--replicas", replicas),
            ("--node-selector", node_selector),
            ("--constraint", constraint),
            ("--strategy", strategy),
        )
        if value is not None
    ]
    if node and all_nodes:
        raise ValidationError("--all-nodes", "give either --node or --all-nodes, not both")
    if (node or all_nodes) and placing:
        pinned = "--node" if node else "--all-nodes"
        raise ValidationError(
            placing[0], f"{pinned} already says where it runs; placement flags need neither"
        )
    body: dict[str, Any] = {}
    if unit is not None:
        body["unit"] = validate_unit_name(unit, "--unit")
    if node:
        body["nodes"] = node
    elif all_nodes:
        body["nodes"] = "all"
    elif placing:
        placement: dict[str, Any] = {}
        if node_selector is not None:
            placement["node_selector"] = _pairs(node_selector, "--node-selector")
        if constraint is not None:
            placement["constraints"] = constraint
        if strategy is not None:
            placement["strategy"] = strategy
        body["replicas"] = replicas if replicas is not None else 1
        body["placement"] = placement
    return body


def _pairs(text: str, flag: str) -> dict[str, str]:
    out_: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValidationError(flag, f"must be key=value[,key=value...], got {text!r}")
        out_[key.strip()] = value.strip()
    return out_


@service_app.command("start")
def start(
    name: NameArg,
    unit: Annotated[
        str | None,
        typer.Option(help="The unit, when the service is named otherwise", show_default=False),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="Run it on this node (repeatable)",
            rich_help_panel=_PLACE,
            show_default=False,
        ),
    ] = None,
    all_nodes: Annotated[
        bool,
        typer.Option(
            "--all-nodes",
            help="Run it on every node, joining ones included",
            rich_help_panel=_PLACE,
        ),
    ] = False,
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Let the scheduler place it on this many nodes (moved if a node dies)",
            rich_help_panel=_PLACE,
            show_default=False,
        ),
    ] = None,
    node_selector: Annotated[
        str | None,
        typer.Option(
            help="Placed: only nodes with these labels, disk=ssd,zone=a",
            rich_help_panel=_PLACE,
            show_default=False,
        ),
    ] = None,
    constraint: Annotated[
        str | None,
        typer.Option(
            help="Placed: hard rules, storage=nvme,memory>=32G",
            rich_help_panel=_PLACE,
            show_default=False,
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="Placed: best-fit, spread, ...", rich_help_panel=_PLACE, show_default=False
        ),
    ] = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Start a unit (this node by default) and record it; wait until it runs."""  # fmt: skip
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        service = service_name(name) if unit is None else validate_dns_label(name, "name")
        body = start_body(unit, node, all_nodes, replicas, node_selector, constraint, strategy)
        with session(api, token) as client:
            started = client.start_service(service, body)
            _lifecycle(client, started, "started", wait, timeout_s, output)


@service_app.command("stop")
def stop(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a service on every node it runs on; wait until it stopped."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        service = service_name(name)
        with session(api, token) as client:
            _lifecycle(client, client.stop_service(service), "stopped", wait, timeout_s, output)


@service_app.command("restart")
def restart(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Restart a service on every node (starting it if stopped); wait until it runs again."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        service = service_name(name)
        with session(api, token) as client:
            restarted = client.restart_service(service)
            _lifecycle(client, restarted, "restarted", wait, timeout_s, output)


@service_app.command("status")
def status(
    name: NameArg,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show a service's recorded state and its live state on each node."""
    with failures():
        service = service_name(name)
        with session(api, token) as client:
            found = client.get_service(service)
            if output is OutputFormat.TABLE:
                print_service(found)
            else:
                print_data(as_data(found), output)


@service_app.command("list")
def list_(
    compare_with: Annotated[
        Path | None,
        typer.Option(
            "--compare-with",
            help="Compare with a services file exported by the older system (JSON)",
            show_default=False,
        ),
    ] = None,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List every managed service (or compare them with an exported file)."""
    with failures():
        in_file = read_services_file(compare_with) if compare_with is not None else None
        with session(api, token) as client:
            items = client.list_services()
        if in_file is not None:
            rows = compare(in_file, items)
            if output is OutputFormat.TABLE:
                out.print(comparison_table(rows))
            else:
                print_data({"items": rows}, output)
            return
        if output is not OutputFormat.TABLE:
            print_data(as_data(items), output)
        elif items:
            out.print(service_table(items))
        else:
            out.print("No services.")


@service_app.command("list-cluster")
def list_cluster(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List the cluster's nodes (the same as `blixard cluster nodes`)."""
    cluster_cli.nodes(output=output, api=api, token=token)


@service_app.command("delete")
def delete(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a service everywhere and forget it; wait until its units stopped."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        service = service_name(name)
        with session(api, token) as client:
            deleted = client.delete_service(service)
            if wait:
                wait_gone(client, deleted.vms, timeout_s, service)
        if output is not OutputFormat.TABLE:
            print_data(as_data(deleted), output)
        else:
            done = "stopped everywhere" if wait else "(not waiting for its units to stop)"
            out.print(f"service [bold]{service}[/bold] deleted: {done}")


def wait_gone(client: BlixardClient, vms: list[str], timeout_s: float, name: str) -> None:
    """Poll until no instance of ``vms`` remains (their units were stopped)."""
    deadline = time.monotonic() + timeout_s
    gone = set(vms)
    while True:
        left = [i for i in client.list_instances() if i.spec.vm in gone]
        if not left:
            return
        if time.monotonic() >= deadline:
            seen = ", ".join(f"{i.metadata.name} {i.status.state.value} on {i.spec.node}"
                             for i in left)  # fmt: skip
            raise WaitTimeout(
                f"timed out after {format_duration(timeout_s)} waiting for service {name!r}'s "
                f"units to stop; last seen: {seen}"
            )
        time.sleep(POLL_INTERVAL_S)


# ------------------------------------------------------------------ files of the older system


def read_services_file(path: Path, flag: str = "--compare-with") -> list[ImportedService]:
    """Read and check an exported services file; every refusal names the place."""
    try:
        text = (
            typer.get_text_stream("stdin").read() if str(path) == "-" else path.read_text("utf-8")
        )
    except FileNotFoundError:
        raise ValidationError(flag, f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValidationError(flag, f"cannot read {path}: {reason}") from None
    try:
        return parse_import(text)
    except ValidationError as exc:
        raise ValidationError(f"{path}: {exc.field}", exc.reason) from None


def compare(in_file: list[ImportedService], items: list[Service]) -> list[dict[str, Any]]:
    """Per service: in the file, in the cluster, and the verdict."""
    cluster = {s.metadata.name: s for s in items}
    rows: list[dict[str, Any]] = []
    for entry in in_file:
        have = cluster.pop(entry.name, None)
        row: dict[str, Any] = {
            "name": entry.name,
            "file": {"unit": entry.unit, "state": entry.state.value, "nodes": entry.nodes},
            "cluster": None,
        }
        if have is None:
            row["verdict"] = "missing"
            row["differences"] = ["not in the cluster"]
        else:
            row["cluster"] = _cluster_side(have)
            diffs = []
            if have.spec.unit != entry.unit:
                diffs.append(f"unit {entry.unit} in the file, {have.spec.unit} in the cluster")
            if have.spec.state is not entry.state:
                diffs.append(
                    f"state {entry.state.value} in the file, {have.spec.state.value} in the cluster"
                )
            if entry.nodes is not None and entry.nodes != have.spec.nodes:
                diffs.append(
                    f"nodes {_nodes(entry.nodes)} in the file, {_nodes(have.spec.nodes)} in "
                    "the cluster"
                )
            row["verdict"] = "differs" if diffs else "same"
            row["differences"] = diffs
        rows.append(row)
    for name, have in sorted(cluster.items()):
        rows.append(
            {
                "name": name,
                "file": None,
                "cluster": _cluster_side(have),
                "verdict": "extra",
                "differences": ["not in the file"],
            }
        )
    return rows


def _cluster_side(service: Service) -> dict[str, Any]:
    return {
        "unit": service.spec.unit,
        "state": service.spec.state.value,
        "nodes": service.spec.nodes,
        "live": service.status.phase.value,
    }


def _nodes(nodes: list[str] | str | None) -> str:
    if nodes is None:
        return "placed"
    return nodes if isinstance(nodes, str) else ",".join(nodes)


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "IN FILE", "IN CLUSTER", "LIVE", "VERDICT"):
        table.add_column(column, no_wrap=True)
    table.add_column("DIFFERENCES")
    for row in rows:
        f, c = row["file"], row["cluster"]
        table.add_row(
            row["name"],
            f"{f['state']} on {_nodes(f['nodes']) if f['nodes'] else 'this node'}" if f else "-",
            f"{c['state']} on {_nodes(c['nodes'])}" if c else "-",
            c["live"] if c else "-",
            row["verdict"],
            Text("; ".join(row["differences"])),
        )
    return table
