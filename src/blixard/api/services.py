"""The service routes: the older ``service_manager`` verbs over the cluster, and import.

``POST /v1/services/{name}/start`` creates the service or updates it (desired
state running); ``stop``, ``restart`` and ``DELETE`` need it to exist (404
otherwise). The API writes Service records only (and deletes a service's VMs
with it); the service controller turns services into VMs, the VM controller
places them and agents run the units (docs/services.md). Reads join the live
state per node from the instances (:mod:`blixard.domain.service_status`).

Every request is validated whole before anything is written, and a write is
one compare-and-swap transaction: nothing is ever half created.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from blixard.api.errors import COMMON_ERRORS, ErrorResponse
from blixard.api.reads import all_instances, live_nodes, stored
from blixard.api.vms import checked_name, read_json_body
from blixard.domain.errors import Conflict, ValidationError
from blixard.domain.meta import ObjectMeta, SpecModel
from blixard.domain.node import Node
from blixard.domain.parse import parse, to_json_bytes
from blixard.domain.placement import Placement
from blixard.domain.service import (
    Service,
    ServiceNodes,
    ServiceSpec,
    ServiceState,
    ServiceStatus,
    UnitName,
    owner_of,
)
from blixard.domain.service_import import MAX_IMPORT_SERVICES, parse_import_data
from blixard.domain.service_status import service_status
from blixard.domain.vm import MAX_REPLICAS, VM, Hypervisor
from blixard.store.objects import ObjectStore
from blixard.store.protocol import Compare, Delete, Put, TxnOp

_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    400: {"model": ErrorResponse, "description": "Invalid name, unit or parameter"},
    404: {"model": ErrorResponse, "description": "No such service"},
    409: {"model": ErrorResponse, "description": "Conflicts with stored services"},
}


class StartRequest(SpecModel):
    """The body of ``POST /v1/services/{name}/start`` (all optional).

    Without ``nodes``, ``replicas`` and ``placement`` a new service runs on the
    node that answers, and an existing one keeps where it runs; with them, the
    service runs there from now on: ``nodes`` pins it (a list, or ``"all"``),
    ``replicas``/``placement`` let the scheduler place it.
    """

    unit: UnitName | None = None
    nodes: ServiceNodes | None = None
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS, strict=True)
    placement: Placement | None = None


class ServiceList(BaseModel):
    items: list[Service]


class DeleteReply(BaseModel):
    """The service as it was, and the VMs deleted with it (their units stop)."""

    service: Service
    vms: list[str]


class ImportRequest(SpecModel):
    """The body of ``POST /v1/services/import``: entries as in docs/services.md."""

    services: list[Any]
    overwrite: bool = False


class ImportReply(BaseModel):
    created: list[str] = Field(default_factory=list)
    updated: list[str] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)


def _spec_changed(service: Service, spec: ServiceSpec) -> Service:
    """``service`` with ``spec``, its generation bumped if the spec differs."""
    if spec == service.spec:
        return service
    meta = service.metadata.model_copy(update={"generation": service.metadata.generation + 1})
    return service.model_copy(update={"spec": spec, "metadata": meta})


def _new_service(name: str, spec: ServiceSpec) -> Service:
    meta = ObjectMeta(name=name, uid=uuid.uuid4(), generation=1, created_at=datetime.now(UTC))
    return Service(metadata=meta, spec=spec)


def _spec(data: dict[str, Any]) -> ServiceSpec:
    """A spec from plain data, errors named ``spec.<field>``."""
    try:
        return parse(ServiceSpec, data)
    except ValidationError as exc:
        raise ValidationError(f"spec.{exc.field}", exc.reason) from None


def services_router(objects: ObjectStore, node_id: str) -> APIRouter:
    """The routes under ``/v1/services``; ``node_id`` is "this node" for a new service."""
    router = APIRouter(prefix="/v1/services", tags=["services"], responses=_ERRORS)

    async def with_status(services: list[Service]) -> list[Service]:
        vms = {vm.metadata.name: vm for vm in await stored(objects.list(VM))}
        instances = await all_instances(objects)
        alive = await live_nodes(objects)
        nodes = await stored(objects.list(Node))
        systemd = [n.metadata.name for n in nodes if Hypervisor.SYSTEMD in n.status.hypervisors]
        return [
            s.model_copy(update={"status": service_status(s, vms, instances, alive, systemd)})
            for s in services
        ]

    async def check_nodes(nodes: object, field: str) -> None:
        """Pinned nodes must be nodes of the cluster (a typo would wait forever)."""
        if not isinstance(nodes, list):
            return
        known = {n.metadata.name for n in await stored(objects.list(Node))}
        missing = [n for n in nodes if n not in known]
        if missing:
            raise ValidationError(
                field,
                f"no node {missing[0]!r} in the cluster (nodes: {', '.join(sorted(known))})",
            )

    async def check_unit_free(name: str, unit: str, others: list[Service]) -> None:
        for other in others:
            if other.metadata.name != name and other.spec.unit == unit:
                raise Conflict(
                    f"unit {unit} is already managed by service {other.metadata.name!r}; "
                    "one unit belongs to one service"
                )

    @router.get("", response_model=ServiceList, summary="Every service with its live state")
    async def list_services() -> ServiceList:
        services = sorted(await stored(objects.list(Service)), key=lambda s: s.metadata.name)
        return ServiceList(items=await with_status(services))

    @router.get("/{name}", response_model=Service, summary="One service, recorded and live")
    async def get_service(name: str) -> Service:
        service = await stored(objects.get(Service, checked_name(name)))
        return (await with_status([service]))[0]

    @router.post("/{name}/start", response_model=Service, summary="Create or start a service")
    async def start_service(name: str, request: Request) -> Service:
        """Create the service (or update it) with desired state running.

        The body is optional (see StartRequest); everything is checked before
        the single compare-and-swap write.
        """
        checked_name(name)
        raw = await request.body()
        body = parse(StartRequest, await read_json_body(request)) if raw.strip() else StartRequest()
        await check_nodes(body.nodes, "nodes")
        placing = body.nodes is not None or body.replicas is not None or body.placement is not None
        where: dict[str, Any] = {}
        if placing:
            where = {
                "nodes": body.nodes,
                "replicas": body.replicas or 1,
                "placement": body.placement or Placement(),
            }
        for _ in range(20):
            services = await stored(objects.list(Service))
            existing = next((s for s in services if s.metadata.name == name), None)
            if existing is None:
                data: dict[str, Any] = {"unit": body.unit or name, "nodes": [node_id], **where}
                spec = _spec(data)
                await check_unit_free(name, spec.unit, services)
                return await objects.create(_new_service(name, spec))
            update: dict[str, Any] = {
                **existing.spec.model_dump(),
                "state": ServiceState.RUNNING,
                **where,
            }
            if body.unit is not None:
                update["unit"] = body.unit
            spec = _spec(update)
            await check_unit_free(name, spec.unit, services)
            changed = _spec_changed(existing, spec)
            if changed is existing:
                return existing
            try:
                return await objects.update(changed)
            except Conflict:
                continue
        raise Conflict(f"service {name!r} kept changing; try again")

    def spec_change(
        update: Callable[[ServiceSpec], dict[str, Any]],
    ) -> Callable[[Service], Service]:
        def change(service: Service) -> Service:
            spec = service.spec.model_copy(update=update(service.spec))
            return _spec_changed(service, spec)

        return change

    @router.post("/{name}/stop", response_model=Service, summary="Stop a service everywhere")
    async def stop_service(name: str) -> Service:
        change = spec_change(lambda _: {"state": ServiceState.STOPPED})
        return await stored(objects.modify(Service, checked_name(name), change))

    @router.post("/{name}/restart", response_model=Service, summary="Restart a service")
    async def restart_service(name: str) -> Service:
        """Bump ``spec.restart_generation`` (and run the service if it was stopped)."""
        change = spec_change(
            lambda spec: {
                "state": ServiceState.RUNNING,
                "restart_generation": spec.restart_generation + 1,
            }
        )
        return await stored(objects.modify(Service, checked_name(name), change))

    @router.delete("/{name}", response_model=DeleteReply, summary="Delete a service")
    async def delete_service(name: str) -> DeleteReply:
        """Delete the service and its VMs in one transaction; agents then stop the units."""
        checked_name(name)
        for _ in range(20):
            service = await stored(objects.get(Service, name))
            owned = [vm for vm in await stored(objects.list(VM)) if owner_of(vm) == name]
            compares = [Compare.mod(service.key(), service.metadata.resource_version)]
            compares += [Compare.mod(vm.key(), vm.metadata.resource_version) for vm in owned]
            ops: list[TxnOp] = [Delete(service.key()), *(Delete(vm.key()) for vm in owned)]
            result = await objects.store.txn(compares, ops)
            if result.succeeded:
                return DeleteReply(service=service, vms=sorted(vm.metadata.name for vm in owned))
        raise Conflict(f"service {name!r} kept changing under 20 attempts to delete it")

    @router.post("/import", response_model=ImportReply, summary="Import services, all or none")
    async def import_services(request: Request) -> ImportReply:
        """Import the older system's services (docs/services.md) in one transaction.

        Existing services that are identical stay unchanged; different ones
        refuse the whole import (naming them) unless ``overwrite`` is true.
        """
        body = parse(ImportRequest, await read_json_body(request))
        if len(body.services) > MAX_IMPORT_SERVICES:
            raise ValidationError(
                "services",
                f"at most {MAX_IMPORT_SERVICES} services per import (one store transaction), "
                f"got {len(body.services)}; split the file",
            )
        entries = parse_import_data({"services": body.services})
        for i, entry in enumerate(entries):
            await check_nodes(entry.nodes, f"services[{i}].nodes")
        specs = {
            e.name: _spec({"unit": e.unit, "state": e.state, "nodes": e.nodes or [node_id]})
            for e in entries
        }
        stored_services = {s.metadata.name: s for s in await stored(objects.list(Service))}
        for name, spec in specs.items():
            for other in stored_services.values():
                if other.metadata.name not in specs and other.spec.unit == spec.unit:
                    raise Conflict(
                        f"unit {spec.unit} of service {name!r} is already managed by "
                        f"service {other.metadata.name!r}; nothing was imported"
                    )
        reply = ImportReply()
        differing: list[str] = []
        compares: list[Compare] = []
        ops: list[TxnOp] = []
        for name, spec in specs.items():
            have = stored_services.get(name)
            if have is None:
                new = _new_service(name, spec)
                compares.append(Compare.absent(new.key()))
                ops.append(Put(new.key(), to_json_bytes(new)))
                reply.created.append(name)
            elif _comparable(have.spec) == _comparable(spec):
                reply.unchanged.append(name)
            else:
                differing.append(_difference(have.spec, spec, name))
                merged = spec.model_copy(
                    update={"restart_generation": have.spec.restart_generation}
                )
                changed = _spec_changed(have, merged)
                compares.append(Compare.mod(have.key(), have.metadata.resource_version))
                ops.append(Put(have.key(), to_json_bytes(changed)))
                reply.updated.append(name)
        if differing and not body.overwrite:
            raise Conflict(
                "these services exist with other settings: "
                + "; ".join(differing)
                + "; nothing was imported (import with --overwrite to replace them)"
            )
        if ops:
            result = await objects.store.txn(compares, ops)
            if not result.succeeded:
                raise Conflict("services changed during the import; nothing was imported, retry")
        return reply

    return router


def _comparable(spec: ServiceSpec) -> tuple[str, str, object]:
    """What an import sets: unit, state and nodes."""
    return spec.unit, spec.state.value, spec.nodes


def _difference(have: ServiceSpec, want: ServiceSpec, name: str) -> str:
    parts = []
    if have.unit != want.unit:
        parts.append(f"unit {have.unit} -> {want.unit}")
    if have.state is not want.state:
        parts.append(f"state {have.state.value} -> {want.state.value}")
    if have.nodes != want.nodes:
        parts.append(f"nodes {_nodes(have.nodes)} -> {_nodes(want.nodes)}")
    return f"{name} ({', '.join(parts)})"


def _nodes(nodes: list[str] | str | None) -> str:
    if nodes is None:
        return "placed"
    return nodes if isinstance(nodes, str) else ",".join(nodes)


__all__ = ["ServiceList", "ServiceStatus", "services_router"]
