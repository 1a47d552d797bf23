"""Fencing on a real etcd with real processes: a node that cannot prove its lease stops
(or pauses) its exclusive instances before the lease could expire, also when its
daemon is dead, and runs them again once it proves its lease again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blixard.agent.reconciler import Agent
from blixard.agent.registration import NodeRegistration
from blixard.controllers.vms import VmController
from blixard.domain.instance import Instance, ObservedState
from blixard.domain.vm import Hypervisor
from blixard.drivers import executor
from blixard.drivers.process import ProcessDriver
from blixard.drivers.protocol import TaskHandle
from blixard.store.etcd import EtcdStore
from blixard.store.objects import ObjectStore
from tests.integration.test_agent_lifecycle import until, vm_doc
from tests.support.drivers import workload_pid
from tests.support.etcd_cluster import EtcdCluster

NODE = "n1"
TTL_S = 3
MARGIN_S = 1.0


def remaining(reg: NodeRegistration) -> Callable[[], float | None]:
    return lambda: (reg.valid_until - reg.clock()) if reg.lease_id else None


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (None once it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    state = raw[raw.rindex(")") + 2]
    return None if state in "ZX" else state


@dataclass
class Cluster:
    store: EtcdStore
    objects: ObjectStore
    reg: NodeRegistration
    agent: Agent
    controller: asyncio.Task[None]
    run_root: Path


@pytest.fixture
async def cut_off_node(fresh_etcd1: EtcdCluster, tmp_path: Path) -> AsyncIterator[Cluster]:
    store = fresh_etcd1.client(timeout_s=1.0)
    reg = NodeRegistration(
        store, NODE, tmp_path, hypervisors=[Hypervisor.PROCESS], ttl_s=TTL_S, vcpu_overcommit=4
    )
    await reg.register()
    run_root = tmp_path / "vms"
    agent = Agent(
        store, NODE, {Hypervisor.PROCESS: ProcessDriver()}, run_root,
        stop_timeout_s=5, resync_s=1, lease_remaining=remaining(reg), fence_margin_s=MARGIN_S,
    )  # fmt: skip
    await agent.start()
    controller = asyncio.create_task(VmController(store, resync_s=1).run())
    c = Cluster(store, ObjectStore(store), reg, agent, controller, run_root)
    yield c
    for member in fresh_etcd1.members:
        member.signal(signal.SIGCONT)
    controller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await controller
    await agent.close()
    for run_dir in run_root.iterdir():
        if (run_dir / "agent.json").exists():
            executor.kill_strays(run_dir)
    await reg.close()
    await store.close()


async def running_pid(c: Cluster, name: str) -> int | None:
    inst = await c.objects.find(Instance, name)
    if inst is None or inst.status.state is not ObservedState.RUNNING or not inst.status.handle:
        return None
    try:
        return workload_pid(TaskHandle.from_dict(inst.status.handle))
    except (FileNotFoundError, AssertionError):
        return None  # a stale report of a task that just ended


async def start_three(c: Cluster) -> dict[str, int]:
    for name, fencing in (("stop", "stop"), ("hold", "pause"), ("keep", "none")):
        await c.objects.create(vm_doc(name, fencing=fencing))
    pids = {}
    for name in ("stop", "hold", "keep"):
        pids[name] = await until(f"{name}-0 running", lambda n=name: running_pid(c, f"{n}-0"))
    return pids


async def test_a_node_cut_off_from_the_store_fences_before_its_lease_can_expire(
    cut_off_node: Cluster, fresh_etcd1: EtcdCluster
) -> None:
    c = cut_off_node
    pids = await start_three(c)
    fresh_etcd1.members[0].signal(signal.SIGSTOP)  # the store stops answering
    cut_at = time.monotonic()
    await until("the stop-policy task killed", lambda: proc_state(pids["stop"]) is None, 10)
    killed_at = time.monotonic()
    # Killed before the lease could end: its last keepalive was sent before we cut.
    assert killed_at < c.reg.valid_until, (killed_at - cut_at, c.reg.valid_until - cut_at)
    await until("the pause-policy task stopped", lambda: proc_state(pids["hold"]) == "T", 5)
    assert proc_state(pids["keep"]) in {"S", "R"}, "fencing: none keeps running"
    assert not c.agent.may_run()

    fresh_etcd1.members[0].signal(signal.SIGCONT)

    async def restarted() -> int | None:
        pid = await running_pid(c, "stop-0")
        return pid if pid not in (None, pids["stop"]) else None

    await until("stop-0 running again", restarted, 20)
    inst = await c.objects.get(Instance, "stop-0")
    assert inst.status.restarts == 0 and inst.spec.epoch == 1 and inst.spec.node == NODE
    # The paused one is resumed in place (same process), once its instance is read as ours.
    await until("hold resumed", lambda: proc_state(pids["hold"]) in {"S", "R"}, 10)
    assert await running_pid(c, "hold-0") == pids["hold"]
    assert await running_pid(c, "keep-0") == pids["keep"]


async def test_a_dead_daemon_still_fences_its_tasks(cut_off_node: Cluster) -> None:
    """kill -9 of the daemon: no agent, no keepalives; the task shims fence on their own."""
    c = cut_off_node
    pids = await start_three(c)
    # What a SIGKILL of the daemon leaves: tasks under their shims, no agent, no keepalive.
    c.controller.cancel()
    await c.agent.close()
    assert c.reg._task is not None
    c.reg._task.cancel()
    lease_end = c.reg.valid_until
    await until("the stop-policy task killed", lambda: proc_state(pids["stop"]) is None, 10)
    assert time.monotonic() < lease_end
    await until("the pause-policy task stopped", lambda: proc_state(pids["hold"]) == "T", 5)
    assert proc_state(pids["keep"]) in {"S", "R"}
    inst = await c.objects.get(Instance, "stop-0")
    handle = TaskHandle.from_dict(inst.status.handle)
    assert (Path(handle.run_dir) / "exit").read_text().startswith("fenced")


async def test_a_single_node_without_lease_fencing_never_fences(
    fresh_etcd1: EtcdCluster, tmp_path: Path
) -> None:
    """An agent built without ``lease_remaining`` (the embedded store) writes no deadline."""
    store = fresh_etcd1.client(timeout_s=1.0)
    agent = Agent(store, NODE, {Hypervisor.PROCESS: ProcessDriver()}, tmp_path / "vms")
    await agent.start()
    try:
        assert agent.may_run()
        assert not list((tmp_path / "vms").glob("fence-*"))
    finally:
        await agent.close()
        await store.close()
