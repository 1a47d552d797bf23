"""Serverless functions: the spec the gateway, the autoscaler and the runtimes read.

Concurrency has two numbers with different jobs: ``max_concurrency`` bounds the
invocations in flight for the function across the whole cluster (past it,
plus the gateway's queue, callers get 429), and ``target_concurrency`` is how
many in-flight invocations the autoscaler aims for per worker.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, get_args
from uuid import UUID

from pydantic import AwareDatetime, BeforeValidator, Field, field_validator, model_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import (
    DURATION_SCHEMA,
    MAX_VCPUS,
    MemoryMiB,
    Name,
    bridge,
    duration_s,
    refuse,
)
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.placement import Placement

MAX_HANDLER = 65_536
MAX_TIMEOUT_S = 3600.0
MAX_SCALE_DOWN_DELAY_S = 86_400.0
MAX_INSTANCES = 10_000

_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Runtime(StrEnum):
    """How a handler runs (see DESIGN.md, "Functions")."""

    NIX = "nix"  # handler is a Nix expression or a path to a .nix file
    COMMAND = "command"  # handler is an executable: event JSON on stdin
    MICROVM = "microvm"  # handler is a command run by the guest agent in a microVM


def validate_trigger_path(value: Any, field: str) -> str:
    """An HTTP route: '/', or '/'-separated URL-safe segments; no '.', '..' or '//'."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 256:
        raise ValidationError(field, f"must be a path starting with '/', got {value!r}")
    if value == "/_blixard" or value.startswith("/_blixard/"):
        raise ValidationError(field, "paths under /_blixard are the gateway's own")
    segments = value.strip("/").split("/") if value != "/" else []
    for segment in segments:
        if segment in {".", ".."} or _PATH_SEGMENT.fullmatch(segment) is None:
            raise ValidationError(
                field,
                "path segments must be letters, digits, '.', '_', '~' or '-' "
                f"(no empty, '.' or '..' segments), got {value!r}",
            )
    return value


def _upper_methods(value: Any) -> Any:
    """Accept ``get`` for ``GET``: methods are case-insensitive for users."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [m.upper() if isinstance(m, str) else m for m in value]
    return value


def validate_handler(value: Any, field: str) -> str:
    """Non-empty text without NUL; not starting with '-' (never an option)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_HANDLER or "\x00" in value:
        raise ValidationError(field, f"must be at most {MAX_HANDLER} characters without NUL")
    if value.lstrip().startswith("-"):
        raise ValidationError(field, f"must not start with '-', got {value!r}")
    return value


def validate_env(value: Any, field: str) -> dict[str, str]:
    """Environment variables: POSIX-style names, string values without NUL."""
    if not isinstance(value, dict):
        raise ValidationError(field, f"must be a mapping of names to strings, got {value!r}")
    for key, item in value.items():
        if not isinstance(key, str) or _ENV_NAME.fullmatch(key) is None:
            raise ValidationError(
                field,
                "variable names are letters, digits and '_', not starting with a digit, "
                f"got {key!r}",
            )
        if not isinstance(item, str) or "\x00" in item:
            raise ValidationError(field, f"value of {key!r} must be a string without NUL")
    return dict(value)


TriggerPath = Annotated[str, BeforeValidator(bridge(validate_trigger_path))]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HTTP_METHODS: tuple[HttpMethod, ...] = get_args(HttpMethod)
Handler = Annotated[str, BeforeValidator(bridge(validate_handler))]
Env = Annotated[dict[str, str], BeforeValidator(bridge(validate_env))]
TimeoutS = Annotated[float, duration_s(maximum_s=MAX_TIMEOUT_S), DURATION_SCHEMA]
DelayS = Annotated[
    float, duration_s(allow_zero=True, maximum_s=MAX_SCALE_DOWN_DELAY_S), DURATION_SCHEMA
]


def _default_methods() -> list[HttpMethod]:
    return ["GET", "POST"]


class HttpTrigger(SpecModel):
    """Invoke the function on requests to ``path`` with one of ``methods``."""

    type: Literal["http"] = "http"
    path: TriggerPath
    methods: Annotated[list[HttpMethod], BeforeValidator(_upper_methods)] = Field(
        default_factory=_default_methods, min_length=1
    )

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise refuse(f"lists a method more than once: {methods}")
        return methods


