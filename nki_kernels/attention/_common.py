"""Shared tiling constants and small on-chip steps of the attention kernels (prefill and decode).

Everything here runs inside a kernel: real NKI API only (`nl`, `nisa` from the backend).
"""
from __future__ import annotations

from ..backend import nisa, nl
from ..hw import GEMM_MOVING_FMAX, P_MAX, PSUM_BANK_BYTES
from ..transpose import mixing_pe_transpose, vector_transpose

# ---------------------------------------------------------------- constraints
MAX_HEAD_DIM = 2 * P_MAX          # D limit: the QK contraction is tiled in at most two 128-row chunks and
#                                   the [128, D] fp32 PV result must fit one 2 KiB PSUM bank (D <= 512)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")

# ---------------------------------------------------------------- tile sizes
D_CHUNK = P_MAX                   # head-dim rows per QK matmul (contraction on the partitions)
K_CHUNK = P_MAX                   # keys per PV matmul (contraction on the partitions) / per P transpose
MM_KEYS = GEMM_MOVING_FMAX        # keys per QK matmul (moving free size, one fp32 PSUM bank)
KV_BLOCK = 4 * GEMM_MOVING_FMAX   # keys per softmax block: 4 PSUM banks of fp32 scores, one max/exp each
MASK_BIAS = -1.0e30               # added to masked logits: far below any finite logit, and still finite
#                                   after the softmax scale (no -inf, no fp32 overflow when added to a logit)
MAX_SOFTMAX_SCALE = 1.0e8         # softmax_scale limit (wrappers refuse larger). The kernels form scale * S and
#                                   -scale * rowmax in fp32 (ScalarE / GpSimd), so past fp32's 3.4e38 they overflow and
#                                   exp(inf - inf) is NaN: at scale 1e38 ordinary scores (|S| >= 3.4) gave all-NaN rows
#                                   where the float64 reference is finite. At 1e8, |scale * MASK_BIAS| = 1e38 stays
#                                   finite and below the 3e38 stat / cap constants (varlen._STAT_INIT,
#                                   short_tiles._CAP), and only scores |S| > 3.4e30 overflow. Real scales are <= ~1:
#                                   D ** -0.5 (0.0625 at Qwen3.5 / Qwen3-Next's D = 256, 0.088 at D = 128), or 1.0


def n_tiles(total, tile):
    return (total + tile - 1) // tile


def is_two_byte(dtype) -> bool:
    """bf16/fp16 tiles can be transposed by DMA; fp32 tiles go through the TensorE (PE) transpose."""
    return nl.bfloat16 == dtype or nl.float16 == dtype


def pe_transpose_group(dtype) -> int:
    """How many 128-wide PE transposes of `dtype` fit one PSUM bank side by side."""
    itemsize = 4 if nl.float32 == dtype else 2
    return PSUM_BANK_BYTES // (P_MAX * itemsize)


def pe_transpose_keys(kT_sb, key_rows, n_keys, n_c, d, n_d, t_psum, per_bank, key0=0, n_t=0, dve_last=0,
                      exact=True):
    """kT_sb[0:dn, i_d, key0 + j] = K[j, i_d * 128 + 0:dn] for the n_keys keys of n_c 128-key chunks: PE transposes
    (`exact_transpose`: VectorE blocks on trn1, unless exact=False),
    `per_bank` chunks side by side in one PSUM bank (`pe_transpose_group`), the banks alternating between the two
    halves of t_psum [128, 2, per_bank, 128], each bank evicted by one ScalarE copy. key_rows(c, d0, dn, cn) is
    the [cn keys, dn] SBUF tile of chunk c's keys at head-dim offset d0. n_t counts the banks used so far (the
    alternation continues across calls); returns the new count. dve_last: the call's last dve_last banks are evicted
    by the VectorE instead (the end of a latency-bound chain: a faster copy, and the ScalarE is left free).
    exact=False: always the TensorE (decode: one sequence's cache keys, padding rows zeroed before on trn1)."""
    n_banks = n_d * n_tiles(n_c, per_bank)
    i_bank = 0
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        for g0 in range(0, n_c, per_bank):
            gn = min(per_bank, n_c - g0)
            slot = n_t % t_psum.shape[1]
            n_t += 1
            for i_c in range(gn):
                c = g0 + i_c
                cn = min(K_CHUNK, n_keys - c * K_CHUNK)
                if exact:
                    exact_transpose(t_psum[0:dn, slot, i_c, 0:cn], key_rows(c, d0, dn, cn))
                else:
                    nisa.nc_transpose(dst=t_psum[0:dn, slot, i_c, 0:cn], data=key_rows(c, d0, dn, cn))
            keys0 = key0 + g0 * K_CHUNK
            keys = min(gn * K_CHUNK, n_keys - g0 * K_CHUNK)
            dst = kT_sb[0:dn, i_d, keys0:keys0 + keys]
            src = t_psum[0:dn, slot, 0:gn, 0:P_MAX].reshape((dn, gn * P_MAX))[:, 0:keys]
            i_bank += 1
            if i_bank > n_banks - dve_last:
                nisa.tensor_copy(dst=dst, src=src)
            else:
                nisa.activation(dst=dst, op=nl.copy, data=src)
    return n_t


