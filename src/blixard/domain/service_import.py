"""The services file the older Blixard exported, read strictly (``blixard import``).

Two shapes are accepted (``docs/services.md``)::

    {"services": [{"name": "nginx", "state": "running", "nodes": ["n1"]},
                  {"name": "redis.service", "state": "stopped", "nodes": "all"},
                  {"name": "web", "unit": "my_web.service", "state": "running"}]}

    {"nginx": "running", "redis": "stopped"}          # a flat name -> state map

In the list form each entry has ``name`` (required: a unit name as the older
commands took it, ``nginx`` or ``nginx.service``), ``state`` (required:
``running`` or ``stopped``), ``nodes`` (optional: a list of node ids or
``"all"``; absent means the node that receives the import, as for
``service start``) and ``unit`` (optional: the unit, when it differs from the
name). Any other key is refused: a typo must not be imported as a wish.

Every refusal names the place: a JSON path (``services[2].name``), or for a
syntax error the line and column, then the reason. Nothing here writes: the
caller imports only what passed, all at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from blixard.domain.errors import ValidationError
from blixard.domain.names import validate_dns_label, validate_unit_name
from blixard.domain.service import ServiceState, service_identity, validate_service_nodes

#: Largest file accepted (the older system managed a host's units, not millions).
MAX_IMPORT_BYTES = 4 << 20
MAX_IMPORT_SERVICES = 10_000
_ENTRY_KEYS = ("name", "unit", "state", "nodes")


@dataclass(frozen=True, slots=True)
class ImportedService:
    """One service of the file, checked: its name, unit, state and nodes (None: this node)."""

    name: str
    unit: str
    state: ServiceState
    nodes: list[str] | Literal["all"] | None

    def to_json(self) -> dict[str, Any]:
        """The entry as the API's import route takes it."""
        return {
            "name": self.name,
            "unit": self.unit,
            "state": self.state.value,
            "nodes": self.nodes,
        }


def load_import_text(text: str) -> Any:
    """Decode JSON, refusing a syntax error with its line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"line {exc.lineno} column {exc.colno}", f"malformed JSON: {exc.msg}"
        ) from None


def parse_import(text: str) -> list[ImportedService]:
    """Every service of an exported file, or a ValidationError naming the first bad place."""
    if len(text.encode()) > MAX_IMPORT_BYTES:
        raise ValidationError("(file)", f"larger than {MAX_IMPORT_BYTES} bytes")
    return parse_import_data(load_import_text(text))


def parse_import_data(data: Any) -> list[ImportedService]:
    """As :func:`parse_import`, from decoded JSON."""
    if not isinstance(data, dict):
        raise ValidationError(
            "(root)",
            f'must be an object: {{"services": [...]}} or {{"name": "state"}}, '
            f"got {type(data).__name__}",
        )
    if "services" in data:
        extra = sorted(k for k in data if k != "services")
        if extra:
            raise ValidationError(extra[0], "unknown top-level key; only 'services' is read")
        entries = data["services"]
        if not isinstance(entries, list):
            raise ValidationError("services", "must be a list of service objects")
        services = [_entry(entry, f"services[{i}]") for i, entry in enumerate(entries)]
        where = [f"services[{i}]" for i in range(len(entries))]
    else:
        services = [_flat(name, state) for name, state in data.items()]
        where = list(data)
    if len(services) > MAX_IMPORT_SERVICES:
        raise ValidationError(
            "(root)", f"at most {MAX_IMPORT_SERVICES} services, got {len(services)}"
        )
    first: dict[str, str] = {}
    units: dict[str, str] = {}
    for service, place in zip(services, where, strict=True):
        if service.name in first:
            raise ValidationError(
                f"{place}.name" if place.startswith("services[") else place,
                f"service {service.name!r} is listed twice (first at {first[service.name]})",
            )
        if service.unit in units:
            raise ValidationError(
                f"{place}.unit" if place.startswith("services[") else place,
                f"unit {service.unit!r} already belongs to the service at {units[service.unit]}",
            )
        first[service.name] = place
        units[service.unit] = place
    return services


def _state(value: Any, field: str) -> ServiceState:
    if value not in ("running", "stopped"):
        raise ValidationError(field, f"must be 'running' or 'stopped', got {value!r}")
    return ServiceState(value)


def _flat(name: Any, state: Any) -> ImportedService:
    """One ``"name": "state"`` pair of the flat form."""
    service, unit = service_identity(name, str(name))
    return ImportedService(service, unit, _state(state, str(name)), None)


def _entry(entry: Any, place: str) -> ImportedService:
    if not isinstance(entry, dict):
        raise ValidationError(place, f"must be an object with name and state, got {entry!r}")
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise ValidationError(
                f"{place}.{key}", f"unknown key (known: {', '.join(_ENTRY_KEYS)})"
            )
    for key in ("name", "state"):
        if key not in entry:
            raise ValidationError(f"{place}.{key}", "is required")
    if "unit" in entry:
        name = validate_dns_label(entry["name"], f"{place}.name")
        unit = validate_unit_name(entry["unit"], f"{place}.unit")
    else:
        name, unit = service_identity(entry["name"], f"{place}.name")
    state = _state(entry["state"], f"{place}.state")
    nodes = entry.get("nodes")
    if nodes is not None:
        nodes = validate_service_nodes(nodes, f"{place}.nodes")
    return ImportedService(name, unit, state, nodes)
