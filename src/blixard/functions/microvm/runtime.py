"""The ``microvm`` runtime: each worker is one QEMU microVM with the guest agent.

**Handler.** ``spec.handler`` is a shell command line run by the guest's
busybox ``sh`` (sourced in a subshell, so ``exit``, pipes and functions work)
with the event on stdin; its stdout is the response, read with
:func:`~blixard.functions.runtime.parse_response`. ``spec.args`` are its
positional parameters (``"$1"``...), ``spec.env`` is exported, and
``BLIXARD_FUNCTION`` / ``BLIXARD_REQUEST_ID`` are set. The guest has busybox
only (no network, no disk): handlers are shell, awk, sed and friends.
Example: ``read -r e; echo "{\\"statusCode\\":200,\\"body\\":$e}"``.
Invocations on one worker share its VM: files a handler leaves in ``/tmp``
are there for the next one (like a warm container elsewhere), never for
another worker or function.

**Cold starts.** A worker starts from a template clone (see
:mod:`.pool`) when this node has a template for the image and VM shape
(memory, vCPUs); otherwise it boots the image (~2-4 s under TCG here) and a
template for that shape is built in the background, so only the first cold
start of a shape on a node pays a boot (logged as ``microvm.boot_fallback``).
:meth:`MicroVmRuntime.prewarm` builds a template and fills its pool ahead
of time (at node start). Templates are keyed by memory and vCPUs because a
clone must have exactly its template's RAM size and CPUs. A template lives
as long as the runtime (the node process): after rebuilding the image,
restart the node.

**Timeouts.** Past ``timeout_s`` the VM is discarded (SIGKILL of QEMU): that
kills the handler and everything it started, whatever state it left. The
invocation raises HandlerTimeout; the worker is then dead (``alive()`` is
False, the next invoke raises WorkerGone) and the gateway starts another,
which costs one pool clone (~20 ms), not a boot. The same holds when the
caller cancels an invocation mid-way: the channel's state is unknown.

**Failures.** A non-zero exit or output that is not a response raises
HandlerFailed (stderr tail as detail); the VM is unharmed and keeps serving.

Concurrency is 1 per worker: the agent runs one handler at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from blixard.domain.errors import ValidationError
from blixard.domain.function import FunctionSpec
from blixard.drivers.qemu.boot import GuestImage, read_image
from blixard.drivers.qemu.cmdline import AccelName, host_tsc_khz
from blixard.functions.microvm.agent import AGENT_VERSION, AgentError, handler_script
from blixard.functions.microvm.pool import ClonePool, Template, build_template
from blixard.functions.microvm.vm import MicroVm, VmConfig, VmError, wait_ready
from blixard.functions.runtime import (
    MAX_OUTPUT_BYTES,
    HandlerFailed,
    HandlerTimeout,
    Response,
    WorkerGone,
    parse_response,
)

log = structlog.get_logger(__name__)

#: The image the runtime boots unless told otherwise (built with
#: ``build_image(FUNCTION_IMAGE, images_dir, function_agent=True)``).
DEFAULT_IMAGE = "function"
MANIFEST = "image.json"

#: Smallest guest: kernel + busybox + a 16 MiB I/O tmpfs need headroom.
MIN_MEMORY_MIB = 64
#: Largest event sent to a guest: it must fit the guest's 16 MiB I/O tmpfs
#: beside the handler's output.
MAX_EVENT_BYTES = 8 * 1024 * 1024

Shape = tuple[int, int]  # (memory_mib, vcpus)


def _shape_name(shape: Shape) -> str:
    return f"{shape[0]}m-{shape[1]}c"


@dataclass
class StartStats:
    """How cold starts went on this runtime (for metrics and the benchmark)."""

    from_template: int = 0
    from_boot: int = 0
    last_start_s: float = 0.0
    last_path: str = ""


@dataclass
class _Slot:
    """One VM shape: its template (once built) and its clone pool."""

    shape: Shape
    pool: ClonePool | None = None
    building: asyncio.Task[None] | None = None
    error: str = ""


class MicroVmRuntime:
    """Runtime ``microvm`` (see the module docstring).

    ``images_dir`` is either an images directory (the image ``image`` in it
    is used) or the directory of one image (with its ``image.json``).
    ``run_dir`` holds templates (guest RAM files: 128 MiB each for the default
    shape, mostly sparse) and VM directories; tmpfs makes clones' first page
    faults cheaper. ``pool_size`` clones are kept per
    shape; ``warm_pool`` keeps them restored and warmed (see :mod:`.pool`);
    ``templates=False`` boots every worker (the cold-from-boot baseline).
    """

    name = "microvm"

    def __init__(
        self,
        images_dir: Path,
        run_dir: Path,
        *,
        image: str = DEFAULT_IMAGE,
        pool_size: int = 2,
        warm_pool: bool = True,
        templates: bool = True,
        accel: AccelName = "tcg",
        qemu_binary: str = "qemu-system-x86_64",
        boot_timeout_s: float = 30.0,
    ) -> None:
        if (images_dir / MANIFEST).is_file():
            self.images_dir, self.image_name = images_dir.parent, images_dir.name
        else:
            self.images_dir, self.image_name = images_dir, image
        self.run_dir = run_dir
        self.pool_size = pool_size
        self.warm_pool = warm_pool
        self.templates = templates
        self.accel: AccelName = accel
        self.qemu_binary = qemu_binary
        self.boot_timeout_s = boot_timeout_s
        self.stats = StartStats()
        self._tsc_khz = host_tsc_khz()
        self._slots: dict[Shape, _Slot] = {}
        self._workers: set[MicroVmWorker] = set()
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(3)
        self._closed = False

    # --- image and paths -------------------------------------------------------------

    def image(self) -> GuestImage:
        """The guest image; ValidationError if it is missing or not a function image."""
        try:
            image = read_image(self.images_dir, self.image_name, field="microvm image")
        except Exception as exc:  # NotFound, DriverError: both carry the reason
            raise ValidationError("runtime", f"the microvm runtime cannot boot: {exc}") from None
        try:
            manifest = json.loads((self.images_dir / self.image_name / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValidationError("runtime", f"microvm image manifest unreadable: {exc}") from None
        agent = manifest.get("guest_agent") if isinstance(manifest, dict) else None
        if agent != AGENT_VERSION:
            raise ValidationError(
                "runtime",
                f"image {self.image_name!r} in {self.images_dir} has no function guest agent "
                f"(manifest guest_agent={agent!r}, need {AGENT_VERSION!r}); build it with "
                f"build_image({self.image_name!r}, images_dir, function_agent=True)",
            )
        return image

    def _vm_dir(self) -> Path:
        return self.run_dir / "vm" / f"{self._prefix}{next(self._ids):x}"

    def _config(self, shape: Shape) -> VmConfig:
        return VmConfig(
            image=self.image(),
            memory_mib=shape[0],
            vcpus=shape[1],
            accel=self.accel,
            tsc_khz=self._tsc_khz,
            qemu_binary=self.qemu_binary,
        )

    # --- Runtime ---------------------------------------------------------------------

    async def check(self, spec: FunctionSpec) -> None:
        self.image()
        if spec.memory_mib < MIN_MEMORY_MIB:
            raise ValidationError(
                "memory_mib", f"a microvm function needs at least {MIN_MEMORY_MIB} MiB"
            )
        for i, arg in enumerate(spec.args):
            if "\x00" in arg:
                raise ValidationError(f"args[{i}]", "must not contain NUL")

    async def start_worker(self, name: str, spec: FunctionSpec, work_dir: Path) -> MicroVmWorker:
        """A clone of this shape's template if there is one, else a boot (see module doc)."""
        if self._closed:
            raise HandlerFailed("the microvm runtime is shut down")
        shape: Shape = (spec.memory_mib, spec.vcpus)
        started = time.monotonic()
        try:
            config = self._config(shape)
        except ValidationError as exc:
            raise HandlerFailed(f"cannot start a microVM: {exc.reason}") from None
        slot = self._slots.setdefault(shape, _Slot(shape))
        set_clock = False
        path: Literal["template", "boot"] = "boot"
        try:
            vm: MicroVm | None = None
            if self.templates and slot.pool is not None:
                vm, set_clock = await self._take_clone(slot, name)
                path = "template"
            if vm is None:
                if self.templates:
                    log.info(
                        "microvm.boot_fallback",
                        function=name,
                        shape=_shape_name(shape),
                        reason="no usable template for this image and shape on this node yet: "
                        "booting; a template is being built in the background",
                    )
                    self._ensure_template(slot)
                vm, path = await self._boot(config), "boot"
            try:
                script = handler_script(name, spec.handler, spec.args, spec.env)
                async with asyncio.timeout(10):
                    await vm.agent.install(script, set_clock=set_clock)
            except BaseException:
                await vm.kill()
                raise
        except (VmError, AgentError, TimeoutError, OSError) as exc:
            raise HandlerFailed(f"the microVM for {name} did not start: {exc}") from None
        elapsed = time.monotonic() - started
        if path == "template":
            self.stats.from_template += 1
        else:
            self.stats.from_boot += 1
        self.stats.last_start_s, self.stats.last_path = elapsed, path
        with contextlib.suppress(OSError):
            (work_dir / "vm").symlink_to(vm.dir)
        worker = MicroVmWorker(name, vm, path, self._workers.discard)
        self._workers.add(worker)
        log.debug("microvm.worker_started", function=name, path=path, ms=round(elapsed * 1000))
        return worker

    # --- templates and pools ---------------------------------------------------------

    async def _take_clone(self, slot: _Slot, name: str) -> tuple[MicroVm | None, bool]:
        """A clone from the pool; (None, False) when the template proved unusable.

        A clone that fails to start is not the caller's problem: this start
        boots instead. If the template's files are gone (a cleaned run dir)
        the pool is dropped and the template rebuilt in the background.
        """
        pool = slot.pool
        assert pool is not None
        try:
            return await pool.take()
        except (VmError, AgentError, OSError) as exc:
            broken = not (pool.template.state.is_file() and pool.template.ram.is_file())
            log.warning(
                "microvm.clone_failed",
                function=name,
                shape=_shape_name(slot.shape),
                error=str(exc),
                template_broken=broken,
            )
            if broken and slot.pool is pool:
                slot.pool = None
                await pool.close()
            return None, False

    async def _boot(self, config: VmConfig) -> MicroVm:
        vm = await MicroVm.spawn(config, self._vm_dir(), how="boot")
        try:
            await wait_ready(vm, self.boot_timeout_s)
        except BaseException:
            await vm.kill()
            raise
        return vm

    def _ensure_template(self, slot: _Slot) -> asyncio.Task[None]:
        if slot.building is None or (slot.building.done() and slot.pool is None):
            slot.building = asyncio.create_task(
                self._build(slot), name=f"microvm-template-{_shape_name(slot.shape)}"
            )
        return slot.building

    async def _build(self, slot: _Slot) -> None:
        shape = slot.shape
        started = time.monotonic()
        try:
            template = await build_template(
                self._config(shape),
                self.run_dir / "templates" / f"{self.image_name}-{_shape_name(shape)}",
                self._vm_dir(),
                self.boot_timeout_s,
            )
        except (VmError, AgentError, ValidationError, OSError) as exc:
            slot.error = str(exc)
            log.warning("microvm.template_failed", shape=_shape_name(shape), error=str(exc))
            return
        pool = ClonePool(template, self.pool_size, self._vm_dir, warm=self.warm_pool)
        if self._closed:
            await pool.close()
            return
        slot.pool, slot.error = pool, ""
        pool.start()
        log.info(
            "microvm.template_ready",
            shape=_shape_name(shape),
            ms=round((time.monotonic() - started) * 1000),
            state_bytes=template.state.stat().st_size,
        )

    async def prewarm(
        self, memory_mib: int = 128, vcpus: int = 1, *, fill_timeout_s: float = 60.0
    ) -> bool:
        """Build the template of this shape (if needed) and wait for its pool to fill.

        Call at node start for the common shapes. Returns whether the pool is
        full; raises HandlerFailed if the template cannot be built.
        """
        slot = self._slots.setdefault((memory_mib, vcpus), _Slot((memory_mib, vcpus)))
        if slot.pool is None:
            await self._ensure_template(slot)
        if slot.pool is None:
            raise HandlerFailed(f"cannot build a microVM template: {slot.error}")
        return await slot.pool.wait_filled(fill_timeout_s)

    def pool_for(self, memory_mib: int, vcpus: int = 1) -> ClonePool | None:
        """The clone pool of this shape (None until its template is built)."""
        slot = self._slots.get((memory_mib, vcpus))
        return slot.pool if slot is not None else None

    def template_for(self, memory_mib: int, vcpus: int = 1) -> Template | None:
        pool = self.pool_for(memory_mib, vcpus)
        return pool.template if pool is not None else None

    async def close(self) -> None:
        """Stop building, kill pooled clones and every worker still open; remove VM dirs.

        Templates are removed too: a template is only trusted by the process
        that saved it (same QEMU binary, same image), the next one rebuilds.
        """
        self._closed = True
        for slot in self._slots.values():
            if slot.building is not None and not slot.building.done():
                slot.building.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.building
            if slot.pool is not None:
                await slot.pool.close()
        for worker in list(self._workers):
            await worker.close()
        for slot in self._slots.values():
            if slot.pool is not None:
                shutil.rmtree(slot.pool.template.dir, ignore_errors=True)


