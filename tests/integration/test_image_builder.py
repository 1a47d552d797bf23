"""The guest image builder against the host's real kernel, modules and busybox."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blixard.daemon.image_cmd import image_app
from blixard.domain.errors import NotFound, ValidationError
from blixard.images import READY_LINE, Image, build_image, find_image, list_images
from blixard.images.initramfs import Cpio, InitramfsError, load_order
from blixard.images.kernel import KernelError, has_pvh_note, kernel_release
from tests.support.images import session_image


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return session_image(tmp_path_factory)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpio_listing(path: Path) -> list[str]:
    """What GNU cpio itself reads from the archive: proves the format, not our reader."""
    with open(path, "rb") as f:
        proc = subprocess.run(
            ["cpio", "-i", "-t", "--quiet"], stdin=f, capture_output=True, check=True
        )
    return proc.stdout.decode().split()


def test_image_files_and_manifest(guest_image: Image) -> None:
    d = guest_image.path
    assert sorted(p.name for p in d.iterdir()) == ["image.json", "initrd.cpio", "vmlinux"]
    manifest = json.loads((d / "image.json").read_text())
    assert manifest["format"] == 1
    assert manifest["name"] == "default"
    assert manifest["ready_line"] == READY_LINE
    assert manifest["kernel_release"] == kernel_release(Path(manifest["kernel_source"]))
    assert manifest["kernel_source"].startswith("/boot/vmlinuz-")
    assert "quiet" in manifest["cmdline"].split()
    assert manifest["built_at"]
    for name in ("vmlinux", "initrd.cpio"):
        entry = manifest["files"][name]
        assert entry["sha256"] == _sha256(d / name)
        assert entry["size"] == (d / name).stat().st_size
    vmlinux = (d / "vmlinux").read_bytes()
    assert vmlinux.startswith(b"\x7fELF")
    assert has_pvh_note(vmlinux)
    assert (d / "vmlinux").stat().st_size > 20 * 1024 * 1024  # uncompressed, not the bzImage


def test_initramfs_holds_busybox_modules_in_order_and_acpi_hook(guest_image: Image) -> None:
    names = _cpio_listing(guest_image.initrd)
    for required in (
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/acpid",
        "bin/insmod",
        "bin/poweroff",
        "dev/console",
        "etc/acpi/PWRF/00000080",
        "etc/modules",
    ):
        assert required in names, required
    modules = [n.removeprefix("lib/modules/") for n in names if n.startswith("lib/modules/")]
    assert sorted(modules) == sorted(
        [
            "virtio_ring.ko",
            "virtio.ko",
            "virtio_mmio.ko",
            "virtio_console.ko",
            "button.ko",
            "evdev.ko",
        ]
    )
    # Load order: every module after what it depends on (modules.dep).
    order = guest_image.modules
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_mmio.ko")
    assert order.index("virtio.ko") < order.index("virtio_console.ko")
    assert not any(n.endswith(".ko") and "net" in n for n in names)  # only what is needed


def test_rebuild_is_idempotent_and_force_is_deterministic(tmp_path: Path) -> None:
    images = tmp_path / "images"
    first = build_image("mini", images)
    again = build_image("mini", images)
    assert again.built_at == first.built_at  # reused, not rebuilt
    forced = build_image("mini", images, force=True)
    assert forced.built_at > first.built_at
    assert forced.files == first.files  # same host files -> same bytes
    assert [i.name for i in list_images(images)] == ["mini"]
    assert not [p for p in images.iterdir() if p.name.startswith(".mini.build")]


def test_broken_manifest_is_rebuilt(tmp_path: Path) -> None:
    images = tmp_path / "images"
    build_image("b", images)
    (images / "b" / "image.json").write_text("{not json")
    assert list_images(images) == []
    rebuilt = build_image("b", images)
    assert rebuilt.files["vmlinux"].sha256 == _sha256(images / "b" / "vmlinux")


def test_find_image_lists_known_images(guest_image: Image) -> None:
    images = guest_image.path.parent
    assert find_image(images, "default").initrd == guest_image.initrd
    with pytest.raises(NotFound) as info:
        find_image(images, "nope")
    assert "'nope'" in str(info.value) and "known images: default" in str(info.value)
    with pytest.raises(NotFound, match="no images are built yet"):
        find_image(images.parent / "empty", "default")


def test_bad_name_and_bad_kernel_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="name"):
        build_image("Not_A_Label", tmp_path)
    with pytest.raises(KernelError, match="not an x86 bzImage"):
        build_image("x", tmp_path, kernel=Path("/etc/hostname"))


def test_module_order_resolution_and_unknown_module() -> None:
    deps = {"a.ko": ["b.ko", "c.ko"], "b.ko": ["c.ko"], "c.ko": [], "d.ko.xz": []}
    assert load_order(["a.ko"], deps) == ["c.ko", "b.ko", "a.ko"]
    assert load_order(["d.ko"], deps) == ["d.ko.xz"]
    with pytest.raises(InitramfsError, match=r"zz\.ko is not in modules\.dep"):
        load_order(["zz.ko"], deps)


def test_cpio_writer_round_trips_through_gnu_cpio(tmp_path: Path) -> None:
    archive = Cpio()
    archive.file("etc/deep/file.txt", b"hello\n", 0o600)
    archive.symlink("bin/sh", "busybox")
    archive.char_device("dev/console", 5, 1)
    out = tmp_path / "a.cpio"
    out.write_bytes(archive.to_bytes())
    with open(out, "rb") as f:
        proc = subprocess.run(
            ["cpio", "-i", "-t", "-v", "--quiet"], stdin=f, capture_output=True, check=False
        )
    listing = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr
    assert "etc/deep/file.txt" in listing and "bin/sh -> busybox" in listing
    assert "5,   1" in listing and "-rw-------" in listing
    with pytest.raises(ValueError):
        archive.file("../escape", b"")


def test_build_works_unprivileged(tmp_path: Path) -> None:
    """No root: an ordinary user (nobody) builds an image into its own directory."""
    if os.geteuid() != 0:
        target = tmp_path
        prefix: list[str] = []
    else:
        target = Path("/tmp") / f"blixard-unpriv-{os.getpid()}"
        target.mkdir(mode=0o755)
        shutil.chown(target, "nobody", "nogroup")
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    try:
        code = (
            "import sys; from pathlib import Path; from blixard.images import build_image; "
            "print(build_image('u', Path(sys.argv[1])).kernel_release)"
        )
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(target / "images")],
            capture_output=True,
            check=False,
            timeout=60,
            env={**os.environ, "HOME": str(target)},
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert (target / "images" / "u" / "image.json").is_file()
        assert (target / "images" / "u" / "initrd.cpio").stat().st_uid == (
            os.geteuid() if not prefix else 65534
        )
    finally:
        if prefix:
            shutil.rmtree(target, ignore_errors=True)


def test_cli_build_and_list(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    built = runner.invoke(image_app, ["build", "--name", "cli", "--data-dir", str(data)])
    assert built.exit_code == 0, built.output
    assert (data / "images" / "cli" / "image.json").is_file()
    listed = runner.invoke(image_app, ["list", "--data-dir", str(data), "-o", "json"])
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.stdout)["items"]
    assert [i["name"] for i in items] == ["cli"]
    table = runner.invoke(image_app, ["list", "--data-dir", str(data)])
    assert table.exit_code == 0 and "cli" in table.stdout and "KERNEL" in table.stdout
    bad = runner.invoke(image_app, ["build", "--name", "Bad_Name", "--data-dir", str(data)])
    assert bad.exit_code == 2
    assert "name:" in bad.stderr and "Traceback" not in bad.output
    missing = runner.invoke(
        image_app, ["build", "--kernel", "/nope", "--name", "k", "--data-dir", str(data)]
    )
    assert missing.exit_code == 2 and "kernel:" in missing.stderr
