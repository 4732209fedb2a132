"""Microbenchmarks: `python -m microbench` runs, checks and models every registered kernel case."""
