"""Seeded faults: what goes wrong, where, for how long.

Why these: each is something a real cluster sees, and each tests a
different part of the fencing argument (DESIGN.md "Failover and fencing"):

* ``node_crash``: host power loss; the agent and every task die at once.
  The node comes back after a while (or, rarely, never: the host is lost).
* ``daemon_crash``: ``kill -9`` of the daemon only. Tasks and shims keep
  running and must obey the fencing deadline by themselves: the case that
  matters most.
* ``daemon_stop``: a clean stop (SIGTERM, e.g. an upgrade): the daemon
  revokes its lease (registration.close()); tasks keep running.
* ``partition``: the node's store requests and keepalives are lost; its tasks
  run until the shim's deadline.
* ``pause``: the daemon is frozen (SIGSTOP); shims keep enforcing.
* ``slow_disk``: the node's store requests take 100 ms to 2 s.
* ``leader_change``: a new controller leader with an empty ``down_since``.
* ``task_crash``: a workload exits with code 1 (restart policy and backoff).

Faults start at exponentially distributed intervals; at most
``max_faulty_share`` of the nodes are faulty at once and every fault ends by
itself, so the cluster can recover between faults. When the quiet period
starts, every fault still active is healed (a lost host stays lost).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from blixard.sim.agent import start_daemon
from blixard.sim.clock import Timer
from blixard.sim.controller import Leadership
from blixard.sim.host import Host
from blixard.sim.proc import Actor, Call, Op
from blixard.sim.world import World

#: Faults that stop a node from renewing its lease (a failover may follow).
TAKES_NODE_AWAY = frozenset({"node_crash", "daemon_crash", "daemon_stop", "partition", "pause"})


class Faults:
    def __init__(self, world: World, leadership: Leadership) -> None:
        self.world = world
        self.rng = world.fault_rng
        self.leadership = leadership
        self.starts_at = 10.0
        self.ends_at = world.config.duration_s - world.config.quiet_s
        #: host -> (fault kind, its end, the timer of its end)
        self.active: dict[str, tuple[str, Callable[[], None], Timer | None]] = {}
        self.lost: set[str] = set()
        #: When each node's latest fault that takes it away started (failover figures).
        self.started: dict[str, float] = {}
        kinds, weights = zip(*world.load.fault_weights, strict=True)
        self.kinds: tuple[str, ...] = kinds
        self.weights: tuple[float, ...] = weights

    def log(self, what: str) -> None:
        self.world.log("fault", what)

    def start(self) -> None:
        self.world.clock.at(self.starts_at, self._next)
        self.world.clock.at(self.ends_at, self.heal_all)

    def _schedule(self) -> None:
        wait = self.rng.expovariate(1.0 / self.world.load.fault_interval_s)
        if self.world.clock.now + wait < self.ends_at:
            self.world.clock.after(wait, self._next)

    def _next(self) -> None:
        kind = self.rng.choices(self.kinds, weights=self.weights)[0]
        if kind == "leader_change":
            self._count(kind)
            self.log("controller leader change")
            self.leadership.change()
        elif kind == "task_crash":
            self._task_crash()
        else:
            host = self._pick()
            if host is not None:
                getattr(self, "_" + kind)(host)
        self._schedule()

    def _count(self, kind: str) -> None:
        self.world.metrics.count(self.world.metrics.faults, kind)

    def _pick(self) -> Host | None:
        world = self.world
        limit = max(1, int(len(world.hosts) * world.load.max_faulty_share))
        if len(self.active) + len(self.lost) >= limit:
            return None
        free = [n for n in sorted(world.hosts) if n not in self.active and n not in self.lost]
        return world.hosts[self.rng.choice(free)] if free else None

    def _hold(
        self, host: Host, kind: str, span: tuple[float, float], end: Callable[[], None]
    ) -> None:
        self._count(kind)
        if kind in TAKES_NODE_AWAY:
            self.started[host.name] = self.world.clock.now
        took = self.world.uniform(self.rng, span)
        self.log(f"{kind} {host.name} for {took:.2f}s")

        def finish() -> None:
            self.active.pop(host.name, None)
            self.log(f"{kind} {host.name} ends")
            end()

        timer = self.world.clock.after(took, finish)
        self.active[host.name] = (kind, finish, timer)

    def heal_all(self) -> None:
        """The quiet period starts: every active fault ends now."""
        self.log("quiet period: healing every fault")
        for name in sorted(self.active):
            _, finish, timer = self.active[name]
            if timer is not None:
                timer.cancel()
            finish()
        if self.leadership.current is None:
            self.leadership.start()

    # --- the faults -----------------------------------------------------------------------

    def _node_crash(self, host: Host) -> None:
        world = self.world
        host.power_off()
        if host.daemon is not None:
            host.daemon.kill()
        host.daemon, host.wanted_up = None, False
        permanent = (
            not self.lost
            and len(world.hosts) >= 4
            and self.rng.random() < world.load.permanent_loss_p
        )
        if permanent:
            self._count("node_crash")
            self.started[host.name] = world.clock.now
            self.lost.add(host.name)
            self.log(f"node_crash {host.name} for good (the host is lost)")
            return

        def power_on() -> None:
            host.powered = True
            start_daemon(world, host)

        self._hold(host, "node_crash", (2.0, 30.0), power_on)

    def _daemon_crash(self, host: Host) -> None:
        if host.daemon is None:
            return
        host.daemon.kill()
        host.daemon, host.wanted_up = None, False
        self._hold(host, "daemon_crash", (1.0, 20.0), partial(self._restart, host))

    def _daemon_stop(self, host: Host) -> None:
        daemon = host.daemon
        if daemon is None or not daemon.started:
            return
        daemon.kill()
        host.daemon, host.wanted_up = None, False
        if self.world.model.revoke_on_stop and daemon.lease_id:
            # registration.close(): the last request of the stopping process.
            closer = Actor(self.world, f"{host.name}-stop", host)
            lease = daemon.lease_id
            store = self.world.store
            closer.spawn(_one(Call(lambda: store.lease_revoke(lease))), on_error=lambda e: None)
        self._hold(host, "daemon_stop", (1.0, 20.0), partial(self._restart, host))

    def _restart(self, host: Host) -> None:
        start_daemon(self.world, host)

    def _partition(self, host: Host) -> None:
        host.partitioned = True

        def end() -> None:
            host.partitioned = False

        self._hold(host, "partition", (1.0, 20.0), end)

    def _pause(self, host: Host) -> None:
        daemon = host.daemon
        if daemon is None:
            return
        daemon.pause()
        self._hold(host, "pause", (0.5, 15.0), daemon.resume)

    def _slow_disk(self, host: Host) -> None:
        host.slow = True

        def end() -> None:
            host.slow = False

        self._hold(host, "slow_disk", (5.0, 30.0), end)

    def _task_crash(self) -> None:
        world = self.world
        candidates = [
            (name, pid)
            for name in sorted(world.hosts)
            for pid in sorted(world.hosts[name].tasks)
            if world.hosts[name].tasks[pid].running
        ]
        if not candidates:
            return
        name, pid = self.rng.choice(candidates)
        self._count("task_crash")
        self.log(f"task_crash {world.hosts[name].tasks[pid].instance} on {name}")
        world.hosts[name].crash(world.hosts[name].tasks[pid], 1)


def _one(op: Op) -> Generator[Op, Any, None]:
    """A coroutine that makes one request."""
    yield op
