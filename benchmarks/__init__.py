"""Benchmarks: each script writes results/NAME.json and a PNG plot, and prints a table."""

from tsqp.cli import keep_freed_memory, prefer_passive_openmp

prefer_passive_openmp()  # every benchmark is an entry point: before torch loads
keep_freed_memory()  # the client side and transformers' reference alike
