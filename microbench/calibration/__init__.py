"""Calibration of the cost model against published NKI kernel timings (points.py; docs/cost-model.md)."""
