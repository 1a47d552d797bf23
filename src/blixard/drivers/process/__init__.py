"""The process driver: a command run as a supervised task (non-VM workloads, fast tests)."""

from blixard.drivers.process.driver import ProcessDriver

__all__ = ["ProcessDriver"]
