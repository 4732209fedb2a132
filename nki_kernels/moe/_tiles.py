"""Per-tile building blocks shared by the MoE kernels (plain helpers called from `@nki.jit` kernels).

Layout conventions (see KERNELS.md ("MoE")):
  * hidden columns h are split as h = p * n_h + j (p the partition, j < n_h = H / 128), so one expert's
    gate_up rows [H, 2, I] load with one contiguous run of n_h * 2I elements per partition (or on 64
    partitions, n_h = H / 64, where a 128-partition run would be shorter than a DMA packet);
  * intermediate rows i of `down` [I, H] are split as i = q * n_i + c (q < ic = I / n_i, n_i = ceil(I / 128)),
    again contiguous per partition;
  * a token chunk holds up to 128 tokens on the partitions.
"""
from __future__ import annotations

from ..backend import nisa, nl
from ..hw import GEMM_MOVING_FMAX, P_MAX, PSUM_BANK_BYTES, PSUM_FMAX_FP32
from ..transpose import mixing_pe_transpose, vector_transpose

# ---- tiles
TOK_TILE = P_MAX                       # tokens per chunk: matmul stationary free size / partitions
_GU_SLICE = PSUM_FMAX_FP32 // 2        # gate + up columns of one slice share one fp32 PSUM bank (256 + 256)
_Y_TILE = GEMM_MOVING_FMAX             # down-projection output columns per matmul (one fp32 PSUM bank)


def itemsize(dtype) -> int:
    """Bytes per element of the float dtypes the MoE kernels take (fp32 or a 2-byte float)."""
    return 4 if dtype == nl.float32 else 2


