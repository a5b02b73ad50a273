"""Score objectives (see docs/architecture.md)."""