class MicroVmWorker:
    """One microVM serving one function (concurrency 1; see the runtime's docstring)."""

    concurrency = 1

    def __init__(
        self,
        name: str,
        vm: MicroVm,
        started_from: Literal["template", "boot"],
        on_close: Callable[[MicroVmWorker], None],
    ) -> None:
        self.name = name
        self.started_from = started_from
        self._vm = vm
        self._lock = asyncio.Lock()
        self._gone = ""
        self._on_close = on_close
        self._closing: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self._vm.pid

    @property
    def vm_dir(self) -> Path:
        return self._vm.dir

    def alive(self) -> bool:
        return not self._gone and self._vm.alive()

    def _discard(self, reason: str) -> None:
        """Kill the VM now (synchronously: also from a cancelled task); clean up after."""
        if not self._gone:
            self._gone = reason
        if self._vm.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._vm.proc.kill()
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._vm.kill())
        self._on_close(self)

    async def invoke(self, event: bytes, context: dict[str, Any], timeout_s: float) -> Response:
        if len(event) > MAX_EVENT_BYTES:
            raise HandlerFailed(f"the event is larger than {MAX_EVENT_BYTES} bytes")
        async with self._lock:
            if not self.alive():
                reason = self._gone or f"its QEMU exited ({self._vm.proc.returncode})"
                raise WorkerGone(f"{self.name}: the microVM can no longer serve: {reason}")
            request_id = str(context.get("requestId", "-"))
            try:
                async with asyncio.timeout(timeout_s):
                    result = await self._vm.agent.run(request_id, event, MAX_OUTPUT_BYTES)
            except TimeoutError:
                self._discard(f"its handler ran past the {timeout_s:g}s timeout")
                raise HandlerTimeout(
                    f"{self.name}: the handler ran past its timeout of {timeout_s:g}s; "
                    "it was killed with its microVM"
                ) from None
            except AgentError as exc:
                said = self._vm.console_tail(3)
                self._discard(str(exc))
                # The event was sent: it may have run, so this is the call's failure (502),
                # not a worker the gateway may silently replace for the same call.
                raise HandlerFailed(
                    f"{self.name}: the microVM failed during the call: {exc} (console: {said})"
                ) from None
            except BaseException:  # cancelled mid-exchange: the channel is out of step
                self._discard("an invocation was cancelled mid-way")
                raise
        if result.stdout_size > MAX_OUTPUT_BYTES:
            raise HandlerFailed(
                f"the handler's output is larger than {MAX_OUTPUT_BYTES} bytes "
                f"({result.stdout_size})"
            )
        if result.exit_code != 0:
            detail = result.stderr_tail.decode(errors="replace")
            last = detail.strip().splitlines()[-1] if detail.strip() else ""
            message = f"the handler exited with status {result.exit_code}"
            raise HandlerFailed(f"{message}: {last}" if last else message, detail=detail)
        return parse_response(result.stdout)

    async def close(self) -> None:
        """Kill the VM and remove its directory; idempotent."""
        self._discard("closed")
        if self._closing is not None:
            await self._closing
