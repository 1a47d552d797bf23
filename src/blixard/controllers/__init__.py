"""Blixard layer: controllers (see docs/architecture.md)."""
