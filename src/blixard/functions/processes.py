"""Pre-spawned handler processes: the machinery under the ``command`` and ``nix`` runtimes.

A process serves exactly one invocation, so nothing leaks from one
invocation to the next (globals, files held open, children left running).
Starting one costs the exec and the handler's own start-up (about 35 ms for
``nix-instantiate``, more for an interpreter), so a worker keeps a few
processes already exec'd and blocked reading their stdin: a warm invocation
writes the event, closes stdin and reads the answer; a new process is
spawned in the background to take the place of the one used.

Each process runs in a session (and process group) of its own. When its
main process exits, or on a timeout, the whole group gets SIGKILL *before*
the main process is reaped: its pid (the group id) cannot be recycled while
it is an unreaped zombie, so the signal can only reach the invocation's own
processes. Exits are awaited through a pidfd on the event loop (no child
watcher thread per process, no polling), pipes are non-blocking file
descriptors read with bounded buffers, and nothing here runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blixard.functions.runtime import (
    MAX_OUTPUT_BYTES,
    HandlerFailed,
    HandlerTimeout,
    Response,
    WorkerGone,
    parse_response,
)

#: How much of a handler's stderr is kept for the error message (its last bytes).
STDERR_TAIL_BYTES = 2048
_CHUNK = 65536
#: After the main process exited and its group was killed, how long its pipes may
#: stay open (held by a process that left the group with setsid) before we stop reading.
_PIPE_GRACE_S = 0.5
#: How long a SIGKILLed group may take to be gone before we stop waiting for it.
_KILL_WAIT_S = 5.0
#: Output at most this long is checked for a complete JSON document before the
#: process exits (``early_json``); longer output always waits for the exit.
_EARLY_JSON_MAX = 65536
#: Most processes a worker keeps waiting (besides its spares), whatever its concurrency:
#: an idle ``nix-instantiate`` holds about 3 MB of its own memory (20 MB resident with
#: the shared libraries); invocations past it spawn their own process.
MAX_READY = 16
#: util-linux's setpriv: sets the parent-death signal without a preexec_fn, which
#: would cost a plain fork and about 5 ms of the event loop's time per spawn.
_SETPRIV = shutil.which("setpriv")


@dataclass(frozen=True)
class Launch:
    """How to start one handler process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    #: The executable that must exist for a spawn to make sense (checked per spawn).
    program: str


@dataclass(frozen=True)
class Outcome:
    """What one execution produced."""

    stdout: bytes
    stderr_tail: bytes
    #: The exit status as subprocess reports it (negative: killed by that signal);
    #: None when the answer was taken before the process exited (``early_json``).
    returncode: int | None


