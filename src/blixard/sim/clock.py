"""The simulation's virtual clock and event queue.

Why: a whole cluster (store, controller, agents, task shims) runs in one
Python thread on one timeline, so a run is a pure function of its seed.
Nothing here reads the wall clock; time only moves when the next event is
taken from the queue. Ties are broken by a sequence number, so two events
due at the same instant always run in the order they were scheduled.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Timer:
    """A scheduled callback; :meth:`cancel` makes the queue skip it."""

    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        self.fn = None

    @property
    def pending(self) -> bool:
        return self.fn is not None


class Clock:
    """Virtual time in seconds from the start of the run, and what is due when."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0
        #: Callbacks run so far (cancelled timers are not counted).
        self.executed = 0

    def at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` at virtual time ``when`` (never in the past)."""
        when = max(when, self.now)
        timer = Timer(when, fn)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))
        return timer

    def after(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.at(self.now + max(0.0, delay), fn)

    def next_time(self) -> float | None:
        """When the next pending event is due (None: nothing is scheduled)."""
        heap = self._heap
        while heap and heap[0][2].fn is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def step(self) -> bool:
        """Run the next pending event; False when the queue is empty."""
        heap = self._heap
        while heap:
            when, _, timer = heapq.heappop(heap)
            fn = timer.fn
            if fn is None:
                continue
            timer.fn = None
            self.now = when
            self.executed += 1
            fn()
            return True
        return False
