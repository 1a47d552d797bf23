"""Cluster benchmark: failover on a real 3-node cluster and the VM API on 3-member etcd.

Run from the repository root::

    .venv/bin/python -m benchmarks.cluster [--rounds N] [--skip-failover] [--skip-api] [--json]

It forms a cluster of three real daemons on 127.0.0.1 as a user does
(``python -m blixard node start``: ``a`` with ``--cluster-init``, ``b`` and
``c`` with ``--join``; all three hold an etcd member), each with its own data
dir, API port and etcd ports in a temporary directory, with the **default**
settings (lease TTL 5 s, store timeout 5 s) except ``[microvm]
build_default_image = false``, no ``BLIXARD_*`` variable but
``BLIXARD_ACCEL=tcg``. Then, in the same run:

1. **Failover**, ``--rounds`` rounds (8 by default) on a VM of 6 replicas
   (``hypervisor: process``, ``sleep 3600``, 64M, ``placement.strategy:
   spread``, ``fencing: stop`` by default). Each round kills ``b`` or ``c``
   (alternately, so ``a``, whose API is polled, stays up; never two members at
   once) with SIGKILL to its daemon process only (its etcd member dies with it
   through PR_SET_PDEATHSIG), after a random wait of up to one keepalive period
   so the kill falls anywhere in the lease's keepalive cycle. Then it polls
   node a's API every ``--poll-ms`` (50 ms):

   * ``detected``: the first poll of ``GET /v1/cluster/nodes`` showing the node
     not alive (its liveness key is gone: its lease expired);
   * ``running elsewhere``: the first poll of ``GET /v1/instances`` showing
     every replica that was on the killed node ``running`` on another node, for
     its current assignment (``status.node == spec.node``, ``status.epoch ==
     spec.epoch``).

   Beside the polls, a watch on a's etcd member times the deletion of the
   liveness key itself, and Blixard's own timestamps (``spec.assigned_at`` of
   the reassignment, ``status.started_at`` of the new copy, the mtime of the
   killed copy's exit file, which its shim writes when it fences) cut the
   failover into segments on the host's one clock. The killed node's task
   processes (its shims, found by their command line naming the node's data
   dir, and every process of their sessions) are tracked: one still alive when
   another copy of its replica runs is an **overlap**, a safety failure, and is
   printed as such. In every other round of pairs (``--no-leader-kills`` turns
   this off), etcd's leadership is first moved to the node about to be killed
   (``/v3/maintenance/transfer-leadership``), so that half of the kills take
   the etcd leader down as a third of real node failures in a 3-member cluster
   would. The killed node is then started again (same data dir, no
   ``--join``: it re-attaches to its etcd member), and the next round waits
   until it is alive, every member is healthy and all 6 replicas run again.

   **The raw layer**, interleaved with the failover rounds (ABBA), as many
   rounds: etcd's own lease expiry on the same cluster. A lease with the same
   TTL is granted through the member of b or c (as the killed node's agent
   does), kept alive every TTL/3 as Blixard's registration does, and its
   keepalives stop at a random point of the keepalive period; the time until a
   watch on a's member sees its key deleted is the raw figure.

2. **VM API operations per second** on the same cluster: ``create`` (POST
   /v1/vms, process VMs with **replicas 0**: the records and the controller's
   passes are real, nothing starts), ``get``, ``stop``, ``start`` and
   ``delete``, sequentially and with 16 and 64 concurrent clients, request k
   going to node k mod 3's API (one admin token: tokens are cluster-wide);
   beside the raw layer, ``EtcdStore.put`` and ``get`` from this process with
   the same concurrency and values the size of a stored VM, request k going to
   member k mod 3. API and raw phases alternate (ABBA over ``--api-rounds``).
   The CPU time of the three daemons and of the three etcd members is read from
   /proc over each phase.

Everything printed is measured in the run. Every daemon, etcd member and task
the benchmark started is stopped at the end, and the temporary directory
removed, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from blixard.daemon.config import NodeConfig
from blixard.domain.errors import BlixardError
from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.store.etcd import EtcdStore
from blixard.store.protocol import EventType

REPO = Path(__file__).resolve().parents[1]
#: The default lease TTL (NodeConfig.lease_ttl_s): the goal is about the defaults.
TTL_S: int = NodeConfig.model_fields["lease_ttl_s"].default
#: What the daemon derives from the TTL (daemon/node.py): the agents' fencing margin
#: (TTL/5) and the controller's failover grace (max(1.5, 0.3 TTL)).
FENCE_MARGIN_S = TTL_S / 5
GRACE_S = max(1.5, 0.3 * TTL_S)
KEEPALIVE_S = TTL_S / 3
#: The cluster issue's goals (p99).
DETECT_GOAL_S = 5.0
ELSEWHERE_GOAL_S = 15.0
API_GOAL_OPS = 1000.0
CONFIG = "[microvm]\nbuild_default_image = false\n"
NAMES = ("a", "b", "c")
VM_NAME = "failover"
REPLICAS = 6
API_OPS = ("create", "get", "stop", "start", "delete")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MS = 1000.0


class BenchError(Exception):
    """The run cannot go on (a daemon that does not start, a failover that never comes)."""


# --- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def ts(value: str | None) -> float | None:
    """An API timestamp (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(value).timestamp() if value else None


@dataclass(frozen=True)
class Proc:
    pid: int
    sid: int
    start_ticks: int
    cpu_s: float
    argv: list[str]


def read_proc(pid: int) -> Proc | None:
    """A live (not zombie) process's facts from /proc, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return Proc(
        pid=pid,
        sid=int(fields[3]),
        start_ticks=int(fields[19]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,
        argv=[a.decode(errors="replace") for a in argv if a],
    )


def all_procs() -> list[Proc]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            proc = read_proc(int(entry.name))
            if proc is not None:
                out.append(proc)
    return out


def naming(procs: Sequence[Proc], root: Path) -> list[Proc]:
    """The processes whose command line names a path under ``root``."""
    needle = str(root) + "/"
    return [p for p in procs if any(needle in arg for arg in p.argv)]


def alive(proc: Proc) -> bool:
    now = read_proc(proc.pid)
    return now is not None and now.start_ticks == proc.start_ticks


def environment() -> dict[str, str]:
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    try:
        etcd = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        etcd = "not found"
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": str(os.cpu_count()),
        "os": f"Debian {debian}, Linux {platform.release()}",
        "python": platform.python_version(),
        "etcd": etcd,
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


# --- the daemons ----------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One ``blixard node start`` process with its own ports and data dir."""

    name: str
    base: Path
    config: Path
    api_port: int = field(default_factory=free_port)
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def log(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self, *extra: str, ports: bool = True) -> None:
        """Start the daemon; ``ports=False`` is a restart (cluster.json says how)."""
        args = [*("node", "start", "--node-id", self.name, "--data-dir", str(self.data_dir))]
        args += ["--api-host", "127.0.0.1", "--api-port", str(self.api_port)]
        args += ["--config", str(self.config), "--gateway-port", "0"]
        if ports:
            args += ["--etcd-client-port", str(self.client_port)]
            args += ["--etcd-peer-port", str(self.peer_port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blixard", *args, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**env, "BLIXARD_ACCEL": "tcg"},
                start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_healthy(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if not self.running():
                    code = self.proc.returncode if self.proc else None
                    raise BenchError(f"{self.name} exited with {code}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise BenchError(f"{self.name} not healthy within {timeout_s:g}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the daemon process itself (not its group), as `kill -9 <pid>` does."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cpu_s(self) -> float:
        proc = read_proc(self.proc.pid) if self.proc is not None else None
        return proc.cpu_s if proc is not None else 0.0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Cluster:
    """Three daemons, a..c, all etcd members; node a's API is the one polled."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.toml"
        self.config.write_text(CONFIG)
        self.nodes = {name: Daemon(name, root, self.config) for name in NAMES}
        self.token = ""
        self.http: httpx.AsyncClient | None = None

    @property
    def a(self) -> Daemon:
        return self.nodes["a"]

    async def form(self) -> None:
        self.a.start("--cluster-init")
        await self.a.wait_healthy()
        join = (self.a.data_dir / "join.token").read_text().strip()
        for name in ("b", "c"):  # one at a time: each join adds an etcd member
            self.nodes[name].start("--join", self.a.url, "--join-token", join)
            await self.nodes[name].wait_healthy(120)
        self.token = (self.a.data_dir / "admin.token").read_text().strip()
        self.http = self.client(self.a)
        await self.wait_steady(None, timeout_s=60)

    def client(self, node: Daemon, connections: int = 4) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.AsyncClient(base_url=node.url, headers=headers, limits=limits, timeout=30)

    async def get(self, path: str) -> Any:
        assert self.http is not None
        answer = await self.http.get(path)
        if answer.status_code != 200:
            raise BenchError(f"GET {path} answered {answer.status_code}: {answer.text[:300]}")
        return answer.json()

    async def status(self) -> dict[str, Any]:
        return dict(await self.get("/v1/cluster"))

    async def alive(self) -> dict[str, bool]:
        items = (await self.get("/v1/cluster/nodes"))["items"]
        return {i["node"]["metadata"]["name"]: bool(i["alive"]) for i in items}

    async def instances(self, vm: str | None = None) -> list[dict[str, Any]]:
        items = (await self.get("/v1/instances"))["items"]
        return [i for i in items if vm is None or i["spec"]["vm"] == vm]

    async def steady(self, vm: str | None) -> str:
        """'' when every node is alive, every member healthy and (with ``vm``) all of
        its replicas run; else what is missing."""
        status = await self.status()
        members = status["members"]
        if sorted(m["name"] for m in members) != list(NAMES):
            return f"members {sorted(m['name'] for m in members)}"
        if not all(m["healthy"] for m in members) or sum(m["leader"] for m in members) != 1:
            return "etcd members not all healthy or no single leader"
        live = await self.alive()
        if not all(live.get(n) for n in NAMES):
            return f"alive {live}"
        if vm is not None:
            insts = await self.instances(vm)
            ok = [i for i in insts if current_running(i)]
            if len(insts) != REPLICAS or len(ok) != REPLICAS:
                return f"{len(ok)}/{REPLICAS} replicas running ({len(insts)} instances)"
        return ""

    async def wait_steady(self, vm: str | None, timeout_s: float) -> float:
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout_s:
            try:
                last = await self.steady(vm)
            except (BenchError, httpx.HTTPError) as exc:
                last = str(exc)
            if not last:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise BenchError(f"the cluster did not settle within {timeout_s:g}s: {last}")

    async def leader(self) -> tuple[str, dict[str, dict[str, Any]]]:
        members = {m["name"]: m for m in (await self.status())["members"]}
        return next(n for n, m in members.items() if m["leader"]), members

    async def move_leader(self, target: str) -> None:
        """Transfer etcd's leadership to ``target``'s member (asked of the leader)."""
        for _ in range(3):
            leader, members = await self.leader()
            if leader == target:
                return
            body = {"targetID": str(int(members[target]["id"], 16))}
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.post(
                    members[leader]["client_urls"][0] + "/v3/maintenance/transfer-leadership",
                    json=body,
                )
            if answer.status_code != 200:
                raise BenchError(f"etcd refused to move its leader: {answer.text[:300]}")
            await asyncio.sleep(0.5)
        raise BenchError(f"etcd's leadership did not move to {target}")

    async def etcd_counters(self) -> tuple[int, int]:
        """Ranges served by all members, and raft proposals committed (as member a saw)."""
        ranges, proposals = 0, 0
        async with httpx.AsyncClient(timeout=10) as http:
            for name, d in self.nodes.items():
                text = (await http.get(d.etcd_url + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith("etcd_mvcc_range_total "):
                        ranges += int(float(line.split()[1]))
                    elif name == "a" and line.startswith("etcd_server_proposals_committed_total "):
                        proposals += int(float(line.split()[1]))
        return ranges, proposals

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the three daemons and of their etcd members."""
        daemons = sum(d.cpu_s() for d in self.nodes.values())
        procs = all_procs()
        etcd = sum(
            p.cpu_s
            for d in self.nodes.values()
            for p in naming(procs, d.data_dir / "etcd")
            if p.argv and p.argv[0].endswith("etcd")
        )
        return daemons, etcd

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()


def current_running(inst: dict[str, Any]) -> bool:
    spec, st = inst["spec"], inst["status"]
    return bool(
        st["state"] == "running"
        and spec["node"] is not None
        and st["node"] == spec["node"]
        and st["epoch"] == spec["epoch"]
    )


# --- etcd watches -------------------------------------------------------------------------------


class KeyWatch:
    """Records when each key under a prefix is deleted (monotonic clock of this process)."""

    def __init__(self, store: EtcdStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.deleted: dict[str, list[float]] = {}
        self.changed = asyncio.Event()
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        revision = await self.store.head_revision() + 1
        self.task = asyncio.create_task(self._run(revision))

    async def _run(self, revision: int) -> None:
        failures = 0
        while True:  # a stream lost with a member or a leader resumes where it was
            try:
                async for ev in self.store.watch(self.prefix, from_revision=revision):
                    failures = 0
                    revision = ev.revision + 1
                    if ev.type is EventType.DELETE:
                        self.deleted.setdefault(ev.kv.key, []).append(time.monotonic())
                        self.changed.set()
            except BlixardError as exc:
                failures += 1
                if failures >= 10:
                    self.error = exc
                    self.changed.set()
                    return
                await asyncio.sleep(0.2)

    async def deleted_after(self, key: str, after: float, timeout_s: float) -> float:
        """When ``key`` was seen deleted after ``after``; waits up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for seen in self.deleted.get(key, []):
                if seen >= after:
                    return seen
            if self.error is not None:
                raise BenchError(f"the watch on {self.prefix} failed: {self.error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{key} not deleted within {timeout_s:g}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


# --- part 1: failover ------------------------------------------------------------------


def failover_vm() -> dict[str, Any]:
    return {
        "kind": "VM",
        "metadata": {"name": VM_NAME},
        "spec": {
            "hypervisor": "process",
            "replicas": REPLICAS,
            "memory_mib": "64M",
            "boot": {"command": ["sleep", "3600"]},
            "placement": {"strategy": ["spread"]},
        },
    }


@dataclass
class FailoverRound:
    victim: str
    etcd_leader_killed: bool
    controller_leader: str
    moved: list[str]
    #: Seconds after the kill (the host's one clock). None: not seen.
    keepalive_age_at_kill_s: float | None = None
    etcd_gone_s: float | None = None
    fenced_s: float | None = None
    lease_deleted_s: float | None = None
    detected_s: float | None = None
    reassigned_s: float | None = None
    started_s: float | None = None
    elsewhere_s: float | None = None
    old_gone_s: float | None = None
    fenced_exits: list[str] = field(default_factory=list)
    old_tasks: int = 0
    #: Replicas seen running elsewhere while an old copy on the killed node still lived.
    overlaps: list[str] = field(default_factory=list)
    restart_to_steady_s: float | None = None
    polls: int = 0
    poll_errors: int = 0


def fence_deadline(node: Daemon) -> float | None:
    """The node's fencing deadline (CLOCK_MONOTONIC), as its agent last wrote it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float((node.data_dir / "vms" / "fence-stop").read_text().split()[0])
    return None


async def failover_round(
    cluster: Cluster,
    watch: KeyWatch,
    victim_name: str,
    leader_kill: bool,
    rng: random.Random,
    poll_s: float,
) -> FailoverRound:
    victim = cluster.nodes[victim_name]
    if leader_kill:
        await cluster.move_leader(victim_name)
    leader, _ = await cluster.leader()
    controller = str((await cluster.status()).get("controller_leader"))
    before = await cluster.instances(VM_NAME)
    moved = sorted(i["metadata"]["name"] for i in before if i["spec"]["node"] == victim_name)
    procs = all_procs()
    # Each replica's old copy: its shim (whose command line names its run directory,
    # <data dir>/vms/<instance>/) and every process of the shim's session (the workload).
    old: dict[str, list[Proc]] = {}
    for n in moved:
        for shim in naming(procs, victim.data_dir / "vms" / n):
            old.setdefault(n, []).extend(p for p in procs if p.sid == shim.pid)
    rnd = FailoverRound(victim_name, leader == victim_name, controller, moved)
    rnd.old_tasks = sum(len(ps) for ps in old.values())
    if not moved or sorted(old) != moved:
        raise BenchError(f"{victim_name} runs tasks for {sorted(old)}, holds {moved}")

    await asyncio.sleep(rng.uniform(0, KEEPALIVE_S))  # anywhere in the keepalive cycle
    wall0 = time.time()
    t0 = time.monotonic()
    victim.kill9()
    deadline = fence_deadline(victim)
    if deadline is not None:  # deadline = last keepalive sent + TTL - margin
        rnd.keepalive_age_at_kill_s = t0 - (deadline + FENCE_MARGIN_S - TTL_S)
    etcd = naming(all_procs(), victim.data_dir / "etcd")

    assert cluster.http is not None
    next_poll = t0
    while True:
        now = time.monotonic()
        if rnd.etcd_gone_s is None and not any(alive(p) for p in etcd):
            rnd.etcd_gone_s = now - t0
        if now - t0 > 120:
            raise BenchError(f"{moved} not running elsewhere 120 s after killing {victim_name}")
        try:
            nodes = (await cluster.http.get("/v1/cluster/nodes")).json()["items"]
            seen = time.monotonic()
            live = {i["node"]["metadata"]["name"]: i["alive"] for i in nodes}
            if rnd.detected_s is None and live.get(victim_name) is False:
                rnd.detected_s = seen - t0
            insts = {i["metadata"]["name"]: i for i in await cluster.instances(VM_NAME)}
            seen = time.monotonic()
        except (httpx.HTTPError, BenchError, ValueError, KeyError):
            rnd.poll_errors += 1
            insts = {}
        rnd.polls += 1
        living = {n: [p.pid for p in ps if alive(p)] for n, ps in old.items()}
        if rnd.old_gone_s is None and not any(living.values()):
            rnd.old_gone_s = time.monotonic() - t0
        elsewhere = [
            n
            for n in moved
            if n in insts and insts[n]["spec"]["node"] != victim_name and current_running(insts[n])
        ]
        for n in elsewhere:
            if living[n]:
                where = insts[n]["spec"]["node"]
                rnd.overlaps.append(
                    f"{seen - t0:.3f}s after the kill: {n} running on {where} while its old"
                    f" copy on {victim_name} (pids {living[n]}) still lives"
                )
        if insts and len(elsewhere) == len(moved):
            rnd.elsewhere_s = seen - t0
            break
        next_poll += poll_s
        await asyncio.sleep(max(0.0, next_poll - time.monotonic()))

    with contextlib.suppress(BenchError):  # the watch on a's member: the key's deletion
        key = NODE_LEASES_PREFIX + victim_name
        rnd.lease_deleted_s = await watch.deleted_after(key, t0, 5) - t0
    # Blixard's own timestamps (wall clock of this one host) for the segments.
    assigned = [ts(insts[n]["spec"]["assigned_at"]) for n in moved]
    started = [ts(insts[n]["status"]["started_at"]) for n in moved]
    if all(a is not None for a in assigned):
        rnd.reassigned_s = max(a for a in assigned if a is not None) - wall0
    if all(s is not None for s in started):
        rnd.started_s = max(s for s in started if s is not None) - wall0
    fenced: dict[str, float] = {}
    for n in moved:  # the killed copies' exit files, before the restart clears them
        exit_file = victim.data_dir / "vms" / n / "exit"
        try:
            rnd.fenced_exits.append(exit_file.read_text().strip())
            fenced[n] = exit_file.stat().st_mtime_ns / 1e9 - wall0
        except OSError:
            rnd.fenced_exits.append("no exit file")
    if fenced:
        rnd.fenced_s = max(fenced.values())
    # By the timestamps too: a new copy started before its old copy's shim fenced it.
    for n, start in zip(moved, started, strict=True):
        if start is not None and n in fenced and start - wall0 < fenced[n]:
            rnd.overlaps.append(
                f"{n} started elsewhere {start - wall0:.3f}s after the kill, before its old"
                f" copy was fenced ({fenced[n]:.3f}s)"
            )

    restart = time.monotonic()
    victim.start(ports=False)  # same data dir, no --join: re-attaches to its member
    await victim.wait_healthy()
    await cluster.wait_steady(VM_NAME, timeout_s=120)
    rnd.restart_to_steady_s = time.monotonic() - restart
    return rnd


@dataclass
class RawLeaseRound:
    via: str
    #: From the stop of keepalives (the "kill") and from the last keepalive sent.
    from_stop_s: float
    from_last_keepalive_s: float
    stopped_after_keepalive_s: float


async def raw_lease_round(
    cluster: Cluster, watch: KeyWatch, via: str, index: int, rng: random.Random
) -> RawLeaseRound:
    """etcd's own lease expiry: keepalives every TTL/3 through ``via``'s member, stopped at
    a random point of the period; until a watch on a's member sees the key deleted."""
    store = EtcdStore([cluster.nodes[via].etcd_url])
    try:
        key = f"{watch.prefix}{index}"
        sent = time.monotonic()
        lease = await store.lease_grant(TTL_S)
        await store.put(key, b"raw", lease=lease.id)
        for _ in range(3):  # as NodeRegistration._keepalive does
            await asyncio.sleep(KEEPALIVE_S)
            sent = time.monotonic()
            await store.lease_keepalive(lease.id)
        pause = rng.uniform(0, KEEPALIVE_S)
        await asyncio.sleep(max(0.0, sent + pause - time.monotonic()))
        stop = time.monotonic()
        gone = await watch.deleted_after(key, stop, 3 * TTL_S)
        return RawLeaseRound(via, gone - stop, gone - sent, stop - sent)
    finally:
        await store.close()


async def failover(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    assert cluster.http is not None
    answer = await cluster.http.post("/v1/vms", json=failover_vm())
    if answer.status_code != 201:
        raise BenchError(f"POST /v1/vms answered {answer.status_code}: {answer.text[:300]}")
    await cluster.wait_steady(VM_NAME, timeout_s=60)
    placed = sorted(i["spec"]["node"] for i in await cluster.instances(VM_NAME))
    print(f"  VM {VM_NAME}: {REPLICAS} replicas on {placed}", flush=True)
    watch_store = EtcdStore([cluster.a.etcd_url])
    nodes_watch = KeyWatch(watch_store, NODE_LEASES_PREFIX)
    raw_watch = KeyWatch(watch_store, "/bench/lease/")
    await nodes_watch.start()
    await raw_watch.start()
    rounds: list[FailoverRound] = []
    raws: list[RawLeaseRound] = []
    try:
        for i in range(args.rounds):
            victim = "b" if i % 2 == 0 else "c"
            leader_kill = not args.no_leader_kills and (i // 2) % 2 == 1
            holders = {inst["spec"]["node"] for inst in await cluster.instances(VM_NAME)}
            if victim not in holders:  # the other one of b and c, else re-spread the VM
                other = "c" if victim == "b" else "b"
                if other in holders:
                    victim = other
                else:
                    await respread(cluster)
            for which in ("failover", "raw") if i % 2 == 0 else ("raw", "failover"):
                if which == "raw":
                    raws.append(await raw_lease_round(cluster, raw_watch, victim, i, rng))
                    continue
                rnd = await failover_round(
                    cluster, nodes_watch, victim, leader_kill, rng, args.poll_ms / MS
                )
                rounds.append(rnd)
            print(
                f"  round {i + 1}/{args.rounds}: killed {rnd.victim}"
                f"{' (etcd leader)' if rnd.etcd_leader_killed else ''} with {len(rnd.moved)}"
                f" replicas: detected {fmt(rnd.detected_s)} s, running elsewhere"
                f" {fmt(rnd.elsewhere_s)} s; raw lease expiry {raws[-1].from_stop_s:.3f} s"
                f"{'; OVERLAP' if rnd.overlaps else ''}",
                flush=True,
            )
    finally:
        await nodes_watch.stop()
        await raw_watch.stop()
        await watch_store.close()
    # The VM goes before part 2: its 6 tasks and its records stay out of the API figures.
    await delete_vm(cluster)
    return failover_figures(rounds, raws, args)


async def delete_vm(cluster: Cluster, timeout_s: float = 60) -> None:
    """Delete the failover VM and wait until its instances (so its tasks) are gone."""
    assert cluster.http is not None
    await cluster.http.delete(f"/v1/vms/{VM_NAME}")
    deadline = time.monotonic() + timeout_s
    while await cluster.instances(VM_NAME):
        if time.monotonic() > deadline:
            raise BenchError(f"{VM_NAME}'s instances still there {timeout_s:g} s after delete")
        await asyncio.sleep(0.2)


async def respread(cluster: Cluster) -> None:
    """Delete the VM and create it again, so that spread puts replicas on b and c too."""
    assert cluster.http is not None
    await delete_vm(cluster)
    await cluster.http.post("/v1/vms", json=failover_vm())
    await cluster.wait_steady(VM_NAME, timeout_s=60)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


SEGMENTS = (
    ("keepalive_age_at_kill_s", "(the node's last keepalive was this long before it)"),
    ("etcd_gone_s", "killed node's etcd member gone (PDEATHSIG)"),
    ("fenced_s", "killed copies fenced by their shims (exit file mtime)"),
    ("lease_deleted_s", "liveness key deleted (watch on a's etcd)"),
    ("detected_s", "detected: a's API shows it not alive (poll)"),
    ("reassigned_s", "reassigned by the controller (spec.assigned_at)"),
    ("started_s", "new copies started (status.started_at)"),
    ("elsewhere_s", "running elsewhere: a's API shows all running (poll)"),
    ("old_gone_s", "every old task process gone (/proc poll)"),
)


def failover_figures(
    rounds: list[FailoverRound], raws: list[RawLeaseRound], args: argparse.Namespace
) -> dict[str, Any]:
    def col(rs: Sequence[FailoverRound], key: str) -> list[float]:
        return [v for r in rs if (v := getattr(r, key)) is not None]

    leader = [r for r in rounds if r.etcd_leader_killed]
    follower = [r for r in rounds if not r.etcd_leader_killed]
    detect = col(rounds, "detected_s")
    elsewhere = col(rounds, "elsewhere_s")
    # What separates running elsewhere from the lease's expiry, per round.
    margins = [r.reassigned_s - r.fenced_s for r in rounds if r.reassigned_s and r.fenced_s]
    return {
        "rounds": len(rounds),
        "ttl_s": TTL_S,
        "fence_margin_s": FENCE_MARGIN_S,
        "grace_s": GRACE_S,
        "poll_ms": args.poll_ms,
        "seed": args.seed,
        "detected_s": summary(detect),
        "elsewhere_s": summary(elsewhere),
        "segments_s": {key: summary(col(rounds, key)) for key, _ in SEGMENTS},
        "follower_kills": {
            "detected_s": summary(col(follower, "detected_s")),
            "elsewhere_s": summary(col(follower, "elsewhere_s")),
            "lease_deleted_s": summary(col(follower, "lease_deleted_s")),
        },
        "leader_kills": {
            "detected_s": summary(col(leader, "detected_s")),
            "elsewhere_s": summary(col(leader, "elsewhere_s")),
            "lease_deleted_s": summary(col(leader, "lease_deleted_s")),
        },
        "raw_lease_expiry_s": summary([r.from_stop_s for r in raws]),
        "raw_from_last_keepalive_s": summary([r.from_last_keepalive_s for r in raws]),
        "real_from_last_keepalive_s": summary(
            [
                r.lease_deleted_s + r.keepalive_age_at_kill_s
                for r in follower
                if r.lease_deleted_s is not None and r.keepalive_age_at_kill_s is not None
            ]
        ),
        "detected_minus_key_deleted_s": summary(
            [r.detected_s - r.lease_deleted_s for r in rounds if r.detected_s and r.lease_deleted_s]
        ),
        "reassigned_minus_key_deleted_s": summary(
            [
                r.reassigned_s - r.lease_deleted_s
                for r in rounds
                if r.reassigned_s and r.lease_deleted_s
            ]
        ),
        "started_minus_reassigned_s": summary(
            [r.started_s - r.reassigned_s for r in rounds if r.started_s and r.reassigned_s]
        ),
        "elsewhere_minus_started_s": summary(
            [r.elsewhere_s - r.started_s for r in rounds if r.elsewhere_s and r.started_s]
        ),
        "fence_to_reassign_margin_s": summary(margins),
        "restart_to_steady_s": summary(col(rounds, "restart_to_steady_s")),
        "overlaps": [o for r in rounds for o in r.overlaps],
        "not_fenced": [
            f"round {k + 1}: {e}"
            for k, r in enumerate(rounds)
            for e in r.fenced_exits
            if e != "fenced 9"
        ],
        "detect_goal_met": bool(detect) and percentile(detect, 99) <= DETECT_GOAL_S,
        "elsewhere_goal_met": bool(elsewhere) and percentile(elsewhere, 99) <= ELSEWHERE_GOAL_S,
        "per_round": [r.__dict__ for r in rounds],
        "raw_rounds": [r.__dict__ for r in raws],
    }


# --- part 2: API operations per second ------------------------------------------------


def process_vm(name: str) -> dict[str, Any]:
    return {
        "kind": "VM",
        "metadata": {"name": name},
        "spec": {
            "hypervisor": "process",
            "replicas": 0,
            "memory_mib": "64M",
            "boot": {"command": ["sleep", "3600"]},
        },
    }


def api_request(client: httpx.AsyncClient, op: str, name: str) -> Awaitable[httpx.Response]:
    if op == "create":
        return client.post("/v1/vms", json=process_vm(name))
    if op == "get":
        return client.get(f"/v1/vms/{name}")
    if op in ("stop", "start"):
        return client.post(f"/v1/vms/{name}/{op}")
    return client.delete(f"/v1/vms/{name}")


@dataclass
class Phase:
    ops: int = 0
    elapsed_s: float = 0.0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)
    daemon_cpu_s: float = 0.0
    etcd_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0
    #: etcd's own counters over the phase: ranges served (all members) and raft
    #: proposals committed (every write: put, txn, delete, lease grant).
    ranges: int = 0
    proposals: int = 0

    def add(self, elapsed: float, latencies: list[float], errors: list[str]) -> None:
        self.ops += len(latencies)
        self.elapsed_s += elapsed
        self.latencies += latencies
        self.per_round.append(len(latencies) / elapsed)
        self.errors += len(errors)
        self.first_error = self.first_error or (errors[0] if errors else "")

    def figures(self) -> dict[str, Any]:
        per_op = MS / self.ops if self.ops else 0.0
        return {
            "ops": self.ops,
            "ops_per_s": self.ops / self.elapsed_s if self.elapsed_s else 0.0,
            "ops_per_s_rounds": self.per_round,
            "p50_ms": percentile(self.latencies, 50) * MS,
            "p99_ms": percentile(self.latencies, 99) * MS,
            "errors": self.errors,
            "first_error": self.first_error,
            "daemon_cpu_ms_per_op": self.daemon_cpu_s * per_op,
            "etcd_cpu_ms_per_op": self.etcd_cpu_s * per_op,
            "bench_cpu_ms_per_op": self.bench_cpu_s * per_op,
            "etcd_ranges_per_op": self.ranges / self.ops if self.ops else 0.0,
            "etcd_proposals_per_op": self.proposals / self.ops if self.ops else 0.0,
        }


async def timed(
    count: int, clients: int, call: Callable[[int], Awaitable[str | None]]
) -> tuple[float, list[float], list[str]]:
    """Run ``call(k)`` for k in range(count) with ``clients`` workers."""
    latencies: list[float] = []
    errors: list[str] = []
    queue = iter(range(count))

    async def worker() -> None:
        for k in queue:
            t = time.perf_counter()
            error = await call(k)
            latencies.append(time.perf_counter() - t)
            if error:
                errors.append(error)

    p0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(worker())
    return time.perf_counter() - p0, latencies, errors


async def api_rates(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    n = args.api_ops
    modes = [("sequential", 1), *((f"{c} clients", c) for c in args.clients)]
    most = max(c for _, c in modes)
    api = {(op, mode): Phase() for op in API_OPS for mode, _ in modes}
    raw = {(op, mode): Phase() for op in ("put", "get") for mode, _ in modes}
    nodes = [cluster.nodes[name] for name in NAMES]
    clients = [cluster.client(d, connections=most) for d in nodes]
    stores = [EtcdStore([d.etcd_url]) for d in nodes]
    try:
        # The raw store writes values the size of a stored VM record.
        sample = await clients[0].post("/v1/vms", json=process_vm("sample"))
        if sample.status_code != 201:
            raise BenchError(f"POST /v1/vms answered {sample.status_code}: {sample.text[:300]}")
        stored = await stores[0].range("/blixard/", limit=0)
        vm_values = [kv.value for kv in stored.kvs if kv.key.endswith("/sample")]
        value = vm_values[0] if vm_values else sample.content
        await clients[0].delete("/v1/vms/sample")

        async def measure(phase: Phase) -> Callable[[], Awaitable[None]]:
            r0, p0 = await cluster.etcd_counters()
            d0, e0 = cluster.cpu()
            b0 = time.process_time()

            async def done() -> None:
                d1, e1 = cluster.cpu()
                phase.bench_cpu_s += time.process_time() - b0
                phase.daemon_cpu_s += d1 - d0
                phase.etcd_cpu_s += e1 - e0
                r1, p1 = await cluster.etcd_counters()
                phase.ranges += r1 - r0
                phase.proposals += p1 - p0

            return done

        # The cluster's own background (keepalives, resync passes) with nothing asked of it.
        idle = Phase()
        done = await measure(idle)
        await asyncio.sleep(args.idle)
        await done()
        idle_figures = {
            "seconds": args.idle,
            "daemon_cpu_ms_per_s": idle.daemon_cpu_s * MS / args.idle,
            "etcd_cpu_ms_per_s": idle.etcd_cpu_s * MS / args.idle,
            "etcd_ranges_per_s": idle.ranges / args.idle,
            "etcd_proposals_per_s": idle.proposals / args.idle,
        }

        async def api_phases(r: int, mode: str, conc: int) -> None:
            names = [f"api-{r}-{conc}-{k}" for k in range(n)]
            for op in API_OPS:
                expected = 201 if op == "create" else 200

                async def call(k: int, op: str = op, expected: int = expected) -> str | None:
                    answer = await api_request(clients[k % 3], op, names[k])
                    if answer.status_code != expected:
                        return f"{op} {names[k]}: {answer.status_code} {answer.text[:200]}"
                    return None

                phase = api[(op, mode)]
                done = await measure(phase)
                elapsed, lat, errors = await timed(n, conc, call)
                await asyncio.sleep(args.settle)  # the controller's passes it caused
                await done()
                phase.add(elapsed, lat, errors)

        async def store_phases(r: int, mode: str, conc: int) -> None:
            keys = [f"/bench/api/{r}/{conc}/{k}" for k in range(n)]

            async def put(k: int) -> str | None:
                await stores[k % 3].put(keys[k], value)
                return None

            async def get(k: int) -> str | None:
                found = await stores[k % 3].get(keys[k])
                return None if found is not None else f"{keys[k]} missing"

            for op, call in (("put", put), ("get", get)):
                phase = raw[(op, mode)]
                done = await measure(phase)
                elapsed, lat, errors = await timed(n, conc, call)
                await asyncio.sleep(args.settle)
                await done()
                phase.add(elapsed, lat, errors)

        for r in range(args.api_rounds):
            for mode, conc in modes:
                pair = (api_phases, store_phases) if r % 2 == 0 else (store_phases, api_phases)
                for run in pair:
                    await run(r, mode, conc)
            print(f"  round {r + 1}/{args.api_rounds} done", flush=True)
        await stores[0].delete("/bench/", prefix=True)
    finally:
        for client in clients:
            await client.aclose()
        for store in stores:
            await store.close()
    return {
        "ops_per_phase": n,
        "rounds": args.api_rounds,
        "modes": [mode for mode, _ in modes],
        "value_bytes": len(value),
        "settle_s": args.settle,
        "idle": idle_figures,
        "cores": os.cpu_count() or 1,
        "api": {f"{op} ({mode})": api[(op, mode)].figures() for op in API_OPS for mode, _ in modes},
        "raw_store": {
            f"{op} ({mode})": raw[(op, mode)].figures()
            for op in ("put", "get")
            for mode, _ in modes
        },
    }


# --- report -------------------------------------------------------------------------------------


def report_failover(fo: dict[str, Any]) -> list[str]:
    n = fo["rounds"]
    lines = [
        "",
        f"== failover on a real 3-node cluster ({n} kills, lease TTL {fo['ttl_s']} s, "
        f"API polled every {fo['poll_ms']:g} ms; seconds after the kill) ==",
        f"(p99 by nearest rank: with {n} rounds it is the maximum)",
        f"{'':<48}{'p50':>8}{'p99':>8}{'max':>8}{'min':>8}",
    ]

    def row(label: str, s: dict[str, float]) -> str:
        if not s:
            return f"{label:<48}{'-':>8}"
        return f"{label:<48}{s['p50']:>8.3f}{s['p99']:>8.3f}{s['max']:>8.3f}{s['min']:>8.3f}"

    lines.append(row("detected (all kills)", fo["detected_s"]))
    lines.append(row("running elsewhere (all kills)", fo["elsewhere_s"]))
    lines.append(row("raw: etcd lease expiry, keepalives stopped", fo["raw_lease_expiry_s"]))
    for kind in ("follower_kills", "leader_kills"):
        part = fo[kind]
        if part["detected_s"]:
            label = "etcd follower" if kind == "follower_kills" else "etcd LEADER"
            lines.append(
                row(f"  {label} killed ({part['detected_s']['n']}): detected", part["detected_s"])
            )
            lines.append(row("    running elsewhere", part["elsewhere_s"]))
            lines.append(row("    liveness key deleted (watch)", part["lease_deleted_s"]))
    lines.append(
        f"goal detected <= {DETECT_GOAL_S:g} s at p99: "
        f"{'MET' if fo['detect_goal_met'] else 'MISSED'}; running elsewhere <= "
        f"{ELSEWHERE_GOAL_S:g} s at p99: {'MET' if fo['elsewhere_goal_met'] else 'MISSED'}"
    )
    lines += ["", "timeline of a failover (s after the kill, over the kills)"]
    lines.append(f"{'':<56}{'p50':>8}{'max':>8}{'min':>8}")
    for key, label in SEGMENTS:
        s = fo["segments_s"][key]
        if s:
            lines.append(f"{label:<56}{s['p50']:>8.3f}{s['max']:>8.3f}{s['min']:>8.3f}")
    real = fo["real_from_last_keepalive_s"]
    rawk = fo["raw_from_last_keepalive_s"]

    def med(key: str) -> str:
        s = fo[key]
        return f"{s['p50']:.3f} s (max {s['max']:.3f})" if s else "-"

    m = fo["fence_to_reassign_margin_s"]
    margin = f"min {m['min']:.3f} s, median {m['p50']:.3f} s" if m else "-"

    lines += [
        "",
        "what separates the figures (medians):",
        f"  lease expiry counted from the last keepalive: raw {rawk['p50']:.3f} s"
        + (f", killed followers {real['p50']:.3f} s" if real else "")
        + f" (TTL {TTL_S} s plus etcd's lease check, up to 0.5 s; a killed etcd leader adds"
        " an election and etcd renews every lease on a leader change)",
        f"  detected - key deleted: {med('detected_minus_key_deleted_s')}"
        " (the API's read and the poll period)",
        f"  reassigned - key deleted: {med('reassigned_minus_key_deleted_s')}"
        f" (the controller's failover grace, {GRACE_S:g} s, and its pass)",
        f"  new copies started - reassigned: {med('started_minus_reassigned_s')}"
        " (watch to the agent, its `starting` CAS, the task shim's spawn)",
        f"  running seen - started: {med('elsewhere_minus_started_s')}"
        " (the `running` report and the next poll)",
        f"  safety margin, reassigned - last old copy fenced: {margin}"
        f" (by design at least the {FENCE_MARGIN_S:g} s fencing margin + the {GRACE_S:g} s"
        " grace)",
        f"  restart of the killed node until all {REPLICAS} replicas run again:"
        f" {med('restart_to_steady_s')}",
    ]
    if fo["overlaps"]:
        lines.append("")
        lines.append("!!! SAFETY FAILURE: two copies of a replica overlapped !!!")
        lines += [f"!!!   {o}" for o in fo["overlaps"]]
    else:
        lines.append(
            "safety: in every round the killed node's task processes were gone before"
            " any copy ran elsewhere (no overlap)"
        )
    if fo["not_fenced"]:
        lines.append(f"WARNING: killed copies not ended by their fence: {fo['not_fenced']}")
    lines.append("")
    lines.append(
        f"{'round':<6}{'killed':<14}{'ka age':>8}{'fenced':>8}{'key del':>8}{'detect':>8}"
        f"{'reassign':>9}{'started':>8}{'running':>8}{'replicas':>9}"
    )
    for k, r in enumerate(fo["per_round"]):
        who = r["victim"] + (" (leader)" if r["etcd_leader_killed"] else "")
        age = r["keepalive_age_at_kill_s"]
        lines.append(
            f"{k + 1:<6}{who:<14}{fmt(age):>8}{fmt(r['fenced_s']):>8}"
            f"{fmt(r['lease_deleted_s']):>8}{fmt(r['detected_s']):>8}{fmt(r['reassigned_s']):>9}"
            f"{fmt(r['started_s']):>8}{fmt(r['elsewhere_s']):>8}{len(r['moved']):>9}"
        )
    lines.append("(ka age: time since the node's last keepalive when it was killed)")
    return lines


def report_api(rates: dict[str, Any]) -> list[str]:
    modes = rates["modes"]
    lines = [
        "",
        f"== VM API operations/s on 3-member etcd ({rates['ops_per_phase']} ops per phase, "
        f"{rates['rounds']} rounds, requests spread over the 3 nodes; process VMs, replicas 0) ==",
    ]
    head = f"{'operation':<16}" + "".join(f"{m + ' ops/s':>20}{'p50 ms':>9}" for m in modes)
    lines.append(head)
    for group, ops in (("api", API_OPS), ("raw_store", ("put", "get"))):
        for op in ops:
            label = op if group == "api" else f"raw EtcdStore.{op}"
            cells = ""
            for m in modes:
                f = rates[group][f"{op} ({m})"]
                cells += f"{f['ops_per_s']:>20,.0f}{f['p50_ms']:>9.1f}"
            lines.append(f"{label:<16}{cells}")
            for m in modes:
                f = rates[group][f"{op} ({m})"]
                if f["errors"]:
                    lines.append(f"  {m}: {f['errors']} errors; first: {f['first_error']}")
    lines.append("")
    lines.append("ratio API/raw (ops/s; get against raw get, the writes against raw put):")
    for m in modes:
        ratios = ", ".join(f"{op} {ratio(rates, op, m):.3f}" for op in API_OPS)
        lines.append(f"  {m}: {ratios}")
    best = max(rates["api"][f"{op} ({m})"]["ops_per_s"] for op in API_OPS for m in modes)
    worst = min(max(rates["api"][f"{op} ({m})"]["ops_per_s"] for m in modes) for op in API_OPS)
    lines.append(
        f"goal >= {API_GOAL_OPS:,.0f} ops/s: best operation {best:,.0f}/s, slowest operation at"
        f" its best concurrency {worst:,.0f}/s: {'MET' if worst >= API_GOAL_OPS else 'MISSED'}"
    )
    cores = rates["cores"]
    lines += [
        "",
        "cost per operation: CPU ms of the 3 daemons + the 3 etcd members + this process"
        f" (= total), the rate {cores} cores allow at that cost, and etcd's own counters"
        " (ranges served; raft proposals, i.e. writes)",
        f"{'':<12}{'mode':<12}{'daemons':>8}{'etcd':>7}{'bench':>7}{'total':>7}"
        f"{'cap/s':>7}{'ranges':>8}{'writes':>8}",
    ]
    for group, ops in (("api", API_OPS), ("raw_store", ("put", "get"))):
        for op in ops:
            for k, m in enumerate(modes):
                f = rates[group][f"{op} ({m})"]
                total = (
                    f["daemon_cpu_ms_per_op"] + f["etcd_cpu_ms_per_op"] + f["bench_cpu_ms_per_op"]
                )
                label = "" if k else (op if group == "api" else f"raw {op}")
                lines.append(
                    f"{label:<12}{m:<12}{f['daemon_cpu_ms_per_op']:>8.2f}"
                    f"{f['etcd_cpu_ms_per_op']:>7.2f}{f['bench_cpu_ms_per_op']:>7.2f}{total:>7.2f}"
                    f"{cores * MS / total if total else 0:>7,.0f}"
                    f"{f['etcd_ranges_per_op']:>8.2f}{f['etcd_proposals_per_op']:>8.2f}"
                )
    idle = rates["idle"]
    lines.append(
        f"(CPU over each phase and the {rates['settle_s']:g} s after it, so the controller's"
        f" passes count; idle, the cluster used {idle['daemon_cpu_ms_per_s']:.0f} ms/s of"
        f" daemon CPU and {idle['etcd_cpu_ms_per_s']:.0f} ms/s of etcd CPU,"
        f" {idle['etcd_ranges_per_s']:.1f} ranges/s and"
        f" {idle['etcd_proposals_per_s']:.1f} writes/s; raw values:"
        f" {rates['value_bytes']} bytes, a stored VM record)"
    )
    return lines


def ratio(rates: dict[str, Any], op: str, mode: str) -> float:
    """API ops/s over the raw layer's: get against raw get, the writes against raw put."""
    raw = float(rates["raw_store"][f"{'get' if op == 'get' else 'put'} ({mode})"]["ops_per_s"])
    return float(rates["api"][f"{op} ({mode})"]["ops_per_s"]) / raw


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster",
        description="Failover on a real 3-node cluster beside etcd's lease expiry, "
        "and VM API ops/s on 3-member etcd beside EtcdStore.",
    )
    parser.add_argument("--rounds", type=int, default=8, help="kills (and raw rounds), 8")
    parser.add_argument("--skip-failover", action="store_true", help="only part 2")
    parser.add_argument("--skip-api", action="store_true", help="only part 1")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--poll-ms", type=float, default=50.0, help="API poll interval (50)")
    parser.add_argument(
        "--no-leader-kills",
        action="store_true",
        help="never move etcd's leadership to the node about to be killed",
    )
    parser.add_argument("--seed", type=int, default=1, help="for the random kill points (1)")
    parser.add_argument("--api-ops", type=int, default=192, help="VMs per API phase (192)")
    parser.add_argument("--api-rounds", type=int, default=2, help="API/raw rounds (2)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[16, 64], help="concurrencies (16 64)"
    )
    parser.add_argument("--settle", type=float, default=0.5, help="rest after API phases (s)")
    parser.add_argument("--idle", type=float, default=5.0, help="idle baseline before part 2 (s)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.api_ops < 1 or args.api_rounds < 1 or min(args.clients) < 1:
        parser.error("--rounds, --api-ops, --api-rounds and --clients must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C: asyncio.run's SIGINT handler cancels the main task, whose finally
    # blocks run; outside it, KeyboardInterrupt unwinds through main's cleanup.
    signal.raise_signal(signal.SIGINT)


def cleanup(root: Path, cluster: Cluster) -> None:
    """Stop the daemons, kill every process (and task session) naming our temp dir, rm it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    try:
        for d in cluster.nodes.values():  # all at once: the last members lose quorum together
            d.stop()
        for d in cluster.nodes.values():
            d.wait_stopped(30)
        # Tasks outlive their daemon by design, and etcd members run in sessions of their
        # own: a session leader naming our directory (a task shim, an etcd) goes with its
        # whole group (a shim's workload, `sleep`, does not name it).
        for proc in naming(all_procs(), root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if proc.sid == proc.pid and proc.sid != os.getsid(0):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


async def run(cluster: Cluster, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    t0 = time.monotonic()
    await cluster.form()
    print(f"cluster of {', '.join(NAMES)} formed in {time.monotonic() - t0:.1f} s", flush=True)
    fo: dict[str, Any] = {}
    rates: dict[str, Any] = {}
    try:
        if not args.skip_failover:
            print(f"part 1: failover, {args.rounds} kills beside as many raw lease expiries")
            fo = await failover(cluster, args)
        if not args.skip_api:
            print("part 2: VM API operations per second", flush=True)
            rates = await api_rates(cluster, args)
    finally:
        await cluster.close()
    return fo, rates


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    print("Blixard cluster benchmark: failover and the VM API on 3 real daemons, same run")
    for k, v in env.items():
        print(f"  {k:<7} {v}")
    print(flush=True)
    # Ctrl-C raises KeyboardInterrupt even if our parent ignored SIGINT (`cmd &` in a
    # script), and SIGTERM does the same as Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="blixard-bench-cluster-"))
    cluster = Cluster(root)
    started = time.monotonic()
    try:
        fo, rates = asyncio.run(run(cluster, args))
    except KeyboardInterrupt:
        print("interrupted: stopping the daemons and their tasks", file=sys.stderr)
        return 130
    except (BenchError, BlixardError, httpx.HTTPError) as exc:
        tails = "\n".join(
            f"--- {d.name}.log (tail) ---\n{d.log_tail()}" for d in cluster.nodes.values()
        )
        print(f"benchmark failed: {type(exc).__name__}: {exc}\n{tails}", file=sys.stderr)
        return 1
    finally:
        cleanup(root, cluster)
    env["load_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    env["runtime_s"] = f"{time.monotonic() - started:.0f}"
    lines = report_failover(fo) if fo else []
    lines += report_api(rates) if rates else []
    lines.append(
        f"load average: {env['load']} at the start, {env['load_end']} at the end;"
        f" runtime {env['runtime_s']} s"
    )
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"environment": env, "failover": fo, "api": rates}, indent=2))
    if fo and fo["overlaps"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
