"""What every part of a run shares: the clock, the seeded generators, the store, the trace.

Why one object: the parts (hosts, daemons, the controller, faults, the
checker) are built from it and nothing else, so nothing can reach for the
wall clock, a global random generator or ``uuid4`` by accident.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from blixard.sim.clock import Clock
from blixard.sim.config import SimConfig
from blixard.sim.store import SimStore
from blixard.sim.trace import Trace

if TYPE_CHECKING:
    from blixard.sim.host import Host

#: Virtual time 0 on the wall clock (only used to stamp objects for users).
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Metrics:
    faults: dict[str, int] = field(default_factory=dict)
    failovers: int = 0
    #: Per completed failover: fault start -> controller saw the node down.
    detection_s: list[float] = field(default_factory=list)
    #: Per completed failover: fault start -> the replica runs on its new node.
    running_elsewhere_s: list[float] = field(default_factory=list)
    workload: dict[str, int] = field(default_factory=dict)
    starts: int = 0
    fenced: int = 0
    controller_passes: int = 0
    plan_calls: int = 0
    conflicts: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class World:
    def __init__(self, config: SimConfig, echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.timing = config.timing
        self.model = config.model
        self.load = config.load
        self.clock = Clock()
        # One generator seeded by the seed drives everything; each part draws from a
        # generator seeded from it, so a change in one part's draws (e.g. a new fault
        # kind) does not reshuffle the others'.
        root = random.Random(config.seed)
        self.net_rng = random.Random(root.getrandbits(64))
        self.fault_rng = random.Random(root.getrandbits(64))
        self.work_rng = random.Random(root.getrandbits(64))
        self.task_rng = random.Random(root.getrandbits(64))
        self.uid_rng = random.Random(root.getrandbits(64))
        self.trace = Trace(echo=echo)
        self.store = SimStore(self.clock)
        self.metrics = Metrics()
        self.hosts: dict[str, Host] = {}
        self._pid = 1000
        #: Called when a task starts or ends, is paused or resumed (instance, host).
        self.on_task_change: Callable[[str, str], None] = lambda instance, host: None
        #: Called when an agent saw a task boot (instance, epoch, node).
        self.on_running: Callable[[str, int, str], None] = lambda instance, epoch, node: None
        #: Called when the controller committed a failover (instance, epoch, from, down_since).
        self.on_failover: Callable[[str, int, str, float], None] = lambda i, e, n, t: None

    @property
    def now(self) -> float:
        return self.clock.now

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.clock.now)

    def new_uid(self) -> uuid.UUID:
        return uuid.UUID(int=self.uid_rng.getrandbits(128), version=4)

    def next_pid(self) -> int:
        self._pid += 1
        return self._pid

    def log(self, who: str, what: str) -> None:
        self.trace.log(self.clock.now, who, what)

    def uniform(self, rng: random.Random, span: tuple[float, float]) -> float:
        return rng.uniform(span[0], span[1])
