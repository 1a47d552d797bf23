"""Blixard layer: functions (see docs/architecture.md)."""
