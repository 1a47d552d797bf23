"""VM lifecycle benchmark: Blixard's create->running path beside the raw QEMU it drives.

Run from the repository root::

    .venv/bin/python -m benchmarks.vm [--runs N] [--json]

It starts a real node (``python -m blixard node start`` as a subprocess, SQLite
store, a temporary data dir, a free port on 127.0.0.1) and measures, in the
same run:

1. **create -> running**, interleaved ABBA with the raw layer:

   * ``blixard``: from the ``POST /v1/vms`` call creating a VM with
     ``boot.image=default`` and 256M of memory until ``GET /v1/vms/<name>``
     (polled every ``--poll-ms``, 10 ms by default) reports its instance
     ``running`` and ready for its current assignment. The VM is then deleted
     and the benchmark waits until its QEMU is gone (not timed).
   * ``raw``: the QEMU command line Blixard used (``status.handle["data.argv"]``
     of a Blixard run), with only its run-directory paths and ``-name``
     changed, started directly with :mod:`subprocess`; from exec until the
     guest's ready line appears in its serial console file (read every 1 ms).

   Each Blixard run is cut into segments from the timestamps Blixard itself
   stores (``spec.assigned_at``, the ``starting`` report's ``updated_at``,
   ``status.started_at`` minus the driver's ``boot_s`` for the spawn,
   ``status.started_at``, the ``running`` report's ``updated_at``) and the
   console file's mtime (the guest writes nothing after its ready line), all
   on the host's one clock, so the segments add up to the total. Two side
   measurements explain what the driver's spawn adds: the task shim's
   start-up (first output of ``echo`` under the shim vs exec'd directly) and
   the cost of one ``/proc`` scan for strays.

2. **VM API operations per second** on the node's embedded SQLite store:
   ``create`` (POST /v1/vms, hypervisor ``process``, ``sleep 3600``,
   **replicas 0**: the records and the controller's passes are real, nothing
   is started), ``get`` (GET /v1/vms/<name>), ``stop``, ``start`` (POST
   .../stop|start) and ``delete``, sequentially and with ``--clients``
   (16) concurrent clients, beside the raw store: ``SqliteStore.put`` and
   ``get`` in this process, with the same value size, sequential and 16
   concurrent. API and store phases alternate (ABBA over ``--api-rounds``).
   Side measurements: GET /health on a kept-alive connection vs a new one
   each time (the server's missing TCP_NODELAY shows there), and one VM
   controller pass (``full_pass``, from its cache) in this process over 0, N and 2N VMs.

Everything printed is measured in the run. The node, every QEMU the
benchmark started (and any its node left running) and the temporary
directory are removed at the end, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
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

from blixard.api.vms import new_vm
from blixard.controllers.vms import VmController
from blixard.domain.parse import parse
from blixard.domain.vm import VM
from blixard.drivers import executor
from blixard.images import READY_LINE
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[1]
NODE_ID = "bench"
#: The issue's goal: Blixard's create->running at most this times raw QEMU's exec->ready.
GOAL_RATIO = 1.10
API_OPS = ("create", "get", "stop", "start", "delete")
CLK_TCK = os.sysconf("SC_CLK_TCK")
RAW_POLL_S = 0.001
MS = 1000.0


class BenchError(Exception):
    """The run cannot go on (a node that does not start, a VM that does not boot)."""


# --- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ts(value: str | None) -> float | None:
    """An API timestamp (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(value).timestamp() if value else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "min": min(values),
        "max": max(values),
    }


def read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def wait_for_text(
    path: Path, needle: bytes, *, alive: Callable[[], bool], timeout_s: float
) -> bool:
    """Poll ``path`` every RAW_POLL_S until ``needle`` appears; False if the process ends."""
    deadline = time.perf_counter() + timeout_s
    offset, tail = 0, b""
    while True:
        chunk = read_from(path, offset)
        if chunk:
            offset += len(chunk)
            window = tail + chunk
            if needle in window:
                return True
            tail = window[-len(needle) :]
        if not alive() or time.perf_counter() > deadline:
            return False
        time.sleep(RAW_POLL_S)


def processes_naming(root: Path) -> list[int]:
    """Pids (not ours) whose command line names a path under ``root``."""
    needle = str(root).encode() + b"/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(needle in arg for arg in argv):
            found.append(int(proc.name))
    return found


