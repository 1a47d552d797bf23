"""One contract suite for every Driver: the same lifecycle, whatever runs the workload.

Everything is real: real processes (and, for QEMU, real guests under TCG).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blixard.domain.parse import parse
from blixard.domain.vm import VMSpec
from blixard.drivers import executor
from blixard.drivers.process import ProcessDriver
from blixard.drivers.protocol import BootFailed, Pausable, TaskHandle, TaskState
from blixard.drivers.qemu import AccelProbe, QemuDriver
from tests.support.drivers import (
    PROCESS_READY,
    DriverCase,
    process_spec,
    processes_in,
    workload_pid,
)
from tests.support.images import session_image


def _process_case() -> DriverCase:
    return DriverCase(
        name="process",
        driver=ProcessDriver(),
        fresh=ProcessDriver,
        spec=process_spec,
        ready_line=PROCESS_READY,
        clean_exit_code=0,
    )


def _qemu_case(tmp_path_factory: pytest.TempPathFactory) -> DriverCase:
    image = session_image(tmp_path_factory)
    images_dir = image.path.parent
    cache = tmp_path_factory.getbasetemp() / "contract-kvm-probe.json"

    def make() -> QemuDriver:
        return QemuDriver(images_dir, accel_probe=AccelProbe(cache, images_dir))

    def spec(**overrides: Any) -> VMSpec:
        data: dict[str, Any] = {
            "boot": {"image": image.name},
            "memory_mib": 256,
            "accel": "tcg",
            "boot_timeout_s": 60,
        }
        data.update(overrides)
        return parse(VMSpec, data)

    return DriverCase(
        name="qemu",
        driver=make(),
        fresh=make,
        spec=spec,
        ready_line=image.ready_line,
        clean_exit_code=0,
    )


@pytest.fixture(params=["process", "qemu"])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DriverCase]:
    if request.param == "process":
        yield _process_case()
    else:
        yield _qemu_case(tmp_path_factory)


@pytest.fixture
def started() -> Iterator[list[TaskHandle]]:
    """Handles to clean up whatever a test leaves running."""
    handles: list[TaskHandle] = []
    yield handles
    for h in handles:
        executor.kill_group(h.pid, h.pid_start_ticks)  # checks it is still our task


async def read_logs(case: DriverCase, handle: TaskHandle) -> bytes:
    return b"".join([chunk async for chunk in case.driver.logs(handle)])


async def test_start_is_ready_running_and_logged(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    assert (await case.driver.inspect(handle)).state is TaskState.RUNNING
    assert case.ready_line.encode() in await read_logs(case, handle)
    assert processes_in(tmp_path / "run") >= 1


async def test_graceful_stop(case: DriverCase, tmp_path: Path, started: list[TaskHandle]) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    status = await case.driver.stop(handle, timeout_s=10)
    assert status.state is TaskState.EXITED
    assert status.exit_code == case.clean_exit_code, status
    assert (await case.driver.inspect(handle)).state is TaskState.EXITED
    assert processes_in(tmp_path / "run") == 0


async def test_crash_is_detected_with_its_cause(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    waiter = asyncio.create_task(case.driver.wait(handle))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    os.kill(workload_pid(handle), signal.SIGKILL)
    status = await asyncio.wait_for(waiter, 10)
    assert status.state is TaskState.EXITED and status.signal == signal.SIGKILL
    assert (await case.driver.inspect(handle)).signal == signal.SIGKILL


async def test_recover_after_agent_restart_never_starts_a_second_copy(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    before = processes_in(tmp_path / "run")
    saved = handle.to_dict()  # what the agent persisted
    restarted = case.fresh()
    again = TaskHandle.from_dict(saved)
    assert (await restarted.recover(again)).state is TaskState.RUNNING
    assert processes_in(tmp_path / "run") == before
    # The recovered handle controls the same task.
    status = await restarted.stop(again, timeout_s=10)
    assert status.state is TaskState.EXITED


async def test_recover_reports_a_task_that_ended_while_the_agent_was_down(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    os.kill(workload_pid(handle), signal.SIGKILL)
    await case.driver.wait(handle)
    status = await case.fresh().recover(TaskHandle.from_dict(handle.to_dict()))
    assert status.state is TaskState.EXITED and status.signal == signal.SIGKILL


async def test_boot_that_never_becomes_ready_fails_and_leaves_nothing(
    case: DriverCase, tmp_path: Path
) -> None:
    spec = case.spec(ready_line="this line never appears", boot_timeout_s=1.5)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BootFailed) as info:
        await case.driver.start("t-0", spec, tmp_path / "run")
    assert "this line never appears" in str(info.value)
    assert loop.time() - began < 1.5 + 5
    assert processes_in(tmp_path / "run") == 0


async def test_pause_and_resume(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    if not case.driver.capabilities.pause:
        pytest.fail(f"{case.name} must support pause (or this test must learn otherwise)")
    assert isinstance(case.driver, Pausable)
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    await case.driver.pause(handle)
    assert (await case.driver.inspect(handle)).state is TaskState.PAUSED
    await case.driver.resume(handle)
    assert (await case.driver.inspect(handle)).state is TaskState.RUNNING
    assert (await case.driver.stop(handle, timeout_s=10)).state is TaskState.EXITED


async def test_destroy_removes_everything(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    await case.driver.destroy(handle)
    assert not (tmp_path / "run").exists()
    assert processes_in(tmp_path / "run") == 0


async def test_follow_streams_until_exit(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    handle = await case.driver.start("t-0", case.spec(), tmp_path / "run")
    started.append(handle)
    chunks: list[bytes] = []

    async def follow() -> None:
        async for chunk in case.driver.logs(handle, follow=True):
            chunks.append(chunk)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    assert not follower.done()
    await case.driver.stop(handle, timeout_s=10)
    await asyncio.wait_for(follower, 10)
    assert case.ready_line.encode() in b"".join(chunks)


async def test_strays_of_an_interrupted_start_are_found_and_killed(
    case: DriverCase, tmp_path: Path, started: list[TaskHandle]
) -> None:
    run_dir = tmp_path / "run"
    handle = await case.driver.start("t-0", case.spec(), run_dir)
    started.append(handle)
    other = await case.driver.start("t-1", case.spec(), tmp_path / "run-other")
    started.append(other)
    # The agent "forgot" the handle of t-0 (it died before recording it).
    assert executor.kill_strays(run_dir) == 1
    status = await case.driver.wait(handle)
    assert status.state is TaskState.EXITED
    assert processes_in(run_dir) == 0
    assert (await case.driver.inspect(other)).state is TaskState.RUNNING  # untouched
