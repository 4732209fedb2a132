"""float64 NumPy references for the example kernels, written from the math (no code shared with the kernels).

Parameter names match the public wrappers (`tiled_matmul`, `softmax`, `rmsnorm`).
"""
from __future__ import annotations

import numpy as np


def tiled_matmul_reference(lhsT, rhs):
    """out[m, n] = sum_k lhsT[k, m] * rhs[k, n]."""
    return np.asarray(lhsT, dtype=np.float64).T @ np.asarray(rhs, dtype=np.float64)


def softmax_reference(x):
    """out[r, c] = exp(x[r, c]) / sum_j exp(x[r, j]), evaluated stably by shifting each row by its max."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def rmsnorm_reference(x, weight, eps=1e-6):
    """out[r, h] = x[r, h] / sqrt(mean_j x[r, j]^2 + eps) * weight[h]."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w
