"""Choosing QEMU's accelerator: KVM only where a real guest was seen booting with it.

``/dev/kvm`` existing proves little: on hosts that are themselves microVMs it
can come from ``kvm_pvm``, which runs only guest kernels built for PVM; a
stock guest then hangs, crawls, or aborts QEMU ("failed to set MSR 0x10a").
So :class:`AccelProbe` boots the guest image once with ``-accel kvm`` and a
short timeout and records the verdict in a JSON file, keyed by what decides
it: the host kernel release, the QEMU version and the guest kernel. The
probe runs in the background when the agent starts; until a verdict exists
``auto`` means TCG (always works, just slower), so nothing waits for it.
An explicit ``accel: kvm`` waits for the verdict and is refused, with the
probe's reason, where KVM cannot boot guests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from blixard.domain.errors import BlixardError
from blixard.domain.node import KvmState
from blixard.domain.vm import Accel
from blixard.drivers import executor
from blixard.drivers.protocol import DriverError
from blixard.drivers.qemu.boot import read_image
from blixard.drivers.qemu.cmdline import (
    AccelName,
    QemuArgs,
    build_argv,
    kernel_append,
)

CACHE_FORMAT = 1
DEFAULT_PROBE_TIMEOUT_S = 8.0
_TAIL_BYTES = 2048


@dataclass(frozen=True, slots=True)
class KvmVerdict:
    """What the probe concluded, and why (shown in the node's fingerprint)."""

    state: KvmState
    detail: str
    key: str = ""
    probed_at: str = ""


def _tail(output: bytes, lines: int = 4) -> str:
    text = output[-_TAIL_BYTES:].decode(errors="replace")
    kept = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


class AccelProbe:
    """Decides ``auto`` and checks ``kvm`` (see the module docstring).

    ``cache_path`` is a JSON file under the node's data dir; ``images_dir``
    and ``image`` name the guest booted by the probe.
    """

    def __init__(
        self,
        cache_path: Path,
        images_dir: Path,
        *,
        image: str = "default",
        qemu_binary: str = "qemu-system-x86_64",
        timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
        kvm_device: Path = Path("/dev/kvm"),
    ) -> None:
        self.cache_path = cache_path
        self.images_dir = images_dir
        self.image = image
        self.qemu_binary = qemu_binary
        self.timeout_s = timeout_s
        self.kvm_device = kvm_device
        self._qemu_version: str | None = None
        self._running: asyncio.Task[KvmVerdict] | None = None
        self._last: KvmVerdict | None = None

    # --- the cache key ---------------------------------------------------------------

    async def _qemu_version_text(self) -> str:
        if self._qemu_version is None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.qemu_binary,
                    "--version",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    stdin=asyncio.subprocess.DEVNULL,
                )
                async with asyncio.timeout(10):
                    out, _ = await proc.communicate()
                self._qemu_version = out.decode(errors="replace").splitlines()[0].strip()
            except (OSError, IndexError, TimeoutError):
                self._qemu_version = "unknown"
        return self._qemu_version

    async def _key(self) -> tuple[str, str] | None:
        """(key, description) of the current combination; None without a guest image."""
        try:
            image = read_image(self.images_dir, self.image, field="probe image")
        except BlixardError:
            return None
        qemu = await self._qemu_version_text()
        described = (
            f"host {os.uname().release}; {qemu}; guest {image.kernel_release} "
            f"({image.kernel_sha256[:12]})"
        )
        return hashlib.sha256(described.encode()).hexdigest()[:16], described

    # --- the cache file --------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            raw = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            return {}
        verdicts = raw.get("verdicts")
        return verdicts if isinstance(verdicts, dict) else {}

    def _save(self, key: str, verdict: KvmVerdict, described: str) -> None:
        verdicts = self._load()
        verdicts[key] = {
            "state": verdict.state.value,
            "detail": verdict.detail,
            "probed_at": verdict.probed_at,
            "what": described,
        }
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(self.cache_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "verdicts": verdicts}, indent=2))
        tmp.replace(self.cache_path)

    # --- verdicts --------------------------------------------------------------------

    def _device_problem(self) -> KvmVerdict | None:
        if not self.kvm_device.exists():
            return KvmVerdict(KvmState.ABSENT, f"{self.kvm_device} does not exist")
        if not os.access(self.kvm_device, os.R_OK | os.W_OK):
            return KvmVerdict(
                KvmState.UNUSABLE, f"{self.kvm_device} is not readable and writable by this user"
            )
        return None

    async def verdict(self) -> KvmVerdict | None:
        """The known verdict for this host, QEMU and guest; None until probed."""
        problem = self._device_problem()
        if problem is not None:
            return problem
        key = await self._key()
        if key is None:
            return None
        if self._last is not None and self._last.key == key[0]:
            return self._last
        stored = self._load().get(key[0])
        if stored is None:
            return None
        try:
            state = KvmState(stored["state"])
        except (KeyError, ValueError):
            return None
        self._last = KvmVerdict(
            state, str(stored.get("detail", "")), key[0], str(stored.get("probed_at", ""))
        )
        return self._last

    async def kvm_state(self) -> tuple[KvmState, str]:
        """For the node's fingerprint: AVAILABLE, UNUSABLE or ABSENT, and why."""
        known = await self.verdict()
        if known is not None:
            return known.state, known.detail
        if self._running is not None and not self._running.done():
            return KvmState.UNUSABLE, "probe running: using TCG until a guest boots with KVM"
        if await self._key() is None:
            return (
                KvmState.UNUSABLE,
                f"not probed: no guest image {self.image!r} to probe with; using TCG",
            )
        return KvmState.UNUSABLE, "not probed yet: using TCG until a guest boots with KVM"

    def start_background(self) -> asyncio.Task[KvmVerdict]:
        """Start the probe (once) on the running loop; returns its task."""
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(
                self._probe(), name="blixard-kvm-probe"
            )
        return self._running

    async def probe(self, *, force: bool = False) -> KvmVerdict:
        """The verdict, probing now if none is recorded (or if ``force``)."""
        if not force:
            known = await self.verdict()
            if known is not None:
                return known
        return await asyncio.shield(self.start_background())

    async def _probe(self) -> KvmVerdict:
        problem = self._device_problem()
        if problem is not None:
            return problem
        key = await self._key()
        if key is None:
            return KvmVerdict(
                KvmState.UNUSABLE,
                f"not probed: no guest image {self.image!r} in {self.images_dir} to probe with",
            )
        image = read_image(self.images_dir, self.image, field="probe image")
        state, detail = await self._boot_once(
            image.kernel, image.initrd, image.cmdline, image.ready_line
        )
        verdict = KvmVerdict(state, detail, key[0], datetime.now(UTC).isoformat(timespec="seconds"))
        self._save(key[0], verdict, key[1])
        self._last = verdict
        return verdict

    async def _boot_once(
        self, kernel: Path, initrd: Path, guest_args: str, ready_line: str
    ) -> tuple[KvmState, str]:
        """Boot the guest with ``-accel kvm``; AVAILABLE only if its ready line shows."""
        with tempfile.TemporaryDirectory(prefix="blixard-kvm-probe-") as tmp:
            run = Path(tmp)
            argv = build_argv(
                QemuArgs(
                    kernel=kernel,
                    initrd=initrd,
                    append=kernel_append("kvm", guest_args, None),
                    accel="kvm",
                    vcpus=1,
                    memory_mib=256,
                    qmp_socket="qmp.sock",
                    pidfile=run / "qemu.pid",
                    # The serial console into the same pipe as QEMU's own messages:
                    # the probe reads both from one stream.
                    console_log=Path("/dev/stdout"),
                    qemu_binary=self.qemu_binary,
                    name="blixard-kvm-probe",
                )
            )
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=run,
                    start_new_session=True,
                    # A probe must never outlive its node (a SIGKILLed node included):
                    # under an unusable KVM it spins a core until killed.
                    preexec_fn=executor.die_with_parent,
                )
            except OSError as exc:
                return KvmState.UNUSABLE, f"cannot run {self.qemu_binary}: {exc.strerror}"
            output = bytearray()
            ready = ready_line.encode()
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(self.timeout_s):
                    while ready not in output:
                        chunk = await proc.stdout.read(4096)
                        if not chunk:
                            break
                        output += chunk
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            took = time.monotonic() - began
            if ready in output:
                return (
                    KvmState.AVAILABLE,
                    f"a probe guest booted with -accel kvm in {took:.1f}s",
                )
            if (
                proc.returncode is not None
                and took < self.timeout_s
                and proc.returncode != (-signal.SIGKILL)
            ):
                return (
                    KvmState.UNUSABLE,
                    f"{self.kvm_device} exists but QEMU exited with code {proc.returncode} "
                    f"booting a probe guest with -accel kvm: {_tail(bytes(output))}",
                )
            why = (
                "this host's KVM is kvm_pvm, which runs only guest kernels built for PVM"
                if Path("/sys/module/kvm_pvm").exists()
                else "the guest hung or crawled"
            )
            return (
                KvmState.UNUSABLE,
                f"{self.kvm_device} exists but a probe guest showed no ready line within "
                f"{self.timeout_s:g}s with -accel kvm ({why}); last console: "
                f"{_tail(bytes(output))}",
            )

    # --- what the driver asks ---------------------------------------------------------

    async def choose(self, accel: Accel) -> tuple[AccelName, str]:
        """The accelerator for a VM asking for ``accel``, and why (DriverError if refused)."""
        if accel is Accel.TCG:
            return "tcg", "asked for tcg"
        if accel is Accel.AUTO:
            known = await self.verdict()
            if known is not None and known.state is KvmState.AVAILABLE:
                return "kvm", f"auto: {known.detail}"
            if known is None:
                return "tcg", "auto: KVM not probed yet, using TCG"
            return "tcg", f"auto: KVM {known.state.value}: {known.detail}"
        problem = self._device_problem()
        if problem is not None:
            raise DriverError(
                f"spec.accel: kvm was asked for but {problem.detail}; use accel auto or tcg"
            )
        verdict = await self.probe()
        if verdict.state is not KvmState.AVAILABLE:
            raise DriverError(
                "spec.accel: kvm was asked for but KVM cannot be used on this node: "
                f"{verdict.detail}; use accel auto or tcg"
            )
        return "kvm", f"asked for kvm: {verdict.detail}"


def qemu_available(qemu_binary: str) -> bool:
    return shutil.which(qemu_binary) is not None
