"""The Driver protocol: how the node agent runs a workload, whatever runs it.

Modelled on Nomad's task-driver plugins. A driver starts a task for one
instance in a run directory of its own and returns a :class:`TaskHandle`: the
small, JSON-serialisable record (pids, socket paths) from which the driver can
find the task again after the agent restarts (:meth:`Driver.recover`). Tasks
outlive the agent process on purpose: restarting Blixard must never restart
(or start a second copy of) a running VM.

Hypervisor specifics (QEMU flags, QMP, accelerators) stay inside each driver.
Optional abilities (pause/resume today; migration and snapshots later) are
small separate protocols a driver may also implement.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from blixard.domain.errors import BlixardError
from blixard.domain.node import KvmState
from blixard.domain.vm import Hypervisor, VMSpec


class DriverError(BlixardError):
    """A driver could not do what was asked; the message says what and why."""

    code = "driver_error"


class BootFailed(DriverError):
    """The workload did not become ready within its boot timeout (its process is gone)."""

    code = "boot_failed"


class TaskGone(DriverError):
    """The task a handle points to no longer exists (for recover, inspect, stop)."""

    code = "task_gone"


@dataclass(frozen=True, slots=True)
class Capabilities:
    pause: bool = False
    console: bool = False
    live_migration: bool = False
    snapshot: bool = False
    balloon: bool = False


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What this host offers through one driver."""

    hypervisors: list[Hypervisor]
    kvm: KvmState = KvmState.ABSENT
    kvm_detail: str = ""
    healthy: bool = True
    detail: str = ""


class TaskState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """Everything needed to find a task again; stored by the agent as JSON."""

    driver: str
    instance: str
    run_dir: str
    pid: int
    #: Kernel start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22),
    #: so a recycled pid is never mistaken for the task.
    pid_start_ticks: int
    data: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, str]:
        return {
            "driver": self.driver,
            "instance": self.instance,
            "run_dir": self.run_dir,
            "pid": str(self.pid),
            "pid_start_ticks": str(self.pid_start_ticks),
            **{f"data.{k}": v for k, v in self.data.items()},
        }

    @staticmethod
    def from_dict(raw: dict[str, str]) -> TaskHandle:
        return TaskHandle(
            driver=raw["driver"],
            instance=raw["instance"],
            run_dir=raw["run_dir"],
            pid=int(raw["pid"]),
            pid_start_ticks=int(raw["pid_start_ticks"]),
            data={k[5:]: v for k, v in raw.items() if k.startswith("data.")},
        )


@dataclass(frozen=True, slots=True)
class TaskStatus:
    state: TaskState
    #: The exit code once EXITED (None while running; None also if it was killed by a signal).
    exit_code: int | None = None
    #: The signal that ended it, if any.
    signal: int | None = None
    message: str = ""
    #: Ended by the node's fencing deadline, not by itself (see drivers/executor.py).
    fenced: bool = False


@runtime_checkable
class Driver(Protocol):
    """One way of running workloads (see the module docstring)."""

    name: str
    capabilities: Capabilities

    async def fingerprint(self) -> Fingerprint: ...

    async def start(self, instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        """Start the task and wait until it is ready (its ready line, or by default
        its first output) within ``spec.boot_timeout_s``. On timeout the task is
        killed and :class:`BootFailed` raised: a boot never hangs silently."""
        ...

    async def inspect(self, handle: TaskHandle) -> TaskStatus:
        """The task's state now; EXITED with its exit code once it ended."""
        ...

    async def wait(self, handle: TaskHandle) -> TaskStatus:
        """Return when the task exits (or immediately if it already has)."""
        ...

    async def stop(self, handle: TaskHandle, timeout_s: float) -> TaskStatus:
        """Ask the workload to shut down; kill it if it has not within ``timeout_s``."""
        ...

    async def destroy(self, handle: TaskHandle) -> None:
        """Kill the task if it runs and remove its run directory."""
        ...

    async def recover(self, handle: TaskHandle) -> TaskStatus:
        """Re-attach to a task after an agent restart; TaskGone if it is not there."""
        ...

    def logs(self, handle: TaskHandle, *, follow: bool = False) -> AsyncIterator[bytes]:
        """The task's console (VM serial port) or output, from the beginning;
        with ``follow``, keep streaming until the task exits."""
        ...


@runtime_checkable
class Pausable(Protocol):
    async def pause(self, handle: TaskHandle) -> None: ...

    async def resume(self, handle: TaskHandle) -> None: ...
