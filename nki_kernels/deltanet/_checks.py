"""Input checks shared by the gated-delta-rule wrappers (prefill and decode take the same q/k/v/g/beta layouts)."""
from __future__ import annotations

from ..validation import kernel_check


def check_qkv_gate_layouts(name: str, q, k, v, g, beta, extra=()):
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g, beta [B, T, Hv]; `extra` adds (arg, tensor, ndim) triples.

    Returns (B, T, Hk, Dk, Hv, Dv)."""
    for arg, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)) + tuple(extra):
        kernel_check(getattr(x, "ndim", None) == nd, f"{name}: {arg} must be {nd}-D, got "
                     f"{arg}.shape={tuple(getattr(x, 'shape', ()))}")
    bsz, seq, n_hk, dk = q.shape
    n_hv, dv = v.shape[2], v.shape[3]
    kernel_check(tuple(k.shape) == tuple(q.shape), f"{name}: k must match q [B, T, Hk, Dk], got "
                 f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    kernel_check(tuple(v.shape[:2]) == (bsz, seq), f"{name}: v must be [B={bsz}, T={seq}, Hv, Dv], "
                 f"got v.shape={tuple(v.shape)}")
    for arg, x in (("g", g), ("beta", beta)):
        kernel_check(tuple(x.shape) == (bsz, seq, n_hv), f"{name}: {arg} must be [B, T, Hv]="
                     f"{(bsz, seq, n_hv)}, got {arg}.shape={tuple(x.shape)}")
    return bsz, seq, n_hk, dk, n_hv, dv
