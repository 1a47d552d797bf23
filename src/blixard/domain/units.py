"""Sizes and durations: the one place where "512M", "2G" or "30s" become numbers.

Sizes
-----
* A size **string** needs a unit: ``K``, ``M``, ``G`` or ``T``, optionally
  followed by ``i``, ``iB`` or ``B`` (``512M``, ``512Mi``, ``512MiB``, ``512MB``
  are the same), case-insensitive. **Every unit is a power of 1024**, ``GB``
  included: that is what QEMU's ``-m 2G``, microvm.nix and most VM tools mean,
  and a VM given 2,000,000,000 bytes instead of 2 GiB is a surprise nobody
  wants. ``B`` alone means bytes (``4096B``).
* A decimal point is allowed when the result is a whole number of bytes
  (``1.5G``); no signs, exponents, underscores or thousands separators.
* A bare **integer** (JSON/TOML/YAML number) is a count of the unit named by the
  field: ``memory_mib: 512`` is 512 MiB. A string without a unit (``"512"``) is
  refused because nothing in the string says what it counts.
* Negative values, and zero unless the caller allows it, are refused; so is
  anything over 1 EiB, which can only be a typo.

Durations
---------
* A duration string is one or more ``<number><unit>`` parts with units ``ms``,
  ``s``, ``m``, ``h`` (lowercase, since ``M`` reads as months): ``100ms``,
  ``30s``, ``5m``, ``1h30m``, ``1.5s``.
* A bare number (int or float) is seconds: the fields are named ``*_s``.
* Negative, NaN, infinite and over-a-year values are refused; zero only when
  the caller allows it.

Every error is a :class:`blixard.domain.errors.ValidationError` naming the
field and the reason.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from blixard.domain.errors import ValidationError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
PIB = 1 << 50
EIB = 1 << 60

#: Largest size accepted anywhere; fields have their own, tighter bounds.
MAX_SIZE_BYTES = EIB
#: Longest duration accepted anywhere (one year).
MAX_DURATION_S = 365 * 24 * 3600.0

#: Longest size or duration text read; longer is garbage (and slow to parse).
_MAX_TEXT = 64
_UNIT_BYTES = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_SIZE = re.compile(
    r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?P<suffix>IB|I|B)?",
    re.IGNORECASE,
)
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNIT_S = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}

SIZE_RULE = (
    "a size needs a unit: K, M, G or T (powers of 1024, optionally followed by "
    "'i', 'iB' or 'B'), e.g. '512M' or '2G'"
)
DURATION_RULE = "a duration needs a unit: ms, s, m or h, e.g. '100ms', '30s', '5m', '1h30m'"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: object) -> bool:
    """Ints and floats, but never bools: ``True`` is not a size."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------- sizes


def parse_size_bytes(
    value: object,
    field: str,
    *,
    bare_unit_bytes: int | None = None,
    allow_zero: bool = False,
) -> int:
    """Parse a size into bytes.

    ``bare_unit_bytes`` says what a bare integer counts (``MIB`` for a
    ``*_mib`` field); when it is None a bare integer is refused.
    """
    if isinstance(value, str):
        size = _parse_size_text(value.strip(), field)
    elif _is_number(value):
        if bare_unit_bytes is None:
            raise ValidationError(field, f"{SIZE_RULE}, got {_shown(value)}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValidationError(
                    field, f"must be a whole number (or a string with a unit), got {value!r}"
                )
            value = int(value)
        assert isinstance(value, int)
        if value < 0:
            raise ValidationError(field, f"must not be negative, got {value}")
        size = Fraction(value * bare_unit_bytes)
    else:
        raise ValidationError(field, f"must be a number or a size string, got {_shown(value)}")
    if size.denominator != 1:
        raise ValidationError(field, f"is not a whole number of bytes, got {_shown(value)}")
    result = int(size)
    if result == 0 and not allow_zero:
        raise ValidationError(field, f"must be greater than zero, got {_shown(value)}")
    if result > MAX_SIZE_BYTES:
        raise ValidationError(
            field,
            f"is absurdly large (more than {format_size(MAX_SIZE_BYTES)}), got {_shown(value)}",
        )
    return result


