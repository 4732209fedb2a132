"""Calibration of the cost model against published NKI kernel timings (see points.py, docs/kernels/01-cost-model.md)."""
