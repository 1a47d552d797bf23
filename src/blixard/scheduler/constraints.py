"""Hard constraints (``storage=nvme``, ``memory>=32G``) evaluated against one node.

The semantics are the ones documented in :mod:`blixard.domain.placement`:

* ``key=value`` needs the node label ``key`` to equal ``value``; a node
  without the label fails. ``key!=value`` fails only when the label equals
  ``value``: a node *without* the label passes, as Kubernetes' ``NotIn`` and
  Nomad's ``!=`` do (a node that has no ``storage`` label has no ``hdd``).
* ``vcpus``, ``memory`` and ``disk`` with an ordering operator compare the
  node's *capacity* (not what is free: capacity says what kind of node it is,
  free capacity is the capacity filter's job). ``vcpus`` takes a plain number,
  ``memory`` and ``disk`` take a size (``32G``).
* Any other key with an ordering operator reads the node label ``key`` as a
  quantity of the same sort as the constraint's value (a size against a size,
  a number against a number); a node without the label, or whose label is not
  such a quantity, fails.

Each constraint is parsed once per request (:func:`compile_constraint`), not
once per node, because parsing a size costs more than the comparison.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from blixard.domain.errors import ValidationError
from blixard.domain.placement import Constraint, ConstraintOp, parse_quantity
from blixard.domain.units import GIB, KIB, MIB, TIB
from blixard.scheduler.interface import NodeFacts

#: Constraint keys that name the node's capacity when used with an ordering operator.
CAPACITY_KEYS = frozenset({"vcpus", "memory", "disk"})

_COMPARE: dict[ConstraintOp, Callable[[int, int], bool]] = {
    ConstraintOp.GE: operator.ge,
    ConstraintOp.LE: operator.le,
    ConstraintOp.GT: operator.gt,
    ConstraintOp.LT: operator.lt,
}
_UNITS = (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB))


@dataclass(frozen=True, slots=True)
class CompiledConstraint:
    """A constraint with its quantity parsed, ready to be checked against many nodes."""

    text: str
    key: str
    op: ConstraintOp
    value: str
    #: The quantity of an ordering constraint (bytes for a size), None for = and !=.
    amount: Fraction | None
    is_size: bool
    #: ``amount`` as numerator and denominator: comparing integers by cross-multiplying
    #: is several times faster than comparing Fractions, and this runs once per node.
    num: int
    den: int
    compare: Callable[[int, int], bool]


def compile_constraint(constraint: Constraint) -> CompiledConstraint:
    """Parse ``constraint`` once; the result is checked against every node."""
    return _compile(constraint.key, constraint.op, constraint.value)


@lru_cache(maxsize=4096)
def _compile(key: str, op: ConstraintOp, value: str) -> CompiledConstraint:
    amount: Fraction | None = None
    is_size = False
    if op.is_ordering:
        # The domain model validated the value, so this cannot fail for a stored spec.
        amount, is_size = parse_quantity(value, "constraint")
    num, den = (amount.numerator, amount.denominator) if amount is not None else (0, 1)
    compare = _COMPARE.get(op, operator.eq)
    text = f"{key}{op.value}{value}"
    return CompiledConstraint(text, key, op, value, amount, is_size, num, den, compare)


def size_text(n_bytes: int | Fraction) -> str:
    """A size in the largest unit that divides it (``16G``, ``1536M``), as users write them."""
    if isinstance(n_bytes, Fraction) and n_bytes.denominator != 1:
        return f"{float(n_bytes):g}B"
    whole = int(n_bytes)
    for unit, size in _UNITS:
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}B"


def _label_quantity(value: str) -> tuple[Fraction, bool] | None:
    """A label value read as a quantity, or None when it is neither a number nor a size."""
    try:
        return _parse_label(value)
    except ValidationError:
        return None


@lru_cache(maxsize=4096)
def _parse_label(value: str) -> tuple[Fraction, bool]:
    # Cached: a cluster has few distinct label values, and many nodes share them.
    return parse_quantity(value, "label")


def check_constraint(c: CompiledConstraint, node: NodeFacts) -> str | None:
    """None when ``node`` meets ``c``, else why not (naming the node's value)."""
    detail = _failure(c, node)
    return None if detail is None else f"constraint {c.text} not met ({detail})"


def node_value(c: CompiledConstraint, node: NodeFacts) -> int | str | None:
    """What ``c`` reads from the node: a capacity figure or the label's value (None: absent)."""
    if c.amount is not None and c.key in CAPACITY_KEYS:
        if c.key == "vcpus":
            return node.cap_vcpus
        return node.cap_memory_mib if c.key == "memory" else node.cap_disk_mib
    return node.labels.get(c.key)


def meets(c: CompiledConstraint, node: NodeFacts) -> bool:
    """True when ``node`` meets ``c``: :func:`check_constraint` without building the text.

    The filter runs this for every node it visits, most of which a selective
    constraint refuses, so it must not format a message it would throw away.
    ``tests/unit/test_scheduler_filters.py`` checks that the two always agree.
    """
    if c.amount is None:
        have = node.labels.get(c.key)
        return have == c.value if c.op is ConstraintOp.EQ else have != c.value
    key = c.key
    if key in CAPACITY_KEYS:
        if key == "vcpus":
            return not c.is_size and c.compare(node.cap_vcpus * c.den, c.num)
        if not c.is_size:
            return False
        mib = node.cap_memory_mib if key == "memory" else node.cap_disk_mib
        return c.compare(mib * MIB * c.den, c.num)
    raw = node.labels.get(key)
    quantity = None if raw is None else _label_quantity(raw)
    if quantity is None or quantity[1] != c.is_size:
        return False
    amount = quantity[0]
    return c.compare(amount.numerator * c.den, c.num * amount.denominator)


def _failure(c: CompiledConstraint, node: NodeFacts) -> str | None:
    labels = node.labels
    if c.amount is None:
        have = labels.get(c.key)
        if c.op is ConstraintOp.EQ:
            if have is None:
                return f"no label {c.key}"
            return None if have == c.value else f"label {c.key} is {have or 'empty'}"
        return f"label {c.key} is {have}" if have == c.value else None
    if c.key in CAPACITY_KEYS:
        return _capacity_failure(c, node)
    raw = labels.get(c.key)
    if raw is None:
        return f"no label {c.key}"
    quantity = _label_quantity(raw)
    if quantity is None:
        return f"label {c.key} is {raw or 'empty'}, not a number or a size"
    have_amount, have_size = quantity
    if have_size != c.is_size:
        return f"label {c.key} is {raw}, not a {'size' if c.is_size else 'number'}"
    met = c.compare(have_amount.numerator * c.den, c.num * have_amount.denominator)
    return None if met else f"label {c.key} is {raw}"


def _capacity_failure(c: CompiledConstraint, node: NodeFacts) -> str | None:
    if c.key == "vcpus":
        if c.is_size:
            return "vcpus is a count of CPUs: give a number such as vcpus>=8, not a size"
        vcpus = node.cap_vcpus
        return None if c.compare(vcpus * c.den, c.num) else f"capacity vcpus is {vcpus}"
    if not c.is_size:
        return f"{c.key} needs a size with a unit such as {c.key}>=32G, not a plain number"
    mib = node.cap_memory_mib if c.key == "memory" else node.cap_disk_mib
    have = mib * MIB
    return None if c.compare(have * c.den, c.num) else f"capacity {c.key} is {size_text(have)}"
