"""Turn a VM spec's boot source into the files and arguments QEMU boots.

Images are read straight from their manifest ``<images_dir>/<name>/image.json``
(the layout written by :mod:`blixard.images`; the drivers layer may not import
that layer, so the manifest's ``files``, ``cmdline`` and ``ready_line`` are
the contract). Every refusal names the spec field it is about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from blixard.domain.errors import NotFound
from blixard.domain.vm import VMSpec
from blixard.drivers.protocol import DriverError

MANIFEST = "image.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.cpio"

#: Guest arguments for a bare ``boot.kernel`` given without ``cmdline``: the
#: same boot-time savings the image builder gives its images.
DEFAULT_GUEST_ARGS = (
    "quiet cryptomgr.notests no_timer_check i8042.noaux i8042.nokbd i8042.nopnp pci=off "
    "nokaslr audit=0 random.trust_cpu=on"
)

_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True, slots=True)
class BootPlan:
    """What QEMU boots: files, the guest's own kernel arguments, the ready line."""

    kernel: Path
    initrd: Path | None
    disk: Path | None
    disk_format: Literal["raw", "qcow2"]
    guest_args: str
    ready_line: str | None
    #: Image name ("" for a bare kernel) and guest kernel release, for the handle.
    image: str = ""
    kernel_release: str = ""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """The part of an image manifest the driver uses."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    ready_line: str
    kernel_release: str
    kernel_sha256: str


def known_images(images_dir: Path) -> list[str]:
    if not images_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in images_dir.iterdir()
        if not p.name.startswith(".") and (p / MANIFEST).is_file()
    )


def read_image(images_dir: Path, name: str, field: str = "spec.boot.image") -> GuestImage:
    """The image ``name``; NotFound (listing the known images) if it is not built."""
    path = images_dir / name
    if "/" in name or name in ("", ".", "..") or not (path / MANIFEST).is_file():
        known = known_images(images_dir)
        hint = (
            f"known images: {', '.join(known)}"
            if known
            else "no images are built on this node (run `blixard image build`)"
        )
        raise NotFound(f"{field}: image {name!r} not found in {images_dir}; {hint}")
    try:
        raw = json.loads((path / MANIFEST).read_text())
        files = raw["files"]
        image = GuestImage(
            name=name,
            kernel=path / KERNEL_FILE,
            initrd=path / INITRD_FILE,
            cmdline=str(raw.get("cmdline", "")),
            ready_line=str(raw["ready_line"]),
            kernel_release=str(raw.get("kernel_release", "")),
            kernel_sha256=str(files[KERNEL_FILE]["sha256"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DriverError(
            f"{field}: image {name!r} has an unreadable manifest ({exc}); rebuild it with "
            "`blixard image build --force`"
        ) from None
    for f in (image.kernel, image.initrd):
        if not f.is_file():
            raise DriverError(f"{field}: image {name!r} is incomplete: {f} is missing")
    return image


def _existing(path: str, field: str) -> Path:
    p = Path(path)
    if not p.is_file():
        what = "does not exist" if not p.exists() else "is not a regular file"
        raise DriverError(f"{field}: {path} {what} on this node")
    return p


def _disk_format(path: Path) -> Literal["raw", "qcow2"]:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


def resolve_boot(spec: VMSpec, images_dir: Path) -> BootPlan:
    """The boot plan for ``spec`` (DriverError/NotFound naming the field at fault)."""
    boot = spec.boot
    if boot.kernel is not None:
        kernel = _existing(boot.kernel, "spec.boot.kernel")
        initrd = _existing(boot.initrd, "spec.boot.initrd") if boot.initrd else None
        disk = _existing(boot.disk, "spec.boot.disk") if boot.disk else None
        return BootPlan(
            kernel=kernel,
            initrd=initrd,
            disk=disk,
            disk_format=_disk_format(disk) if disk else "raw",
            guest_args=boot.cmdline if boot.cmdline is not None else DEFAULT_GUEST_ARGS,
            ready_line=spec.ready_line,
        )
    if boot.image is not None:
        image = read_image(images_dir, boot.image)
        return BootPlan(
            kernel=image.kernel,
            initrd=image.initrd,
            disk=None,
            disk_format="raw",
            guest_args=image.cmdline,
            ready_line=spec.ready_line or image.ready_line,
            image=image.name,
            kernel_release=image.kernel_release,
        )
    if boot.flake is not None:
        raise DriverError(
            "spec.boot.flake: microvm.nix flakes run on NixOS hosts through the "
            "microvm_nix driver, not the qemu driver"
        )
    raise DriverError(
        "spec.boot.command: the qemu driver boots a kernel or an image, not a command"
    )
