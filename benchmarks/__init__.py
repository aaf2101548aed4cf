"""Measurement scripts (not tests). Run them from the repository root, e.g. ``python -m benchmarks.slow_link``."""
