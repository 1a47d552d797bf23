"""`blixard node start` as a user runs it: a real daemon process, real HTTP, real SQLite."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from blixard.domain.keys import NODE_LEASES_PREFIX
from blixard.domain.node import Node
from blixard.store.objects import ObjectStore
from blixard.store.sqlite import SqliteStore
from tests.support.etcd_cluster import EtcdCluster, free_port

ROOT = Path(__file__).resolve().parents[2]
BLIXARD = [sys.executable, "-m", "blixard"]


def start_node(
    data_dir: Path, port: int, *extra: str, node_id: str = "n1", accel: str = "tcg"
) -> subprocess.Popen[str]:
    """A node; TCG-only unless asked, so it spends no CPU on a KVM probe."""
    args = ["node", "start", "--data-dir", str(data_dir), "--api-port", str(port)]
    if "--gateway-port" not in extra:
        args += ["--gateway-port", str(free_port())]
    return subprocess.Popen(
        [*BLIXARD, *args, "--node-id", node_id, *extra],
        env={**os.environ, "BLIXARD_ACCEL": accel},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_health(port: int, proc: subprocess.Popen[str], timeout_s: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"node exited with {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            if resp.status_code == 200:
                return resp
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("node never became healthy")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    port = free_port()
    proc = start_node(tmp_path / "data", port)
    yield proc, port, tmp_path / "data"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLIXARD, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_node_starts_on_embedded_store_and_stops_cleanly(
    node: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, data_dir = node
    body = wait_health(port, proc).json()
    assert body["status"] == "ok" and body["node"] == "n1" and body["registered"] is True
    assert body["store"]["backend"] == "sqlite"
    assert body["store"]["path"] == str(data_dir / "state.db")
    assert body["store"]["revision"] >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]

    async def stored() -> tuple[Node, int]:
        store = await SqliteStore.open(data_dir / "state.db")
        try:
            record = await ObjectStore(store).get(Node, "n1")
            live = await store.range(NODE_LEASES_PREFIX)
            return record, len(live.kvs)
        finally:
            await store.close()

    record, live_keys = asyncio.run(stored())
    # vCPUs are offered with the default overcommit of 4 per host CPU; memory is not.
    assert record.status.ready and record.status.capacity.vcpus == 4 * (os.cpu_count() or 1)
    # systemd: services' units, run as processes here (no systemd as PID 1; docs/services.md).
    assert {h.value for h in record.status.hypervisors} == {"qemu", "process", "systemd"}
    assert record.status.capacity.memory_mib > 0
    assert record.spec.api_url == f"http://127.0.0.1:{port}"
    assert live_keys == 0  # a clean stop revoked the liveness lease


def test_node_restarts_after_sigkill_on_same_data(
    node: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, data_dir = node
    first = wait_health(port, proc).json()["store"]["revision"]
    proc.kill()
    proc.wait()
    again = start_node(data_dir, port)
    try:
        body = wait_health(port, again).json()
        assert body["status"] == "ok" and body["store"]["revision"] > first
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=10) == 0


def test_second_node_on_same_data_dir_is_refused(
    node: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, data_dir = node
    wait_health(port, proc)
    res = run_cli("node", "start", "--data-dir", str(data_dir), "--api-port", str(free_port()))
    assert res.returncode == 1
    assert "in use by another process" in res.stderr and "Traceback" not in res.stderr


def test_port_in_use_is_a_clear_error(
    node: tuple[subprocess.Popen[str], int, Path], tmp_path: Path
) -> None:
    proc, port, _ = node
    wait_health(port, proc)
    res = run_cli("node", "start", "--data-dir", str(tmp_path / "other"), "--api-port", str(port))
    assert res.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "other" / "state.db").exists()  # nothing half-created


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--node-id", "Bad_Name"], "node_id"),
        (["--node-id", "-x"], "node_id"),
        (["--api-port", "70000"], "api_port"),
        (["--api-port", "0"], "api_port"),
        (["--store", "zookeeper"], "store"),
        (["--etcd-endpoints", "127.0.0.1:2379"], "etcd_endpoints"),
    ],
)
def test_bad_flags_name_the_field(tmp_path: Path, args: list[str], field: str) -> None:
    res = run_cli("node", "start", "--data-dir", str(tmp_path / "d"), *args)
    assert res.returncode == 2, res.stderr
    assert field in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists()


def test_bad_environment_variable_names_the_field(tmp_path: Path) -> None:
    env = {**os.environ, "BLIXARD_API_PORT": "not-a-port"}
    res = subprocess.run(
        [*BLIXARD, "node", "start", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "api_port" in res.stderr and "Traceback" not in res.stderr


def test_node_on_etcd(etcd1: EtcdCluster, tmp_path: Path) -> None:
    port = free_port()
    proc = start_node(tmp_path / "data", port, "--etcd-endpoints", etcd1.endpoints[0], node_id="e1")
    try:
        body = wait_health(port, proc).json()
        assert body["store"]["backend"] == "etcd" and body["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_quickstart_script_runs_a_healthy_node(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BLIXARD_DATA_DIR": str(tmp_path / "qs"),
        "BLIXARD_API_PORT": str(free_port()),
        "BLIXARD_GATEWAY_PORT": str(free_port()),  # 7480 may be taken by a node of the user's
    }
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "quickstart.sh"), "--once"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert '"status":"ok"' in res.stdout and '"backend":"sqlite"' in res.stdout
    # It boots a real microVM and shows its state and its ready line.
    assert "demo-0" in res.stdout and "running" in res.stdout
    assert "blixard-guest: ready" in res.stdout
    assert "deleted" in res.stdout