def intermediate_split(n_inter: int):
    """(ic, n_i): I = ic * n_i with n_i = ceil(I / 128) chunks of ic <= 128 rows (None if I % n_i != 0)."""
    n_i = -(-n_inter // P_MAX)
    return (n_inter // n_i, n_i) if n_inter % n_i == 0 else (None, n_i)


def load_gate_up(gate_up, e_sb=None, parts: int = P_MAX):
    """One expert's [H, 2, I] gate/up weights -> SBUF [parts, n_h, 2, I] with row h = p * n_h + j (n_h = H / parts;
    parts = 128, or 64 for twice as long per-partition runs when a 128-partition run is below the DMA packet size).

    gate_up is [E, H, 2, I] @ HBM with the expert picked at runtime by the (1,1) int32 SBUF tile e_sb, or a
    single [H, 2, I] matrix (e_sb None). One DMA, n_h * 2I contiguous elements per partition."""
    h_total, n_inter = gate_up.shape[-3], gate_up.shape[-1]
    n_h = h_total // parts
    row = n_h * 2 * n_inter
    wgu_sb = nl.ndarray((parts, n_h, 2, n_inter), dtype=gate_up.dtype, buffer=nl.sbuf)
    if e_sb is None:
        src = gate_up.ap(pattern=[[row, parts], [1, row]], offset=0)
    else:
        src = gate_up.ap(pattern=[[row, parts], [1, row]], offset=0, scalar_offset=e_sb, indirect_dim=0)
    nisa.dma_copy(dst=wgu_sb, src=src)
    return wgu_sb


def load_down(down, e_sb=None):
    """One expert's [I, H] down weights -> SBUF [ic, n_i, H] with row i = q * n_i + c (one DMA)."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    ic, n_i = intermediate_split(n_inter)
    row = n_i * h_total
    wd_sb = nl.ndarray((ic, n_i, h_total), dtype=down.dtype, buffer=nl.sbuf)
    if e_sb is None:
        src = down.ap(pattern=[[row, ic], [1, row]], offset=0)
    else:
        src = down.ap(pattern=[[row, ic], [1, row]], offset=0, scalar_offset=e_sb, indirect_dim=0)
    nisa.dma_copy(dst=wd_sb, src=src)
    return wd_sb


def transpose_tokens(x_sb, n_tok: int, n_h: int, evict_phase: int = 0, scalar_only: bool = False, dst=None):
    """x_sb [n_tok, H] (tokens on partitions) -> xT_sb [parts, n_h, 128] with xT[p, j, t] = x[t, p * n_h + j]
    (parts = H / n_h: 128, or 64 to match `load_gate_up(parts=64)`). Exact on every target: VectorE transposes
    where TensorE's would mix tokens (`exact_rows_to_columns`).

    TensorE transposes into PSUM, grouped so each group fills one PSUM bank, one copy per group to SBUF; the
    copies alternate VectorE / ScalarE (`evict`, group index + evict_phase), or all run on ScalarE when
    `scalar_only` (a trace-time choice of the caller). dst = (tile [parts, n_h, F], c0): write columns
    c0 .. c0 + n_tok of that tile instead (returned)."""
    dt = x_sb.dtype
    parts = x_sb.shape[1] // n_h
    group = PSUM_BANK_BYTES // (TOK_TILE * itemsize(dt))
    xT_sb, c0 = dst if dst is not None else (nl.ndarray((parts, n_h, TOK_TILE), dtype=dt, buffer=nl.sbuf), 0)
    if mixing_pe_transpose():   # trn1: the tokens would be the rows of an identity matmul (`exact_rows_to_columns`)
        return exact_rows_to_columns(x_sb, n_tok, n_h, xT_sb, c0)
    for g0 in range(0, n_h, group):
        g_sz = min(group, n_h - g0)
        t_psum = nl.ndarray((P_MAX, group, TOK_TILE), dtype=dt, buffer=nl.psum)
        for jj in range(g_sz):
            nisa.nc_transpose(dst=t_psum[0:parts, jj, 0:n_tok], data=x_sb[0:n_tok, g0 + jj::n_h])
        dst, src = xT_sb[:, g0:g0 + g_sz, c0:c0 + n_tok], t_psum[0:parts, 0:g_sz, 0:n_tok]
        if scalar_only:
            nisa.activation(dst=dst, op=nl.copy, data=src)
        else:
            evict(dst, src, g0 // group + evict_phase)
    return xT_sb


def swiglu(xT_sb, n_tok: int, wgu_sb, scale_sb):
    """h_sb [n_tok, I] = scale * silu(x @ G) * (x @ U) in the weights' dtype; scale_sb a (n_tok, 1) fp32 tile
    (None: no scale).

    Token-stationary matmuls (M = tokens, N = gate + up columns of one slice, K = the tiles' 128 or 64 hidden
    rows), accumulated
    over the n_h hidden chunks in one PSUM bank; ScalarE silu reads the gate half, VectorE multiplies."""
    n_h, n_inter = wgu_sb.shape[1], wgu_sb.shape[3]
    h_sb = nl.ndarray((TOK_TILE, n_inter), dtype=wgu_sb.dtype, buffer=nl.sbuf)
    for i0 in range(0, n_inter, _GU_SLICE):
        w = min(_GU_SLICE, n_inter - i0)
        gu_psum = nl.ndarray((TOK_TILE, 2, _GU_SLICE), dtype=nl.float32, buffer=nl.psum)
        for j in range(n_h):
            nisa.nc_matmul(gu_psum[0:n_tok, :, 0:w], xT_sb[:, j, 0:n_tok], wgu_sb[:, j, :, i0:i0 + w],
                           accumulate=(j > 0))
        act_sb = nl.ndarray((TOK_TILE, _GU_SLICE), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act_sb[0:n_tok, 0:w], op=nl.silu, data=gu_psum[0:n_tok, 0, 0:w])
        if scale_sb is None:
            nisa.tensor_tensor(dst=h_sb[0:n_tok, i0:i0 + w], data1=gu_psum[0:n_tok, 1, 0:w],
                               data2=act_sb[0:n_tok, 0:w], op=nl.multiply)
        else:
            nisa.scalar_tensor_tensor(dst=h_sb[0:n_tok, i0:i0 + w], data=gu_psum[0:n_tok, 1, 0:w], op0=nl.multiply,
                                      operand0=scale_sb[0:n_tok, 0:1], op1=nl.multiply,
                                      operand1=act_sb[0:n_tok, 0:w])
    return h_sb


def transpose_h(h_sb, n_tok: int, ic: int, n_i: int):
    """h_sb [n_tok, I] -> hT_sb [ic, n_i, 128] with hT[q, c, t] = h[t, q * n_i + c] (TensorE transposes; VectorE
    where TensorE's would mix tokens, `exact_rows_to_columns`)."""
    dt = h_sb.dtype
    if mixing_pe_transpose():
        return exact_rows_to_columns(h_sb, n_tok, n_i, nl.ndarray((P_MAX, n_i, TOK_TILE), dtype=dt, buffer=nl.sbuf))
    t_psum = nl.ndarray((P_MAX, n_i, TOK_TILE), dtype=dt, buffer=nl.psum)
    for c in range(n_i):
        nisa.nc_transpose(dst=t_psum[0:ic, c, 0:n_tok], data=h_sb[0:n_tok, c::n_i])
    hT_sb = nl.ndarray((P_MAX, n_i, TOK_TILE), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=hT_sb[0:ic, :, 0:n_tok], src=t_psum[0:ic, :, 0:n_tok])
    return hT_sb


def exact_rows_to_columns(rows_sb, n_tok: int, n_cols: int, dst_sb, c0: int = 0):
    """dst_sb[q, c, c0 + t] = rows_sb[t, q * n_cols + c] for t < n_tok, q < F / n_cols (F = rows_sb's free size) by
    VectorE 32x32 transposes straight into SBUF (no PSUM, no eviction).

    Where the TensorE transpose is an identity matmul (trn1, `mixing_pe_transpose`), a NaN / Inf in one token's
    row (a partition of rows_sb) would turn that hidden column NaN for every token of the tile; these transposes
    are exact on every target, so each token's values stay in its own column."""
    parts = rows_sb.shape[1] // n_cols
    for c in range(n_cols):
        vector_transpose(dst_sb[0:parts, c, c0:c0 + n_tok], rows_sb[0:n_tok, c::n_cols])
    return dst_sb


def down_piece(y_psum, hT_sb, n_tok: int, wd_sb, h0: int, hw: int):
    """y_psum[n_tok, 0:hw] (+)= h @ D[:, h0:h0+hw]: token-stationary matmuls over the n_i chunks; the first
    matmul of a fresh PSUM tile overwrites (accumulate=None), so callers may add more matmuls afterwards."""
    ic, n_i, _ = wd_sb.shape
    for c in range(n_i):
        nisa.nc_matmul(y_psum[0:n_tok, 0:hw], hT_sb[0:ic, c, 0:n_tok], wd_sb[0:ic, c, h0:h0 + hw], accumulate=None)


def evict(dst, src, i_piece: int):
    """PSUM -> SBUF copy, alternating VectorE and ScalarE by piece index to balance the two engines."""
    if i_piece % 2 == 0:
        nisa.tensor_copy(dst=dst, src=src)
    else:
        nisa.activation(dst=dst, op=nl.copy, data=src)


def load_gate_vector(shared_gate):
    """Shared-expert gate vector [H] @ HBM -> SBUF [128, n_h, 1] with h = p * n_h + j."""
    h_total = shared_gate.shape[0]
    n_h = h_total // P_MAX
    wsg_sb = nl.ndarray((P_MAX, n_h, 1), dtype=shared_gate.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=wsg_sb, src=shared_gate.ap(pattern=[[n_h, P_MAX], [1, n_h]], offset=0))
    return wsg_sb


def sigmoid_gate(xT_sb, n_tok: int, wsg_sb):
    """(n_tok, 1) fp32 tile sigmoid(x . w_sg): a ones-wide matmul accumulated over the hidden chunks."""
    n_h = wsg_sb.shape[1]
    g_psum = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.psum)
    for j in range(n_h):
        nisa.nc_matmul(g_psum[0:n_tok, 0:1], xT_sb[:, j, 0:n_tok], wsg_sb[:, j, :], accumulate=(j > 0))
    g_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=g_sb[0:n_tok, :], op=nl.sigmoid, data=g_psum[0:n_tok, :])
    return g_sb
