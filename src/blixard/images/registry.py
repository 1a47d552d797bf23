"""Where guest images live and how they are described.

An image is a directory ``<images_dir>/<name>/`` holding::

    vmlinux       uncompressed ELF kernel (booted by QEMU through its PVH note)
    initrd.cpio   uncompressed newc initramfs (busybox, modules, /init)
    image.json    the manifest below

``image.json`` (``format`` 1)::

    {"format": 1, "name": "default", "kernel_release": "6.1.0-56-cloud-amd64",
     "kernel_source": "/boot/vmlinuz-6.1.0-56-cloud-amd64",
     "files": {"vmlinux": {"sha256": "...", "size": 53243444},
               "initrd.cpio": {"sha256": "...", "size": 3100000}},
     "cmdline": "quiet ...", "ready_line": "blixard-guest: ready",
     "modules": ["virtio_ring.ko", ...], "built_at": "2025-01-01T00:00:00+00:00"}

A function image (``build_image(..., function_agent=True)``) also has
``"guest_agent": "blixard-function-agent/1"``: its ``/init`` is the guest agent
of the ``microvm`` function runtime, which reads this key (through the JSON,
as the functions layer may not import this one).

The manifest is written last (atomically, the whole directory is renamed into
place), so a directory with an ``image.json`` is a complete image. The QEMU
driver reads the same manifest (it may not import this layer): ``files``,
``cmdline`` and ``ready_line`` are the contract between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from blixard.domain.errors import BlixardError, NotFound, ValidationError
from blixard.domain.vm import validate_image_ref

MANIFEST = "image.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.cpio"
FORMAT = 1
DEFAULT_IMAGE = "default"


class ImageError(BlixardError):
    """An image directory exists but is broken (unreadable or invalid manifest)."""

    code = "image_error"


@dataclass(frozen=True, slots=True)
class ImageFile:
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Image:
    """A built guest image (see the module docstring for its layout)."""

    name: str
    path: Path
    kernel_release: str
    kernel_source: str
    cmdline: str
    ready_line: str
    built_at: datetime
    files: dict[str, ImageFile] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    #: Protocol of the guest agent serving functions ("" for an ordinary VM image);
    #: the ``microvm`` function runtime only boots images that declare one.
    guest_agent: str = ""

    @property
    def kernel(self) -> Path:
        return self.path / KERNEL_FILE

    @property
    def initrd(self) -> Path:
        return self.path / INITRD_FILE

    def manifest(self) -> dict[str, Any]:
        """The JSON document stored as ``image.json``."""
        return {
            "format": FORMAT,
            "name": self.name,
            "kernel_release": self.kernel_release,
            "kernel_source": self.kernel_source,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in self.files.items()},
            "cmdline": self.cmdline,
            "ready_line": self.ready_line,
            "modules": list(self.modules),
            "built_at": self.built_at.isoformat(),
            # Written only for function images: ordinary images keep their exact manifest.
            **({"guest_agent": self.guest_agent} if self.guest_agent else {}),
        }

    def summary(self) -> dict[str, Any]:
        """What ``blixard image list`` shows."""
        return {
            "name": self.name,
            "kernel": self.kernel_release,
            "size_mib": round(sum(f.size for f in self.files.values()) / (1 << 20), 1),
            "ready_line": self.ready_line,
            "built_at": self.built_at.isoformat(timespec="seconds"),
            "path": str(self.path),
        }


def default_images_dir(data_dir: Path) -> Path:
    """Images live under the node's data directory."""
    return data_dir / "images"


def check_name(name: str) -> str:
    """An image name as VM specs reference it (``name`` or ``name:tag``)."""
    validate_image_ref(name, "name")
    return name


def load_image(path: Path) -> Image:
    """Read the image in directory ``path``; ImageError if its manifest is broken."""
    manifest = path / MANIFEST
    try:
        raw = json.loads(manifest.read_text())
        if raw.get("format") != FORMAT:
            raise ImageError(
                f"{manifest}: format {raw.get('format')!r} is not {FORMAT}; rebuild with --force"
            )
        return Image(
            name=str(raw["name"]),
            path=path,
            kernel_release=str(raw["kernel_release"]),
            kernel_source=str(raw.get("kernel_source", "")),
            cmdline=str(raw["cmdline"]),
            ready_line=str(raw["ready_line"]),
            built_at=datetime.fromisoformat(str(raw["built_at"])),
            files={
                str(k): ImageFile(sha256=str(v["sha256"]), size=int(v["size"]))
                for k, v in raw["files"].items()
            },
            modules=[str(m) for m in raw.get("modules", [])],
            guest_agent=str(raw.get("guest_agent", "")),
        )
    except FileNotFoundError:
        raise NotFound(f"image: {path} has no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"{manifest}: unreadable manifest ({exc}); rebuild with --force") from None


def list_images(images_dir: Path) -> list[Image]:
    """Every complete image, by name; broken ones are skipped (``find_image`` names them)."""
    found: list[Image] = []
    if not images_dir.is_dir():
        return found
    for entry in sorted(images_dir.iterdir()):
        if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
            continue
        try:
            found.append(load_image(entry))
        except BlixardError:
            continue
    return found


def find_image(images_dir: Path, name: str) -> Image:
    """The image called ``name``; NotFound lists the images that exist."""
    try:
        check_name(name)
    except ValidationError as exc:
        raise NotFound(f"image {name!r} not found: {exc.reason}") from None
    path = images_dir / name
    if (path / MANIFEST).is_file():
        return load_image(path)
    known = [image.name for image in list_images(images_dir)]
    hint = (
        f"known images: {', '.join(known)}"
        if known
        else "no images are built yet (run `blixard image build`)"
    )
    raise NotFound(f"image {name!r} not found in {images_dir}; {hint}")