def load_transposed(dst_sb, src_hbm, rows, cols, dtype, row_len=None, row0=0):
    """dst_sb[0:cols, 0:rows] = src_hbm[rows, cols].T, for cols <= 128.

    2-byte dtypes: one DMA transpose. fp32: natural-layout DMA into SBUF, then PE transposes (`exact_transpose`) of
    128-row pieces through PSUM. row_len (fp32 path): rows at positions row0 + r >= the length are zeroed before
    their PE transpose (trn1's transpose would spread a NaN there over every row).
    """
    if is_two_byte(dtype):
        nisa.dma_transpose(dst=dst_sb[0:cols, 0:rows], src=src_hbm)
        return
    for r0 in range(0, rows, P_MAX):
        rn = min(P_MAX, rows - r0)
        nat_sb = nl.ndarray((P_MAX, cols), dtype=dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=nat_sb[0:rn, 0:cols], src=src_hbm[r0:r0 + rn, 0:cols])
        if row_len is not None:
            zero_rows_past_length(nat_sb[0:rn, 0:cols].reshape((rn, 1, cols)), row_len, row0 + r0, P_MAX)
        tp_psum = nl.ndarray((P_MAX, P_MAX), dtype=dtype, buffer=nl.psum)
        exact_transpose(tp_psum[0:cols, 0:rn], nat_sb[0:rn, 0:cols])
        nisa.tensor_copy(dst=dst_sb[0:cols, r0:r0 + rn], src=tp_psum[0:cols, 0:rn])


def exact_transpose(dst, data):
    """dst[F, P] = data[P, F] (SBUF -> PSUM, <= 128 x 128): one TensorE transpose, or on targets whose TensorE
    transpose mixes NaN / Inf across the rows (trn1, `mixing_pe_transpose`) VectorE 32x32 blocks, so that a
    non-finite value of one row (a token, a sequence) stays in its own output column. Same result and layout
    either way; trn2 / trn3 instruction streams are unchanged."""
    if mixing_pe_transpose():
        vector_transpose(dst, data)
    else:
        nisa.nc_transpose(dst=dst, data=data)


def load_len_broadcast(lens_hbm, b, parts):
    """A (parts, 1) fp32 tile holding lens_hbm[b] on every partition (partition-stride-0 DMA)."""
    len_i = nl.ndarray((parts, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=len_i, src=lens_hbm.ap(pattern=[[0, parts], [1, 1]], offset=b))
    len_f = nl.ndarray((parts, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=len_f, src=len_i)
    return len_f


def zero_rows_past_length(x_sb, len_f, offset, chunk_step, channel_multiplier=1):
    """Rows of x_sb at sequence positions >= the length := 0, whatever they held (NaN, Inf, 1e30).

    x_sb: [P, n_c, F] SBUF view; row (p, c) holds position offset + p * channel_multiplier + c * chunk_step.
    len_f: (>= P, 1) fp32, the length on every partition. A GpSimd iota + compare makes a [P, n_c] uint8
    predicate; one VectorE predicated copy writes 0 through it, read with a stride-0 free pattern over F (no
    per-element mask tile; the single-byte stride halves the VectorE rate). Selecting, not multiplying: 0 * NaN
    would stay NaN.
    """
    parts, n_c, f = x_sb.shape
    pos_sb = nl.ndarray((P_MAX, n_c), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(pos_sb[0:parts], pattern=[[chunk_step, n_c]], offset=offset, channel_multiplier=channel_multiplier)
    pad_sb = nl.ndarray((P_MAX, n_c), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=pad_sb[0:parts], data=pos_sb[0:parts], op0=nl.greater_equal, operand0=len_f[0:parts],
                       engine=nisa.engine.gpsimd)
    nisa.tensor_copy_predicated(dst=x_sb, src=0.0, predicate=pad_sb.ap(pattern=[[n_c, parts], [1, n_c], [0, f]],
                                                                       offset=0))


def load_t(dst_sb, src, n, d, width):
    """dst_sb [128(d), n_d, width] <- src [n, D]^T (column j = row j) by DMA transpose (2-byte dtypes): one DMA
    for all head-dim chunks when D is a multiple of 128 (2 KiB partition rows at n = 512, D = 256), else one per
    chunk; phantom columns n .. width := 0."""
    n_d = n_tiles(d, D_CHUNK)
    if n < width:
        nisa.memset(dst=dst_sb[:, :, n:width], value=0.0, engine=nisa.engine.gpsimd)
    if d == n_d * D_CHUNK:
        nisa.dma_transpose(dst=dst_sb[0:D_CHUNK, 0:n_d, 0:n], src=src[0:n, 0:d].reshape((n, n_d, D_CHUNK)))
        return
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        nisa.dma_transpose(dst=dst_sb[0:dn, i_d, 0:n], src=src[0:n, d0:d0 + dn])
