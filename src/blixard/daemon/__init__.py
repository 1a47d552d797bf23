"""Blixard layer: daemon (see docs/architecture.md)."""
