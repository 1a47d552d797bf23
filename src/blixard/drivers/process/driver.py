"""Run ``spec.boot.command`` as a task with the same lifecycle as a VM.

Stop sends SIGTERM (what a process's "ACPI power button" is), then SIGKILL to
the whole process group after the timeout. Output goes to ``output.log`` in
the run directory, which is what ``logs`` streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from blixard.domain.errors import ValidationError
from blixard.domain.vm import Hypervisor, VMSpec
from blixard.drivers import executor
from blixard.drivers.protocol import (
    BootFailed,
    Capabilities,
    DriverError,
    Fingerprint,
    TaskGone,
    TaskHandle,
    TaskState,
    TaskStatus,
)

LOG = "output.log"
EXIT = "exit"


def _paths(handle: TaskHandle) -> tuple[Path, Path]:
    run = Path(handle.run_dir)
    return run / LOG, run / EXIT


def _exited(result: executor.Exit) -> TaskStatus:
    return result.status()


class ProcessDriver:
    """Driver for the ``process`` hypervisor (see the module docstring)."""

    name = "process"
    capabilities = Capabilities(pause=True, console=True)

    async def fingerprint(self) -> Fingerprint:
        return Fingerprint(hypervisors=[Hypervisor.PROCESS])

    async def start(self, instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        argv = spec.boot.command
        if not argv:
            raise ValidationError("spec.boot.command", "the process driver needs a command")
        program = argv[0]
        if shutil.which(program) is None:
            raise DriverError(f"spec.boot.command: {program!r} is not an executable on this node")
        return await self.spawn_task(instance, argv, spec, run_dir)

    async def spawn_task(
        self,
        instance: str,
        argv: list[str],
        spec: VMSpec,
        run_dir: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> TaskHandle:
        """Run ``argv`` under the shim (in ``cwd``, default the run directory, with ``env``,
        default the agent's) and wait for ``spec.ready_line`` if it has one."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path, exit_path = run_dir / LOG, run_dir / EXIT
        log_path.unlink(missing_ok=True)
        spawned = executor.spawn(
            argv, log_path=log_path, exit_path=exit_path, cwd=cwd or run_dir, env=env
        )
        handle = TaskHandle(
            driver=self.name,
            instance=instance,
            run_dir=str(run_dir),
            pid=spawned.pid,
            pid_start_ticks=spawned.start_ticks,
            data={"log": str(log_path)},
        )
        if spec.ready_line is not None:
            ready = await executor.wait_for_output(
                log_path,
                needle=spec.ready_line,
                timeout_s=spec.boot_timeout_s,
                pid=spawned.pid,
                start_ticks=spawned.start_ticks,
            )
            if not ready:
                still_running = executor.alive(spawned.pid, spawned.start_ticks)
                executor.kill_group(spawned.pid, spawned.start_ticks)
                await executor.wait_exit(spawned.pid, spawned.start_ticks, exit_path)
                tail = (
                    log_path.read_bytes()[-400:].decode(errors="replace")
                    if log_path.exists()
                    else ""
                )
                why = (
                    f"no {spec.ready_line!r} in its output within {spec.boot_timeout_s:g}s"
                    if still_running
                    else f"it exited before printing {spec.ready_line!r}"
                )
                raise BootFailed(f"{why}; last output: {tail.strip()!r}")
        return handle

    async def inspect(self, handle: TaskHandle) -> TaskStatus:
        if executor.alive(handle.pid, handle.pid_start_ticks):
            paused = _group_stopped(handle.pid)
            return TaskStatus(TaskState.PAUSED if paused else TaskState.RUNNING)
        _, exit_path = _paths(handle)
        return _exited(executor.read_exit(exit_path))

    async def wait(self, handle: TaskHandle) -> TaskStatus:
        _, exit_path = _paths(handle)
        return _exited(await executor.wait_exit(handle.pid, handle.pid_start_ticks, exit_path))

    async def stop(self, handle: TaskHandle, timeout_s: float) -> TaskStatus:
        _, exit_path = _paths(handle)
        if executor.alive(handle.pid, handle.pid_start_ticks):
            _signal_group(handle, signal.SIGTERM)
            _signal_group(handle, signal.SIGCONT)  # a paused task must run to act on SIGTERM
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.wait(handle)
            except TimeoutError:
                executor.kill_group(handle.pid, handle.pid_start_ticks)
        return _exited(await executor.wait_exit(handle.pid, handle.pid_start_ticks, exit_path))

    async def destroy(self, handle: TaskHandle) -> None:
        executor.kill_group(handle.pid, handle.pid_start_ticks)
        _, exit_path = _paths(handle)
        await executor.wait_exit(handle.pid, handle.pid_start_ticks, exit_path)
        shutil.rmtree(handle.run_dir, ignore_errors=True)

    async def recover(self, handle: TaskHandle) -> TaskStatus:
        """Re-attach after an agent restart; a task that ended meanwhile reports its exit."""
        if not Path(handle.run_dir).is_dir():
            raise TaskGone(f"{handle.instance}: run directory {handle.run_dir} is gone")
        return await self.inspect(handle)

    def logs(self, handle: TaskHandle, *, follow: bool = False) -> AsyncIterator[bytes]:
        log_path, _ = _paths(handle)
        return executor.follow_log(
            log_path, follow=follow, pid=handle.pid, start_ticks=handle.pid_start_ticks
        )

    async def pause(self, handle: TaskHandle) -> None:
        """SIGSTOP the task's group; returns once the workload is really stopped."""
        await self._signal_and_settle(handle, signal.SIGSTOP, stopped=True)

    async def resume(self, handle: TaskHandle) -> None:
        await self._signal_and_settle(handle, signal.SIGCONT, stopped=False)

    async def _signal_and_settle(self, handle: TaskHandle, sig: int, *, stopped: bool) -> None:
        if not _signal_group(handle, sig):
            raise TaskGone(f"{handle.instance}: the process is not running")
        # Signals are delivered asynchronously: wait (briefly) until the state shows it.
        for _ in range(200):
            if _group_stopped(handle.pid) == stopped:
                return
            await asyncio.sleep(0.005)
        raise DriverError(
            f"{handle.instance}: the process did not {'stop' if stopped else 'resume'}"
        )


def _signal_group(handle: TaskHandle, sig: int) -> bool:
    """Signal the task's process group: the shim and everything the workload started.

    The shim forwards SIGTERM to its child and keeps waiting to record the exit;
    SIGSTOP/SIGCONT pause and resume the whole group.
    """
    if not executor.alive(handle.pid, handle.pid_start_ticks):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(handle.pid, sig)
    return True


def _group_stopped(pgid: int) -> bool:
    """True when no process of the task's group can run.

    Every member must be stopped ("T"/"t") or, like a shell parent waiting
    in vfork for a stopped child, blocked ("D") behind one; at least one must
    be stopped.
    """
    states = executor.group_states(pgid)
    return any(st in ("T", "t") for st in states) and all(st in ("T", "t", "D") for st in states)
