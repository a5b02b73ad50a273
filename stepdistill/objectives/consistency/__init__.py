"""Consistency objectives (see docs/architecture.md)."""
