"""Blixard layer: drivers (see docs/architecture.md)."""
