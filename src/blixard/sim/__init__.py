"""Blixard layer: sim (see docs/architecture.md)."""