def describe_exit(returncode: int) -> str:
    """'exited with status 3' or 'was killed by signal 9 (SIGKILL)'."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-returncode} ({name})"


def tail_text(raw: bytes, limit: int = STDERR_TAIL_BYTES) -> str:
    """The last ``limit`` bytes as text, starting at a line boundary when there is one."""
    tail = raw[-limit:]
    if len(raw) > limit and b"\n" in tail:
        tail = tail[tail.index(b"\n") + 1 :]
    return tail.decode(errors="replace").strip()


def complete_json(out: bytes | bytearray) -> bool:
    """True when ``out`` is a whole JSON object, array or string (nothing can follow it).

    Only self-delimiting documents count: ``12`` could still become ``123``.
    """
    text = bytes(out).strip()
    if not text or len(text) > _EARLY_JSON_MAX:
        return False
    pairs = {ord("{"): ord("}"), ord("["): ord("]"), ord('"'): ord('"')}
    if pairs.get(text[0]) != text[-1] or len(text) < 2:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _set_nonblocking(fd: int) -> int:
    os.set_blocking(fd, False)
    return fd


class Proc:
    """One spawned handler process, with its pipes and a pidfd on its exit."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.stdin = _set_nonblocking(popen.stdin.fileno())
        self.stdout = _set_nonblocking(popen.stdout.fileno())
        self.stderr = _set_nonblocking(popen.stderr.fileno())
        self.returncode: int | None = None
        self._closed_fds = False

    @classmethod
    def spawn(cls, launch: Launch) -> Proc:
        """Start ``launch`` in a new session; raises OSError if it cannot be started."""
        if not os.access(launch.program, os.X_OK):
            raise OSError(f"{launch.program} is not an executable on this node")
        argv = list(launch.argv)
        if _SETPRIV is not None:
            # SIGKILL when the daemon dies: an orphaned pre-spawned process would
            # otherwise read EOF and run the handler on an empty event.
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=launch.cwd,
            env=dict(launch.env),
            start_new_session=True,
            close_fds=True,
        )
        try:
            return cls(popen)
        except OSError:
            popen.kill()
            popen.wait()
            raise

    def exited(self) -> bool:
        """True once the main process has exited (reaped or not); never reaps it."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def kill_group(self) -> None:
        """SIGKILL the process group. Safe until :meth:`reap`: the pid is ours till then."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def poll(self) -> int | None:
        """The exit status once the main process has exited, else None.

        Its group is killed first (what it left running goes with it), then it is
        reaped; the pipes stay open: a handler that answered without reading its
        event has its answer in stdout.
        """
        if self.returncode is None and self.exited():
            self.kill_group()
            code = self.popen.poll()
            if code is None:  # pragma: no cover - waitid said it exited
                return None
            self.returncode = code
            os.close(self.pidfd)
        return self.returncode

    def reap(self) -> int:
        """Collect the exit status of an exited main process; closes everything we hold."""
        code = self.poll()
        assert code is not None, "reap() before the process exited"
        self.close_pipes()
        return code

    def close_pipes(self) -> None:
        if not self._closed_fds:
            self._closed_fds = True
            for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def blocked_reading(self) -> bool:
        """True when the process, or one it started, sleeps in a pipe read: it is up and
        waiting for the event (a wrapper script waits for its child, which reads).

        A heuristic: callers bound how long they wait for it.
        """
        seen: set[int] = set()
        todo = [self.pid]
        while todo and len(seen) < 64:
            pid = todo.pop()
            seen.add(pid)
            try:
                wchan = Path(f"/proc/{pid}/wchan").read_text()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if "pipe" in wchan and "write" not in wchan:
                return True
            todo.extend(int(c) for c in children if int(c) not in seen)
        return False

    async def wait_exit(self, timeout_s: float = _KILL_WAIT_S) -> bool:
        """Wait (bounded) for the main process to exit, then reap it; False if it did not."""
        if self.returncode is not None:
            return True
        if not self.exited():
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not done.done():
                    done.set_result(None)

            loop.add_reader(self.pidfd, on_exit)
            try:
                async with asyncio.timeout(timeout_s):
                    await done
            except TimeoutError:
                return False
            finally:
                loop.remove_reader(self.pidfd)
        self.reap()
        return True

    async def destroy(self) -> None:
        """Kill the group and reap it (bounded): nothing of this process is left."""
        self.kill_group()
        self.close_pipes()
        await self.wait_exit()

    async def run(self, data: bytes, timeout_s: float, *, early_json: bool) -> Outcome:
        """Give the process ``data`` on stdin and collect its answer; see :class:`_Exchange`.

        Raises HandlerTimeout (after killing and reaping the group) past ``timeout_s``
        and HandlerFailed when stdout grows past MAX_OUTPUT_BYTES.
        """
        exchange = _Exchange(self, data, early_json=early_json)
        finished = False
        try:
            async with asyncio.timeout(timeout_s):
                await exchange.done
            finished = True
        except TimeoutError:
            raise HandlerTimeout(
                f"the handler ran past its timeout of {timeout_s:g}s and was killed"
            ) from None
        finally:
            exchange.stop()
            if not (finished and exchange.exited):
                # Timeout, cancellation, output overflow, or an early answer: the
                # group must go. On the early path the process is already on its way
                # out; the caller reaps it off the request path.
                self.kill_group()
                if not (finished and exchange.early):
                    self.close_pipes()
                    await self.wait_exit()
        if exchange.overflow:
            raise HandlerFailed(
                f"the handler's output is larger than {MAX_OUTPUT_BYTES} bytes",
                detail=tail_text(bytes(exchange.err)),
            )
        if exchange.early:
            return Outcome(bytes(exchange.out), bytes(exchange.err), None)
        return Outcome(bytes(exchange.out), bytes(exchange.err), self.reap())


