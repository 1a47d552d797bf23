"""The VM lifecycle as a user types it: the CLI against a running node, real QEMU microVMs (TCG).

One node serves the whole module (it builds the default guest image once);
every test uses VMs of its own names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_node_start import wait_health
from tests.support.etcd_cluster import free_port

BLIXARD = [sys.executable, "-m", "blixard"]
READY = "blixard-guest: ready"


@dataclass
class RunningNode:
    data_dir: Path
    port: int
    proc: subprocess.Popen[str]
    env: dict[str, str]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *BLIXARD,
                *("node", "start", "--node-id", "e2e", "--api-port", str(self.port)),
                *("--gateway-port", str(free_port())),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir.parent / "node.log", "a"),  # noqa: SIM115
            text=True,
        )
        wait_health(self.port, self.proc, timeout_s=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BLIXARD, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        res = self.cli(*args)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        assert "Traceback" not in res.stderr
        return res.stdout

    def status(self, vm: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ok("vm", "status", vm, "-o", "json"))
        return data


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    base = tmp_path_factory.mktemp("e2e")
    data_dir = base / "data"
    env = {**os.environ, "BLIXARD_DATA_DIR": str(data_dir)}
    env.pop("BLIXARD_API", None)
    env.pop("BLIXARD_TOKEN", None)
    n = RunningNode(data_dir, free_port(), None, env)  # type: ignore[arg-type]
    n.start()
    yield n
    for vm in json.loads(n.ok("vm", "list", "-o", "json")).get("items", []):
        n.cli("vm", "delete", vm["vm"]["metadata"]["name"])
    n.stop()


def until(what: str, check: Callable[[], Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last saw {last!r}")


def instance(status: dict[str, Any], index: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = next(i for i in status["instances"] if i["spec"]["index"] == index)
    return found


def qemu_pid(node: RunningNode, vm: str) -> int:
    """The qemu process of ``vm``'s first replica: the task shim's only child."""
    shim = int(instance(node.status(vm))["status"]["handle"]["pid"])
    children = Path(f"/proc/{shim}/task/{shim}/children").read_text().split()
    assert len(children) == 1
    return int(children[0])


def qemu_processes(run_dir: Path) -> int:
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if (
            argv
            and argv[0].endswith(b"qemu-system-x86_64")
            and any(str(run_dir).encode() + b"/" in a for a in argv)
        ):
            count += 1
    return count


def test_create_shows_running_and_the_ready_line(node: RunningNode) -> None:
    out = node.ok("vm", "create", "web", "--image", "default", "--memory", "256M")
    assert "web" in out
    status = node.status("web")
    inst = instance(status)
    assert inst["status"]["state"] == "running" and inst["status"]["ready"] is True
    assert inst["spec"]["node"] == "e2e"
    assert READY in node.ok("vm", "logs", "web")
    listed = yaml.safe_load(node.ok("vm", "list", "-o", "yaml"))
    assert [i["vm"]["metadata"]["name"] for i in listed["items"]] == ["web"]
    table = node.ok("vm", "list")
    assert "web" in table and "running" in table
    assert qemu_processes(node.data_dir / "vms" / "web-0") == 1


def test_killed_qemu_is_restarted_by_the_policy(node: RunningNode) -> None:
    node.ok("vm", "create", "crashy", "--image", "default", "--memory", "256M")
    first = qemu_pid(node, "crashy")
    os.kill(first, signal.SIGKILL)
    inst = until(
        "a restart",
        lambda: (
            (i := instance(node.status("crashy")))["status"]["restarts"] >= 1
            and i["status"]["state"] == "running"
            and i
        ),
    )
    assert qemu_pid(node, "crashy") != first
    assert qemu_processes(node.data_dir / "vms" / "crashy-0") == 1
    assert inst["status"]["ready"] is True


def test_daemon_restart_reattaches_to_running_vms(node: RunningNode) -> None:
    node.ok("vm", "create", "durable", "--image", "default", "--memory", "256M")
    before = qemu_pid(node, "durable")
    node.stop()
    assert Path(f"/proc/{before}").exists()  # the VM outlives the daemon
    node.start()
    time.sleep(2)  # several reconcile passes of the new agent
    inst = until(
        "re-attached and running",
        lambda: (i := instance(node.status("durable")))["status"]["state"] == "running" and i,
    )
    assert qemu_pid(node, "durable") == before
    assert qemu_processes(node.data_dir / "vms" / "durable-0") == 1
    assert inst["status"]["restarts"] == 0
    assert READY in node.ok("vm", "logs", "durable")


def test_stop_start_restart_delete(node: RunningNode) -> None:
    run_dir = node.data_dir / "vms" / "cycle-0"
    node.ok("vm", "create", "cycle", "--image", "default", "--memory", "256M")
    node.ok("vm", "stop", "cycle")
    assert instance(node.status("cycle"))["status"]["state"] == "stopped"
    assert qemu_processes(run_dir) == 0
    node.ok("vm", "start", "cycle")
    started = qemu_pid(node, "cycle")
    node.ok("vm", "restart", "cycle")
    assert qemu_pid(node, "cycle") != started
    assert qemu_processes(run_dir) == 1
    node.ok("vm", "delete", "cycle")
    res = node.cli("vm", "status", "cycle")
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert qemu_processes(run_dir) == 0 and not run_dir.exists()


def test_process_driver_vm(node: RunningNode) -> None:
    node.ok(
        "vm", "create", "worker", "--driver", "process", "--ready-line", "worker up",
        "--command", "sh -c 'echo worker up; while true; do sleep 1; done'",
    )  # fmt: skip
    assert instance(node.status("worker"))["status"]["state"] == "running"
    assert "worker up" in node.ok("vm", "logs", "worker")
    node.ok("vm", "delete", "worker")


def test_scale_up_and_down_with_the_cli(node: RunningNode) -> None:
    node.ok("vm", "create", "pool", "--command", "sleep 600", "--memory", "32M")
    node.ok("vm", "scale", "pool", "--replicas", "3")
    states = [i["status"]["state"] for i in node.status("pool")["instances"]]
    assert states == ["running"] * 3
    node.ok("vm", "scale", "pool", "--replicas", "1")
    assert [i["metadata"]["name"] for i in node.status("pool")["instances"]] == ["pool-0"]
    res = node.cli("vm", "scale", "pool", "--replicas", "-1")
    assert res.returncode == 2 and "--replicas" in res.stderr and "Traceback" not in res.stderr
    node.ok("vm", "delete", "pool")


def test_a_constraint_no_node_meets_says_why_and_places_nothing(node: RunningNode) -> None:
    node.ok(
        "vm", "create", "picky", "--command", "sleep 600", "--memory", "32M",
        "--constraint", "storage=nvme", "--no-wait",
    )  # fmt: skip
    status = until(
        "a placement verdict",
        lambda: (s := node.status("picky"))["vm"]["status"]["message"] and s,
    )
    message = status["vm"]["status"]["message"]
    assert "no node can run it" in message and "storage=nvme" in message, message
    assert [i["spec"]["node"] for i in status["instances"]] == [None]
    node.ok("vm", "delete", "picky")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["vm", "create", "Bad_Name", "--image", "default"], 2, "metadata.name"),
        (["vm", "create", "big", "--image", "default", "--memory", "64T"], 2, "memory"),
        (["vm", "create", "cpus", "--image", "default", "--vcpus", "0"], 2, "vcpus"),
        (["vm", "create", "nokernel", "--kernel", "/no/such/vmlinux"], 2, "spec.boot.kernel"),
        (["vm", "create", "noimage", "--image", "missing"], 2, "spec.boot.image"),
        (["vm", "create", "drv", "--image", "default", "--driver", "vmware"], 2, "vmware"),
        (["vm", "stop", "ghost"], 1, "does not exist"),
        (["vm", "delete", "ghost"], 1, "does not exist"),
        (["vm", "create", "spec", "-f", "/no/such/spec.yaml"], 2, "spec.yaml"),
    ],
)
def test_bad_input_is_refused_clearly(
    node: RunningNode, args: list[str], code: int, needle: str
) -> None:
    before = node.ok("vm", "list", "-o", "json")
    res = node.cli(*args)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") <= 2  # one clear message, not a dump
    assert node.ok("vm", "list", "-o", "json") == before  # nothing half-created


def test_duplicate_name_and_malformed_spec(node: RunningNode, tmp_path: Path) -> None:
    node.ok("vm", "create", "dup", "--image", "default", "--memory", "256M", "--no-wait")
    res = node.cli("vm", "create", "dup", "--image", "default")
    assert res.returncode == 1 and "already exists" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: VM\nmetadata: {name: x\nspec: [\n")
    res = node.cli("vm", "create", "-f", str(bad))
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr
    node.ok("vm", "delete", "dup")


def test_api_needs_the_token(node: RunningNode) -> None:
    env = {**node.env, "BLIXARD_TOKEN": "blx_0_wrong"}
    res = subprocess.run(
        [*BLIXARD, "vm", "list"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 1 and "invalid token" in res.stderr
    token_path = node.data_dir / "admin.token"
    assert token_path.stat().st_mode & 0o777 == 0o600
