"""Held-out calibration kernels added in the v5 round, re-written from published code (never copied); the
selection rule is in points.py and was committed (50b914f) before these re-writes existed.

LN5.*: the LayerNorm programs the Autocomp sample run measured but did not keep in its beam (ucb-bar/autocomp
visualizer/src/extension/__fixtures__/sample_run/eval-results-iter-*/code_*_result_full.txt; the same harness as
the v4 LN points: x [4096, 8192] fp32, gamma, beta [8192], eps 1e-5; trn1, `bench` P99). Of the seven correct,
measured programs not yet points, four have distinct instruction streams under the fixed choices:
  * LN5.2774 (iteration 1, code 0): x loaded whole, and again per 512-column chunk for bn_stats (one more load
    per chunk); bn_aggr; nl.subtract(x, mean), rsqrt(var + eps), multiply; gamma, beta.
  * LN5.2968 (iteration 1, code 3; code 7, 2.951 ms, is the same stream written with nl.* calls): nl.mean and
    nl.var; (x - mean) * rsqrt(var + eps); gamma, beta.
  * LN5.3734 (iteration 2, code 15): explicit sums, [P, 1] ops as tensor_scalar; mean and var broadcast along the
    free axis, so x - mean, var + eps and rsqrt run over [P, F] tiles.
  * (iteration 2, code 3, 4.396 ms: the tutorial's mean / var; gamma and beta broadcast onto the partitions
    inside the row loop; out = x * (gamma * rstd) + (beta - mean * gamma * rstd), all [P, F]; excluded, below.)
Not new points (rule (b)): iteration 2 code 2 (2.499 ms) is LN.2326's stream (it only drops the F <= 512 branch
and writes the normalised tile as fp32, which it is anyway), iteration 2 code 7 (2.752 ms) is LN.2461's (nl.mean
written out as tensor_reduce + tensor_scalar, which is how the v4 choices already model nl.mean), iteration 1
code 7 is code 3's.

Choices the published code leaves to the compiler: those of kernels_v4.py's docstring, unchanged, plus (fixed
here before any of these kernels was modeled):
- nl.var(x, axis=1) is computed as numpy.var defines it (the nl.var docstring: "Similar to numpy.var"):
  its own mean (tensor_reduce + [P, 1] multiply by 1/F), x - mean, the square, tensor_reduce, multiply by 1/F;
  the [P, F] steps in the work tile;
- an nl.* call whose [P, 1] operand was broadcast to [P, F] by `.broadcast_to` first (LN5.3734) is a
  tensor_tensor / tensor_scalar over [P, F] with a stride-0 access pattern on that operand, and nl.rsqrt of such
  a [P, F] tile is a ScalarE activation over all F elements (as written: the broadcast happens before the op);
- nl.broadcast_to(gamma_sb, (P, F)) of the [1, F] SBUF tile inside the row loop (iteration 2 code 3) is, per
  row tile, one SBUF-to-SBUF DMA of that row onto the 128 partitions (engines read their own partitions only),
  for gamma and for beta;
- [P, F] temporaries that are live together get their own tiles; a temporary whose inputs are dead overwrites
  one of them.
Excluded by rule (a) under these choices: iteration 2 code 3 (4.396 ms, the slowest program of the run). Its
[1, F] gamma / beta rows (32 KiB per partition each), the two per-tile broadcasts, x, scale and bias are live
together: the re-write stopped on the emulator's SBUF-capacity check at F = 8192 (163,852 B live + 32,768 B >
180,224 B per partition on trn1) before any time was modeled, so the device ran a compiler-spilled program, not
the published one. Its re-write is not kept. So the v5 rule yields three points: LN5.2774, LN5.2968, LN5.3734.
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import P_MAX

from .kernels import _broadcast_rows
from .kernels_v4 import _BN_STATS_FMAX, _BN_STATS_WIDTH, LN_EPS, _affine, _col, _rstd

# LN5 variants (the published score in µs identifies the program):
LN5_RELOAD_BN = 2774      # bn_stats on a second load of each 512-column chunk
LN5_NL_VAR = 2968         # nl.mean and nl.var
LN5_FREE_BCAST = 3734     # mean / var broadcast to [P, F] before x - mean, var + eps, rsqrt
LN5_VARIANTS = (LN5_RELOAD_BN, LN5_NL_VAR, LN5_FREE_BCAST)


def _mean(x_sb):
    """nl.mean(x, axis=1): tensor_reduce (add) and a [P, 1] multiply by 1/F."""
    m = _col()
    nisa.tensor_reduce(dst=m, op=nl.add, data=x_sb, axis=1)
    nisa.tensor_scalar(dst=m, data=m, op0=nl.multiply, operand0=1.0 / x_sb.shape[1])
    return m


def _var_numpy(x_sb, work):
    """nl.var(x, axis=1) as numpy.var: mean((x - mean(x)) ** 2), the [P, F] steps in `work`."""
    mu = _mean(x_sb)
    nisa.tensor_scalar(dst=work, data=x_sb, op0=nl.subtract, operand0=mu)
    nisa.tensor_tensor(dst=work, data1=work, data2=work, op=nl.multiply)
    return _mean(work)


def _mean_var_reloaded_bn(x, rows, f):
    """LN5.2774: per 512-column chunk a new load of that chunk from HBM, bn_stats on it, the result copied into
    the stats buffer; one bn_aggr."""
    chunks = f // _BN_STATS_FMAX
    stats = nl.ndarray((P_MAX, _BN_STATS_WIDTH * chunks), dtype=nl.float32, buffer=nl.sbuf)
    for j in nl.affine_range(chunks):
        cols = slice(j * _BN_STATS_FMAX, (j + 1) * _BN_STATS_FMAX)
        sl = nl.ndarray((P_MAX, _BN_STATS_FMAX), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=sl, src=x[rows, cols])
        st = nl.ndarray((P_MAX, _BN_STATS_WIDTH), dtype=nl.float32, buffer=nl.sbuf)
        nisa.bn_stats(dst=st, data=sl)
        nisa.tensor_copy(dst=stats[:, j * _BN_STATS_WIDTH:(j + 1) * _BN_STATS_WIDTH], src=st)
    mv = nl.ndarray((P_MAX, 2), dtype=nl.float32, buffer=nl.sbuf)
    nisa.bn_aggr(dst=mv, data=stats)
    return mv[:, 0:1], mv[:, 1:2]


def _mean_var_explicit(x_sb, work):
    """LN5.3734: sums by tensor_reduce, the squares by tensor_tensor, every [P, 1] step a tensor_scalar."""
    mean = _mean(x_sb)
    nisa.tensor_tensor(dst=work, data1=x_sb, data2=x_sb, op=nl.multiply)
    msq = _mean(work)
    mm = _col()
    nisa.tensor_scalar(dst=mm, data=mean, op0=nl.multiply, operand0=mean)
    var = _col()
    nisa.tensor_scalar(dst=var, data=msq, op0=nl.subtract, operand0=mm)
    return mean, var


def _normalise_free_bcast(x_sb, mean, var, work, work2):
    """LN5.3734: (x - mean_b) * rsqrt(var_b + eps) with mean_b, var_b the [P, 1] tiles broadcast to [P, F]
    (stride 0): a tensor_tensor, a [P, F] tensor_scalar, a [P, F] ScalarE rsqrt, a tensor_tensor."""
    f = x_sb.shape[1]
    mean_b = mean.ap(pattern=[[1, P_MAX], [0, f]])
    var_b = var.ap(pattern=[[1, P_MAX], [0, f]])
    nisa.tensor_tensor(dst=work, data1=x_sb, data2=mean_b, op=nl.subtract)
    nisa.tensor_scalar(dst=work2, data=var_b, op0=nl.add, operand0=LN_EPS)
    nisa.activation(dst=work2, op=nl.rsqrt, data=work2)
    nisa.tensor_tensor(dst=work, data1=work, data2=work2, op=nl.multiply)


@nki.jit
def layernorm_ln5(x, gamma, beta, variant):
    """LN5.<variant>: y[M, F] = (x - mean) / sqrt(var + eps) * gamma + beta per row, fp32, M in 128-row tiles
    (nl.affine_range), F whole per tile; the op sequence of the published program `variant` (module docstring)."""
    m, f = x.shape
    out = nl.ndarray((m, f), dtype=x.dtype, buffer=nl.shared_hbm)
    g_sb, b_sb = _broadcast_rows(gamma), _broadcast_rows(beta)
    for i in nl.affine_range(m // P_MAX):
        rows = slice(i * P_MAX, (i + 1) * P_MAX)
        x_sb = nl.ndarray((P_MAX, f), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x[rows, :])
        work = nl.ndarray((P_MAX, f), dtype=nl.float32, buffer=nl.sbuf)
        if variant == LN5_FREE_BCAST:
            mean, var = _mean_var_explicit(x_sb, work)
            work2 = nl.ndarray((P_MAX, f), dtype=nl.float32, buffer=nl.sbuf)
            _normalise_free_bcast(x_sb, mean, var, work, work2)
            _affine(work, g_sb, b_sb)
        else:
            if variant == LN5_RELOAD_BN:
                mean, var = _mean_var_reloaded_bn(x, rows, f)
            else:                                           # LN5_NL_VAR
                mean = _mean(x_sb)
                var = _var_numpy(x_sb, work)
            nisa.tensor_scalar(dst=work, data=x_sb, op0=nl.subtract, operand0=mean)
            rs = _rstd(var, LN_EPS)
            nisa.tensor_scalar(dst=work, data=work, op0=nl.multiply, operand0=rs)
            _affine(work, g_sb, b_sb)
        nisa.dma_copy(dst=out[rows, :], src=work)
    return out
