"""Run a workload so it outlives the agent and its exit status is never lost.

Each task runs under a tiny shim (Python's ``-I -S``, no Blixard imports, about
10 ms to start) in a session of its own: the shim forks the workload with its
output appended to a log file, forwards SIGTERM/SIGINT/SIGHUP to it, waits for
it and writes ``exit <code>`` or ``signal <n>`` to an exit file. So:

* the agent can restart while tasks keep running (no parent-death signal);
* a restarted agent re-attaches by pid, checked against the kernel's start
  time of that pid so a recycled pid is never mistaken for the task;
* the exit status of a task that ended while no agent was watching is still
  on disk; a task killed with SIGKILL (shim included) reads as killed.

Waiting uses a pidfd (Linux >= 5.3), which works for processes that are not
our children, so there is no polling for exits.

Fencing lives in the shim too, because a task outlives its agent: a node
whose daemon was killed must still not keep a VM running once the cluster
may start it elsewhere. If the task's run directory holds ``fence`` (the
agent links it to a node-wide file it rewrites after every lease keepalive),
its content ``<deadline> <stop|pause>`` is a CLOCK_MONOTONIC time (the same
clock as the agent's ``time.monotonic()``): once it passes, the shim kills
the whole task (recorded as ``fenced 9``) or SIGSTOPs the workload and
leaves ``fenced-paused`` for the agent, which resumes it only after reading
that the instance is still its own. The shim checks ten times a second and
wakes at once on its child's exit (SIGCHLD).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blixard.drivers.protocol import TaskState, TaskStatus

_SHIM = r"""
import os, signal, sys, time
exit_file, log_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
null = os.open(os.devnull, os.O_RDONLY)
pid = os.fork()
if pid == 0:
    os.dup2(null, 0); os.dup2(fd, 1); os.dup2(fd, 2)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, ("blixard: cannot run %r: %s\n" % (argv[0], exc.strerror)).encode())
        os._exit(127)
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
def record(text):
    tmp = exit_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, exit_file)
fence = os.path.join(os.path.dirname(exit_file), "fence")
paused = False
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
while True:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except InterruptedError:
        continue
    if done:
        break
    try:
        with open(fence) as f:
            deadline, action = f.read().split()
        late = time.monotonic() > float(deadline)
    except (OSError, ValueError):
        late = False
    if late and action == "pause" and not paused:
        os.kill(pid, signal.SIGSTOP)
        open(os.path.join(os.path.dirname(exit_file), "fenced-paused"), "w").close()
        paused = True
    elif late and action != "pause":
        record("fenced 9")
        os.killpg(0, signal.SIGKILL)
    elif not late:
        paused = False
    signal.sigtimedwait([signal.SIGCHLD], 0.1)
if os.WIFSIGNALED(status):
    text = "signal %d" % os.WTERMSIG(status)
else:
    text = "exit %d" % os.WEXITSTATUS(status)
record(text)
"""


_PR_SET_PDEATHSIG = 1

#: In a task's run directory: the fencing deadline the shim obeys (see the module docstring).
FENCE = "fence"
#: Left by a shim that paused its workload at the fencing deadline.
FENCED_PAUSED = "fenced-paused"


def write_fence(path: Path, deadline: float, action: str) -> None:
    """Atomically set a fencing deadline (CLOCK_MONOTONIC seconds) and its action."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{deadline:.3f} {action}")
    tmp.replace(path)


def link_fence(run_dir: Path, target: Path | None) -> None:
    """Make the task in ``run_dir`` obey ``target``'s deadline (None: no fencing)."""
    link = run_dir / FENCE
    link.unlink(missing_ok=True)
    if target is not None:
        link.symlink_to(target)


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn for helper processes that must not outlive the node (not for tasks).

    Linux ties the signal to the thread that forked: spawn from the event loop's thread.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Exit:
    """How a task ended: ``code`` for a normal exit, ``signal`` if a signal killed it."""

    code: int | None
    signal: int | None
    #: Killed by the shim because the node's fencing deadline passed (see FENCE).
    fenced: bool = False

    @property
    def failed(self) -> bool:
        return self.code != 0

    def status(self, subject: str = "", how: str = "") -> TaskStatus:
        """As a driver reports it: "[how; ][subject ]exited with N", or "killed by signal N"."""
        prefix = (f"{how}; " if how else "") + (f"{subject} " if subject else "")
        if self.fenced:
            return TaskStatus(
                TaskState.EXITED,
                signal=self.signal,
                message="fenced: killed because the node could not prove its lease",
                fenced=True,
            )
        if self.signal is not None:
            return TaskStatus(
                TaskState.EXITED,
                signal=self.signal,
                message=f"{prefix}killed by signal {self.signal}",
            )
        return TaskStatus(
            TaskState.EXITED, exit_code=self.code, message=f"{prefix}exited with {self.code}"
        )


def pid_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), None if gone/zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def alive(pid: int, start_ticks: int) -> bool:
    return pid_start_ticks(pid) == start_ticks


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int
    start_ticks: int


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    exit_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Spawned:
    """Start ``argv`` under the shim in a new session; returns the shim's pid.

    Signals sent to the shim reach the workload; SIGKILL to the process
    group (``kill_group``) ends both.
    """
    with contextlib.suppress(FileNotFoundError):
        exit_path.unlink()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _SHIM, str(exit_path), str(log_path), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cwd,
        env=dict(env) if env is not None else None,
    )
    # The agent does not wait() on the shim through Popen; reap it when it exits so
    # it never lingers as a zombie while this agent lives.
    _REAPER.add(proc)
    ticks = pid_start_ticks(proc.pid)
    if ticks is None:  # it died at once (e.g. a broken interpreter)
        proc.wait()
        raise OSError(f"the task shim exited at once with code {proc.returncode}")
    return Spawned(proc.pid, ticks)


