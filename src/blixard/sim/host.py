"""A simulated machine: its tasks with their shims, its disk, its clock, its network state.

Why the shim is modelled apart from the agent: on a real node each task runs
under its own shim process (drivers/executor.py), which outlives the agent
and enforces the fencing deadline by itself. That is what keeps a node whose
daemon was killed (``kill -9``) from running a VM the cluster has started
elsewhere, so the shim must go on here when the daemon model is dead or
paused. The rules, with the lines of drivers/executor.py's ``_SHIM`` they
mirror (line numbers of the file as of this writing):

* the shim checks ``<run dir>/fence`` at start and then every 0.1 s
  (``signal.sigtimedwait([SIGCHLD], 0.1)``, line 278);
* ``late = time.monotonic() > float(deadline)`` (line 266); no fence link or
  no file: never late (lines 267-268);
* late and ``pause`` and not yet paused: SIGSTOP the workload, leave
  ``fenced-paused``, remember it (lines 269-272);
* late and ``stop``: record ``fenced 9`` and SIGKILL the group (273-275);
* not late: forget the pause (276-277) -- it does *not* SIGCONT; the agent
  resumes the workload (agent/reconciler.py ``_ensure_running``).

The shim's checks are evaluated lazily: between two fence writes the answer
only changes when the clock passes the deadline, so one event at the first
0.1 s tick past the deadline gives the same outcome as the ten checks a
second the real shim makes.

The process driver (drivers/process/driver.py) as the agent sees it:
``stop`` sends SIGTERM *and SIGCONT* (a paused workload runs again to act on
SIGTERM) and kills the group after the timeout; ``destroy`` kills the group
and removes the run directory; ``recover`` fails when the run directory is
gone and otherwise inspects the task; a task whose shim left no exit file
(SIGKILL, power loss) reads as killed by signal 9 (executor.read_exit).

Run directories, their ``agent.json`` records, fence links and the node-wide
fence files are on the host's disk: they survive a daemon crash and a power
loss; processes do not survive a power loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from blixard.domain.node import Resources
from blixard.sim.clock import Timer
from blixard.sim.world import World

SIGKILL = 9
SIGTERM = 15


class Run(Enum):
    RUNNING = "running"
    #: SIGSTOPped (by the shim's fencing pause): holds memory, runs nothing.
    STOPPED = "stopped"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class Exit:
    """As executor.Exit: ``code`` for an exit, ``signal`` for a kill, ``fenced`` by the shim."""

    code: int | None
    signal: int | None
    fenced: bool = False

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exited with code {self.code}"


@dataclass
class RunDir:
    """``<run root>/<instance>``: the task record and the fence link (see the agent)."""

    #: agent.json; None until the agent first saves it.
    record: dict[str, Any] | None = None
    #: What ``fence`` links to: "stop", "pause" or None (no link).
    fence: str | None = None
    #: ``fenced-paused``, left by a shim that paused its workload.
    fenced_paused: bool = False


@dataclass(eq=False)
class SimTask:
    """A workload under its shim (one process group)."""

    pid: int
    host: Host
    run_dir: str
    instance: str
    uid: str
    epoch: int
    vcpus: int
    memory_mib: int
    #: The fence link at spawn time: the file the shim reads ("stop", "pause" or None).
    fence: str | None
    #: The shim's own clock at spawn: its checks fall on this plus multiples of 0.1 s.
    spawned_local: float
    state: Run = Run.RUNNING
    #: The shim's ``paused`` variable.
    shim_paused: bool = False
    exit: Exit | None = None
    #: The shim wrote its exit file (false after SIGKILL of the shim or a power loss).
    recorded: bool = False
    listeners: list[Callable[[], None]] = field(default_factory=list)
    check: Timer | None = None
    shutdown: Timer | None = None

    @property
    def alive(self) -> bool:
        return self.state is not Run.EXITED

    @property
    def running(self) -> bool:
        """Executing guest code: the state invariant (1) is about."""
        return self.state is Run.RUNNING


class Host:
    """One machine (see the module docstring)."""

    def __init__(self, world: World, name: str, rate: float) -> None:
        self.world = world
        self.name = name
        #: Its monotonic clock runs ``rate`` times as fast as virtual time.
        self.rate = rate
        self.capacity = Resources(
            vcpus=world.load.node_vcpus, memory_mib=world.load.node_memory_mib
        )
        self.powered = True
        self.partitioned = False
        self.slow = False
        #: Live tasks and exited ones a handle may still name, by pid.
        self.tasks: dict[int, SimTask] = {}
        self.run_dirs: dict[str, RunDir] = {}
        #: The node-wide fence files (fence-stop, fence-pause): one deadline, local clock.
        self.fence_deadline: float | None = None
        #: Resources held by live tasks (running or SIGSTOPped).
        self.used_vcpus = 0
        self.used_memory_mib = 0
        #: Live pids by instance name (what invariant 1 counts).
        self.live: dict[str, set[int]] = {}
        #: The daemon process now on this host (None while it is down), how many
        #: have been started, and whether its service manager keeps it running.
        self.daemon: Any = None
        self.incarnation = 0
        self.wanted_up = True

    def local_now(self) -> float:
        return self.world.clock.now * self.rate

    def log(self, what: str) -> None:
        self.world.log(self.name, what)

    # --- processes ----------------------------------------------------------------------

    def spawn(
        self, run_dir: str, instance: str, uid: str, epoch: int, vcpus: int, memory_mib: int
    ) -> SimTask:
        """executor.spawn: the shim starts, forks the workload and checks the fence at once."""
        link = self.run_dirs.setdefault(run_dir, RunDir()).fence
        task = SimTask(
            pid=self.world.next_pid(),
            host=self,
            run_dir=run_dir,
            instance=instance,
            uid=uid,
            epoch=epoch,
            vcpus=vcpus,
            memory_mib=memory_mib,
            fence=link,
            spawned_local=self.local_now(),
        )
        self.tasks[task.pid] = task
        self.live.setdefault(instance, set()).add(task.pid)
        self.used_vcpus += vcpus
        self.used_memory_mib += memory_mib
        self.world.metrics.starts += 1
        self.log(f"spawn {instance} epoch {epoch} pid {task.pid} fence {link}")
        self.world.on_task_change(instance, self.name)
        self._shim_check(task)
        return task

    def _end(self, task: SimTask, exit: Exit, recorded: bool) -> None:
        if not task.alive:
            return
        task.state = Run.EXITED
        task.exit = exit
        task.recorded = recorded
        for timer in (task.check, task.shutdown):
            if timer is not None:
                timer.cancel()
        self.used_vcpus -= task.vcpus
        self.used_memory_mib -= task.memory_mib
        pids = self.live.get(task.instance)
        if pids is not None:
            pids.discard(task.pid)
            if not pids:
                del self.live[task.instance]
        self.log(f"exit {task.instance} pid {task.pid}: {exit.describe()}")
        self.world.on_task_change(task.instance, self.name)
        listeners, task.listeners = task.listeners, []
        for listener in listeners:
            listener()

    def kill_group(self, task: SimTask) -> None:
        """SIGKILL the shim and its workload: no exit file is written (executor.read_exit)."""
        self._end(task, Exit(None, SIGKILL), recorded=False)

    def crash(self, task: SimTask, code: int) -> None:
        """The workload exits by itself; the shim records its code."""
        self._end(task, Exit(code, None), recorded=True)

    def sigterm(self, task: SimTask) -> None:
        """SIGTERM and SIGCONT to the group (process driver ``stop``, lines 111-113)."""
        if not task.alive:
            return
        self.sigcont(task)
        if task.shutdown is None:
            took = self.world.uniform(self.world.task_rng, self.world.timing.shutdown_s)
            task.shutdown = self.world.clock.after(
                took, lambda: self._end(task, Exit(None, SIGTERM), recorded=True)
            )

    def sigcont(self, task: SimTask) -> None:
        if task.state is Run.STOPPED:
            task.state = Run.RUNNING
            self.log(f"SIGCONT {task.instance} pid {task.pid}")
            self.world.on_task_change(task.instance, self.name)

    def resume_fenced(self, task: SimTask) -> None:
        """The agent's resume after fencing: SIGCONT the group, then unlink the marker."""
        self.sigcont(task)
        self.run_dirs.setdefault(task.run_dir, RunDir()).fenced_paused = False
        if task.alive and task.fence is not None:
            self._schedule_check(task, self.local_now())  # the shim's next look

    def kill_strays(self, run_dir: str) -> int:
        """executor.kill_strays: every live shim started for ``run_dir``."""
        strays = [t for t in self.tasks.values() if t.alive and t.run_dir == run_dir]
        for task in strays:
            self.kill_group(task)
        return len(strays)

    def rmtree(self, run_dir: str) -> None:
        self.run_dirs.pop(run_dir, None)
        for pid in [p for p, t in self.tasks.items() if t.run_dir == run_dir and not t.alive]:
            del self.tasks[pid]

    def inspect(self, pid: int) -> tuple[Run, Exit | None]:
        task = self.tasks.get(pid)
        if task is None or not task.alive:
            if task is not None and task.recorded and task.exit is not None:
                return Run.EXITED, task.exit
            return Run.EXITED, Exit(None, SIGKILL)
        return task.state, None

    def power_off(self) -> None:
        """Every process dies at once; nothing is recorded. The disk stays."""
        self.powered = False
        for task in list(self.tasks.values()):
            self._end(task, Exit(None, SIGKILL), recorded=False)

    # --- fencing ------------------------------------------------------------------------

    def write_fence(self, deadline: float) -> None:
        """executor.write_fence of both node-wide files (agent ``_publish_fence_deadline``)."""
        earlier = self.fence_deadline is None or deadline < self.fence_deadline
        self.fence_deadline = deadline
        for task in self.tasks.values():
            if task.alive and task.fence is not None and (task.shim_paused or earlier):
                self._schedule_check(task, self.local_now())

    def _next_tick(self, task: SimTask, after_local: float) -> float:
        """The first of the shim's check times (local clock) strictly after ``after_local``."""
        poll = self.world.timing.shim_poll_s
        k = math.floor((after_local - task.spawned_local) / poll) + 1
        return task.spawned_local + max(k, 0) * poll

    def _schedule_check(self, task: SimTask, after_local: float) -> None:
        if task.check is not None:
            task.check.cancel()
        when = self._next_tick(task, after_local) / self.rate
        task.check = self.world.clock.at(when, lambda: self._shim_check(task))

    def _shim_check(self, task: SimTask) -> None:
        """One pass of the shim's loop (see the module docstring for the lines)."""
        task.check = None
        if not task.alive or task.fence is None or self.world.model.shim_ignores_fence:
            return
        deadline = self.fence_deadline
        now = self.local_now()
        late = deadline is not None and now > deadline
        paused = task.shim_paused
        if not self.world.model.shim_remembers_pause:
            paused = self.run_dirs.setdefault(task.run_dir, RunDir()).fenced_paused
        if late and task.fence == "pause" and not paused:
            task.state = Run.STOPPED
            self.run_dirs.setdefault(task.run_dir, RunDir()).fenced_paused = True
            task.shim_paused = True
            self.world.metrics.fenced += 1
            self.log(f"shim pauses {task.instance} pid {task.pid} (fence deadline passed)")
            self.world.on_task_change(task.instance, self.name)
        elif late and task.fence != "pause":
            self.world.metrics.fenced += 1
            self.log(f"shim kills {task.instance} pid {task.pid} (fence deadline passed)")
            self._end(task, Exit(None, SIGKILL, fenced=True), recorded=True)
            return
        elif not late:
            task.shim_paused = False
        if not late and deadline is not None:
            self._schedule_check(task, deadline)  # nothing changes before it passes
