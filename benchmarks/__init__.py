"""Benchmarks: each script writes results/NAME.json and a PNG plot, and prints a table."""

from tsqp.cli import prefer_passive_openmp

prefer_passive_openmp()  # every benchmark is an entry point: before torch loads
