"""Benchmarks: each script writes results/NAME.json and a PNG plot, and prints a table."""
