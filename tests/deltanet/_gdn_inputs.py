"""Shared input builders for the gated DeltaNet tests (not a test module)."""
import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


def gdn_inputs(rng, b, t, hk, hv, dk, dv, dtype=np.float32, g_scale=0.5):
    """q, k, v in `dtype`; g fp32 log-decay <= 0; beta in (0, 1) fp32."""
    q = rng.standard_normal((b, t, hk, dk)).astype(dtype)
    k = rng.standard_normal((b, t, hk, dk)).astype(dtype)
    v = rng.standard_normal((b, t, hv, dv)).astype(dtype)
    g = (-rng.uniform(0.0, g_scale, (b, t, hv))).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (b, t, hv)).astype(np.float32)
    return q, k, v, g, beta
