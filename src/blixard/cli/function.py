"""``blixard function ...``: serverless functions through the API (docs/functions.md).

The server is the authority on what a valid function is; this module turns
flags (or a YAML/JSON file) into the document the API takes, parsing only
what exists on the command line alone: sizes and durations written as text,
``K=V`` pairs, files named by path (a ``.nix`` handler is read here, because
the daemon that runs it may be on another machine), and the invocation's
event, which is checked to be JSON before anything is sent so a typo is
reported with its position instead of as a server refusal.

Functions are not waited for: a function scales to zero, so "created" is the
whole story until the first invocation (which starts a worker on demand).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blixard.cli.console import EXIT_FAILED, err, out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TokenOption,
    client_session,
    failures,
)
from blixard.cli.output import as_data, print_data
from blixard.cli.spec import load_document
from blixard.client.functions import FunctionClient, FunctionMetrics, Invocation, Quantiles
from blixard.domain.errors import (
    BlixardError,
    Conflict,
    HandlerFailed,
    HandlerTimeout,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    ValidationError,
)
from blixard.domain.function import (
    HTTP_METHODS,
    MAX_SCALE_DOWN_DELAY_S,
    MAX_TIMEOUT_S,
    Function,
    Runtime,
    validate_trigger_path,
)
from blixard.domain.units import format_duration, format_mib, parse_duration_s, to_mib

function_app = typer.Typer(
    help="Create, invoke and observe serverless functions.", no_args_is_help=True
)

_SPEC = "Function spec (instead of -f)"
_SCALE = "Concurrency and scaling (instead of -f)"
_PLACE = "Placement (instead of -f)"
_NIX_SUFFIX = ".nix"

NameArg = Annotated[str, typer.Argument(help="The function's name", show_default=False)]
FileOpt = Annotated[
    str | None,
    typer.Option(
        "--file",
        "-f",
        help="A Function document in YAML or JSON ('-' for stdin)",
        show_default=False,
    ),
]
RuntimeOpt = Annotated[
    Runtime | None,
    typer.Option(
        "--runtime",
        help="nix, command or microvm (default: nix for a .nix --config or --handler)",
        case_sensitive=False,
        show_default=False,
        rich_help_panel=_SPEC,
    ),
]
HandlerOpt = Annotated[
    str | None,
    typer.Option(
        "--handler",
        help="A Nix expression (nix), or an executable and its arguments (command, microvm)",
        show_default=False,
        rich_help_panel=_SPEC,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "--handler-file",
        help="The handler as a file: a .nix file is read here and sent as the handler; "
        "for command and microvm it is the executable's path",
        show_default=False,
        rich_help_panel=_SPEC,
    ),
]
ArgOpt = Annotated[
    list[str] | None,
    typer.Option("--arg", help="An argument of the command (repeatable)", rich_help_panel=_SPEC),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", help="An environment variable, K=V (repeatable)", rich_help_panel=_SPEC),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(help="Memory per worker with a unit, e.g. 128M", rich_help_panel=_SPEC),
]
VcpusOpt = Annotated[int | None, typer.Option(help="vCPUs per worker", rich_help_panel=_SPEC)]
FnTimeoutOpt = Annotated[
    str | None,
    typer.Option(
        "--timeout",
        help="Longest execution before it is killed, e.g. 30s (default 30s)",
        show_default=False,
        rich_help_panel=_SPEC,
    ),
]
MaxConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--concurrent-executions",
        "--max-concurrent",
        help="Executions in flight across the cluster (default 100)",
        show_default=False,
        rich_help_panel=_SCALE,
    ),
]
QueueLimitOpt = Annotated[
    int | None,
    typer.Option(help="Invocations a gateway holds waiting, then 429", rich_help_panel=_SCALE),
]
MinInstancesOpt = Annotated[
    int | None, typer.Option(help="Workers kept warm (default 0)", rich_help_panel=_SCALE)
]
MaxInstancesOpt = Annotated[
    int | None, typer.Option(help="Most workers (default 10)", rich_help_panel=_SCALE)
]
TargetConcurrencyOpt = Annotated[
    int | None,
    typer.Option(help="In-flight invocations aimed for per worker", rich_help_panel=_SCALE),
]
ScaleDownDelayOpt = Annotated[
    str | None,
    typer.Option(help="Idle time before a worker is removed, e.g. 60s", rich_help_panel=_SCALE),
]
TriggerPathOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trigger-path",
        help="An HTTP trigger on this path, GET and POST (repeatable)",
        rich_help_panel=_SPEC,
    ),
]
StrategyOpt = Annotated[
    str | None,
    typer.Option(
        "--placement-strategy",
        help="best-fit, spread, data-locality, network-proximity, specialization (comma-separated)",
        rich_help_panel=_PLACE,
    ),
]
PreferOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--prefer", help="Preferred node labels, k=v (repeatable)", rich_help_panel=_PLACE
    ),
]
ConstraintOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--constraint",
        help="Hard rules on node labels and capacity: gpu.memory>=8G (repeatable)",
        rich_help_panel=_PLACE,
    ),
]
NodeSelectorOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--node-selector", help="Only nodes with these labels, k=v (repeatable)",
        rich_help_panel=_PLACE,
    ),
]  # fmt: skip
DataHintOpt = Annotated[
    str | None,
    typer.Option(
        "--data-hint", help="Where its data lives, e.g. ceph-pool:raw-data", rich_help_panel=_PLACE
    ),
]


# ---------------------------------------------------------------- flags to a document


@dataclass(frozen=True, slots=True)
class FunctionFlags:
    """The ``function create``/``update`` flags that describe the function (None = not given)."""

    runtime: Runtime | None = None
    handler: str | None = None
    config: str | None = None
    args: Sequence[str] | None = None
    env: Sequence[str] | None = None
    memory: str | None = None
    vcpus: int | None = None
    timeout: str | None = None
    max_concurrency: int | None = None
    queue_limit: int | None = None
    min_instances: int | None = None
    max_instances: int | None = None
    target_concurrency: int | None = None
    scale_down_delay: str | None = None
    trigger_paths: Sequence[str] | None = None
    placement_strategy: str | None = None
    prefer: Sequence[str] | None = None
    constraint: Sequence[str] | None = None
    node_selector: Sequence[str] | None = None
    data_hint: str | None = None

    def given(self) -> list[str]:
        """The flags that were given, as typed (a repeatable flag given zero times is not)."""
        spelled = {
            "args": "--arg",
            "max_concurrency": "--max-concurrent",
            "trigger_paths": "--trigger-path",
            "config": "--config",
        }
        return [
            spelled.get(f.name, "--" + f.name.replace("_", "-"))
            for f in fields(self)
            if getattr(self, f.name) not in (None, [], ())
        ]


def _is_nix_file(text: str | None) -> bool:
    return text is not None and text.strip().endswith(_NIX_SUFFIX)


def infer_runtime(flags: FunctionFlags, current: Runtime | None = None) -> Runtime | None:
    """The runtime the flags mean: --runtime, else nix for a .nix handler, else ``current``."""
    if flags.runtime is not None:
        return flags.runtime
    if _is_nix_file(flags.config) or _is_nix_file(flags.handler):
        return Runtime.NIX
    return current


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValidationError(flag, f"file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValidationError(flag, f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ValidationError(flag, f"cannot read {path}: {exc.strerror}") from None


def _handler_fields(flags: FunctionFlags, runtime: Runtime) -> dict[str, Any]:
    """``handler`` (and ``args`` when the handler text carries some) from the flags.

    * nix: ``--config FILE`` is read and its text is the handler (the daemon
      running it may be another machine); ``--handler`` is an expression, or
      a ``.nix`` path, made absolute since a relative path means nothing to
      the daemon.
    * command: the handler is an executable; ``--handler "python3 h.py"`` is
      split as a shell would into the executable and leading arguments (then
      any ``--arg``); a path with a '/' in it is made absolute, a bare name
      is looked up on the node's PATH. ``--config FILE`` is a local path.
    * microvm: the handler is a shell command line the guest's ``sh`` runs
      (``read -r e; echo ...``): sent as written, never split, and a path in
      it is the guest's; ``--config FILE`` sends the file's text (a script).
    """
    if flags.handler is not None and flags.config is not None:
        raise ValidationError("--handler", "cannot be combined with --config; give one of them")
    spec: dict[str, Any] = {}
    if flags.config is not None:
        if runtime in (Runtime.NIX, Runtime.MICROVM):  # the text goes where it runs
            spec["handler"] = _read_text(flags.config, "--config")
        else:
            path = os.path.abspath(flags.config)
            if not os.path.isfile(path):
                raise ValidationError("--config", f"file {flags.config} does not exist")
            spec["handler"] = path
        return spec
    assert flags.handler is not None
    handler = flags.handler
    if runtime is Runtime.NIX:
        stripped = handler.strip()
        if _is_nix_file(stripped) and not any(c.isspace() for c in stripped):
            handler = os.path.abspath(stripped)
        spec["handler"] = handler
        return spec
    if runtime is Runtime.MICROVM:
        spec["handler"] = handler
        return spec
    try:
        words = shlex.split(handler)
    except ValueError as exc:
        raise ValidationError("--handler", f"cannot be split like a shell would: {exc}") from None
    if not words:
        raise ValidationError("--handler", "is empty")
    executable = words[0]
    if runtime is Runtime.COMMAND and "/" in executable and not executable.startswith("/"):
        executable = os.path.abspath(executable)
    spec["handler"] = executable
    if len(words) > 1:
        spec["args"] = [*words[1:], *(flags.args or [])]
    return spec


def _env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValidationError("--env", f"must be NAME=VALUE, got {item!r}")
        if key in env:
            raise ValidationError("--env", f"{key} is given twice")
        env[key] = value
    return env


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    """``k=v`` pairs, each item possibly several ("gpu=available,zone=a")."""
    pairs: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValidationError(flag, f"must be key=value[,key=value...], got {item!r}")
            pairs[key.strip()] = value.strip()
    return pairs


def spec_from_flags(flags: FunctionFlags, current_runtime: Runtime | None = None) -> dict[str, Any]:
    """The spec fields the flags set, and only those (the server fills its defaults).

    ``current_runtime`` is the stored function's, for ``update``: it decides
    how a new --handler or --config is read when --runtime is not given.
    ``placement`` holds only the placement flags given, so ``update`` can
    merge it field by field.
    """
    spec: dict[str, Any] = {}
    runtime = infer_runtime(flags, current_runtime)
    if runtime is not None and (flags.runtime is not None or runtime is not current_runtime):
        spec["runtime"] = runtime.value
    if flags.handler is not None or flags.config is not None:
        if runtime is None:
            raise ValidationError(
                "--runtime",
                "is required: nix, command or microvm (only a .nix --config or --handler "
                "implies nix)",
            )
        spec.update(_handler_fields(flags, runtime))
    if flags.args and "args" not in spec:
        spec["args"] = list(flags.args)
    if flags.env:
        spec["env"] = _env(flags.env)
    if flags.memory is not None:
        spec["memory_mib"] = to_mib(flags.memory, "--memory")
    if flags.vcpus is not None:
        spec["vcpus"] = flags.vcpus
    if flags.timeout is not None:
        spec["timeout_s"] = parse_duration_s(flags.timeout, "--timeout", maximum_s=MAX_TIMEOUT_S)
    for key in (
        "max_concurrency",
        "queue_limit",
        "min_instances",
        "max_instances",
        "target_concurrency",
    ):
        value = getattr(flags, key)
        if value is not None:
            spec[key] = value
    if flags.scale_down_delay is not None:
        spec["scale_down_delay_s"] = parse_duration_s(
            flags.scale_down_delay,
            "--scale-down-delay",
            allow_zero=True,
            maximum_s=MAX_SCALE_DOWN_DELAY_S,
        )
    if flags.trigger_paths:
        spec["triggers"] = [
            {"type": "http", "path": validate_trigger_path(path, "--trigger-path")}
            for path in flags.trigger_paths
        ]
    placement: dict[str, Any] = {}
    if flags.placement_strategy is not None:
        placement["strategy"] = flags.placement_strategy  # the server splits "a,b"
    if flags.prefer:
        placement["preferred_labels"] = _pairs(flags.prefer, "--prefer")
    if flags.constraint:
        placement["constraints"] = ",".join(flags.constraint)  # the server parses "a=b,m>=1G"
    if flags.node_selector:
        placement["node_selector"] = _pairs(flags.node_selector, "--node-selector")
    if flags.data_hint is not None:
        placement["data_hint"] = flags.data_hint
    if placement:
        spec["placement"] = placement
    return spec


def document_from_flags(name: str, flags: FunctionFlags) -> dict[str, Any]:
    """A Function document for ``create``: a handler is required, the rest is optional."""
    if flags.handler is None and flags.config is None:
        raise ValidationError(
            "--handler", "is required (or --config FILE, or the whole function with -f)"
        )
    spec = spec_from_flags(flags)  # a handler without a runtime is refused there
    return {"kind": "Function", "metadata": {"name": name}, "spec": spec}


def merge_spec(spec: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``patch``'s fields replaced; placement is merged field by field."""
    merged = {**spec, **{k: v for k, v in patch.items() if k != "placement"}}
    if "placement" in patch:
        merged["placement"] = {**(spec.get("placement") or {}), **patch["placement"]}
    return merged


