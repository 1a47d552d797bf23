"""The process driver's own behaviour beyond the driver contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from blixard.drivers.process import ProcessDriver
from blixard.drivers.protocol import BootFailed, DriverError, TaskState
from tests.support.drivers import process_spec


async def test_exit_code_is_recorded(tmp_path: Path) -> None:
    d = ProcessDriver()
    spec = process_spec(boot={"command": ["/bin/sh", "-c", "echo hi; exit 3"]}, ready_line=None)
    handle = await d.start("x-0", spec, tmp_path / "run")
    status = await d.wait(handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, 3, None)
    assert b"".join([c async for c in d.logs(handle)]) == b"hi\n"


async def test_unknown_executable_is_refused_before_anything_runs(tmp_path: Path) -> None:
    d = ProcessDriver()
    spec = process_spec(boot={"command": ["/no/such/program"]})
    with pytest.raises(DriverError) as info:
        await d.start("x-0", spec, tmp_path / "run")
    assert "spec.boot.command" in str(info.value) and "/no/such/program" in str(info.value)
    assert not (tmp_path / "run").exists()


async def test_exit_before_ready_is_a_boot_failure(tmp_path: Path) -> None:
    d = ProcessDriver()
    spec = process_spec(boot={"command": ["/bin/sh", "-c", "echo oops; exit 1"]})
    with pytest.raises(BootFailed) as info:
        await d.start("x-0", spec, tmp_path / "run")
    assert "exited before printing" in str(info.value) and "oops" in str(info.value)
