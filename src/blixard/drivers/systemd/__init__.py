"""The systemd drivers: installed systemd units run as tasks.

:class:`SystemdDriver` talks to systemd over D-Bus; :class:`UnitProcessDriver`
runs a unit's ``ExecStart=`` as a supervised process where systemd is not PID 1.
"""

from blixard.drivers.systemd.driver import SystemdDriver
from blixard.drivers.systemd.process import UnitProcessDriver
from blixard.drivers.systemd.units import UnitNotFound, UnitState, check_unit_name, task_status

__all__ = [
    "SystemdDriver",
    "UnitNotFound",
    "UnitProcessDriver",
    "UnitState",
    "check_unit_name",
    "task_status",
]
