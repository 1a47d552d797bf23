"""Services as a user types them: `blixard service ...`, `service_manager ...` and `blixard
import` against one running node whose units run for real as processes (the process unit
driver reads the unit files of a directory of this test).

One node serves the module; every test uses services of its own names. The commands run
as installed console scripts (`.venv/bin/blixard`, `.venv/bin/service_manager`), finding
the node and its token through BLIXARD_DATA_DIR as on the node's own machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Daemon

BIN = Path(sys.executable).parent
NODE = "svc1"
CONFIG = """
[microvm]
build_default_image = false
[functions]
runtimes = ["command"]
"""


@dataclass
class Node:
    daemon: Daemon
    units: Path
    pids: Path
    env: dict[str, str]

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [str(BIN / program), *args], env=self.env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert "Traceback" not in res.stderr, res.stderr
        return res

    def blixard(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("blixard", *args)

    def ok(self, *args: str, program: str = "blixard") -> str:
        res = self.run(program, *args)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        return res.stdout

    def status(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ok("service", "status", name, "-o", "json"))
        return data

    def unit(self, name: str, body: str) -> None:
        (self.units / f"{name}.service").write_text(body)

    def pid(self, name: str) -> int | None:
        """The pid the unit wrote at its start, if that process still lives."""
        path = self.pids / name
        if not path.exists():
            return None
        pid = int(path.read_text())
        return pid if Path(f"/proc/{pid}").exists() and not _zombie(pid) else None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sleeper(pids: Path, name: str) -> str:
    """A unit that records its pid (``$$$$`` is the shell's ``$$`` in a unit) and sleeps."""
    return f"""[Unit]
Description={name} for the e2e tests
After=network.target

[Service]
Type=simple
Environment=NAME={name}
ExecStart=/bin/sh -c 'echo $$$$ > {pids}/${{NAME}}; echo started; exec sleep 600'
Restart=always

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("services")
    units, pids = base / "units", base / "pids"
    units.mkdir()
    pids.mkdir()
    config = base / "config.toml"
    config.write_text(CONFIG)
    daemon = Daemon(NODE, base, config)
    daemon.start("--service-driver", "process", "--unit-dir", str(units), ports=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
    env["BLIXARD_DATA_DIR"] = str(daemon.data_dir)
    env["COLUMNS"] = "200"  # tables are cut to the terminal width
    n = Node(daemon, units, pids, env)
    for name in ("web", "other", "imp-a", "imp-b", "manager"):
        n.unit(name, sleeper(pids, name))
    n.unit("refused", "[Service]\nExecStart=/bin/sleep 600\nUser=nobody\n")
    try:
        daemon.wait_healthy()
        yield n
    finally:
        for item in json.loads(n.ok("service", "list", "-o", "json")).get("items", []):
            n.blixard("service", "delete", item["metadata"]["name"], "--timeout", "30s")
        daemon.terminate()
        daemon.wait_stopped(30)


def until(what: str, check: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last saw {last!r}")


def test_every_verb_through_the_cli(node: Node) -> None:
    out = node.ok("service", "start", "web.service")
    assert "service web started: running on every node" in out
    first = node.pid("web")
    assert first is not None
    status = node.status("web")
    assert status["spec"] == {
        "unit": "web.service", "state": "running", "nodes": [NODE], "replicas": 1,
        "placement": status["spec"]["placement"], "restart_generation": 0,
    }  # fmt: skip
    here = status["status"]["nodes"][NODE]
    assert (here["active_state"], here["sub_state"]) == ("active", "running")
    assert status["status"]["phase"] == "running"
    table = node.ok("service", "status", "web")
    assert "Recorded" in table and "active" in table and NODE in table

    listed = json.loads(node.ok("service", "list", "-o", "json"))
    assert "web" in [i["metadata"]["name"] for i in listed["items"]]
    assert "web.service" in node.ok("service", "list")
    # Service VMs stay out of `vm list` unless asked for.
    assert "svc-web" not in node.ok("vm", "list")
    assert "svc-web" in node.ok("vm", "list", "--all")

    node.ok("service", "restart", "web")
    second = node.pid("web")
    assert second is not None and second != first
    assert node.status("web")["spec"]["restart_generation"] == 1

    assert "stopped on every node" in node.ok("service", "stop", "web")
    assert node.pid("web") is None
    stopped = node.status("web")
    assert stopped["status"]["phase"] == "stopped"
    assert stopped["status"]["nodes"][NODE]["active_state"] == "inactive"

    node.ok("service", "start", "web", "-o", "yaml")  # keeps where it runs
    third = node.pid("web")
    assert third is not None and third not in (first, second)
    nodes = json.loads(node.ok("service", "list-cluster", "-o", "json"))
    assert [i["node"]["metadata"]["name"] for i in nodes["items"]] == [NODE]

    assert "deleted: stopped everywhere" in node.ok("service", "delete", "web")
    assert node.pid("web") is None
    gone = node.blixard("service", "status", "web")
    assert gone.returncode == 1 and gone.stderr.strip() == "error: service 'web' does not exist"


def test_service_manager_keeps_the_old_verbs(node: Node) -> None:
    sm = "service_manager"
    assert "service manager started" in node.ok("start", "manager", program=sm)
    assert node.pid("manager") is not None
    status = node.ok("status", "manager", program=sm)
    assert "active" in status and NODE in status
    # Same output as the new command.
    assert node.ok("status", "manager", "-o", "json", program=sm) == node.ok(
        "service", "status", "manager", "-o", "json"
    )
    assert "manager.service" in node.ok("list", program=sm)
    assert NODE in node.ok("list-cluster", program=sm)
    before = node.pid("manager")
    node.ok("restart", "manager.service", program=sm)
    assert node.pid("manager") not in (None, before)
    node.ok("stop", "manager", program=sm)
    assert node.pid("manager") is None
    # Exit codes as the new commands give them: 1 failed, 2 bad input.
    unknown = node.run(sm, "status", "ghost")
    assert unknown.returncode == 1 and "service 'ghost' does not exist" in unknown.stderr
    bad = node.run(sm, "start", "nginx;reboot")
    assert bad.returncode == 2 and "contains ';'" in bad.stderr
    verb = node.run(sm, "frobnicate", "x")
    assert verb.returncode == 2 and "unknown command 'frobnicate'" in verb.stderr
    usage = node.run(sm)
    assert usage.returncode == 2 and "usage: service_manager" in usage.stdout
    node.ok("service", "delete", "manager")


BAD_NAMES = [
    ("web;reboot", "contains ';'"),
    ("$(reboot)", "contains '$'"),
    ("/etc/systemd/system/web.service", "not a path (no '/')"),
    ("we..b", "must not contain '..'"),
    ("my web", "must not contain spaces"),
]


def test_bad_unit_names_are_refused_with_one_line(node: Node) -> None:
    """Every form once through the CLI (the API tests go through them all); each way in once."""
    runs = [("blixard", ("service", "start", name)) for name, _ in BAD_NAMES]
    runs += [
        ("service_manager", ("start", "../web")),
        ("blixard", ("service", "start", "web", "--unit", "web;reboot")),
    ]
    reasons = [reason for _, reason in BAD_NAMES] + ["not a path (no '/')", "contains ';'"]
    for (program, args), reason in zip(runs, reasons, strict=True):
        res = node.run(program, *args)
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], res.stderr
    listed = json.loads(node.ok("service", "list", "-o", "json"))["items"]
    assert "web" not in [i["metadata"]["name"] for i in listed]  # nothing was created


def test_other_bad_input(node: Node) -> None:
    for args, code, text in [
        (("service", "stop", "ghost"), 1, "service 'ghost' does not exist"),
        (("service", "restart", "ghost"), 1, "service 'ghost' does not exist"),
        (("service", "delete", "ghost"), 1, "service 'ghost' does not exist"),
        (("service", "start", "web", "--node", NODE, "--all-nodes"), 2, "not both"),
        (("service", "start", "web", "--node", NODE, "--replicas", "2"), 2, "--replicas"),
        (("service", "start", "web", "--node", "nowhere"), 2, "no node 'nowhere'"),
        (("service", "start", "my_app"), 2, "cannot name a service"),
    ]:
        res = node.blixard(*args)
        assert res.returncode == code, (args, res)
        assert text in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_unit_the_driver_cannot_run_fails_with_the_reason(node: Node) -> None:
    res = node.blixard("service", "start", "refused", "--timeout", "2s")
    assert res.returncode == 1
    assert "User= is not supported" in res.stderr and "timed out" in res.stderr
    here = node.status("refused")["status"]["nodes"][NODE]
    assert here["active_state"] == "failed" and "User= is not supported" in here["message"]
    missing = node.blixard("service", "start", "absent", "--timeout", "1s")
    assert missing.returncode == 1 and "no unit file on this node" in missing.stderr
    node.ok("service", "delete", "refused")
    node.ok("service", "delete", "absent")


def test_import_verify_and_compare(node: Node, tmp_path: Path) -> None:
    exported = tmp_path / "services.json"
    exported.write_text(
        json.dumps(
            {
                "services": [
                    {"name": "imp-a", "state": "running", "nodes": [NODE]},
                    {"name": "imp-b.service", "state": "stopped"},
                ]
            }
        )
    )
    out = node.ok("import", "--format", "json", "--file", str(exported), "--verify")
    assert "created: imp-a, imp-b" in out
    assert "imp-a: ok: running on every node" in out and "imp-b: ok: stopped" in out
    assert node.pid("imp-a") is not None and node.pid("imp-b") is None
    again = json.loads(node.ok("import", "--file", str(exported), "-o", "json"))
    assert again["unchanged"] == ["imp-a", "imp-b"]

    compared = json.loads(node.ok("service", "list", "--compare-with", str(exported), "-o", "json"))
    verdicts = {row["name"]: row["verdict"] for row in compared["items"]}
    assert verdicts == {"imp-a": "same", "imp-b": "same"}

    changed = tmp_path / "changed.json"
    changed.write_text('{"imp-a": "stopped", "imp-c": "running"}')
    table = node.ok("service", "list", "--compare-with", str(changed))
    assert "differs" in table and "missing" in table and "extra" in table
    refused = node.blixard("import", "--file", str(changed))
    assert refused.returncode == 1
    assert "imp-a (state running -> stopped" in refused.stderr
    assert "nothing was imported" in refused.stderr
    names = [
        i["metadata"]["name"] for i in json.loads(node.ok("service", "list", "-o", "json"))["items"]
    ]
    assert "imp-c" not in names  # all or nothing

    for text, place in [
        ('{"services": [{"name": "x", "state": "running"}, {"name": "y;z", "state": "running"}]}',
         "services[1].name"),
        ('{"services": [\n  {"name": "x" "state": "running"}\n]}', "line 2 column"),
        ('{"services": [{"name": "x", "state": "up"}]}', "services[0].state"),
    ]:  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        res = node.blixard("import", "--format", "json", "--file", str(bad))
        assert res.returncode == 2 and place in res.stderr, res.stderr
    res = node.blixard("import", "--format", "xml", "--file", str(exported))
    assert res.returncode == 2 and "--format" in res.stderr
    node.ok("service", "delete", "imp-a")
    node.ok("service", "delete", "imp-b")
