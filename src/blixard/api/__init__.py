"""Blixard layer: api (see docs/architecture.md)."""
