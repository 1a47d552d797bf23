"""The ``microvm`` function runtime: handlers in QEMU microVMs with a guest agent.

* :mod:`.runtime`: :class:`MicroVmRuntime` and :class:`MicroVmWorker`;
* :mod:`.pool`: templates (saved guests) and pools of pre-started clones;
* :mod:`.vm`: one QEMU process, its QMP session and agent channel;
* :mod:`.agent`: the host side of the guest agent protocol.

The guest side (busybox ash) is in :mod:`blixard.images.function_agent`;
benchmarks/functions_microvm.py measures cold starts from boot and from templates.
"""

from blixard.functions.microvm.runtime import DEFAULT_IMAGE, MicroVmRuntime, MicroVmWorker

__all__ = ["DEFAULT_IMAGE", "MicroVmRuntime", "MicroVmWorker"]
