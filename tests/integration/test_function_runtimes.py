"""The ``command`` and ``nix`` runtimes with real processes and the real nix-instantiate."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from blixard.domain.errors import ValidationError
from blixard.domain.function import FunctionSpec, Runtime
from blixard.functions.command import CommandRuntime
from blixard.functions.nix import NixRuntime
from blixard.functions.processes import MAX_READY, ProcessWorker
from blixard.functions.registry import process_runtimes
from blixard.functions.runtime import (
    MAX_OUTPUT_BYTES,
    HandlerFailed,
    HandlerTimeout,
    Response,
    WorkerGone,
    event_context,
)

pytestmark = pytest.mark.timeout(30)

EXAMPLE = (
    '{ event, context }: { statusCode = 200; body = "Hello from NixOS serverless! '
    'Event: ${event.type}"; }'
)

StartWorker = Callable[..., Awaitable[ProcessWorker]]


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def _gone(pids: list[int], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        await asyncio.sleep(0.02)
    return False


async def _eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.01)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def _py(tmp_path: Path, name: str, code: str) -> Path:
    return _script(tmp_path, name, f"#!{sys.executable} -I\n{code}")


ECHO = """
import json, sys
event = json.load(sys.stdin)
print(json.dumps({"statusCode": 201, "body": {"got": event}, "headers": {"X-Seen": "yes"}}))
"""


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Start workers in tmp_path; every worker is closed and checked for leftovers."""
    workers: list[ProcessWorker] = []
    count = 0

    async def go(runtime: Runtime, handler: str, **fields: object) -> ProcessWorker:
        nonlocal count
        count += 1
        spec = FunctionSpec(runtime=runtime, handler=handler, **fields)  # type: ignore[arg-type]
        rt = process_runtimes()[runtime]
        work_dir = tmp_path / f"w{count}"
        work_dir.mkdir()
        worker = await rt.start_worker(f"fn{count}", spec, work_dir)
        assert isinstance(worker, ProcessWorker)
        workers.append(worker)
        return worker

    yield go
    for worker in workers:
        pids = worker.pids()
        await worker.close()
        assert await _gone(pids), f"processes left behind: {pids}"


# --- nix ---------------------------------------------------------------------------------


async def test_nix_design_example_verbatim(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, EXAMPLE)
    response = await worker.invoke(b'{"type":"ping"}', event_context("hello", "r-1", None), 10)
    assert response == Response(200, "Hello from NixOS serverless! Event: ping")
    # warm: the next one is served by a process that was already waiting
    again = await worker.invoke(b'{"type":"pong"}', {}, 10)
    assert again.body == "Hello from NixOS serverless! Event: pong"
    assert worker.unready_takes == 0


async def test_nix_context_headers_and_status(start: StartWorker) -> None:
    handler = (
        "{ event, context }: { statusCode = 202; "
        'headers = { "X-Request" = context.requestId; }; '
        "body = { n = event.n * 2; fn = context.function; }; }"
    )
    worker = await start(Runtime.NIX, handler)
    response = await worker.invoke(b'{"n": 21}', event_context("double", "req-7", None), 10)
    assert response == Response(202, {"fn": "double", "n": 42}, {"X-Request": "req-7"})


async def test_nix_handler_from_a_file_with_relative_import(
    start: StartWorker, tmp_path: Path
) -> None:
    (tmp_path / "lib.nix").write_text('{ greet = who: "hi ${who}"; }')
    (tmp_path / "fn.nix").write_text(
        "{ event, context }: let lib = import ./lib.nix; in lib.greet event.who"
    )
    worker = await start(Runtime.NIX, str(tmp_path / "fn.nix"))
    assert (await worker.invoke(b'{"who":"you"}', {}, 10)) == Response(200, "hi you")


async def test_nix_work_dir_with_quotes_and_dollars(tmp_path: Path) -> None:
    work_dir = tmp_path / 'odd "dir" ${x} \\'
    work_dir.mkdir()
    spec = FunctionSpec(runtime=Runtime.NIX, handler=EXAMPLE)
    worker = await NixRuntime().start_worker("odd", spec, work_dir)
    try:
        assert (await worker.invoke(b'{"type":"odd"}', {}, 10)).status_code == 200
    finally:
        await worker.close()


async def test_nix_parallel_invocations(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, EXAMPLE, target_concurrency=3, max_concurrency=3)
    results = await asyncio.gather(
        *(worker.invoke(f'{{"type":"t{i}"}}'.encode(), {}, 10) for i in range(3))
    )
    assert [r.body for r in results] == [
        f"Hello from NixOS serverless! Event: t{i}" for i in range(3)
    ]


