"""Which driver runs Services' units on this node (``[services] driver``).

* ``systemd``: the real systemd, over D-Bus (drivers/systemd/driver.py);
* ``process``: each unit's ``ExecStart=`` run as a supervised process, the
  unit files read from ``unit_dirs`` (drivers/systemd/process.py), for hosts
  where systemd is not PID 1 (containers, CI);
* ``none``: this node runs no services (and does not offer the ``systemd``
  hypervisor, so none are placed here);
* ``auto`` (default): ``systemd`` when ``/run/systemd/system`` exists (how
  sd_booted(3) tells systemd is PID 1) and the manager answers on the system
  bus within 2 s; otherwise ``process``. The choice is logged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from blixard.daemon.config import NodeConfig
from blixard.drivers.protocol import Driver
from blixard.drivers.systemd import SystemdDriver, UnitProcessDriver

log = structlog.get_logger(__name__)

SYSTEMD_BOOTED = Path("/run/systemd/system")
PROBE_TIMEOUT_S = 2.0


async def systemd_answers(driver: SystemdDriver) -> str | None:
    """None if systemd's manager answers on the bus, else why not."""
    if not SYSTEMD_BOOTED.is_dir():
        return f"{SYSTEMD_BOOTED} does not exist (systemd is not PID 1 here)"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            facts = await driver.fingerprint()
    except TimeoutError:
        return f"systemd did not answer on the system bus within {PROBE_TIMEOUT_S:g}s"
    return None if facts.healthy else facts.detail


async def choose_service_driver(config: NodeConfig) -> Driver | None:
    """The driver for the ``systemd`` hypervisor on this node, or None (see the module)."""
    mode = config.service_driver
    if mode == "none":
        log.info("services: no service driver on this node (services.driver = none)")
        return None
    if mode in ("systemd", "auto"):
        driver = SystemdDriver()
        why_not = await systemd_answers(driver) if mode == "auto" else None
        if why_not is None:
            log.info("services: units run by systemd over D-Bus", bus=driver.bus.address)
            return driver
        await driver.aclose()
        log.info("services: systemd not usable, units run as processes", why=why_not)
    dirs = [str(d) for d in config.unit_dirs]
    log.info("services: units run as processes (their ExecStart=)", unit_dirs=dirs)
    return UnitProcessDriver(config.unit_dirs)
