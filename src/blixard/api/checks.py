"""Checks of a VM against this node, made before anything is stored.

The domain model checks a VM's shape; only the node can tell whether the
kernel file exists, the image is built or the command is installed. Refusing
such a VM at create time gives the user the reason at once, instead of a VM
that is stored and then fails on the node minutes later. (Single-node for
now: with several nodes these facts belong to placement.)
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass

from blixard.domain.errors import ValidationError
from blixard.domain.vm import VM


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the API may ask this node about (injected so tests need no real images)."""

    node_id: str
    image_exists: Callable[[str], bool]
    known_images: Callable[[], list[str]]


def check_vm_on_node(vm: VM, facts: NodeFacts) -> None:
    """Raise ValidationError naming the first boot input this node cannot provide."""
    boot = vm.spec.boot
    for name in ("kernel", "initrd", "disk"):
        path = getattr(boot, name)
        if path is not None:
            _check_regular_file(path, f"spec.boot.{name}", facts.node_id)
    if boot.image is not None and not facts.image_exists(boot.image):
        known = sorted(facts.known_images())
        listed = ", ".join(known) if known else "none is built yet"
        raise ValidationError(
            "spec.boot.image",
            f"unknown image {boot.image!r} on node {facts.node_id} (known images: {listed})",
        )
    if boot.command is not None:
        _check_executable(boot.command[0], "spec.boot.command[0]", facts.node_id)


def _check_regular_file(path: str, field: str, node_id: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValidationError(field, f"file {path} does not exist on node {node_id}") from None
    except OSError as exc:
        raise ValidationError(
            field, f"cannot read {path} on node {node_id}: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(mode):
        raise ValidationError(field, f"{path} is not a regular file on node {node_id}")


def _check_executable(program: str, field: str, node_id: str) -> None:
    if os.path.isabs(program):
        if not os.path.exists(program):
            raise ValidationError(field, f"file {program} does not exist on node {node_id}")
        mode = os.stat(program).st_mode
        # Any execute bit too: root passes os.access(X_OK) for a file nobody may execute.
        if not stat.S_ISREG(mode) or not mode & 0o111 or not os.access(program, os.X_OK):
            raise ValidationError(field, f"{program} is not an executable file on node {node_id}")
        return
    if "/" in program:
        raise ValidationError(
            field,
            f"must be an absolute path or a command name found on PATH, got {program!r} "
            "(a relative path would depend on the agent's working directory)",
        )
    if shutil.which(program) is None:
        raise ValidationError(field, f"command {program!r} is not found on PATH on node {node_id}")
