"""``blixard image build|list``: guest images on this node.

Images are built from the node's own kernel, modules and busybox (no
download), so these commands run where the images are used, like
``node start``; the composition root registers ``image_app`` on the CLI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from blixard.cli.console import EXIT_FAILED, EXIT_USAGE, err, fail, out, print_error
from blixard.cli.options import OutputFormat, OutputOption
from blixard.cli.output import print_data
from blixard.client.config import DATA_DIR_ENV, default_data_dir
from blixard.domain.errors import BlixardError, ValidationError
from blixard.images import DEFAULT_IMAGE, build_image, default_images_dir, list_images
from blixard.images.kernel import KernelError

image_app = typer.Typer(help="Build and list guest images on this node.", no_args_is_help=True)


DataDirOption = Annotated[
    Path | None,
    typer.Option(help="The node's data directory [env: BLIXARD_DATA_DIR]; images go in images/"),
]


def images_dir_for(data_dir: Path | None) -> Path:
    """``<data dir>/images``: the flag, else BLIXARD_DATA_DIR, else the default data dir."""
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        data_dir = Path(env) if env else default_data_dir()
    return default_images_dir(data_dir)


@image_app.command("build")
def image_build(
    name: Annotated[
        str, typer.Option(help="Image name (a DNS label, optional ':tag')")
    ] = DEFAULT_IMAGE,
    data_dir: DataDirOption = None,
    kernel: Annotated[
        Path | None,
        typer.Option(help="Kernel bzImage [default: newest /boot/vmlinuz-*-cloud-amd64]"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the image exists")] = False,
) -> None:
    """Build a guest image (vmlinux + initramfs) from this host's kernel and busybox."""
    images_dir = images_dir_for(data_dir)
    if kernel is not None and not kernel.is_file():
        print_error(ValidationError("kernel", f"{kernel} is not a file"))
        raise typer.Exit(EXIT_USAGE)
    existed = (images_dir / name / "image.json").is_file()
    began = time.monotonic()
    try:
        image = build_image(name, images_dir, kernel=kernel, force=force)
    except KernelError as exc:
        if kernel is None:
            raise fail(exc) from None
        print_error(exc)  # the file given is bad input
        raise typer.Exit(EXIT_USAGE) from None
    except BlixardError as exc:
        raise fail(exc) from None
    except OSError as exc:
        print_error(BlixardError(f"image build: {exc}"))
        raise typer.Exit(EXIT_FAILED) from None
    if existed and not force:
        err.print(
            f"image [bold]{escape(image.name)}[/bold] already built at {escape(str(image.path))} "
            "(use --force to rebuild)",
            soft_wrap=True,
        )
    else:
        err.print(
            f"built image [bold]{escape(image.name)}[/bold] at {escape(str(image.path))}: kernel "
            f"{image.kernel_release}, modules {' '.join(image.modules)} "
            f"({time.monotonic() - began:.1f}s)",
            soft_wrap=True,
        )


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "KERNEL", "SIZE", "BUILT"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        built = str(row["built_at"]).replace("T", " ").split("+")[0]
        table.add_row(row["name"], row["kernel"], f"{row['size_mib']} MiB", built)
    return table


@image_app.command("list")
def image_list(data_dir: DataDirOption = None, output: OutputOption = OutputFormat.TABLE) -> None:
    """List the guest images built on this node."""
    images_dir = images_dir_for(data_dir)
    rows = [image.summary() for image in list_images(images_dir)]
    if output is not OutputFormat.TABLE:
        print_data({"items": rows}, output)
    elif not rows:
        err.print(f"no images in {escape(str(images_dir))} (build one with `blixard image build`)")
    else:
        out.print(_table(rows))
