"""Tiled matmul: out[M, N] = lhsT[K, M].T @ rhs[K, N], bf16/fp16/fp32 in, fp32 PSUM accumulation.

Dimensions:
    K: contraction, tiled by P_MAX (128) partitions, 1 <= K <= _MAX_K.
    M: output rows, tiled by GEMM_STATIONARY_FMAX (128).
    N: output columns, tiled by GEMM_MOVING_FMAX (512), one PSUM bank per tile.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, P_MAX
from ..lnc import resolve_lnc
from ..validation import check_array, kernel_check
from ._common import dtype_bytes

# ---- tiles
_K_TILE = P_MAX                   # contraction rows per matmul instruction
_M_TILE = GEMM_STATIONARY_FMAX    # stationary free size per instruction
_N_TILE = GEMM_MOVING_FMAX        # moving free size per instruction (one fp32 PSUM bank)
# ---- SBUF budget (bytes per partition)
_LHS_RESIDENT_BYTES = 64 * 1024  # keep all of lhsT in SBUF (loaded once) when it takes at most this much
# ---- constraints
# one rhs column block holds every K tile: n_k * 512 * 4 B <= 64 KiB at K = 4096 fp32 (8192 bf16 = 64 KiB);
# with a resident lhsT (<= 64 KiB) and the output tile it fits every target's SBUF (180224 B on trn1).
_MAX_K_BYTES = 8192 * 2           # K * itemsize <= 16 KiB
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@nki.jit
def tiled_matmul_kernel(lhsT, rhs):
    """out[M, N] = lhsT[K, M].T @ rhs[K, N].

    Dimensions:
        K contraction, M output rows, N output columns.
    Args:
        lhsT: [K, M] @ HBM, bf16/fp16/fp32 (the left operand, pre-transposed).
        rhs: [K, N] @ HBM, lhsT's dtype.
    Returns:
        out: [M, N] @ HBM, lhsT's dtype.
    Constraints:
        K * itemsize <= _MAX_K_BYTES (16 KiB); under LNC=2 program p computes the row tiles i_m with
        i_m % 2 == p.
    Pseudocode:
        lhs_sb = SBUF [128, n_k, M] if it fits _LHS_RESIDENT_BYTES (each M block loaded on first use)
        for each N block n (512 columns):
            rhs_sb = rhs[:, n] as [128, n_k, 512]                          # one DMA (+ one for a K tail)
            for each M tile m (128 rows) of this program:
                (non-resident: load lhsT[:, m] as [128, n_k, 128], one DMA + one for a K tail)
                psum[m, n] = sum_k lhs_sb[k, m].T @ rhs_sb[k, n]            # TensorE, fp32 accumulate
                out[m, n] = psum                                           # VectorE evict + DMA
    """
    k_total, m_total = lhsT.shape
    n_total = rhs.shape[1]
    out = nl.ndarray((m_total, n_total), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    n_k = (k_total + _K_TILE - 1) // _K_TILE
    n_m = (m_total + _M_TILE - 1) // _M_TILE
    n_n = (n_total + _N_TILE - 1) // _N_TILE
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    resident = n_m * n_k * _M_TILE * dtype_bytes(lhsT.dtype) <= _LHS_RESIDENT_BYTES
    if resident:
        lhs_all = nl.ndarray((_K_TILE, n_m, n_k, _M_TILE), dtype=lhsT.dtype, buffer=nl.sbuf)
    for i_n in range(n_n):
        n0 = i_n * _N_TILE
        n_sz = min(_N_TILE, n_total - n0)
        rhs_sb = nl.ndarray((_K_TILE, n_k, _N_TILE), dtype=rhs.dtype, buffer=nl.sbuf)
        _load_k_tiles(rhs_sb, rhs, n0, n_sz)
        for i_m in range(pid, n_m, n_prog):          # this program's M tiles
            m0 = i_m * _M_TILE
            m_sz = min(_M_TILE, m_total - m0)
            if resident:
                lhs_sb = lhs_all[:, i_m, :, :]
                if i_n == 0:      # first use: load this M block; later N blocks reuse it from SBUF
                    _load_k_tiles(lhs_sb, lhsT, m0, m_sz)
            else:
                lhs_sb = nl.ndarray((_K_TILE, n_k, _M_TILE), dtype=lhsT.dtype, buffer=nl.sbuf)
                _load_k_tiles(lhs_sb, lhsT, m0, m_sz)
            acc_psum = nl.ndarray((_M_TILE, _N_TILE), dtype=nl.float32, buffer=nl.psum)
            for i_k in range(n_k):
                k_sz = min(_K_TILE, k_total - i_k * _K_TILE)
                nisa.nc_matmul(acc_psum[0:m_sz, 0:n_sz], lhs_sb[0:k_sz, i_k, 0:m_sz],
                               rhs_sb[0:k_sz, i_k, 0:n_sz], accumulate=(i_k > 0))
            out_sb = nl.ndarray((_M_TILE, _N_TILE), dtype=lhsT.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=out_sb[0:m_sz, 0:n_sz], src=acc_psum[0:m_sz, 0:n_sz])
            nisa.dma_copy(dst=out[m0:m0 + m_sz, n0:n0 + n_sz], src=out_sb[0:m_sz, 0:n_sz])
    return out


def _load_k_tiles(dst_sb, src, c0, c_sz):
    """dst_sb[p, i_k, c] = src[i_k * 128 + p, c0 + c] for c < c_sz: columns of src [K, C] @ HBM as K tiles in
    an SBUF view [K_TILE, n_k, width]. Full K tiles come in one DMA, a K tail in a second."""
    k_total, c_total = src.shape
    n_full = k_total // _K_TILE
    if n_full > 0:
        nisa.dma_copy(dst=dst_sb[0:_K_TILE, 0:n_full, 0:c_sz],
                      src=src.ap(pattern=[[c_total, _K_TILE], [_K_TILE * c_total, n_full], [1, c_sz]], offset=c0))
    k_tail = k_total - n_full * _K_TILE
    if k_tail > 0:
        k0 = n_full * _K_TILE
        nisa.dma_copy(dst=dst_sb[0:k_tail, n_full, 0:c_sz], src=src[k0:k_total, c0:c0 + c_sz])


def tiled_matmul(lhsT, rhs, lnc=None):
    """Host wrapper: validates and launches `tiled_matmul_kernel`. NumPy or torch in, the same kind out."""
    lnc = check_tiled_matmul(lhsT, rhs, lnc)
    return call(tiled_matmul_kernel, lhsT, rhs, lnc=lnc)


def check_tiled_matmul(lhsT, rhs, lnc=None) -> int:
    """`tiled_matmul`'s checks (shapes, dtypes, options: no values, so torch_ops' fake runs them too); returns the
    resolved lnc."""
    check_array("tiled_matmul", "lhsT", lhsT)
    check_array("tiled_matmul", "rhs", rhs)
    kernel_check(getattr(lhsT, "ndim", 0) == 2 and getattr(rhs, "ndim", 0) == 2,
                 f"tiled_matmul: lhsT and rhs must be 2-D, got lhsT.shape={tuple(lhsT.shape)}, "
                 f"rhs.shape={tuple(rhs.shape)}")
    kernel_check(lhsT.shape[0] == rhs.shape[0],
                 f"tiled_matmul: contraction dims differ, got lhsT K={lhsT.shape[0]}, rhs K={rhs.shape[0]}")
    kernel_check(str(lhsT.dtype).replace("torch.", "") in _FLOAT_DTYPES,
                 f"tiled_matmul: dtype must be one of {_FLOAT_DTYPES}, got lhsT.dtype={lhsT.dtype}")
    kernel_check(lhsT.dtype == rhs.dtype, f"tiled_matmul: dtypes differ, got {lhsT.dtype} and {rhs.dtype}")
    itemsize = dtype_bytes(lhsT.dtype)
    kernel_check(lhsT.shape[0] * itemsize <= _MAX_K_BYTES,
                 f"tiled_matmul: K * itemsize must be <= {_MAX_K_BYTES} B (K <= {_MAX_K_BYTES // itemsize} for "
                 f"{lhsT.dtype}), got K={lhsT.shape[0]}")
    return resolve_lnc(lnc, "tiled_matmul")