def environment() -> dict[str, str]:
    try:
        qemu = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        qemu = "not found"
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": str(os.cpu_count()),
        "os": f"Debian {debian}, Linux {platform.release()}",
        "python": platform.python_version(),
        "qemu": qemu,
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


# --- the node -------------------------------------------------------------------------------------


class Node:
    """``blixard node start`` as a subprocess on a free 127.0.0.1 port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "node"
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        config = self.root / "config.toml"  # empty: nothing from /etc/blixard leaks in
        config.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
        for _ in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "blixard", "node", "start"),
                        *("--data-dir", str(self.data_dir), "--node-id", NODE_ID),
                        *("--api-host", "127.0.0.1", "--api-port", str(self.port)),
                        *("--store", "sqlite", "--config", str(config)),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        self.token = (self.data_dir / "admin.token").read_text().strip()
                        return
                time.sleep(0.05)
            else:
                raise BenchError(f"the node was not healthy within {timeout_s:g}s")
            if "already in use" not in self.log_tail():
                raise BenchError(f"the node exited with {self.proc.returncode}")
        raise BenchError("no free API port after 3 attempts")

    def wait_kvm_probe(self, http: httpx.Client, timeout_s: float = 60.0) -> str:
        """Wait until the node's background KVM probe has a verdict (it boots a guest)."""
        deadline = time.monotonic() + timeout_s
        while True:
            detail = http.get(f"/v1/nodes/{NODE_ID}").json()["node"]["status"]["kvm_detail"]
            if not detail.startswith(("not probed yet", "probe running")):
                return str(detail)
            if time.monotonic() > deadline:
                raise BenchError(f"the node's KVM probe did not finish: {detail}")
            time.sleep(0.2)

    def cpu_s(self) -> float:
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid) or 0.0

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- part 1: create -> running ---------------------------------------------------------


@dataclass
class BlixardRun:
    total_s: float
    #: Segment name -> seconds; they add up to total_s.
    segments: dict[str, float]
    boot_s: float
    vm_running_s: float | None
    node_cpu_s: float
    qemu_cpu_s: float | None
    polls: int
    accel: str
    argv: list[str]
    run_dir: str


SEGMENTS = (
    ("api", "API call: POST /v1/vms answered"),
    ("placement", "controller: answered -> instance created and placed"),
    ("pickup", "agent pickup: placed -> `starting` stored"),
    ("prep", "driver prep: `starting` -> QEMU shim spawned"),
    ("boot", "QEMU: shim spawned -> ready line written"),
    ("ready_poll", "driver: ready line written -> seen (10 ms poll)"),
    ("report", "agent: ready -> `running` stored"),
    ("observe", "client: `running` stored -> seen by its poll"),
)


def vm_document(name: str, accel: str) -> dict[str, Any]:
    return {
        "kind": "VM",
        "metadata": {"name": name},
        "spec": {"memory_mib": "256M", "boot": {"image": "default"}, "accel": accel},
    }


