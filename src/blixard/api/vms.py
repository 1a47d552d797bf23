"""The VM routes: create, read, power state, delete, logs.

Everything goes through :class:`ObjectStore` with compare-and-swap, so two
users changing one VM at once both land (``modify`` re-reads on conflict)
and neither silently overwrites the other. The API writes only VM records:
controllers turn them into instances and agents into running tasks, so a
lifecycle call answers as soon as the wish is stored (the CLI waits for the
outcome by polling).

Request bodies are decoded by hand and validated with
:func:`blixard.domain.parse.parse`, not by FastAPI, so a refusal names the
field the way the rest of Blixard does (``spec.memory_mib``) with the domain's
own reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from blixard.api.checks import NodeFacts, check_vm_on_node
from blixard.api.errors import COMMON_ERRORS, ErrorResponse
from blixard.api.logs import LogSource, remote_source, stream_logs
from blixard.api.reads import all_instances, instances_of, stored
from blixard.api.schemas import VMDetails, VMList
from blixard.domain.errors import Conflict, NotFound, ValidationError
from blixard.domain.instance import Instance
from blixard.domain.keys import instance_name
from blixard.domain.meta import SpecModel
from blixard.domain.names import validate_dns_label
from blixard.domain.node import Node
from blixard.domain.parse import ROOT_FIELD, parse
from blixard.domain.vm import MAX_REPLICAS, VM, VMSpec, VMStatus
from blixard.store.objects import ObjectStore

#: Largest accepted request body; a VM document is a few kB.
MAX_BODY_BYTES = 1 << 20
_DELETE_ATTEMPTS = 20

_VM_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    400: {"model": ErrorResponse, "description": "Invalid name or parameter"},
    404: {"model": ErrorResponse, "description": "No such VM"},
}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A VM document: metadata.name and spec; uid, generation, "
        "created_at and status are set by the API.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VM"}}},
    }
}


def checked_name(name: str, field: str = "name") -> str:
    """A name from the URL must be a DNS label like every object name."""
    return validate_dns_label(name, field)


async def read_json_body(request: Request) -> Any:
    """The request body decoded as JSON, refused with a position when malformed."""
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValidationError(ROOT_FIELD, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ValidationError(ROOT_FIELD, "the request body is empty; send a VM document as JSON")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ValidationError(ROOT_FIELD, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(
            ROOT_FIELD, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def parse_vm_document(data: Any) -> VM:
    """A VM from a decoded document (``kind`` may be omitted, but not be another kind)."""
    if isinstance(data, dict) and "kind" in data and data["kind"] != "VM":
        raise ValidationError("kind", f"must be 'VM' on this route, got {data['kind']!r}")
    return parse(VM, data)


def new_vm(vm: VM) -> VM:
    """The VM as first stored: identity and bookkeeping set here, status empty."""
    meta = vm.metadata.model_copy(
        update={
            "uid": uuid.uuid4(),
            "generation": 1,
            "resource_version": 0,
            "created_at": datetime.now(UTC),
        }
    )
    return vm.model_copy(update={"metadata": meta, "status": VMStatus()})


def spec_change(update: Callable[[VMSpec], dict[str, Any]]) -> Callable[[VM], VM]:
    """A modify step applying ``update`` to the spec and bumping the generation."""

    def change(vm: VM) -> VM:
        spec = vm.spec.model_copy(update=update(vm.spec))
        meta = vm.metadata.model_copy(update={"generation": vm.metadata.generation + 1})
        return vm.model_copy(update={"spec": spec, "metadata": meta})

    return change


class ScaleRequest(SpecModel):
    """The body of ``POST /v1/vms/{name}/scale``."""

    replicas: int = Field(ge=0, le=MAX_REPLICAS, strict=True)


def vms_router(objects: ObjectStore, facts: NodeFacts, logs: LogSource) -> APIRouter:
    """The routes under ``/v1/vms``."""
    router = APIRouter(prefix="/v1/vms", tags=["vms"], responses=_VM_ERRORS)

    @router.post(
        "",
        status_code=201,
        response_model=VM,
        summary="Create a VM",
        openapi_extra=_CREATE_BODY,
        responses={409: {"model": ErrorResponse, "description": "A VM of that name exists"}},
    )
    async def create_vm(request: Request) -> VM:
        """Validate the document, check its boot files on this node, and store it.

        Nothing is stored when any check fails.
        """
        vm = parse_vm_document(await read_json_body(request))
        check_vm_on_node(vm, facts)
        return await objects.create(new_vm(vm))

    @router.get("", response_model=VMList, summary="List VMs with their instances")
    async def list_vms() -> VMList:
        vms = await stored(objects.list(VM))
        grouped = await all_instances(objects)
        return VMList(
            items=[VMDetails(vm=vm, instances=grouped.get(vm.metadata.name, [])) for vm in vms]
        )

    @router.get("/{name}", response_model=VMDetails, summary="One VM with its instances")
    async def get_vm(name: str) -> VMDetails:
        vm = await stored(objects.get(VM, checked_name(name)))
        return VMDetails(vm=vm, instances=await instances_of(objects, name))

    @router.delete("/{name}", response_model=VM, summary="Delete a VM")
    async def delete_vm(name: str) -> VM:
        """Delete the VM record and answer it as it was.

        Controllers then garbage-collect its instances and agents destroy the tasks.
        """
        checked_name(name)
        for _ in range(_DELETE_ATTEMPTS):
            vm = await stored(objects.get(VM, name))
            try:
                await objects.delete(vm)
            except Conflict:  # changed (or gone) since read: read again
                continue
            return vm
        raise Conflict(f"vm {name!r} kept changing under {_DELETE_ATTEMPTS} attempts to delete it")

    @router.post("/{name}/start", response_model=VM, summary="Ask for the VM to run")
    async def start_vm(name: str) -> VM:
        change = spec_change(lambda _: {"running": True})
        return await stored(objects.modify(VM, checked_name(name), change))

    @router.post("/{name}/stop", response_model=VM, summary="Ask for the VM to stop")
    async def stop_vm(name: str) -> VM:
        change = spec_change(lambda _: {"running": False})
        return await stored(objects.modify(VM, checked_name(name), change))

    @router.post("/{name}/restart", response_model=VM, summary="Restart every replica")
    async def restart_vm(name: str) -> VM:
        """Bump ``spec.restart_generation`` (and run the VM if it was stopped)."""
        change = spec_change(
            lambda spec: {"running": True, "restart_generation": spec.restart_generation + 1}
        )
        return await stored(objects.modify(VM, checked_name(name), change))

    @router.post(
        "/{name}/scale",
        response_model=VM,
        summary="Set the number of replicas",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScaleRequest.model_json_schema()}},
            }
        },
    )
    async def scale_vm(name: str, request: Request) -> VM:
        """Set ``spec.replicas``; the controller places new replicas and stops extra ones
        (the highest indexes first), each stopped before its record goes."""
        wanted = parse(ScaleRequest, await read_json_body(request)).replicas
        change = spec_change(lambda _: {"replicas": wanted})
        return await stored(objects.modify(VM, checked_name(name), change))

    @router.get(
        "/{name}/logs",
        summary="Stream a replica's output",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "The output, streamed"}},
    )
    async def vm_logs(
        request: Request,
        name: str,
        replica: Annotated[int, Query(ge=0, description="Replica index")] = 0,
        follow: Annotated[bool, Query(description="Keep streaming new output")] = False,
    ) -> Response:
        """The replica's console or output; read from the node that runs it."""
        await stored(objects.get(VM, checked_name(name)))
        instance = instance_name(name, replica)
        inst = await stored(objects.find(Instance, instance))
        if inst is None:
            raise NotFound(f"vm {name!r} has no instance {instance!r}")
        source = logs
        where = inst.status.node or inst.spec.node
        if where is not None and where != facts.node_id:
            node = await stored(objects.find(Node, where))
            if node is None or node.spec.api_url is None:
                raise NotFound(f"instance {instance!r} runs on node {where}, whose API is unknown")
            url = f"{node.spec.api_url}/v1/vms/{name}/logs?replica={replica}&follow={follow}"
            auth = request.headers.get("authorization", "")
            source = remote_source(where, url, {"Authorization": auth})
        return await stream_logs(source, instance, follow)

    return router
