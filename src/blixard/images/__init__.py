"""Blixard layer: images, the guest image builder (kernel + initramfs).

See :mod:`blixard.images.registry` for the on-disk layout and
:mod:`blixard.images.builder` for how an image is made.
"""

from blixard.images.builder import DEFAULT_CMDLINE, build_image
from blixard.images.initramfs import READY_LINE
from blixard.images.registry import (
    DEFAULT_IMAGE,
    Image,
    ImageError,
    ImageFile,
    default_images_dir,
    find_image,
    list_images,
    load_image,
)

__all__ = [
    "DEFAULT_CMDLINE",
    "DEFAULT_IMAGE",
    "READY_LINE",
    "Image",
    "ImageError",
    "ImageFile",
    "build_image",
    "default_images_dir",
    "find_image",
    "list_images",
    "load_image",
]