class _Exchange:
    """One invocation's I/O, driven by event-loop callbacks (no task per pipe).

    Feeds stdin (then closes it), reads stdout bounded by MAX_OUTPUT_BYTES,
    keeps the tail of stderr, and watches the pidfd. Done when the main
    process has exited and both pipes are at EOF (or a short grace after the
    exit: a process that left the group may hold them), when stdout
    overflows, or, with ``early_json``, as soon as stdout holds a complete
    JSON document: ``nix-instantiate`` prints its answer about 3 ms before
    its exit is done tearing down its heap, and a document it completed is
    its whole answer (an evaluation error after output has started leaves
    an unterminated document behind).
    """

    def __init__(self, proc: Proc, data: bytes, *, early_json: bool) -> None:
        self.proc = proc
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.early_json = early_json
        self.out = bytearray()
        self.err = bytearray()
        self.exited = proc.exited()
        self.overflow = False
        self.early = False
        self._pending = memoryview(data)
        self._stdin_open = True
        self._stdout_open = True
        self._stderr_open = True
        self._writer = False
        self._grace: asyncio.TimerHandle | None = None
        self._feed()
        self.loop.add_reader(proc.stdout, self._on_stdout)
        self.loop.add_reader(proc.stderr, self._on_stderr)
        if self.exited:
            self._on_exit()
        else:
            self.loop.add_reader(proc.pidfd, self._on_exit)

    def _feed(self) -> None:
        while self._pending:
            try:
                n = os.write(self.proc.stdin, self._pending[:_CHUNK])
            except BlockingIOError:
                if not self._writer:
                    self._writer = True
                    self.loop.add_writer(self.proc.stdin, self._feed)
                return
            except OSError:  # EPIPE: the handler does not read its event (or died)
                break
            self._pending = self._pending[n:]
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._writer:
            self._writer = False
            self.loop.remove_writer(self.proc.stdin)
        if self._stdin_open:
            self._stdin_open = False
            stream = self.proc.popen.stdin
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _read(self, fd: int) -> bytes | None:
        """One chunk; b'' at EOF; None when nothing is there yet."""
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _on_stdout(self) -> None:
        chunk = self._read(self.proc.stdout)
        if chunk is None:
            return
        if not chunk:
            self._stdout_open = False
            self.loop.remove_reader(self.proc.stdout)
            self._check()
            return
        self.out += chunk
        if len(self.out) > MAX_OUTPUT_BYTES:
            self.overflow = True
            self._finish()
        elif self.early_json and not self.exited and complete_json(self.out):
            self.early = True
            self._finish()

    def _on_stderr(self) -> None:
        chunk = self._read(self.proc.stderr)
        if chunk is None:
            return
        if not chunk:
            self._stderr_open = False
            self.loop.remove_reader(self.proc.stderr)
            self._check()
            return
        self.err += chunk
        if len(self.err) > 2 * STDERR_TAIL_BYTES:
            del self.err[:-STDERR_TAIL_BYTES]

    def _on_exit(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ValueError, KeyError):
                self.loop.remove_reader(self.proc.pidfd)
        self.exited = True
        # Whatever the handler left running in its group goes with it.
        self.proc.kill_group()
        self._grace = self.loop.call_later(_PIPE_GRACE_S, self._finish)
        self._check()

    def _check(self) -> None:
        if self.exited and not self._stdout_open and not self._stderr_open:
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        """Unregister every callback (idempotent); leaves the pipes to their owner."""
        self._close_stdin()
        if self._stdout_open:
            self._stdout_open = False
            self.loop.remove_reader(self.proc.stdout)
        if self._stderr_open:
            self._stderr_open = False
            self.loop.remove_reader(self.proc.stderr)
        if self.proc.returncode is None:
            self.loop.remove_reader(self.proc.pidfd)
        if self._grace is not None:
            self._grace.cancel()


