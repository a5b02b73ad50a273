"""Adversarial objectives (see docs/architecture.md)."""
