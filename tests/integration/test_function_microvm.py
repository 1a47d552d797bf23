"""The ``microvm`` function runtime with real QEMU guests under TCG: no mocks.

One runtime serves the whole module: its first worker is a boot (no template
exists yet: the fallback), which also starts building the template; then
``prewarm`` waits for the template and its pool, and every other test takes
clones from it. About 15-25 s in all on these hosts.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from blixard.domain.errors import ValidationError
from blixard.domain.function import FunctionSpec
from blixard.functions.microvm import MicroVmRuntime, MicroVmWorker
from blixard.functions.runtime import HandlerFailed, HandlerTimeout, Response, WorkerGone
from blixard.images import AGENT_VERSION, FUNCTION_IMAGE, Image, build_image
from blixard.images.function_agent import agent_init_script, reseed_crng_elf

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ECHO = 'read -r e; echo "{\\"statusCode\\":201,\\"body\\":$e}"'


def spec(handler: str, **kw: Any) -> FunctionSpec:
    return FunctionSpec(runtime="microvm", handler=handler, **kw)


def ctx(request_id: str = "req-1") -> dict[str, Any]:
    return {"function": "f", "requestId": request_id, "http": None}


def qemu_pids(run_dir: Path) -> list[int]:
    """Live QEMU processes whose command line names ``run_dir`` (ours only)."""
    found = []
    needle = str(run_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in argv and needle in argv and state != "Z":
            found.append(int(proc.name))
    return found


@dataclass
class Module:
    runtime: MicroVmRuntime
    run_dir: Path
    work: Path
    boot_worker: MicroVmWorker
    boot_logs: list[dict[str, Any]]
    boot_answer: Response


@pytest.fixture(scope="module")
def function_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    images = tmp_path_factory.getbasetemp() / "guest-images"
    return build_image(FUNCTION_IMAGE, images, function_agent=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mod(
    function_image: Image, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Module]:
    # Deeper than a unix socket path allows: the runtime must cope (sockets bound via fds).
    run_dir = tmp_path_factory.mktemp("fnrun") / ("deep-" * 14)
    work = tmp_path_factory.mktemp("fnwork")
    runtime = MicroVmRuntime(function_image.path.parent, run_dir, pool_size=2)
    with capture_logs() as logs:
        boot_worker = await runtime.start_worker("f", spec(ECHO), work)
    answer = await boot_worker.invoke(b'{"first":true}\n', ctx(), 10)
    assert await runtime.prewarm(128, 1, fill_timeout_s=60)
    yield Module(runtime, run_dir, work, boot_worker, logs, answer)
    await runtime.close()
    assert qemu_pids(run_dir) == []
    assert not list((run_dir / "vm").iterdir())
    assert not list((run_dir / "templates").iterdir())


async def start(mod: Module, handler: str, **kw: Any) -> MicroVmWorker:
    worker = await mod.runtime.start_worker("f", spec(handler, **kw), mod.work)
    assert worker.started_from == "template"
    return worker


async def test_boot_fallback_when_no_template_yet(mod: Module) -> None:
    assert mod.boot_worker.started_from == "boot"
    assert any(e["event"] == "microvm.boot_fallback" for e in mod.boot_logs)
    assert mod.boot_answer == Response(201, {"first": True})
    assert (await mod.boot_worker.invoke(b"2\n", ctx(), 10)).body == 2
    pid = mod.boot_worker.pid
    await mod.boot_worker.close()
    assert not mod.boot_worker.alive()
    assert pid not in qemu_pids(mod.run_dir)


async def test_template_clone_answers_first_invocation(mod: Module) -> None:
    assert mod.runtime.template_for(128) is not None
    assert mod.runtime.template_for(128).state.stat().st_size < 1_000_000  # type: ignore[union-attr]
    started = time.monotonic()
    worker = await start(mod, ECHO)
    answer = await worker.invoke(b'{"hello":"world"}\n', ctx(), 10)
    first_answer_s = time.monotonic() - started
    assert answer == Response(201, {"hello": "world"})
    assert first_answer_s < 5  # ~0.02-0.1 s here; generous for a loaded CI host
    await worker.close()
    pool = mod.runtime.pool_for(128)
    assert pool is not None
    assert await pool.wait_filled(30)  # refilled in the background
    assert pool.ready_count == 2


async def test_two_invocations_on_one_warm_vm(mod: Module) -> None:
    counter = (
        "c=$(cat /tmp/count 2>/dev/null || echo 0); c=$((c+1)); echo $c > /tmp/count; "
        'echo "{\\"count\\":$c}"'
    )
    worker = await start(mod, counter)
    assert (await worker.invoke(b"{}", ctx(), 10)).body == {"count": 1}
    assert (await worker.invoke(b"{}", ctx(), 10)).body == {"count": 2}
    await worker.close()


async def test_events_with_any_bytes_args_env_and_ids(mod: Module) -> None:
    handler = (
        'n=$(wc -c); echo "{\\"n\\":$n,\\"a1\\":\\"$1\\",\\"a2\\":\\"$2\\",\\"foo\\":\\"$FOO\\",'
        '\\"fn\\":\\"$BLIXARD_FUNCTION\\",\\"req\\":\\"$BLIXARD_REQUEST_ID\\"}"'
    )
    worker = await start(mod, handler, args=["x y", "it's"], env={"FOO": "a b'c"})
    for event in (b"a\x00b\nc\xff\n", b"x" * 5000, b"", bytes(range(1, 256))):
        body = (await worker.invoke(event, ctx("r-42"), 10)).body
        assert body == {"n": len(event), "a1": "x y", "a2": "it's", "foo": "a b'c"} | {
            "fn": "f",
            "req": "r-42",
        }
    out = await start(mod, "cat")  # output bytes come back exactly, whatever the mode
    big = b'"' + b"y" * 3000 + b'"'
    assert (await out.invoke(big, ctx(), 10)).body == "y" * 3000
    await worker.close()
    await out.close()


async def test_handler_crash_is_handler_failed_and_vm_still_serves(mod: Module) -> None:
    handler = 'read -r e; if [ "$e" = crash ]; then echo "boom: bad thing" >&2; exit 3; fi; echo 1'
    worker = await start(mod, handler)
    with pytest.raises(HandlerFailed, match="exited with status 3: boom: bad thing") as info:
        await worker.invoke(b"crash\n", ctx(), 10)
    assert "boom" in info.value.detail
    assert worker.alive()
    assert (await worker.invoke(b"fine\n", ctx(), 10)).body == 1
    await worker.close()


async def test_bad_output_is_handler_failed(mod: Module) -> None:
    worker = await start(
        mod, 'read -r e; if [ "$e" = big ]; then head -c 7000000 /dev/zero; fi; echo not json'
    )
    with pytest.raises(HandlerFailed, match="not JSON"):
        await worker.invoke(b"x\n", ctx(), 10)
    with pytest.raises(HandlerFailed, match="larger than"):
        await worker.invoke(b"big\n", ctx(), 20)
    assert worker.alive()
    await worker.close()


async def test_timeout_kills_the_vm(mod: Module) -> None:
    worker = await start(mod, 'read -r e; [ "$e" = slow ] && sleep 30; echo 1')
    assert (await worker.invoke(b"fast\n", ctx(), 10)).body == 1
    pid = worker.pid
    started = time.monotonic()
    with pytest.raises(HandlerTimeout, match=r"timeout of 0\.5s"):
        await worker.invoke(b"slow\n", ctx(), 0.5)
    assert time.monotonic() - started < 3
    assert not worker.alive()
    with pytest.raises(WorkerGone):
        await worker.invoke(b"fast\n", ctx(), 10)
    await worker.close()
    assert pid not in qemu_pids(mod.run_dir)


async def test_a_cancelled_invocation_discards_the_vm(mod: Module) -> None:
    """The gateway may cancel mid-exchange: the channel is then out of step, so no reuse."""
    worker = await start(mod, "sleep 30")
    call = asyncio.create_task(worker.invoke(b"", ctx(), 60))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not worker.alive()
    with pytest.raises(WorkerGone):
        await worker.invoke(b"", ctx(), 10)
    await worker.close()


async def test_close_leaves_no_process_or_files(mod: Module) -> None:
    worker = await start(mod, ECHO)
    pid, vm_dir = worker.pid, worker.vm_dir
    assert pid in qemu_pids(mod.run_dir) and vm_dir.is_dir()
    await worker.close()
    await worker.close()  # idempotent
    assert pid not in qemu_pids(mod.run_dir)
    assert not vm_dir.exists()
    with pytest.raises(WorkerGone):
        await worker.invoke(b"1\n", ctx(), 10)


async def test_check_refuses_a_missing_or_plain_image(mod: Module, tmp_path: Path) -> None:
    await mod.runtime.check(spec(ECHO))
    with pytest.raises(ValidationError, match="memory_mib"):
        await mod.runtime.check(spec(ECHO, memory_mib=32))
    missing = MicroVmRuntime(tmp_path / "no-images", tmp_path / "run")
    with pytest.raises(ValidationError, match="not found"):
        await missing.check(spec(ECHO))
    plain = tmp_path / "images" / "function"
    plain.mkdir(parents=True)
    image_dir = mod.runtime.images_dir / mod.runtime.image_name
    for name in ("vmlinux", "initrd.cpio"):
        os.symlink(image_dir / name, plain / name)
    manifest = (image_dir / "image.json").read_text().replace('"guest_agent"', '"x"')
    (plain / "image.json").write_text(manifest)
    with pytest.raises(ValidationError, match="no function guest agent"):
        await MicroVmRuntime(plain, tmp_path / "run").check(spec(ECHO))


async def test_clones_get_their_own_randomness_and_the_hosts_clock(mod: Module) -> None:
    """Clones start from one saved state: the agent must reseed the CRNG and set the clock."""
    handler = (
        "r=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); reseed-crng; "
        'echo "{\\"r\\":\\"$r\\",\\"t\\":$(date +%s),\\"reseed\\":$?}"'
    )
    seen = set()
    for _ in range(2):
        worker = await start(mod, handler)
        body = (await worker.invoke(b"", ctx(), 10)).body
        assert body["reseed"] == 0  # the hand-made ioctl binary runs in the guest
        assert abs(body["t"] - time.time()) < 5
        seen.add(body["r"])
        await worker.close()
    assert len(seen) == 2


async def test_function_image_manifest_and_contents(function_image: Image) -> None:
    manifest = json.loads((function_image.path / "image.json").read_text())
    assert manifest["guest_agent"] == AGENT_VERSION
    assert "mitigations=off" in manifest["cmdline"].split()
    assert function_image.modules == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_mmio.ko",
        "virtio_console.ko",
    ]
    archive = function_image.initrd.read_bytes()  # newc: names are plain text
    assert b"bin/reseed-crng\x00" in archive and reseed_crng_elf() in archive
    assert agent_init_script().encode() in archive


async def test_a_lost_template_means_a_boot_and_a_rebuild(mod: Module) -> None:
    """Last in the module: it breaks the shared template (the runtime must heal it)."""
    template = mod.runtime.template_for(128)
    assert template is not None
    template.state.unlink()
    pool = mod.runtime.pool_for(128)
    assert pool is not None
    while pool.ready_count:  # the ready clones were restored already: use them up first
        vm, _ = await pool.take()
        await vm.kill()
    with capture_logs() as logs:
        worker = await mod.runtime.start_worker("f", spec(ECHO), mod.work)
    assert worker.started_from == "boot"
    events = [e["event"] for e in logs]
    assert "microvm.clone_failed" in events and "microvm.boot_fallback" in events
    assert (await worker.invoke(b"3\n", ctx(), 10)).body == 3
    await worker.close()
    assert await mod.runtime.prewarm(128, 1, fill_timeout_s=60)
    assert (await start(mod, ECHO)).started_from == "template"
