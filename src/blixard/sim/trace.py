"""The run's trace: one line per thing that happened, hashed as it goes.

Why: the hash of the whole trace is how determinism is checked (same seed,
same hash, in any process), and the last lines are what a violation shows so
that a failing seed can be read without re-running it with ``--trace``.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable


class Trace:
    def __init__(self, keep: int = 50, echo: Callable[[str], None] | None = None) -> None:
        self._hash = hashlib.sha256()
        self.recent: deque[str] = deque(maxlen=keep)
        self.lines = 0
        self.echo = echo

    def log(self, now: float, who: str, what: str) -> None:
        line = f"{now:12.6f} {who:<12} {what}"
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self.recent.append(line)
        self.lines += 1
        if self.echo is not None:
            self.echo(line)

    def digest(self) -> str:
        return self._hash.hexdigest()
