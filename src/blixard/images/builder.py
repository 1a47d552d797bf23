"""Build a guest image from what the host already has: its kernel, modules and busybox.

No download, no root: the kernel comes from /boot (Debian's cloud kernel),
its modules from /lib/modules/<release>, userland from busybox-static. A
build takes about a second (mostly decompressing the kernel) and is
deterministic: the same host files give byte-identical ``vmlinux`` and
``initrd.cpio``.

Concurrent builders of one image serialise on a lock file; the image is
assembled in a hidden temporary directory and renamed into place, so a
reader sees either no image or a complete one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from blixard.domain.errors import BlixardError, NotFound
from blixard.images.function_agent import (
    AGENT_EXTRA_CMDLINE,
    AGENT_MODULES,
    AGENT_READY_LINE,
    AGENT_VERSION,
    RESEED_PATH,
    agent_init_script,
    reseed_crng_elf,
)
from blixard.images.initramfs import DEFAULT_MODULES, READY_LINE, build_initramfs, module_name
from blixard.images.kernel import extract_vmlinux, find_host_kernel, kernel_release
from blixard.images.registry import (
    INITRD_FILE,
    KERNEL_FILE,
    MANIFEST,
    Image,
    ImageFile,
    check_name,
    load_image,
)

#: Kernel arguments that belong to this guest kernel: each shortens a TCG boot
#: (measured in shared/vmlab): skip crypto self-tests, timer checks, the i8042
#: probe, KASLR, audit, the PCI scan (microvm has no PCI bus) and three slow
#: initcalls. The driver adds the machine's own arguments (console, panic,
#: TSC frequency) in front of these.
DEFAULT_CMDLINE = (
    "quiet cryptomgr.notests no_timer_check i8042.noaux i8042.nokbd i8042.nopnp pci=off "
    "nokaslr audit=0 random.trust_cpu=on "
    "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list"
)
DEFAULT_BUSYBOX = Path("/bin/busybox")
#: The image name the ``microvm`` function runtime uses unless told otherwise.
FUNCTION_IMAGE = "function"


def _sha256(path: Path) -> ImageFile:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return ImageFile(sha256=digest.hexdigest(), size=size)


@contextlib.contextmanager
def _locked(images_dir: Path, name: str) -> Iterator[None]:
    lock = images_dir / f".{name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_image(
    name: str,
    images_dir: Path,
    *,
    kernel: Path | None = None,
    force: bool = False,
    busybox: Path = DEFAULT_BUSYBOX,
    modules_root: Path = Path("/lib/modules"),
    function_agent: bool = False,
) -> Image:
    """Build (or, unless ``force``, reuse) the image ``<images_dir>/<name>``.

    ``function_agent`` builds a function guest instead of a VM guest: its
    ``/init`` is the guest agent of the ``microvm`` runtime
    (:mod:`blixard.images.function_agent`) and it loads only the virtio-serial
    modules. An existing image of the other kind is rebuilt.

    ``kernel`` is a bzImage; by default the newest /boot/vmlinuz-*-cloud-amd64.
    An existing complete image is returned unchanged without ``force``, so
    callers (tests, the node at start) can ask for it cheaply every time.
    """
    check_name(name)
    images_dir.mkdir(parents=True, exist_ok=True)
    with _locked(images_dir, name):
        target = images_dir / name
        if not force and (target / MANIFEST).is_file():
            with contextlib.suppress(BlixardError):
                existing = load_image(target)  # a broken one is rebuilt below
                if bool(existing.guest_agent) == function_agent:
                    return existing
        source = kernel if kernel is not None else find_host_kernel()
        release = kernel_release(source)
        modules_dir = modules_root / release
        if not modules_dir.is_dir():
            raise NotFound(
                f"kernel: {source} is release {release} but {modules_dir} does not exist; "
                "install the matching modules (the linux-image package)"
            )
        work = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=images_dir))
        try:
            extract_vmlinux(source, work / KERNEL_FILE)
            if function_agent:
                cpio, order = build_initramfs(
                    busybox=busybox,
                    modules_dir=modules_dir,
                    modules=AGENT_MODULES,
                    init_script=agent_init_script(),
                    extra_files={RESEED_PATH: (reseed_crng_elf(), 0o755)},
                )
            else:
                cpio, order = build_initramfs(
                    busybox=busybox, modules_dir=modules_dir, modules=DEFAULT_MODULES
                )
            (work / INITRD_FILE).write_bytes(cpio)
            image = Image(
                name=name,
                path=target,
                kernel_release=release,
                kernel_source=str(source),
                cmdline=f"{DEFAULT_CMDLINE} {AGENT_EXTRA_CMDLINE}"
                if function_agent
                else DEFAULT_CMDLINE,
                ready_line=AGENT_READY_LINE if function_agent else READY_LINE,
                built_at=datetime.now(UTC),
                files={f: _sha256(work / f) for f in (KERNEL_FILE, INITRD_FILE)},
                modules=[module_name(m) for m in order],
                guest_agent=AGENT_VERSION if function_agent else "",
            )
            (work / MANIFEST).write_text(json.dumps(image.manifest(), indent=2) + "\n")
            work.chmod(0o755)
            old = None
            if target.exists():
                old = images_dir / f".{name}.old-{os.getpid()}"
                target.rename(old)
            work.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return image
        finally:
            shutil.rmtree(work, ignore_errors=True)
