"""Blixard layer: agent (see docs/architecture.md)."""
