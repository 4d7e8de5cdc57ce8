"""Benchmarks (installed as ``rtkern.bench``)."""
