"""The VM routes against a real SqliteStore: semantics, bad input, nothing stored on refusal."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from blixard.domain.instance import ObservedState
from blixard.domain.vm import VM
from tests.unit.test_api_fixtures import Api, api, vm_doc

__all__ = ["api"]


async def _create(api: Api, doc: dict[str, Any]) -> dict[str, Any]:
    resp = await api.call("POST", "/v1/vms", json=doc)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_create_sets_identity_and_stores_the_vm(api: Api) -> None:
    doc = vm_doc(memory_mib="1G", vcpus=2)
    doc["metadata"].update(uid="00000000-0000-0000-0000-000000000001", generation=7)
    doc["status"] = {"phase": "running", "ready_replicas": 5}
    body = await _create(api, doc)
    meta = body["metadata"]
    assert meta["name"] == "web" and meta["generation"] == 1 and meta["created_at"]
    assert meta["uid"] != "00000000-0000-0000-0000-000000000001"  # the API's, not the user's
    assert body["status"]["phase"] == "pending" and body["status"]["ready_replicas"] == 0
    assert body["spec"]["memory_mib"] == 1024 and body["spec"]["vcpus"] == 2
    stored = await api.objects.get(VM, "web")
    assert stored.metadata.resource_version == meta["resource_version"] > 0
    assert str(stored.metadata.uid) == meta["uid"] and stored.spec.running is True
    assert stored.spec.boot.command == ["sleep", "1000"]


async def test_create_without_kind_and_with_a_kernel_file(api: Api, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(b"070701")
    doc = {
        "metadata": {"name": "guest"},
        "spec": {"boot": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": "quiet"}},
    }
    body = await _create(api, doc)
    assert body["kind"] == "VM" and body["spec"]["hypervisor"] == "qemu"
    assert await api.keys() == ["/blixard/v1/vms/guest"]


async def test_create_with_a_known_image_and_an_absolute_command(api: Api) -> None:
    await _create(api, {"metadata": {"name": "img"}, "spec": {"boot": {"image": "debian:12"}}})
    await _create(api, vm_doc("abs", boot={"command": [sys.executable, "-c", "pass"]}))
    assert await api.keys() == ["/blixard/v1/vms/abs", "/blixard/v1/vms/img"]


def _with(path: str, value: Any, name: str = "web") -> dict[str, Any]:
    """A valid document with one field replaced (``spec.x.y`` paths)."""
    doc = vm_doc(name)
    target = doc
    *parents, last = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return doc


def _boot(boot: dict[str, Any]) -> dict[str, Any]:
    """A valid document with another boot source (and the hypervisor that runs it)."""
    doc = _with("spec.boot", boot)
    if "command" not in boot:
        doc["spec"]["hypervisor"] = "qemu"
    return doc


BAD_DOCUMENTS = [
    pytest.param(_with("metadata.name", "Bad_Name"), "metadata.name", "DNS label", id="bad-name"),
    pytest.param(_with("metadata.name", "x" * 70), "metadata.name", "DNS label", id="long-name"),
    pytest.param(_with("spec.memory_mib", 0), "spec.memory_mib", "greater than zero", id="mem0"),
    pytest.param(_with("spec.memory_mib", "8M"), "spec.memory_mib", "at least 16M", id="mem-tiny"),
    pytest.param(_with("spec.memory_mib", "100T"), "spec.memory_mib", "at most 4T", id="mem-huge"),
    pytest.param(_with("spec.memory_mib", "512"), "spec.memory_mib", "needs a unit", id="mem-unit"),
    pytest.param(_with("spec.memory_mib", -1), "spec.memory_mib", "negative", id="mem-negative"),
    pytest.param(_with("spec.vcpus", 0), "spec.vcpus", "greater than or equal to 1", id="vcpu0"),
    pytest.param(_with("spec.vcpus", 100_000), "spec.vcpus", "less than or equal", id="vcpu-huge"),
    pytest.param(_with("spec.vcpus", "2"), "spec.vcpus", "valid integer", id="vcpu-string"),
    pytest.param(_with("spec.hypervisor", "vmware"), "spec.hypervisor", "'qemu'", id="hv"),
    pytest.param(_with("spec.accel", "hvf"), "spec.accel", "'kvm'", id="accel"),
    pytest.param(_with("spec.memroy_mib", 512), "spec.memroy_mib", "unknown field", id="typo"),
    pytest.param(_with("extra", 1), "extra", "unknown field", id="extra-top"),
    pytest.param(_with("spec.boot.colour", "red"), "spec.boot.colour", "unknown field", id="extra"),
    pytest.param(_with("kind", "Node"), "kind", "must be 'VM'", id="kind"),
    pytest.param(_boot({}), "spec.boot", "exactly one boot source", id="no-boot"),
    pytest.param(
        _boot({"command": ["sleep", "1"], "image": "alpine"}),
        "spec.boot",
        "exactly one",
        id="two-boots",
    ),
    pytest.param(
        _with("spec.hypervisor", "qemu"), "spec.hypervisor", "process hypervisor", id="cmd-qemu"
    ),
    pytest.param(
        _boot({"kernel": "/definitely/not/here"}),
        "spec.boot.kernel",
        "file /definitely/not/here does not exist on node n1",
        id="missing-kernel",
    ),
    pytest.param(
        _boot({"kernel": "relative/vmlinux"}),
        "spec.boot.kernel",
        "absolute path",
        id="relative-kernel",
    ),
    pytest.param(
        _boot({"kernel": "/"}),
        "spec.boot.kernel",
        "/ is not a regular file on node n1",
        id="kernel-is-dir",
    ),
    pytest.param(
        _boot({"image": "ubuntu"}),
        "spec.boot.image",
        "unknown image 'ubuntu' on node n1 (known images: alpine, debian:12)",
        id="unknown-image",
    ),
    pytest.param(
        _boot({"command": ["no-such-program-xyz"]}),
        "spec.boot.command[0]",
        "not found on PATH on node n1",
        id="cmd-not-on-path",
    ),
    pytest.param(
        _boot({"command": ["/no/such/program"]}),
        "spec.boot.command[0]",
        "file /no/such/program does not exist on node n1",
        id="cmd-missing",
    ),
    pytest.param(
        _boot({"command": ["./run.sh"]}),
        "spec.boot.command[0]",
        "absolute path or a command name",
        id="cmd-relative",
    ),
    pytest.param([1, 2], "(root)", "must be an object", id="array"),
    pytest.param("just text", "(root)", "must be an object", id="string"),
]


@pytest.mark.parametrize(("doc", "field", "reason"), BAD_DOCUMENTS)
async def test_bad_documents_are_refused_and_nothing_is_stored(
    api: Api, doc: Any, field: str, reason: str
) -> None:
    before = await api.store.head_revision()
    resp = await api.call("POST", "/v1/vms", json=doc)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid" and error["field"] == field
    assert reason in error["message"] and error["message"].startswith(f"{field}: ")
    assert await api.store.head_revision() == before  # not one write happened
    assert await api.keys() == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"metadata": {"name": "web"},', "malformed JSON: Expecting"),
        (b"{bad json}", "line 1 column 2"),
        (b"", "the request body is empty"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 10 + b"1" + b"]" * 10, "must be an object"),
    ],
)
async def test_malformed_bodies_are_400_at_the_root(api: Api, raw: bytes, reason: str) -> None:
    resp = await api.call(
        "POST", "/v1/vms", content=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == "(root)" and reason in error["message"]
    assert await api.keys() == []


async def test_oversized_body_is_refused(api: Api) -> None:
    raw = json.dumps({"metadata": {"name": "web"}, "pad": "x" * (2 << 20)}).encode()
    resp = await api.call("POST", "/v1/vms", content=raw)
    assert resp.status_code == 400 and "exceeds" in resp.json()["error"]["message"]
    assert await api.keys() == []


async def test_duplicate_name_is_409_and_keeps_the_first(api: Api) -> None:
    first = await _create(api, vm_doc())
    resp = await api.call("POST", "/v1/vms", json=vm_doc(vcpus=4))
    assert resp.status_code == 409
    assert resp.json()["error"] == {"code": "already_exists", "message": "vm 'web' already exists"}
    stored = await api.objects.get(VM, "web")
    assert str(stored.metadata.uid) == first["metadata"]["uid"] and stored.spec.vcpus == 1


async def test_power_state_changes_bump_the_generation(api: Api) -> None:
    await _create(api, vm_doc())
    steps = [
        ("stop", False, 0, 2),
        ("stop", False, 0, 3),  # every accepted call is a new generation
        ("start", True, 0, 4),
        ("restart", True, 1, 5),
        ("stop", False, 1, 6),
        ("restart", True, 2, 7),  # restart also runs a stopped VM
    ]
    for action, running, restarts, generation in steps:
        resp = await api.call("POST", f"/v1/vms/web/{action}")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["spec"]["running"] is running, action
        assert body["spec"]["restart_generation"] == restarts
        assert body["metadata"]["generation"] == generation
        stored = await api.objects.get(VM, "web")
        assert stored.spec.running is running and stored.metadata.generation == generation
        assert stored.metadata.resource_version == body["metadata"]["resource_version"]


async def test_concurrent_restarts_all_land(api: Api) -> None:
    await _create(api, vm_doc())
    results = await asyncio.gather(*(api.call("POST", "/v1/vms/web/restart") for _ in range(8)))
    assert all(r.status_code == 200 for r in results)
    stored = await api.objects.get(VM, "web")
    assert stored.spec.restart_generation == 8 and stored.metadata.generation == 9


async def test_get_and_list_join_instances_by_vm(api: Api) -> None:
    await _create(api, vm_doc("web", replicas=2))
    await _create(api, vm_doc("web-1"))
    await api.add_instance("web", 1, ObservedState.STARTING)
    await api.add_instance("web", 0)
    await api.add_instance("web-1", 0)  # "web-1-0": under web's key prefix, not web's
    resp = await api.call("GET", "/v1/vms/web")
    assert resp.status_code == 200
    body = resp.json()
    assert body["vm"]["metadata"]["name"] == "web"
    assert [i["metadata"]["name"] for i in body["instances"]] == ["web-0", "web-1"]
    assert [i["status"]["state"] for i in body["instances"]] == ["running", "starting"]
    listed = (await api.call("GET", "/v1/vms")).json()["items"]
    assert [(d["vm"]["metadata"]["name"], len(d["instances"])) for d in listed] == [
        ("web", 2),
        ("web-1", 1),
    ]
    only = (await api.call("GET", "/v1/instances", params={"vm": "web-1"})).json()["items"]
    assert [i["metadata"]["name"] for i in only] == ["web-1-0"]
    every = (await api.call("GET", "/v1/instances")).json()["items"]
    assert len(every) == 3


async def test_list_is_empty_at_first(api: Api) -> None:
    resp = await api.call("GET", "/v1/vms")
    assert resp.status_code == 200 and resp.json() == {"items": []}


async def test_delete_removes_the_record_only(api: Api) -> None:
    await _create(api, vm_doc())
    await api.add_instance("web", 0)
    resp = await api.call("DELETE", "/v1/vms/web")
    assert resp.status_code == 200 and resp.json()["metadata"]["name"] == "web"
    assert await api.keys() == []
    # Instances are the controllers' to garbage-collect.
    assert await api.keys("/blixard/v1/instances/") == ["/blixard/v1/instances/web-0"]
    again = await api.call("DELETE", "/v1/vms/web")
    assert again.status_code == 404
    assert again.json()["error"] == {"code": "not_found", "message": "vm 'web' does not exist"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/vms/ghost"),
        ("DELETE", "/v1/vms/ghost"),
        ("POST", "/v1/vms/ghost/start"),
        ("POST", "/v1/vms/ghost/stop"),
        ("POST", "/v1/vms/ghost/restart"),
        ("GET", "/v1/vms/ghost/logs"),
    ],
)
async def test_unknown_vm_is_404_and_writes_nothing(api: Api, method: str, path: str) -> None:
    before = await api.store.head_revision()
    resp = await api.call(method, path)
    assert resp.status_code == 404
    assert resp.json()["error"] == {"code": "not_found", "message": "vm 'ghost' does not exist"}
    assert await api.store.head_revision() == before


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/v1/vms/Bad_Name", "name"),
        ("POST", "/v1/vms/UPPER/stop", "name"),
        ("GET", "/v1/vms/web/logs?replica=-1", "replica"),
        ("GET", "/v1/vms/web/logs?replica=one", "replica"),
        ("GET", "/v1/vms/web/logs?follow=perhaps", "follow"),
        ("GET", "/v1/instances?vm=Not_A_Name", "vm"),
    ],
)
async def test_bad_parameters_are_400_with_their_field(
    api: Api, method: str, path: str, field: str
) -> None:
    await _create(api, vm_doc())
    resp = await api.call(method, path)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid" and error["field"] == field


async def test_logs_stream_from_the_injected_source(api: Api) -> None:
    await _create(api, vm_doc(replicas=2))
    await api.add_instance("web", 0)
    await api.add_instance("web", 1)
    api.logs.chunks["web-1"] = [b"booting\n", b"", b"ready\n"]
    resp = await api.call("GET", "/v1/vms/web/logs", params={"replica": 1, "follow": "true"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    assert resp.content == b"booting\nready\n"
    assert api.logs.calls == [("web-1", True)]


async def test_logs_of_a_missing_instance_or_task_are_404(api: Api) -> None:
    await _create(api, vm_doc())
    resp = await api.call("GET", "/v1/vms/web/logs", params={"replica": 3})
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "vm 'web' has no instance 'web-3'"
    await api.add_instance("web", 0)
    resp = await api.call("GET", "/v1/vms/web/logs")  # record exists; the node has no task
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "code": "not_found",
        "message": "no task for instance 'web-0' on node n1",
    }


async def test_command_must_be_an_executable_file(api: Api, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    for program, reason in [
        (str(script), f"{script} is not an executable file on node n1"),
        (str(tmp_path), f"{tmp_path} is not an executable file on node n1"),
    ]:
        resp = await api.call("POST", "/v1/vms", json=vm_doc(boot={"command": [program]}))
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["field"] == "spec.boot.command[0]" and reason in error["message"]
    assert await api.keys() == []
    script.chmod(0o755)
    await _create(api, vm_doc(boot={"command": [str(script)]}))


async def test_scale_sets_replicas_and_bumps_the_generation(api: Api) -> None:
    await _create(api, vm_doc())
    resp = await api.call("POST", "/v1/vms/web/scale", json={"replicas": 3})
    assert resp.status_code == 200, resp.text
    stored = await api.objects.get(VM, "web")
    assert stored.spec.replicas == 3 and stored.metadata.generation == 2
    resp = await api.call("POST", "/v1/vms/web/scale", json={"replicas": 0})
    assert resp.status_code == 200 and (await api.objects.get(VM, "web")).spec.replicas == 0


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"replicas": -1}, "replicas", "greater than or equal to 0"),
        ({"replicas": 1001}, "replicas", "less than or equal to 1000"),
        ({"replicas": "3"}, "replicas", "integer"),
        ({}, "replicas", "required"),
        ({"replicas": 2, "extra": 1}, "extra", "unknown field"),
        ([3], "(root)", "object"),
    ],
)
async def test_scale_refuses_bad_counts_and_changes_nothing(
    api: Api, body: Any, field: str, reason: str
) -> None:
    await _create(api, vm_doc())
    resp = await api.call("POST", "/v1/vms/web/scale", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == field and reason in error["message"].lower(), error
    stored = await api.objects.get(VM, "web")
    assert stored.spec.replicas == 1 and stored.metadata.generation == 1


async def test_scale_of_an_unknown_vm_is_404(api: Api) -> None:
    resp = await api.call("POST", "/v1/vms/ghost/scale", json={"replicas": 2})
    assert resp.status_code == 404 and "ghost" in resp.json()["error"]["message"]