async def test_nix_non_json_event_is_a_string(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, "{ event, context }: { inherit event; }")
    response = await worker.invoke(b'x"}, "context": {"requestId": "forged"', {}, 10)
    assert response.body == {"event": 'x"}, "context": {"requestId": "forged"'}


async def test_nix_eval_error_at_invoke_is_handler_failed(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, EXAMPLE)
    with pytest.raises(HandlerFailed) as caught:
        await worker.invoke(b'{"typo":"ping"}', {}, 10)
    assert "attribute 'type' missing" in str(caught.value)
    assert "handler.nix:1:" in caught.value.detail
    assert "nixbld" not in caught.value.detail and "--show-trace" not in caught.value.detail
    assert str(worker.launch.cwd) not in caught.value.detail  # no private paths
    assert (await worker.invoke(b'{"type":"ok"}', {}, 10)).status_code == 200


async def test_nix_result_that_is_not_json(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, "{ event, context }: if event.f then { f = x: x; } else 1")
    with pytest.raises(HandlerFailed, match="cannot convert a function to JSON"):
        await worker.invoke(b'{"f": true}', {}, 10)
    assert (await worker.invoke(b'{"f": false}', {}, 10)).body == 1


async def test_nix_failing_without_the_event_fails_the_start(tmp_path: Path) -> None:
    # It reads no event, so every invocation would fail the same way.
    spec = FunctionSpec(runtime=Runtime.NIX, handler="{ event, context }: { f = x: x; }")
    with pytest.raises(HandlerFailed, match="cannot convert a function to JSON"):
        await NixRuntime().start_worker("constant", spec, tmp_path)


async def test_nix_timeout_kills_the_evaluation(start: StartWorker) -> None:
    loop = (
        "{ event, context }: let range = builtins.genList (x: x) event.n; in "
        "builtins.foldl' (a: i: builtins.foldl' (b: j: b + 1) a range) 0 range"
    )
    worker = await start(Runtime.NIX, loop)
    began = time.monotonic()
    with pytest.raises(HandlerTimeout):
        await worker.invoke(b'{"n": 100000}', {}, 0.5)
    assert time.monotonic() - began < 3
    assert (await worker.invoke(b'{"n": 3}', {}, 10)).body == 9


async def test_nix_check_refuses_invalid_nix_with_its_message() -> None:
    nix = NixRuntime()
    await nix.check(FunctionSpec(runtime=Runtime.NIX, handler=EXAMPLE))
    with pytest.raises(ValidationError) as caught:
        await nix.check(
            FunctionSpec(runtime=Runtime.NIX, handler="{ event, context }: { statusCode = 200; ")
        )
    assert caught.value.field == "handler"
    assert "syntax error" in caught.value.reason
    assert "handler.nix:1:" in caught.value.reason
    assert "/tmp" not in caught.value.reason and "nixbld" not in caught.value.reason
    with pytest.raises(ValidationError, match="must be a function"):
        await nix.check(FunctionSpec(runtime=Runtime.NIX, handler="{ statusCode = 200; }"))
    with pytest.raises(ValidationError, match="does not exist"):
        await nix.check(FunctionSpec(runtime=Runtime.NIX, handler="/nonexistent/fn.nix"))


async def test_nix_start_fails_on_a_handler_that_does_not_parse(tmp_path: Path) -> None:
    spec = FunctionSpec(runtime=Runtime.NIX, handler="{ event, context }: {")
    with pytest.raises(HandlerFailed, match="syntax error"):
        await NixRuntime().start_worker("bad", spec, tmp_path)


async def test_nix_writes_nothing_outside_its_work_dir(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, '{ event, context }: "${./handler.nix}"')
    before = sorted(p.name for p in Path("/nix/var/nix").rglob("*"))
    response = await worker.invoke(b"{}", {}, 10)
    assert str(response.body).startswith("/nix/store/")  # computed, never written
    assert sorted(p.name for p in Path("/nix/var/nix").rglob("*")) == before


async def test_nix_fetchers_are_offline(start: StartWorker) -> None:
    worker = await start(Runtime.NIX, "{ event, context }: builtins.fetchurl event.url")
    began = time.monotonic()
    with pytest.raises(HandlerFailed, match="unable to download"):
        await worker.invoke(b'{"url": "http://example.com/x"}', {}, 10)
    assert time.monotonic() - began < 3


