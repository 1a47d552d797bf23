"""One function microVM: a QEMU process, its QMP session and its guest agent channel.

Function VMs are disposable and belong to this node process: QEMU is a
direct child (in a session of its own, killed by the kernel if the node dies:
PR_SET_PDEATHSIG), not a supervised task like the VMs of the QEMU driver. They
are never shut down politely: ``kill()`` is SIGKILL, then the VM's directory
is removed. Nothing in a function VM is worth keeping.

The orchestrator *listens* on the agent socket and QEMU connects to it at
start-up (chardev ``server=off``), as shared/vmlab/warmstart.py does: the
port is host-connected before the guest runs or resumes, so a guest restored
from a template never sees the EOF of an unconnected port.

Directory of one VM (``<run_dir>/vm/<id>/``)::

    rpc.sock      the agent channel (ours; removed once QEMU connected)
    qmp.sock      QMP (QEMU's), one session held for the VM's life
    console.log   the guest's serial console
    qemu.log      QEMU's own stdout/stderr
    qemu.pid      QEMU's pid (written by QEMU)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blixard.drivers import executor
from blixard.drivers.qemu.boot import GuestImage
from blixard.drivers.qemu.cmdline import (
    UNIX_PATH_MAX,
    AccelName,
    QemuArgs,
    build_argv,
    kernel_append,
    qemu_opt,
)
from blixard.drivers.qemu.driver import log_tail
from blixard.drivers.qemu.qmp import Qmp, QmpError
from blixard.functions.microvm.agent import AgentChannel, AgentError

RPC_SOCKET = "rpc.sock"
QMP_SOCKET = "qmp.sock"
CONSOLE = "console.log"
QEMU_LOG = "qemu.log"
PIDFILE = "qemu.pid"

_CHANNEL_LIMIT = 1 << 16


class VmError(Exception):
    """QEMU did not start, or the VM could not be brought to serve (reason included)."""


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Everything that must be identical between a template and its clones."""

    image: GuestImage
    memory_mib: int
    vcpus: int
    accel: AccelName
    tsc_khz: int | None
    qemu_binary: str = "qemu-system-x86_64"


@dataclass(frozen=True, slots=True)
class RamFile:
    """Guest RAM in a file: ``share=True`` for a template (its RAM *is* the file),
    ``False`` for a clone (a private copy-on-write mapping of the template's file)."""

    path: Path
    share: bool


def vm_argv(
    config: VmConfig, vm_dir: Path, *, ram: RamFile | None, incoming: bool, name: str
) -> list[str]:
    """QEMU's argv: the driver's fast microvm command line plus the agent port.

    Paths of sockets are relative (QEMU runs in ``vm_dir``) so they always fit.
    """
    extra = [
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=rpc,path={RPC_SOCKET}",
        "-device",
        "virtserialport,chardev=rpc,name=rpc",
    ]
    if ram is not None:
        extra += [
            "-object",
            f"memory-backend-file,id=ram0,size={config.memory_mib}M,"
            f"mem-path={qemu_opt(str(ram.path))},share={'on' if ram.share else 'off'}",
            "-machine",
            "memory-backend=ram0",
        ]
    if incoming:
        extra += ["-incoming", "defer"]
    args = QemuArgs(
        kernel=config.image.kernel,
        initrd=config.image.initrd,
        append=kernel_append(config.accel, config.image.cmdline, config.tsc_khz),
        accel=config.accel,
        vcpus=config.vcpus,
        memory_mib=config.memory_mib,
        qmp_socket=QMP_SOCKET,
        pidfile=vm_dir / PIDFILE,
        console_log=vm_dir / CONSOLE,
        qemu_binary=config.qemu_binary,
        name=name,
        extra=extra,
    )
    return build_argv(args)


