"""The one way into a model from outside data, and the store's byte format.

Pydantic's own ``ValidationError`` never leaves the domain: :func:`parse`
turns it into Blixard's, whose ``field`` is the dotted path of the first error
(``spec.memory_mib``, ``spec.placement.constraints[1]``) and whose ``reason``
explains it and lists any further errors. The API answers with that, and the
CLI prints it, without knowing pydantic is underneath.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from blixard.domain.errors import ValidationError
from blixard.domain.fields import ERROR_TYPE

M = TypeVar("M", bound=BaseModel)

#: ``field`` of an error about the document as a whole.
ROOT_FIELD = "(root)"
_MAX_LISTED = 10


def parse(model_cls: type[M], data: Any) -> M:
    """Validate ``data`` (decoded JSON/YAML/TOML) as ``model_cls`` or raise ValidationError."""
    if not isinstance(data, Mapping):
        raise ValidationError(ROOT_FIELD, f"must be an object (a mapping), got {_shown(data)}")
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as exc:
        raise convert_error(exc, model_cls) from None


def from_json_bytes(model_cls: type[M], raw: bytes | str) -> M:
    """Decode a store value (JSON bytes) as ``model_cls`` or raise ValidationError."""
    try:
        return model_cls.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise convert_error(exc, model_cls) from None


def to_json_bytes(model: BaseModel) -> bytes:
    """Encode a model as the store keeps it: compact UTF-8 JSON, fields in declared order."""
    return model.model_dump_json().encode()


def convert_error(exc: pydantic.ValidationError, model_cls: type[BaseModel]) -> ValidationError:
    """Blixard's ValidationError for a pydantic one: first error's path, every message."""
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic never raises an empty error
        return ValidationError(ROOT_FIELD, str(exc))
    described = [(_path(err), _message(err, model_cls)) for err in errors]
    field, reason = described[0]
    if len(described) > 1:
        rest = described[1 : 1 + _MAX_LISTED]
        listed = "; ".join(f"{path}: {msg}" for path, msg in rest)
        more = len(described) - 1 - len(rest)
        tail = f"; and {more} more" if more > 0 else ""
        reason = f"{reason} (also {len(described) - 1} more: {listed}{tail})"
    return ValidationError(field, reason)


def dotted(loc: Sequence[int | str]) -> str:
    """``("spec", "triggers", 0, "path")`` -> ``"spec.triggers[0].path"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or ROOT_FIELD


def _path(err: ErrorDetails) -> str:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    subfield = (err.get("ctx") or {}).get("subfield")
    if err["type"] == ERROR_TYPE and isinstance(subfield, str):
        loc += tuple(subfield.split("."))
    return dotted(loc)


def _message(err: ErrorDetails, model_cls: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == ERROR_TYPE:
        return err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        allowed = _fields_at(model_cls, tuple(err["loc"])[:-1])
        hint = f"; known fields here: {', '.join(allowed)}" if allowed else ""
        return f"unknown field{hint}"
    value = err.get("input")
    if value is None or isinstance(value, str | int | float | bool):
        return f"{err['msg']}, got {_shown(value)}"
    return err["msg"]


def _fields_at(model_cls: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found at ``loc`` (best effort, for hints only)."""
    current: type[BaseModel] | None = model_cls
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        current = _model_in(info.annotation) if info is not None else None
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside an annotation such as ``list[X] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
