"""RMSNorm: out[r, :] = x[r, :] * rsqrt(mean_h(x[r, h]^2) + eps) * weight, fp32 statistics.

Dimensions:
    R: rows (tokens, any count), tiled by P_MAX (128) rows on the partitions.
    H: hidden size (normalised axis), whole row in SBUF, 1 <= H <= _MAX_H.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..validation import check_array, check_float, kernel_check
from ._common import dtype_bytes

# ---- constraints
# weight tile + a group's x and output tiles (<= 48 KiB each, one fp32 row of 12288) must fit one SBUF
# partition on every target (180224 B on trn1, the smallest): 3 * 48 KiB = 147456 B.
_MAX_H = 12288
# rsqrt's documented valid input range starts at 2^-87; eps keeps the mean square + eps inside it.
_RSQRT_MIN_INPUT = 2.0 ** -87
# ---- tiling
_GROUP_MAX = 4                # row tiles per loop iteration whose steps interleave across VectorE / ScalarE
_GROUP_BYTES = 48 * 1024      # SBUF bytes per partition each of a group's x and output tiles may take
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@nki.jit
def rmsnorm_kernel(x, weight, eps):
    """RMSNorm over the last dim, 128 rows per tile; the weight is broadcast to all partitions once.

    Dimensions:
        R rows, H hidden.
    Args:
        x: [R, H] @ HBM, fp32/bf16/fp16.
        weight: [H] @ HBM, x's dtype.
        eps: float, trace-time constant added to the mean square.
    Returns:
        out: [R, H] @ HBM, x's dtype.
    Constraints:
        H <= _MAX_H (12288); mean(x^2) + eps <= 2^97 (rsqrt's valid input range, |x| up to ~1e14);
        under LNC=2 program p handles the row tiles i_r with i_r % 2 == p.
    Pseudocode:
        w_sb[p, :] = weight for every partition p        # one DMA, partition stride 0
        for each group of up to _GROUP_MAX 128-row tiles (each step issued for the whole group):
            ss = sum_h t^2                               # ScalarE activation(square) with reduce, fp32
            rstd = rsqrt(ss / H + eps)                   # VectorE tensor_scalar, ScalarE rsqrt
            out_tile = (t * rstd) * w_sb; store          # first half of H: VectorE scalar_tensor_tensor;
                                                         # second half: ScalarE (x * rstd), VectorE (* w)
    """
    n_rows, hidden = x.shape
    out = nl.ndarray((n_rows, hidden), dtype=x.dtype, buffer=nl.shared_hbm)
    n_tiles = (n_rows + P_MAX - 1) // P_MAX
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    rows_here = min(P_MAX, n_rows)
    # Broadcast weight [H] across partitions: an access pattern whose partition stride is 0.
    w_sb = nl.ndarray((P_MAX, hidden), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb[0:rows_here, :], src=weight.ap(pattern=[[0, rows_here], [1, hidden]], offset=0))
    inv_hidden = 1.0 / hidden
    n_mine = (n_tiles - pid + n_prog - 1) // n_prog          # row tiles i_r = pid + j * n_prog, j < n_mine
    group = max(1, min(_GROUP_MAX, _GROUP_BYTES // (hidden * dtype_bytes(x.dtype))))
    for i_g in range((n_mine + group - 1) // group):
        j0 = i_g * group
        _rmsnorm_group(x, w_sb, out, j0, min(group, n_mine - j0), pid, n_prog, inv_hidden, eps)
    return out


def _rmsnorm_group(x, w_sb, out, j0, n_grp, pid, n_prog, inv_hidden, eps):
    """RMSNorm of this program's row tiles j0 .. j0 + n_grp - 1 (tile j covers rows from (pid + j * n_prog) * 128),
    HBM to HBM."""
    n_rows, hidden = x.shape
    x_sb = nl.ndarray((P_MAX, n_grp, hidden), dtype=x.dtype, buffer=nl.sbuf)
    out_sb = nl.ndarray((P_MAX, n_grp, hidden), dtype=x.dtype, buffer=nl.sbuf)
    sum_sq_sb = nl.ndarray((P_MAX, n_grp), dtype=nl.float32, buffer=nl.sbuf)     # column g: tile g
    rstd_sb = nl.ndarray((P_MAX, n_grp), dtype=nl.float32, buffer=nl.sbuf)
    for g in range(n_grp):
        r0 = (pid + (j0 + g) * n_prog) * P_MAX
        r_sz = min(P_MAX, n_rows - r0)
        nisa.dma_copy(dst=x_sb[0:r_sz, g, :], src=x[r0:r0 + r_sz, :])
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        # The squares land in out_sb as scratch (overwritten below); the row sums accumulate in fp32.
        nisa.activation_reduce(dst=out_sb[0:r_sz, g, :], op=nl.square, data=x_sb[0:r_sz, g, :], reduce_op=nl.add,
                               reduce_res=sum_sq_sb[0:r_sz, g:g + 1])
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        nisa.tensor_scalar(dst=rstd_sb[0:r_sz, g:g + 1], data=sum_sq_sb[0:r_sz, g:g + 1], op0=nl.multiply,
                           operand0=inv_hidden, op1=nl.add, operand1=eps)
    for g in range(n_grp):
        r_sz = min(P_MAX, n_rows - (pid + (j0 + g) * n_prog) * P_MAX)
        nisa.activation(dst=rstd_sb[0:r_sz, g:g + 1], op=nl.rsqrt, data=rstd_sb[0:r_sz, g:g + 1])
    # out = (x * rstd) * w. VectorE does the first half of the columns in one pass; for the second half
    # ScalarE applies rstd (activation scale) and VectorE multiplies by w, which balances the two engines.
    h_split = (hidden + 1) // 2
    for g in range(n_grp):
        r0 = (pid + (j0 + g) * n_prog) * P_MAX
        r_sz = min(P_MAX, n_rows - r0)
        nisa.scalar_tensor_tensor(dst=out_sb[0:r_sz, g, 0:h_split], data=x_sb[0:r_sz, g, 0:h_split],
                                  op0=nl.multiply, operand0=rstd_sb[0:r_sz, g:g + 1], op1=nl.multiply,
                                  operand1=w_sb[0:r_sz, 0:h_split])
        if h_split < hidden:
            nisa.activation(dst=out_sb[0:r_sz, g, h_split:hidden], op=nl.copy, data=x_sb[0:r_sz, g, h_split:hidden],
                            scale=rstd_sb[0:r_sz, g:g + 1])
            nisa.tensor_tensor(dst=out_sb[0:r_sz, g, h_split:hidden], data1=out_sb[0:r_sz, g, h_split:hidden],
                               data2=w_sb[0:r_sz, h_split:hidden], op=nl.multiply)
        nisa.dma_copy(dst=out[r0:r0 + r_sz, :], src=out_sb[0:r_sz, g, :])


def rmsnorm(x, weight, eps: float = 1e-6, lnc=None):
    """RMSNorm of x [R, H] with weight [H] (same dtype). NumPy or torch in, the same kind out."""
    eps, lnc = check_rmsnorm(x, weight, eps, lnc)
    return call(rmsnorm_kernel, x, weight, eps, lnc=lnc)


def check_rmsnorm(x, weight, eps: float = 1e-6, lnc=None):
    """`rmsnorm`'s checks (shapes, dtypes, options; torch_ops' fake runs them too); returns (eps, lnc)."""
    check_array("rmsnorm", "x", x)
    check_array("rmsnorm", "weight", weight)
    eps = check_float("rmsnorm", "eps", eps)
    kernel_check(getattr(x, "ndim", 0) == 2, f"rmsnorm: x must be 2-D [R, H], got x.shape={tuple(x.shape)}")
    kernel_check(getattr(weight, "ndim", 0) == 1 and weight.shape[0] == x.shape[1],
                 f"rmsnorm: weight must be [H] with H = x.shape[1] = {x.shape[1]}, "
                 f"got weight.shape={tuple(weight.shape)}")
    kernel_check(str(x.dtype).replace("torch.", "") in _FLOAT_DTYPES,
                 f"rmsnorm: dtype must be one of {_FLOAT_DTYPES}, got x.dtype={x.dtype}")
    kernel_check(weight.dtype == x.dtype, f"rmsnorm: weight dtype must equal x's, got weight.dtype={weight.dtype}, "
                 f"x.dtype={x.dtype}")
    kernel_check(1 <= x.shape[1] <= _MAX_H, f"rmsnorm: H must be in [1, {_MAX_H}], got H={x.shape[1]}")
    kernel_check(x.shape[0] >= 1, f"rmsnorm: R must be >= 1, got R={x.shape[0]}")
    kernel_check(eps >= _RSQRT_MIN_INPUT,
                 f"rmsnorm: eps must be a float >= 2**-87 (rsqrt's valid input range), got eps={eps}")
    return float(eps), resolve_lnc(lnc, "rmsnorm")