class ProcessWorker:
    """A worker made of pre-spawned processes, one per invocation (see the module docstring).

    ``encode`` turns (event, context) into the bytes written on stdin;
    ``failure`` turns a failed execution (exit status and stderr tail) into the
    HandlerFailed raised; ``early_json`` answers as soon as stdout holds a
    complete JSON document (for handlers whose exit status adds nothing once
    they printed one).
    """

    def __init__(
        self,
        launch: Launch,
        *,
        concurrency: int,
        encode: Callable[[bytes, dict[str, Any]], bytes],
        failure: Callable[[int, bytes], HandlerFailed],
        early_json: bool = False,
        spares: int = 1,
    ) -> None:
        self.launch = launch
        self.concurrency = concurrency
        self._encode = encode
        self._failure = failure
        self._early_json = early_json
        self._target = min(concurrency, MAX_READY) + spares
        self._ready: deque[Proc] = deque()
        self._busy: set[Proc] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._broken: str | None = None
        self._refill_scheduled = False
        #: Counters for tests and metrics: processes spawned, invocations that had to
        #: spawn their own process because none was ready.
        self.spawned = 0
        self.unready_takes = 0

    # --- the pool ------------------------------------------------------------------------

    def _spawn(self) -> Proc:
        try:
            proc = Proc.spawn(self.launch)
        except OSError as exc:
            self._broken = f"cannot start the handler: {exc}"
            raise WorkerGone(self._broken) from None
        self.spawned += 1
        return proc

    def fill(self) -> None:
        """Spawn processes until ``concurrency + spares`` (at most MAX_READY + spares)
        are ready, or a spawn fails."""
        self._refill_scheduled = False
        while not self._closed and self._broken is None and len(self._ready) < self._target:
            try:
                self._ready.append(self._spawn())
            except WorkerGone:
                return

    def _refill_soon(self) -> None:
        if not self._refill_scheduled and not self._closed:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self.fill)

    @property
    def ready(self) -> int:
        """How many pre-spawned processes wait for an invocation."""
        return len(self._ready)

    def pids(self) -> list[int]:
        """The main pids of the processes this worker holds, ready or busy."""
        return [p.pid for p in (*self._ready, *self._busy) if p.returncode is None]

    def _take(self) -> Proc:
        """A ready process; one that died while waiting with a failure is replaced.

        A process that exited 0 without its event (a handler that ignores stdin)
        is used: its answer is in its stdout. One that failed on its own (killed
        by someone, out of memory) is dropped, and this invocation spawns its own:
        if the handler fails at start-up every time, that one fails the same way
        and its error is what the caller gets.
        """
        while self._ready:
            proc = self._ready.popleft()
            if proc.poll() in (None, 0):
                return proc
            self._background(proc.destroy())
        self.unready_takes += 1
        return self._spawn()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, settle_s: float) -> None:
        """Cold start: spawn one process, wait (bounded) for it to be up, then the rest.

        Raises HandlerFailed, with everything spawned killed, when the handler
        cannot be started or its first process fails on its own.
        """
        try:
            try:
                self._ready.append(self._spawn())
            except WorkerGone as exc:
                raise HandlerFailed(str(exc)) from None
            # The spares start after the first is up: on a small node they would
            # otherwise slow down the one the first invocation is waiting for.
            await self.settle(settle_s)
        except BaseException:
            await self.close()
            raise
        self.fill()

    async def settle(self, timeout_s: float) -> None:
        """Wait (bounded) until the first ready process has started up: blocked on its
        stdin, or exited. One that exited with a failure means the handler cannot
        start: HandlerFailed with its error.
        """
        if not self._ready:
            return
        proc = self._ready[0]
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                if code != 0:
                    self._ready.remove(proc)
                    err = _drain(proc.stderr)
                    await proc.destroy()
                    raise self._failure(code, err)
                return
            if proc.blocked_reading():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    # --- invocations ---------------------------------------------------------------------

    async def invoke(self, event: bytes, context: dict[str, Any], timeout_s: float) -> Response:
        if self._closed:
            raise WorkerGone("the worker is closed")
        if self._broken is not None:
            raise WorkerGone(self._broken)
        data = self._encode(event, context)
        proc = self._take()
        self._busy.add(proc)
        self._idle.clear()
        try:
            outcome = await proc.run(data, timeout_s, early_json=self._early_json)
        finally:
            self._refill_soon()
            self._busy.discard(proc)
            if not self._busy:
                self._idle.set()
            if proc.returncode is None:
                self._background(proc.destroy())
        code = outcome.returncode
        if code is not None and code != 0:
            raise self._failure(code, outcome.stderr_tail)
        if not outcome.stdout.strip():
            raise HandlerFailed(
                "the handler printed nothing on stdout (it must print a JSON response)",
                detail=tail_text(outcome.stderr_tail),
            )
        try:
            answer = parse_response(outcome.stdout)
            if outcome.stderr_tail:
                answer = dataclasses.replace(answer, logs=tail_text(outcome.stderr_tail))
            return answer
        except HandlerFailed as exc:
            if not exc.detail:
                exc.detail = tail_text(outcome.stderr_tail)
            raise

    def alive(self) -> bool:
        return not self._closed and self._broken is None

    async def close(self) -> None:
        """Kill every process of this worker, ready or busy, and reap them all.

        Busy ones are only killed here: their invocations see the exit, reap them
        and fail with "killed by signal 9".
        """
        self._closed = True
        for proc in self._busy:
            proc.kill_group()
        while self._ready:
            await self._ready.popleft().destroy()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT_S + _PIPE_GRACE_S):
                await self._idle.wait()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _drain(fd: int, limit: int = 4 * STDERR_TAIL_BYTES) -> bytes:
    """What a process that has exited left in a pipe (bounded, non-blocking)."""
    out = bytearray()
    while len(out) < limit:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out[-STDERR_TAIL_BYTES:])


def base_env(work_dir: Path, extra: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """A handler's environment: not the daemon's (which may hold secrets), only
    PATH, a locale, a private HOME and TMPDIR under ``work_dir``, then ``overrides``
    and the function's own ``env`` (which wins).
    """
    home = work_dir / "home"
    tmp = work_dir / "tmp"
    for path in (home, tmp):
        path.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "TMPDIR": str(tmp),
    }
    env.update(overrides)
    env.update(extra)
    return env
