"""Deterministic whole-cluster simulation: seeded faults on a virtual clock, invariants
checked at every step (see docs/architecture.md "Simulation"; run ``python -m blixard.sim``)."""
