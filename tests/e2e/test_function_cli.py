"""Serverless functions as a user types them: the CLI against a running node.

Every runtime end to end, through `function invoke` and through an HTTP
trigger; cold then warm starts; scale to zero; the timeout and the
concurrency cap; and the bad inputs of issue 5 (invalid Nix, output that is
not JSON, an oversized payload, an unknown function). One node serves the
whole module; every test uses functions of its own names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_vm_lifecycle import BLIXARD, RunningNode, until
from tests.support.etcd_cluster import free_port

#: The design brief's example, verbatim (issue 5).
NIX_HELLO = (
    '{ event, context }: { statusCode = 200; body = "Hello from NixOS serverless! '
    'Event: ${event.type}"; }'
)
PING = '{"type":"ping"}'
ECHO_PY = """\
#!{python}
import json, sys
event = json.load(sys.stdin)
kind = event.get("type") if isinstance(event, dict) else event
print(f"handled {{kind}}", file=sys.stderr)
json.dump({{"statusCode": 200, "headers": {{"Content-Type": "application/json"}},
           "body": {{"echo": event}}}}, sys.stdout)
"""


@pytest.fixture(scope="module")
def fnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    base = tmp_path_factory.mktemp("e2e-functions")
    data_dir = base / "data"
    env = {**os.environ, "BLIXARD_DATA_DIR": str(data_dir)}
    env.pop("BLIXARD_API", None)
    env.pop("BLIXARD_TOKEN", None)
    n = RunningNode(data_dir, free_port(), None, env)  # type: ignore[arg-type]
    n.start()
    yield n
    for fn in json.loads(n.ok("function", "list", "-o", "json")).get("items", []):
        n.cli("function", "delete", fn["metadata"]["name"])
    n.stop()


@pytest.fixture(scope="module")
def echo_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A command handler: echoes the event as JSON and logs a line to stderr."""
    path = tmp_path_factory.mktemp("handlers") / "echo.py"
    path.write_text(ECHO_PY.format(python=sys.executable))
    path.chmod(0o755)
    return path


def function(node: RunningNode, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(node.ok("function", "get", name, "-o", "json"))
    return data


def listed(node: RunningNode, name: str) -> dict[str, Any] | None:
    items = json.loads(node.ok("function", "list", "-o", "json"))["items"]
    return next((i for i in items if i["metadata"]["name"] == name), None)


def invoke_json(node: RunningNode, name: str, data: str = PING) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        node.ok("function", "invoke", name, "--data", data, "-o", "json")
    )
    return out


