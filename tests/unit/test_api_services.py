"""The service routes against a real SqliteStore, with the real service controller.

Semantics of start/stop/restart/delete/import, the live state joined from
instances, and bad input: 400 naming the field, 404 for an unknown service,
409 for a conflicting import, and nothing stored when a request is refused.
"""

from __future__ import annotations

from typing import Any

from blixard.controllers.services import ServiceController, plan_services
from blixard.domain.instance import ObservedState
from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeStatus
from blixard.domain.service import SERVICE_LABEL, Service
from blixard.domain.vm import VM, Hypervisor
from tests.unit.test_api_fixtures import NODE, Api, api

__all__ = ["api"]


async def add_node(api: Api, name: str, *, systemd: bool = True) -> None:
    hypervisors = [Hypervisor.PROCESS] + ([Hypervisor.SYSTEMD] if systemd else [])
    await api.objects.create(
        Node(metadata=ObjectMeta(name=name), status=NodeStatus(hypervisors=hypervisors))
    )
    await api.store.put(NODE_LEASES_PREFIX + name, b"")  # alive (no lease: tests only)


async def call(api: Api, method: str, path: str, status: int = 200, **kw: Any) -> Any:
    resp = await api.call(method, path, **kw)
    assert resp.status_code == status, resp.text
    return resp.json()


async def vm_names(api: Api) -> list[str]:
    return sorted(vm.metadata.name for vm in await api.objects.list(VM))


async def test_start_creates_a_service_on_this_node_and_the_controller_its_vm(api: Api) -> None:
    await add_node(api, NODE)
    body = await call(api, "POST", "/v1/services/nginx/start")
    assert body["spec"]["unit"] == "nginx.service" and body["spec"]["nodes"] == [NODE]
    assert body["spec"]["state"] == "running" and body["metadata"]["generation"] == 1
    controller = ServiceController(api.store)
    writes = await controller.sync()
    assert [(w.op, w.vm.metadata.name) for w in writes] == [("create", f"svc-nginx-{NODE}")]
    vm = await api.objects.get(VM, f"svc-nginx-{NODE}")
    assert vm.metadata.labels[SERVICE_LABEL] == "nginx" and vm.spec.boot.unit == "nginx.service"
    assert await controller.sync() == []  # nothing left to do

    status = (await call(api, "GET", "/v1/services/nginx"))["status"]
    assert status["synced"] and status["phase"] == "pending"
    assert status["nodes"][NODE]["sub_state"] == "pending"
    await api.add_instance(f"svc-nginx-{NODE}", 0, ObservedState.RUNNING)
    status = (await call(api, "GET", "/v1/services/nginx"))["status"]
    assert status["phase"] == "running"
    assert status["nodes"][NODE]["active_state"] == "active"
    assert status["nodes"][NODE]["sub_state"] == "running"
    listed = await call(api, "GET", "/v1/services")
    assert [s["metadata"]["name"] for s in listed["items"]] == ["nginx"]
    assert listed["items"][0]["status"]["phase"] == "running"


async def test_stop_restart_and_start_again_keep_where_it_runs(api: Api) -> None:
    await add_node(api, "n2")
    await call(api, "POST", "/v1/services/web/start", json={"nodes": ["n2"], "unit": "my_web"})
    stopped = await call(api, "POST", "/v1/services/web/stop")
    assert stopped["spec"]["state"] == "stopped" and stopped["metadata"]["generation"] == 2
    again = await call(api, "POST", "/v1/services/web/stop")
    assert again["metadata"]["generation"] == 2  # no change, no new generation
    restarted = await call(api, "POST", "/v1/services/web/restart")
    assert restarted["spec"]["state"] == "running" and restarted["spec"]["restart_generation"] == 1
    started = await call(api, "POST", "/v1/services/web/start")
    assert started["spec"]["nodes"] == ["n2"] and started["spec"]["unit"] == "my_web.service"
    await ServiceController(api.store).sync()
    vm = await api.objects.get(VM, "svc-web-n2")
    assert vm.spec.restart_generation == 1 and vm.spec.running


async def test_all_nodes_follow_the_cluster_and_placed_services_get_one_vm(api: Api) -> None:
    await add_node(api, "n1")
    await add_node(api, "n2")
    await add_node(api, "n3", systemd=False)  # no service driver there: no VM
    controller = ServiceController(api.store)
    await call(api, "POST", "/v1/services/agent/start", json={"nodes": "all"})
    await call(
        api, "POST", "/v1/services/db/start",
        json={"replicas": 2, "placement": {"node_selector": {"disk": "ssd"}}},
    )  # fmt: skip
    await controller.sync()
    assert await vm_names(api) == ["svc-agent-n1", "svc-agent-n2", "svc-db"]
    db = await api.objects.get(VM, "svc-db")
    assert db.spec.replicas == 2 and db.spec.placement.node_selector == {"disk": "ssd"}
    await add_node(api, "n4")
    n2 = await api.objects.get(Node, "n2")
    await api.objects.delete(n2)
    await controller.sync()
    assert await vm_names(api) == ["svc-agent-n1", "svc-agent-n4", "svc-db"]
    status = (await call(api, "GET", "/v1/services/db"))["status"]
    assert status["unplaced"] == ["svc-db-0", "svc-db-1"] and status["phase"] == "pending"