async def test_nix_warm_is_a_fraction_of_cold(tmp_path: Path) -> None:
    """The point of pre-spawning: a warm invocation skips nix-instantiate's start-up.

    Run with -s to see the figures; the bound is loose so a loaded machine passes.
    """
    runtime = NixRuntime()
    spec = FunctionSpec(runtime=Runtime.NIX, handler=EXAMPLE)
    cold: list[float] = []
    for i in range(8):
        began = time.perf_counter()
        worker = await runtime.start_worker("c", spec, _mkdir(tmp_path / f"c{i}"))
        await worker.invoke(b'{"type":"ping"}', {}, 10)
        cold.append(time.perf_counter() - began)
        await worker.close()
    worker = await runtime.start_worker("w", spec, _mkdir(tmp_path / "w"))
    warm: list[float] = []
    try:
        for _ in range(8):
            await asyncio.sleep(0.08)  # the refill has started up
            began = time.perf_counter()
            await worker.invoke(b'{"type":"ping"}', {}, 10)
            warm.append(time.perf_counter() - began)
    finally:
        await worker.close()
    cold_ms, warm_ms = statistics.median(cold) * 1000, statistics.median(warm) * 1000
    print(f"nix cold p50 {cold_ms:.1f} ms, warm p50 {warm_ms:.2f} ms")
    assert warm_ms < 0.25 * cold_ms


# --- command -----------------------------------------------------------------------------


async def test_command_event_in_response_out(start: StartWorker, tmp_path: Path) -> None:
    worker = await start(Runtime.COMMAND, str(_py(tmp_path, "echo.py", ECHO)))
    response = await worker.invoke(b'{"type": "ping"}', event_context("e", "r", None), 10)
    assert response == Response(201, {"got": {"type": "ping"}}, {"X-Seen": "yes"})


async def test_command_by_name_on_path_with_args_and_env(start: StartWorker) -> None:
    worker = await start(
        Runtime.COMMAND,
        "sh",
        args=[
            "-c",
            'cat >/dev/null; printf \'{"v":"%s","f":"%s"}\' "$GREETING" "$BLIXARD_FUNCTION"',
        ],
        env={"GREETING": "hello"},
    )
    response = await worker.invoke(b"{}", {}, 10)
    assert response.status_code == 200
    assert response.body["v"] == "hello"
    assert response.body["f"].startswith("fn")


async def test_command_plain_json_value_is_a_200(start: StartWorker) -> None:
    worker = await start(Runtime.COMMAND, "sh", args=["-c", "cat >/dev/null; echo '[1, 2]'"])
    assert (await worker.invoke(b"{}", {}, 10)) == Response(200, [1, 2])


async def test_command_non_json_output(start: StartWorker) -> None:
    worker = await start(Runtime.COMMAND, "sh", args=["-c", "echo 'hello there'"])
    with pytest.raises(HandlerFailed, match=r"not JSON.*hello there"):
        await worker.invoke(b"{}", {}, 10)
    empty = await start(Runtime.COMMAND, "sh", args=["-c", "echo oops >&2"])
    with pytest.raises(HandlerFailed, match="printed nothing") as caught:
        await empty.invoke(b"{}", {}, 10)
    assert caught.value.detail == "oops"


async def test_command_crash_then_serves_again(start: StartWorker, tmp_path: Path) -> None:
    code = """
import json, os, signal, sys
event = json.load(sys.stdin)
if event.get("exit"):
    sys.stderr.write("x" * 5000 + "\\nsomething broke\\n")
    sys.exit(event["exit"])
if event.get("kill"):
    os.kill(os.getpid(), signal.SIGKILL)
print(json.dumps({"ok": True}))
"""
    worker = await start(Runtime.COMMAND, str(_py(tmp_path, "crash.py", code)))
    with pytest.raises(HandlerFailed) as caught:
        await worker.invoke(b'{"exit": 3}', {}, 10)
    assert "exited with status 3: something broke" in str(caught.value)
    assert len(caught.value.detail) <= 2048 and caught.value.detail.endswith("something broke")
    assert (await worker.invoke(b"{}", {}, 10)).body == {"ok": True}
    with pytest.raises(HandlerFailed, match=r"killed by signal 9 \(SIGKILL\)"):
        await worker.invoke(b'{"kill": true}', {}, 10)
    assert (await worker.invoke(b"{}", {}, 10)).body == {"ok": True}
    assert worker.alive()


