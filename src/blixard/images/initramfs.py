"""A newc cpio writer and the guest's initramfs: busybox, a few modules, ``/init``.

Written in Python rather than with ``cpio -o`` so that building needs no
root: device nodes (``/dev/console``) and root-owned files are just header
fields here, where the cpio tool would need them to exist on disk. The
archive is deterministic (sorted entries, fixed mtime and inode numbers), so
rebuilding an image gives the same bytes and the same sha256.

The archive is left uncompressed: the kernel unpacks it faster than it
decompresses gzip or lz4, and a cached initrd is small (about 3 MB).
"""

from __future__ import annotations

import lzma
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from blixard.domain.errors import BlixardError

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000
_S_IFCHR = 0o020000
_TRAILER = "TRAILER!!!"

#: Printed on the serial console once the guest can take a power-button press.
READY_LINE = "blixard-guest: ready"

#: Modules the default guest loads (paths under /lib/modules/<release>/), before
#: their dependencies are added: the virtio-mmio transport (every virtio device
#: on microvm is found through it), virtio-console for the guest agent channel,
#: and the ACPI power button + evdev so busybox acpid sees QMP system_powerdown.
DEFAULT_MODULES: tuple[str, ...] = (
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/acpi/button.ko",
    "kernel/drivers/input/evdev.ko",
)


class InitramfsError(BlixardError):
    """The initramfs cannot be assembled (a module or busybox is missing or unusable)."""

    code = "initramfs_error"


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str  # relative, no leading slash
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Cpio:
    """Entries of a newc archive; parents are added implicitly, output is sorted."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def _clean(path: str) -> str:
        parts = PurePosixPath("/" + path).parts[1:]
        if not parts or any(p in ("..", ".") for p in parts):
            raise ValueError(f"bad archive path {path!r}")
        return "/".join(parts)

    def _add(self, entry: _Entry) -> None:
        parent = PurePosixPath(entry.path).parent
        while str(parent) != ".":
            self._entries.setdefault(str(parent), _Entry(str(parent), _S_IFDIR | 0o755))
            parent = parent.parent
        self._entries[entry.path] = entry

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._add(_Entry(self._clean(path), _S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(_Entry(self._clean(path), _S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self._add(_Entry(self._clean(path), _S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(_Entry(self._clean(path), _S_IFCHR | mode, rdev=(major, minor)))

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def to_bytes(self) -> bytes:
        """The archive: sorted entries (so parents come first), then the trailer."""
        out = bytearray()
        entries = [self._entries[p] for p in sorted(self._entries)]
        for ino, entry in enumerate(entries, start=1):
            _append(out, entry.path, entry.mode, entry.data, ino, entry.rdev)
        _append(out, _TRAILER, 0, b"", 0, (0, 0))
        return bytes(out)


def _pad4(out: bytearray) -> None:
    out.extend(b"\0" * (-len(out) % 4))


def _append(
    out: bytearray, name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]
) -> None:
    raw_name = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == _S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.extend(raw_name)
    _pad4(out)
    out.extend(data)
    _pad4(out)


# --- kernel modules -------------------------------------------------------------------


def read_modules_dep(modules_dir: Path) -> dict[str, list[str]]:
    """``modules.dep`` as module -> direct and indirect dependencies (as listed)."""
    dep_file = modules_dir / "modules.dep"
    try:
        text = dep_file.read_text()
    except FileNotFoundError:
        raise InitramfsError(
            f"modules: {dep_file} does not exist; is the kernel's package installed?"
        ) from None
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module.strip()] = rest.split()
    return deps


def load_order(wanted: Iterable[str], deps: dict[str, list[str]]) -> list[str]:
    """``wanted`` plus dependencies, every module after all it depends on."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(module: str, chain: tuple[str, ...]) -> None:
        if module in seen:
            return
        if module not in deps:
            # Debian may ship modules compressed: accept "x.ko" for "x.ko.xz".
            matches = [m for m in deps if m.startswith(module + ".")]
            if not matches:
                raise InitramfsError(
                    f"modules: {module} is not in modules.dep"
                    + (f" (needed by {chain[-1]})" if chain else "")
                )
            module = matches[0]
            if module in seen:
                return
        seen.add(module)
        for dep in deps[module]:
            visit(dep, (*chain, module))
        order.append(module)

    for module in wanted:
        visit(module, ())
    return order


