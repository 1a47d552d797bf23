"""The systemd driver against a FAKE systemd on a private D-Bus bus (tests/support/fake_systemd.py).

systemd cannot run as PID 1 here, so the peer is a fake that answers the
documented org.freedesktop.systemd1 calls as systemd does; the bus itself is a
real dbus-daemon and the driver's D-Bus traffic is real. Not in the driver
contract suite: that suite's assumptions (a ready line in the task's output,
logs, processes in the run directory, killing the workload's pid) do not hold
for units that systemd owns.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.parse import parse
from blixard.domain.vm import Hypervisor, VMSpec
from blixard.drivers.protocol import (
    BootFailed,
    Driver,
    DriverError,
    TaskGone,
    TaskHandle,
    TaskState,
)
from blixard.drivers.systemd import (
    SystemdDriver,
    UnitNotFound,
    UnitState,
    check_unit_name,
    task_status,
)
from tests.support.fake_systemd import (
    FakeBus,
    FakeSystemd,
    FakeUnitSpec,
    fake_systemd_on_private_bus,
    fake_unit_path,
)

FAKE_UNITS = [
    FakeUnitSpec("nginx.service", status_text="Ready to serve"),
    FakeUnitSpec("broken.service", behaviour="fails", exit_status=1),
    FakeUnitSpec("flaky.service"),
    FakeUnitSpec("stuck.service", behaviour="hangs"),
    FakeUnitSpec("stubborn.service", stop_hangs=True),
    FakeUnitSpec("getty@tty1.service"),
]


#: A broken driver or fake fails a test in seconds, not after systemd's default timeouts.
QUICK: dict[str, Any] = {"call_timeout_s": 5.0, "start_timeout_s": 5.0}


@dataclass
class Env:
    fake: FakeSystemd
    bus: FakeBus
    driver: SystemdDriver
    others: list[SystemdDriver] = field(default_factory=list)

    def fresh(self, **kwargs: Any) -> SystemdDriver:
        """Another driver on the same bus, as after an agent restart."""
        driver = SystemdDriver(self.bus.address, **{**QUICK, **kwargs})
        self.others.append(driver)
        return driver


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with fake_systemd_on_private_bus(FAKE_UNITS) as (fake, bus):
        e = Env(fake, bus, SystemdDriver(bus.address, **QUICK))
        try:
            yield e
        finally:
            for driver in [e.driver, *e.others]:
                await driver.aclose()


def systemd_spec(unit: str) -> VMSpec:
    """A spec of the systemd hypervisor carrying ``unit`` in boot.unit.

    The domain checks unit names, so a valid spec is parsed, then changed with
    model_copy, which does not validate: the driver's own checks are tested.
    """
    spec = parse(
        VMSpec,
        {"hypervisor": "systemd", "boot": {"unit": "placeholder"}, "boot_timeout_s": 5},
    )
    return spec.model_copy(update={"boot": spec.boot.model_copy(update={"unit": unit})})


def job_calls(fake: FakeSystemd) -> list[tuple[str, tuple[Any, ...]]]:
    jobs = {"StartUnit", "StopUnit", "RestartUnit", "KillUnit"}
    return [(c.member, c.args) for c in fake.calls if c.member in jobs]


# ------------------------------------------------------------------ lifecycle


async def test_start_inspect_and_stop_a_unit(env: Env) -> None:
    assert isinstance(env.driver, Driver)
    handle = await env.driver.start_unit("nginx.service")
    assert handle.driver == "systemd" and handle.data["unit"] == "nginx.service"
    assert handle.pid == -1  # never a pid for the executor's kill helpers
    assert int(handle.data["main_pid"]) > 0
    status = await env.driver.inspect(handle)
    assert status.state is TaskState.RUNNING
    assert "active (running)" in status.message and "Ready to serve" in status.message

    stopped = await env.driver.stop(handle, timeout_s=5)
    assert stopped.state is TaskState.EXITED and stopped.exit_code == 0, stopped
    assert "inactive" in stopped.message and "SIGTERM" in stopped.message
    assert (await env.driver.inspect(handle)).state is TaskState.EXITED
    assert job_calls(env.fake) == [
        ("StartUnit", ("nginx.service", "replace")),
        ("StopUnit", ("nginx.service", "replace")),
    ]


async def test_starting_a_running_unit_starts_no_second_copy(env: Env) -> None:
    first = await env.driver.start_unit("nginx.service")
    again = await env.driver.start_unit("nginx.service")
    assert again.data["main_pid"] == first.data["main_pid"]
    assert again.data["active_enter_us"] == first.data["active_enter_us"]


async def test_driver_protocol_start_reads_the_unit_from_boot_unit(
    env: Env, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    handle = await env.driver.start("svc-0", systemd_spec("nginx.service"), run_dir)
    assert handle.instance == "svc-0" and handle.data["unit"] == "nginx.service"
    assert run_dir.is_dir()
    await env.driver.destroy(handle)
    assert not run_dir.exists()
    assert (await env.driver.unit_state("nginx.service")).active_state == "inactive"

    process = parse(VMSpec, {"hypervisor": "process", "boot": {"command": ["nginx.service"]}})
    with pytest.raises(ValidationError) as info:
        await env.driver.start("svc-1", process, run_dir)
    assert info.value.field == "spec.boot.unit"
    assert "runs a unit, not boot.command" in info.value.reason


async def test_restart_gives_a_new_run_of_the_same_unit(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    await asyncio.sleep(0.01)  # a distinct ActiveEnterTimestamp
    restarted = await env.driver.restart(handle, timeout_s=5)
    assert restarted.data["unit"] == "nginx.service"
    assert restarted.data["main_pid"] != handle.data["main_pid"]
    assert restarted.data["active_enter_us"] != handle.data["active_enter_us"]
    assert (await env.driver.inspect(restarted)).state is TaskState.RUNNING
    assert job_calls(env.fake)[-1] == ("RestartUnit", ("nginx.service", "replace"))

    # RestartUnit also starts a stopped unit.
    await env.driver.stop(restarted, timeout_s=5)
    again = await env.driver.restart_unit("nginx.service")
    assert (await env.driver.inspect(again)).state is TaskState.RUNNING


async def test_a_failing_unit_is_reported_failed_with_its_exit_status(env: Env) -> None:
    with pytest.raises(BootFailed) as info:
        await env.driver.start_unit("broken.service")
    message = str(info.value)
    assert "broken.service" in message and "Result: exit-code" in message
    assert "status=1" in message
    state = await env.driver.unit_state("broken.service")
    assert (state.active_state, state.result, state.exec_main_status) == ("failed", "exit-code", 1)
    status = await env.driver.unit_status("broken.service")
    assert status.state is TaskState.EXITED and status.exit_code == 1 and status.signal is None


async def test_a_start_that_never_finishes_is_stopped_and_failed(env: Env) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BootFailed) as info:
        await env.driver.start_unit("stuck.service", timeout_s=0.3)
    assert "not started within 0.3s" in str(info.value)
    assert loop.time() - began < 3
    assert job_calls(env.fake)[-1] == ("StopUnit", ("stuck.service", "replace"))
    assert (await env.driver.unit_state("stuck.service")).active_state == "inactive"


async def test_stop_kills_a_unit_that_does_not_stop_in_time(env: Env) -> None:
    handle = await env.driver.start_unit("stubborn.service")
    status = await env.driver.stop(handle, timeout_s=0.3)
    assert status.state is TaskState.EXITED and status.signal == signal.SIGKILL, status
    assert job_calls(env.fake)[-2:] == [
        ("StopUnit", ("stubborn.service", "replace")),
        ("KillUnit", ("stubborn.service", "all", signal.SIGKILL)),
    ]


# ------------------------------------------------------------------ noticing changes


async def test_a_crash_is_noticed_by_wait_from_the_signal_not_by_polling(env: Env) -> None:
    # A fallback poll far beyond the test: only PropertiesChanged can wake wait() in time.
    driver = env.fresh(poll_s=30)
    handle = await driver.start_unit("flaky.service")
    waiter = asyncio.create_task(driver.wait(handle))
    await asyncio.sleep(0.2)
    calls_while_waiting = len(env.fake.calls)
    await asyncio.sleep(0.3)
    assert not waiter.done()
    assert len(env.fake.calls) == calls_while_waiting, "wait() polled systemd"
    crashed_at = await env.fake.crash("flaky.service", signal_number=signal.SIGKILL)
    async with asyncio.timeout(5):
        status = await waiter
    noticed_after = asyncio.get_running_loop().time() - crashed_at
    assert noticed_after < 0.5, f"wait() took {noticed_after:.3f}s after PropertiesChanged"
    assert status.state is TaskState.EXITED and status.signal == signal.SIGKILL
    assert "Result: signal" in status.message


async def test_wait_reports_the_exit_code_of_a_main_process_that_exited(env: Env) -> None:
    handle = await env.driver.start_unit("flaky.service")
    waiter = asyncio.create_task(env.driver.wait(handle))
    await asyncio.sleep(0.1)
    await env.fake.crash("flaky.service", exit_status=3)
    async with asyncio.timeout(5):
        status = await waiter
    assert status.state is TaskState.EXITED and status.exit_code == 3 and status.signal is None


async def test_wait_returns_at_once_for_a_unit_that_already_ended(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    await env.driver.stop(handle, timeout_s=5)
    async with asyncio.timeout(0.5):
        status = await env.driver.wait(handle)
    assert status.state is TaskState.EXITED and status.exit_code == 0


async def test_wait_fails_clearly_when_the_bus_goes_away(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    waiter = asyncio.create_task(env.driver.wait(handle))
    await asyncio.sleep(0.1)
    await env.bus.kill()
    async with asyncio.timeout(5):
        with pytest.raises(DriverError, match="D-Bus"):
            await waiter


# ------------------------------------------------------------------ recovery


async def test_recover_reattaches_by_unit_name_without_starting_anything(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service", instance="svc-0")
    saved = handle.to_dict()  # what the agent persisted
    restarted = env.fresh()
    again = TaskHandle.from_dict(saved)
    starts = len(job_calls(env.fake))
    status = await restarted.recover(again)
    assert status.state is TaskState.RUNNING and "restarted since" not in status.message
    assert len(job_calls(env.fake)) == starts  # no StartUnit, no RestartUnit
    stopped = await restarted.stop(again, timeout_s=5)
    assert stopped.state is TaskState.EXITED


async def test_recover_tells_a_unit_restarted_while_the_agent_was_away(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    await asyncio.sleep(0.01)
    await env.fresh().restart_unit("nginx.service")  # someone else restarted it
    status = await env.fresh().recover(TaskHandle.from_dict(handle.to_dict()))
    assert status.state is TaskState.RUNNING and "restarted since" in status.message


async def test_recover_reports_a_unit_that_ended_while_the_agent_was_away(env: Env) -> None:
    handle = await env.driver.start_unit("flaky.service")
    await env.fake.crash("flaky.service", signal_number=signal.SIGSEGV)
    status = await env.fresh().recover(TaskHandle.from_dict(handle.to_dict()))
    assert status.state is TaskState.EXITED and status.signal == signal.SIGSEGV


# ------------------------------------------------------------------ units that do not exist


async def test_a_unit_that_does_not_exist(env: Env) -> None:
    with pytest.raises(UnitNotFound) as info:
        await env.driver.start_unit("missing.service")
    assert isinstance(info.value, TaskGone)
    assert "missing.service" in str(info.value) and "not found" in str(info.value)
    assert (await env.driver.unit_state("missing.service")).load_state == "not-found"
    with pytest.raises(UnitNotFound):
        await env.driver.unit_status("missing.service")


async def test_a_unit_whose_file_was_removed(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    await env.fake.remove_unit_file("nginx.service")
    # Still running: systemd keeps a running unit whose file is gone.
    status = await env.driver.inspect(handle)
    assert status.state is TaskState.RUNNING and "unit file not-found" in status.message
    stopped = await env.driver.stop(handle, timeout_s=5)
    assert stopped.state is TaskState.EXITED and "unit file not-found" in stopped.message
    with pytest.raises(TaskGone):
        await env.driver.inspect(handle)
    with pytest.raises(TaskGone):
        await env.fresh().recover(handle)
    with pytest.raises(TaskGone):
        await env.driver.stop(handle, timeout_s=5)
    await env.driver.destroy(handle)  # idempotent for a unit that is gone


# ------------------------------------------------------------------ bad unit names

BAD_NAMES = [
    ("nginx.service;reboot", "contains ';'"),
    ("$(reboot).service", "contains '$'"),
    ("`reboot`.service", "contains '`'"),
    ("nginx|tee.service", "contains '|'"),
    ("nginx&.service", "contains '&'"),
    ("my unit.service", "must not contain spaces"),
    ("nginx.service\n", "must not contain spaces"),
    ("/etc/systemd/system/nginx.service", "not a path"),
    ("../nginx.service", "not a path"),
    ("nginx..service", "must not contain '..'"),
    ("", "must not be empty"),
    ("a" * 250 + ".service", "at most 255 characters"),
    ("nginx.exe", "unknown unit type"),
    ("nginx\\x2d.service", "contains '\\\\'"),
]


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
async def test_bad_unit_names_are_refused_before_any_dbus_call(
    env: Env, tmp_path: Path, name: str, reason: str
) -> None:
    driver = env.fresh()
    with pytest.raises(ValidationError) as info:
        await driver.start_unit(name)
    assert (info.value.field, reason in info.value.reason) == ("unit", True), info.value
    with pytest.raises(ValidationError) as info:
        await driver.start("svc-0", systemd_spec(name), tmp_path / "run")
    assert info.value.field == "spec.boot.unit"
    bad = TaskHandle("systemd", "svc-0", "", -1, 0, data={"unit": name})
    for use in (driver.inspect, driver.recover, driver.wait, driver.destroy):
        with pytest.raises(ValidationError) as info:
            await use(bad)
        assert info.value.field == "handle.data.unit"
    with pytest.raises(ValidationError):
        await driver.stop(bad, timeout_s=1)
    with pytest.raises(ValidationError):
        driver.logs(bad)
    for call in (driver.unit_state, driver.restart_unit):
        with pytest.raises(ValidationError):
            await call(name)
    # Not a single message reached the fake systemd (not even Subscribe: no connection).
    assert env.fake.calls == []


async def test_a_name_without_a_type_is_a_service() -> None:
    # The domain rule, shared with ServiceSpec.unit, adds ".service"; templates need an instance.
    assert check_unit_name("nginx") == "nginx.service"
    assert check_unit_name("getty@tty1.service") == "getty@tty1.service"
    with pytest.raises(ValidationError, match="template"):
        check_unit_name("getty@.service")


async def test_unit_object_paths_are_systemds(env: Env) -> None:
    assert fake_unit_path("nginx.service") == "/org/freedesktop/systemd1/unit/nginx_2eservice"
    path = await env.driver.bus.load_unit("getty@tty1.service")
    assert path == "/org/freedesktop/systemd1/unit/getty_40tty1_2eservice"


# ------------------------------------------------------------------ host and logs


async def test_fingerprint(env: Env) -> None:
    fp = await env.driver.fingerprint()
    assert fp.healthy and fp.hypervisors == [Hypervisor.SYSTEMD]
    assert "255-fake" in fp.detail
    nowhere = SystemdDriver("unix:path=/nonexistent/blixard-test/bus", call_timeout_s=2)
    fp = await nowhere.fingerprint()
    assert not fp.healthy and "systemd not reachable" in fp.detail
    await nowhere.aclose()


async def test_logs_are_the_units_status_and_follow_its_changes(env: Env) -> None:
    handle = await env.driver.start_unit("nginx.service")
    text = b"".join([chunk async for chunk in env.driver.logs(handle)]).decode()
    assert "journald is not reachable" in text
    assert "nginx.service: loaded, active (running)" in text and "Ready to serve" in text

    chunks: list[bytes] = []

    async def follow() -> None:
        async for chunk in env.driver.logs(handle, follow=True):
            chunks.append(chunk)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    assert not follower.done()
    await env.driver.stop(handle, timeout_s=5)
    async with asyncio.timeout(5):
        await follower
    followed = b"".join(chunks).decode()
    assert "active (running)" in followed and "inactive (dead)" in followed


# ------------------------------------------------------------------ state mapping (no I/O)


def _state(active: str, sub: str = "", **kw: Any) -> UnitState:
    return UnitState(
        unit="u.service",
        load_state=kw.pop("load_state", "loaded"),
        active_state=active,
        sub_state=sub,
        **kw,
    )


@pytest.mark.parametrize(
    ("state", "expected", "exit_code", "sig", "words"),
    [
        (_state("active", "running"), TaskState.RUNNING, None, None, "active (running)"),
        (_state("reloading", "reload"), TaskState.RUNNING, None, None, "reloading"),
        (_state("activating", "start"), TaskState.RUNNING, None, None, "starting"),
        (_state("activating", "auto-restart"), TaskState.RUNNING, None, None, "auto-restart"),
        (_state("deactivating", "stop-sigterm"), TaskState.RUNNING, None, None, "stopping"),
        (
            _state("inactive", "dead", exec_main_code=2, exec_main_status=15),
            TaskState.EXITED,
            0,
            None,
            "SIGTERM",
        ),
        (
            _state("failed", "failed", result="exit-code", exec_main_code=1, exec_main_status=2),
            TaskState.EXITED,
            2,
            None,
            "Result: exit-code",
        ),
        (
            _state("failed", "failed", result="core-dump", exec_main_code=3, exec_main_status=11),
            TaskState.EXITED,
            None,
            11,
            "SIGSEGV",
        ),
        (
            _state("failed", "failed", result="timeout", exec_main_code=1, exec_main_status=0),
            TaskState.EXITED,
            None,
            None,
            "Result: timeout",
        ),
        (_state("maintenance"), TaskState.EXITED, None, None, "maintenance"),
        (_state("something-new"), TaskState.RUNNING, None, None, "not assumed ended"),
        (
            _state("active", "running", load_state="not-found"),
            TaskState.RUNNING,
            None,
            None,
            "unit file not-found",
        ),
    ],
)
def test_state_mapping(
    state: UnitState, expected: TaskState, exit_code: int | None, sig: int | None, words: str
) -> None:
    status = task_status(state)
    assert (status.state, status.exit_code, status.signal) == (expected, exit_code, sig)
    assert words in status.message


def test_an_inactive_unit_without_a_file_is_gone() -> None:
    with pytest.raises(UnitNotFound, match="no such unit"):
        task_status(_state("inactive", "dead", load_state="not-found"))
