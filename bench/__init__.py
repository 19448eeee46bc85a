"""Benchmarks: ``python -m bench RECIPE`` measures each phase against its ceiling (see bench/RESULTS.md)."""
