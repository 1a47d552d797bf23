"""Blixard layer: scheduler (see docs/architecture.md)."""
