"""Real `blixard node start` daemons on 127.0.0.1 for cluster tests and benchmarks.

Each :class:`Daemon` has its own API and etcd ports and data dir; a
:class:`Cluster` drives them through the CLI and the HTTP API as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.etcd_cluster import free_port

BLIXARD = [sys.executable, "-m", "blixard"]
# Short leases so a killed node is seen down in ~2 s; short store timeouts so the last
# members' shutdown (which loses quorum) stays quick; no guest image build.
CONFIG = """
[store]
lease_ttl_s = 2
timeout_s = 3
[microvm]
build_default_image = false
[functions]
runtimes = ["nix", "command"]
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
    return {**env, "BLIXARD_ACCEL": "tcg"}


@dataclass
class Daemon:
    """One `blixard node start` process with its own ports and data dir."""

    name: str
    base: Path
    config: Path
    api_port: int = field(default_factory=free_port)
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self, *extra: str, ports: bool = True) -> None:
        args = ["node", "start", "--node-id", self.name, "--data-dir", str(self.data_dir)]
        args += ["--api-port", str(self.api_port), "--config", str(self.config)]
        args += ["--gateway-port", str(self.gateway_port)]
        if ports:
            args += ["--etcd-client-port", str(self.client_port)]
            args += ["--etcd-peer-port", str(self.peer_port)]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [*BLIXARD, *args, *extra],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )

    def wait_healthy(self, timeout_s: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log.read_text()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never became healthy: {self.log.read_text()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop in {timeout_s}s") from None

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    base: Path
    config: Path
    nodes: dict[str, Daemon] = field(default_factory=dict)

    def daemon(self, name: str) -> Daemon:
        if name not in self.nodes:
            self.nodes[name] = Daemon(name, self.base, self.config)
        return self.nodes[name]

    @property
    def a(self) -> Daemon:
        return self.nodes["a"]

    def join_token(self) -> str:
        return (self.a.data_dir / "join.token").read_text().strip()

    def cli(self, *args: str, api: Daemon | None = None) -> subprocess.CompletedProcess[str]:
        """The CLI as a user on node a's machine runs it (a's admin token)."""
        env = {**_env(), "BLIXARD_DATA_DIR": str(self.a.data_dir)}
        target = api or self.a
        return subprocess.run(
            [*BLIXARD, *args, "--api", target.url],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip

    def cli_json(self, *args: str, api: Daemon | None = None) -> Any:
        res = self.cli(*args, "-o", "json", api=api)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def get(self, path: str) -> Any:
        """A read straight from a's API (cheaper than the CLI, for checks)."""
        resp = self.call("GET", path)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = (self.a.data_dir / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, self.a.url + path, headers=headers, timeout=10, **kwargs)

    def delete_vm(self, name: str) -> None:
        """Delete a VM and wait until its instances (and so their tasks) are gone."""
        self.call("DELETE", f"/v1/vms/{name}")
        wait_until(
            lambda: not [i for i in self.get("/v1/instances")["items"] if i["spec"]["vm"] == name],
            what=f"{name}'s instances to go",
        )

    def members(self) -> list[str]:
        return sorted(m["name"] for m in self.get("/v1/cluster")["members"])

    def node_names(self) -> list[str]:
        return sorted(i["node"]["metadata"]["name"] for i in self.get("/v1/cluster/nodes")["items"])

    def alive(self) -> dict[str, bool]:
        items = self.get("/v1/cluster/nodes")["items"]
        return {i["node"]["metadata"]["name"]: i["alive"] for i in items}


def wait_until(check: Any, timeout_s: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
