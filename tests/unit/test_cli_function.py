"""`blixard function ...` and its client, with no server.

Two kinds of test: the pure flag-to-document mapping and local validation
(nothing is sent), and whole commands against :class:`FakeApi`, an
``httpx.MockTransport`` that answers as docs/functions.md says the API does
(documents validated by the same domain models the server uses). The real
server is exercised in tests/e2e/test_function_cli.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from blixard.api.app import create_app
from blixard.cli import function as function_cli
from blixard.cli.console import exit_code
from blixard.cli.function import (
    FunctionFlags,
    document_from_flags,
    merge_spec,
    read_event,
    spec_from_flags,
)
from blixard.cli.main import app as cli_app
from blixard.client.errors import error_from_response
from blixard.client.functions import FunctionClient, FunctionMetrics
from blixard.domain.errors import (
    BlixardError,
    HandlerFailed,
    HandlerTimeout,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    ValidationError,
)
from blixard.domain.function import Function, FunctionSpec, HttpTrigger, Runtime
from blixard.domain.meta import ObjectMeta
from blixard.domain.node import Node, NodeSpec
from blixard.domain.parse import parse
from blixard.domain.token import Unauthorized
from blixard.functions import runtime as rt
from tests.unit import test_cli_fixtures as cli_fixtures
from tests.unit.test_cli_fixtures import Server
from tests.unit.test_cli_fixtures import blixard as fixture_cli

NIX = '{ event, context }: { statusCode = 200; body = "Hello from NixOS serverless! Event: ${event.type}"; }'  # noqa: E501
TOKEN = "blx_test_token"
URL = "http://fake:7400"


# ---------------------------------------------------------------- the fake API

Answer = Callable[[httpx.Request], httpx.Response]


def _error(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    detail: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        detail["field"] = field
    return httpx.Response(status, json={"error": detail}, headers={"X-Blixard-Error": code})


@dataclass
class FakeApi:
    """The functions API of docs/functions.md over a dict, with scripted invocations."""

    functions: dict[str, Function] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    logs: str = ""
    #: PUTs to refuse with 409 before accepting one (a writer racing the CLI).
    conflicts: int = 0
    revision: int = 10
    #: The answering node's gateway address, as its Node record publishes it.
    gateway_url: str | None = None

    def add(self, name: str, **spec: Any) -> Function:
        doc = {"metadata": {"name": name}, "spec": {"runtime": "nix", "handler": NIX, **spec}}
        return self._store(parse(Function, doc), generation=1)

    def _store(self, fn: Function, generation: int) -> Function:
        self.revision += 1
        meta = fn.metadata.model_copy(
            update={
                "resource_version": self.revision,
                "generation": generation,
                "created_at": fn.metadata.created_at or datetime(2026, 1, 1, tzinfo=UTC),
            }
        )
        stored = fn.model_copy(update={"metadata": meta})
        self.functions[meta.name] = stored
        return stored

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx.Response(
                401, json={"error": {"code": "unauthorized", "message": "invalid token"}}
            )
        parts = [unquote(p) for p in request.url.path.strip("/").split("/")]
        if parts[:2] == ["v1", "nodes"]:
            node_spec = NodeSpec(api_url=URL, gateway_url=self.gateway_url)
            node = Node(metadata=ObjectMeta(name="n1"), spec=node_spec)
            return httpx.Response(200, json={"node": node.model_dump(mode="json"), "alive": True})
        if parts == ["health"]:
            return httpx.Response(
                200,
                json={
                    "node": "n1",
                    "version": "0",
                    "status": "ok",
                    "registered": True,
                    "store": {},
                },
            )
        assert parts[:2] == ["v1", "functions"], parts
        if len(parts) == 2:
            if request.method == "GET":
                items = [f.model_dump(mode="json") for f in self.functions.values()]
                return httpx.Response(200, json={"items": items})
            return self._create(json.loads(request.content))
        name, rest = parts[2], parts[3:]
        fn = self.functions.get(name)
        if fn is None:
            return _error(404, "not_found", f"no function {name}")
        if not rest:
            if request.method == "GET":
                return httpx.Response(200, json=fn.model_dump(mode="json"))
            if request.method == "DELETE":
                del self.functions[name]
                return httpx.Response(204)
            return self._replace(fn, json.loads(request.content))
        action = rest[0]
        if action == "invoke":
            return self.answers[name](request)
        if action == "metrics":
            return httpx.Response(200, json=self.metrics)
        if action == "logs":
            return httpx.Response(200, text=self.logs)
        if action == "triggers" and request.method == "POST":
            trigger = parse(HttpTrigger, json.loads(request.content))
            spec = fn.spec.model_copy(update={"triggers": [*fn.spec.triggers, trigger]})
            stored = self._store(fn.model_copy(update={"spec": spec}), fn.metadata.generation)
            return httpx.Response(200, json=stored.model_dump(mode="json"))
        if action == "triggers" and request.method == "DELETE":
            path = request.url.params["path"]
            kept = [t for t in fn.spec.triggers if t.path != path]
            spec = fn.spec.model_copy(update={"triggers": kept})
            stored = self._store(fn.model_copy(update={"spec": spec}), fn.metadata.generation)
            return httpx.Response(200, json=stored.model_dump(mode="json"))
        raise AssertionError(f"unexpected {request.method} {request.url}")

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        try:
            fn = parse(Function, {"kind": "Function", **body})
        except ValidationError as exc:
            return _error(400, "invalid", str(exc), exc.field)
        if fn.metadata.name in self.functions:
            return _error(409, "already_exists", f"function {fn.metadata.name} exists")
        return httpx.Response(201, json=self._store(fn, 1).model_dump(mode="json"))

    def _replace(self, current: Function, body: dict[str, Any]) -> httpx.Response:
        wanted = body.get("metadata", {}).get("resource_version", 0)
        if self.conflicts > 0 or (wanted and wanted != current.metadata.resource_version):
            self.conflicts -= 1
            self.revision += 1  # someone else wrote
            return _error(409, "conflict", "resource_version does not match")
        try:
            fn = parse(Function, {"kind": "Function", **body})
        except ValidationError as exc:
            return _error(400, "invalid", str(exc), exc.field)
        changed = fn.spec != current.spec
        generation = current.metadata.generation + (1 if changed else 0)
        stored = self._store(fn.model_copy(update={"status": current.status}), generation)
        return httpx.Response(200, json=stored.model_dump(mode="json"))

    def sent(self, method: str, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(suffix)]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi()
    transport = httpx.MockTransport(fake)
    monkeypatch.setattr(
        function_cli, "FunctionClient", partial(FunctionClient, transport=transport)
    )
    yield fake


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def blixard(*args: str, input: str | bytes | None = None) -> Result:
    """Run the CLI in-process as a user types it (exit code, stdout, stderr)."""
    env = {"BLIXARD_API": URL, "BLIXARD_TOKEN": TOKEN, "COLUMNS": "200", "NO_COLOR": "1"}
    result = CliRunner().invoke(cli_app, list(args), input=input, env=env, catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def _client(fake: FakeApi) -> FunctionClient:
    return FunctionClient(URL, TOKEN, transport=httpx.MockTransport(fake))


def _answer(
    status: int = 200,
    body: bytes = b"",
    *,
    cold: str = "false",
    content_type: str = "text/plain",
    headers: dict[str, str] | None = None,
) -> Answer:
    facts = {
        "Content-Type": content_type,
        "X-Blixard-Request-Id": "r-1",
        "X-Blixard-Cold-Start": cold,
        "X-Blixard-Node": "n1",
        "X-Blixard-Worker": "hello-w0",
        "X-Blixard-Duration-Ms": "3.25",
        **(headers or {}),
    }
    return lambda request: httpx.Response(status, content=body, headers=facts)


# ---------------------------------------------------------------- flags to a document


def test_the_design_brief_examples_become_documents_the_domain_accepts(tmp_path: Path) -> None:
    config = tmp_path / "image-ai.nix"
    config.write_text(NIX + "\n")
    flags = FunctionFlags(
        config=str(config),
        memory="2048M",
        timeout="60s",
        placement_strategy="best-fit,data-locality",
        prefer=["gpu=available"],
        max_concurrency=50,
    )
    doc = document_from_flags("image-ai", flags)
    assert doc == {
        "kind": "Function",
        "metadata": {"name": "image-ai"},
        "spec": {
            "runtime": "nix",  # implied by the .nix file
            "handler": NIX + "\n",  # its text: the daemon may be another machine
            "memory_mib": 2048,
            "timeout_s": 60.0,
            "max_concurrency": 50,
            "placement": {
                "strategy": "best-fit,data-locality",
                "preferred_labels": {"gpu": "available"},
            },
        },
    }
    fn = parse(Function, doc)
    assert [s.value for s in fn.spec.placement.strategy] == ["best-fit", "data-locality"]

    flags = FunctionFlags(
        config=str(config),
        memory="8192M",
        placement_strategy="data-locality",
        data_hint="ceph-pool:raw-data",
        constraint=["gpu.memory>=8G", "storage=nvme"],
        node_selector=["zone=a,disk=ssd"],
    )
    spec = parse(Function, document_from_flags("etl", flags)).spec
    assert spec.placement.data_hint == "ceph-pool:raw-data"
    assert [str(c) for c in spec.placement.constraints] == ["gpu.memory>=8G", "storage=nvme"]
    assert spec.placement.node_selector == {"zone": "a", "disk": "ssd"}


def test_every_scaling_flag_maps_to_its_field() -> None:
    flags = FunctionFlags(
        runtime=Runtime.COMMAND,
        handler="/bin/cat",
        args=["-u"],
        env=["A=1", "B=x=y"],
        vcpus=2,
        max_concurrency=100,
        queue_limit=5,
        min_instances=1,
        max_instances=4,
        target_concurrency=2,
        scale_down_delay="0s",
        trigger_paths=["/api/a", "/b"],
    )
    spec = spec_from_flags(flags)
    assert spec == {
        "runtime": "command",
        "handler": "/bin/cat",
        "args": ["-u"],
        "env": {"A": "1", "B": "x=y"},
        "vcpus": 2,
        "max_concurrency": 100,
        "queue_limit": 5,
        "min_instances": 1,
        "max_instances": 4,
        "target_concurrency": 2,
        "scale_down_delay_s": 0.0,
        "triggers": [{"type": "http", "path": "/api/a"}, {"type": "http", "path": "/b"}],
    }
    parse(Function, {"metadata": {"name": "x"}, "spec": spec})


def test_command_handlers_are_split_and_local_paths_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h.py").write_text("print('{}')\n")
    spec = spec_from_flags(
        FunctionFlags(runtime=Runtime.COMMAND, handler="./h.py --fast 'a b'", args=["-x"])
    )
    assert spec["handler"] == str(tmp_path / "h.py")
    assert spec["args"] == ["--fast", "a b", "-x"]
    # A bare name is looked up on the node's PATH; a microVM's path is the guest's.
    assert (
        spec_from_flags(FunctionFlags(runtime=Runtime.COMMAND, handler="cat"))["handler"] == "cat"
    )
    # A microVM handler is a shell line for the guest's sh: sent as written, never split.
    line = 'read -r e; echo "{\\"got\\": $e}"'
    spec = spec_from_flags(FunctionFlags(runtime=Runtime.MICROVM, handler=line))
    assert spec == {"runtime": "microvm", "handler": line}
    (tmp_path / "h.sh").write_text("cat\n")
    spec = spec_from_flags(FunctionFlags(runtime=Runtime.MICROVM, config="h.sh"))
    assert spec["handler"] == "cat\n"  # the script's text: a host path means nothing inside
    # --handler-file for a command is the executable's absolute path, not its text.
    spec = spec_from_flags(FunctionFlags(runtime=Runtime.COMMAND, config="h.py"))
    assert spec["handler"] == str(tmp_path / "h.py")
    # A nix expression is sent verbatim; a .nix path is absolute.
    assert spec_from_flags(FunctionFlags(runtime=Runtime.NIX, handler=NIX))["handler"] == NIX
    spec = spec_from_flags(FunctionFlags(handler="fn.nix"))
    assert spec == {"runtime": "nix", "handler": str(tmp_path / "fn.nix")}


def test_the_runtime_is_required_unless_the_handler_is_a_nix_file() -> None:
    with pytest.raises(ValidationError) as info:
        document_from_flags("x", FunctionFlags(handler=NIX))
    assert info.value.field == "--runtime" and "nix, command or microvm" in info.value.reason
    with pytest.raises(ValidationError) as info:
        document_from_flags("x", FunctionFlags(runtime=Runtime.NIX))
    assert info.value.field == "--handler"
    # On update the stored runtime decides how a new handler is read.
    spec = spec_from_flags(FunctionFlags(handler="cat -n"), current_runtime=Runtime.COMMAND)
    assert spec == {"handler": "cat", "args": ["-n"]}


def test_update_changes_only_what_was_given_and_merges_placement() -> None:
    stored = {
        "runtime": "nix",
        "handler": NIX,
        "memory_mib": 128,
        "env": {"A": "1"},
        "placement": {"strategy": ["best-fit"], "data_hint": "pool:a", "preferred_labels": {}},
    }
    patch = spec_from_flags(FunctionFlags(memory="256M", prefer=["gpu=available"]), Runtime.NIX)
    assert patch == {"memory_mib": 256, "placement": {"preferred_labels": {"gpu": "available"}}}
    merged = merge_spec(stored, patch)
    assert merged["memory_mib"] == 256 and merged["env"] == {"A": "1"}
    assert merged["placement"] == {
        "strategy": ["best-fit"],
        "data_hint": "pool:a",
        "preferred_labels": {"gpu": "available"},
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, memory="128"), "--memory: a size"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, memory="lots"), "--memory:"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, timeout="soon"), "--timeout:"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, timeout="2h"), "--timeout: must be at"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, scale_down_delay="-1s"), "--scale-down"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, env=["NOVALUE"]), "--env: must be NAME="),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, env=["A=1", "A=2"]), "A is given twice"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, prefer=["gpu"]), "--prefer: must be"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, node_selector=["=a"]), "--node-selector"),
        (FunctionFlags(runtime=Runtime.NIX, handler=NIX, trigger_paths=["api"]), "--trigger-path"),
        (FunctionFlags(runtime=Runtime.COMMAND, handler="sh 'x"), "--handler: cannot be split"),
        (FunctionFlags(handler="a.nix", config="b.nix"), "--handler: cannot be combined"),
        (FunctionFlags(config="/no/such.nix"), "--config: file /no/such.nix does not exist"),
        (FunctionFlags(runtime=Runtime.COMMAND, config="/no/x"), "--config: file /no/x"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(flags: FunctionFlags, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        document_from_flags("x", flags)
    assert message in str(info.value)


def test_read_event_checks_json_and_says_where_it_is_wrong(tmp_path: Path) -> None:
    assert read_event(None, None) == (None, "--data")
    assert read_event('{"type": "ping"}', None) == (b'{"type": "ping"}', "--data")
    with pytest.raises(ValidationError) as info:
        read_event('{"type": ping}', None)
    assert str(info.value) == ("--data: is not JSON: Expecting value at line 1, column 10 (char 9)")
    bad = tmp_path / "event.json"
    bad.write_text('{"a": 1,\n}')
    with pytest.raises(ValidationError) as info:
        read_event(None, str(bad))
    assert str(info.value).startswith(f"--data-file: {bad} is not JSON:")
    assert "line 2, column 1" in str(info.value)
    with pytest.raises(ValidationError, match="--data-file: file /no/event does not exist"):
        read_event(None, "/no/event")
    with pytest.raises(ValidationError, match="cannot be combined"):
        read_event("{}", str(bad))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValidationError, match=r"not (UTF-8 text|JSON)"):
        read_event(None, str(tmp_path / "bin"))


# ---------------------------------------------------------------- the client


@pytest.mark.parametrize(
    ("status", "code", "cls", "exit"),
    [
        (413, "payload_too_large", PayloadTooLarge, 2),
        (429, "too_many_requests", TooManyRequests, 1),
        (502, "handler_failed", HandlerFailed, 1),
        (503, "no_capacity", NoCapacity, 1),
        (504, "handler_timeout", HandlerTimeout, 1),
    ],
)
def test_gateway_errors_raise_their_classes_and_exit_codes(
    status: int, code: str, cls: type[BlixardError], exit: int
) -> None:
    fake = FakeApi()
    fake.add("hello")
    fake.answers["hello"] = lambda request: _error(status, code, "the gateway says no")
    with _client(fake) as client, pytest.raises(cls) as info:
        client.invoke_function("hello", b"{}")
    assert str(info.value) == "the gateway says no" and exit_code(info.value) == exit
    # The same from a plain error answer (the mapping is shared with every route).
    answer = httpx.Response(
        status,
        json={"error": {"code": code, "message": "m"}},
        request=httpx.Request("GET", "http://t/"),
    )
    assert type(error_from_response(answer)) is cls


def test_a_gateway_error_without_a_body_still_has_its_class() -> None:
    fake = FakeApi()
    fake.add("hello")
    fake.answers["hello"] = lambda request: httpx.Response(
        504, text="killed", headers={"X-Blixard-Error": "handler_timeout"}
    )
    with _client(fake) as client, pytest.raises(HandlerTimeout):
        client.invoke_function("hello")


def test_a_handlers_own_error_answer_is_an_answer_not_an_error() -> None:
    fake = FakeApi()
    fake.add("hello")
    # Shaped like a Blixard error, but the handler said it: no X-Blixard-Error.
    body = b'{"error": {"code": "not_found", "message": "no such image"}}'
    fake.answers["hello"] = _answer(404, body, cold="true", content_type="application/json")
    with _client(fake) as client:
        inv = client.invoke_function("hello", b'{"type":"ping"}')
    assert (inv.status, inv.ok, inv.body) == (404, False, body)
    assert (inv.cold_start, inv.node, inv.worker, inv.duration_ms) == (True, "n1", "hello-w0", 3.25)
    assert inv.request_id == "r-1"
    sent = fake.sent("POST", "/invoke")[0]
    assert sent.content == b'{"type":"ping"}'
    assert sent.headers["content-type"] == "application/json"


def test_an_error_that_never_reached_a_handler_is_an_error() -> None:
    fake = FakeApi()
    fake.add("hello")
    wrong = FunctionClient(URL, "wrong", transport=httpx.MockTransport(fake))
    with wrong, pytest.raises(Unauthorized):
        wrong.invoke_function("hello")
    with _client(fake) as client, pytest.raises(NotFound):
        client.invoke_function("nope")


def test_metrics_and_logs_are_read_as_documented() -> None:
    fake = FakeApi()
    fake.add("hello")
    fake.metrics = {
        "function": "hello", "nodes": ["n1", "n2"], "invocations": 12, "errors": 1,
        "cold_starts": 2, "warm_starts": 10, "timeouts": 0, "rejected": 0,
        "duration_ms": {"count": 12, "avg": 4.1, "p50": 3.2, "p99": 18.0},
        "cold_start_ms": {"count": 2, "avg": 90.0, "p50": 85.0, "p99": 95.0},
        "queue_ms": {"count": 12, "avg": 0.1, "p50": 0.0, "p99": 1.2},
    }  # fmt: skip
    fake.logs = "t n1 hello-w0 r-1 started\n"
    with _client(fake) as client:
        m = client.function_metrics("hello")
        assert isinstance(m, FunctionMetrics) and m.cold_start_ms.p50 == 85.0
        assert (m.invocations, m.warm_starts, m.nodes) == (12, 10, ["n1", "n2"])
        assert client.function_logs("hello", tail=5) == fake.logs
    assert fake.sent("GET", "/logs")[0].url.params["tail"] == "5"


# ---------------------------------------------------------------- commands


def test_create_from_flags_then_list_and_get(api: FakeApi, tmp_path: Path) -> None:
    config = tmp_path / "image-processor.nix"
    config.write_text(NIX)
    res = blixard(
        "function", "create", "image-processor", "--config", str(config), "--memory", "128M",
        "--timeout", "30s", "--concurrent-executions", "100", "--trigger-path", "/api/x",
    )  # fmt: skip
    assert res.code == 0, res.stderr
    assert "function image-processor created" in res.stdout and "Runtime" in res.stdout
    fn = api.functions["image-processor"]
    assert fn.spec.handler == NIX and fn.spec.max_concurrency == 100
    assert fn.spec.memory_mib == 128 and fn.spec.timeout_s == 30.0

    api.functions["image-processor"] = fn.model_copy(
        update={
            "status": fn.status.model_copy(
                update={"workers": 1, "warm_workers": 1, "busy_workers": 0, "nodes": {"n1": 1}}
            )
        }
    )
    res = blixard("function", "list")
    assert res.code == 0, res.stderr
    header, row = res.stdout.splitlines()
    assert header.split() == ["NAME", "RUNTIME", "WORKERS", "WARM", "BUSY", "NODES", "TRIGGERS"]
    assert row.split() == ["image-processor", "nix", "1", "1", "0", "n1:1", "/api/x"]

    listed = json.loads(blixard("function", "list", "-o", "json").stdout)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["image-processor"]
    got = yaml.safe_load(blixard("function", "get", "image-processor", "-o", "yaml").stdout)
    assert got["spec"]["handler"] == NIX and got["status"]["nodes"] == {"n1": 1}
    table = blixard("function", "get", "image-processor").stdout
    assert "1 (1 warm, 0 busy) on n1:1" in table and "GET,POST /api/x" in table


def test_create_from_a_file_and_stdin(api: FakeApi, tmp_path: Path) -> None:
    doc = tmp_path / "fn.yaml"
    doc.write_text(f"metadata: {{name: hello}}\nspec:\n  runtime: nix\n  handler: '{NIX}'\n")
    res = blixard("function", "create", "-f", str(doc), "-o", "json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["kind"] == "Function"
    res = blixard("function", "create", "other", "-f", str(doc))
    assert (
        res.code == 2 and "NAME: is 'other' but" in res.stderr and "function 'hello'" in res.stderr
    )
    res = blixard(
        "function", "create", "piped", "-f", "-", input="spec: {runtime: command, handler: cat}\n"
    )
    assert res.code == 0, res.stderr
    assert api.functions["piped"].spec.handler == "cat"
    (tmp_path / "empty.yaml").write_text("")
    res = blixard("function", "create", "-f", str(tmp_path / "empty.yaml"))
    assert res.code == 2 and "one Function document" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["x", "--runtime", "nix", "--handler", NIX, "--memory", "0M"],
            "--memory: must be greater",
        ),
        (["x", "--runtime", "nix", "--handler", NIX, "--memory", "128"], "--memory: a size"),
        (["x", "--handler", "cat"], "--runtime: is required"),
        (["x", "--runtime", "lisp", "--handler", "cat"], "--runtime"),
        (["--runtime", "nix", "--handler", NIX], "NAME: is required"),
        (["x", "-f", "f.yaml", "--memory", "1G"], "-f: cannot be combined with --memory"),
        (["x", "--runtime", "nix", "--handler", NIX, "--env", "X"], "--env: must be NAME=VALUE"),
        (
            ["x", "--runtime", "nix", "--handler", NIX, "--max-concurrent", "many"],
            "--max-concurrent",
        ),
    ],
)
def test_create_refuses_bad_input_with_exit_2_and_sends_nothing(
    api: FakeApi, args: list[str], message: str
) -> None:
    res = blixard("function", "create", *args)
    assert res.code == 2, res
    assert message in res.stderr and "Traceback" not in res.stderr
    assert api.requests == []


def test_server_refusals_name_the_field(api: FakeApi) -> None:
    res = blixard("function", "create", "Bad_Name", "--runtime", "nix", "--handler", NIX)
    assert res.code == 2 and "metadata.name" in res.stderr
    res = blixard(
        "function", "create", "x", "--runtime", "nix", "--handler", NIX,
        "--min-instances", "5", "--max-instances", "2",
    )  # fmt: skip
    assert res.code == 2 and "spec.min_instances" in res.stderr
    api.add("taken")
    res = blixard("function", "create", "taken", "--runtime", "nix", "--handler", NIX)
    assert res.code == 1 and "exists" in res.stderr


def test_invoke_prints_the_body_and_verbose_facts(api: FakeApi) -> None:
    api.add("hello")
    api.answers["hello"] = _answer(200, b"Hello from NixOS serverless! Event: ping", cold="true")
    res = blixard("function", "invoke", "hello", "--data", '{"type":"ping"}', "-v")
    assert res.code == 0, res.stderr
    assert res.stdout == "Hello from NixOS serverless! Event: ping"
    assert res.stderr.strip() == (
        "HTTP 200 · cold start · node n1 · worker hello-w0 · 3.25 ms · request r-1"
    )
    assert api.sent("POST", "/invoke")[0].content == b'{"type":"ping"}'

    api.answers["hello"] = _answer(200, b'{"ok": true}', content_type="application/json")
    res = blixard("function", "invoke", "hello", "-o", "json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["status"] == 200 and data["body"] == {"ok": True}
    assert (data["cold_start"], data["node"], data["worker"], data["duration_ms"]) == (
        False, "n1", "hello-w0", 3.25,
    )  # fmt: skip
    assert data["headers"]["x-blixard-request-id"] == "r-1"
    assert api.sent("POST", "/invoke")[-1].content == b""  # no --data: no event


def test_invoke_reads_the_event_from_stdin_or_a_file(api: FakeApi, tmp_path: Path) -> None:
    api.add("hello")
    api.answers["hello"] = _answer(200, b"ok")
    res = blixard("function", "invoke", "hello", "--data", "-", input='{"from": "stdin"}')
    assert res.code == 0, res.stderr
    assert api.sent("POST", "/invoke")[-1].content == b'{"from": "stdin"}'
    event = tmp_path / "event.json"
    event.write_text('{"imagePath": "/data/input.jpg"}')
    res = blixard("function", "invoke", "hello", "--data-file", str(event))
    assert res.code == 0, res.stderr
    assert api.sent("POST", "/invoke")[-1].content == event.read_bytes()


def test_invoke_exit_codes(api: FakeApi) -> None:
    api.add("hello")
    # The handler's own 500: its body still printed, exit 1.
    api.answers["hello"] = _answer(500, b"boom")
    res = blixard("function", "invoke", "hello")
    assert (res.code, res.stdout) == (1, "boom")
    assert "function 'hello' answered HTTP 500" in res.stderr
    # Bad JSON never leaves the machine.
    sent = len(api.requests)
    res = blixard("function", "invoke", "hello", "--data", "{'single': 1}")
    assert res.code == 2 and res.stderr.startswith("error: --data: is not JSON: ")
    assert "line 1, column 2" in res.stderr and len(api.requests) == sent
    # The gateway's refusals.
    api.answers["hello"] = lambda r: _error(413, "payload_too_large", "larger than 6 MiB")
    res = blixard("function", "invoke", "hello", "--data", "{}")
    assert res.code == 2 and res.stderr.strip() == "error: --data: larger than 6 MiB"
    api.answers["hello"] = lambda r: _error(502, "handler_failed", "output is not JSON")
    res = blixard("function", "invoke", "hello")
    assert res.code == 1 and res.stderr.strip() == "error: function 'hello': output is not JSON"
    api.answers["hello"] = lambda r: _error(429, "too_many_requests", "queue full")
    assert blixard("function", "invoke", "hello").code == 1
    res = blixard("function", "invoke", "nope", "--data", "{}")
    assert res.code == 1 and res.stderr.strip() == "error: function 'nope' does not exist"
    assert "Traceback" not in res.stderr


def test_update_changes_the_given_fields_and_retries_one_conflict(api: FakeApi) -> None:
    api.add("hello", env={"A": "1"}, placement={"data_hint": "pool:a"})
    before = api.functions["hello"].metadata.resource_version
    api.conflicts = 1
    res = blixard(
        "function", "update", "hello", "--memory", "256M", "--prefer", "gpu=available", "-o", "json"
    )
    assert res.code == 0, res.stderr
    spec = api.functions["hello"].spec
    assert spec.memory_mib == 256 and spec.env == {"A": "1"} and spec.handler == NIX
    assert spec.placement.data_hint == "pool:a"
    assert spec.placement.preferred_labels == {"gpu": "available"}
    puts = api.sent("PUT", "/v1/functions/hello")
    assert len(puts) == 2
    assert json.loads(puts[0].content)["metadata"]["resource_version"] == before
    assert json.loads(res.stdout)["metadata"]["generation"] == 2

    api.conflicts = 2
    res = blixard("function", "update", "hello", "--vcpus", "2")
    assert res.code == 1 and "changed by someone else" in res.stderr
    res = blixard("function", "update", "hello")
    assert res.code == 2 and "nothing to change" in res.stderr
    res = blixard("function", "update", "nope", "--vcpus", "2")
    assert res.code == 1 and "function 'nope' does not exist" in res.stderr


def test_trigger_adds_prints_the_route_and_removes(api: FakeApi) -> None:
    api.add("hello")
    res = blixard("function", "trigger", "hello", "--http", "--path", "/api/x", "--method", "get")
    assert res.code == 0, res.stderr
    # A node that runs no gateway publishes no gateway_url: the path alone.
    assert res.stdout == "/api/x\n"
    assert [(t.path, t.methods) for t in api.functions["hello"].spec.triggers] == [
        ("/api/x", ["GET"])
    ]
    api.gateway_url = "http://10.0.0.1:7480/"
    res = blixard("function", "trigger", "hello", "--http", "--path", "/api/y")
    assert res.code == 0, res.stderr
    assert res.stdout == "http://10.0.0.1:7480/api/y\n"

    res = blixard("function", "trigger", "hello", "--http", "--path", "/api/z", "--remove")
    assert res.code == 1 and "has no http trigger on /api/z (it has: /api/x, /api/y)" in res.stderr
    res = blixard("function", "trigger", "hello", "--http", "--path", "/api/x", "--remove")
    assert res.code == 0 and "removed" in res.stdout
    assert [t.path for t in api.functions["hello"].spec.triggers] == ["/api/y"]

    for args, message in [
        (["--path", "/api/x"], "--http: is required"),
        (["--http"], "--path: is required"),
        (["--http", "--path", "api"], "--path: must be a path"),
        (["--http", "--path", "/a", "--method", "FETCH"], "--method: must be one of"),
    ]:
        res = blixard("function", "trigger", "hello", *args)
        assert res.code == 2 and message in res.stderr, (args, res.stderr)
    res = blixard("function", "trigger", "nope", "--http", "--path", "/q")
    assert res.code == 1 and "function 'nope' does not exist" in res.stderr


def test_metrics_logs_and_delete(api: FakeApi) -> None:
    api.add("hello")
    api.metrics = {
        "function": "hello", "nodes": ["n1"], "invocations": 3, "errors": 1,
        "cold_starts": 1, "warm_starts": 2, "timeouts": 0, "rejected": 0,
        "duration_ms": {"count": 3, "avg": 4.5, "p50": 5.0, "p99": 10.0},
        "cold_start_ms": {"count": 1, "avg": 82.0, "p50": 100.0, "p99": 100.0},
        "queue_ms": {"count": 0, "avg": None, "p50": None, "p99": None},
    }  # fmt: skip
    res = blixard("function", "metrics", "hello")
    assert res.code == 0, res.stderr
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in res.stdout.splitlines()}
    assert rows["Invocations"] == "3" and rows["Cold starts"] == "1" and rows["Warm starts"] == "2"
    assert rows["Avg duration"] == "4.5 ms" and rows["p99 duration"] == "10 ms"
    assert rows["Avg cold start"] == "82 ms" and rows["Queue time"] == "-"
    assert json.loads(blixard("function", "metrics", "hello", "-o", "json").stdout)["errors"] == 1

    api.logs = "2026-01-01T00:00:00Z n1 hello-w0 r-1 hi"
    res = blixard("function", "logs", "hello", "--tail", "3")
    assert res.code == 0 and res.stdout == api.logs + "\n"
    assert api.sent("GET", "/logs")[-1].url.params["tail"] == "3"

    res = blixard("function", "delete", "hello")
    assert res.code == 0 and "function hello deleted" in res.stdout
    assert "hello" not in api.functions
    for command in ("get", "delete", "metrics", "logs"):
        res = blixard("function", command, "hello")
        assert res.code == 1 and res.stderr.strip() == "error: function 'hello' does not exist"


def test_a_refused_token_names_where_it_came_from(api: FakeApi) -> None:
    env = {"BLIXARD_API": URL, "BLIXARD_TOKEN": "wrong", "NO_COLOR": "1"}
    result = CliRunner().invoke(cli_app, ["function", "list"], env=env)
    assert result.exit_code == 1
    assert "refused the token from BLIXARD_TOKEN" in result.stderr


# ---------------------------------------------------------------- the real API, in-process
# The node API of tests/unit/test_cli_fixtures.py (uvicorn on 127.0.0.1, a real SqliteStore)
# with the function routes, runtimes that only check, and no gateway: every document route
# runs the server's own code. Invocations need a gateway and run in tests/e2e.


class CheckOnlyRuntime:
    """A runtime whose check refuses a handler saying "syntax error"; it never starts workers."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def check(self, spec: FunctionSpec) -> None:
        if "syntax error" in spec.handler:
            raise ValidationError("spec.handler", "does not parse: syntax error")

    async def start_worker(self, name: str, spec: FunctionSpec, work_dir: Path) -> rt.Worker:
        raise rt.HandlerFailed("this test node starts no workers")


