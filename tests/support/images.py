"""A guest image built once per test session, for every test that boots a VM.

Building takes about a second (mostly unpacking the host's kernel); the
result is cached under the session's pytest temp dir and shared by all test
modules, so a suite that boots many guests builds one image.

Use it from a test module (or a conftest) through a session fixture::

    @pytest.fixture(scope="session")
    def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
        return session_image(tmp_path_factory)

``image.path.parent`` is the images dir to give a QemuDriver/AccelProbe.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from blixard.images import DEFAULT_IMAGE, Image, build_image

_lock = threading.Lock()
_built: dict[Path, Image] = {}


def session_image(tmp_path_factory: pytest.TempPathFactory, name: str = DEFAULT_IMAGE) -> Image:
    """The session's image ``name`` (built on first use) in ``<basetemp>/guest-images``."""
    images_dir = tmp_path_factory.getbasetemp() / "guest-images"
    key = images_dir / name
    with _lock:
        if key not in _built:
            _built[key] = build_image(name, images_dir)
        return _built[key]


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The session's default guest image (import this fixture, or wrap session_image)."""
    return session_image(tmp_path_factory)
