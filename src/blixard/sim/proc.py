"""Simulated processes: coroutines on the virtual clock, and the requests they send the store.

Why generators: the agent and controller models are written as the real
``async def`` code is, one step after another (``inst = yield
Call(...)`` where the real code has ``inst = await ...``), so each rule can
be set beside the line it mirrors. The runner resumes a generator when its
operation completes on the virtual clock.

An :class:`Actor` is one OS process (a daemon incarnation, the controller):

* **killed**: it never runs again; answers and timers meant for it are
  dropped (requests already on the wire still reach the store);
* **paused** (SIGSTOP): whatever is due for it waits and runs, in order, when
  it is resumed; the tasks and shims on its host are other processes and go on.

Store requests (:meth:`Actor.call`) take the host's latency, half before the
store applies them and half after. A host cut off from the store loses them:
a request lost on the way is never applied, an answer lost on the way back
was applied but the caller cannot know; both fail with ``StoreUnavailable``
after ``store_timeout_s``, as the real clients do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from functools import partial
from typing import TYPE_CHECKING, Any

from blixard.domain.errors import BlixardError, StoreUnavailable
from blixard.sim.clock import Timer
from blixard.sim.world import World

if TYPE_CHECKING:
    from blixard.sim.host import Host, SimTask

Resume = Callable[[Any, BaseException | None], None]


class Op(ABC):
    """Something a coroutine waits for."""

    @abstractmethod
    def start(self, proc: Proc) -> None: ...


class Call(Op):
    """A store request: ``fn`` runs at the store when the request reaches it."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def start(self, proc: Proc) -> None:
        proc.actor.call(self.fn, proc.resume)


class Sleep(Op):
    """``asyncio.sleep`` on the actor's own (drifting) monotonic clock."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def start(self, proc: Proc) -> None:
        proc.actor.later(self.seconds, lambda: proc.resume(None, None))


class WaitExit(Op):
    """Wait until ``task`` exits (True) or ``timeout`` local seconds pass (False)."""

    __slots__ = ("task", "timeout")

    def __init__(self, task: SimTask, timeout: float) -> None:
        self.task = task
        self.timeout = timeout

    def start(self, proc: Proc) -> None:
        if not self.task.alive:
            proc.actor.later(0.0, lambda: proc.resume(True, None))
            return
        done = [False]

        def exited() -> None:
            if not done[0]:
                done[0] = True
                timer.cancel()
                proc.actor.run(lambda: proc.resume(True, None))

        def timed_out() -> None:
            if not done[0]:
                done[0] = True
                proc.resume(False, None)

        timer = proc.actor.later(self.timeout, timed_out)
        self.task.listeners.append(exited)


class Proc:
    """Runs one generator for one actor (see the module docstring)."""

    __slots__ = ("actor", "cancelled", "gen", "on_done", "on_error")

    def __init__(
        self,
        actor: Actor,
        gen: Generator[Op, Any, Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BlixardError], None] | None = None,
    ) -> None:
        self.actor = actor
        self.gen = gen
        self.on_done = on_done
        self.on_error = on_error
        self.cancelled = False

    def start(self) -> Proc:
        self.resume(None, None)
        return self

    def cancel(self) -> None:
        self.cancelled = True

    def resume(self, value: Any, exc: BaseException | None) -> None:
        if self.cancelled or not self.actor.alive:
            return
        try:
            op = self.gen.send(value) if exc is None else self.gen.throw(exc)
        except StopIteration as stop:
            if self.on_done is not None:
                self.on_done(stop.value)
            return
        except BlixardError as error:
            if self.on_error is None:
                raise
            self.on_error(error)
            return
        op.start(self)


class Actor:
    """One simulated OS process (see the module docstring)."""

    def __init__(self, world: World, name: str, host: Host | None) -> None:
        self.world = world
        self.name = name
        self.host = host
        self.alive = True
        self.paused = False
        self._deferred: list[Callable[[], None]] = []
        self._last_delivery = 0.0

    @property
    def rate(self) -> float:
        return self.host.rate if self.host is not None else 1.0

    def local_now(self) -> float:
        """This process's ``time.monotonic()``."""
        return self.world.clock.now * self.rate

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in this process now, later if it is paused, never if it is dead."""
        if not self.alive:
            return
        if self.paused:
            self._deferred.append(fn)
            return
        fn()

    def deliver(self, fn: Callable[[], None]) -> None:
        """A watch event for this process: in order, after the watch delay; a host cut
        off from the store loses it (its next re-list covers the loss)."""
        world = self.world
        when = max(
            self._last_delivery,
            world.clock.now + world.uniform(world.net_rng, world.timing.watch_delay_s),
        )
        self._last_delivery = when
        host = self.host

        def arrive() -> None:
            if host is not None and host.partitioned:
                return
            self.run(fn)

        world.clock.at(when, arrive)

    def later(self, local_seconds: float, fn: Callable[[], None]) -> Timer:
        return self.world.clock.after(local_seconds / self.rate, lambda: self.run(fn))

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: what came due while stopped runs now, in the order it came."""
        self.paused = False
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            self.world.clock.after(0.0, partial(self.run, fn))

    def kill(self) -> None:
        self.alive = False
        self._deferred = []

    def spawn(
        self,
        gen: Generator[Op, Any, Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BlixardError], None] | None = None,
    ) -> Proc:
        return Proc(self, gen, on_done, on_error).start()

    # --- store requests -----------------------------------------------------------------

    def call(self, fn: Callable[[], Any], resume: Resume) -> None:
        world, host, clock = self.world, self.host, self.world.clock
        timing = world.timing
        sent = clock.now
        timeout = timing.store_timeout_s

        def fail() -> None:
            clock.at(
                sent + timeout,
                lambda: self.run(lambda: resume(None, StoreUnavailable("store request timed out"))),
            )

        if host is not None and host.partitioned:
            fail()
            return
        span = timing.slow_store_latency_s if host is not None and host.slow else None
        latency = world.uniform(world.net_rng, span or timing.store_latency_s)
        there = latency * world.net_rng.uniform(0.3, 0.7)

        def arrive() -> None:
            if host is not None and host.partitioned:
                fail()
                return
            value: Any = None
            error: BlixardError | None = None
            try:
                value = fn()
            except BlixardError as exc:
                error = exc
            if latency >= timeout:
                fail()  # applied, but the answer comes too late: an ambiguous failure
                return

            def respond() -> None:
                if host is not None and host.partitioned:
                    fail()
                    return
                self.run(lambda: resume(value, error))

            clock.at(sent + latency, respond)

        clock.at(sent + there, arrive)
