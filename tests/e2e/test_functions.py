"""Serverless functions end to end: a real node, real handlers (nix-instantiate, processes),
the invoke API, HTTP triggers on the gateway port, the CLI, scaling and bad input.

One node serves the module (embedded SQLite store; the nix and command runtimes:
microVM functions have their own module); every test uses its own functions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_node_start import wait_health
from tests.support.etcd_cluster import free_port

BLIXARD = [sys.executable, "-m", "blixard"]
NIX_EXAMPLE = (
    '{ event, context }: { statusCode = 200; body = "Hello from NixOS serverless! '
    'Event: ${event.type}"; }'
)


@dataclass
class FnNode:
    data_dir: Path
    api: str
    gateway: str
    proc: subprocess.Popen[str]
    env: dict[str, str]
    token: str

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.api}{path}", headers=headers, timeout=60, **kwargs)

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        resp = self.call("POST", "/v1/functions", json={"metadata": {"name": name}, "spec": spec})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def invoke(self, name: str, event: Any = None, **kwargs: Any) -> httpx.Response:
        content = kwargs.pop("content", None)
        if content is None:
            content = json.dumps(event).encode()
        return self.call("POST", f"/v1/functions/{name}/invoke", content=content, **kwargs)

    def function(self, name: str) -> dict[str, Any]:
        resp = self.call("GET", f"/v1/functions/{name}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BLIXARD, *args], env=self.env, capture_output=True, text=True, input=stdin,
            timeout=120, check=False,
        )  # fmt: skip


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FnNode]:
    base = tmp_path_factory.mktemp("functions")
    data_dir = base / "data"
    api_port, gateway_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
    env.update(BLIXARD_DATA_DIR=str(data_dir), BLIXARD_ACCEL="tcg")
    config = base / "config.toml"
    config.write_text(
        '[microvm]\nbuild_default_image = false\n[functions]\nruntimes = ["nix", "command"]\n'
    )
    proc = subprocess.Popen(
        [*BLIXARD, "node", "start", "--node-id", "fn1", "--api-port", str(api_port),
         "--gateway-port", str(gateway_port), "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(base / "node.log", "a"),  # noqa: SIM115
        text=True,
    )  # fmt: skip
    try:
        wait_health(api_port, proc, timeout_s=60)
        token = (data_dir / "admin.token").read_text().strip()
        yield FnNode(
            data_dir,
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{gateway_port}",
            proc,
            env,
            token,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0, (base / "node.log").read_text()[-3000:]


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable Python handler in ``tmp_path``; returns its path."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


# --- the runtimes, through the invoke API and HTTP triggers ------------------------------


def test_the_design_briefs_nix_example_cold_then_warm(node: FnNode) -> None:
    node.create("hello-nix", runtime="nix", handler=NIX_EXAMPLE)
    first = node.invoke("hello-nix", {"type": "ping"})
    assert first.status_code == 200, first.text
    assert first.text == "Hello from NixOS serverless! Event: ping"
    assert first.headers["X-Blixard-Cold-Start"] == "true"
    assert first.headers["X-Blixard-Node"] == "fn1"
    second = node.invoke("hello-nix", {"type": "pong"})
    assert second.text == "Hello from NixOS serverless! Event: pong"
    assert second.headers["X-Blixard-Cold-Start"] == "false"
    assert second.headers["X-Blixard-Worker"] == first.headers["X-Blixard-Worker"]


def test_an_http_trigger_invokes_without_a_token(node: FnNode) -> None:
    node.create(
        "hello-trigger",
        runtime="nix",
        handler=NIX_EXAMPLE,
        triggers=[{"type": "http", "path": "/api/hello", "methods": ["POST"]}],
    )
    resp = httpx.post(f"{node.gateway}/api/hello", json={"type": "web"}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.text == "Hello from NixOS serverless! Event: web"
    assert httpx.get(f"{node.gateway}/api/hello", timeout=10).status_code == 404  # POST only
    missing = httpx.post(f"{node.gateway}/api/nothing", json={}, timeout=10)
    assert missing.status_code == 404 and missing.headers["X-Blixard-Error"] == "not_found"
    # Adding the same route to another function is refused, nothing changes.
    node.create("other", runtime="nix", handler=NIX_EXAMPLE)
    taken = node.call(
        "POST", "/v1/functions/other/triggers", json={"type": "http", "path": "/api/hello"}
    )
    assert taken.status_code == 409 and "hello-trigger" in taken.json()["error"]["message"]
    assert node.function("other")["spec"]["triggers"] == []


def test_a_command_handler_gets_the_event_and_the_request(node: FnNode, tmp_path: Path) -> None:
    handler = script(
        tmp_path,
        "echo.py",
        """
        import json, sys
        event = json.load(sys.stdin)
        print(json.dumps({"statusCode": 201, "headers": {"X-Seen": "yes"},
                          "body": {"got": event}}))
        """,
    )
    node.create(
        "echo",
        runtime="command",
        handler=handler,
        triggers=[{"type": "http", "path": "/echo", "methods": ["GET", "POST"]}],
    )
    resp = node.invoke("echo", {"a": [1, 2]})
    assert resp.status_code == 201 and resp.headers["X-Seen"] == "yes"
    assert resp.json() == {"got": {"a": [1, 2]}}
    via_trigger = httpx.get(f"{node.gateway}/echo?x=1", timeout=30)
    assert via_trigger.status_code == 201 and via_trigger.json() == {"got": {"x": "1"}}
    text_body = httpx.post(f"{node.gateway}/echo", content=b"plain words", timeout=30)
    assert text_body.json() == {"got": {"body": "plain words"}}


# --- limits: concurrency, timeout, payload ------------------------------------------------


def test_the_concurrency_cap_queues_then_answers_429(node: FnNode, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    handler = script(
        tmp_path,
        "slow.py",
        f"""
        import json, os, sys, time
        sys.stdin.read()
        mark = os.path.join({str(marks)!r}, str(os.getpid()))
        open(mark + ".start", "w").write(repr(time.time()))
        time.sleep(1.0)
        open(mark + ".end", "w").write(repr(time.time()))
        print(json.dumps({{"statusCode": 200, "body": "done"}}))
        """,
    )
    node.create(
        "capped", runtime="command", handler=handler, max_concurrency=2, queue_limit=1,
        target_concurrency=1, min_instances=2,
    )  # fmt: skip
    wait_until(lambda: node.function("capped")["status"]["warm_workers"] == 2, 20, "2 warm")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: node.invoke("capped", {}), range(5)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 200, 429, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["X-Blixard-Error"] == "too_many_requests"
    assert "concurrency limit" in refused.json()["error"]["message"]
    spans = [
        (float((marks / f"{p}.start").read_text()), float((marks / f"{p}.end").read_text()))
        for p in {m.name.split(".")[0] for m in marks.iterdir()}
    ]
    assert len(spans) == 3
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2, spans  # never more than max_concurrency at once, and the cap was used


def test_a_timeout_kills_the_execution_and_answers_504(node: FnNode, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    handler = script(
        tmp_path,
        "forever.py",
        f"""
        import os, sys, time
        sys.stdin.read()  # a spare waits here: only the invoked one writes its pid
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """,
    )
    node.create("sleeper", runtime="command", handler=handler, timeout_s="1s")
    began = time.monotonic()
    resp = node.invoke("sleeper", {})
    assert resp.status_code == 504 and resp.headers["X-Blixard-Error"] == "handler_timeout"
    assert time.monotonic() - began < 10
    pid = int(pid_file.read_text())
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 5, "handler killed")


def _zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return raw[raw.rindex(")") + 2] in "ZX"


def test_bad_input_is_refused_and_the_gateway_keeps_serving(node: FnNode, tmp_path: Path) -> None:
    bad_nix = node.call(
        "POST",
        "/v1/functions",
        json={"metadata": {"name": "broken"}, "spec": {"runtime": "nix", "handler": "{ event: "}},
    )
    assert bad_nix.status_code == 400 and bad_nix.json()["error"]["field"] == "spec.handler"
    assert node.call("GET", "/v1/functions/broken").status_code == 404  # nothing stored
    unknown = node.invoke("nope", {})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]
    not_json = script(tmp_path, "notjson.py", "print('this is not json')\n")
    node.create("not-json", runtime="command", handler=not_json)
    resp = node.invoke("not-json", {})
    assert resp.status_code == 502 and resp.headers["X-Blixard-Error"] == "handler_failed"
    assert "not JSON" in resp.json()["error"]["message"]
    crash = script(tmp_path, "crash.py", "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)\n")
    node.create("crash", runtime="command", handler=crash)
    crashed = node.invoke("crash", {})
    assert crashed.status_code == 502 and "3" in crashed.json()["error"]["message"]
    eval_error = node.invoke("hello-nix", {"no_type": 1})
    assert eval_error.status_code == 502  # the expression reads event.type
    big = node.invoke("hello-nix", content=b'"' + b"x" * (7 * 1024 * 1024) + b'"')
    assert big.status_code == 413 and big.headers["X-Blixard-Error"] == "payload_too_large"
    assert node.invoke("echo", content=b"{not json").status_code == 400
    ok = node.invoke("hello-nix", {"type": "still-here"})
    assert ok.status_code == 200 and ok.text.endswith("still-here")


# --- scaling ----------------------------------------------------------------------------


def test_idle_workers_scale_to_zero_and_the_next_call_is_cold(node: FnNode) -> None:
    node.create("brief", runtime="nix", handler=NIX_EXAMPLE, scale_down_delay_s="1s")
    assert node.invoke("brief", {"type": "a"}).headers["X-Blixard-Cold-Start"] == "true"
    wait_until(lambda: node.function("brief")["status"]["workers"] == 1, 10, "one worker")
    wait_until(lambda: node.function("brief")["status"]["workers"] == 0, 15, "scaled to zero")
    again = node.invoke("brief", {"type": "b"})
    assert again.status_code == 200 and again.headers["X-Blixard-Cold-Start"] == "true"


def test_min_instances_stay_warm_before_any_call(node: FnNode) -> None:
    node.create("prewarmed", runtime="nix", handler=NIX_EXAMPLE, min_instances=1,
                scale_down_delay_s="0s")  # fmt: skip
    wait_until(lambda: node.function("prewarmed")["status"]["warm_workers"] == 1, 20, "warm")
    first = node.invoke("prewarmed", {"type": "x"})
    assert first.status_code == 200 and first.headers["X-Blixard-Cold-Start"] == "false"
    time.sleep(2.5)  # past the delay: the minimum is kept anyway
    assert node.function("prewarmed")["status"]["workers"] == 1


def test_an_update_replaces_the_workers(node: FnNode) -> None:
    node.create("versioned", runtime="nix", handler=NIX_EXAMPLE)
    assert node.invoke("versioned", {"type": "v1"}).text.endswith("v1")
    fn = node.function("versioned")
    fn["spec"]["handler"] = '{ event, context }: { statusCode = 200; body = "v2"; }'
    resp = node.call("PUT", "/v1/functions/versioned", json=fn)
    assert resp.status_code == 200 and resp.json()["metadata"]["generation"] == 2
    assert node.invoke("versioned", {"type": "x"}).text == "v2"
    stale = node.call("PUT", "/v1/functions/versioned", json=fn)  # old resource_version
    assert stale.status_code == 409


# --- metrics and logs -------------------------------------------------------------------


def test_metrics_count_cold_and_warm_starts(node: FnNode) -> None:
    node.create("counted", runtime="nix", handler=NIX_EXAMPLE)
    for kind in ("a", "b", "c"):
        assert node.invoke("counted", {"type": kind}).status_code == 200
    node.invoke("counted", {"no": "type"})
    summary = node.call("GET", "/v1/functions/counted/metrics").json()
    assert summary["invocations"] == 4 and summary["errors"] == 1
    assert summary["cold_starts"] == 1 and summary["warm_starts"] == 3
    assert summary["duration_ms"]["count"] == 4 and summary["cold_start_ms"]["count"] == 1
    text = node.call("GET", "/metrics").text
    assert 'blixard_function_invocations_total{function="counted",outcome="ok"} 3.0' in text
    assert 'blixard_function_starts_total{function="counted",kind="cold"} 1.0' in text
    assert "blixard_function_queue_seconds_bucket" in text
    logs = node.call("GET", "/v1/functions/counted/logs").text
    assert "no_type" in logs or "type" in logs  # nix's evaluation error names the attribute


def test_a_function_created_again_never_meets_the_old_workers(node: FnNode) -> None:
    v1 = '{ event, context }: { statusCode = 200; body = "one"; }'
    v2 = '{ event, context }: { statusCode = 200; body = "two"; }'
    node.create("again", runtime="nix", handler=v1, min_instances=1)
    assert node.invoke("again", {}).text == "one"
    assert node.call("DELETE", "/v1/functions/again").status_code == 204
    node.create("again", runtime="nix", handler=v2)
    assert node.invoke("again", {}).text == "two"  # at once, not after the autoscaler's pass
