"""`blixard node start`: the composition root of one node.

Wires the state store, the node's registration (record + liveness lease), the
drivers (QEMU, process), the agent, the leader-elected controllers and the
HTTP API, and owns the process lifecycle. SIGTERM/SIGINT stop the API and the
controllers, revoke the liveness lease (the cluster sees a clean leave at
once, not after a TTL) and close the store; VMs keep running, and the next
start re-attaches to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from blixard import __version__
from blixard.agent.reconciler import Agent
from blixard.agent.registration import NodeRegistration
from blixard.api.app import create_app
from blixard.api.auth import TokenAuthority
from blixard.client.config import api_url_file, token_file
from blixard.controllers.functions import FunctionAutoscaler
from blixard.controllers.plan import Policy
from blixard.controllers.services import ServiceController
from blixard.controllers.vms import VmController
from blixard.daemon.cluster import NodeCluster, open_cluster
from blixard.daemon.config import NodeConfig
from blixard.daemon.functions import FunctionsPart, build_runtimes, start_functions
from blixard.daemon.service_driver import choose_service_driver
from blixard.domain.errors import BlixardError, StoreError
from blixard.domain.node import KvmState
from blixard.domain.vm import Accel, Hypervisor
from blixard.drivers.process import ProcessDriver
from blixard.drivers.protocol import Driver
from blixard.drivers.qemu import AccelProbe, QemuDriver
from blixard.images import (
    DEFAULT_IMAGE,
    FUNCTION_IMAGE,
    build_image,
    default_images_dir,
    list_images,
)
from blixard.scheduler.placement import default_limit
from blixard.store.election import Election
from blixard.store.objects import ObjectStore
from blixard.store.protocol import StateStore

log = structlog.get_logger(__name__)


class StartupError(BlixardError):
    code = "startup_failed"


def bind_api_socket(host: str, port: int) -> socket.socket:
    """Bind the API port ourselves, so "port in use" is a clear error, not a server log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only when it does,
    # and without it every kept-alive response waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"api_port: {host}:{port} is already in use") from None
        raise StartupError(f"api_host: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def prepare_images(config: NodeConfig, images_dir: Path) -> None:
    """Build the default guest image if it is missing, so a first VM can boot at once.

    A host without the guest kernel or busybox still runs the node (and the
    process driver): the failure is logged, and `blixard image build` says why.
    """
    if not config.build_default_image:
        return
    if not (images_dir / DEFAULT_IMAGE / "image.json").is_file():
        try:
            image = await asyncio.to_thread(build_image, DEFAULT_IMAGE, images_dir)
            log.info("built the default guest image", image=image.name, path=str(images_dir))
        except BlixardError as exc:
            log.warning(
                "no default guest image; qemu VMs need `blixard image build`", error=str(exc)
            )
    if (
        "microvm" in config.function_runtimes
        and not (images_dir / FUNCTION_IMAGE / "image.json").is_file()
    ):
        # The microvm runtime's guest: the default image plus the function agent.
        try:
            await asyncio.to_thread(build_image, FUNCTION_IMAGE, images_dir, function_agent=True)
            log.info("built the function guest image", path=str(images_dir))
        except BlixardError as exc:
            log.warning("no function guest image; microvm functions are refused", error=str(exc))


async def run_controllers(store: StateStore, node_id: str, ttl_s: int) -> None:
    """Campaign for leadership; run the controllers while leading; campaign again on loss."""
    while True:
        election = Election(store, "controllers", node_id, ttl_s=ttl_s)
        try:
            await election.campaign()
            log.info("leading the controllers", node=node_id)
            # The grace must outlast the agents' fencing margin (TTL/5): docs/failover.md.
            grace = max(1.5, 0.3 * ttl_s)
            policy = Policy(failover_grace_s=grace, placement_limit=default_limit)
            controller = asyncio.create_task(VmController(store, policy=policy).run())
            services = asyncio.create_task(ServiceController(store).run())
            autoscaler = asyncio.create_task(FunctionAutoscaler(store).run())
            lost = asyncio.create_task(election.lost.wait())
            try:
                await asyncio.wait(
                    {controller, services, autoscaler, lost},
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                controller.cancel()
                services.cancel()
                autoscaler.cancel()
                lost.cancel()
                # Wait for the controllers to end without swallowing our own cancellation.
                await asyncio.wait({controller, services, autoscaler, lost})
            if not controller.cancelled() and controller.exception() is not None:
                log.error("vm controller failed", error=repr(controller.exception()))
            if not services.cancelled() and services.exception() is not None:
                log.error("service controller failed", error=repr(services.exception()))
            if not autoscaler.cancelled() and autoscaler.exception() is not None:
                log.error("function autoscaler failed", error=repr(autoscaler.exception()))
            log.warning("lost the controllers' leadership", node=node_id)
            await asyncio.sleep(0.5)  # never a tight campaign loop
        except BlixardError as exc:  # StoreError, LeaseNotFound, ...
            log.info("election will retry", error=str(exc))
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(BlixardError):
                await election.close()


async def run_node(
    config: NodeConfig, on_ready: Callable[[str, dict[str, Any]], None] | None = None
) -> None:
    """Run the node until SIGTERM or SIGINT (or until it left its cluster).

    ``on_ready(api_url, store_description)`` is called once the API serves.
    """
    sock = bind_api_socket(config.api_host, config.api_port)
    gateway_sock: socket.socket | None = None
    if config.gateway_port:
        try:
            gateway_sock = bind_api_socket(config.api_host, config.gateway_port)
        except StartupError as exc:
            sock.close()
            raise StartupError(str(exc).replace("api_port", "gateway_port", 1)) from None
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sock.close()
        raise StartupError(f"data_dir: cannot create {config.data_dir}: {exc.strerror}") from None
    try:
        cluster: NodeCluster = await open_cluster(config)
    except BaseException:
        sock.close()
        raise
    store, description = cluster.store, cluster.description
    for section in config.unused_sections:
        log.warning("config section is not used by this version", section=section)
    images_dir = default_images_dir(config.data_dir)
    probe = AccelProbe(
        config.data_dir / "kvm-probe.json", images_dir, timeout_s=config.kvm_probe_timeout_s
    )
    drivers: dict[Hypervisor, Driver] = {
        Hypervisor.QEMU: QemuDriver(images_dir, accel_probe=probe),
        Hypervisor.PROCESS: ProcessDriver(),
    }
    service_driver = await choose_service_driver(config)
    if service_driver is not None:  # the node offers the systemd hypervisor only with one
        drivers[Hypervisor.SYSTEMD] = service_driver
    background: list[asyncio.Task[Any]] = []
    agent: Agent | None = None
    registration: NodeRegistration | None = None
    functions: FunctionsPart | None = None
    try:
        await prepare_images(config, images_dir)
        hypervisors, kvm, kvm_detail = await fingerprint(drivers)
        registration = NodeRegistration(
            store,
            config.node_id,
            config.data_dir,
            api_url=config.api_url,
            gateway_url=config.gateway_url,
            function_runtimes=config.function_runtimes,
            ttl_s=config.lease_ttl_s,
            version=__version__,
            hypervisors=hypervisors,
            kvm=kvm,
            kvm_detail=kvm_detail,
            vcpu_overcommit=config.vcpu_overcommit,
            roles=cluster.roles,
            zone=config.zone,
            # Started without --label/--zone (e.g. a plain restart): keep what the record has.
            labels=config.labels if (config.labels or config.zone) else None,
        )
        await registration.register()
        auth = TokenAuthority(ObjectStore(store))
        await auth.ensure_admin_token(token_file(config.data_dir))
        await cluster.ensure_join_token(auth)
        # Fencing protects a cluster (etcd) from two copies of one VM; on the embedded
        # store there is one node and no partition from the store, so there is none.
        fencing = description.get("backend") == "etcd"
        agent = Agent(
            store,
            config.node_id,
            drivers,
            config.data_dir / "vms",
            stop_timeout_s=config.stop_timeout_s,
            lease_remaining=registration.lease_remaining if fencing else None,
            fence_margin_s=config.lease_ttl_s / 5,
        )
        await agent.start()
        background.append(
            asyncio.create_task(run_controllers(store, config.node_id, config.lease_ttl_s))
        )
        probing = config.accel is not Accel.TCG  # a TCG-only node never needs to know
        if probing and (images_dir / DEFAULT_IMAGE / "image.json").is_file():
            background.append(
                asyncio.create_task(_probe_then_publish(probe, drivers, registration))
            )

        def image_exists(name: str) -> bool:
            return (images_dir / name / "image.json").is_file()

        def known_images() -> list[str]:
            return [image.name for image in list_images(images_dir)]

        runtimes = build_runtimes(config.function_runtimes, config.data_dir, images_dir)
        if gateway_sock is not None:
            functions = await start_functions(
                store, config.node_id, runtimes, config.data_dir / "functions" / "workers",
                gateway_sock,
            )  # fmt: skip
        app = create_app(
            store,
            node_id=config.node_id,
            store_description=description,
            registered=registration.alive,
            auth=auth,
            logs=agent.logs,
            image_exists=image_exists,
            known_images=known_images,
            cluster=cluster,
            gateway=functions.gateway if functions is not None else None,
            runtimes=runtimes,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        cluster.on_shutdown(lambda: setattr(server, "should_exit", True))  # after `cluster leave`
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            raise StartupError("the API server stopped during start-up")
        api_url_file(config.data_dir).write_text(config.api_url + "\n")
        if on_ready is not None:
            on_ready(config.api_url, description)
        await serving
        log.info("node stopping", node=config.node_id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(sig)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if functions is not None:
            await functions.close()
        if agent is not None:
            await agent.close()
        if registration is not None:
            with contextlib.suppress(StoreError):
                await registration.close(revoke=description.get("backend") != "etcd")
        with contextlib.suppress(FileNotFoundError):
            api_url_file(config.data_dir).unlink()
        await store.close()
        await cluster.close()
        sock.close()
        if gateway_sock is not None:
            gateway_sock.close()


async def fingerprint(
    drivers: dict[Hypervisor, Driver],
) -> tuple[list[Hypervisor], KvmState, str]:
    """What this node offers: every healthy driver's hypervisors, and KVM's state."""
    hypervisors: list[Hypervisor] = []
    kvm, kvm_detail = KvmState.ABSENT, ""
    for driver in drivers.values():
        facts = await driver.fingerprint()
        if facts.healthy:
            hypervisors.extend(facts.hypervisors)
        elif facts.detail:
            log.warning("driver unavailable", driver=driver.name, detail=facts.detail)
        if facts.kvm is not KvmState.ABSENT:
            kvm, kvm_detail = facts.kvm, facts.kvm_detail
    return hypervisors, kvm, kvm_detail


async def _probe_then_publish(
    probe: AccelProbe, drivers: dict[Hypervisor, Driver], registration: NodeRegistration
) -> None:
    """Run the KVM probe in the background and publish its verdict on the node record."""
    await probe.probe()
    hypervisors, kvm, kvm_detail = await fingerprint(drivers)
    await registration.update_facts(hypervisors=hypervisors, kvm=kvm, kvm_detail=kvm_detail)
    log.info("kvm probe finished", kvm=kvm.value, detail=kvm_detail)