def blixard_run(
    node: Node, http: httpx.Client, name: str, accel: str, poll_s: float, timeout_s: float
) -> BlixardRun:
    cpu0 = node.cpu_s()
    wall0 = time.time()
    p0 = time.perf_counter()
    answer = http.post("/v1/vms", json=vm_document(name, accel))
    p1 = time.perf_counter()
    if answer.status_code != 201:
        raise BenchError(f"POST /v1/vms answered {answer.status_code}: {answer.text}")
    starting_at: str | None = None
    polls = 0
    last = "nothing yet"
    while True:
        body = http.get(f"/v1/vms/{name}").json()
        now = time.perf_counter()
        polls += 1
        inst = body["instances"][0] if body.get("instances") else None
        if inst is not None:
            st = inst["status"]
            last = f"{st['state']}: {st['message']}"
            if st["state"] == "starting" and starting_at is None:
                starting_at = st["updated_at"]
            if st["state"] == "failed":
                raise BenchError(f"{name} failed: {st['message']}")
            current = st["node"] == inst["spec"]["node"] and st["epoch"] == inst["spec"]["epoch"]
            if st["state"] == "running" and st["ready"] and current:
                p7 = now
                break
        if now - p0 > timeout_s:
            raise BenchError(f"{name} not running after {timeout_s:g}s; last seen {last}")
        time.sleep(poll_s)
    cpu1 = node.cpu_s()
    handle = st["handle"]
    # The guest writes nothing after its ready line: the console's mtime is when it came.
    written = Path(handle["data.console_log"]).stat().st_mtime_ns / 1e9
    qemu_cpu = None
    with contextlib.suppress(OSError, ValueError):
        qemu_cpu = proc_cpu_s(int(Path(handle["data.pidfile"]).read_text()))
    # The VM's own phase comes one controller pass later: note when it shows.
    vm_running_s = None
    while time.perf_counter() - p7 < 5:
        if body["vm"]["status"]["phase"] == "running":
            vm_running_s = time.perf_counter() - p0
            break
        time.sleep(poll_s)
        body = http.get(f"/v1/vms/{name}").json()

    t0, t1, t7 = wall0, wall0 + (p1 - p0), wall0 + (p7 - p0)
    t2 = ts(inst["spec"]["assigned_at"])
    t3 = ts(starting_at)
    t5 = ts(st["started_at"])
    boot_s = float(handle["data.boot_s"])
    t6 = ts(st["updated_at"])
    assert t2 is not None and t5 is not None and t6 is not None
    t4 = t5 - boot_s
    if t3 is None:  # the `starting` report was never seen by a poll: split nothing
        t3 = t4
    segments = {
        "api": t1 - t0,
        "placement": t2 - t1,
        "pickup": t3 - t2,
        "prep": t4 - t3,
        "boot": written - t4,
        "ready_poll": t5 - written,
        "report": t6 - t5,
        "observe": t7 - t6,
    }
    return BlixardRun(
        total_s=p7 - p0,
        segments=segments,
        boot_s=boot_s,
        vm_running_s=vm_running_s,
        node_cpu_s=cpu1 - cpu0,
        qemu_cpu_s=qemu_cpu,
        polls=polls,
        accel=handle.get("data.accel", "?"),
        argv=json.loads(handle["data.argv"]),
        run_dir=handle["run_dir"],
    )


def delete_and_wait(http: httpx.Client, name: str, run: BlixardRun, timeout_s: float = 60) -> None:
    """Delete the VM and wait until its instance and its QEMU are gone (untimed)."""
    answer = http.delete(f"/v1/vms/{name}")
    if answer.status_code != 200:
        raise BenchError(f"DELETE /v1/vms/{name} answered {answer.status_code}: {answer.text}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = http.get("/v1/instances", params={"vm": name}).json()["items"]
        if not left and not processes_naming(Path(run.run_dir)):
            return
        time.sleep(0.05)
    raise BenchError(f"{name}: its instance or QEMU was still there {timeout_s:g}s after delete")


@dataclass
class RawRun:
    total_s: float
    qemu_cpu_s: float | None
    #: Seen at minus the console's mtime: calibrates the mtime method (1 ms reads here).
    seen_lag_s: float


@dataclass
class RawQemu:
    """The same QEMU command line, run directly; every process kept for the cleanup."""

    template: list[str]
    template_run_dir: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, run_dir: Path) -> list[str]:
        argv = [a.replace(self.template_run_dir, str(run_dir)) for a in self.template]
        if "-name" in argv:
            argv[argv.index("-name") + 1] = "raw"
        return argv

    def run(self, run_dir: Path, timeout_s: float) -> RawRun:
        """From exec to the ready line on the serial console (read every RAW_POLL_S)."""
        run_dir.mkdir(parents=True)
        console = run_dir / "console.log"
        with open(run_dir / "qemu.log", "wb") as log:
            p0 = time.perf_counter()
            proc = subprocess.Popen(
                self.argv(run_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                start_new_session=True,
            )
        self.procs.append(proc)
        ready = wait_for_text(
            console, READY_LINE.encode(), alive=lambda: proc.poll() is None, timeout_s=timeout_s
        )
        took = time.perf_counter() - p0
        seen_at = time.time()
        cpu = proc_cpu_s(proc.pid)
        self.kill(proc)
        if not ready:
            said = (run_dir / "qemu.log").read_text(errors="replace")[-500:]
            raise BenchError(f"raw QEMU showed no ready line within {timeout_s:g}s: {said}")
        lag = seen_at - console.stat().st_mtime_ns / 1e9
        shutil.rmtree(run_dir, ignore_errors=True)
        return RawRun(took, cpu, lag)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)


