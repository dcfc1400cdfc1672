"""Benchmarks of tiered_sessions against plain alternatives: ``python -m benchmarks.run --help``."""