class MicroVm:
    """A started QEMU whose agent channel and QMP session are connected."""

    def __init__(
        self,
        vm_dir: Path,
        proc: asyncio.subprocess.Process,
        qmp: Qmp,
        agent: AgentChannel,
        how: Literal["boot", "clone", "template"],
    ) -> None:
        self.dir = vm_dir
        self.proc = proc
        self.qmp = qmp
        self.agent = agent
        self.how = how
        self.started_at = time.monotonic()
        self._killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self._killed and self.proc.returncode is None

    def console_tail(self, lines: int = 8) -> str:
        return log_tail(self.dir / CONSOLE, lines) or "(no console output)"

    def qemu_said(self) -> str:
        return log_tail(self.dir / QEMU_LOG, 3)

    @classmethod
    async def spawn(
        cls,
        config: VmConfig,
        vm_dir: Path,
        *,
        ram: RamFile | None = None,
        incoming: bool = False,
        how: Literal["boot", "clone", "template"] = "boot",
        timeout_s: float = 10.0,
    ) -> MicroVm:
        """Start QEMU; return once it connected to our agent socket and QMP answers.

        For a boot the guest is then running (wait for :meth:`AgentChannel.ready`);
        with ``incoming`` it waits, device model only, for ``migrate-incoming``.
        """
        vm_dir.mkdir(mode=0o700, parents=True)
        connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if connected.done():
                writer.close()  # only QEMU may connect, and only once
            else:
                connected.set_result((reader, writer))

        server = await asyncio.start_unix_server(
            on_connect, sock=_listen(vm_dir / RPC_SOCKET), limit=_CHANNEL_LIMIT
        )
        argv = vm_argv(config, vm_dir, ram=ram, incoming=incoming, name=f"fn-{vm_dir.name}")
        proc: asyncio.subprocess.Process | None = None
        try:
            with open(vm_dir / QEMU_LOG, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=vm_dir,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=executor.die_with_parent,
                )
            exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
            pending: set[asyncio.Future[Any]] = {connected, exited}
            try:
                async with asyncio.timeout(timeout_s):
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if exited in done:
                        raise VmError(
                            f"QEMU exited with {proc.returncode} at start: "
                            f"{log_tail(vm_dir / QEMU_LOG, 3) or '(no message)'}"
                        )
                    reader, writer = connected.result()
                    qmp = await _qmp_connect(vm_dir / QMP_SOCKET, proc)
            except TimeoutError:
                raise VmError(f"QEMU did not start within {timeout_s}s") from None
            finally:
                exited.cancel()
        except BaseException:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                (vm_dir / RPC_SOCKET).unlink()
        return cls(vm_dir, proc, qmp, AgentChannel(reader, writer), how)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self.qmp.execute(command, arguments)
        except QmpError as exc:
            raise VmError(str(exc)) from None

    async def restore(self, state: Path, timeout_s: float = 10.0) -> None:
        """Load a template's saved state into this ``-incoming defer`` QEMU and run it.

        ``x-ignore-shared``: the RAM is not in the stream (it is the template's
        file, mapped copy-on-write), so only ~50 kB of device state is read.
        """
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        await self.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
        deadline = time.monotonic() + timeout_s
        while True:
            status = (await self.execute("query-status"))["status"]
            if status in ("paused", "running", "postmigrate"):
                break
            if status not in ("inmigrate", "prelaunch") or time.monotonic() > deadline:
                raise VmError(f"loading the template state failed (VM status {status})")
            await asyncio.sleep(0.001)
        if status != "running":  # the template was stopped before it was saved
            await self.execute("cont")

    async def save(self, state: Path, timeout_s: float = 30.0) -> None:
        """Stop the VM and write its device state to ``state`` (RAM stays in its shared file)."""
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        await self.execute("stop")
        await self.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise VmError(
                    f"saving the template failed ({status}): {info.get('error-desc', '')}"
                )
            await asyncio.sleep(0.002)

    async def kill(self) -> None:
        """SIGKILL QEMU, reap it, remove the VM's directory. Idempotent."""
        self._killed = True
        self.agent.close()
        with contextlib.suppress(Exception):
            await self.qmp.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, however long (through the directory's fd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(str(path).encode()) <= UNIX_PATH_MAX:
            sock.bind(str(path))
        else:
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            try:
                sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
            finally:
                os.close(dir_fd)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def _qmp_connect(path: Path, proc: asyncio.subprocess.Process) -> Qmp:
    """QMP, retried while QEMU is still creating its socket."""
    while True:
        try:
            return await Qmp.connect(path, timeout_s=5.0)
        except QmpError:
            if proc.returncode is not None:
                raise VmError(f"QEMU exited with {proc.returncode} at start") from None
            await asyncio.sleep(0.005)


async def wait_ready(vm: MicroVm, timeout_s: float) -> None:
    """Wait for a booted guest's agent to say READY (the console tail if it never does)."""
    try:
        async with asyncio.timeout(timeout_s):
            await vm.agent.ready()
            await vm.agent.ping()
    except TimeoutError:
        raise VmError(
            f"the guest agent did not start within {timeout_s}s; console: {vm.console_tail()}"
        ) from None
    except AgentError as exc:
        said = vm.qemu_said()
        raise VmError(
            f"{exc}; console: {vm.console_tail()}" + (f"; QEMU said: {said}" if said else "")
        ) from None
