"""``blixard cluster ...``: membership and taking nodes out of service.

Forming a cluster happens at ``blixard node start`` (``--cluster-init``,
``--join URL``); these commands inspect it and change it through any node's
API. ``leave`` acts on the node whose API answers (the local node by default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from blixard.cli.console import err, out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TimeoutOption,
    TokenOption,
    failures,
    session,
)
from blixard.cli.output import as_data, print_data
from blixard.cli.wait import POLL_INTERVAL_S, WaitTimeout
from blixard.client.http import BlixardClient, ClusterNode, ClusterStatus
from blixard.domain.node import Node
from blixard.domain.units import format_duration, format_mib, parse_duration_s

cluster_app = typer.Typer(
    help="Inspect the cluster and take nodes out of service.", no_args_is_help=True
)

NodeArgument = Annotated[str, typer.Argument(help="The node's name", show_default=False)]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def scheduling(node: Node) -> str:
    """``schedulable``, ``cordoned`` or ``draining``."""
    if node.spec.draining:
        return "draining"
    return "cordoned" if node.spec.cordoned else "schedulable"


def _labels(node: Node) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(node.metadata.labels.items())) or "-"


def nodes_table(items: Sequence[ClusterNode]) -> Table:
    """``cluster nodes``: one row per node, with capacity and what is allocated."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("NAME", "ALIVE", "ROLES", "ZONE", "LABELS", "VCPUS", "MEMORY", "HYPERVISORS")
    for column in (*columns, "KVM", "SCHEDULING", "INSTANCES"):
        table.add_column(column, no_wrap=column != "LABELS")
    for item in items:
        node, st = item.node, item.node.status
        table.add_row(
            node.metadata.name,
            _yes(item.alive),
            ",".join(r.value for r in node.spec.roles),
            node.spec.zone or "-",
            Text(_labels(node)),
            f"{st.allocated.vcpus}/{st.capacity.vcpus}",
            f"{format_mib(st.allocated.memory_mib)}/{format_mib(st.capacity.memory_mib)}",
            ",".join(h.value for h in st.hypervisors) or "-",
            st.kvm.value,
            scheduling(node),
            str(item.instances),
        )
    return table


def print_status(status: ClusterStatus) -> None:
    """``cluster status``: the store, this node, the nodes, then the etcd members."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    store = status.backend
    if status.backend == "etcd":
        managed = "members run by Blixard" if status.managed else "external"
        target = f", target {status.target_members} members" if status.target_members else ""
        store += f" ({managed}{target})"
    elif status.store.get("path"):
        store += f" at {status.store['path']} (a single node: no cluster)"
    n = status.nodes
    rows = [
        ("Store", store),
        ("This node", f"{status.this_node.name} ({status.this_node.role})"),
        ("Controllers", f"led by {status.controller_leader}" if status.controller_leader else "-"),
        (
            "Nodes",
            f"{n.total} total: {n.alive} alive, {n.down} down, {n.cordoned} cordoned, "
            f"{n.draining} draining",
        ),
    ]
    if status.join_token:
        rows.append(("Join token", status.join_token))
    for key, value in rows:
        grid.add_row(key, Text(value))
    out.print(grid)
    if not status.members:
        return
    out.print()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("MEMBER", "ID", "LEADER", "HEALTHY", "CLIENT URLS", "PEER URLS"):
        table.add_column(column, no_wrap=True)
    for m in status.members:
        healthy = "-" if m.healthy is None else _yes(m.healthy)
        table.add_row(
            m.name or "(not started)",
            m.id,
            "*" if m.leader else "",
            healthy,
            ",".join(m.client_urls) or "-",
            ",".join(m.peer_urls),
        )
    out.print(table)


@cluster_app.command("status")
def status(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show the store, the etcd members (leader, health), node counts and this node."""
    with failures(), session(api, token) as client:
        answer = client.cluster_status()
        if output is OutputFormat.TABLE:
            print_status(answer)
        else:
            print_data(as_data(answer), output)


