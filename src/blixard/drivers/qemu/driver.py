"""The QEMU driver: microVMs (``-M microvm``) supervised by the shared task executor.

QEMU runs under the executor's shim, in a session of its own, with its own
messages appended to ``<run_dir>/qemu.log``, the guest's serial console in
``<run_dir>/console.log`` and its exit status written to ``<run_dir>/exit``:
VMs outlive agent restarts and an exit is never lost.
Control goes through QMP on ``<run_dir>/qmp.sock`` (status, pause/resume,
ACPI power-off, quit).

Run directory layout::

    console.log       guest serial console (the previous boot's is kept as console.log.1)
    qemu.log          QEMU's own stdout/stderr (errors, warnings)
    exit              "exit <code>" or "signal <n>", written when QEMU ends
    qmp.sock          QMP monitor
    qemu.pid          QEMU's own pid (QEMU writes it; the shim is the handle's pid)

Handle ``data`` keys: ``qmp_socket``, ``console_log``, ``qemu_log``, ``exit_file``,
``pidfile``, ``accel`` (tcg|kvm), ``accel_reason``, ``ready_line``, ``image``
(empty for a bare kernel), ``argv`` (JSON list) and ``boot_s`` (seconds to the
ready line).

Never two copies: a QEMU whose shim was killed (so nothing would record its
exit) is found by its process group and command line and killed before the
task is reported as exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from blixard.drivers.qemu.accel import AccelProbe, qemu_available
from blixard.drivers.qemu.boot import resolve_boot
from blixard.drivers.qemu.cmdline import (
    QemuArgs,
    build_argv,
    host_tsc_khz,
    kernel_append,
    qmp_bind_path,
)
from blixard.drivers.qemu.qmp import Qmp, QmpError

CONSOLE = "console.log"
QEMU_LOG = "qemu.log"
EXIT = "exit"
QMP_SOCKET = "qmp.sock"
PIDFILE = "qemu.pid"

#: How long ``stop`` gives QMP ``quit`` before killing the process group.
QUIT_GRACE_S = 3.0
#: Timeout of one QMP exchange.
QMP_TIMEOUT_S = 5.0
_TAIL_LINES = 12
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _exited(result: executor.Exit, how: str = "") -> TaskStatus:
    return result.status("QEMU", how)


def console_tail(log: Path, lines: int = _TAIL_LINES) -> str:
    """The last console lines, one string, control characters removed."""
    return log_tail(log, lines) or "(no console output)"


def log_tail(log: Path, lines: int) -> str:
    """The last ``lines`` non-empty lines of a log joined with " | " ("" if none)."""
    try:
        size = log.stat().st_size
        with open(log, "rb") as f:
            f.seek(max(0, size - 8192))
            raw = f.read()
    except FileNotFoundError:
        return ""
    text = _ANSI.sub("", raw.decode(errors="replace")).replace("\r", "")
    kept = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return " | ".join(ln for ln in kept[-lines:] if ln.isprintable())


def _group_members(pgid: int, run_dir: Path) -> list[int]:
    """Live processes of process group ``pgid`` whose command line names ``run_dir``.

    The handle's pid is the shim's, and the shim leads its own session and
    group; QEMU's command line names its pidfile inside the run directory. A
    kernel never reuses a pid while it still names a live group, so this finds
    exactly the task's QEMU even after the shim itself is gone.
    """
    needle = str(run_dir).encode() + b"/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] == "Z" or int(fields[2]) != pgid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            continue
        if any(a.startswith(needle) for a in argv):
            found.append(int(proc.name))
    return found


class QemuDriver:
    """Runs ``hypervisor: qemu`` VMs (see the module docstring).

    ``images_dir`` holds the guest images (``<data_dir>/images``);
    ``accel_probe`` decides ``accel: auto`` and vets ``accel: kvm``.
    """

    name = "qemu"
    capabilities = Capabilities(pause=True, console=True)

    def __init__(
        self,
        images_dir: Path,
        *,
        accel_probe: AccelProbe,
        qemu_binary: str = "qemu-system-x86_64",
    ) -> None:
        self.images_dir = images_dir
        self.accel_probe = accel_probe
        self.qemu_binary = qemu_binary
        self._tsc_khz = host_tsc_khz()
        self._qmp_locks: dict[str, asyncio.Lock] = {}

    # --- helpers --------------------------------------------------------------------

    @staticmethod
    def _path(handle: TaskHandle, key: str, default: str) -> Path:
        value = handle.data.get(key)
        return Path(value) if value else Path(handle.run_dir) / default

    def _alive(self, handle: TaskHandle) -> bool:
        return executor.alive(handle.pid, handle.pid_start_ticks)

    async def _qmp(
        self, handle: TaskHandle, command: str, arguments: dict[str, Any] | None = None
    ) -> Any:
        """One QMP command, serialised per VM (a monitor serves one client at a time)."""
        sock = self._path(handle, "qmp_socket", QMP_SOCKET)
        lock = self._qmp_locks.setdefault(str(sock), asyncio.Lock())
        async with lock, await Qmp.connect(sock, QMP_TIMEOUT_S) as qmp:
            return await qmp.execute(command, arguments, QMP_TIMEOUT_S)

    def _kill_strays(self, handle: TaskHandle) -> bool:
        """Kill a QEMU left without its shim; True if one was found."""
        members = _group_members(handle.pid, Path(handle.run_dir))
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(members)

    def _ended(self, handle: TaskHandle, how: str = "") -> TaskStatus:
        """Status of a task whose shim is gone (killing any QEMU it left behind)."""
        if self._kill_strays(handle):
            how = (
                how + "; " if how else ""
            ) + "its supervisor had died; the orphaned QEMU was killed"
        status = _exited(executor.read_exit(self._path(handle, "exit_file", EXIT)), how)
        if status.exit_code != 0:  # a failure: say what QEMU said, if anything
            said = log_tail(self._path(handle, "qemu_log", QEMU_LOG), 2)
            if said:
                status = replace(status, message=f"{status.message}; QEMU said: {said}")
        return status

    async def _wait_exit(self, handle: TaskHandle) -> executor.Exit:
        return await executor.wait_exit(
            handle.pid, handle.pid_start_ticks, self._path(handle, "exit_file", EXIT)
        )

    # --- Driver ---------------------------------------------------------------------

    async def fingerprint(self) -> Fingerprint:
        kvm, kvm_detail = await self.accel_probe.kvm_state()
        if not qemu_available(self.qemu_binary):
            return Fingerprint(
                hypervisors=[],
                kvm=kvm,
                kvm_detail=kvm_detail,
                healthy=False,
                detail=f"{self.qemu_binary} not found; install qemu-system-x86",
            )
        return Fingerprint(hypervisors=[Hypervisor.QEMU], kvm=kvm, kvm_detail=kvm_detail)

    async def start(self, instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        if spec.hypervisor is not Hypervisor.QEMU:
            raise DriverError(
                f"spec.hypervisor: the qemu driver runs hypervisor qemu, not {spec.hypervisor}"
            )
        if not qemu_available(self.qemu_binary):
            raise DriverError(f"{self.qemu_binary} is not installed on this node")
        plan = resolve_boot(spec, self.images_dir)
        accel, accel_reason = await self.accel_probe.choose(spec.accel)

        run_dir = run_dir.absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        console, qemu_log, exit_path = run_dir / CONSOLE, run_dir / QEMU_LOG, run_dir / EXIT
        pidfile, qmp_sock = run_dir / PIDFILE, run_dir / QMP_SOCKET
        for log in (console, qemu_log):  # fresh logs: an old ready line cannot count
            if log.exists():
                log.replace(log.with_name(log.name + ".1"))
        for stale in (qmp_sock, pidfile):
            stale.unlink(missing_ok=True)

        argv = build_argv(
            QemuArgs(
                kernel=plan.kernel,
                initrd=plan.initrd,
                disk=plan.disk,
                disk_format=plan.disk_format,
                append=kernel_append(accel, plan.guest_args, self._tsc_khz),
                accel=accel,
                vcpus=spec.vcpus,
                memory_mib=spec.memory_mib,
                qmp_socket=qmp_bind_path(run_dir, QMP_SOCKET),
                pidfile=pidfile,
                console_log=console,
                qemu_binary=self.qemu_binary,
                name=instance,
            )
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        spawned = executor.spawn(argv, log_path=qemu_log, exit_path=exit_path, cwd=run_dir)
        handle = TaskHandle(
            driver=self.name,
            instance=instance,
            run_dir=str(run_dir),
            pid=spawned.pid,
            pid_start_ticks=spawned.start_ticks,
            data={
                "qmp_socket": str(qmp_sock),
                "console_log": str(console),
                "qemu_log": str(qemu_log),
                "exit_file": str(exit_path),
                "pidfile": str(pidfile),
                "accel": accel,
                "accel_reason": accel_reason,
                "ready_line": plan.ready_line or "",
                "image": plan.image,
                "argv": json.dumps(argv),
            },
        )
        try:
            ready = await executor.wait_for_output(
                console,
                needle=plan.ready_line,
                timeout_s=spec.boot_timeout_s,
                pid=spawned.pid,
                start_ticks=spawned.start_ticks,
            )
            if not ready and plan.ready_line is not None and console.exists():
                # It may have printed the line and exited between two polls.
                ready = plan.ready_line.encode() in console.read_bytes()
        except BaseException:  # cancelled: nobody would ever own this VM
            executor.kill_group(spawned.pid, spawned.start_ticks)
            self._kill_strays(handle)
            raise
        if ready:
            handle.data["boot_s"] = f"{loop.time() - began:.3f}"
            return handle

        exited_first = not self._alive(handle)
        executor.kill_group(spawned.pid, spawned.start_ticks)
        result = await self._wait_exit(handle)
        self._kill_strays(handle)
        said = log_tail(qemu_log, 3)
        said = f"; QEMU said: {said}" if said else ""
        waited_for = f"ready line {plan.ready_line!r}" if plan.ready_line else "console output"
        if exited_first:
            what = _exited(result).message
            raise BootFailed(
                f"{instance}: {what} before its {waited_for} appeared (accel {accel}); "
                f"last console lines: {console_tail(console)}{said}"
            )
        raise BootFailed(
            f"{instance}: no {waited_for} on the console within {spec.boot_timeout_s:g}s "
            f"(accel {accel}); QEMU was killed. Last console lines: {console_tail(console)}{said}"
        )

    async def inspect(self, handle: TaskHandle) -> TaskStatus:
        if not self._alive(handle):
            return self._ended(handle)
        try:
            return await self._query_status(handle)
        except QmpError as exc:
            if not self._alive(handle):  # it ended while we asked
                return self._ended(handle)
            return TaskStatus(TaskState.RUNNING, message=f"QMP unreachable: {exc}")

    async def wait(self, handle: TaskHandle) -> TaskStatus:
        await self._wait_exit(handle)
        return self._ended(handle)

    async def stop(self, handle: TaskHandle, timeout_s: float) -> TaskStatus:
        """ACPI power button, then QMP ``quit``, then SIGKILL.

        A paused guest cannot see the power button, and resuming it just to
        press the button would let a fenced VM run again: it goes straight to
        ``quit``.
        """
        if not self._alive(handle):
            return self._ended(handle)
        paused = (await self.inspect(handle)).state is TaskState.PAUSED
        if not paused and timeout_s > 0:
            with contextlib.suppress(QmpError):
                await self._qmp(handle, "system_powerdown")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        result = await self._wait_exit(handle)
                    return _exited(result, "powered off (ACPI power button)")
        with contextlib.suppress(QmpError):
            await self._qmp(handle, "quit")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(QUIT_GRACE_S):
                    result = await self._wait_exit(handle)
                return _exited(result, "stopped with QMP quit")
        executor.kill_group(handle.pid, handle.pid_start_ticks)
        await self._wait_exit(handle)
        return self._ended(handle, "killed after the guest did not power off")

    async def destroy(self, handle: TaskHandle) -> None:
        executor.kill_group(handle.pid, handle.pid_start_ticks)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._wait_exit(handle)
        self._kill_strays(handle)
        self._qmp_locks.pop(str(self._path(handle, "qmp_socket", QMP_SOCKET)), None)
        shutil.rmtree(handle.run_dir, ignore_errors=True)

    async def recover(self, handle: TaskHandle) -> TaskStatus:
        """Re-attach after an agent restart.

        * shim alive and QMP answers: RUNNING or PAUSED;
        * shim alive but QMP silent (after retries for a few seconds): the VM
          cannot be controlled, so it is killed and reported EXITED (leaving it
          would risk a second copy once the agent starts the instance again);
        * shim gone: EXITED with the exit recorded while the agent was away (a
          QEMU orphaned by a killed shim is killed first);
        * run directory gone: TaskGone.
        """
        if handle.driver != self.name:
            raise TaskGone(f"{handle.instance}: handle of driver {handle.driver!r}, not qemu")
        if not Path(handle.run_dir).is_dir():
            raise TaskGone(f"{handle.instance}: run directory {handle.run_dir} is gone")
        if not self._alive(handle):
            return self._ended(handle, "ended while the agent was away")
        last: QmpError | None = None
        for _ in range(3):
            try:
                return await self._query_status(handle)
            except QmpError as exc:
                last = exc
                if not self._alive(handle):
                    return self._ended(handle, "ended while the agent was away")
                await asyncio.sleep(0.5)
        executor.kill_group(handle.pid, handle.pid_start_ticks)
        await self._wait_exit(handle)
        return self._ended(handle, f"killed: running but not controllable ({last})")

    async def _query_status(self, handle: TaskHandle) -> TaskStatus:
        """RUNNING or PAUSED from QMP ``query-status``; QmpError if QMP does not answer."""
        status = await self._qmp(handle, "query-status")
        run_state = str(status.get("status", "")) if isinstance(status, dict) else ""
        if run_state in ("paused", "suspended"):
            return TaskStatus(TaskState.PAUSED, message=run_state)
        return TaskStatus(TaskState.RUNNING, message=run_state)

    async def logs(self, handle: TaskHandle, *, follow: bool = False) -> AsyncIterator[bytes]:
        async for chunk in executor.follow_log(
            self._path(handle, "console_log", CONSOLE),
            follow=follow,
            pid=handle.pid,
            start_ticks=handle.pid_start_ticks,
        ):
            yield chunk

    # --- Pausable -------------------------------------------------------------------

    async def _control(self, handle: TaskHandle, command: str) -> None:
        if not self._alive(handle):
            raise TaskGone(f"{handle.instance}: the VM is not running")
        try:
            await self._qmp(handle, command)
        except QmpError as exc:
            raise DriverError(f"{handle.instance}: QMP {command} failed: {exc}") from None

    async def pause(self, handle: TaskHandle) -> None:
        """Freeze the vCPUs (QMP ``stop``); memory and devices stay as they are."""
        await self._control(handle, "stop")

    async def resume(self, handle: TaskHandle) -> None:
        await self._control(handle, "cont")
