"""Blixard layer: images (see docs/architecture.md)."""
