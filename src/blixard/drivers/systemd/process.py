"""The process unit driver: a unit's ``ExecStart=`` run as a supervised process.

For hosts where systemd is not PID 1 (containers, CI, these machines) the
``systemd`` hypervisor can still run Services for real: this driver reads the
unit file from the node's configured unit directories
(:mod:`blixard.drivers.systemd.unitfile`, which refuses what it cannot honour)
and runs the command with the process driver's machinery (the task shim,
output log, pidfd waits, recovery after an agent restart, fencing deadline).
The environment is systemd's for a system service: ``PATH`` only, plus the
unit's ``Environment=``/``EnvironmentFile=``; the working directory is ``/``
unless ``WorkingDirectory=`` says otherwise.

The unit file is read at every start, so an edited unit takes effect at the
next ``service restart``, as with ``systemctl daemon-reload`` + ``restart``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from blixard.domain.errors import ValidationError
from blixard.domain.vm import Hypervisor, VMSpec
from blixard.drivers.process.driver import ProcessDriver
from blixard.drivers.protocol import Capabilities, Fingerprint, TaskHandle
from blixard.drivers.systemd.unitfile import DEFAULT_PATH, read_unit
from blixard.drivers.systemd.units import check_unit_name


class UnitProcessDriver(ProcessDriver):
    """Driver for the ``systemd`` hypervisor without systemd (see the module docstring)."""

    name = "systemd-process"
    capabilities = Capabilities(console=True)

    def __init__(self, unit_dirs: Sequence[Path]) -> None:
        self.unit_dirs = list(unit_dirs)

    async def fingerprint(self) -> Fingerprint:
        dirs = ", ".join(str(d) for d in self.unit_dirs)
        return Fingerprint(
            hypervisors=[Hypervisor.SYSTEMD],
            detail=f"units run as processes, read from {dirs or '(no unit directory)'}",
        )

    async def start(self, instance: str, spec: VMSpec, run_dir: Path) -> TaskHandle:
        if spec.boot.unit is None:
            raise ValidationError(
                "spec.boot.unit", f"the systemd driver runs a unit, not boot.{spec.boot.kind}"
            )
        unit = check_unit_name(spec.boot.unit, "spec.boot.unit")
        command = await asyncio.to_thread(read_unit, unit, self.unit_dirs)
        env = {"PATH": DEFAULT_PATH, **command.env}
        return await self.spawn_task(
            instance, command.argv, spec, run_dir, cwd=command.cwd, env=env
        )
