"""What the driver contract suite needs to know about each driver under test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blixard.domain.parse import parse
from blixard.domain.vm import VMSpec
from blixard.drivers.protocol import Driver, TaskHandle

#: A shell workload that prints a ready line, then idles; SIGTERM makes it exit 0.
PROCESS_READY = "workload: ready"
PROCESS_SCRIPT = (
    "trap 'echo stopping; exit 0' TERM; echo 'workload: ready'; while true; do sleep 0.1; done"
)


@dataclass
class DriverCase:
    name: str
    driver: Driver
    #: Makes a fresh driver of the same kind, as an agent restart would.
    fresh: Callable[[], Driver]
    #: A spec that becomes ready and keeps running until stopped.
    spec: Callable[..., VMSpec]
    ready_line: str
    #: What a graceful stop leaves: the exit code a clean shutdown gives.
    clean_exit_code: int | None


def process_spec(**overrides: Any) -> VMSpec:
    data: dict[str, Any] = {
        "hypervisor": "process",
        "boot": {"command": ["/bin/sh", "-c", PROCESS_SCRIPT]},
        "ready_line": PROCESS_READY,
        "boot_timeout_s": 10,
    }
    data.update(overrides)
    return parse(VMSpec, data)


def workload_pid(handle: TaskHandle) -> int:
    """The workload's pid: the shim's only child."""
    children = Path(f"/proc/{handle.pid}/task/{handle.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def processes_in(run_dir: Path) -> int:
    """How many live processes have ``run_dir`` on their command line (duplicate check)."""
    count = 0
    exact = str(run_dir).encode()
    inside = exact + b"/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        args = cmdline.split(b"\0")
        mentions = any(a == exact or inside in a for a in args)
        if mentions and state != "Z":
            count += 1
    return count