@pytest.fixture
def real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    runtimes = {r: CheckOnlyRuntime(r.value) for r in Runtime}
    monkeypatch.setattr(cli_fixtures, "create_app", partial(create_app, runtimes=runtimes))
    srv = Server(tmp_path / "data")
    srv.data_dir.mkdir()
    srv.start()
    yield srv
    srv.stop()


def test_real_api_create_list_get_update_delete(real: Server, tmp_path: Path) -> None:
    config = tmp_path / "image-processor.nix"
    config.write_text(NIX)
    res = fixture_cli(
        real, "function", "create", "image-processor", "--config", str(config),
        "--memory", "128M", "--timeout", "30s", "--concurrent-executions", "100",
        "--prefer", "gpu=available", "--placement-strategy", "best-fit,data-locality",
        "--trigger-path", "/api/process-image",
    )  # fmt: skip
    assert res.code == 0, res.stderr
    row = fixture_cli(real, "function", "list").stdout.splitlines()[1].split()
    assert row == ["image-processor", "nix", "0", "0", "0", "-", "/api/process-image"]
    got = json.loads(fixture_cli(real, "function", "get", "image-processor", "-o", "json").stdout)
    spec = got["spec"]
    assert (spec["runtime"], spec["handler"], spec["memory_mib"]) == ("nix", NIX, 128)
    assert spec["placement"]["strategy"] == ["best-fit", "data-locality"]
    assert got["metadata"]["generation"] == 1

    res = fixture_cli(real, "function", "update", "image-processor", "--memory", "256M",
                      "--env", "MODE=fast", "-o", "json")  # fmt: skip
    assert res.code == 0, res.stderr
    updated = json.loads(res.stdout)
    assert updated["metadata"]["generation"] == 2 and updated["spec"]["memory_mib"] == 256
    assert updated["spec"]["placement"]["preferred_labels"] == {"gpu": "available"}
    assert updated["spec"]["triggers"] == spec["triggers"]

    doc = tmp_path / "replacement.yaml"
    doc.write_text("metadata: {name: image-processor}\nspec: {runtime: command, handler: cat}\n")
    res = fixture_cli(real, "function", "update", "-f", str(doc), "-o", "json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["spec"]["triggers"] == []

    res = fixture_cli(real, "function", "delete", "image-processor")
    assert res.code == 0 and "deleted" in res.stdout
    assert fixture_cli(real, "function", "list").stdout.strip() == "No functions."


def test_real_api_update_retries_a_lost_race_once(
    real: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fixture_cli(real, "function", "create", "raced", "--runtime", "nix", "--handler",
                       NIX).code == 0  # fmt: skip
    original = FunctionClient.replace_function
    raced: list[int] = []

    def racing(self: FunctionClient, name: str, document: dict[str, Any]) -> Function:
        if not raced:  # another writer gets in between our read and our write
            other = self.get_function(name)
            bumped = other.model_dump(mode="json", exclude={"status"})
            bumped["metadata"]["labels"] = {"touched": "yes"}
            raced.append(original(self, name, bumped).metadata.resource_version)
        return original(self, name, document)

    monkeypatch.setattr(FunctionClient, "replace_function", racing)
    res = fixture_cli(real, "function", "update", "raced", "--vcpus", "2", "-o", "json")
    assert res.code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["spec"]["vcpus"] == 2 and out["metadata"]["labels"] == {"touched": "yes"}


def test_real_api_triggers(real: Server) -> None:
    for name in ("one", "two"):
        assert fixture_cli(real, "function", "create", name, "--runtime", "nix", "--handler",
                           NIX).code == 0  # fmt: skip
    res = fixture_cli(real, "function", "trigger", "one", "--http", "--path", "/api/x")
    assert (res.code, res.stdout) == (0, "/api/x\n"), res.stderr  # n1 publishes no gateway
    res = fixture_cli(real, "function", "trigger", "two", "--http", "--path", "/api/x")
    assert res.code == 1 and "belongs to function 'one'" in res.stderr
    res = fixture_cli(real, "function", "trigger", "two", "--http", "--path", "/api/x",
                      "--method", "PUT")  # fmt: skip
    assert res.code == 0, res.stderr  # another method on the same path is another route
    res = fixture_cli(real, "function", "trigger", "one", "--http", "--path", "/nope", "--remove")
    assert res.code == 1 and "function 'one' has no http trigger on /nope" in res.stderr
    res = fixture_cli(real, "function", "trigger", "one", "--http", "--path", "/api/x", "--remove")
    assert res.code == 0, res.stderr
    got = json.loads(fixture_cli(real, "function", "get", "one", "-o", "json").stdout)
    assert got["spec"]["triggers"] == []


def test_real_api_refusals(real: Server) -> None:
    cases = [
        (["create", "bad", "--runtime", "nix", "--handler", "{ syntax error"], 2, "spec.handler"),
        (["create", "Bad_Name", "--runtime", "nix", "--handler", NIX], 2, "metadata.name"),
        (["create", "mm", "--runtime", "nix", "--handler", NIX, "--min-instances", "3",
          "--max-instances", "2"], 2, "spec.min_instances"),
        (["create", "cpu", "--runtime", "nix", "--handler", NIX, "--vcpus", "0"], 2, "spec.vcpus"),
        (["create", "gpu", "--runtime", "nix", "--handler", NIX, "--constraint", "gpu.memory>=x"],
         2, "spec.placement.constraints"),
        (["get", "ghost"], 1, "function 'ghost' does not exist"),
        (["delete", "ghost"], 1, "function 'ghost' does not exist"),
        (["update", "ghost", "--vcpus", "2"], 1, "function 'ghost' does not exist"),
        (["metrics", "ghost"], 1, "no function gateway"),
        (["invoke", "ghost", "--data", "{}"], 1, "no function gateway"),
    ]  # fmt: skip
    for args, code, needle in cases:
        res = fixture_cli(real, "function", *args)
        assert res.code == code and needle in res.stderr, (args, res.code, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert fixture_cli(real, "function", "list", "-o", "json").stdout.strip() == (
        '{\n  "items": []\n}'
    )
    res = fixture_cli(real, "function", "list", BLIXARD_TOKEN="blx_0_wrong")
    assert res.code == 1 and "refused the token from BLIXARD_TOKEN" in res.stderr