def metrics(node: RunningNode, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(node.ok("function", "metrics", name, "-o", "json"))
    return data


def test_the_design_brief_example_works_verbatim(fnode: RunningNode, tmp_path: Path) -> None:
    fnode.ok("function", "create", "hello", "--runtime", "nix", "--handler", NIX_HELLO)
    res = fnode.cli("function", "invoke", "hello", "--data", PING, "-v")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "Hello from NixOS serverless! Event: ping"
    assert "HTTP 200" in res.stderr and "cold start" in res.stderr and "node e2e" in res.stderr
    # The same handler from a .nix file: the runtime follows from the file name.
    config = tmp_path / "hello.nix"
    config.write_text(NIX_HELLO + "\n")
    fnode.ok("function", "create", "hello-file", "--config", str(config), "--memory", "128M",
             "--timeout", "30s", "--concurrent-executions", "100")  # fmt: skip
    spec = function(fnode, "hello-file")["spec"]
    assert (spec["runtime"], spec["memory_mib"], spec["max_concurrency"]) == ("nix", 128, 100)
    assert fnode.ok("function", "invoke", "hello-file", "--data", PING).strip().endswith("ping")
    fnode.ok("function", "delete", "hello-file")


def _create_echo(node: RunningNode, runtime: str, name: str, echo_py: Path) -> None:
    if runtime == "nix":
        node.ok("function", "create", name, "--runtime", "nix", "--handler", NIX_HELLO)
    elif runtime == "command":
        node.ok("function", "create", name, "--runtime", "command", "--handler-file", str(echo_py))
    else:
        # The guest's own cat echoes the event: a JSON value is the body of a 200.
        node.ok("function", "create", name, "--runtime", "microvm", "--handler", "/bin/cat",
                "--memory", "128M")  # fmt: skip


@pytest.mark.parametrize("runtime", ["nix", "command", "microvm"])
def test_every_runtime_through_the_cli_and_an_http_trigger(
    fnode: RunningNode, runtime: str, echo_py: Path
) -> None:
    name = f"echo-{runtime}"
    _create_echo(fnode, runtime, name, echo_py)
    first = invoke_json(fnode, name)
    assert first["status"] == 200 and "ping" in json.dumps(first["body"]), first
    assert first["cold_start"] is True and first["node"] == "e2e" and first["worker"]
    second = invoke_json(fnode, name)
    assert second["cold_start"] is False and second["worker"] == first["worker"]

    url = fnode.ok("function", "trigger", name, "--http", "--path", f"/e2e/{runtime}").strip()
    assert url.startswith("http://") and url.endswith(f"/e2e/{runtime}"), url
    answer = httpx.post(url, content=PING, headers={"Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert "ping" in answer.text
    assert answer.headers["X-Blixard-Cold-Start"] == "false"
    spec = function(fnode, name)["spec"]
    assert [t["path"] for t in spec["triggers"]] == [f"/e2e/{runtime}"]

    fnode.ok("function", "trigger", name, "--http", "--path", f"/e2e/{runtime}", "--remove")
    assert httpx.post(url, content=PING, timeout=30).status_code == 404
    fnode.ok("function", "delete", name)


def test_cold_then_warm_list_and_metrics(fnode: RunningNode) -> None:
    fnode.ok("function", "create", "warmth", "--runtime", "nix", "--handler", NIX_HELLO,
             "--scale-down-delay", "10m", "--trigger-path", "/warmth")  # fmt: skip
    assert invoke_json(fnode, "warmth")["cold_start"] is True
    assert invoke_json(fnode, "warmth")["cold_start"] is False
    entry = until(
        "the worker to be reported warm",
        lambda: (i := listed(fnode, "warmth")) and i["status"]["warm_workers"] == 1 and i,
    )
    assert entry["status"]["workers"] == 1 and entry["status"]["nodes"] == {"e2e": 1}
    rows = [line.split() for line in fnode.ok("function", "list").splitlines()]
    assert ["warmth", "nix", "1", "1", "0", "e2e:1", "/warmth"] in rows
    m = metrics(fnode, "warmth")
    assert (m["invocations"], m["cold_starts"], m["warm_starts"]) == (2, 1, 1)
    assert m["errors"] == 0 and m["duration_ms"]["count"] == 2 and m["cold_start_ms"]["count"] == 1
    table = fnode.ok("function", "metrics", "warmth")
    assert "Invocations" in table and "Cold starts" in table and "Avg cold start" in table
    fnode.ok("function", "delete", "warmth")


def test_idle_workers_scale_to_zero(fnode: RunningNode) -> None:
    fnode.ok("function", "create", "idle", "--runtime", "nix", "--handler", NIX_HELLO,
             "--scale-down-delay", "1s")  # fmt: skip
    assert invoke_json(fnode, "idle")["cold_start"] is True
    until(
        "scale to zero",
        lambda: (i := listed(fnode, "idle")) and i["status"]["workers"] == 0,
        timeout_s=60,
    )
    assert invoke_json(fnode, "idle")["cold_start"] is True  # the next one starts afresh
    fnode.ok("function", "delete", "idle")


def test_min_instances_are_kept_warm(fnode: RunningNode) -> None:
    fnode.ok("function", "create", "keep", "--runtime", "nix", "--handler", NIX_HELLO,
             "--min-instances", "1", "--scale-down-delay", "1s")  # fmt: skip
    until(
        "a warm worker without any invocation",
        lambda: (i := listed(fnode, "keep")) and i["status"]["warm_workers"] == 1,
        timeout_s=60,
    )
    assert invoke_json(fnode, "keep")["cold_start"] is False
    time.sleep(3)  # past the scale-down delay: min_instances still holds one
    assert listed(fnode, "keep")["status"]["workers"] == 1  # type: ignore[index]
    fnode.ok("function", "delete", "keep")


def test_the_timeout_kills_the_execution(fnode: RunningNode) -> None:
    fnode.ok("function", "create", "sleepy", "--runtime", "command", "--timeout", "1s",
             "--handler", "/bin/sh -c 'cat >/dev/null; sleep 30'")  # fmt: skip
    started = time.monotonic()
    res = fnode.cli("function", "invoke", "sleepy", "--data", "{}")
    assert res.returncode == 1, res
    assert time.monotonic() - started < 15
    assert "function 'sleepy':" in res.stderr and "Traceback" not in res.stderr
    assert metrics(fnode, "sleepy")["timeouts"] == 1
    fnode.ok("function", "delete", "sleepy")


def test_the_concurrency_cap_answers_429_past_the_queue(fnode: RunningNode) -> None:
    fnode.ok("function", "create", "narrow", "--runtime", "command", "--max-concurrent", "1",
             "--queue-limit", "0", "--max-instances", "1", "--target-concurrency", "1",
             "--handler", "/bin/sh -c 'cat >/dev/null; sleep 5; echo {}'")  # fmt: skip
    busy = subprocess.Popen(
        [*BLIXARD, "function", "invoke", "narrow", "--data", "{}"],
        env=fnode.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    until(
        "the first execution to be in flight",
        lambda: ((listed(fnode, "narrow") or {}).get("status", {}).get("busy_workers", 0)) >= 1,
        timeout_s=30,
    )
    res = fnode.cli("function", "invoke", "narrow", "--data", "{}")
    assert res.returncode == 1 and "function 'narrow':" in res.stderr, res
    assert busy.wait(timeout=60) == 0, busy.stderr.read() if busy.stderr else ""
    assert metrics(fnode, "narrow")["rejected"] >= 1
    fnode.ok("function", "delete", "narrow")


@pytest.mark.parametrize(
    ("handler", "needle"),
    [
        ("/bin/sh -c 'cat >/dev/null; echo this is not json'", "not JSON"),
        ("/bin/sh -c 'cat >/dev/null; echo oops >&2; exit 3'", "function 'crashy':"),
    ],
)
def test_a_failing_handler_gets_a_clear_502_and_the_gateway_lives_on(
    fnode: RunningNode, handler: str, needle: str
) -> None:
    fnode.ok("function", "create", "crashy", "--runtime", "command", "--handler", handler)
    res = fnode.cli("function", "invoke", "crashy", "--data", "{}")
    assert res.returncode == 1 and needle in res.stderr, res
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert metrics(fnode, "crashy")["errors"] == 1
    fnode.ok("function", "delete", "crashy")
    # The gateway still serves others.
    fnode.ok("function", "create", "after", "--runtime", "nix", "--handler", NIX_HELLO)
    assert fnode.ok("function", "invoke", "after", "--data", PING).strip().endswith("ping")
    fnode.ok("function", "delete", "after")


def test_bad_inputs_are_refused_clearly(fnode: RunningNode, tmp_path: Path) -> None:
    res = fnode.cli("function", "create", "badnix", "--runtime", "nix", "--handler", "{ event, ")
    assert res.returncode == 2 and "spec.handler" in res.stderr, res
    assert listed(fnode, "badnix") is None

    fnode.ok("function", "create", "small", "--runtime", "nix", "--handler", NIX_HELLO)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"type": "x" * (7 * 1024 * 1024)}))
    res = fnode.cli("function", "invoke", "small", "--data-file", str(big))
    assert res.returncode == 2 and res.stderr.startswith("error: --data-file: "), res

    res = fnode.cli("function", "invoke", "small", "--data", "{type: ping}")
    assert res.returncode == 2 and "--data: is not JSON: " in res.stderr

    res = fnode.cli("function", "invoke", "ghost", "--data", PING)
    assert res.returncode == 1 and res.stderr.strip() == "error: function 'ghost' does not exist"
    res = fnode.cli("function", "create", "Bad_Name", "--runtime", "nix", "--handler", NIX_HELLO)
    assert res.returncode == 2 and "metadata.name" in res.stderr
    res = fnode.cli("function", "create", "mem", "--runtime", "nix", "--handler", NIX_HELLO,
                    "--memory", "lots")  # fmt: skip
    assert res.returncode == 2 and "--memory:" in res.stderr
    fnode.ok("function", "delete", "small")


def test_update_logs_and_delete(fnode: RunningNode, echo_py: Path) -> None:
    fnode.ok("function", "create", "changing", "--runtime", "command", "--handler-file",
             str(echo_py), "--env", "MODE=a", "--prefer", "gpu=available")  # fmt: skip
    assert invoke_json(fnode, "changing")["status"] == 200
    out = json.loads(fnode.ok("function", "update", "changing", "--timeout", "5s", "-o", "json"))
    assert out["spec"]["timeout_s"] == 5.0 and out["spec"]["env"] == {"MODE": "a"}
    assert out["spec"]["placement"]["preferred_labels"] == {"gpu": "available"}
    assert out["metadata"]["generation"] == 2
    assert invoke_json(fnode, "changing")["status"] == 200
    assert "handled ping" in fnode.ok("function", "logs", "changing", "--tail", "10")

    fnode.ok("function", "delete", "changing")
    res = fnode.cli("function", "get", "changing")
    assert res.returncode == 1 and "function 'changing' does not exist" in res.stderr
    until("its workers to go", lambda: listed(fnode, "changing") is None)


def test_a_microvm_handler_is_a_shell_line_sent_as_written(fnode: RunningNode) -> None:
    """The README's example: the guest's sh runs the line (nothing splits it on the way)."""
    fnode.ok("function", "create", "inside", "--runtime", "microvm",
             "--handler", 'read -r e; echo "{\\"got\\": $e}"')  # fmt: skip
    out = invoke_json(fnode, "inside", '{"x": 1}')
    assert out["status"] == 200 and out["body"] == {"got": {"x": 1}}, out
    fnode.ok("function", "delete", "inside")