def _module_bytes(path: Path) -> bytes:
    """A module's ELF bytes; compressed modules are unpacked for busybox insmod."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InitramfsError(f"modules: {path} is listed in modules.dep but missing") from None
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix in (".zst", ".gz"):
        tool = "zstd" if path.suffix == ".zst" else "gzip"
        proc = subprocess.run([tool, "-dc"], input=raw, capture_output=True, check=False)
        if proc.returncode != 0:
            raise InitramfsError(f"modules: cannot decompress {path} with {tool}")
        return proc.stdout
    return raw


def module_name(path: str) -> str:
    """``kernel/drivers/virtio/virtio_mmio.ko.xz`` -> ``virtio_mmio.ko``."""
    name = PurePosixPath(path).name
    return name[: name.index(".ko") + 3]


# --- busybox --------------------------------------------------------------------------


def _is_static_elf(data: bytes) -> bool:
    """An ELF64 without a PT_INTERP program header (no dynamic loader needed)."""
    if not data.startswith(b"\x7fELF") or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox was built with (``busybox --list``)."""
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, check=False, timeout=10)
    if proc.returncode != 0:
        raise InitramfsError(f"busybox: {busybox} --list failed")
    return sorted(a for a in proc.stdout.decode().split() if a and "/" not in a)


# --- the guest's /init ----------------------------------------------------------------

INIT_SCRIPT = """#!/bin/sh
# Blixard guest init (busybox). It prepares the minimum, makes the ACPI power
# button work (QMP system_powerdown -> acpid -> poweroff -f), prints the ready
# line the driver waits for, then stays silent: an idle guest writes nothing
# to its console log.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/log
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m" || echo "blixard-guest: insmod $m failed"
done
# acpid opens /dev/input/event* when it starts: wait (briefly) for the button's node.
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 100 ]; do sleep 0.01; i=$((i+1)); done
# Ready only once acpid holds the event device: a power-button press right after
# the ready line must not be lost.
acpid -f -l /dev/null &
i=0
while [ $i -lt 200 ]; do
    ls -l /proc/$!/fd 2>/dev/null | grep -q /dev/input/event && break
    sleep 0.01; i=$((i+1))
done
echo "%(ready)s"
# PID 1 must never exit (the kernel would panic); sleep reaps nothing but costs nothing.
while true; do sleep 3600; done
"""

#: busybox acpid runs /etc/acpi/<action>/<event>: PWRF/00000080 is the power button.
POWER_BUTTON_SCRIPT = """#!/bin/sh
echo "blixard-guest: power button, powering off" > /dev/console
sync
poweroff -f
"""


def build_initramfs(
    *,
    busybox: Path,
    modules_dir: Path,
    modules: Iterable[str] = DEFAULT_MODULES,
    ready_line: str = READY_LINE,
    init_script: str | None = None,
    extra_files: Mapping[str, tuple[bytes, int]] | None = None,
) -> tuple[bytes, list[str]]:
    """The guest's initramfs and the module files it loads, in load order.

    ``init_script`` replaces the default ``/init`` (the function guest agent
    brings its own); it is used as given, without ``ready_line`` substitution.
    ``extra_files`` maps more archive paths to (content, mode).
    """
    try:
        bb = busybox.read_bytes()
    except FileNotFoundError:
        raise InitramfsError(
            f"busybox: {busybox} does not exist; install the Debian package busybox-static"
        ) from None
    if not _is_static_elf(bb):
        raise InitramfsError(
            f"busybox: {busybox} is not a static x86-64 binary; install busybox-static"
        )
    if '"' in ready_line or "\\" in ready_line or "$" in ready_line or "`" in ready_line:
        raise InitramfsError("ready_line: must not contain quotes, backslashes, $ or backticks")

    order = load_order(modules, read_modules_dep(modules_dir))
    archive = Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "var/log", "etc/acpi/PWRF", "lib/modules"):
        archive.directory(d)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", bb, 0o755)
    for applet in busybox_applets(busybox):
        if applet != "busybox":
            archive.symlink(f"bin/{applet}", "busybox")
    names = []
    for module in order:
        name = module_name(module)
        archive.file(f"lib/modules/{name}", _module_bytes(modules_dir / module))
        names.append(name)
    archive.file("etc/modules", ("\n".join(names) + "\n").encode())
    archive.file("etc/acpi/PWRF/00000080", POWER_BUTTON_SCRIPT.encode(), 0o755)
    init = init_script if init_script is not None else INIT_SCRIPT % {"ready": ready_line}
    archive.file("init", init.encode(), 0o755)
    for path, (data, mode) in sorted((extra_files or {}).items()):
        archive.file(path, data, mode)
    return archive.to_bytes(), order
