"""Benchmarks: Blixard measured beside the raw layer it drives (see docs/benchmarks.md)."""
