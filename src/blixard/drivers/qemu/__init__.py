"""The QEMU microVM driver (``hypervisor: qemu``).

* :mod:`.driver`: :class:`QemuDriver`, the Driver and Pausable implementation;
* :mod:`.cmdline`: the QEMU command line (pure);
* :mod:`.boot`: boot source (kernel or guest image) to files and arguments;
* :mod:`.accel`: :class:`AccelProbe`, which decides ``accel: auto``;
* :mod:`.qmp`: a small QMP client.
"""

from blixard.drivers.qemu.accel import AccelProbe, KvmVerdict
from blixard.drivers.qemu.driver import QemuDriver

__all__ = ["AccelProbe", "KvmVerdict", "QemuDriver"]
