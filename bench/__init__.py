"""Benchmarks run against a real Redis: ``python -m bench.<name> --help``."""
