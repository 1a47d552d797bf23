"""Blixard: an orchestrator of microVMs and serverless functions across a cluster."""

__version__ = "0.1.0"
