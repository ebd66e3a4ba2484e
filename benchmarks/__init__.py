"""Benchmarks: each script writes results/NAME.json and a PNG plot, and prints a table."""

import protocol  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