async def test_command_timeout_kills_child_and_grandchild(
    start: StartWorker, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    script = _script(
        tmp_path,
        "hang.sh",
        f"""#!/bin/sh
read -r line
if [ "$line" = '"hang"' ]; then
  sleep 300 &
  echo "$$ $!" > {pids}
  wait
fi
echo '{{"ok": true}}'
""",
    )
    worker = await start(Runtime.COMMAND, str(script))
    began = time.monotonic()
    with pytest.raises(HandlerTimeout):
        await worker.invoke(b'"hang"\n', {}, 0.5)
    assert 0.5 <= time.monotonic() - began < 3
    child, grandchild = (int(p) for p in pids.read_text().split())
    assert await _gone([child, grandchild])
    assert (await worker.invoke(b'"fine"\n', {}, 10)).body == {"ok": True}


async def test_command_leftover_background_process_is_killed(
    start: StartWorker, tmp_path: Path
) -> None:
    pid_file = tmp_path / "bg"
    worker = await start(
        Runtime.COMMAND,
        "sh",
        args=["-c", f"read x; sleep 300 >/dev/null 2>&1 & echo $! > {pid_file}; echo '{{}}'"],
    )
    assert (await worker.invoke(b"{}", {}, 10)).body == {}
    assert await _gone([int(pid_file.read_text())])


async def test_command_holding_stdout_after_exit_does_not_hang(start: StartWorker) -> None:
    # The background child keeps stdout open; it is killed with the group when sh exits.
    worker = await start(Runtime.COMMAND, "sh", args=["-c", "sleep 300 & echo '{}'"])
    began = time.monotonic()
    assert (await worker.invoke(b"{}", {}, 10)).body == {}
    assert time.monotonic() - began < 2


async def test_command_oversized_output(start: StartWorker, tmp_path: Path) -> None:
    code = f"""
import sys
sys.stdin.read()
chunk = b"7" * 65536
for _ in range({MAX_OUTPUT_BYTES // 65536 + 2}):
    sys.stdout.buffer.write(chunk)
"""
    worker = await start(Runtime.COMMAND, str(_py(tmp_path, "big.py", code)))
    with pytest.raises(HandlerFailed, match="larger than"):
        await worker.invoke(b"{}", {}, 10)
    assert worker.alive()


async def test_command_big_event_and_unread_stdin(start: StartWorker, tmp_path: Path) -> None:
    code = """
import json, sys
print(json.dumps(len(sys.stdin.read())))
"""
    worker = await start(Runtime.COMMAND, str(_py(tmp_path, "len.py", code)))
    event = b'"' + b"a" * 1_000_000 + b'"'
    assert (await worker.invoke(event, {}, 10)).body == len(event)
    # a handler that never reads its event still answers (the write is abandoned)
    deaf = await start(Runtime.COMMAND, "sh", args=["-c", "echo '\"deaf\"'"])
    assert (await deaf.invoke(event, {}, 10)).body == "deaf"


async def test_command_concurrency_and_refill(start: StartWorker, tmp_path: Path) -> None:
    code = """
import json, os, sys, time
event = json.load(sys.stdin)
time.sleep(0.2)
print(json.dumps({"i": event["i"], "pid": os.getpid()}))
"""
    worker = await start(
        Runtime.COMMAND,
        str(_py(tmp_path, "slow.py", code)),
        target_concurrency=4,
        max_concurrency=4,
    )
    assert worker.concurrency == 4
    await _eventually(lambda: worker.ready == 5)
    assert worker.ready == 5  # concurrency + one spare
    began = time.monotonic()
    results = await asyncio.gather(
        *(worker.invoke(f'{{"i": {i}}}'.encode(), {}, 10) for i in range(4))
    )
    elapsed = time.monotonic() - began
    assert [r.body["i"] for r in results] == [0, 1, 2, 3]
    assert len({r.body["pid"] for r in results}) == 4  # one process per invocation
    assert elapsed < 0.7, f"4 x 0.2 s in parallel took {elapsed:.2f}s"
    assert worker.unready_takes == 0
    await _eventually(lambda: worker.ready == 5)
    assert worker.ready == 5
    assert worker.spawned == 9


async def test_pool_size_is_bounded(start: StartWorker) -> None:
    worker = await start(Runtime.COMMAND, "cat", target_concurrency=100, max_concurrency=100)
    assert worker.concurrency == 100
    await _eventually(lambda: worker.ready == MAX_READY + 1)
    await asyncio.sleep(0.05)
    assert worker.ready == MAX_READY + 1
    assert (await worker.invoke(b'{"cat": 1}', {}, 5)).body == {"cat": 1}


async def test_close_leaves_nothing_and_stops_serving(start: StartWorker, tmp_path: Path) -> None:
    worker = await start(Runtime.COMMAND, "sh", args=["-c", "read x; sleep 300; echo 1"])
    pids = worker.pids()
    assert len(pids) == 2
    busy = asyncio.create_task(worker.invoke(b"{}\n", {}, 60))
    await asyncio.sleep(0.1)
    pids = worker.pids()
    await worker.close()
    await worker.close()  # idempotent
    with pytest.raises(HandlerFailed, match="killed by signal 9"):
        await busy
    assert await _gone(pids)
    assert not worker.alive()
    with pytest.raises(WorkerGone):
        await worker.invoke(b"{}", {}, 1)


async def test_handler_removed_makes_the_worker_gone(start: StartWorker, tmp_path: Path) -> None:
    script = _script(tmp_path, "h.sh", "#!/bin/sh\necho 1\n")
    worker = await start(Runtime.COMMAND, str(script))
    script.unlink()
    for _ in range(4):  # the pre-spawned ones may still answer; then it cannot spawn any more
        try:
            await worker.invoke(b"{}", {}, 5)
        except HandlerFailed:  # a pre-spawned one that had not exec'd the script yet
            pass
        except WorkerGone:
            break
    else:
        pytest.fail("the worker kept serving without its executable")
    assert not worker.alive()


async def test_a_ready_process_killed_while_waiting_is_replaced(
    start: StartWorker, tmp_path: Path
) -> None:
    worker = await start(Runtime.COMMAND, str(_py(tmp_path, "echo.py", ECHO)))
    await _eventually(lambda: worker.ready == 2)
    pids = worker.pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert await _gone(pids)
    assert (await worker.invoke(b"1", {}, 10)).body == {"got": 1}
    assert worker.unready_takes == 1


DAEMON = """
import asyncio, sys
from pathlib import Path
from blixard.domain.function import FunctionSpec, Runtime
from blixard.functions.command import CommandRuntime

async def main():
    spec = FunctionSpec(runtime=Runtime.COMMAND, handler="cat")
    worker = await CommandRuntime().start_worker("f", spec, Path(sys.argv[1]))
    while worker.ready < 2:
        await asyncio.sleep(0.01)
    print(*worker.pids(), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_pre_spawned_processes_die_with_the_daemon(tmp_path: Path) -> None:
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DAEMON, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert daemon.stdout is not None
    async with asyncio.timeout(10):
        line = await daemon.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    daemon.kill()
    await daemon.wait()
    assert await _gone(pids)  # not left to read EOF and run on an empty event


async def test_command_check(tmp_path: Path) -> None:
    runtime = CommandRuntime()
    ok = _script(tmp_path, "ok.sh", "#!/bin/sh\necho 1\n")
    await runtime.check(FunctionSpec(runtime=Runtime.COMMAND, handler=str(ok)))
    await runtime.check(FunctionSpec(runtime=Runtime.COMMAND, handler="cat"))
    plain = tmp_path / "plain.sh"
    plain.write_text("echo 1\n")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(plain): "not executable",
        str(tmp_path): "not a file",
        "no-such-command-here": "no executable",
        "bin/sh": "absolute path",
    }
    for handler, reason in cases.items():
        with pytest.raises(ValidationError) as caught:
            await runtime.check(FunctionSpec(runtime=Runtime.COMMAND, handler=handler))
        assert caught.value.field == "handler"
        assert reason in caught.value.reason, caught.value.reason


async def test_command_start_fails_when_the_handler_dies_at_once(tmp_path: Path) -> None:
    spec = FunctionSpec(
        runtime=Runtime.COMMAND, handler="sh", args=["-c", "echo 'bad config' >&2; exit 2"]
    )
    with pytest.raises(HandlerFailed, match="exited with status 2: bad config"):
        await CommandRuntime().start_worker("bad", spec, tmp_path)
    missing = FunctionSpec(runtime=Runtime.COMMAND, handler=str(tmp_path / "nope"))
    with pytest.raises(HandlerFailed, match="does not exist"):
        await CommandRuntime().start_worker("bad", missing, tmp_path)


async def test_handler_environment_is_not_the_daemons(start: StartWorker) -> None:
    os.environ["BLIXARD_TEST_SECRET"] = "s3cret"
    try:
        worker = await start(
            Runtime.COMMAND, "sh", args=["-c", 'printf \'"%s"\' "$BLIXARD_TEST_SECRET"']
        )
    finally:
        del os.environ["BLIXARD_TEST_SECRET"]
    assert (await worker.invoke(b"{}", {}, 5)).body == ""


def test_registry() -> None:
    runtimes = process_runtimes()
    assert set(runtimes) == {Runtime.COMMAND, Runtime.NIX}
    assert runtimes[Runtime.NIX].name == "nix" and runtimes[Runtime.COMMAND].name == "command"
