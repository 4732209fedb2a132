"""Row softmax: out[r, :] = exp(x[r, :] - max_c x[r, c]) / sum_c exp(x[r, c] - max), fp32 statistics.

Dimensions:
    R: rows (any count), tiled by P_MAX (128) rows on the partitions; the tail tile is partial.
    C: columns (the softmax axis), whole row in SBUF, 1 <= C <= _MAX_C.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..validation import check_array, kernel_check
from ._common import dtype_bytes

# ---- constraints
# Whole rows live in SBUF: a group tile takes <= 64 KiB per partition (one fp32 row of 16384), leaving room
# for the next iteration's tile on every target (180224 B per partition on trn1); also within the 64K
# elements per partition one instruction may read.
_MAX_C = 16384
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# ---- tiling
_GROUP_MAX = 4                # row tiles per loop iteration whose steps interleave across VectorE / ScalarE
_GROUP_BYTES = 64 * 1024      # SBUF bytes per partition one group's tile may take


@nki.jit
def softmax_kernel(x):
    """Softmax over the last dim of a 2-D tensor, 128-row tiles processed in groups, in place in SBUF.

    Dimensions:
        R rows, C columns (softmax axis).
    Args:
        x: [R, C] @ HBM, fp32/bf16/fp16.
    Returns:
        out: [R, C] @ HBM, x's dtype.
    Constraints:
        C <= _MAX_C (16384); under LNC=2 program p handles the row tiles i_r with i_r % 2 == p.
    Pseudocode:
        for each group of up to _GROUP_MAX row tiles (one [128, G, C] SBUF tile per group):
            for each tile t: load t
            for each tile t: neg_max = -max_c(t)                     # VectorE tensor_reduce(negate=True)
            for each tile t: t, row_sum = exp(t + neg_max), sum(exp) # ScalarE activation, fp32 reduce
            for each tile t: inv = 1 / row_sum                       # VectorE reciprocal
            for each tile t: t *= inv; store t                       # VectorE half of C, ScalarE half
        Issuing each step for the whole group lets VectorE reduce tile g+1 while ScalarE exponentiates
        tile g, instead of one tile's four dependent steps running back to back.
    """
    n_rows, n_cols = x.shape
    out = nl.ndarray((n_rows, n_cols), dtype=x.dtype, buffer=nl.shared_hbm)
    n_tiles = (n_rows + P_MAX - 1) // P_MAX
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_mine = (n_tiles - pid + n_prog - 1) // n_prog          # row tiles i_r = pid + j * n_prog, j < n_mine
    group = max(1, min(_GROUP_MAX, _GROUP_BYTES // (n_cols * dtype_bytes(x.dtype))))
    for i_g in range((n_mine + group - 1) // group):
        j0 = i_g * group
        _softmax_group(x, out, j0, min(group, n_mine - j0), pid, n_prog, n_cols)
    return out


def _softmax_group(x, out, j0, n_grp, pid, n_prog, n_cols):
    """Softmax of this program's row tiles j0 .. j0 + n_grp - 1 (tile j covers rows from (pid + j * n_prog) * 128),
    HBM to HBM, in one SBUF tile [128, n_grp, C]."""
    n_rows = x.shape[0]
    x_sb = nl.ndarray((P_MAX, n_grp, n_cols), dtype=x.dtype, buffer=nl.sbuf)
    # per tile g: column g of neg_max_sb, row_sum_sb, inv_sum_sb (fp32 statistics)
    neg_max_sb = nl.ndarray((P_MAX, n_grp), dtype=nl.float32, buffer=nl.sbuf)
    row_sum_sb = nl.ndarray((P_MAX, n_grp), dtype=nl.float32, buffer=nl.sbuf)
    inv_sum_sb = nl.ndarray((P_MAX, n_grp), dtype=nl.float32, buffer=nl.sbuf)
    for g in range(n_grp):
        r0 = (pid + (j0 + g) * n_prog) * P_MAX
        r_sz = min(P_MAX, n_rows - r0)
        nisa.dma_copy(dst=x_sb[0:r_sz, g, :], src=x[r0:r0 + r_sz, :])
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        nisa.tensor_reduce(dst=neg_max_sb[0:r_sz, g:g + 1], op=nl.maximum, data=x_sb[0:r_sz, g, :], axis=1,
                           negate=True)
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        # exp(x - max) overwrites the tile; the row sum accumulates in fp32 before any rounding to x's dtype
        nisa.activation_reduce(dst=x_sb[0:r_sz, g, :], op=nl.exp, data=x_sb[0:r_sz, g, :], reduce_op=nl.add,
                               reduce_res=row_sum_sb[0:r_sz, g:g + 1], bias=neg_max_sb[0:r_sz, g:g + 1])
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        nisa.reciprocal(dst=inv_sum_sb[0:r_sz, g:g + 1], data=row_sum_sb[0:r_sz, g:g + 1])
    # Normalise: VectorE scales the first half of the columns, ScalarE the second half, so the two engines
    # share the work (ScalarE already ran the exp pass) and neither outlasts the DMAs.
    c_split = (n_cols + 1) // 2
    for g in range(n_grp):
        r0 = (pid + (j0 + g) * n_prog) * P_MAX
        r_sz = min(P_MAX, n_rows - r0)
        nisa.tensor_scalar(dst=x_sb[0:r_sz, g, 0:c_split], data=x_sb[0:r_sz, g, 0:c_split], op0=nl.multiply,
                           operand0=inv_sum_sb[0:r_sz, g:g + 1])
        if c_split < n_cols:
            nisa.activation(dst=x_sb[0:r_sz, g, c_split:n_cols], op=nl.copy, data=x_sb[0:r_sz, g, c_split:n_cols],
                            scale=inv_sum_sb[0:r_sz, g:g + 1])
        nisa.dma_copy(dst=out[r0:r0 + r_sz, :], src=x_sb[0:r_sz, g, :])


def softmax(x, lnc=None):
    """Row softmax over the last dim of x [R, C] (fp32/bf16/fp16). NumPy or torch in, the same kind out."""
    return call(softmax_kernel, x, lnc=check_softmax(x, lnc))


def check_softmax(x, lnc=None) -> int:
    """`softmax`'s checks (shapes, dtypes, options; torch_ops' fake runs them too); returns the resolved lnc."""
    check_array("softmax", "x", x)
    kernel_check(getattr(x, "ndim", 0) == 2, f"softmax: x must be 2-D [R, C], got x.shape={tuple(x.shape)}")
    kernel_check(str(x.dtype).replace("torch.", "") in _FLOAT_DTYPES,
                 f"softmax: dtype must be one of {_FLOAT_DTYPES}, got x.dtype={x.dtype}")
    kernel_check(1 <= x.shape[1] <= _MAX_C, f"softmax: C must be in [1, {_MAX_C}], got C={x.shape[1]}")
    kernel_check(x.shape[0] >= 1, f"softmax: R must be >= 1, got R={x.shape[0]}")
    return resolve_lnc(lnc, "softmax")