def update_document(current: Function, flags: FunctionFlags) -> dict[str, Any]:
    """The PUT document for ``update``: the stored function with the flags applied.

    It carries the stored ``resource_version``, so a concurrent write makes
    the PUT fail with Conflict instead of being silently overwritten.
    """
    patch = spec_from_flags(flags, current.spec.runtime)
    spec = merge_spec(current.spec.model_dump(mode="json"), patch)
    meta = current.metadata
    return {
        "kind": "Function",
        "metadata": {
            "name": meta.name,
            "labels": dict(meta.labels),
            "resource_version": meta.resource_version,
        },
        "spec": spec,
    }


def load_function_document(path: str, name: str | None) -> dict[str, Any]:
    """A Function document from a file; NAME fills a missing name and must agree with one."""
    try:
        document = load_document(path)
    except ValidationError as exc:
        if exc.reason.endswith("one VM document"):  # spec.py's wording is the VM's
            raise ValidationError(
                exc.field, "is empty; it should hold one Function document"
            ) from None
        raise
    if not isinstance(document, dict):
        raise ValidationError(path, "must hold one Function document (a mapping)")
    document.setdefault("kind", "Function")
    meta = document.setdefault("metadata", {})
    if isinstance(meta, dict) and name is not None:
        if "name" in meta and meta["name"] != name:
            raise ValidationError(
                "NAME",
                f"is {name!r} but {path} names the function {meta['name']!r}; "
                "drop NAME or make them agree",
            )
        meta["name"] = name
    return document


