"""Serverless functions: the gateway beside the handler called directly, cold against warm.

Run from the repository root::

    .venv/bin/python -m benchmarks.functions [--calls N] [--rounds R] [--clients C]
        [--cold-rounds K] [--microvm-rounds M | --no-microvm] [--json]

It starts a real node (``python -m blixard node start``, SQLite store, the
``nix`` and ``command`` runtimes, a temporary data dir, free ports on
127.0.0.1) and measures, in the same run:

1. **Warm invocation latency** (p50, p99 over ``--rounds`` x ``--calls``,
   rounds interleaved ABBA so load drift hits every variant alike), for a
   ``command`` handler (``/bin/cat``: the event is the answer) and the design
   brief's ``nix`` example:

   * ``api``: ``POST /v1/functions/<f>/invoke`` on the node's API (token,
     kept-alive connection), a warm worker;
   * ``trigger``: the same through an HTTP trigger on the gateway port;
   * ``direct``: the same runtime's worker called in this process
     (``start_worker`` once, then ``invoke``): the handler with the
     pre-spawned process, without the gateway; **the raw layer of the goal**
     (gateway at most +1 ms at p50);
   * ``exec``: the handler run the plain way, one process per call
     (``subprocess`` with the event on stdin), for scale.

2. **Throughput** with ``--clients`` concurrent callers for ``--calls`` calls
   each: through the API (one kept-alive connection per caller) against the
   direct worker with as many slots.

3. **Cold against warm start** per runtime: ``--cold-rounds`` times a new
   function (``min_instances`` 0) is created and invoked once (a cold start:
   the gateway places a worker, the host starts it, the call runs; checked
   with ``X-Blixard-Cold-Start``), then 5 warm calls; deleted after.
   Goal: warm at most 10 % of cold.

4. **microVM**: ``benchmarks.functions_microvm.run``: first answer of a cold
   start from a boot against from the template's saved state (goal: under
   100 ms at p50 here), and warm calls on one VM.

Every figure printed is measured in the run; the node and every process it
started are stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from blixard.domain.function import FunctionSpec
from blixard.domain.parse import parse
from blixard.functions.command import CommandRuntime
from blixard.functions.nix import NixRuntime
from blixard.functions.runtime import Runtime, Worker

NIX = (
    '{ event, context }: { statusCode = 200; body = "Hello from NixOS serverless! '
    'Event: ${event.type}"; }'
)
EVENT = {"type": "ping"}


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(pct(values, 0.5) * 1000, 3),
        "p99": round(pct(values, 0.99) * 1000, 3),
        "mean": round(statistics.fmean(values) * 1000, 3),
    }


class Node:
    """One node daemon for the benchmark."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.api_port, self.gateway_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        config = base / "config.toml"
        config.write_text(
            '[microvm]\nbuild_default_image = false\n[functions]\nruntimes = ["nix", "command"]\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
        env.update(BLIXARD_DATA_DIR=str(base / "data"), BLIXARD_ACCEL="tcg")
        self.log = open(base / "node.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blixard", "node", "start", "--node-id", "bench",
             "--api-port", str(self.api_port), "--gateway-port", str(self.gateway_port),
             "--config", str(config)],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the node exited: see {base / 'node.log'}")
            try:
                if httpx.get(self.api + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        token = (base / "data" / "admin.token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = httpx.Client(base_url=self.api, headers=self.headers, timeout=120)

    def create(self, name: str, spec: dict[str, Any]) -> None:
        resp = self.client.post("/v1/functions", json={"metadata": {"name": name}, "spec": spec})
        if resp.status_code != 201:
            raise SystemExit(f"cannot create {name}: {resp.text}")

    def delete(self, name: str) -> None:
        self.client.delete(f"/v1/functions/{name}")

    def invoke(self, name: str, body: bytes) -> httpx.Response:
        resp = self.client.post(f"/v1/functions/{name}/invoke", content=body)
        if resp.status_code != 200:
            raise SystemExit(f"{name} answered {resp.status_code}: {resp.text}")
        return resp

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@contextmanager
def running_node() -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(prefix="blixard-fnbench-"))
    node = Node(base)
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


def timed(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        out.append(time.perf_counter() - began)
    return out


class Direct:
    """A runtime's worker in this process, driven by its own event loop (the raw layer)."""

    def __init__(self, runtime: Runtime, spec: FunctionSpec, work: Path) -> None:
        self.loop = asyncio.new_event_loop()
        work.mkdir(parents=True, exist_ok=True)
        self.worker: Worker = self.loop.run_until_complete(
            runtime.start_worker("direct", spec, work)
        )

    def call(self, body: bytes) -> None:
        self.loop.run_until_complete(self.worker.invoke(body, {"requestId": "b"}, 30))

    def concurrent(self, body: bytes, clients: int, calls: int) -> float:
        async def one() -> None:
            for _ in range(calls):
                await self.worker.invoke(body, {"requestId": "b"}, 30)

        async def all_of() -> float:
            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(clients)))
            return time.perf_counter() - began

        return self.loop.run_until_complete(all_of())

    def close(self) -> None:
        self.loop.run_until_complete(self.worker.close())
        self.loop.close()


def api_throughput(node: Node, name: str, body: bytes, clients: int, calls: int) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(
            base_url=node.api, headers=node.headers, timeout=120,
            limits=httpx.Limits(max_connections=clients),
        ) as client:  # fmt: skip

            async def one() -> None:
                for _ in range(calls):
                    resp = await client.post(f"/v1/functions/{name}/invoke", content=body)
                    assert resp.status_code == 200, resp.text

            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(clients)))
            return time.perf_counter() - began

    return asyncio.run(run())


