"""A typed, synchronous client of the Blixard API (httpx).

Synchronous because its main user is the CLI, which does one thing at a time
and polls; an async caller can run it in a thread. Every method returns
domain models or raises a Blixard error: the API's error answers become the
same classes as on the server (see :mod:`blixard.client.errors`), and a
connection failure becomes :class:`ApiUnreachable` naming the URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from blixard.client.errors import ApiUnreachable, UnexpectedAnswer, error_from_response
from blixard.client.models import Health, ImportResult, NodeDetails, ServiceDeleted, VMDetails
from blixard.domain.errors import BlixardError, ValidationError
from blixard.domain.instance import Instance
from blixard.domain.node import Node
from blixard.domain.parse import parse
from blixard.domain.service import Service
from blixard.domain.vm import VM

M = TypeVar("M", bound=BaseModel)
DEFAULT_TIMEOUT_S = 10.0


# ---------------------------------------------------------------- cluster answers
# The shapes of /v1/cluster answers (mirroring api/cluster.py; extra fields allowed so a
# newer server does not break an older CLI).


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class JoinReply(_Answer):
    """``POST /v1/cluster/join``: become an etcd member, or an agent using ``endpoints``."""

    member: bool
    member_id: str | None = None
    initial_cluster: dict[str, str] = Field(default_factory=dict)
    endpoints: list[str]
    target_members: int | None = None


class MemberInfo(_Answer):
    name: str
    id: str
    peer_urls: list[str]
    client_urls: list[str]
    leader: bool = False
    healthy: bool | None = None
    started: bool = True
    learner: bool = False


class NodeCounts(_Answer):
    total: int = 0
    alive: int = 0
    down: int = 0
    cordoned: int = 0
    draining: int = 0


class ThisNode(_Answer):
    name: str
    role: str


class ClusterStatus(_Answer):
    """``GET /v1/cluster``."""

    backend: str
    store: dict[str, Any]
    managed: bool
    target_members: int | None = None
    members: list[MemberInfo]
    nodes: NodeCounts
    controller_leader: str | None = None
    this_node: ThisNode
    join_token: str | None = None


class ClusterNode(_Answer):
    """A node, whether it is alive, and how many instances are assigned to it."""

    node: Node
    alive: bool
    instances: int


class DrainReply(_Answer):
    node: Node
    instances: int


class RemoveReply(_Answer):
    node: str
    removed_member: bool
    removed_record: bool


class LeaveReply(_Answer):
    node: str
    removed_member: bool
    removed_record: bool = True
    stopping: bool = True


class JoinTokenReply(_Answer):
    token: str
    path: str | None = None


def _path(kind: str, name: str, action: str = "") -> str:
    """``/v1/<kind>/<name>[/<action>]`` with the name quoted, so it stays one path segment."""
    path = f"/v1/{kind}/{quote(name, safe='')}"
    return f"{path}/{action}" if action else path


class BlixardClient:
    """``BlixardClient("http://127.0.0.1:7400", token)``; use as a context manager or close()."""

    def __init__(self, base_url: str, token: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout_s,
        )

    def __enter__(self) -> BlixardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _unreachable(self, exc: httpx.TransportError) -> BlixardError:
        if isinstance(exc, httpx.TimeoutException):
            return ApiUnreachable(
                f"the Blixard API at {self.base_url} did not answer within {self.timeout_s:g}s"
            )
        if isinstance(exc, httpx.ConnectError):
            return ApiUnreachable(
                f"cannot reach the Blixard API at {self.base_url}: is `blixard node start` running?"
            )
        return ApiUnreachable(f"lost the connection to the Blixard API at {self.base_url}: {exc}")

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise UnexpectedAnswer(
                f"the API answered {response.request.url} with something that is not JSON"
            ) from None

    def _model(self, cls: type[M], response: httpx.Response) -> M:
        """Decode an answer; a mismatch is the server's (or version's) fault, never input."""
        try:
            return parse(cls, self._json(response))
        except ValidationError as exc:
            raise UnexpectedAnswer(
                f"cannot read the API's answer to {response.request.url}: {exc}"
            ) from None

    def _items(self, cls: type[M], response: httpx.Response) -> list[M]:
        body = self._json(response)
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise UnexpectedAnswer(f"the API's answer to {response.request.url} has no items")
        try:
            return [parse(cls, item) for item in body["items"]]
        except ValidationError as exc:
            raise UnexpectedAnswer(
                f"cannot read the API's answer to {response.request.url}: {exc}"
            ) from None

    # ------------------------------------------------------------------ routes

    def health(self) -> Health:
        """``GET /health``; a 503 (store unreachable, still starting) is an answer too."""
        try:
            response = self._http.get("/health")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code not in (200, 503):
            raise error_from_response(response)
        return self._model(Health, response)

    def create_vm(self, document: dict[str, Any]) -> VM:
        """``POST /v1/vms`` with a VM document (``metadata.name`` and ``spec``)."""
        return self._model(VM, self._request("POST", "/v1/vms", json=document))

    def list_vms(self) -> list[VMDetails]:
        return self._items(VMDetails, self._request("GET", "/v1/vms"))

    def get_vm(self, name: str) -> VMDetails:
        return self._model(VMDetails, self._request("GET", _path("vms", name)))

    def delete_vm(self, name: str) -> VM:
        """Delete the VM record; answers the VM as it was."""
        return self._model(VM, self._request("DELETE", _path("vms", name)))

    def start_vm(self, name: str) -> VM:
        return self._model(VM, self._request("POST", _path("vms", name, "start")))

    def stop_vm(self, name: str) -> VM:
        return self._model(VM, self._request("POST", _path("vms", name, "stop")))

    def restart_vm(self, name: str) -> VM:
        return self._model(VM, self._request("POST", _path("vms", name, "restart")))

    def scale_vm(self, name: str, replicas: int) -> VM:
        path = _path("vms", name, "scale")
        return self._model(VM, self._request("POST", path, json={"replicas": replicas}))

    # ------------------------------------------------------------------ services

    def start_service(self, name: str, body: dict[str, Any] | None = None) -> Service:
        """Create or start a service; ``body`` may hold unit, nodes, replicas, placement."""
        path = _path("services", name, "start")
        return self._model(Service, self._request("POST", path, json=body or {}))

    def stop_service(self, name: str) -> Service:
        return self._model(Service, self._request("POST", _path("services", name, "stop")))

    def restart_service(self, name: str) -> Service:
        return self._model(Service, self._request("POST", _path("services", name, "restart")))

    def get_service(self, name: str) -> Service:
        return self._model(Service, self._request("GET", _path("services", name)))

    def list_services(self) -> list[Service]:
        return self._items(Service, self._request("GET", "/v1/services"))

    def delete_service(self, name: str) -> ServiceDeleted:
        return self._model(ServiceDeleted, self._request("DELETE", _path("services", name)))

    def import_services(self, services: list[dict[str, Any]], *, overwrite: bool) -> ImportResult:
        body = {"services": services, "overwrite": overwrite}
        response = self._request("POST", "/v1/services/import", json=body)
        return self._model(ImportResult, response)

    def list_instances(self, vm: str | None = None) -> list[Instance]:
        params = {"vm": vm} if vm is not None else None
        return self._items(Instance, self._request("GET", "/v1/instances", params=params))

    def list_nodes(self) -> list[NodeDetails]:
        return self._items(NodeDetails, self._request("GET", "/v1/nodes"))

    def get_node(self, name: str) -> NodeDetails:
        return self._model(NodeDetails, self._request("GET", _path("nodes", name)))

    # ------------------------------------------------------------------ cluster

    def join_cluster(
        self, node_id: str, peer_url: str | None = None, client_url: str | None = None
    ) -> JoinReply:
        """``POST /v1/cluster/join`` with this client's (join) token."""
        body = {"node_id": node_id, "peer_url": peer_url, "client_url": client_url}
        return self._model(JoinReply, self._request("POST", "/v1/cluster/join", json=body))

    def cluster_status(self) -> ClusterStatus:
        return self._model(ClusterStatus, self._request("GET", "/v1/cluster"))

    def cluster_nodes(self) -> list[ClusterNode]:
        return self._items(ClusterNode, self._request("GET", "/v1/cluster/nodes"))

    def cordon_node(self, name: str) -> ClusterNode:
        return self._model(
            ClusterNode, self._request("POST", _path("cluster/nodes", name, "cordon"))
        )

    def uncordon_node(self, name: str) -> ClusterNode:
        path = _path("cluster/nodes", name, "uncordon")
        return self._model(ClusterNode, self._request("POST", path))

    def drain_node(self, name: str) -> DrainReply:
        return self._model(DrainReply, self._request("POST", _path("cluster/nodes", name, "drain")))

    def remove_node(self, name: str, *, force: bool = False) -> RemoveReply:
        params = {"force": "true" if force else "false"}
        response = self._request("DELETE", _path("cluster/nodes", name), params=params)
        return self._model(RemoveReply, response)

    def leave_cluster(self) -> LeaveReply:
        """``POST /v1/cluster/leave``: the answering node leaves, then its daemon stops."""
        return self._model(LeaveReply, self._request("POST", "/v1/cluster/leave"))

    def join_token(self) -> JoinTokenReply:
        return self._model(JoinTokenReply, self._request("POST", "/v1/cluster/join-token"))

    def logs(self, name: str, *, replica: int = 0, follow: bool = False) -> Iterator[bytes]:
        """``GET /v1/vms/{name}/logs``: the replica's output, chunk by chunk.

        Errors (unknown VM or replica) raise before the first chunk. With
        ``follow`` there is no read timeout: the stream waits for new output.
        """
        params = {"replica": replica, "follow": "true" if follow else "false"}
        timeout = httpx.Timeout(self.timeout_s, read=None if follow else self.timeout_s)
        request = self._http.build_request(
            "GET", _path("vms", name, "logs"), params=params, timeout=timeout
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        finally:
            response.close()
