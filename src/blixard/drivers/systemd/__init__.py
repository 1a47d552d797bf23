"""The systemd driver: installed systemd units run as tasks, through systemd's D-Bus API."""

from blixard.drivers.systemd.driver import SystemdDriver
from blixard.drivers.systemd.units import UnitNotFound, UnitState, check_unit_name, task_status

__all__ = ["SystemdDriver", "UnitNotFound", "UnitState", "check_unit_name", "task_status"]
