"""Blixard layer: cli (see docs/architecture.md)."""
