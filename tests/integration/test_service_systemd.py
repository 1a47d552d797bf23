"""The service verbs through a real daemon whose service driver is the systemd D-Bus driver.

systemd cannot run as PID 1 here, so the daemon talks to a FAKE systemd
(tests/support/fake_systemd.py) on a private bus, given to it the way systemd's
own clients find the bus: ``DBUS_SYSTEM_BUS_ADDRESS``. The fake answers in this
test's event loop, so everything here waits asynchronously (a blocking wait
would keep the fake from answering the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import Daemon
from tests.support.fake_systemd import (
    FakeSystemd,
    FakeUnitSpec,
    fake_systemd_on_private_bus,
)

BIN = Path(sys.executable).parent
CONFIG = """
[microvm]
build_default_image = false
[functions]
runtimes = ["command"]
"""


class Node:
    def __init__(self, daemon: Daemon, fake: FakeSystemd) -> None:
        self.daemon = daemon
        self.fake = fake
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
        self.env["BLIXARD_DATA_DIR"] = str(daemon.data_dir)

    async def cli(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "blixard"), *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert b"Traceback" not in err, err
        return proc.returncode or 0, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self.cli(*args)
        assert code == 0, f"{args}: {err}"
        return out


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    units = [FakeUnitSpec("nginx.service", status_text="Ready to serve")]
    async with fake_systemd_on_private_bus(units) as (fake, bus):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        config = tmp_path / "config.toml"
        config.write_text(CONFIG)
        daemon = Daemon("sd1", tmp_path, config)
        daemon.start("--service-driver", "systemd", ports=False)
        try:
            await wait_healthy(daemon)
            yield Node(daemon, fake)
        finally:
            daemon.terminate()
            assert daemon.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                # In a thread: the fake must keep answering the daemon while it stops.
                await asyncio.to_thread(daemon.proc.wait, 30)
            daemon.kill()


async def wait_healthy(daemon: Daemon, timeout_s: float = 60) -> None:
    assert daemon.proc is not None
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            assert daemon.proc.poll() is None, daemon.log.read_text()
            try:
                if (await client.get(daemon.url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"never healthy: {daemon.log.read_text()}")


def jobs(fake: FakeSystemd) -> list[tuple[str, str]]:
    wanted = {"StartUnit", "StopUnit", "RestartUnit"}
    return [(c.member, c.args[0]) for c in fake.calls if c.member in wanted]


async def test_service_verbs_drive_systemd_over_dbus(node: Node) -> None:
    node_json = json.loads(await node.ok("node", "status", "-o", "json"))
    assert "systemd" in node_json["node"]["status"]["hypervisors"]

    await node.ok("service", "start", "nginx", "--timeout", "30s")
    assert jobs(node.fake) == [("StartUnit", "nginx.service")]
    status = json.loads(await node.ok("service", "status", "nginx", "-o", "json"))
    here = status["status"]["nodes"]["sd1"]
    assert (here["active_state"], here["sub_state"]) == ("active", "running")

    await node.ok("service", "restart", "nginx", "--timeout", "30s")
    await node.ok("service", "stop", "nginx", "--timeout", "30s")
    members = [member for member, _ in jobs(node.fake)]
    # The agent restarts a task as stop then start (its start first clears the old handle).
    assert members.count("StartUnit") == 2 and members[-1] == "StopUnit", members
    status = json.loads(await node.ok("service", "status", "nginx", "-o", "json"))
    assert status["status"]["phase"] == "stopped"

    code, _, err = await node.cli("service", "start", "missing", "--timeout", "2s")
    assert code == 1 and "systemd has no such unit" in err, err
    await node.ok("service", "delete", "missing")
    await node.ok("service", "delete", "nginx")