@cluster_app.command("nodes")
def nodes(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List every node: liveness, roles, zone, labels, capacity and allocation, load."""
    with failures(), session(api, token) as client:
        items = client.cluster_nodes()
        if output is not OutputFormat.TABLE:
            print_data(as_data(items), output)
        elif items:
            out.print(nodes_table(items))
        else:
            out.print("No nodes.")


def _print_node(item: ClusterNode, verb: str, output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        out.print(f"node {item.node.metadata.name} {verb} ({scheduling(item.node)})")
    else:
        print_data(as_data(item), output)


@cluster_app.command("cordon")
def cordon(
    name: NodeArgument,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Place nothing new on a node (what runs there stays)."""
    with failures(), session(api, token) as client:
        _print_node(client.cordon_node(name), "cordoned", output)


@cluster_app.command("uncordon")
def uncordon(
    name: NodeArgument,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Schedule on a node again (also ends a drain)."""
    with failures(), session(api, token) as client:
        _print_node(client.uncordon_node(name), "uncordoned", output)


def assigned_to(client: BlixardClient, name: str) -> list[str]:
    """The instances still assigned to node ``name``."""
    return sorted(i.metadata.name for i in client.list_instances() if i.spec.node == name)


def wait_drained(client: BlixardClient, name: str, timeout_s: float) -> None:
    """Poll until no instance is assigned to ``name``, or raise WaitTimeout saying what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = assigned_to(client, name)
        if not left:
            return
        if time.monotonic() >= deadline:
            shown = ", ".join(left[:10]) + (", ..." if len(left) > 10 else "")
            raise WaitTimeout(
                f"node {name} still has {len(left)} instance(s) assigned after "
                f"{format_duration(timeout_s)}: {shown}"
            )
        time.sleep(POLL_INTERVAL_S)


@cluster_app.command("drain")
def drain(
    name: NodeArgument,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Wait until no instance is assigned to the node"),
    ] = True,
    timeout: TimeoutOption = "5m",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Cordon a node and move its instances to other nodes (each stops here first)."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        with session(api, token) as client:
            answer = client.drain_node(name)
            if output is OutputFormat.TABLE:
                out.print(f"node {name} draining: {answer.instances} instance(s) to move")
            if wait:
                wait_drained(client, name, timeout_s)
                if output is OutputFormat.TABLE:
                    out.print(f"node {name} drained")
            if output is not OutputFormat.TABLE:
                after = answer.model_copy(update={"instances": len(assigned_to(client, name))})
                print_data(as_data(after), output)


@cluster_app.command("remove-node")
def remove_node(
    name: NodeArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Remove it even though it is alive")
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Remove a node that is down: its etcd member (if any), then its record."""
    with failures(), session(api, token) as client:
        answer = client.remove_node(name, force=force)
        if output is OutputFormat.TABLE:
            member = " and its etcd member" if answer.removed_member else ""
            out.print(f"node {name} removed{member}")
        else:
            print_data(as_data(answer), output)


@cluster_app.command("leave")
def leave(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The node whose API answers leaves the cluster, and its daemon stops."""
    with failures(), session(api, token) as client:
        answer = client.leave_cluster()
        if output is OutputFormat.TABLE:
            member = " (its etcd member removed)" if answer.removed_member else ""
            out.print(f"node {answer.node} left the cluster{member}; its daemon is stopping")
            if not answer.removed_record:
                err.print(f"warning: the record of node {answer.node} could not be deleted")
        else:
            print_data(as_data(answer), output)


@cluster_app.command("join-token")
def join_token(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Print the cluster's join token (for `blixard node start --join URL --join-token ...`)."""
    with failures(), session(api, token) as client:
        answer = client.join_token()
        if output is OutputFormat.TABLE:
            out.print(answer.token, soft_wrap=True)
        else:
            print_data(as_data(answer), output)
