"""Sizes and durations: the documented rules, the refusals, and round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixard.domain.errors import ValidationError
from blixard.domain.units import (
    EIB,
    GIB,
    KIB,
    MIB,
    TIB,
    format_duration,
    format_mib,
    format_size,
    parse_duration_s,
    parse_size_bytes,
    to_mib,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MIB),
        ("512m", 512 * MIB),
        ("512Mi", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("512MB", 512 * MIB),
        ("2G", 2 * GIB),
        ("2GB", 2 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("1.25T", 5 * TIB // 4),
        ("4K", 4 * KIB),
        ("4096B", 4096),
        (" 64 M ", 64 * MIB),
    ],
)
def test_size_strings_are_powers_of_1024(text: str, expected: int) -> None:
    assert parse_size_bytes(text, "spec.memory_mib") == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("512", "a size needs a unit"),
        ("512i", "a size needs a unit"),
        ("512X", "a size needs a unit"),
        ("lots", "a size needs a unit"),
        ("", "a size needs a unit"),
        ("1e3M", "a size needs a unit"),
        ("1_000M", "a size needs a unit"),
        ("1,5G", "a size needs a unit"),
        (".5G", "a size needs a unit"),
        ("2 G B", "a size needs a unit"),
        ("-512M", "must not be negative"),
        ("0M", "must be greater than zero"),
        ("0.0001K", "is not a whole number of bytes"),
        ("2000000T", "is absurdly large"),
        ("9" * 100 + "G", "is too long for a size"),
        (None, "must be a number or a size string"),
        (True, "must be a number or a size string"),
        ([512], "must be a number or a size string"),
    ],
)
def test_size_refusals(value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_size_bytes(value, "spec.size_mib")
    assert info.value.field == "spec.size_mib"
    assert fragment in info.value.reason, info.value.reason


def test_bare_number_needs_a_field_unit() -> None:
    with pytest.raises(ValidationError) as info:
        parse_size_bytes(512, "size")
    assert "a size needs a unit" in info.value.reason
    assert parse_size_bytes(512, "size", bare_unit_bytes=MIB) == 512 * MIB
    assert parse_size_bytes(0, "size", bare_unit_bytes=MIB, allow_zero=True) == 0


def test_to_mib_rules() -> None:
    assert to_mib(512, "memory_mib") == 512
    assert to_mib(512.0, "memory_mib") == 512
    assert to_mib("2G", "memory_mib") == 2048
    assert to_mib("1.5G", "memory_mib") == 1536
    assert to_mib("1048576K", "memory_mib") == 1024


@pytest.mark.parametrize(
    ("value", "kwargs", "reason"),
    [
        ("1.5M", {}, "must be a whole number of MiB, got '1.5M' (1572864 bytes)"),
        (512.5, {}, "must be a whole number (or a string with a unit), got 512.5"),
        (-1, {}, "must not be negative, got -1"),
        (0, {}, "must be greater than zero, got 0"),
        ("8M", {"minimum_mib": 16}, "must be at least 16M, got '8M'"),
        ("8T", {"maximum_mib": 4 * 1024 * 1024}, "must be at most 4T, got '8T'"),
        (5000, {"maximum_mib": 4096}, "must be at most 4G, got 5000"),
    ],
)
def test_to_mib_refusals(value: object, kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        to_mib(value, "spec.memory_mib", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == "spec.memory_mib"
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1000, "1000B"),
        (KIB, "1K"),
        (512 * MIB, "512M"),
        (1536 * MIB, "1.5G"),
        (5 * TIB // 4, "1.25T"),
        (GIB + 1, f"{GIB + 1}B"),
        (1025 * KIB, "1025K"),
        (EIB, "1048576T"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_format_mib_and_negative() -> None:
    assert format_mib(2048) == "2G"
    with pytest.raises(ValueError):
        format_size(-1)


@given(st.integers(min_value=1, max_value=EIB))
def test_property_format_then_parse_is_identity(size: int) -> None:
    assert parse_size_bytes(format_size(size), "f") == size


@given(st.integers(min_value=1, max_value=4 * 1024 * 1024))
def test_property_mib_strings_round_trip(mib: int) -> None:
    assert to_mib(format_mib(mib), "f") == mib
    assert to_mib(f"{mib}MiB", "f") == mib


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("100ms", 0.1),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("2h", 7200.0),
        (" 10s ", 10.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration_s(value, "spec.timeout_s") == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "kwargs", "fragment"),
    [
        ("30", {}, "a duration needs a unit"),
        ("30S", {}, "a duration needs a unit"),
        ("5 m", {}, "a duration needs a unit"),
        ("soon", {}, "a duration needs a unit"),
        ("1d", {}, "a duration needs a unit"),
        ("", {}, "a duration needs a unit"),
        ("-5s", {}, "must not be negative"),
        (-5, {}, "must not be negative"),
        (math.nan, {}, "must be a finite number"),
        (math.inf, {}, "must be a finite number"),
        ("0s", {}, "must be greater than zero"),
        (0, {}, "must be greater than zero"),
        ("2h", {"maximum_s": 3600.0}, "must be at most 1h"),
        ("400000h", {}, "must be at most 8760h"),
        ("1" * 80 + "s", {}, "is too long for a duration"),
        (True, {}, "must be a number of seconds or a duration string"),
        (None, {}, "must be a number of seconds or a duration string"),
    ],
)
def test_duration_refusals(value: object, kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_duration_s(value, "spec.timeout_s", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == "spec.timeout_s"
    assert fragment in info.value.reason, info.value.reason


def test_duration_zero_when_allowed() -> None:
    assert parse_duration_s("0s", "d", allow_zero=True) == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.1, "100ms"), (30, "30s"), (90, "1m30s"), (3661.5, "1h1m1s500ms")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=365 * 24 * 3600 * 1000))
def test_property_duration_round_trip_to_the_millisecond(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert round(parse_duration_s(text, "d") * 1000) == ms
