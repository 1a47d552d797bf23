"""Printing API objects: rich tables for people, JSON or YAML for programs.

JSON and YAML print the API's own objects (the same shapes the API answers,
``{"vm", "instances"}`` or ``{"items": [...]}``), written plainly to stdout
with no colour or wrapping so they can be piped. Tables summarise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml
from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from blixard.cli.console import out
from blixard.cli.options import OutputFormat
from blixard.client.models import NodeDetails, VMDetails
from blixard.domain.instance import Instance, ObservedState
from blixard.domain.units import format_duration, format_mib


def as_data(obj: BaseModel | Sequence[BaseModel]) -> Any:
    """The JSON-able form of an object, or ``{"items": [...]}`` for a list (as the API sends)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return {"items": [item.model_dump(mode="json") for item in obj]}


def print_data(data: Any, fmt: OutputFormat) -> None:
    """JSON (indented) or YAML (block style, keys in the models' order) on stdout."""
    if fmt is OutputFormat.JSON:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    sys.stdout.write(text)
    sys.stdout.flush()


def _age(created: datetime | None) -> str:
    if created is None:
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - created).total_seconds())
    return format_duration(float(int(seconds))) if seconds >= 1 else "0s"


def _running(instances: Sequence[Instance]) -> int:
    return sum(1 for i in instances if i.status.state is ObservedState.RUNNING)


def vm_table(items: Sequence[VMDetails]) -> Table:
    """``vm list``: one row per VM."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "PHASE", "DESIRED", "RUNNING", "HYPERVISOR", "VCPUS", "MEMORY", "AGE"):
        table.add_column(column, no_wrap=True)
    for d in items:
        spec = d.vm.spec
        table.add_row(
            d.vm.metadata.name,
            d.vm.status.phase.value,
            "running" if spec.running else "stopped",
            f"{_running(d.instances)}/{spec.replicas}",
            spec.hypervisor.value,
            str(spec.vcpus),
            format_mib(spec.memory_mib),
            _age(d.vm.metadata.created_at),
        )
    return table


def instance_table(instances: Sequence[Instance]) -> Table:
    """The replicas of one VM."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("INSTANCE", "NODE", "STATE", "READY", "RESTARTS", "EPOCH"):
        table.add_column(column, no_wrap=True)
    table.add_column("MESSAGE")
    for i in instances:
        table.add_row(
            i.metadata.name,
            i.spec.node or "-",
            i.status.state.value,
            "yes" if i.status.ready else "no",
            str(i.status.restarts),
            str(i.spec.epoch),
            Text(i.status.message),
        )
    return table


def _fields(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def print_vm(d: VMDetails) -> None:
    """``vm status``: the VM's spec and status, then its instances."""
    vm, spec = d.vm, d.vm.spec
    boot = spec.boot
    source = {
        "kernel": boot.kernel,
        "image": boot.image,
        "flake": boot.flake,
        "command": " ".join(boot.command or []),
        "unit": boot.unit,
    }[boot.kind]
    rows = [
        ("Name", vm.metadata.name),
        ("Phase", vm.status.phase.value + (f" ({vm.status.message})" if vm.status.message else "")),
        ("Desired", "running" if spec.running else "stopped"),
        ("Replicas", f"{_running(d.instances)}/{spec.replicas} running"),
        ("Hypervisor", f"{spec.hypervisor.value} (accel {spec.accel.value})"),
        ("Resources", f"{spec.vcpus} vCPU, {format_mib(spec.memory_mib)}"),
        ("Boot", f"{boot.kind} {source}"),
        ("Generation", f"{vm.metadata.generation} (observed {vm.status.observed_generation})"),
        ("Restarts asked", str(spec.restart_generation)),
        ("Created", vm.metadata.created_at.isoformat() if vm.metadata.created_at else "-"),
    ]
    if vm.status.placement_reason:
        rows.append(("Placement", vm.status.placement_reason))
    out.print(_fields(rows))
    out.print()
    if d.instances:
        out.print(instance_table(d.instances))
    else:
        out.print("No instances yet.")


def node_table(items: Sequence[NodeDetails]) -> Table:
    """``node list``: one row per node."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "ALIVE", "READY", "ROLES", "VCPUS", "MEMORY", "KVM", "API"):
        table.add_column(column, no_wrap=True)
    for d in items:
        node = d.node
        table.add_row(
            node.metadata.name,
            "yes" if d.alive else "no",
            "yes" if node.status.ready else "no",
            ",".join(r.value for r in node.spec.roles),
            str(node.status.capacity.vcpus),
            format_mib(node.status.capacity.memory_mib),
            node.status.kvm.value,
            node.spec.api_url or "-",
        )
    return table


def print_node(d: NodeDetails) -> None:
    """``node status``: one node's record and liveness."""
    node, st = d.node, d.node.status
    cap, alloc = st.capacity, st.allocated
    beat = st.last_heartbeat.isoformat() if st.last_heartbeat else "-"
    kvm = st.kvm.value + (f" ({st.kvm_detail})" if st.kvm_detail else "")
    rows = [
        ("Name", node.metadata.name),
        ("Alive", "yes" if d.alive else "no (its liveness lease expired or was revoked)"),
        ("Ready", "yes" if st.ready else "no"),
        ("Roles", ", ".join(r.value for r in node.spec.roles)),
        ("Zone", node.spec.zone or "-"),
        ("Cordoned", "yes" if node.spec.cordoned else "no"),
        ("API", node.spec.api_url or "-"),
        (
            "Capacity",
            f"{cap.vcpus} vCPU, {format_mib(cap.memory_mib)} memory, "
            f"{format_mib(cap.disk_mib)} disk",
        ),
        ("Allocated", f"{alloc.vcpus} vCPU, {format_mib(alloc.memory_mib)} memory"),
        ("Hypervisors", ", ".join(h.value for h in st.hypervisors) or "-"),
        ("KVM", kvm),
        ("Agent version", st.agent_version or "-"),
        ("Last heartbeat", beat),
    ]
    out.print(_fields(rows))
