"""Blixard layer: client (see docs/architecture.md)."""