class _Reaper:
    """Keeps our own shims' Popen objects so their exits are reaped."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs[proc.pid] = proc

    def reap(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)


_REAPER = _Reaper()


def read_exit(exit_path: Path) -> Exit:
    """The recorded exit; a task whose shim left no record was killed (SIGKILL)."""
    try:
        kind, _, value = exit_path.read_text().partition(" ")
    except FileNotFoundError:
        return Exit(code=None, signal=signal.SIGKILL)
    if kind == "signal":
        return Exit(code=None, signal=int(value))
    if kind == "fenced":
        return Exit(code=None, signal=int(value), fenced=True)
    return Exit(code=int(value), signal=None)


async def wait_exit(pid: int, start_ticks: int, exit_path: Path) -> Exit:
    """Wait until the task ends, then return its recorded exit."""
    if alive(pid, start_ticks):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            try:
                if alive(pid, start_ticks):  # the pid could have been recycled before the open
                    loop = asyncio.get_running_loop()
                    done: asyncio.Future[None] = loop.create_future()

                    def exited() -> None:
                        if not done.done():
                            done.set_result(None)

                    loop.add_reader(pidfd, exited)
                    try:
                        await done
                    finally:
                        loop.remove_reader(pidfd)
            finally:
                os.close(pidfd)
    _REAPER.reap(pid)
    return read_exit(exit_path)  # written by the shim before it exits


def signal_task(pid: int, start_ticks: int, sig: int) -> bool:
    """Send ``sig`` to the shim (which forwards it); False if the task is gone."""
    if not alive(pid, start_ticks):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return True


def signal_group(pid: int, start_ticks: int, sig: int) -> bool:
    """Send ``sig`` to the shim's whole process group (SIGCONT after a fencing pause)."""
    if not alive(pid, start_ticks):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    return True


def kill_group(pid: int, start_ticks: int) -> None:
    """SIGKILL the shim and everything in its session (the workload and its children).

    Also when the shim itself is gone: a workload whose shim was killed alone
    (the OOM killer, a stray SIGKILL) must not keep running beside a new copy.
    The session id cannot be reused while any member of the session lives.
    """
    if alive(pid, start_ticks):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        kill_session(pid)
    elif pid_start_ticks(pid) is None:
        # The shim is gone. Linux does not reuse a pid while a live process still
        # has it as session id, so members of this session can only be ours. (If a
        # live process holds the pid, it was reused: our session has no members left.)
        kill_session(pid)


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields after the command name) of every process in /proc/<pid>/stat.

    Field 0 is the state letter, 1 the parent pid, 2 the process group, 3 the session.
    """
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        yield int(proc.name), raw[raw.rindex(")") + 2 :].split()


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is ``sid``."""
    return [pid for pid, f in proc_stats() if f[0] != "Z" and int(f[3]) == sid]


def group_states(pgid: int) -> list[str]:
    """The state letters of the processes in process group ``pgid``."""
    return [f[0] for _, f in proc_stats() if int(f[2]) == pgid]


def kill_session(sid: int) -> int:
    """SIGKILL every live member of session ``sid``; returns how many were signalled."""
    killed = 0
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _read_from(path: Path, offset: int, size: int = -1) -> bytes:
    """Bytes of a local log file from ``offset`` (microseconds from the page cache)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


async def wait_for_output(
    log_path: Path,
    *,
    needle: str | None,
    timeout_s: float,
    pid: int,
    start_ticks: int,
    poll_s: float = 0.01,
) -> bool:
    """Wait until ``needle`` (or, if None, any output) appears in the log.

    False on timeout or if the task exits first. The log is read in chunks
    from where the last read stopped, so a long console costs nothing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    offset = 0
    tail = b""
    want = needle.encode() if needle else None
    while True:
        chunk = _read_from(log_path, offset)
        if chunk:
            offset += len(chunk)
            if want is None:
                return True
            window = tail + chunk
            if want in window:
                return True
            tail = window[-len(want) :]
        if not alive(pid, start_ticks) or loop.time() >= deadline:
            return False
        await asyncio.sleep(poll_s)


async def follow_log(
    log_path: Path, *, follow: bool, pid: int, start_ticks: int, poll_s: float = 0.1
) -> AsyncIterator[bytes]:
    """The log from its start; with ``follow``, keep going until the task exits."""
    offset = 0
    finishing = not follow
    while True:
        # Decide before reading whether this is the last pass, so output written
        # just before the task exited is still read.
        if not finishing and not alive(pid, start_ticks):
            finishing = True
        chunk = _read_from(log_path, offset, 1 << 16)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        if finishing:
            return
        await asyncio.sleep(poll_s)


def kill_strays(run_dir: Path) -> int:
    """Kill every task whose shim was started for ``run_dir``; returns how many.

    An agent that died between spawning a task and recording its handle
    leaves a task nobody knows. Every shim's command line names its exit file
    inside the run directory, so a restarted agent finds such strays there and
    ends them before starting the instance again: never two copies.
    """
    needle = str(run_dir).encode() + b"/"
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # A shim: <python> -I -S -c <program> <exit file> <log file> <argv...>
        if argv[1:4] == [b"-I", b"-S", b"-c"] and len(argv) > 5 and argv[5].startswith(needle):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(proc.name), signal.SIGKILL)
            kill_session(int(proc.name))
            killed += 1
    return killed