def _document_name(document: dict[str, Any], path: str) -> str:
    meta = document.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        raise ValidationError("NAME", f"is required: {path} has no metadata.name")
    return name


# ---------------------------------------------------------------- events


def _stdin_bytes() -> bytes:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        data: bytes = buffer.read()
        return data
    return sys.stdin.read().encode()


def read_event(data: str | None, data_file: str | None) -> tuple[bytes | None, str]:
    """The event to send (checked to be JSON) and the flag it came from.

    None when neither is given: the gateway then hands the handler ``null``.
    """
    if data is not None and data_file is not None:
        raise ValidationError("--data", "cannot be combined with --data-file")
    if data is None and data_file is None:
        return None, "--data"
    if data_file is not None:
        flag, shown = "--data-file", data_file
        try:
            with open(data_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValidationError(flag, f"file {data_file} does not exist") from None
        except OSError as exc:
            raise ValidationError(flag, f"cannot read {data_file}: {exc.strerror}") from None
    elif data == "-":
        flag, shown, raw = "--data", "<stdin>", _stdin_bytes()
    else:
        assert data is not None
        flag, shown, raw = "--data", "", data.encode()
    where = f"{shown} " if shown else ""
    try:
        json.loads(raw)
    except UnicodeDecodeError:
        raise ValidationError(flag, f"{where}is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(
            flag,
            f"{where}is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
            f"(char {exc.pos})",
        ) from None
    return raw, flag


def invocation_data(inv: Invocation) -> dict[str, Any]:
    """``invoke -o json``: the answer and the gateway's facts; a JSON body as JSON."""
    text = inv.body.decode("utf-8", errors="replace")
    body: Any = text
    if "json" in inv.content_type.lower() and text.strip():
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    return {
        "status": inv.status,
        "headers": inv.headers,
        "body": body,
        "cold_start": inv.cold_start,
        "node": inv.node,
        "worker": inv.worker,
        "duration_ms": inv.duration_ms,
        "request_id": inv.request_id,
    }


def invocation_line(inv: Invocation) -> str:
    """``invoke -v``: status, cold or warm, where and how long, on one line."""
    parts = [f"HTTP {inv.status}"]
    if inv.cold_start is not None:
        parts.append("cold start" if inv.cold_start else "warm start")
    if inv.node:
        parts.append(f"node {inv.node}")
    if inv.worker:
        parts.append(f"worker {inv.worker}")
    if inv.duration_ms is not None:
        parts.append(f"{inv.duration_ms:g} ms")
    if inv.request_id:
        parts.append(f"request {inv.request_id}")
    return " · ".join(parts)


# ---------------------------------------------------------------- printing


def _grid(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def nodes_text(nodes: dict[str, int]) -> str:
    """``{"n1": 2, "n3": 1}`` as ``n1:2,n3:1`` (sorted), ``-`` for none."""
    return ",".join(f"{n}:{c}" for n, c in sorted(nodes.items())) or "-"


def triggers_text(fn: Function) -> str:
    return ",".join(t.path for t in fn.spec.triggers) or "-"


def function_table(items: Sequence[Function]) -> Table:
    """``function list``: one row per function, with its workers and where they are."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "RUNTIME", "WORKERS", "WARM", "BUSY", "NODES", "TRIGGERS"):
        table.add_column(column, no_wrap=True)
    for fn in items:
        st = fn.status
        table.add_row(
            fn.metadata.name,
            fn.spec.runtime.value,
            str(st.workers),
            str(st.warm_workers),
            str(st.busy_workers),
            nodes_text(st.nodes),
            triggers_text(fn),
        )
    return table


def _short(text: str, limit: int = 72) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    if len(first) > limit or first != text.strip():
        return first[:limit].rstrip() + " …"
    return first


def function_rows(fn: Function) -> list[tuple[str, str]]:
    """``function get``: the spec a user wrote and what the autoscaler reports."""
    spec, st, meta = fn.spec, fn.status, fn.metadata
    handler = " ".join([_short(spec.handler), *(shlex.quote(a) for a in spec.args)])
    rows = [
        ("Name", meta.name),
        ("Phase", st.phase.value + (f" ({st.message})" if st.message else "")),
        ("Runtime", spec.runtime.value),
        ("Handler", handler),
        ("Resources", f"{spec.vcpus} vCPU, {format_mib(spec.memory_mib)} per worker"),
        ("Timeout", format_duration(spec.timeout_s)),
        (
            "Concurrency",
            f"max {spec.max_concurrency}, queue {spec.queue_limit}, "
            f"target {spec.target_concurrency} per worker",
        ),
        (
            "Instances",
            f"{spec.min_instances}-{spec.max_instances}, scale down after "
            f"{format_duration(spec.scale_down_delay_s)} idle",
        ),
        (
            "Workers",
            f"{st.workers} ({st.warm_workers} warm, {st.busy_workers} busy) on "
            f"{nodes_text(st.nodes)}",
        ),
        (
            "Triggers",
            "; ".join(f"{','.join(t.methods)} {t.path}" for t in spec.triggers) or "-",
        ),
    ]
    if spec.env:
        rows.append(("Env", " ".join(f"{k}={v}" for k, v in spec.env.items())))
    placement = spec.placement
    where = []
    if placement.strategy:
        where.append("strategy " + ",".join(s.value for s in placement.strategy))
    if placement.preferred_labels:
        where.append(
            "prefer " + ",".join(f"{k}={v}" for k, v in placement.preferred_labels.items())
        )
    if placement.constraints:
        where.append("constraints " + ",".join(str(c) for c in placement.constraints))
    if placement.node_selector:
        where.append("nodes " + ",".join(f"{k}={v}" for k, v in placement.node_selector.items()))
    if placement.data_hint:
        where.append(f"data {placement.data_hint}")
    rows.append(("Placement", "; ".join(where) or "-"))
    rows.append(("Generation", f"{meta.generation} (observed {st.observed_generation})"))
    rows.append(("Created", meta.created_at.isoformat() if meta.created_at else "-"))
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def _summary(q: Quantiles) -> str:
    if q.count == 0:
        return "-"
    return f"avg {_ms(q.avg)}, p50 {_ms(q.p50)}, p99 {_ms(q.p99)} ({q.count})"


def metrics_rows(m: FunctionMetrics) -> list[tuple[str, str]]:
    """``function metrics``: counters, then the latency summaries."""
    return [
        ("Function", m.function),
        ("Nodes", ", ".join(m.nodes) or "-"),
        ("Invocations", str(m.invocations)),
        ("Errors", str(m.errors)),
        ("Timeouts", str(m.timeouts)),
        ("Rejected", str(m.rejected)),
        ("Cold starts", str(m.cold_starts)),
        ("Warm starts", str(m.warm_starts)),
        ("Avg duration", _ms(m.duration_ms.avg if m.duration_ms.count else None)),
        ("p50 duration", _ms(m.duration_ms.p50 if m.duration_ms.count else None)),
        ("p99 duration", _ms(m.duration_ms.p99 if m.duration_ms.count else None)),
        ("Avg cold start", _ms(m.cold_start_ms.avg if m.cold_start_ms.count else None)),
        ("Cold start", _summary(m.cold_start_ms)),
        ("Queue time", _summary(m.queue_ms)),
    ]


def _print_function(fn: Function, output: OutputFormat, line: str | None = None) -> None:
    if output is not OutputFormat.TABLE:
        print_data(as_data(fn), output)
        return
    if line is not None:
        out.print(line)
    out.print(_grid(function_rows(fn)))


# ---------------------------------------------------------------- session and errors


def _session(api: str | None, token: str | None) -> AbstractContextManager[FunctionClient]:
    """As :func:`blixard.cli.options.session`, with the functions routes."""
    return client_session(api, token, FunctionClient)


@contextmanager
def _known(name: str) -> Iterator[None]:
    """A 404 about one function says so in the same words everywhere."""
    try:
        yield
    except NotFound:
        raise NotFound(f"function {name!r} does not exist") from None


def _gateway_url(client: FunctionClient) -> str | None:
    """The answering node's gateway address (its Node record's ``gateway_url``).

    None when the node runs no gateway or cannot be asked: the caller then
    prints the trigger's path alone rather than guess a host and port.
    """
    try:
        node = client.get_node(client.health().node).node
    except BlixardError:
        return None
    url = node.spec.gateway_url
    return url.rstrip("/") if url else None


# ---------------------------------------------------------------- commands


@function_app.command("create")
def create(
    name: Annotated[
        str | None,
        typer.Argument(help="The function's name (optional with -f)", show_default=False),
    ] = None,
    file: FileOpt = None,
    runtime: RuntimeOpt = None,
    handler: HandlerOpt = None,
    config: ConfigOpt = None,
    arg: ArgOpt = None,
    env: EnvOpt = None,
    memory: MemoryOpt = None,
    vcpus: VcpusOpt = None,
    timeout: FnTimeoutOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    queue_limit: QueueLimitOpt = None,
    min_instances: MinInstancesOpt = None,
    max_instances: MaxInstancesOpt = None,
    target_concurrency: TargetConcurrencyOpt = None,
    scale_down_delay: ScaleDownDelayOpt = None,
    trigger_path: TriggerPathOpt = None,
    placement_strategy: StrategyOpt = None,
    prefer: PreferOpt = None,
    constraint: ConstraintOpt = None,
    node_selector: NodeSelectorOpt = None,
    data_hint: DataHintOpt = None,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a function from flags or from a document (-f); it starts workers on demand."""
    flags = FunctionFlags(
        runtime=runtime,
        handler=handler,
        config=config,
        args=arg,
        env=env,
        memory=memory,
        vcpus=vcpus,
        timeout=timeout,
        max_concurrency=max_concurrency,
        queue_limit=queue_limit,
        min_instances=min_instances,
        max_instances=max_instances,
        target_concurrency=target_concurrency,
        scale_down_delay=scale_down_delay,
        trigger_paths=trigger_path,
        placement_strategy=placement_strategy,
        prefer=prefer,
        constraint=constraint,
        node_selector=node_selector,
        data_hint=data_hint,
    )
    with failures():
        if file is not None:
            if flags.given():
                raise ValidationError(
                    "-f",
                    f"cannot be combined with {', '.join(flags.given())}; put those in the file",
                )
            document = load_function_document(file, name)
        elif name is None:
            raise ValidationError(
                "NAME", "is required (or give the function as a document with -f)"
            )
        else:
            document = document_from_flags(name, flags)
        with _session(api, token) as client:
            fn = client.create_function(document)
            _print_function(fn, output, f"function [bold]{escape(fn.metadata.name)}[/bold] created")


@function_app.command("update")
def update(
    name: Annotated[
        str | None,
        typer.Argument(help="The function's name (optional with -f)", show_default=False),
    ] = None,
    file: FileOpt = None,
    runtime: RuntimeOpt = None,
    handler: HandlerOpt = None,
    config: ConfigOpt = None,
    arg: ArgOpt = None,
    env: EnvOpt = None,
    memory: MemoryOpt = None,
    vcpus: VcpusOpt = None,
    timeout: FnTimeoutOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    queue_limit: QueueLimitOpt = None,
    min_instances: MinInstancesOpt = None,
    max_instances: MaxInstancesOpt = None,
    target_concurrency: TargetConcurrencyOpt = None,
    scale_down_delay: ScaleDownDelayOpt = None,
    trigger_path: TriggerPathOpt = None,
    placement_strategy: StrategyOpt = None,
    prefer: PreferOpt = None,
    constraint: ConstraintOpt = None,
    node_selector: NodeSelectorOpt = None,
    data_hint: DataHintOpt = None,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Change a function: only the flags given change, or -f replaces it all.

    A list or map flag (--arg, --env, --trigger-path, --prefer, --constraint,
    --node-selector) replaces the whole list or map. Workers of the old
    version are replaced.
    """
    flags = FunctionFlags(
        runtime=runtime,
        handler=handler,
        config=config,
        args=arg,
        env=env,
        memory=memory,
        vcpus=vcpus,
        timeout=timeout,
        max_concurrency=max_concurrency,
        queue_limit=queue_limit,
        min_instances=min_instances,
        max_instances=max_instances,
        target_concurrency=target_concurrency,
        scale_down_delay=scale_down_delay,
        trigger_paths=trigger_path,
        placement_strategy=placement_strategy,
        prefer=prefer,
        constraint=constraint,
        node_selector=node_selector,
        data_hint=data_hint,
    )
    with failures():
        if file is not None:
            if flags.given():
                raise ValidationError(
                    "-f",
                    f"cannot be combined with {', '.join(flags.given())}; put those in the file",
                )
            document = load_function_document(file, name)
            target = _document_name(document, file)
            with _session(api, token) as client, _known(target):
                fn = client.replace_function(target, document)
        else:
            if name is None:
                raise ValidationError("NAME", "is required (or give the function with -f)")
            if not flags.given():
                raise ValidationError("update", "nothing to change: give flags or -f FILE")
            target = name
            with _session(api, token) as client, _known(name):
                fn = _update_with_retry(client, name, flags)
        _print_function(fn, output, f"function [bold]{escape(target)}[/bold] updated")


def _update_with_retry(client: FunctionClient, name: str, flags: FunctionFlags) -> Function:
    """GET, apply the flags, PUT with the read resource_version; on a lost race, once more.

    One retry: a second Conflict means the function is being changed busily,
    and the user had better look at it before writing again.
    """
    for attempt in (1, 2):
        current = client.get_function(name)
        document = update_document(current, flags)
        try:
            return client.replace_function(name, document)
        except Conflict:
            if attempt == 2:
                raise Conflict(
                    f"function {name!r} was changed by someone else twice while updating it; "
                    "check it and try again"
                ) from None
    raise AssertionError("unreachable")  # pragma: no cover


@function_app.command("delete")
def delete(name: NameArg, api: ApiOption = None, token: TokenOption = None) -> None:
    """Delete a function; its workers are stopped."""
    with failures(), _session(api, token) as client, _known(name):
        client.delete_function(name)
        out.print(f"function [bold]{escape(name)}[/bold] deleted (its workers are stopped)")


@function_app.command("list")
def list_functions(
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List functions with their workers: how many, warm, busy, and on which nodes."""
    with failures(), _session(api, token) as client:
        items = client.list_functions()
        if output is not OutputFormat.TABLE:
            print_data(as_data(items), output)
        elif items:
            out.print(function_table(items))
        else:
            out.print("No functions.")


@function_app.command("get")
def get(
    name: NameArg,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show one function: its spec and its workers."""
    with failures(), _session(api, token) as client, _known(name):
        _print_function(client.get_function(name), output)


@function_app.command("invoke")
def invoke(
    name: NameArg,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="The event as JSON ('-' reads it from stdin)"),
    ] = None,
    data_file: Annotated[
        str | None, typer.Option("--data-file", help="A file holding the event as JSON")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Print status, cold/warm start, node, worker, duration to stderr",
        ),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Invoke a function and print its answer's body (exit 1 if the handler answers 4xx/5xx)."""
    with failures():
        event, flag = read_event(data, data_file)
        with _session(api, token) as client:
            inv = _invoke(client, name, event, flag)
    if output is not OutputFormat.TABLE:
        print_data(invocation_data(inv), output)
    else:
        stream = sys.stdout.buffer
        stream.write(inv.body)
        if inv.body and not inv.body.endswith(b"\n") and sys.stdout.isatty():
            stream.write(b"\n")
        stream.flush()
    if verbose:
        err.print(escape(invocation_line(inv)), soft_wrap=True)
    if not inv.ok:
        if not verbose:
            err.print(f"function {escape(repr(name))} answered HTTP {inv.status}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)


def _invoke(client: FunctionClient, name: str, event: bytes | None, flag: str) -> Invocation:
    """Invoke, naming the function (and the flag, for a too large event) in any error."""
    try:
        with _known(name):
            return client.invoke_function(name, event)
    except PayloadTooLarge as exc:
        raise ValidationError(flag, str(exc)) from None
    except (TooManyRequests, HandlerFailed, NoCapacity, HandlerTimeout) as exc:
        raise type(exc)(f"function {name!r}: {exc}") from None


@function_app.command("trigger")
def trigger(
    name: NameArg,
    http: Annotated[bool, typer.Option("--http", help="An HTTP trigger (the only kind)")] = False,
    path: Annotated[
        str | None,
        typer.Option("--path", help="The route, e.g. /api/process-image", show_default=False),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="An HTTP method (repeatable; default GET and POST)"),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the trigger on --path")] = False,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Route HTTP requests on a path to the function, and print the URL it is served at."""
    with failures():
        if not http:
            raise ValidationError("--http", "is required: HTTP is the only kind of trigger")
        if path is None:
            raise ValidationError("--path", "is required, e.g. --path /api/x")
        validate_trigger_path(path, "--path")
        methods = [m.upper() for m in method or []]
        for m in methods:
            if m not in HTTP_METHODS:
                raise ValidationError(
                    "--method", f"must be one of {', '.join(HTTP_METHODS)}, got {m!r}"
                )
        if remove and methods:
            raise ValidationError(
                "--method", "cannot be combined with --remove (it removes the path)"
            )
        with _session(api, token) as client:
            if remove:
                fn = _remove_trigger(client, name, path)
                if output is OutputFormat.TABLE:
                    out.print(
                        f"http trigger {escape(path)} removed from function "
                        f"[bold]{escape(name)}[/bold]"
                    )
                    return
            else:
                with _known(name):
                    fn = client.add_function_trigger(name, path, methods or None)
                if output is OutputFormat.TABLE:
                    base = _gateway_url(client)
                    sys.stdout.write(f"{base}{path}\n" if base else f"{path}\n")
                    sys.stdout.flush()
                    return
            print_data(as_data(fn), output)


def _remove_trigger(client: FunctionClient, name: str, path: str) -> Function:
    """Say which of function and trigger is missing before the server has to."""
    with _known(name):
        current = client.get_function(name)
    if not any(t.path == path for t in current.spec.triggers):
        known = ", ".join(t.path for t in current.spec.triggers) or "none"
        raise NotFound(f"function {name!r} has no http trigger on {path} (it has: {known})")
    with _known(name):
        return client.remove_function_trigger(name, path)


@function_app.command("metrics")
def metrics(
    name: NameArg,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Invocations, errors, cold and warm starts, durations and queue time (all nodes)."""
    with failures(), _session(api, token) as client, _known(name):
        m = client.function_metrics(name)
        if output is OutputFormat.TABLE:
            out.print(_grid(metrics_rows(m)))
        else:
            print_data(m.model_dump(mode="json"), output)


@function_app.command("logs")
def logs(
    name: NameArg,
    tail: Annotated[
        int | None, typer.Option("--tail", "-n", help="Only the last N lines", min=1)
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Print the handlers' stderr from every live node, oldest first."""
    with failures(), _session(api, token) as client, _known(name):
        text = client.function_logs(name, tail)
        sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
        sys.stdout.flush()
