"""The runtimes that run handlers as local processes, by the spec's runtime name."""

from __future__ import annotations

from blixard.domain.function import Runtime
from blixard.functions import runtime as rt
from blixard.functions.command import CommandRuntime
from blixard.functions.nix import NixRuntime


def process_runtimes(nix_instantiate: str = "nix-instantiate") -> dict[Runtime, rt.Runtime]:
    """``command`` and ``nix`` (``microvm`` is built apart, in functions/microvm)."""
    return {
        Runtime.COMMAND: CommandRuntime(),
        Runtime.NIX: NixRuntime(nix_instantiate),
    }
