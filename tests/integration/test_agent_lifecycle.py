"""The agent and the VM controller together, on a real SQLite store and real processes.

No HTTP here: VMs are written to the store as the API would, and the test
watches what the controller and the agent make of them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from blixard.agent.reconciler import Agent
from blixard.agent.registration import NodeRegistration
from blixard.controllers.vms import VmController
from blixard.domain.instance import Instance, ObservedState
from blixard.domain.node import Node as NodeRecord
from blixard.domain.parse import parse
from blixard.domain.vm import VM, Hypervisor, VMPhase
from blixard.drivers import executor
from blixard.drivers.process import ProcessDriver
from blixard.drivers.protocol import TaskHandle
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore
from tests.support.drivers import PROCESS_READY, PROCESS_SCRIPT, processes_in, workload_pid

NODE = "n1"


@dataclass
class Node:
    store: SqliteStore
    objects: ObjectStore
    agent: Agent
    run_root: Path
    tasks: list[asyncio.Task[None]]

    def new_agent(self) -> Agent:
        return Agent(
            self.store, NODE, {Hypervisor.PROCESS: ProcessDriver()}, self.run_root,
            stop_timeout_s=5, resync_s=1,
        )  # fmt: skip


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    store = await SqliteStore.open(tmp_path / "state.db")
    reg = NodeRegistration(
        store, NODE, tmp_path, hypervisors=[Hypervisor.PROCESS], vcpu_overcommit=4
    )
    await reg.register()
    n = Node(store, ObjectStore(store), None, tmp_path / "vms", [])  # type: ignore[arg-type]
    n.agent = n.new_agent()
    await n.agent.start()
    n.tasks.append(asyncio.create_task(VmController(store, resync_s=1).run()))
    yield n
    for t in n.tasks:
        t.cancel()
    await n.agent.close()
    for local in list(n.agent.tasks.values()):
        if local.handle is not None:
            await ProcessDriver().destroy(local.handle)
    # A start cut short by the teardown has no handle yet; its run dir names its task
    # (what the next agent's recovery would clear).
    for run_dir in n.run_root.iterdir() if n.run_root.exists() else ():
        if run_dir.is_dir():
            executor.kill_strays(run_dir)
    await reg.close()
    await store.close()


def vm_doc(name: str, **spec: Any) -> VM:
    base: dict[str, Any] = {
        "hypervisor": "process",
        "boot": {"command": ["/bin/sh", "-c", PROCESS_SCRIPT]},
        "ready_line": PROCESS_READY,
        "boot_timeout_s": 10,
        "restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1},
    }
    base.update(spec)
    return parse(
        VM,
        {
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),  # as the API gives every VM
                "generation": 1,
                "created_at": datetime.now(UTC).isoformat(),
            },
            "spec": base,
        },
    )


async def until(
    what: str, check: Callable[[], Any], timeout_s: float = 15, every_s: float = 0.05
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}; last saw {last!r}")


async def instance(n: Node, name: str) -> Instance | None:
    return await n.objects.find(Instance, name)


async def running(n: Node, name: str, restarts: int = 0) -> Instance | None:
    inst = await instance(n, name)
    ok = (
        inst is not None
        and inst.status.state is ObservedState.RUNNING
        and inst.status.ready
        and inst.status.restarts >= restarts
    )
    return inst if ok else None


def handle_of(inst: Instance) -> TaskHandle:
    return TaskHandle.from_dict(inst.status.handle)


async def test_vm_runs_and_reports(node: Node) -> None:
    await node.objects.create(vm_doc("web", replicas=2))
    for i in range(2):
        inst = await until(f"web-{i} running", lambda i=i: running(node, f"web-{i}"))
        assert inst.spec.node == NODE and inst.spec.epoch == 1 and inst.status.epoch == 1
        assert processes_in(node.run_root / f"web-{i}") >= 1
    vm = await until(
        "VM running",
        lambda: _vm_with(node, "web", lambda v: v.status.phase is VMPhase.RUNNING),
    )
    assert vm.status.ready_replicas == 2 and "placed on n1" in vm.status.placement_reason
    logs = b"".join([c async for c in node.agent.logs("web-0", follow=False)])
    assert PROCESS_READY.encode() in logs
    record = await until(
        "allocation published",
        lambda: _node_with(node, lambda n: n.status.allocated.memory_mib == 2 * 512),
    )
    assert record.status.allocated.vcpus == 2


async def _node_with(n: Node, pred: Callable[[NodeRecord], bool]) -> NodeRecord | None:
    record = await n.objects.find(NodeRecord, NODE)
    return record if record is not None and pred(record) else None


async def _vm_with(n: Node, name: str, pred: Callable[[VM], bool]) -> VM | None:
    vm = await n.objects.find(VM, name)
    return vm if vm is not None and pred(vm) else None


async def test_crash_is_restarted_with_backoff(node: Node) -> None:
    await node.objects.create(vm_doc("crashy"))
    first = await until("running", lambda: running(node, "crashy-0"))
    pid = workload_pid(handle_of(first))
    os.kill(pid, signal.SIGKILL)
    failed = await until(
        "failure reported",
        lambda: _inst_with(node, "crashy-0", lambda i: "killed by signal 9" in i.status.message),
    )
    assert failed.status.state in (
        ObservedState.FAILED,
        ObservedState.STARTING,
        ObservedState.RUNNING,
    )
    again = await until("restarted", lambda: running(node, "crashy-0", restarts=1))
    assert workload_pid(handle_of(again)) != pid
    assert processes_in(node.run_root / "crashy-0") == 1  # one task shim: one copy


async def _inst_with(n: Node, name: str, pred: Callable[[Instance], bool]) -> Instance | None:
    inst = await instance(n, name)
    return inst if inst is not None and pred(inst) else None


async def test_restart_policy_never_leaves_it_failed(node: Node) -> None:
    await node.objects.create(vm_doc("once", restart={"mode": "never"}))
    first = await until("running", lambda: running(node, "once-0"))
    os.kill(workload_pid(handle_of(first)), signal.SIGKILL)
    inst = await until(
        "failed",
        lambda: _inst_with(node, "once-0", lambda i: i.status.state is ObservedState.FAILED),
    )
    assert "not restarted (restart policy)" in inst.status.message
    await asyncio.sleep(1.5)  # longer than the backoff and a resync
    inst = await instance(node, "once-0")
    assert (
        inst is not None and inst.status.state is ObservedState.FAILED and inst.status.restarts == 0
    )


async def test_stop_start_restart(node: Node) -> None:
    await node.objects.create(vm_doc("svc"))
    first = await until("running", lambda: running(node, "svc-0"))
    await node.objects.modify(VM, "svc", lambda v: _spec(v, running=False))
    await until(
        "stopped",
        lambda: _inst_with(node, "svc-0", lambda i: i.status.state is ObservedState.STOPPED),
    )
    assert processes_in(node.run_root / "svc-0") == 0
    await until(
        "VM stopped", lambda: _vm_with(node, "svc", lambda v: v.status.phase is VMPhase.STOPPED)
    )
    await node.objects.modify(VM, "svc", lambda v: _spec(v, running=True))
    second = await until("running again", lambda: running(node, "svc-0"))
    assert second.status.restarts == 0  # a requested start is not a crash restart
    await node.objects.modify(VM, "svc", lambda v: _spec(v, restart_generation=1))
    third = await until(
        "restarted on request",
        lambda: _inst_with(
            node, "svc-0", lambda i: i.status.restart_generation == 1 and i.status.ready
        ),
    )
    assert third.status.handle["pid"] != second.status.handle["pid"] != first.status.handle["pid"]


def _spec(vm: VM, **changes: Any) -> VM:
    meta = vm.metadata.model_copy(update={"generation": vm.metadata.generation + 1})
    return vm.model_copy(update={"spec": vm.spec.model_copy(update=changes), "metadata": meta})


async def test_agent_restart_reattaches_without_a_second_copy(node: Node) -> None:
    await node.objects.create(vm_doc("keep"))
    first = await until("running", lambda: running(node, "keep-0"))
    await node.agent.close()  # the daemon stops; the task keeps running
    assert processes_in(node.run_root / "keep-0") >= 1
    node.agent = node.new_agent()
    await node.agent.start()
    await asyncio.sleep(1.5)  # several reconcile passes
    inst = await until("still running", lambda: running(node, "keep-0"))
    assert inst.status.handle["pid"] == first.status.handle["pid"]
    assert processes_in(node.run_root / "keep-0") == 1  # one task shim: the same single copy
    assert inst.status.restarts == 0


async def test_interrupted_start_is_cleaned_before_starting_again(node: Node) -> None:
    await node.objects.create(vm_doc("half"))
    await until("running", lambda: running(node, "half-0"))
    await node.agent.close()
    # Simulate a crash between spawn and recording the handle.
    record = node.run_root / "half-0" / "agent.json"
    data = record.read_text().replace('"handle": {', '"handle": null, "old": {')
    record.write_text(data)
    node.agent = node.new_agent()
    await node.agent.start()
    await until("running again", lambda: running(node, "half-0"))
    await asyncio.sleep(0.5)
    assert processes_in(node.run_root / "half-0") == 1  # exactly one task shim


async def test_boot_failure_is_retried_with_backoff(node: Node) -> None:
    await node.objects.create(vm_doc("slow", ready_line="never printed", boot_timeout_s=0.5))
    inst = await until(
        "boot failure reported",
        lambda: _inst_with(node, "slow-0", lambda i: "restarting in" in i.status.message),
    )
    assert inst.status.state is ObservedState.FAILED and "never printed" in inst.status.message
    inst = await until(
        "a second attempt", lambda: _inst_with(node, "slow-0", lambda i: i.status.restarts >= 1)
    )
    vm = await until(
        "VM failed", lambda: _vm_with(node, "slow", lambda v: v.status.phase is VMPhase.FAILED)
    )
    assert "never printed" in vm.status.message


async def test_delete_and_scale_down_remove_tasks(node: Node) -> None:
    await node.objects.create(vm_doc("gone", replicas=2))
    await until("both running", lambda: running(node, "gone-1"))
    await node.objects.modify(VM, "gone", lambda v: _spec(v, replicas=1))
    await until("gone-1 deleted", lambda: _absent(node, "gone-1"))
    await until("its task removed", lambda: not (node.run_root / "gone-1").exists())
    vm = await node.objects.get(VM, "gone")
    await node.objects.delete(vm)
    await until("gone-0 deleted", lambda: _absent(node, "gone-0"))
    await until("all tasks removed", lambda: not (node.run_root / "gone-0").exists())
    assert processes_in(node.run_root) == 0


async def _absent(n: Node, name: str) -> bool:
    return await instance(n, name) is None


async def test_unplaceable_vm_says_why(node: Node) -> None:
    await node.objects.create(vm_doc("huge", memory_mib=4 * 1024 * 1024))
    vm = await until(
        "placement reason",
        lambda: _vm_with(node, "huge", lambda v: "not enough capacity" in v.status.message),
    )
    assert vm.status.phase is VMPhase.PENDING and "n1" in vm.status.message
    inst = await instance(node, "huge-0")
    assert inst is not None and inst.spec.node is None


# --- regressions found in review -----------------------------------------------------------

IGNORES_TERM = "trap '' TERM; echo 'workload: ready'; while true; do sleep 0.1; done"


async def test_instance_moved_elsewhere_is_killed_at_once(node: Node) -> None:
    """Fencing: a copy assigned elsewhere is destroyed now, not stopped gracefully."""
    await node.objects.create(vm_doc("moved", boot={"command": ["/bin/sh", "-c", IGNORES_TERM]}))
    await until("running", lambda: running(node, "moved-0"))
    for t in node.tasks:  # the controller would put it back on n1
        t.cancel()

    def elsewhere(inst: Instance) -> Instance:
        spec = inst.spec.model_copy(update={"node": "n2", "epoch": inst.spec.epoch + 1})
        return inst.model_copy(update={"spec": spec})

    await node.objects.modify(Instance, "moved-0", elsewhere)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await until("local copy gone", lambda: processes_in(node.run_root / "moved-0") == 0, 10)
    assert loop.time() - began < 2.0  # stop_timeout_s is 5: it was not a graceful stop


async def test_explicit_restart_overrides_the_policy(node: Node) -> None:
    await node.objects.create(vm_doc("never", restart={"mode": "never"}))
    first = await until("running", lambda: running(node, "never-0"))
    os.kill(workload_pid(handle_of(first)), signal.SIGKILL)
    await until(
        "failed",
        lambda: _inst_with(node, "never-0", lambda i: i.status.state is ObservedState.FAILED),
    )
    await node.objects.modify(VM, "never", lambda v: _spec(v, restart_generation=1))
    again = await until("running after vm restart", lambda: running(node, "never-0"))
    assert again.status.restart_generation == 1


async def test_start_after_stop_survives_an_agent_restart(node: Node) -> None:
    await node.objects.create(vm_doc("later", restart={"mode": "on-failure"}))
    await until("running", lambda: running(node, "later-0"))
    await node.objects.modify(VM, "later", lambda v: _spec(v, running=False))
    await until(
        "stopped",
        lambda: _inst_with(node, "later-0", lambda i: i.status.state is ObservedState.STOPPED),
    )
    await node.agent.close()
    node.agent = node.new_agent()
    await node.agent.start()
    await node.objects.modify(VM, "later", lambda v: _spec(v, running=True))
    await until("running again", lambda: running(node, "later-0"))


async def test_recreated_vm_gets_a_new_task(node: Node) -> None:
    await node.objects.create(vm_doc("again"))
    old = await until("running", lambda: running(node, "again-0"))
    await node.agent.close()  # the agent is down while the VM is replaced
    await node.objects.delete(await node.objects.get(VM, "again"))
    # Its replica is stopped before its record goes: with no agent, it stays.
    await asyncio.sleep(1)
    assert not await _absent(node, "again-0")
    script = "echo 'workload: ready'; echo second; while true; do sleep 0.1; done"
    await node.objects.create(vm_doc("again", boot={"command": ["/bin/sh", "-c", script]}))
    node.agent = node.new_agent()
    await node.agent.start()
    new = await until(
        "the new VM's task",
        lambda: _inst_with(
            node,
            "again-0",
            lambda i: i.status.ready and i.status.handle.get("pid") != old.status.handle["pid"],
        ),
    )
    logs = b"".join([c async for c in node.agent.logs("again-0", follow=False)])
    assert b"second" in logs and new.metadata.uid != old.metadata.uid


async def test_workload_of_a_killed_shim_is_not_left_running(node: Node) -> None:
    await node.objects.create(vm_doc("orphan"))
    first = await until("running", lambda: running(node, "orphan-0"))
    handle = handle_of(first)
    workload = workload_pid(handle)
    os.kill(handle.pid, signal.SIGKILL)  # the shim alone dies; its workload lives on
    await until("restarted", lambda: running(node, "orphan-0", restarts=1))
    await until("old workload gone", lambda: not _alive(workload), 10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_backoff_never_overflows() -> None:
    from blixard.agent.reconciler import LocalTask  # noqa: PLC0415

    agent = Agent(None, NODE, {}, Path("/nonexistent"))  # type: ignore[arg-type]
    local = LocalTask(name="x-0", vm="x", hypervisor=Hypervisor.PROCESS, epoch=1)
    local.failures = 5000
    agent._fail(local)
    assert local.not_before - agent.clock() <= local.policy.backoff_max_s + 1
