"""Row softmax: out[r, :] = exp(x[r, :] - max_c x[r, c]) / sum_c exp(x[r, c] - max), fp32 statistics.

Dimensions:
    R: rows (any count), tiled by P_MAX (128) rows on the partitions; the tail tile is partial.
    C: columns (the softmax axis), whole row in SBUF, 1 <= C <= _MAX_C.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..validation import kernel_check

# ---- constraints
# Whole rows live in SBUF: one tile of 4 B x 16384 = 64 KiB per partition (fp32), leaving room for the next
# iteration's tile on every target (180224 B per partition on trn1); also within the 64K elements per
# partition one instruction may read.
_MAX_C = 16384
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@nki.jit
def softmax_kernel(x):
    """Softmax over the last dim of a 2-D tensor, one 128-row tile at a time, in place in SBUF.

    Dimensions:
        R rows, C columns (softmax axis).
    Args:
        x: [R, C] @ HBM, fp32/bf16/fp16.
    Returns:
        out: [R, C] @ HBM, x's dtype.
    Constraints:
        C <= _MAX_C (16384); under LNC=2 program p handles the row tiles i_r with i_r % 2 == p.
    Pseudocode:
        for each 128-row tile t (allocated per iteration, so consecutive tiles overlap):
            neg_max = -max_c(t)                          # VectorE tensor_reduce(negate=True), fp32
            t, row_sum = exp(t + neg_max), sum_c(exp)    # ScalarE activation, fp32 reduce, in place
            inv = 1 / row_sum                            # VectorE reciprocal
            t *= inv                                     # VectorE first half of C, ScalarE second half
    """
    n_rows, n_cols = x.shape
    out = nl.ndarray((n_rows, n_cols), dtype=x.dtype, buffer=nl.shared_hbm)
    n_tiles = (n_rows + P_MAX - 1) // P_MAX
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    for i_r in nl.affine_range(n_tiles):
        if i_r % n_prog != pid:
            continue
        r0 = i_r * P_MAX
        r_sz = min(P_MAX, n_rows - r0)
        _softmax_tile(x, out, r0, r_sz, n_cols)
    return out


def _softmax_tile(x, out, r0, r_sz, n_cols):
    """Softmax of rows [r0, r0 + r_sz) (r_sz <= 128) from HBM to HBM, in place in one SBUF tile."""
    x_sb = nl.ndarray((P_MAX, n_cols), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb[0:r_sz, :], src=x[r0:r0 + r_sz, :])
    neg_max_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_max_sb[0:r_sz, :], op=nl.maximum, data=x_sb[0:r_sz, :], axis=1, negate=True)
    # exp(x - max) overwrites the tile; the row sum accumulates in fp32 before any rounding to x's dtype.
    row_sum_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation_reduce(dst=x_sb[0:r_sz, :], op=nl.exp, data=x_sb[0:r_sz, :], reduce_op=nl.add,
                           reduce_res=row_sum_sb[0:r_sz, :], bias=neg_max_sb[0:r_sz, :])
    inv_sum_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_sum_sb[0:r_sz, :], data=row_sum_sb[0:r_sz, :])
    # Normalise: VectorE scales the first half of the columns, ScalarE the second half, so the two engines
    # share the work (ScalarE already ran the exp pass) and neither outlasts the tile's DMAs.
    c_split = (n_cols + 1) // 2
    nisa.tensor_scalar(dst=x_sb[0:r_sz, 0:c_split], data=x_sb[0:r_sz, 0:c_split], op0=nl.multiply,
                       operand0=inv_sum_sb[0:r_sz, :])
    if c_split < n_cols:
        nisa.activation(dst=x_sb[0:r_sz, c_split:n_cols], op=nl.copy, data=x_sb[0:r_sz, c_split:n_cols],
                        scale=inv_sum_sb[0:r_sz, :])
    nisa.dma_copy(dst=out[r0:r0 + r_sz, :], src=x_sb[0:r_sz, :])


def softmax(x, lnc: int = 1):
    """Row softmax over the last dim of x [R, C] (fp32/bf16/fp16). NumPy or torch in, the same kind out."""
    kernel_check(getattr(x, "ndim", 0) == 2, f"softmax: x must be 2-D [R, C], got x.shape={tuple(x.shape)}")
    kernel_check(str(x.dtype).replace("torch.", "") in _FLOAT_DTYPES,
                 f"softmax: dtype must be one of {_FLOAT_DTYPES}, got x.dtype={x.dtype}")
    kernel_check(1 <= x.shape[1] <= _MAX_C, f"softmax: C must be in [1, {_MAX_C}], got C={x.shape[1]}")
    kernel_check(x.shape[0] >= 1, f"softmax: R must be >= 1, got R={x.shape[0]}")
    kernel_check(lnc in (1, 2), f"softmax: lnc must be 1 or 2, got lnc={lnc}")
    return call(softmax_kernel, x, lnc=lnc)
