"""Calibration of the cost model against published NKI kernel timings (points.py; KERNELS.md, "Cost model")."""
