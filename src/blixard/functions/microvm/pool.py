"""Templates and pools of pre-started clones: how a microVM cold start skips the boot.

A *template* is one guest booted once per node, image and VM shape (memory,
vCPUs), its agent answering, then frozen: guest RAM lives in a file mapped
``share=on``, so saving it (QMP ``migrate`` to ``exec:cat > state`` with
capability ``x-ignore-shared``) writes only ~50 kB of device state. Templates
are not per function: the handler is installed after the restore.

A *clone* is a QEMU started with ``-incoming defer`` and the template's RAM
file mapped ``share=off`` (private copy-on-write: the template file never
changes), then ``migrate-incoming`` of the state. Measured here under TCG
(benchmarks/functions_microvm.py): the restore itself takes ~10 ms, but the
first answers of a fresh clone are slow (~150-250 ms to a first invocation)
because TCG translates the guest's code anew in every QEMU process. So the
pool, by default, holds clones already *restored and warmed*: loaded,
clock set, one dummy install and invocation run, left running idle (an idle
guest blocked on its port costs ~no CPU; a paused one would let its clock
fall behind). A cold start then is install + first invocation, ~15-30 ms.
``warm=False`` keeps the plain pre-started processes instead (restore at
take time), for comparison.

The pool refills in the background after every take; a take from an empty
pool makes a clone on the spot (still far cheaper than a boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from blixard.functions.microvm.agent import handler_script
from blixard.functions.microvm.vm import MicroVm, RamFile, VmConfig, VmError, wait_ready

log = structlog.get_logger(__name__)

RAM_FILE = "ram"
STATE_FILE = "state"

#: What a warming clone runs once: it translates the agent's paths (read, fork,
#: the handler's subshell, the answer) so that a real first invocation is fast.
_WARMUP_HANDLER = "read -r line; echo '{}'"

#: A refill waits this long after a take: making a clone costs a CPU for ~0.2 s,
#: and the cold start that took one is still running its first invocation.
REFILL_DELAY_S = 0.5


@dataclass(frozen=True, slots=True)
class Template:
    """A saved guest: its RAM file (never written after the save) and device state."""

    config: VmConfig
    dir: Path

    @property
    def ram(self) -> Path:
        return self.dir / RAM_FILE

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE


async def build_template(
    config: VmConfig, template_dir: Path, vm_dir: Path, boot_timeout_s: float
) -> Template:
    """Boot a guest with its RAM in ``template_dir/ram``, wait for its agent, save it."""
    shutil.rmtree(template_dir, ignore_errors=True)
    template_dir.mkdir(mode=0o700, parents=True)
    template = Template(config, template_dir)
    try:
        vm = await MicroVm.spawn(
            config, vm_dir, ram=RamFile(template.ram, share=True), how="template"
        )
        try:
            await wait_ready(vm, boot_timeout_s)
            partial = template_dir / (STATE_FILE + ".tmp")
            await vm.save(partial)
            os.replace(partial, template.state)
        finally:
            await vm.kill()
    except BaseException:
        shutil.rmtree(template_dir, ignore_errors=True)
        raise
    return template


class ClonePool:
    """Up to ``size`` clones of ``template``, kept ready by a background task."""

    def __init__(
        self,
        template: Template,
        size: int,
        new_vm_dir: Callable[[], Path],
        *,
        warm: bool = True,
        refill_delay_s: float = REFILL_DELAY_S,
    ) -> None:
        self.template = template
        self.size = size
        self.warm = warm
        self.refill_delay_s = refill_delay_s
        self._new_vm_dir = new_vm_dir
        self._ready: list[MicroVm] = []
        self._kick = asyncio.Event()
        self._filled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._task_started = False
        #: Consecutive failures to make a clone (the pool backs off, then keeps trying).
        self.failures = 0
        self.last_error = ""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refill(), name="microvm-pool-refill")
        self._kick.set()

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    async def wait_filled(self, timeout_s: float) -> bool:
        """Wait until the pool is full (True) or ``timeout_s`` passed (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._filled.wait()
                return True
        return False

    async def take(self) -> tuple[MicroVm, bool]:
        """A running clone, and whether its guest clock still needs setting."""
        if self._closed:
            raise VmError("the clone pool is closed")
        vm: MicroVm | None = None
        while self._ready:
            candidate = self._ready.pop()
            if candidate.alive():
                vm = candidate
                break
            await candidate.kill()
        self._filled.clear()
        self._kick.set()
        if vm is None:
            log.info("microvm.pool_empty", detail="making a clone on the spot")
            return await self._make(restore=True, warmup=False), True
        if not self.warm:
            try:
                await vm.restore(self.template.state)
            except BaseException:
                await vm.kill()
                raise
            return vm, True
        return vm, False

    async def _make(self, *, restore: bool, warmup: bool) -> MicroVm:
        """A pre-started clone; then restored, then warmed up (see the module docstring)."""
        config = self.template.config
        vm = await MicroVm.spawn(
            config,
            self._new_vm_dir(),
            ram=RamFile(self.template.ram, share=False),
            incoming=True,
            how="clone",
        )
        try:
            if restore or warmup:
                await vm.restore(self.template.state)
            if warmup:
                async with asyncio.timeout(30):
                    script = handler_script("warmup", _WARMUP_HANDLER, (), {})
                    await vm.agent.install(script, set_clock=True)
                    await vm.agent.run("warmup", b"{}\n", 1024)
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def _refill(self) -> None:
        """Keep ``size`` clones ready; one at a time (each competes with invocations for CPU)."""
        while not self._closed:
            await self._kick.wait()
            if self._ready or self._task_started:
                await asyncio.sleep(self.refill_delay_s)
            self._task_started = True
            self._kick.clear()
            while not self._closed and len(self._ready) < self.size:
                try:
                    vm = await self._make(restore=self.warm, warmup=self.warm)
                except Exception as exc:  # a background loop must not die
                    self.failures += 1
                    self.last_error = str(exc)
                    delay = min(30.0, 0.5 * 2 ** min(self.failures, 6))
                    log.warning(
                        "microvm.pool_clone_failed",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=self.failures,
                        retry_in_s=delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                if self._closed:
                    await vm.kill()
                    return
                self.failures = 0
                self._ready.append(vm)
            if len(self._ready) >= self.size:
                self._filled.set()

    async def close(self) -> None:
        """Stop refilling and kill every clone waiting in the pool."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ready, self._ready = self._ready, []
        for vm in ready:
            await vm.kill()