def warm_latency(node: Node, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    body = json.dumps(EVENT).encode()
    cases = {
        "command": (
            {"runtime": "command", "handler": "/bin/cat", "min_instances": 1,
             "target_concurrency": args.clients, "max_concurrency": 1000},
            CommandRuntime(),
            ["/bin/cat"],
        ),
        "nix": (
            {"runtime": "nix", "handler": NIX, "min_instances": 1,
             "target_concurrency": args.clients, "max_concurrency": 1000},
            NixRuntime(),
            None,
        ),
    }  # fmt: skip
    out: dict[str, Any] = {}
    gateway = httpx.Client(base_url=node.gateway, timeout=120)
    for runtime_name, (spec, runtime, given_argv) in cases.items():
        name = f"warm-{runtime_name}"
        trigger = f"/bench/{runtime_name}"
        node.create(name, {**spec, "triggers": [{"type": "http", "path": trigger}]})
        node.invoke(name, body)  # the first call may be cold
        direct = Direct(runtime, parse(FunctionSpec, spec), work / runtime_name)
        direct.call(body)
        exec_argv = given_argv
        if exec_argv is None:
            nix_file = work / "h.nix"
            nix_file.write_text(NIX)
            expr = (
                f"(import {nix_file}) {{ event = builtins.fromJSON "
                '(builtins.readFile "/dev/stdin"); context = {}; }'
            )
            exec_argv = ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr]
        variants: dict[str, Callable[[], Any]] = {
            "api": lambda n=name: node.invoke(n, body),
            "trigger": lambda t=trigger: gateway.post(t, content=body),
            "direct": lambda d=direct: d.call(body),
            "exec": lambda a=exec_argv: subprocess.run(
                a, input=body, capture_output=True, check=True
            ),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for r in range(args.rounds):
            for key in order if r % 2 == 0 else reversed(order):
                calls = args.calls if key != "exec" or runtime_name != "nix" else args.calls // 5
                samples[key] += timed(variants[key], max(1, calls))
        figures = {k: ms(v) for k, v in samples.items()}
        p50 = {k: v["p50"] for k, v in figures.items()}
        figures["gateway_minus_direct_p50_ms"] = round(p50["api"] - p50["direct"], 3)
        figures["trigger_minus_direct_p50_ms"] = round(p50["trigger"] - p50["direct"], 3)
        total = api_throughput(node, name, body, args.clients, args.calls)
        direct_total = direct.concurrent(body, args.clients, args.calls)
        n = args.clients * args.calls
        figures["throughput"] = {
            "clients": args.clients,
            "api_per_s": round(n / total, 1),
            "direct_per_s": round(n / direct_total, 1),
        }
        direct.close()
        node.delete(name)
        out[runtime_name] = figures
    gateway.close()
    return out


def cold_vs_warm(node: Node, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    body = json.dumps(EVENT).encode()
    out: dict[str, Any] = {}
    specs = {
        "command": {"runtime": "command", "handler": "/bin/cat"},
        "nix": {"runtime": "nix", "handler": NIX},
    }
    for runtime_name, spec in specs.items():
        cold: list[float] = []
        warm: list[float] = []
        for i in range(args.cold_rounds):
            name = f"cold-{runtime_name}-{i}"
            node.create(name, spec)
            began = time.perf_counter()
            first = node.invoke(name, body)
            cold.append(time.perf_counter() - began)
            if first.headers.get("X-Blixard-Cold-Start") != "true":
                raise SystemExit(f"{name}: the first call was not a cold start")
            warm += timed(lambda n=name: node.invoke(n, body), 5)
            node.delete(name)
        c, w = ms(cold), ms(warm)
        out[runtime_name] = {
            "cold": c,
            "warm": w,
            "warm_over_cold_p50": round(w["p50"] / c["p50"], 4) if c["p50"] else None,
        }
    del scratch
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cold-rounds", type=int, default=10)
    parser.add_argument("--microvm-rounds", type=int, default=10)
    parser.add_argument("--no-microvm", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "host": {
            "cpus": os.cpu_count(),
            "load": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    work = Path(tempfile.mkdtemp(prefix="blixard-fnbench-direct-"))
    try:
        with running_node() as node:
            result["warm"] = warm_latency(node, args, work)
            result["cold_vs_warm"] = cold_vs_warm(node, args, work)
        if not args.no_microvm:
            from benchmarks.functions_microvm import run  # noqa: PLC0415

            result["microvm"] = asyncio.run(run(rounds=args.microvm_rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["host"]["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    report(result)


def report(result: dict[str, Any]) -> None:
    host = result["host"]
    print(f"functions benchmark, {result['started']}, {host['cpus']} CPUs, "
          f"load {host['load']:.1f} -> {host['load_after']:.1f}")  # fmt: skip
    for runtime_name, figures in result["warm"].items():
        print(f"\nwarm invocation latency, {runtime_name} (ms)")
        print(f"  {'variant':<9} {'n':>6} {'p50':>9} {'p99':>9} {'mean':>9}")
        for key in ("api", "trigger", "direct", "exec"):
            f = figures[key]
            print(f"  {key:<9} {f['n']:>6} {f['p50']:>9.3f} {f['p99']:>9.3f} {f['mean']:>9.3f}")
        print(f"  gateway (api) - direct at p50: {figures['gateway_minus_direct_p50_ms']:+.3f} ms "
              f"(goal: at most +1 ms); trigger - direct: "
              f"{figures['trigger_minus_direct_p50_ms']:+.3f} ms")  # fmt: skip
        t = figures["throughput"]
        print(f"  throughput, {t['clients']} clients: api {t['api_per_s']}/s, "
              f"direct {t['direct_per_s']}/s")  # fmt: skip
    print("\ncold against warm start, through the API (ms)")
    for runtime_name, f in result["cold_vs_warm"].items():
        print(f"  {runtime_name:<8} cold p50 {f['cold']['p50']:.1f} p99 {f['cold']['p99']:.1f}; "
              f"warm p50 {f['warm']['p50']:.2f} p99 {f['warm']['p99']:.2f}; "
              f"warm/cold {f['warm_over_cold_p50']:.1%} (goal <= 10%)")  # fmt: skip
    if "microvm" in result:
        print("\nmicroVM (benchmarks.functions_microvm):")
        print(json.dumps(result["microvm"], indent=2))


if __name__ == "__main__":
    main()
