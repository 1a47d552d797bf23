"""The QEMU driver with real guests under TCG: no mocks.

One image is built per session (tests.support.images) and guests boot one
after another (each ~1.5-3 s under TCG on these hosts).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from blixard.domain.errors import NotFound
from blixard.domain.node import KvmState
from blixard.domain.parse import parse
from blixard.domain.vm import Accel, Hypervisor, VMSpec
from blixard.drivers import executor
from blixard.drivers.protocol import (
    BootFailed,
    Driver,
    DriverError,
    Pausable,
    TaskGone,
    TaskHandle,
    TaskState,
)
from blixard.drivers.qemu import AccelProbe, QemuDriver
from blixard.drivers.qemu.qmp import qmp_call
from blixard.images import READY_LINE, Image
from tests.support.images import session_image

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return session_image(tmp_path_factory)


@pytest.fixture
def images_dir(guest_image: Image) -> Path:
    return guest_image.path.parent


def make_driver(images_dir: Path, cache: Path) -> QemuDriver:
    return QemuDriver(images_dir, accel_probe=AccelProbe(cache, images_dir))


@pytest.fixture
async def driver(images_dir: Path, tmp_path: Path) -> AsyncIterator[QemuDriver]:
    d = make_driver(images_dir, tmp_path / "kvm-probe.json")
    started: list[TaskHandle] = []
    original = d.start

    async def tracking_start(instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        handle = await original(instance, spec, run_dir)
        started.append(handle)
        return handle

    d.start = tracking_start  # type: ignore[method-assign]
    yield d
    for h in started:  # nothing outlives a test, whatever it asserted
        executor.kill_group(h.pid, h.pid_start_ticks)
        for pid in qemu_pids(Path(h.run_dir)):
            os.kill(pid, signal.SIGKILL)


def image_spec(**overrides: Any) -> VMSpec:
    data: dict[str, Any] = {
        "boot": {"image": "default"},
        "memory_mib": 256,
        "boot_timeout_s": 30,
        "accel": "tcg",
    }
    data.update(overrides)
    return parse(VMSpec, data)


def qemu_pids(run_dir: Path) -> list[int]:
    """Live QEMU processes started for ``run_dir`` (its pidfile is on their command line)."""
    pids = []
    needle = str(run_dir).encode() + b"/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z" and argv[0].endswith(QEMU.encode()) and any(needle in a for a in argv):
            pids.append(int(proc.name))
    return pids


def qemu_child(handle: TaskHandle) -> int:
    """QEMU's pid: the only child of the shim (the handle's pid)."""
    children = Path(f"/proc/{handle.pid}/task/{handle.pid}/children").read_text().split()
    assert len(children) == 1, children
    pid = int(children[0])
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(QEMU.encode())
    return pid


async def read_logs(driver: Driver, handle: TaskHandle) -> bytes:
    return b"".join([chunk async for chunk in driver.logs(handle)])


async def test_driver_shape(driver: QemuDriver) -> None:
    assert isinstance(driver, Driver) and isinstance(driver, Pausable)
    assert driver.name == "qemu"
    assert driver.capabilities.pause and driver.capabilities.console
    fp = await driver.fingerprint()
    assert fp.hypervisors == [Hypervisor.QEMU] and fp.healthy
    # Before any probe verdict, KVM is never claimed to work.
    assert fp.kvm is (KvmState.ABSENT if not Path("/dev/kvm").exists() else KvmState.UNUSABLE)
    assert fp.kvm_detail
    if Path("/dev/kvm").exists():
        assert "not probed" in fp.kvm_detail


async def test_lifecycle_ready_pause_logs_and_acpi_stop(driver: QemuDriver, tmp_path: Path) -> None:
    run = tmp_path / "run"
    loop = asyncio.get_running_loop()
    began = loop.time()
    handle = await driver.start("life-0", image_spec(), run)
    assert loop.time() - began < 30
    assert float(handle.data["boot_s"]) > 0
    assert handle.data["accel"] == "tcg"
    assert json.loads(handle.data["argv"])[0] == QEMU
    assert READY_LINE.encode() in (run / "console.log").read_bytes()
    assert len(qemu_pids(run)) == 1

    status = await driver.inspect(handle)
    assert status.state is TaskState.RUNNING, status
    raw = await qmp_call(Path(handle.data["qmp_socket"]), "query-status")
    assert raw["status"] == "running"

    await driver.pause(handle)
    assert (await driver.inspect(handle)).state is TaskState.PAUSED
    await driver.resume(handle)
    assert (await driver.inspect(handle)).state is TaskState.RUNNING

    assert READY_LINE.encode() in await read_logs(driver, handle)

    began = loop.time()
    stopped = await driver.stop(handle, timeout_s=10)
    took = loop.time() - began
    assert stopped.state is TaskState.EXITED and stopped.exit_code == 0, stopped
    assert "ACPI" in stopped.message
    assert took < 3, f"ACPI power-off took {took:.2f}s"
    assert b"power button" in await read_logs(driver, handle)
    after = await driver.inspect(handle)
    assert after.state is TaskState.EXITED and after.exit_code == 0
    assert qemu_pids(run) == []
    # A second start in the same run dir waits for a fresh ready line, not the old one.
    again = await driver.start("life-0", image_spec(), run)
    assert (run / "console.log.1").is_file()
    await driver.destroy(again)
    assert not run.exists() and qemu_pids(run) == []


async def test_killed_qemu_is_seen_exited_by_wait_inspect_and_recover(
    driver: QemuDriver, images_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    handle = await driver.start("crash-0", image_spec(), run)
    waiter = asyncio.create_task(driver.wait(handle))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    os.kill(qemu_child(handle), signal.SIGKILL)
    status = await asyncio.wait_for(waiter, 10)
    assert status.state is TaskState.EXITED and status.signal == signal.SIGKILL, status
    assert (await driver.inspect(handle)).state is TaskState.EXITED
    # An agent restarting after this learns the exit from the run dir.
    fresh = make_driver(images_dir, tmp_path / "other-cache.json")
    recovered = await fresh.recover(TaskHandle.from_dict(handle.to_dict()))
    assert recovered.state is TaskState.EXITED and recovered.signal == signal.SIGKILL
    await fresh.destroy(handle)
    with pytest.raises(TaskGone, match="gone"):
        await fresh.recover(handle)


async def test_recover_from_a_fresh_driver_never_starts_a_second_qemu(
    driver: QemuDriver, guest_image: Image, images_dir: Path, tmp_path: Path
) -> None:
    # Boot from explicit kernel paths this time (the other boot source).
    spec = image_spec(
        boot={
            "kernel": str(guest_image.kernel),
            "initrd": str(guest_image.initrd),
            "cmdline": guest_image.cmdline,
        },
        ready_line=READY_LINE,
    )
    # A run dir too deep for a unix socket path: QMP must still work.
    run = tmp_path / ("deep-" + "r" * 120)
    handle = await driver.start("rec-0", spec, run)
    assert handle.data["image"] == ""
    assert len(handle.data["qmp_socket"]) > 108
    [pid] = qemu_pids(run)
    saved = handle.to_dict()  # what the agent persisted before it died

    fresh = make_driver(images_dir, tmp_path / "fresh-cache.json")
    again = TaskHandle.from_dict(saved)
    assert (await fresh.recover(again)).state is TaskState.RUNNING
    assert qemu_pids(run) == [pid]  # the same QEMU, no second copy

    # The recovered handle controls it: pause, then stop (a paused guest is quit, not resumed).
    await fresh.pause(again)
    assert (await fresh.recover(TaskHandle.from_dict(saved))).state is TaskState.PAUSED
    stopped = await fresh.stop(again, timeout_s=10)
    assert stopped.state is TaskState.EXITED and stopped.exit_code == 0, stopped
    assert "quit" in stopped.message
    assert qemu_pids(run) == []


async def test_orphaned_qemu_of_a_killed_shim_is_not_left_running(
    driver: QemuDriver, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    handle = await driver.start("orphan-0", image_spec(), run)
    qemu = qemu_child(handle)
    os.kill(handle.pid, signal.SIGKILL)  # only the shim: QEMU lives on, unsupervised
    await asyncio.sleep(0.1)
    assert qemu_pids(run) == [qemu]
    status = await driver.inspect(handle)
    assert status.state is TaskState.EXITED and "orphaned QEMU was killed" in status.message
    for _ in range(50):
        if not qemu_pids(run):
            break
        await asyncio.sleep(0.02)
    assert qemu_pids(run) == []


async def test_boot_timeout_kills_and_reports_the_console(
    driver: QemuDriver, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    spec = image_spec(ready_line="this line never appears", boot_timeout_s=3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BootFailed) as info:
        await driver.start("slow-0", spec, run)
    assert loop.time() - began < 3 + 5
    message = str(info.value)
    assert "this line never appears" in message and "3s" in message
    # The console's last lines are in the error (whatever the guest reached in 3 s).
    assert "Last console lines: " in message
    console = [ln.strip() for ln in (run / "console.log").read_text().splitlines() if ln.strip()]
    assert (console[-1] if console else "(no console output)") in message
    assert qemu_pids(run) == []


async def test_missing_files_unknown_image_and_flake_are_refused(
    driver: QemuDriver, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    with pytest.raises(DriverError, match=r"spec\.boot\.kernel: /nope/vmlinux does not exist"):
        await driver.start("k-0", image_spec(boot={"kernel": "/nope/vmlinux"}), run)
    with pytest.raises(DriverError, match=r"spec\.boot\.initrd"):
        await driver.start(
            "k-0", image_spec(boot={"kernel": "/etc/hostname", "initrd": "/nope.cpio"}), run
        )
    with pytest.raises(NotFound) as info:
        await driver.start("i-0", image_spec(boot={"image": "nope"}), run)
    assert "spec.boot.image" in str(info.value) and "known images: default" in str(info.value)
    with pytest.raises(DriverError, match="microvm_nix driver"):
        await driver.start("f-0", image_spec(boot={"flake": "/etc/vms#web"}), run)
    assert not (run / "console.log").exists()


async def test_qemu_that_exits_at_once_fails_the_boot_with_its_error(
    driver: QemuDriver, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BootFailed) as info:  # not a kernel: QEMU refuses it and exits
        await driver.start("bad-0", image_spec(boot={"kernel": "/etc/hostname"}), run)
    assert loop.time() - began < 5
    message = str(info.value)
    assert "QEMU exited with 1 before its console output appeared" in message
    # QEMU's own complaint, from its log (never mistaken for guest output).
    assert "(no console output); QEMU said: qemu: invalid kernel header" in message
    assert qemu_pids(run) == []


def _kvm_expected() -> KvmState:
    """What the probe must conclude on this host, from facts the probe does not use."""
    if not Path("/dev/kvm").exists():
        return KvmState.ABSENT
    flags = Path("/proc/cpuinfo").read_text()
    hardware = " vmx" in flags or " svm" in flags
    pvm = Path("/sys/module/kvm_pvm").exists()
    return KvmState.AVAILABLE if hardware and not pvm else KvmState.UNUSABLE


async def test_accel_probe_auto_and_explicit_kvm(
    driver: QemuDriver, images_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "probe" / "kvm-probe.json"
    probe = AccelProbe(cache, images_dir, timeout_s=4)
    assert await probe.verdict() is None or not Path("/dev/kvm").exists()
    assert (await probe.choose(Accel.AUTO))[0] == "tcg"  # before any verdict: TCG

    verdict = await probe.probe()
    expected = _kvm_expected()
    assert verdict.state is expected, verdict
    assert verdict.detail
    state, detail = await probe.kvm_state()
    assert state is expected and detail == verdict.detail
    if expected is not KvmState.ABSENT:
        # Cached: a new probe object (an agent restart) knows it without booting.
        stored = json.loads(cache.read_text())["verdicts"]
        assert [v["state"] for v in stored.values()] == [expected.value]
        again = AccelProbe(cache, images_dir, timeout_s=4)
        assert (await again.verdict()) is not None

    chosen, reason = await probe.choose(Accel.AUTO)
    assert chosen == ("kvm" if expected is KvmState.AVAILABLE else "tcg")
    assert reason
    if expected is not KvmState.AVAILABLE:
        kvm_driver = QemuDriver(images_dir, accel_probe=probe)
        with pytest.raises(DriverError) as info:
            await kvm_driver.start("kvm-0", image_spec(accel="kvm"), tmp_path / "run")
        assert str(info.value).startswith("spec.accel: kvm was asked for")
        assert verdict.detail in str(info.value)
        assert qemu_pids(tmp_path / "run") == []
