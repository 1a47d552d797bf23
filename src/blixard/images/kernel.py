"""Find the host's guest kernel and turn its bzImage into an ELF ``vmlinux``.

QEMU's ``-M microvm`` boots an uncompressed ELF kernel directly through its
Xen PVH entry note: no real-mode setup, no in-guest decompression, about
0.2 s less per boot under TCG than the bzImage. Debian ships only the
compressed bzImage (``/boot/vmlinuz-<release>``), so the builder unpacks it
once, the way the kernel's own ``scripts/extract-vmlinux`` does, but reading
the payload's exact place from the boot protocol header instead of scanning
for magic numbers.

Everything here works unprivileged as long as /boot is readable.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blixard.domain.errors import BlixardError

#: Debian's cloud kernel: small, virtio drivers as modules, booted by QEMU microvm.
CLOUD_GLOB = "vmlinuz-*-cloud-amd64"

# Linux x86 boot protocol (Documentation/arch/x86/boot.rst), offsets into the bzImage.
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC = 0x202
_VERSION = 0x206
_KERNEL_VERSION_PTR = 0x20E
_PAYLOAD = 0x248  # payload_offset, payload_length (protocol >= 2.08)
_MIN_PROTOCOL = 0x208

_ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU looks for


class KernelError(BlixardError):
    """The kernel cannot be found or unpacked; the message says which file and why."""

    code = "kernel_error"


@dataclass(frozen=True, slots=True)
class HostKernel:
    """A bzImage on this host and the release it reports (``6.1.0-56-cloud-amd64``)."""

    path: Path
    release: str

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.release


def _version_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Order ``6.1.0-9`` before ``6.1.0-56``: numbers compare as numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", text))


def find_host_kernel(boot_dir: Path = Path("/boot")) -> Path:
    """The newest Debian cloud kernel in ``boot_dir``."""
    found = sorted(
        boot_dir.glob(CLOUD_GLOB),
        key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")),
    )
    if not found:
        raise KernelError(
            f"kernel: no {CLOUD_GLOB} in {boot_dir}; install the Debian package "
            "linux-image-cloud-amd64 or pass --kernel"
        )
    return found[-1]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise KernelError(
            f"kernel: {path} is not readable by this user (uid {os.getuid()}); "
            "make it readable or build as its owner"
        ) from None
    except FileNotFoundError:
        raise KernelError(f"kernel: {path} does not exist") from None


@dataclass(frozen=True, slots=True)
class _BzImage:
    release: str
    payload: bytes


def _parse_bzimage(path: Path, raw: bytes) -> _BzImage:
    if len(raw) < 0x300 or raw[_HEADER_MAGIC : _HEADER_MAGIC + 4] != b"HdrS":
        raise KernelError(f"kernel: {path} is not an x86 bzImage (no 'HdrS' boot header)")
    (protocol,) = struct.unpack_from("<H", raw, _VERSION)
    if protocol < _MIN_PROTOCOL:
        raise KernelError(f"kernel: {path} uses boot protocol {protocol:#x}, older than 2.08")
    (version_ptr,) = struct.unpack_from("<H", raw, _KERNEL_VERSION_PTR)
    start = version_ptr + 0x200
    release = raw[start : start + 256].split(b"\0", 1)[0].split(b" ", 1)[0].decode("ascii")
    setup_sects = raw[_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", raw, _PAYLOAD)
    begin = (setup_sects + 1) * 512 + offset
    payload = raw[begin : begin + length]
    if len(payload) != length or length < 8:
        raise KernelError(f"kernel: {path} is truncated (payload outside the file)")
    return _BzImage(release=release, payload=payload)


def kernel_release(path: Path) -> str:
    """The release string the bzImage reports (the /lib/modules directory name)."""
    return _parse_bzimage(path, _read(path)).release


def _run_decompressor(tool: str, data: bytes, out: Path) -> None:
    exe = shutil.which(tool)
    if exe is None:
        raise KernelError(
            f"kernel: the payload is {tool}-compressed and the {tool!r} command is missing; "
            f"install the Debian package {tool}"
        )
    with open(out, "wb") as f:
        proc = subprocess.run(
            [exe, "-d", "-c"], input=data, stdout=f, stderr=subprocess.PIPE, check=False
        )
    if proc.returncode != 0:
        raise KernelError(f"kernel: {tool} failed: {proc.stderr.decode(errors='replace')[:300]}")


def _decompress(payload: bytes, out: Path) -> None:
    """Write the decompressed payload to ``out``.

    The kernel build appends the uncompressed size (4 bytes, little endian)
    after every compressed payload; it is cut off before decompressing (the
    tools would read it as a broken next frame) and used to check the result.
    """
    body, (size,) = payload[:-4], struct.unpack("<I", payload[-4:])
    if payload.startswith(b"\x02\x21\x4c\x18"):  # LZ4 legacy frame (Debian's choice)
        _run_decompressor("lz4", body, out)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        _run_decompressor("zstd", body, out)
    else:
        if payload.startswith(b"\x1f\x8b"):
            data = gzip.decompress(body)
        elif payload.startswith(b"\xfd7zXZ\x00"):
            data = lzma.decompress(body, format=lzma.FORMAT_XZ)
        elif payload.startswith(b"\x5d\x00\x00"):
            data = lzma.decompress(body, format=lzma.FORMAT_ALONE)
        elif payload.startswith(b"BZh"):
            data = bz2.decompress(body)
        else:
            raise KernelError(
                f"kernel: unknown payload compression (magic {payload[:4].hex()}); "
                "supported: lz4, zstd, gzip, xz, lzma, bzip2"
            )
        out.write_bytes(data)
    got = out.stat().st_size
    if got & 0xFFFFFFFF != size:
        raise KernelError(
            f"kernel: decompressed {got} bytes but the image announces {size}; corrupt payload?"
        )


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF64 kernel carries the Xen PVH entry note (CONFIG_PVH=y).

    Without it QEMU cannot boot the ELF and the builder would produce an image
    that fails at start: better to refuse at build time.
    """
    if not elf.startswith(_ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:  # ELF64, little endian
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        (p_type,) = struct.unpack_from("<I", elf, base)
        if p_type != _PT_NOTE:
            continue
        (offset,) = struct.unpack_from("<Q", elf, base + 0x08)
        (filesz,) = struct.unpack_from("<Q", elf, base + 0x20)
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_vmlinux(bzimage: Path, out: Path) -> str:
    """Unpack ``bzimage`` into the ELF ``out`` (atomically); returns the kernel release."""
    parsed = _parse_bzimage(bzimage, _read(bzimage))
    tmp = out.with_name(out.name + ".part")
    try:
        _decompress(parsed.payload, tmp)
        elf = tmp.read_bytes()
        if not elf.startswith(_ELF_MAGIC):
            raise KernelError(f"kernel: the payload of {bzimage} is not an ELF vmlinux")
        if not has_pvh_note(elf):
            raise KernelError(
                f"kernel: {bzimage} has no PVH entry note (CONFIG_PVH); QEMU microvm "
                "cannot boot its vmlinux"
            )
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return parsed.release
