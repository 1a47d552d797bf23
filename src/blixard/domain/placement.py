"""Placement: where a VM replica or a function worker may and should run.

The scheduler reads these; it does not parse text. Users may write constraints
as the CLI's compact string (``"storage=nvme,memory>=32G"``) or as a list, and
the model stores the structured form (:class:`Constraint`).

Constraint semantics (applied by the scheduler as hard filters):

* ``key=value`` / ``key!=value`` compare a node label.
* ``key>=q``, ``key<=q``, ``key>q``, ``key<q`` compare a quantity: a plain
  number (``vcpus>=8``) or a size (``memory>=32G``, powers of 1024 as in
  units.py). The keys ``vcpus``, ``memory`` and ``disk`` name the node's
  capacity; any other key names a node label whose value is read as a
  quantity of the same sort (``gpu.memory>=8G`` against label
  ``gpu.memory=16G``).

Groups: every workload naming an ``anti_affinity_groups`` entry is kept off
nodes that run another member of that group (hard); members of one of the
``affinity_groups`` prefer the same nodes (soft).
"""

from __future__ import annotations

import re
from enum import StrEnum
from fractions import Fraction
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import Labels, Name, bridge, refuse
from blixard.domain.meta import SpecModel
from blixard.domain.names import validate_label_key, validate_label_value
from blixard.domain.units import parse_size_bytes

MAX_CONSTRAINTS = 32
MAX_GROUPS = 16
#: A node selector key every node matches with its own name (as Kubernetes'
#: ``kubernetes.io/hostname``): ``{"blixard.io/node": "n1"}`` pins a workload to
#: node n1. The scheduler reads the node's name for it, not its labels.
NODE_NAME_KEY = "blixard.io/node"

_CONSTRAINT = re.compile(
    r"\s*(?P<key>[^=!<>\s]+)\s*(?P<op>==|!=|>=|<=|=|>|<)\s*(?P<value>[^=!<>]*?)\s*"
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DATA_HINT = re.compile(r"[!-~]{1,253}")

CONSTRAINT_RULE = (
    "a constraint is key<op>value with op one of =, !=, >=, <=, >, < "
    "(e.g. 'storage=nvme' or 'memory>=32G')"
)


class PlacementStrategy(StrEnum):
    """Weigher sets of the scheduler; several may be combined."""

    BEST_FIT = "best-fit"
    SPREAD = "spread"
    DATA_LOCALITY = "data-locality"
    NETWORK_PROXIMITY = "network-proximity"
    SPECIALIZATION = "specialization"


class ConstraintOp(StrEnum):
    """Comparison of a constraint; the ordering ones take a quantity."""

    EQ = "="
    NE = "!="
    GE = ">="
    LE = "<="
    GT = ">"
    LT = "<"

    @property
    def is_ordering(self) -> bool:
        """True for >=, <=, >, <: the value is a number or a size."""
        return self not in (ConstraintOp.EQ, ConstraintOp.NE)


def parse_quantity(text: str, field: str) -> tuple[Fraction, bool]:
    """Read a constraint quantity: ``(amount, is_size)``; sizes are in bytes."""
    text = text.strip()
    if len(text) <= 32 and _NUMBER.fullmatch(text):
        return Fraction(text), False
    try:
        return Fraction(parse_size_bytes(text, field, allow_zero=True)), True
    except ValidationError:
        raise ValidationError(
            field,
            f"the value of an ordering constraint must be a number or a size (e.g. 8, 32G), "
            f"got {text!r}",
        ) from None


def check_constraint(key: str, op: ConstraintOp, value: str, field: str) -> None:
    """Refuse a constraint whose key or value does not fit its operator."""
    validate_label_key(key, field)
    if op.is_ordering:
        parse_quantity(value, field)
    else:
        validate_label_value(value, field)


def parse_constraint(text: str, field: str) -> Constraint:
    """Parse one ``key<op>value`` constraint (``==`` is accepted for ``=``)."""
    if not text.strip():
        raise ValidationError(field, "empty constraint (look for a stray ',')")
    match = _CONSTRAINT.fullmatch(text)
    if match is None:
        raise ValidationError(field, f"{CONSTRAINT_RULE}, got {text!r}")
    op = ConstraintOp("=" if match["op"] == "==" else match["op"])
    check_constraint(match["key"], op, match["value"], field)
    return Constraint(key=match["key"], op=op, value=match["value"])


def parse_constraints(value: object, field: str) -> list[Constraint]:
    """Parse the CLI form ``"storage=nvme,memory>=32G"`` (or a list of such strings)."""
    items = _split(value)
    if not isinstance(items, list):
        raise ValidationError(field, f"must be a string or a list of constraints, got {value!r}")
    return [c if isinstance(c, Constraint) else parse_constraint(str(c), field) for c in items]


class Constraint(SpecModel):
    """One hard placement rule, e.g. ``key="memory", op=">=", value="32G"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    op: ConstraintOp
    value: str

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            try:
                parsed = parse_constraint(data, "constraint")
            except ValidationError as exc:
                raise refuse(exc.reason) from None
            return {"key": parsed.key, "op": parsed.op, "value": parsed.value}
        return data

    @model_validator(mode="after")
    def _check(self) -> Constraint:
        try:
            check_constraint(self.key, self.op, self.value, "constraint")
        except ValidationError as exc:
            raise refuse(exc.reason) from None
        return self

    def quantity(self) -> tuple[Fraction, bool] | None:
        """``(amount, is_size)`` for an ordering constraint, None for = and !=."""
        if not self.op.is_ordering:
            return None
        return parse_quantity(self.value, "constraint")

    def __str__(self) -> str:
        return f"{self.key}{self.op.value}{self.value}"


def _split(value: Any) -> Any:
    """Turn the comma-separated CLI form into a list; leave anything else alone."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    return value


def _check_data_hint(value: Any, field: str) -> str:
    if not isinstance(value, str) or _DATA_HINT.fullmatch(value) is None:
        raise ValidationError(
            field,
            f"must be 1-253 printable characters without spaces (e.g. 'ceph-pool:raw-data'), "
            f"got {value!r}",
        )
    return value


class Placement(SpecModel):
    """Where a workload may run (hard rules) and where it would rather run (hints).

    ``strategy`` empty means the scheduler's default for the kind of workload
    (DESIGN.md gives the serverless mix), so that default lives in one place.
    """

    node_selector: Labels = Field(default_factory=dict)
    constraints: Annotated[list[Constraint], BeforeValidator(_split)] = Field(
        default_factory=list, max_length=MAX_CONSTRAINTS
    )
    preferred_labels: Labels = Field(default_factory=dict)
    data_hint: Annotated[str, BeforeValidator(bridge(_check_data_hint))] | None = None
    affinity_groups: list[Name] = Field(default_factory=list, max_length=MAX_GROUPS)
    anti_affinity_groups: list[Name] = Field(default_factory=list, max_length=MAX_GROUPS)
    strategy: Annotated[list[PlacementStrategy], BeforeValidator(_split)] = Field(
        default_factory=list
    )

    @field_validator("strategy", "affinity_groups", "anti_affinity_groups")
    @classmethod
    def _unique(cls, value: list[Any]) -> list[Any]:
        seen = [v for i, v in enumerate(value) if v in value[:i]]
        if seen:
            raise refuse(f"lists '{seen[0]}' more than once")
        return value
