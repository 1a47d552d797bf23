"""Run a systemd unit as a task: start, watch and stop units through systemd's D-Bus API.

The unit must already be installed on the host (by NixOS, a package, ...);
the driver only starts, stops, restarts and observes it, talking to systemd's
manager on the system bus (``$DBUS_SYSTEM_BUS_ADDRESS`` or
``unix:path=/run/dbus/system_bus_socket``) with the calls listed in
:mod:`blixard.drivers.systemd.dbus`. How unit states map to task states is in
:mod:`blixard.drivers.systemd.units`.

Conventions and limits:

* **Which unit**: :meth:`SystemdDriver.start_unit` takes the unit name; the
  Driver protocol's :meth:`~SystemdDriver.start` reads it from
  ``spec.boot.unit`` (the boot source of the ``systemd`` hypervisor, which a
  Service's VMs carry), checked again here since specs are read back from disk.
* **Jobs**: start, stop and restart queue a job with mode ``replace`` and
  wait for its ``JobRemoved`` signal (as ``systemctl`` does), then read the
  unit's state. A start whose job fails, or whose unit is not running after
  it, raises :class:`BootFailed` with systemd's Result and the exit status;
  a start that takes longer than its timeout is stopped and fails the same way.
* **Noticing changes**: :meth:`wait` holds a match on the unit's
  ``PropertiesChanged`` signal and re-reads the state at each one; systemd
  sends them only to subscribed clients, so the connection calls
  ``Subscribe()``. As a safety net it also re-reads every ``poll_s`` seconds
  (1 s by default) in case a signal is lost; the signal is what makes it prompt.
* **Handles**: ``pid`` is -1 and ``pid_start_ticks`` 0 on purpose. The unit's
  processes belong to systemd, not to a Blixard shim: the executor's helpers
  (``kill_group``, ``signal_group``) find no ``/proc/-1`` and do nothing, so
  only this driver (StopUnit/KillUnit) ever ends a unit. The unit name and
  its object path are in ``data``, with ``MainPID`` and
  ``ActiveEnterTimestamp`` at start (to tell a unit restarted since).
* **recover** re-attaches by unit name: nothing is started, the unit's state
  is read; a unit systemd no longer knows raises :class:`TaskGone`.
* **logs**: journald is not reachable from the driver, so ``logs`` yields the
  unit's status (systemctl-status-like lines, marked as such), and with
  ``follow`` a new line at every change until the unit is no longer running.
* **destroy** stops the unit and removes the run directory; it never
  disables or deletes the unit itself, which Blixard does not own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from blixard.domain.errors import ValidationError
from blixard.domain.vm import Hypervisor, VMSpec
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
from blixard.drivers.systemd.dbus import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_SYSTEM_BUS,
    MANAGER_IFACE,
    MANAGER_PATH,
    NO_SUCH_UNIT,
    PROPERTIES_IFACE,
    UNIT_IFACE,
    BusError,
    BusUnreachable,
    Signal,
    SystemdBus,
)
from blixard.drivers.systemd.units import (
    UnitNotFound,
    UnitState,
    check_unit_name,
    task_status,
    type_interface,
)

#: How long a stop waits for the unit to end after KillUnit(SIGKILL).
KILL_GRACE_S = 5.0
DEFAULT_START_TIMEOUT_S = 60.0
JOURNAL_NOTE = (
    "(journald is not reachable from Blixard's systemd driver: "
    "these lines are the unit's status, not its log)"
)


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


class SystemdDriver:
    """Driver for the ``systemd`` hypervisor (see the module docstring)."""

    name = "systemd"
    capabilities = Capabilities()

    def __init__(
        self,
        bus_address: str | None = None,
        *,
        poll_s: float = 1.0,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.bus = SystemdBus(bus_address or system_bus_address(), call_timeout_s=call_timeout_s)
        #: Fallback re-read interval of wait() and logs(follow=True), should a signal be lost.
        self.poll_s = poll_s
        #: How long start_unit/restart_unit wait for their job when not told.
        self.start_timeout_s = start_timeout_s

    async def aclose(self) -> None:
        """Close the D-Bus connection (opened again on the next use)."""
        await self.bus.close()

    # ----------------------------------------------------------------- host

    async def fingerprint(self) -> Fingerprint:
        try:
            version = await self.bus.get(MANAGER_PATH, MANAGER_IFACE, "Version")
        except DriverError as exc:
            return Fingerprint(
                hypervisors=[Hypervisor.SYSTEMD],
                healthy=False,
                detail=f"systemd not reachable: {exc}",
            )
        return Fingerprint(
            hypervisors=[Hypervisor.SYSTEMD],
            detail=f"systemd {version} on {self.bus.address}",
        )

    # ----------------------------------------------------------------- unit state

    async def unit_state(self, unit: str) -> UnitState:
        """The unit's properties now (LoadState ``not-found`` included: no error for it)."""
        name = check_unit_name(unit)
        path = await self.bus.load_unit(name)
        return await self._read(name, path)

    async def _read(self, name: str, path: str) -> UnitState:
        unit_props = await self.bus.get_all(path, UNIT_IFACE)
        type_props = await self.bus.get_all(path, type_interface(name))
        return UnitState.from_properties(name, unit_props, type_props)

    async def unit_status(self, unit: str) -> TaskStatus:
        """The unit's state as a task status; :class:`UnitNotFound` if systemd has no such unit."""
        return task_status(await self.unit_state(unit))

    # ----------------------------------------------------------------- start

    async def start(self, instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        """Start the unit named by ``spec.boot.unit``."""
        if spec.boot.unit is None:
            raise ValidationError(
                "spec.boot.unit", f"the systemd driver runs a unit, not boot.{spec.boot.kind}"
            )
        unit = check_unit_name(spec.boot.unit, "spec.boot.unit")
        return await self.start_unit(
            unit, instance=instance, run_dir=run_dir, timeout_s=spec.boot_timeout_s
        )

    async def start_unit(
        self,
        unit: str,
        *,
        instance: str | None = None,
        run_dir: Path | None = None,
        timeout_s: float | None = None,
    ) -> TaskHandle:
        """StartUnit(unit, "replace"); returns once it runs, BootFailed if it did not."""
        name = check_unit_name(unit)
        return await self._launch("StartUnit", name, instance, run_dir, timeout_s)

    async def restart_unit(
        self,
        unit: str,
        *,
        instance: str | None = None,
        run_dir: Path | None = None,
        timeout_s: float | None = None,
    ) -> TaskHandle:
        """RestartUnit(unit, "replace") (starts it if it was not running); a new handle."""
        name = check_unit_name(unit)
        return await self._launch("RestartUnit", name, instance, run_dir, timeout_s)

    async def restart(self, handle: TaskHandle, timeout_s: float | None = None) -> TaskHandle:
        """Restart the handle's unit; the returned handle replaces it."""
        name = _handle_unit(handle)
        run_dir = Path(handle.run_dir) if handle.run_dir else None
        return await self._launch("RestartUnit", name, handle.instance, run_dir, timeout_s)

    async def _launch(
        self,
        method: str,
        name: str,
        instance: str | None,
        run_dir: Path | None,
        timeout_s: float | None,
    ) -> TaskHandle:
        if timeout_s is None:
            timeout_s = self.start_timeout_s
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = await self._job(method, name, timeout_s)
        except TimeoutError:
            with contextlib.suppress(DriverError):
                await self._stop(name, KILL_GRACE_S)
            raise BootFailed(
                f"{name}: not started within {timeout_s:g}s (systemd's job still running); "
                "the unit was stopped"
            ) from None
        state = await self.unit_state(name)
        status = task_status(state)
        if result != "done" or status.state is not TaskState.RUNNING:
            verb = "restart" if method == "RestartUnit" else "start"
            raise BootFailed(f"{name}: {verb} job {result}; {status.message}")
        return TaskHandle(
            driver=self.name,
            instance=instance or name,
            run_dir=str(run_dir) if run_dir is not None else "",
            pid=-1,
            pid_start_ticks=0,
            data={
                "unit": name,
                "main_pid": str(state.main_pid),
                "active_enter_us": str(state.active_enter_us),
            },
        )

    async def _job(self, method: str, name: str, timeout_s: float) -> str:
        """Queue a job for ``name`` and return its JobRemoved result ("done", "failed", ...).

        TimeoutError if the job has not ended within ``timeout_s``.
        """
        async with self.bus.watch(
            MANAGER_PATH, MANAGER_IFACE, "JobRemoved", args={2: name}
        ) as removed:
            job = await self._queue_job(method, name)
            return await _job_removed(removed, job, name, timeout_s)

    async def _queue_job(self, method: str, name: str) -> str:
        try:
            return await self.bus.unit_job(method, name)
        except BusError as exc:
            if exc.name == NO_SUCH_UNIT:
                raise UnitNotFound(
                    f"{name}: systemd has no such unit on this node ({exc.text})"
                ) from None
            raise

    # ----------------------------------------------------------------- observe

    async def inspect(self, handle: TaskHandle) -> TaskStatus:
        return await self.unit_status(_handle_unit(handle))

    async def recover(self, handle: TaskHandle) -> TaskStatus:
        """Re-attach by unit name: reads the state, never starts anything."""
        name = _handle_unit(handle)
        state = await self.unit_state(name)
        status = task_status(state)
        started = handle.data.get("active_enter_us", "")
        if (
            status.state is TaskState.RUNNING
            and started
            and state.active_enter_us
            and str(state.active_enter_us) != started
        ):
            return TaskStatus(
                status.state,
                message=f"{status.message}; restarted since the handle was made",
            )
        return status

    async def wait(self, handle: TaskHandle) -> TaskStatus:
        """Return once the unit is no longer running (see "Noticing changes" above)."""
        name = _handle_unit(handle)
        async with contextlib.aclosing(self._changes(name)) as changes:
            async for state in changes:
                status = task_status(state)
                if status.state is TaskState.EXITED:
                    return status
        raise AssertionError("unreachable: _changes never ends by itself")  # pragma: no cover

    async def _changes(self, name: str) -> AsyncGenerator[UnitState, None]:
        """The unit's state now, then again after every change (or ``poll_s``), forever.

        The PropertiesChanged match is in place before each read, so no change
        between a read and the next wait is missed. A lost connection opens a
        new one (and a new match) before the next read.
        """
        while True:
            path = await self.bus.load_unit(name)
            async with self.bus.watch(path, PROPERTIES_IFACE, "PropertiesChanged") as changed:
                lost = False
                while not lost:
                    yield await self._read(name, path)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            lost = await changed.get() is None
                    while not lost and not changed.empty():  # several changes: one read
                        lost = changed.get_nowait() is None

    # ----------------------------------------------------------------- stop

    async def stop(self, handle: TaskHandle, timeout_s: float) -> TaskStatus:
        """StopUnit; if the unit has not stopped within ``timeout_s``, KillUnit(SIGKILL)."""
        return await self._stop(_handle_unit(handle), timeout_s)

    async def stop_unit(self, unit: str, timeout_s: float) -> TaskStatus:
        return await self._stop(check_unit_name(unit), timeout_s)

    async def _stop(self, name: str, timeout_s: float) -> TaskStatus:
        """StopUnit, KillUnit(SIGKILL) after ``timeout_s``; UnitNotFound if systemd has no unit."""
        async with self.bus.watch(
            MANAGER_PATH, MANAGER_IFACE, "JobRemoved", args={2: name}
        ) as removed:
            job = await self._queue_job("StopUnit", name)
            try:
                await _job_removed(removed, job, name, timeout_s)
            except TimeoutError:
                await self.bus.kill_unit(name, signal.SIGKILL)
                try:
                    await _job_removed(removed, job, name, KILL_GRACE_S)
                except TimeoutError:
                    raise DriverError(
                        f"{name}: still not stopped {KILL_GRACE_S:g}s after SIGKILL"
                    ) from None
        # A unit whose file was removed while it ran is now gone: report how it ended.
        return task_status(await self.unit_state(name), missing_is_gone=False)

    async def destroy(self, handle: TaskHandle) -> None:
        """Stop the unit (if systemd still knows it) and remove the run directory."""
        with contextlib.suppress(TaskGone):
            await self.stop(handle, timeout_s=KILL_GRACE_S)
        if handle.run_dir:
            shutil.rmtree(handle.run_dir, ignore_errors=True)

    # ----------------------------------------------------------------- logs

    def logs(self, handle: TaskHandle, *, follow: bool = False) -> AsyncIterator[bytes]:
        """The unit's status lines, not its journal (see the module docstring)."""
        return self._status_lines(_handle_unit(handle), follow=follow)

    async def _status_lines(self, name: str, *, follow: bool) -> AsyncGenerator[bytes, None]:
        yield f"{JOURNAL_NOTE}\n".encode()
        last = ""
        async with contextlib.aclosing(self._changes(name)) as changes:
            async for state in changes:
                ended = task_status(state).state is TaskState.EXITED  # UnitNotFound if gone
                line = _status_line(state)
                if line != last:
                    yield f"{line}\n".encode()
                    last = line
                if not follow or ended:
                    return


def _handle_unit(handle: TaskHandle) -> str:
    """The unit of a handle, checked again: handles are read back from disk."""
    return check_unit_name(handle.data.get("unit"), "handle.data.unit")


def _status_line(state: UnitState) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    parts = [f"{stamp} {state.unit}: {state.load_state}, {state.summary}"]
    if state.main_pid:
        parts.append(f"main pid {state.main_pid}")
    if state.status_text:
        parts.append(f"status {state.status_text!r}")
    return "; ".join(parts)


async def _job_removed(
    removed: asyncio.Queue[Signal | None], job: str, name: str, timeout_s: float
) -> str:
    """The result of JobRemoved(u id, o job, s unit, s result) for ``job``; TimeoutError."""
    async with asyncio.timeout(timeout_s):
        while True:
            signal_ = await removed.get()
            if signal_ is None:
                raise BusUnreachable(f"{name}: lost the connection to systemd while its job ran")
            body = signal_.body
            if len(body) == 4 and body[1] == job:
                return str(body[3])
