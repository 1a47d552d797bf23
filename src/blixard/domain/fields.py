"""Pydantic field types built on the plain validators of names.py and units.py.

The rules live once, in plain functions that raise Blixard's own
``ValidationError``; this module wraps them so pydantic reports their reason at
the right place (pydantic only collects ``ValueError``-like errors, and only it
knows the dotted path). :func:`blixard.domain.parse.parse` turns the collected
errors back into a Blixard ``ValidationError`` with that path as ``field``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from blixard.domain.errors import ValidationError
from blixard.domain.names import validate_dns_label, validate_label_value, validate_labels
from blixard.domain.units import TIB, parse_duration_s, to_mib

T = TypeVar("T")

#: Error type of every refusal raised through :func:`refuse`.
ERROR_TYPE = "blixard_invalid"

MIN_VM_MEMORY_MIB = 16
MAX_VM_MEMORY_MIB = 4 * TIB // (1 << 20)
MAX_VCPUS = 256


def refuse(reason: str, subfield: str | None = None) -> PydanticCustomError:
    """Build the pydantic error carrying a Blixard reason.

    ``subfield`` (dotted, e.g. ``"metadata.name"``) extends the location when a
    check made at the level of a whole model is about one of its fields.
    """
    context: dict[str, str] = {"reason": reason}
    if subfield:
        context["subfield"] = subfield
    return PydanticCustomError(ERROR_TYPE, "{reason}", context)


def bridge(check: Callable[[Any, str], T]) -> Callable[[Any], T]:
    """Run a plain ``check(value, field)`` inside pydantic, keeping its reason."""

    def run(value: Any) -> T:
        try:
            return check(value, "value")
        except ValidationError as exc:
            raise refuse(exc.reason) from None

    run.__name__ = getattr(check, "__name__", "check")
    return run


def size_mib(
    *, minimum_mib: int | None = None, maximum_mib: int | None = None, allow_zero: bool = False
) -> BeforeValidator:
    """Validator for a ``*_mib`` field: bare integers are MiB, strings need a unit."""

    def check(value: Any, field: str) -> int:
        return to_mib(
            value, field, minimum_mib=minimum_mib, maximum_mib=maximum_mib, allow_zero=allow_zero
        )

    return BeforeValidator(bridge(check))


def duration_s(*, allow_zero: bool = False, maximum_s: float | None = None) -> BeforeValidator:
    """Validator for a ``*_s`` field: bare numbers are seconds, strings need a unit."""

    def check(value: Any, field: str) -> float:
        return parse_duration_s(value, field, allow_zero=allow_zero, maximum_s=maximum_s)

    return BeforeValidator(bridge(check))


SIZE_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "description": "MiB"},
            {"type": "string", "examples": ["512M", "2G", "1.5GiB"]},
        ]
    }
)
DURATION_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "number", "minimum": 0, "description": "seconds"},
            {"type": "string", "examples": ["100ms", "30s", "5m"]},
        ]
    }
)

#: An object name: an RFC 1123 DNS label.
Name = Annotated[str, BeforeValidator(bridge(validate_dns_label))]
#: A label map (Kubernetes rules for keys and values).
Labels = Annotated[dict[str, str], BeforeValidator(bridge(validate_labels))]
#: A label value (used for zones and similar short tags).
LabelValue = Annotated[str, BeforeValidator(bridge(validate_label_value))]
#: Memory of a guest: 16 MiB .. 4 TiB.
MemoryMiB = Annotated[
    int, size_mib(minimum_mib=MIN_VM_MEMORY_MIB, maximum_mib=MAX_VM_MEMORY_MIB), SIZE_SCHEMA
]
#: A host-scale amount (capacity, allocation): zero allowed, 1 EiB at most.
HostMiB = Annotated[int, size_mib(allow_zero=True), SIZE_SCHEMA]
