"""Where each object lives in the state store.

Every layer that reads or writes the store builds keys here, so the layout in
DESIGN.md ("State layout") is written down exactly once::

    /blixard/v1/<kind>/<name>          one object (JSON of its domain model)
    /blixard/v1/leases/nodes/<id>      a node's liveness key, attached to its lease

Prefixes end with ``/`` so that a range over ``functions`` never also returns
``function-workers``.
"""

from __future__ import annotations

from enum import StrEnum

from blixard.domain.errors import ValidationError

ROOT = "/blixard/v1/"
NODE_LEASES_PREFIX = ROOT + "leases/nodes/"
MAX_KEY_NAME = 253


class Kind(StrEnum):
    """The kinds of stored objects; the value is the key segment."""

    NODES = "nodes"
    VMS = "vms"
    INSTANCES = "instances"
    FUNCTIONS = "functions"
    FUNCTION_WORKERS = "function-workers"
    SERVICES = "services"
    VOLUMES = "volumes"
    TOKENS = "tokens"
    ROLES = "roles"
    AUDIT = "audit"
    EVENTS = "events"


def _check_segment(name: str, field: str) -> str:
    """A key segment: printable ASCII, no '/', not '.' or '..', at most 253 characters.

    Object names are DNS labels (checked by the models); this looser rule also
    admits the ids of audit entries and events, and still guarantees a name
    can never reach outside its kind's prefix.
    """
    if not name:
        raise ValidationError(field, "must not be empty")
    if len(name) > MAX_KEY_NAME:
        raise ValidationError(field, f"must be at most {MAX_KEY_NAME} characters, got {len(name)}")
    if "/" in name or name in {".", ".."}:
        raise ValidationError(field, f"must not contain '/' or be '.' or '..', got {name!r}")
    if not all("!" <= ch <= "~" for ch in name):
        raise ValidationError(field, f"must be printable ASCII without spaces, got {name!r}")
    return name


def kind_prefix(kind: Kind | str) -> str:
    """``/blixard/v1/<kind>/``: the prefix to range or watch over one kind."""
    try:
        return f"{ROOT}{Kind(kind).value}/"
    except ValueError:
        allowed = ", ".join(k.value for k in Kind)
        raise ValidationError("kind", f"must be one of {allowed}, got {kind!r}") from None


def object_key(kind: Kind | str, name: str) -> str:
    """``/blixard/v1/<kind>/<name>``: the key of one object."""
    return kind_prefix(kind) + _check_segment(name, "name")


def parse_object_key(key: str) -> tuple[Kind, str]:
    """Split an object key back into its kind and name (for watch events)."""
    if not key.startswith(ROOT):
        raise ValidationError("key", f"must start with {ROOT!r}, got {key!r}")
    kind_text, slash, name = key[len(ROOT) :].partition("/")
    if not slash:
        raise ValidationError("key", f"must be {ROOT}<kind>/<name>, got {key!r}")
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise ValidationError("key", f"unknown kind {kind_text!r} in {key!r}") from None
    return kind, _check_segment(name, "key")


def node_lease_key(node_id: str) -> str:
    """``/blixard/v1/leases/nodes/<id>``: present while the node's lease lives."""
    return NODE_LEASES_PREFIX + _check_segment(node_id, "node_id")


def instance_name(vm: str, index: int) -> str:
    """The name of replica ``index`` of VM ``vm``: ``<vm>-<index>``."""
    if index < 0:
        raise ValidationError("index", f"must not be negative, got {index}")
    return f"{vm}-{index}"
