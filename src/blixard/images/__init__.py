"""Blixard layer: images, the guest image builder (kernel + initramfs).

See :mod:`blixard.images.registry` for the on-disk layout and
:mod:`blixard.images.builder` for how an image is made.
"""

from blixard.images.builder import DEFAULT_CMDLINE, FUNCTION_IMAGE, build_image
from blixard.images.function_agent import AGENT_VERSION
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
    "AGENT_VERSION",
    "DEFAULT_CMDLINE",
    "DEFAULT_IMAGE",
    "FUNCTION_IMAGE",
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
