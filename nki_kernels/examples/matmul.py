"""Tiled matmul: out[M, N] = lhsT[K, M].T @ rhs[K, N], bf16 or fp32 in, fp32 PSUM accumulation.

Dimensions:
    K: contraction, tiled by P_MAX (128) partitions.
    M: output rows, tiled by GEMM_STATIONARY_FMAX (128).
    N: output columns, tiled by GEMM_MOVING_FMAX (512), one PSUM bank per tile.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, P_MAX
from ..validation import kernel_check

_K_TILE = P_MAX                   # contraction rows per matmul instruction
_M_TILE = GEMM_STATIONARY_FMAX    # stationary free size per instruction
_N_TILE = GEMM_MOVING_FMAX        # moving free size per instruction (one fp32 PSUM bank)


@nki.jit
def tiled_matmul_kernel(lhsT, rhs):
    """out[M, N] = lhsT[K, M].T @ rhs[K, N].

    Args:
        lhsT: [K, M] @ HBM, bf16/fp16/fp32 (the left operand, pre-transposed).
        rhs: [K, N] @ HBM, same dtype class as lhsT.
    Returns:
        out: [M, N] @ HBM, lhsT's dtype.
    Notes:
        Under LNC=2 program p computes the row tiles i_m with i_m % 2 == p.
    Pseudocode:
        for each (m, n) tile: psum = sum_k lhsT[k, m].T @ rhs[k, n]; out[m, n] = psum
    """
    k_total, m_total = lhsT.shape
    n_total = rhs.shape[1]
    out = nl.ndarray((m_total, n_total), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    n_k = (k_total + _K_TILE - 1) // _K_TILE
    n_m = (m_total + _M_TILE - 1) // _M_TILE
    n_n = (n_total + _N_TILE - 1) // _N_TILE
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    for i_n in nl.affine_range(n_n):
        n0 = i_n * _N_TILE
        n_sz = min(_N_TILE, n_total - n0)
        rhs_sb = _load_rhs_block(rhs, n0, n_sz, n_k)
        for i_m in nl.affine_range(n_m):
            if i_m % n_prog != pid:
                continue
            m0 = i_m * _M_TILE
            m_sz = min(_M_TILE, m_total - m0)
            acc_psum = nl.ndarray((_M_TILE, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in nl.affine_range(n_k):
                k0 = i_k * _K_TILE
                k_sz = min(_K_TILE, k_total - k0)
                lhs_sb = nl.ndarray((_K_TILE, _M_TILE), dtype=lhsT.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=lhs_sb[0:k_sz, 0:m_sz], src=lhsT[k0:k0 + k_sz, m0:m0 + m_sz])
                nisa.nc_matmul(acc_psum[0:m_sz, 0:n_sz], lhs_sb[0:k_sz, 0:m_sz],
                               rhs_sb[0:k_sz, i_k, 0:n_sz], accumulate=(i_k > 0))
            out_sb = nl.ndarray((_M_TILE, _N_TILE), dtype=lhsT.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=out_sb[0:m_sz, 0:n_sz], src=acc_psum[0:m_sz, 0:n_sz])
            nisa.dma_copy(dst=out[m0:m0 + m_sz, n0:n0 + n_sz], src=out_sb[0:m_sz, 0:n_sz])
    return out


def _load_rhs_block(rhs, n0, n_sz, n_k):
    """All K tiles of one N block in SBUF: [K_TILE, n_k, N_TILE], loaded once and reused for every M tile."""
    k_total = rhs.shape[0]
    rhs_sb = nl.ndarray((_K_TILE, n_k, _N_TILE), dtype=rhs.dtype, buffer=nl.sbuf)
    for i_k in nl.affine_range(n_k):
        k0 = i_k * _K_TILE
        k_sz = min(_K_TILE, k_total - k0)
        nisa.dma_copy(dst=rhs_sb[0:k_sz, i_k, 0:n_sz], src=rhs[k0:k0 + k_sz, n0:n0 + n_sz])
    return rhs_sb


_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def tiled_matmul(lhsT, rhs, lnc: int = 1):
    """Host wrapper: validates and launches `tiled_matmul_kernel`. NumPy or torch in, the same kind out."""
    kernel_check(getattr(lhsT, "ndim", 0) == 2 and getattr(rhs, "ndim", 0) == 2,
                 f"tiled_matmul: lhsT and rhs must be 2-D, got lhsT.shape={tuple(lhsT.shape)}, "
                 f"rhs.shape={tuple(rhs.shape)}")
    kernel_check(lhsT.shape[0] == rhs.shape[0],
                 f"tiled_matmul: contraction dims differ, got lhsT K={lhsT.shape[0]}, rhs K={rhs.shape[0]}")
    kernel_check(str(lhsT.dtype).replace("torch.", "") in _FLOAT_DTYPES,
                 f"tiled_matmul: dtype must be one of {_FLOAT_DTYPES}, got lhsT.dtype={lhsT.dtype}")
    kernel_check(lhsT.dtype == rhs.dtype, f"tiled_matmul: dtypes differ, got {lhsT.dtype} and {rhs.dtype}")
    kernel_check(lnc in (1, 2), f"tiled_matmul: lnc must be 1 or 2, got lnc={lnc}")
    return call(tiled_matmul_kernel, lhsT, rhs, lnc=lnc)