async def test_delete_takes_the_vms_with_it(api: Api) -> None:
    await add_node(api, NODE)
    await call(api, "POST", "/v1/services/nginx/start")
    await ServiceController(api.store).sync()
    reply = await call(api, "DELETE", "/v1/services/nginx")
    assert reply["vms"] == [f"svc-nginx-{NODE}"] and reply["service"]["metadata"]["name"] == "nginx"
    assert await vm_names(api) == [] and await api.keys("/blixard/v1/services/") == []
    await call(api, "DELETE", "/v1/services/nginx", 404)


async def test_unknown_services_are_404(api: Api) -> None:
    for method, path in [
        ("GET", "/v1/services/ghost"),
        ("POST", "/v1/services/ghost/stop"),
        ("POST", "/v1/services/ghost/restart"),
        ("DELETE", "/v1/services/ghost"),
    ]:
        body = await call(api, method, path, 404)
        assert body["error"]["message"] == "service 'ghost' does not exist"


async def test_bad_input_names_the_field_and_stores_nothing(api: Api) -> None:
    await add_node(api, NODE)
    cases = [
        ("/v1/services/nginx/start", {"unit": "nginx;reboot"}, "unit", "contains ';'"),
        ("/v1/services/nginx/start", {"unit": "$(reboot)"}, "unit", "contains '$'"),
        ("/v1/services/nginx/start", {"unit": "/etc/x.service"}, "unit", "not a path"),
        ("/v1/services/nginx/start", {"unit": "a..b"}, "unit", "'..'"),
        ("/v1/services/nginx/start", {"unit": "a b"}, "unit", "spaces"),
        ("/v1/services/nginx/start", {"nodes": ["nope"]}, "nodes", "no node 'nope'"),
        ("/v1/services/nginx/start", {"nodes": [NODE], "replicas": 2}, "spec.replicas", "placed"),
        ("/v1/services/nginx/start", {"nodez": "all"}, "nodez", ""),
        ("/v1/services/Nginx/start", {}, "name", "DNS label"),
        ("/v1/services/my_app/start", {}, "name", "DNS label"),
    ]
    for path, body, field, reason in cases:
        answer = await call(api, "POST", path, 400, json=body)
        assert answer["error"]["field"] == field, answer
        assert reason in answer["error"]["message"], answer
    assert await api.keys("/blixard/v1/services/") == []


async def test_one_unit_belongs_to_one_service(api: Api) -> None:
    await add_node(api, NODE)
    await call(api, "POST", "/v1/services/nginx/start")
    answer = await call(api, "POST", "/v1/services/web/start", 409, json={"unit": "nginx"})
    assert "already managed by service 'nginx'" in answer["error"]["message"]


def entries(*items: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "state": state, "nodes": [NODE]} for name, state in items]


async def test_import_is_all_or_nothing(api: Api) -> None:
    await add_node(api, NODE)
    body = {"services": entries(("nginx", "running"), ("redis", "stopped"))}
    reply = await call(api, "POST", "/v1/services/import", json=body)
    assert reply == {"created": ["nginx", "redis"], "updated": [], "unchanged": []}
    again = await call(api, "POST", "/v1/services/import", json=body)
    assert again == {"created": [], "updated": [], "unchanged": ["nginx", "redis"]}

    conflicting = {"services": entries(("cron", "running"), ("redis", "running"))}
    answer = await call(api, "POST", "/v1/services/import", 409, json=conflicting)
    message = answer["error"]["message"]
    assert "redis (state stopped -> running)" in message and "nothing was imported" in message
    assert await api.keys("/blixard/v1/services/") == [
        "/blixard/v1/services/nginx",
        "/blixard/v1/services/redis",
    ]  # no cron: all or nothing
    reply = await call(api, "POST", "/v1/services/import", json={**conflicting, "overwrite": True})
    assert reply == {"created": ["cron"], "updated": ["redis"], "unchanged": []}
    assert (await api.objects.get(Service, "redis")).spec.state.value == "running"


async def test_a_malformed_import_names_the_place(api: Api) -> None:
    bad = {"services": [*entries(("a", "running")), {"name": "b;reboot", "state": "running"}]}
    answer = await call(api, "POST", "/v1/services/import", 400, json=bad)
    assert answer["error"]["field"] == "services[1].name"
    unknown_node = {"services": [{"name": "a", "state": "running", "nodes": ["zz"]}]}
    answer = await call(api, "POST", "/v1/services/import", 400, json=unknown_node)
    assert answer["error"]["field"] == "services[0].nodes"
    assert await api.keys("/blixard/v1/services/") == []


async def test_the_controller_never_adopts_a_users_vm(api: Api) -> None:
    await add_node(api, NODE)
    resp = await api.call(
        "POST",
        "/v1/vms",
        json={
            "metadata": {"name": f"svc-nginx-{NODE}"},
            "spec": {"hypervisor": "process", "boot": {"command": ["sleep", "1"]}},
        },
    )
    assert resp.status_code == 201, resp.text
    await call(api, "POST", "/v1/services/nginx/start")
    assert await ServiceController(api.store).sync() == []
    status = (await call(api, "GET", "/v1/services/nginx"))["status"]
    assert "is not this service's" in status["message"] and not status["synced"]
    vm = await api.objects.get(VM, f"svc-nginx-{NODE}")
    assert vm.spec.hypervisor is Hypervisor.PROCESS  # untouched
    services = await api.objects.list(Service)
    assert plan_services(services, [vm], [], now=vm.metadata.created_at or _now()) == []


def _now() -> Any:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.now(UTC)