def _parse_size_text(text: str, field: str) -> Fraction:
    if len(text) > _MAX_TEXT:
        raise ValidationError(field, f"is too long for a size ({len(text)} characters)")
    if text.startswith("-"):
        raise ValidationError(field, f"must not be negative, got {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValidationError(field, f"{SIZE_RULE}, got {_shown(text)}")
    unit = match["unit"].upper()
    suffix = (match["suffix"] or "").upper()
    if unit == "" and suffix != "B":
        # "512" or "512i": nothing says what is counted.
        raise ValidationError(field, f"{SIZE_RULE}, got {_shown(text)}")
    return Fraction(match["num"]) * _UNIT_BYTES[unit]


def to_mib(
    value: object,
    field: str,
    *,
    minimum_mib: int | None = None,
    maximum_mib: int | None = None,
    allow_zero: bool = False,
) -> int:
    """Parse a size for a ``*_mib`` field: bare integers are MiB, strings need a unit.

    The result must be a whole number of MiB (``1.5M`` is refused rather than
    rounded, so the stored value is exactly what was asked). Bounds are
    inclusive and reported in human units.
    """
    size = parse_size_bytes(value, field, bare_unit_bytes=MIB, allow_zero=allow_zero)
    if size % MIB:
        raise ValidationError(
            field, f"must be a whole number of MiB, got {_shown(value)} ({size} bytes)"
        )
    mib = size // MIB
    _check_bounds(mib, field, minimum_mib, maximum_mib, value)
    return mib


def _check_bounds(
    mib: int, field: str, minimum: int | None, maximum: int | None, value: object
) -> None:
    if minimum is not None and mib < minimum:
        raise ValidationError(field, f"must be at least {format_mib(minimum)}, got {_shown(value)}")
    if maximum is not None and mib > maximum:
        raise ValidationError(field, f"must be at most {format_mib(maximum)}, got {_shown(value)}")


def format_size(size_bytes: int) -> str:
    """Format bytes in the largest unit that shows them exactly (2 decimals at most).

    ``format_size(1536 * MIB) == "1.5G"``, ``format_size(512 * MIB) == "512M"``,
    ``format_size(1000) == "1000B"``. The output always parses back to the same
    number of bytes with :func:`parse_size_bytes`.
    """
    if size_bytes < 0:
        raise ValueError(f"format_size takes a non-negative size, got {size_bytes}")
    for letter, unit in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size_bytes < unit:
            continue
        amount = Fraction(size_bytes, unit)
        if 100 % amount.denominator == 0:
            return _decimal(amount) + letter
    return f"{size_bytes}B"


def format_mib(mib: int) -> str:
    """Format a MiB count the way :func:`format_size` does."""
    return format_size(mib * MIB)


def _decimal(amount: Fraction) -> str:
    """Exact decimal text of a fraction whose denominator divides 100."""
    whole, rest = divmod(amount.numerator, amount.denominator)
    if rest == 0:
        return str(whole)
    hundredths = rest * 100 // amount.denominator
    return f"{whole}.{hundredths:02d}".rstrip("0")


# ----------------------------------------------------------------- durations


def parse_duration_s(
    value: object,
    field: str,
    *,
    allow_zero: bool = False,
    maximum_s: float | None = None,
) -> float:
    """Parse a duration into seconds; bare numbers are seconds, strings need a unit."""
    if isinstance(value, str):
        seconds = _parse_duration_text(value.strip(), field)
    elif _is_number(value):
        assert isinstance(value, int | float)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(field, f"must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValidationError(field, f"must not be negative, got {value!r}")
        seconds = float(value)
    else:
        raise ValidationError(
            field, f"must be a number of seconds or a duration string, got {_shown(value)}"
        )
    if seconds == 0 and not allow_zero:
        raise ValidationError(field, f"must be greater than zero, got {_shown(value)}")
    limit = MAX_DURATION_S if maximum_s is None else maximum_s
    if seconds > limit:
        raise ValidationError(
            field, f"must be at most {format_duration(limit)}, got {_shown(value)}"
        )
    return seconds


def _parse_duration_text(text: str, field: str) -> float:
    if len(text) > _MAX_TEXT:
        raise ValidationError(field, f"is too long for a duration ({len(text)} characters)")
    if text.startswith("-"):
        raise ValidationError(field, f"must not be negative, got {text!r}")
    if _DURATION.fullmatch(text) is None:
        raise ValidationError(field, f"{DURATION_RULE}, got {_shown(text)}")
    total = sum(
        (Fraction(num) * _DURATION_UNIT_S[unit] for num, unit in _DURATION_PART.findall(text)),
        Fraction(0),
    )
    return float(total)


def format_duration(seconds: float) -> str:
    """Format seconds as ``1h2m3s500ms`` (rounded to the millisecond).

    The output parses back with :func:`parse_duration_s` to the same number of
    whole milliseconds.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"format_duration takes a finite non-negative number, got {seconds!r}")
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
