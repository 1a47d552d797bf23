"""The registry of stored kinds: from a document's ``kind`` or a store key to its model.

``blixard apply -f`` files may hold several kinds, and a watch over
``/blixard/v1/`` yields keys of every kind; both need this one mapping.
"""

from __future__ import annotations

from typing import Any

from blixard.domain.errors import ValidationError
from blixard.domain.function import Function, FunctionWorker
from blixard.domain.instance import Instance
from blixard.domain.keys import Kind
from blixard.domain.meta import StoredObject
from blixard.domain.node import Node
from blixard.domain.parse import from_json_bytes, parse
from blixard.domain.service import Service
from blixard.domain.vm import VM
from blixard.domain.volume import Volume

#: Document kind (the ``kind`` field) -> model.
MODELS_BY_DOCUMENT_KIND: dict[str, type[StoredObject]] = {
    "Node": Node,
    "VM": VM,
    "Instance": Instance,
    "Function": Function,
    "FunctionWorker": FunctionWorker,
    "Service": Service,
    "Volume": Volume,
}
#: Store kind (the key segment) -> model, for the kinds that have a model here.
MODELS_BY_STORE_KIND: dict[Kind, type[StoredObject]] = {
    cls.STORE_KIND: cls for cls in MODELS_BY_DOCUMENT_KIND.values()
}


def model_for(kind: str | Kind) -> type[StoredObject]:
    """The model class for a document kind (``"VM"``) or a store kind (``"vms"``)."""
    if kind in MODELS_BY_DOCUMENT_KIND:
        return MODELS_BY_DOCUMENT_KIND[kind]
    try:
        return MODELS_BY_STORE_KIND[Kind(kind)]
    except (ValueError, KeyError):
        allowed = ", ".join(MODELS_BY_DOCUMENT_KIND)
        raise ValidationError("kind", f"must be one of {allowed}, got {kind!r}") from None


def parse_object(data: Any) -> StoredObject:
    """Parse a document whose ``kind`` field says which model it is."""
    if not isinstance(data, dict):
        raise ValidationError("(root)", f"must be an object (a mapping), got {type(data).__name__}")
    if "kind" not in data:
        allowed = ", ".join(MODELS_BY_DOCUMENT_KIND)
        raise ValidationError("kind", f"is required (one of {allowed})")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in MODELS_BY_DOCUMENT_KIND:
        allowed = ", ".join(MODELS_BY_DOCUMENT_KIND)
        raise ValidationError("kind", f"must be one of {allowed}, got {kind!r}")
    return parse(MODELS_BY_DOCUMENT_KIND[kind], data)


def decode_stored(kind: str | Kind, raw: bytes | str) -> StoredObject:
    """Decode a store value of ``kind`` (store or document kind)."""
    return from_json_bytes(model_for(kind), raw)
