"""Benchmarks of the search: python benchmarks/bench.py [--quick]."""
