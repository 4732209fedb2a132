"""Microbench cases for the examples family (registered on import): tiled matmul, row softmax, RMSNorm.

The wrappers take their LNC from NEURON_LOGICAL_NC_CONFIG, which the runner sets (default LNC, then LNC=1)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from microbench.registry import BenchCase, register

_BF16 = np.dtype(ml_dtypes.bfloat16)
_BF16_BYTES = 2


def _matmul_case(k, m, n, quick=False):
    def make_inputs(rng):
        return {"lhsT": rng.standard_normal((k, m)).astype(_BF16), "rhs": rng.standard_normal((k, n)).astype(_BF16)}

    def run(inp):
        from nki_kernels import tiled_matmul
        return tiled_matmul(inp["lhsT"], inp["rhs"])

    def reference(inp):
        from nki_kernels.examples.reference import tiled_matmul_reference
        # float32 keeps the reference cheap on the large shape; inputs are exact bf16 values
        return np.asarray(inp["lhsT"], np.float32).T @ np.asarray(inp["rhs"], np.float32) if k * m * n > 2 ** 26 \
            else tiled_matmul_reference(inp["lhsT"], inp["rhs"])

    return BenchCase(kernel="tiled_matmul", shape=f"K={k} M={m} N={n} bf16",
                     make_inputs=make_inputs, run=run, reference=reference, flops=2 * k * m * n,
                     min_hbm_bytes=_BF16_BYTES * (k * m + k * n + m * n), dtype="bfloat16", quick=quick)


def _softmax_case(r, c, quick=False):
    def make_inputs(rng):
        return {"x": (rng.standard_normal((r, c)) * 4).astype(_BF16)}

    def run(inp):
        from nki_kernels import softmax
        return softmax(inp["x"])

    def reference(inp):
        from nki_kernels.examples.reference import softmax_reference
        return softmax_reference(inp["x"])

    return BenchCase(kernel="softmax", shape=f"R={r} C={c} bf16",
                     make_inputs=make_inputs, run=run, reference=reference, flops=0,
                     min_hbm_bytes=2 * _BF16_BYTES * r * c, dtype="bfloat16", quick=quick)


def _rmsnorm_case(r, h, quick=False):
    def make_inputs(rng):
        return {"x": rng.standard_normal((r, h)).astype(_BF16),
                "weight": (1 + 0.1 * rng.standard_normal(h)).astype(_BF16)}

    def run(inp):
        from nki_kernels import rmsnorm
        return rmsnorm(inp["x"], inp["weight"], 1e-6)

    def reference(inp):
        from nki_kernels.examples.reference import rmsnorm_reference
        return rmsnorm_reference(inp["x"], inp["weight"], 1e-6)

    return BenchCase(kernel="rmsnorm", shape=f"R={r} H={h} bf16",
                     make_inputs=make_inputs, run=run, reference=reference, flops=0,
                     min_hbm_bytes=_BF16_BYTES * (2 * r * h + h), dtype="bfloat16", quick=quick)


register(_matmul_case(256, 256, 512, quick=True))
register(_matmul_case(1024, 1024, 1024))
register(_softmax_case(256, 1024, quick=True))
register(_softmax_case(4096, 2048))
register(_rmsnorm_case(256, 1024, quick=True))
register(_rmsnorm_case(4096, 2048))
