"""What this host offers, read from the kernel: CPUs, memory, disk.

The drivers' fingerprints (hypervisors, KVM) come with the drivers; these are
the facts every node has, so a node record is truthful from its first start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blixard.domain.node import Resources


def memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def host_capacity(data_dir: Path, *, vcpu_overcommit: float = 1.0) -> Resources:
    """CPUs (times the vCPU overcommit ratio), memory, and the disk space of the
    file system holding ``data_dir``. Memory is never overcommitted."""
    disk = shutil.disk_usage(data_dir)
    return Resources(
        vcpus=max(1, int((os.cpu_count() or 1) * vcpu_overcommit)),
        memory_mib=memory_mib(),
        disk_mib=disk.total // (1024 * 1024),
    )
