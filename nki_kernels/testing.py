"""Comparing kernel outputs with references: relative RMS error with an absolute floor, per dtype.

Used by the tests and the microbench alike, so "matches its reference" means one thing everywhere.
"""
from __future__ import annotations

import numpy as np

# dtype name -> (max relative RMS error, absolute floor on the RMS error, max elementwise abs error scale)
TOLERANCE = {
    "float32": (1e-4, 1e-6),
    "bfloat16": (2e-2, 1e-3),
    "float16": (5e-3, 1e-4),
    "float8_e4m3": (1.5e-1, 1e-2),
    "float8_e5m2": (2.5e-1, 1e-2),
}


def to_float64(x):
    """x (NumPy array, bf16/fp8 array, torch tensor or number) as a float64 NumPy array; None stays None.

    The one conversion the NumPy references share; it holds no kernel logic."""
    if x is None:
        return None
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64)


def rel_rms_error(ref, out) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    denom = np.sqrt(np.mean(ref ** 2)) if ref.size else 0.0
    err = np.sqrt(np.mean((out - ref) ** 2)) if ref.size else 0.0
    return float(err / denom) if denom > 0 else float(err)


def assert_close(name: str, ref, out, dtype="float32", ratio: float | None = None, atol: float | None = None):
    """Fail unless out matches ref: no NaN/Inf where ref is finite, same shape, RMS error within tolerance."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {out.shape} != reference {ref.shape}")
    finite = np.isfinite(ref)
    if not np.all(np.isfinite(out[finite])):
        bad = int(np.sum(~np.isfinite(out[finite])))
        raise AssertionError(f"{name}: {bad} non-finite values where the reference is finite")
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    r_tol, a_tol = TOLERANCE.get(key, TOLERANCE["float32"])
    r_tol = ratio if ratio is not None else r_tol
    a_tol = atol if atol is not None else a_tol
    diff = out[finite] - ref[finite]
    rms_err = float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0
    rms_ref = float(np.sqrt(np.mean(ref[finite] ** 2))) if diff.size else 0.0
    if rms_err > max(r_tol * rms_ref, a_tol):
        worst = float(np.max(np.abs(diff))) if diff.size else 0.0
        raise AssertionError(f"{name}: relative RMS error {rms_err / max(rms_ref, 1e-300):.3e} exceeds "
                             f"{r_tol:.1e} ({key}); max abs error {worst:.3e}, rms ref {rms_ref:.3e}")