class FunctionSpec(SpecModel):
    """A function as the user describes it."""

    runtime: Runtime
    handler: Handler
    args: list[str] = Field(default_factory=list, max_length=256)
    env: Env = Field(default_factory=dict)
    memory_mib: MemoryMiB = 128
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS, strict=True)
    timeout_s: TimeoutS = 30.0
    max_concurrency: int = Field(default=100, ge=1, le=1_000_000, strict=True)
    #: Invocations one gateway holds waiting for a free execution slot; past it: 429.
    queue_limit: int = Field(default=100, ge=0, le=100_000, strict=True)
    min_instances: int = Field(default=0, ge=0, le=MAX_INSTANCES, strict=True)
    max_instances: int = Field(default=10, ge=1, le=MAX_INSTANCES, strict=True)
    target_concurrency: int = Field(default=1, ge=1, le=10_000, strict=True)
    scale_down_delay_s: DelayS = 60.0
    triggers: list[HttpTrigger] = Field(default_factory=list, max_length=32)
    placement: Placement = Field(default_factory=Placement)

    @model_validator(mode="after")
    def _consistent(self) -> FunctionSpec:
        if self.min_instances > self.max_instances:
            raise refuse(
                f"must not exceed max_instances ({self.max_instances}), got {self.min_instances}",
                subfield="min_instances",
            )
        if self.target_concurrency > self.max_concurrency:
            raise refuse(
                f"must not exceed max_concurrency ({self.max_concurrency}), "
                f"got {self.target_concurrency}",
                subfield="target_concurrency",
            )
        paths = [(t.path, m) for t in self.triggers for m in t.methods]
        dup = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        if dup is not None:
            raise refuse(f"route {dup[1]} {dup[0]} is given twice", subfield="triggers")
        return self

    #: Fields that change how a worker runs: a change to any of them needs new workers.
    #: Triggers, scaling bounds, delays and queue/cluster limits are read by gateways and
    #: the autoscaler as they are, so changing them keeps the warm workers.
    WORKER_FIELDS: ClassVar[tuple[str, ...]] = (
        "runtime", "handler", "args", "env", "memory_mib", "vcpus", "timeout_s",
        "target_concurrency", "placement",
    )  # fmt: skip

    def needs_new_workers(self, other: FunctionSpec) -> bool:
        """True when ``other`` differs in a field that shapes the workers."""
        return any(getattr(self, f) != getattr(other, f) for f in self.WORKER_FIELDS)

    @property
    def per_worker(self) -> int:
        """Invocations one worker runs at once: a microVM's guest agent runs one."""
        return 1 if self.runtime is Runtime.MICROVM else self.target_concurrency

    @property
    def worker_cap(self) -> int:
        """Most workers at once: ``max_instances``, and never more execution slots in the
        cluster than ``max_concurrency`` (rounded down to whole workers, at least one)."""
        return max(1, min(self.max_instances, self.max_concurrency // self.per_worker))


class FunctionPhase(StrEnum):
    """Whether the function can take invocations."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class FunctionStatus(StatusModel):
    """Written by the function autoscaler."""

    phase: FunctionPhase = FunctionPhase.PENDING
    message: str = ""
    workers: int = 0
    warm_workers: int = 0
    #: Workers executing at least one invocation when last reported.
    busy_workers: int = 0
    #: Node of every ready worker, e.g. ``{"n1": 2, "n3": 1}``.
    nodes: dict[str, int] = Field(default_factory=dict)
    observed_generation: int = 0


class Function(StoredObject):
    """Stored under ``/blixard/v1/functions/<name>``."""

    STORE_KIND = Kind.FUNCTIONS

    kind: Literal["Function"] = "Function"
    spec: FunctionSpec
    status: FunctionStatus = Field(default_factory=FunctionStatus)


class WorkerState(StrEnum):
    """Where a worker is in its life (written by the host node)."""

    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"


class FunctionWorkerSpec(SpecModel):
    """One worker slot of a function, bound to a node: written by gateways and the autoscaler.

    ``index`` is the worker's number (its name is ``<function>-w<index>``, below
    ``max_instances``): creating a worker is "create if absent" on that name,
    so gateways and the autoscaler racing to add workers can never together
    exceed ``max_instances``.
    """

    function: Name
    function_uid: UUID | None = None
    #: The function's generation the worker runs (a spec change replaces workers).
    generation: int = Field(default=0, ge=0, strict=True)
    index: int = Field(ge=0, lt=MAX_INSTANCES, strict=True)
    node: Name
    #: Who asked for it: ``gateway`` (an invocation found no free worker) or ``autoscaler``.
    reason: str = ""


class FunctionWorkerStatus(StatusModel):
    """Reported by the worker's node, at most about once a second while it changes."""

    state: WorkerState = WorkerState.STARTING
    message: str = ""
    in_flight: int = 0
    invocations: int = 0
    last_used_at: AwareDatetime | None = None
    ready_at: AwareDatetime | None = None
    cold_start_ms: float | None = None


class FunctionWorker(StoredObject):
    """Stored under ``/blixard/v1/function-workers/<function>-w<index>``."""

    STORE_KIND = Kind.FUNCTION_WORKERS

    kind: Literal["FunctionWorker"] = "FunctionWorker"
    spec: FunctionWorkerSpec
    status: FunctionWorkerStatus = Field(default_factory=FunctionWorkerStatus)


def worker_name(function: str, index: int) -> str:
    """``<function>-w<index>``: one name per slot, see :class:`FunctionWorkerSpec`."""
    return f"{function}-w{index}"
