"""Benchmarks: microbenchmarks of the kernels and end-to-end runs, writing JSON with provenance to bench/results."""