def normalised(argv: list[str], run_dir: str) -> list[str]:
    out = [a.replace(run_dir, "<run>") for a in argv]
    if "-name" in out:
        out[out.index("-name") + 1] = "<name>"
    return out


def shim_overhead(work: Path, rounds: int) -> dict[str, Any]:
    """First output of ``echo`` started under the task shim vs exec'd directly (ABBA)."""
    shim: list[float] = []
    direct: list[float] = []
    for i in range(rounds):
        for use_shim in (True, False) if i % 2 == 0 else (False, True):
            run = work / f"shim-{i}-{int(use_shim)}"
            run.mkdir(parents=True)
            log = run / "out.log"
            p0 = time.perf_counter()
            if use_shim:
                spawned = executor.spawn(
                    ["/bin/echo", "ready"], log_path=log, exit_path=run / "exit", cwd=run
                )
                seen = wait_for_text(log, b"ready", alive=lambda: True, timeout_s=10)
                took = time.perf_counter() - p0
                asyncio.run(executor.wait_exit(spawned.pid, spawned.start_ticks, run / "exit"))
            else:
                with open(log, "ab") as out:
                    proc = subprocess.Popen(
                        ["/bin/echo", "ready"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=run,
                    )
                seen = wait_for_text(log, b"ready", alive=lambda: True, timeout_s=10)
                took = time.perf_counter() - p0
                proc.wait()
            if not seen:
                raise BenchError("echo printed nothing within 10 s")
            (shim if use_shim else direct).append(took)
            shutil.rmtree(run, ignore_errors=True)
    scans = []
    for _ in range(rounds):
        p0 = time.perf_counter()
        executor.kill_strays(work / "no-such-run-dir")
        scans.append(time.perf_counter() - p0)
    return {
        "shim_first_output_s": summary(shim),
        "direct_first_output_s": summary(direct),
        "proc_scan_s": summary(scans),
        "processes": sum(1 for p in Path("/proc").iterdir() if p.name.isdigit()),
    }


def lifecycle(
    node: Node, http: httpx.Client, root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    timeout_s = args.boot_timeout
    poll_s = args.poll_ms / MS
    raw_root = root / "raw"
    print("part 1: create -> running (warm-up: one untimed run of each)", flush=True)
    warm = blixard_run(node, http, "warmup", args.accel, poll_s, timeout_s)
    delete_and_wait(http, "warmup", warm)
    raw = RawQemu(warm.argv, warm.run_dir)
    try:
        raw.run(raw_root / "warmup", timeout_s)
        blixard: list[BlixardRun] = []
        raws: list[RawRun] = []
        argv_differs = 0
        for i in range(args.runs):
            for which in ("blixard", "raw") if i % 2 == 0 else ("raw", "blixard"):
                time.sleep(args.settle)
                if which == "blixard":
                    name = f"boot-{i}"
                    run = blixard_run(node, http, name, args.accel, poll_s, timeout_s)
                    delete_and_wait(http, name, run)
                    if normalised(run.argv, run.run_dir) != normalised(warm.argv, warm.run_dir):
                        argv_differs += 1
                    blixard.append(run)
                else:
                    raws.append(raw.run(raw_root / f"run-{i}", timeout_s))
            print(
                f"  run {i + 1}/{args.runs}: blixard {blixard[-1].total_s:.3f} s "
                f"(driver boot_s {blixard[-1].boot_s:.3f}), raw {raws[-1].total_s:.3f} s",
                flush=True,
            )
    finally:
        raw.kill_all()
    micro = shim_overhead(root / "micro", max(args.runs, 5))
    totals = [r.total_s for r in blixard]
    raw_s = [r.total_s for r in raws]
    own = [r.total_s - r.segments["boot"] for r in blixard]
    shim = micro["shim_first_output_s"]["median"] - micro["direct_first_output_s"]["median"]
    raw_median = statistics.median(raw_s)
    result: dict[str, Any] = {
        "runs": args.runs,
        "poll_ms": args.poll_ms,
        "accel": sorted({r.accel for r in blixard}),
        "argv": normalised(warm.argv, warm.run_dir),
        "argv_differs_in_runs": argv_differs,
        "blixard_s": summary(totals),
        "raw_s": summary(raw_s),
        "ratio_of_medians": statistics.median(totals) / raw_median,
        "paired_ratios": [b / r for b, r in zip(totals, raw_s, strict=True)],
        "segments_s": {key: summary([r.segments[key] for r in blixard]) for key, _ in SEGMENTS},
        "blixard_outside_boot_s": summary(own),
        "raw_exec_to_written_s": summary([r.total_s - r.seen_lag_s for r in raws]),
        "raw_seen_lag_s": summary([r.seen_lag_s for r in raws]),
        # Does the guest boot slower under Blixard? Its boot segment minus the raw
        # exec -> written of the same ABBA pair.
        "boot_minus_raw_pairs_s": summary(
            [
                b.segments["boot"] - (r.total_s - r.seen_lag_s)
                for b, r in zip(blixard, raws, strict=True)
            ]
        ),
        "driver_boot_s": summary([r.boot_s for r in blixard]),
        # What the ratio would be if the guest's boot took the same time in both runs:
        # Blixard's own time outside QEMU plus the shim's start-up, over the raw median.
        "ratio_same_boot": (raw_median + statistics.median(own) + shim) / raw_median,
        "vm_phase_running_s": summary([r.vm_running_s for r in blixard if r.vm_running_s])
        if all(r.vm_running_s for r in blixard)
        else None,
        "node_cpu_s_per_boot": summary([r.node_cpu_s for r in blixard]),
        "node_cpu_share": summary([r.node_cpu_s / r.total_s for r in blixard]),
        "polls_per_boot": summary([float(r.polls) for r in blixard]),
        "qemu_cpu_s_blixard": summary([r.qemu_cpu_s for r in blixard if r.qemu_cpu_s]),
        "qemu_cpu_s_raw": summary([r.qemu_cpu_s for r in raws if r.qemu_cpu_s]),
        "micro": micro,
        "per_run": [
            {"blixard_s": b.total_s, "raw_s": r.total_s, "segments_s": b.segments}
            for b, r in zip(blixard, raws, strict=True)
        ],
    }
    result["paired_ratio_median"] = statistics.median(result["paired_ratios"])
    result["goal_met"] = result["ratio_of_medians"] <= GOAL_RATIO
    return result


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
    #: The node's CPU over the phase and the rest after it (None: not an API phase).
    node_cpu_s: float | None = None

    def add(self, elapsed: float, latencies: list[float]) -> None:
        self.ops += len(latencies)
        self.elapsed_s += elapsed
        self.latencies += latencies
        self.per_round.append(len(latencies) / elapsed)

    def figures(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "ops_per_s": self.ops / self.elapsed_s,
            "ops_per_s_rounds": self.per_round,
            "p50_ms": percentile(self.latencies, 50) * MS,
            "p99_ms": percentile(self.latencies, 99) * MS,
            "errors": self.errors,
            "first_error": self.first_error,
            "node_cpu_ms_per_op": None
            if self.node_cpu_s is None
            else self.node_cpu_s / self.ops * MS,
        }


async def timed(
    items: Sequence[str], clients: int, call: Callable[[str], Awaitable[str | None]]
) -> tuple[float, list[float], list[str]]:
    """Run ``call`` on every item with ``clients`` workers; elapsed, latencies, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            t = time.perf_counter()
            error = await call(item)
            latencies.append(time.perf_counter() - t)
            if error:
                errors.append(error)

    p0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(worker())
    return time.perf_counter() - p0, latencies, errors


async def connection_check(client: httpx.AsyncClient, n: int) -> dict[str, Any]:
    """GET /health on the kept-alive connection vs on a new connection each time (ABAB).

    A gap of about 40 ms is Linux's delayed ACK meeting Nagle's algorithm on a
    server socket without TCP_NODELAY (see docs/benchmarks.md).
    """
    kept: list[float] = []
    fresh: list[float] = []
    for i in range(n):
        for close in (False, True) if i % 2 == 0 else (True, False):
            headers = {"Connection": "close"} if close else {}
            t = time.perf_counter()
            answer = await client.get("/health", headers=headers)
            (fresh if close else kept).append(time.perf_counter() - t)
            if answer.status_code != 200:
                raise BenchError(f"GET /health answered {answer.status_code}")
    return {"n": n, "keepalive_s": summary(kept), "new_connection_s": summary(fresh)}


async def controller_pass_cost(work: Path, counts: Sequence[int]) -> list[dict[str, float]]:
    """One full VM controller pass in this process over a store holding N VMs.

    The controller decides from its watch-fed cache; a full pass (every
    ``resync_s``, or after a node change) plans every VM, while a pass after
    one VM's change plans only that VM. This measures the full pass from the
    cache, the worst case a write can trigger.
    """
    work.mkdir()
    store = await SqliteStore.open(work / "state.db")
    try:
        objects = ObjectStore(store)
        controller = VmController(store)
        made = 0
        out = []
        for count in counts:
            while made < count:
                await objects.create(new_vm(parse(VM, process_vm(f"vm-{made}"))))
                made += 1
            await controller.full_pass()  # the first pass writes each VM's status
            walls, cpus = [], []
            for _ in range(9):
                c0, t0 = time.process_time(), time.perf_counter()
                await controller.full_pass(reload=False)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            out.append(
                {"vms": count, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
            )
        return out
    finally:
        await store.close()


async def api_rates(node: Node, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n, clients = args.api_ops, args.clients
    modes = (("sequential", 1), (f"{clients} clients", clients))
    api = {(op, mode): Phase(node_cpu_s=0.0) for op in API_OPS for mode, _ in modes}
    raw = {(op, mode): Phase() for op in ("put", "get") for mode, _ in modes}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {node.token}"}
    (root / "raw-store").mkdir()
    store = await SqliteStore.open(root / "raw-store" / "state.db")
    try:
        async with httpx.AsyncClient(
            base_url=node.url, headers=headers, limits=limits, timeout=60
        ) as client:
            # The raw store writes values the size of a stored VM record.
            sample = await client.post("/v1/vms", json=process_vm("sample"))
            value = sample.content
            await client.delete("/v1/vms/sample")

            async def api_phases(r: int, mode: str, conc: int) -> None:
                names = [f"api-{r}-{'s' if conc == 1 else 'c'}-{k}" for k in range(n)]
                for op in API_OPS:
                    expected = 201 if op == "create" else 200

                    async def call(name: str, op: str = op, expected: int = expected) -> str | None:
                        answer = await api_request(client, op, name)
                        if answer.status_code != expected:
                            return f"{op} {name}: {answer.status_code} {answer.text[:200]}"
                        return None

                    cpu0 = node.cpu_s()
                    elapsed, lat, errors = await timed(names, conc, call)
                    await asyncio.sleep(args.settle)  # the controller's passes it caused
                    phase = api[(op, mode)]
                    phase.node_cpu_s = (phase.node_cpu_s or 0.0) + node.cpu_s() - cpu0
                    phase.add(elapsed, lat)
                    phase.errors += len(errors)
                    phase.first_error = phase.first_error or (errors[0] if errors else "")

            async def store_phases(r: int, mode: str, conc: int) -> None:
                keys = [f"/bench/{r}/{conc}/{k}" for k in range(n)]

                async def put(key: str) -> str | None:
                    await store.put(key, value)
                    return None

                async def get(key: str) -> str | None:
                    return None if await store.get(key) is not None else f"{key} missing"

                for op, call in (("put", put), ("get", get)):
                    elapsed, lat, errors = await timed(keys, conc, call)
                    phase = raw[(op, mode)]
                    phase.add(elapsed, lat)
                    phase.errors += len(errors)
                    await asyncio.sleep(args.settle)

            stall = await connection_check(client, 40)
            for r in range(args.api_rounds):
                for mode, conc in modes:
                    pair = (api_phases, store_phases) if r % 2 == 0 else (store_phases, api_phases)
                    for run in pair:
                        await run(r, mode, conc)
                print(f"  round {r + 1}/{args.api_rounds} done", flush=True)
    finally:
        await store.close()
    passes = await controller_pass_cost(root / "controller", (0, n, 2 * n))
    return {
        "ops_per_phase": n,
        "rounds": args.api_rounds,
        "clients": clients,
        "value_bytes": len(value),
        "api": {f"{op} ({mode})": api[(op, mode)].figures() for op in API_OPS for mode, _ in modes},
        "raw_store": {
            f"{op} ({mode})": raw[(op, mode)].figures()
            for op in ("put", "get")
            for mode, _ in modes
        },
        "modes": [mode for mode, _ in modes],
        "connection_check": stall,
        "controller_pass": passes,
    }


# --- report -------------------------------------------------------------------------------------


def report_lifecycle(life: dict[str, Any]) -> list[str]:
    lines = ["", f"== create -> running ({life['runs']} runs each, ABBA, accel {life['accel']}) =="]
    lines.append(f"{'':<34}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}")
    for label, key in (
        ("blixard: POST -> running (s)", "blixard_s"),
        ("raw QEMU: exec -> ready (s)", "raw_s"),
    ):
        s = life[key]
        lines.append(
            f"{label:<34}{s['median']:>9.3f}{s['p90']:>9.3f}{s['min']:>9.3f}{s['max']:>9.3f}"
        )
    ratios = life["paired_ratios"]
    lines.append(
        f"ratio blixard/raw: {life['ratio_of_medians']:.3f}x of medians; per pair median "
        f"{life['paired_ratio_median']:.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}); "
        f"goal <= {GOAL_RATIO:.2f}x: {'MET' if life['goal_met'] else 'MISSED'}"
    )
    lines.append(
        f"if the guest booted equally fast in both (Blixard's time outside QEMU's boot plus the"
        f" shim's start-up, over the raw median): {life['ratio_same_boot']:.3f}x"
    )
    lines += ["", "where Blixard's time goes (ms; each segment's median over the runs)"]
    lines.append(f"{'segment':<52}{'median':>9}{'min':>9}{'max':>9}")
    rows = [(label, life["segments_s"][key]) for key, label in SEGMENTS]
    rows.append(
        ("total outside QEMU's boot (all but `shim spawned ->`)", life["blixard_outside_boot_s"])
    )
    rows.append(("raw QEMU: exec -> ready line written", life["raw_exec_to_written_s"]))
    for label, s in rows:
        lines.append(
            f"{label:<52}{s['median'] * MS:>9.1f}{s['min'] * MS:>9.1f}{s['max'] * MS:>9.1f}"
        )
    micro = life["micro"]
    shim = micro["shim_first_output_s"]["median"] - micro["direct_first_output_s"]["median"]
    pairs = life["boot_minus_raw_pairs_s"]
    lines.append(
        f"QEMU's boot under Blixard minus raw, per ABBA pair: median {pairs['median'] * MS:+.0f} ms"
        f" (min {pairs['min'] * MS:+.0f}, max {pairs['max'] * MS:+.0f})"
    )
    cpu_b, cpu_r = life["qemu_cpu_s_blixard"]["median"], life["qemu_cpu_s_raw"]["median"]
    lines += [
        f"ready line written -> seen by the raw run's 1 ms reads (mtime check):"
        f" {life['raw_seen_lag_s']['median'] * MS:.1f} ms median",
        f"task shim start-up: first output {micro['shim_first_output_s']['median'] * MS:.1f} ms"
        f" under the shim vs {micro['direct_first_output_s']['median'] * MS:.1f} ms exec'd"
        f" directly ({shim * MS:+.1f} ms)",
        f"one /proc scan for strays ({micro['processes']} processes, done at every start):"
        f" {micro['proc_scan_s']['median'] * MS:.1f} ms",
        f"node CPU during a boot: {life['node_cpu_s_per_boot']['median']:.3f} s"
        f" ({life['node_cpu_share']['median'] * 100:.0f}% of one core;"
        f" {life['polls_per_boot']['median']:.0f} client polls)",
        f"QEMU CPU until ready: blixard {cpu_b:.2f} s, raw {cpu_r:.2f} s (medians)",
    ]
    if life["vm_phase_running_s"]:
        lines.append(
            f"VM phase `running` (controller's summary) seen after "
            f"{life['vm_phase_running_s']['median']:.3f} s (median)"
        )
    if life["argv_differs_in_runs"]:
        lines.append(f"WARNING: the QEMU argv differed in {life['argv_differs_in_runs']} runs")
    return lines


def report_api(rates: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"== VM API operations/s, SQLite store ({rates['ops_per_phase']} ops per phase, "
        f"{rates['rounds']} rounds; process VMs, replicas 0) ==",
    ]
    seq, conc = rates["modes"]
    lines.append(
        f"{'operation':<20}{seq + ' ops/s':>17}{'p50 ms':>8}{'CPU ms':>8}"
        f"{conc + ' ops/s':>18}{'p50 ms':>8}{'CPU ms':>8}{'errors':>8}"
    )
    for group, ops in (("api", API_OPS), ("raw_store", ("put", "get"))):
        for op in ops:
            a, b = rates[group][f"{op} ({seq})"], rates[group][f"{op} ({conc})"]
            label = op if group == "api" else f"raw SqliteStore.{op}"
            cpu_a, cpu_b = a["node_cpu_ms_per_op"], b["node_cpu_ms_per_op"]
            lines.append(
                f"{label:<20}{a['ops_per_s']:>17,.0f}{a['p50_ms']:>8.2f}"
                f"{'-' if cpu_a is None else f'{cpu_a:.2f}':>8}"
                f"{b['ops_per_s']:>18,.0f}{b['p50_ms']:>8.2f}"
                f"{'-' if cpu_b is None else f'{cpu_b:.2f}':>8}{a['errors'] + b['errors']:>8}"
            )
            for f in (a, b):
                if f["first_error"]:
                    lines.append(f"  first error: {f['first_error']}")
    lines.append(
        f"(CPU ms = the node's CPU per operation, the controller's passes included; raw store"
        f" values: {rates['value_bytes']} bytes, the size of a stored VM)"
    )
    passes = ", ".join(f"{p['vms']} VMs {p['cpu_s'] * MS:.1f} ms" for p in rates["controller_pass"])
    lines.append(
        f"one full VM controller pass (from its cache, CPU, in-process SqliteStore): {passes}"
    )
    check = rates["connection_check"]
    lines.append(
        f"GET /health, {check['n']} each, ABAB: {check['keepalive_s']['median'] * MS:.1f} ms"
        f" median on a kept-alive connection, {check['new_connection_s']['median'] * MS:.1f} ms"
        " on a new connection each time"
    )
    return lines


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vm",
        description="Blixard VM lifecycle (create->running beside raw QEMU) and VM API ops/s.",
    )
    parser.add_argument("--runs", type=int, default=7, help="boots of each kind (default 7)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--accel", choices=("auto", "tcg"), default="auto", help="VM spec.accel")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="API poll interval (10)")
    parser.add_argument("--settle", type=float, default=0.5, help="rest before each run (s)")
    parser.add_argument("--boot-timeout", type=float, default=60.0, help="per boot (s)")
    parser.add_argument("--api-ops", type=int, default=100, help="VMs per API phase (100)")
    parser.add_argument("--api-rounds", type=int, default=3, help="API/store rounds (3)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--skip-api", action="store_true", help="only part 1")
    parser.add_argument("--skip-boot", action="store_true", help="only part 2")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.api_ops < 1 or args.api_rounds < 1 or args.clients < 1:
        parser.error("--runs, --api-ops, --api-rounds and --clients must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally that stops everything


def cleanup(root: Path, node: Node) -> None:
    """Stop the node, kill every process naming our temp dir (QEMUs, shims), remove it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    try:
        node.stop()
        for pid in processes_naming(root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    print("Blixard VM lifecycle benchmark: Blixard beside raw QEMU and the raw store, same run")
    for k, v in env.items():
        print(f"  {k:<7} {v}")
    print(flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="blixard-bench-vm-"))
    node = Node(root)
    life: dict[str, Any] = {}
    rates: dict[str, Any] = {}
    kvm = ""
    try:
        node.start()
        with httpx.Client(
            base_url=node.url, headers={"Authorization": f"Bearer {node.token}"}, timeout=30
        ) as http:
            kvm = node.wait_kvm_probe(http)
            print(f"node up on {node.url}; KVM probe: {kvm}", flush=True)
            if not args.skip_boot:
                life = lifecycle(node, http, root, args)
        if not args.skip_api:
            print("part 2: VM API operations per second", flush=True)
            rates = asyncio.run(api_rates(node, root, args))
    except KeyboardInterrupt:
        print("interrupted: stopping the node and its VMs", file=sys.stderr)
        return 130
    except (BenchError, httpx.HTTPError) as exc:
        print(
            f"benchmark failed: {exc}\n--- node log (tail) ---\n{node.log_tail()}", file=sys.stderr
        )
        return 1
    finally:
        cleanup(root, node)
    env["load_end"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    lines = report_lifecycle(life) if life else []
    lines += report_api(rates) if rates else []
    lines.append(f"load average: {env['load']} at the start, {env['load_end']} at the end")
    print("\n".join(lines))
    if args.json:
        doc = {"environment": env, "kvm_probe": kvm, "goal_ratio": GOAL_RATIO}
        doc |= {"lifecycle": life, "api": rates}
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
