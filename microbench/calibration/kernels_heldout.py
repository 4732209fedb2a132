"""Held-out calibration kernels: intermediate steps of two Autocomp search traces (../shared/reference/calibration.md
S4; trn1.2xlarge, `bench` P99), re-written from the published steps' data flow. The selection rule is in
points.py and was fixed before these re-writes existed.

U3 (examples/trn-tutorial/4_attention_trace.py): naive attention, q, k, v [d = 128, S] bf16, out [S, d] bf16,
softmax(q^T k) v^T with no scale. U5 (examples/trn-advanced/4_conv1d_trace.py): depthwise conv1d, fp32.

Choices the published code leaves to the compiler, made once for every step (before any step was modeled):
- one instruction per nisa / nl compute call as written; a call's result assigned into a tile is written there
  directly, while assigning an existing tile into another one (`row_max[:, i] = m_vec`) is a VectorE copy;
- nl.* element-wise calls (nl.negative, nl.maximum, nl.add, nl.reciprocal) and nisa.tensor_copy without an
  engine run on VectorE (nl.negative as a multiply by -1); every nl.zeros / nl.full is a memset, except a PSUM
  accumulator that only matmuls write (below);
- an nc_transpose result (PSUM) that feeds nc_matmul or is assigned into an SBUF tile is copied out of PSUM on
  VectorE; nl.store of a PSUM value copies it to SBUF first (VectorE, in the output dtype);
- U3's QK^T matmuls pass is_transpose=True; they are plain matmuls here (the published outputs match the
  reference, so the flag did not transpose anything on the device);
- `acc = nl.zeros(psum)` followed by `acc += nc_matmul(...)` is the matmul accumulation chain, the first matmul
  writing the bank (no memset: accumulating onto PSUM no matmul wrote is undefined on the hardware).
U3 slices: the query length may be shorter than the key length (k query tiles of 128 against all 4096 keys), so
the calibration can model k = 2 and 4 of the 32 query tiles and extrapolate; every query tile runs the same
program (step 10's row max, computed once from query tile 0, is the only shared work).
"""
from __future__ import annotations

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.hw import GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, P_MAX, PSUM_FMAX_FP32

_Q_TILE = GEMM_STATIONARY_FMAX     # queries per tile: the stationary free size of the QK^T matmul
_KV_BLOCK = GEMM_MOVING_FMAX       # keys per QK^T matmul: the moving free size (one fp32 PSUM bank)
_KV_SUB = P_MAX                    # keys per PV matmul: the contraction runs over the partitions
_NEG_BIG = -1e38                   # U3 step 10's initial running max (as published)

# U3 steps (trace index) whose instruction streams differ (points.py rule):
_U3_STREAMING = 3       # three streaming passes (max, sum, attend), QK^T recomputed in each; PV in fp32
_U3_BF16 = 4            # exp, normalised scores and the PV operands in bf16
_U3_FUSED_SUM = 5       # pass B: exp and its row sum in one activation, accumulated over the key blocks
_U3_TWO_PASS = 8        # V^T precomputed; per query tile a max pass, then exp / sum / PV in one pass; QK^T cached
_U3_RECOMPUTE = 9       # the QK^T cache dropped: QK^T recomputed in the second pass
_U3_MAX_TILE0 = 10      # the row max computed once, from query tile 0 only (as published), for every tile
U3_STEPS = (3, 4, 5, 8, 9, 10)

# U5 steps (conv1d):
_U5_PER_TILE = 3        # per-(image, channel tile) buffers, filter loaded per tile
_U5_PSUM_ACC = 4        # output columns accumulated into PSUM blocks (+= per column), copied out per block
_U5_FILTER_PSUM = 5     # channel tiles outside images; the filter copied to PSUM and read from there
U5_STEPS = (3, 4, 5)


# ------------------------------------------------------------------------------------------------ U3 helpers


def _load(x):
    """HBM [P, F] -> a new SBUF tile (one DMA)."""
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    return t


def _negated(m):
    """nl.negative(m) for an SBUF [P, 1] fp32 tile: a new tile, VectorE."""
    neg = nl.ndarray((m.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg, data=m, op0=nl.multiply, operand0=-1.0)
    return neg


def _qk_block(q_sb, k_sb, i_q, i_k):
    """QK^T for query tile i_q and key block i_k: PSUM [128 queries, 512 keys] fp32."""
    qk_ps = nl.ndarray((_Q_TILE, _KV_BLOCK), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(qk_ps, q_sb[:, i_q * _Q_TILE:(i_q + 1) * _Q_TILE], k_sb[:, i_k * _KV_BLOCK:(i_k + 1) * _KV_BLOCK])
    return qk_ps


def _store_rows(out, o_ps, i_q, via_f32=False):
    """Copy the [128 queries, d] PSUM result to SBUF in out's dtype (through an fp32 copy first with via_f32,
    as U3 step 3 writes it) and store rows i_q * 128 ... of out."""
    src = o_ps
    if via_f32:
        src = nl.ndarray(o_ps.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=src, src=o_ps)
    o_sb = nl.ndarray(o_ps.shape, dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o_sb, src=src)
    nisa.dma_copy(dst=out[i_q * _Q_TILE:(i_q + 1) * _Q_TILE, :], src=o_sb)


# ------------------------------------------------------------------------------------------------ U3 steps 3-5


@nki.jit
def naive_attention_u3(q, k, v, step):
    """U3 step `step` (3, 4, 5, 8, 9 or 10): out[Sq, d] = softmax(q^T k) v^T for q [d, Sq], k, v [d, Skv], d = 128,
    bf16 in and out; Sq a multiple of 128, Skv of 512."""
    d, s_q = q.shape
    out = nl.ndarray((s_q, d), dtype=q.dtype, buffer=nl.shared_hbm)
    if step >= _U3_TWO_PASS:
        _u3_two_pass(q, k, v, out, step)
    else:
        _u3_three_pass(q, k, v, out, step)
    return out


def _u3_three_pass(q, k, v, out, step):
    """Steps 3-5: q, k, v loaded whole; pass A: running row max per query tile over the key blocks; pass B: row
    sums of exp(s - max); 1/sum for all tiles at once; pass C: per key block exp, x 1/sum, and per 128-key piece
    two TensorE transposes (scores, v) copied out of PSUM and one PV matmul."""
    n_q = q.shape[1] // _Q_TILE
    q_sb, k_sb, v_sb = _load(q), _load(k), _load(v)
    row_max = nl.ndarray((P_MAX, n_q), dtype=nl.float32, buffer=nl.sbuf)
    for i_q in range(n_q):
        _u3_row_max(q_sb, k_sb, row_max, i_q)
    sum_row = nl.ndarray((P_MAX, n_q), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=sum_row, value=0.0)
    for i_q in range(n_q):
        _u3_row_sum(q_sb, k_sb, row_max, sum_row, i_q, step)
    inv_sum = nl.ndarray((P_MAX, n_q), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_sum, data=sum_row)
    for i_q in range(n_q):
        _u3_attend(q_sb, k_sb, v_sb, row_max[:, i_q:i_q + 1], inv_sum[:, i_q:i_q + 1], out, i_q, step)


def _u3_row_max(q_sb, k_sb, row_max, i_q):
    """Pass A: the first block's max initialises m_vec, later blocks fold in with nl.maximum; m_vec copied into
    row_max[:, i_q]."""
    m_vec = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    for i_k in range(k_sb.shape[1] // _KV_BLOCK):
        qk_ps = _qk_block(q_sb, k_sb, i_q, i_k)
        if i_k == 0:
            nisa.tensor_reduce(dst=m_vec, op=nl.maximum, data=qk_ps, axis=1)
            continue
        m_blk = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=m_blk, op=nl.maximum, data=qk_ps, axis=1)
        nisa.tensor_tensor(dst=m_vec, data1=m_vec, data2=m_blk, op=nl.maximum)
    nisa.tensor_copy(dst=row_max[:, i_q:i_q + 1], src=m_vec)


def _u3_row_sum(q_sb, k_sb, row_max, sum_row, i_q, step):
    """Pass B: -max once per tile; per key block exp(s - max) (fp32, bf16 from step 4) then a row-sum reduce and
    an add into sum_row; from step 5 one activation per block with its sum accumulated in the ScalarE reduce
    registers (read out on the first and the last block), copied into sum_row."""
    n_kv = k_sb.shape[1] // _KV_BLOCK
    neg_m = _negated(row_max[:, i_q:i_q + 1])
    if step >= _U3_FUSED_SUM:
        sum_vec = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        for i_k in range(n_kv):
            qk_ps = _qk_block(q_sb, k_sb, i_q, i_k)
            e_sb = nl.ndarray((_Q_TILE, _KV_BLOCK), dtype=nl.float32, buffer=nl.sbuf)
            cmd = nisa.reduce_cmd.reset_reduce if i_k == 0 else nisa.reduce_cmd.reduce
            res = sum_vec if i_k in (0, n_kv - 1) else None
            nisa.activation(dst=e_sb, op=nl.exp, data=qk_ps, bias=neg_m, reduce_op=nl.add, reduce_cmd=cmd,
                            reduce_res=res)
        nisa.tensor_copy(dst=sum_row[:, i_q:i_q + 1], src=sum_vec)
        return
    e_dt = nl.bfloat16 if step >= _U3_BF16 else nl.float32
    for i_k in range(n_kv):
        qk_ps = _qk_block(q_sb, k_sb, i_q, i_k)
        e_sb = nl.ndarray((_Q_TILE, _KV_BLOCK), dtype=e_dt, buffer=nl.sbuf)
        nisa.activation(dst=e_sb, op=nl.exp, data=qk_ps, bias=neg_m)
        s = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=s, op=nl.add, data=e_sb, axis=1)
        nisa.tensor_tensor(dst=sum_row[:, i_q:i_q + 1], data1=sum_row[:, i_q:i_q + 1], data2=s, op=nl.add)


def _u3_attend(q_sb, k_sb, v_sb, m, inv_m, out, i_q, step):
    """Pass C for one query tile: per key block QK^T again, -max (nl.negative inside the loop, as published),
    exp, x 1/sum (VectorE), then per 128-key piece: transpose the scores and the v piece on TensorE, copy both out
    of PSUM (fp32 in step 3, bf16 from step 4) and accumulate one PV matmul; the [128, d] result stored."""
    d = v_sb.shape[0]
    dt = nl.bfloat16 if step >= _U3_BF16 else nl.float32
    acc = nl.ndarray((_Q_TILE, d), dtype=nl.float32, buffer=nl.psum)
    for i_k in range(k_sb.shape[1] // _KV_BLOCK):
        qk_ps = _qk_block(q_sb, k_sb, i_q, i_k)
        e_sb = nl.ndarray((_Q_TILE, _KV_BLOCK), dtype=dt, buffer=nl.sbuf)
        nisa.activation(dst=e_sb, op=nl.exp, data=qk_ps, bias=_negated(m))
        norm = nl.ndarray((_Q_TILE, _KV_BLOCK), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=norm, data=e_sb, op0=nl.multiply, operand0=inv_m)
        for j in range(_KV_BLOCK // _KV_SUB):
            kv0 = i_k * _KV_BLOCK + j * _KV_SUB
            sT = _transposed(norm[:, j * _KV_SUB:(j + 1) * _KV_SUB], dt)
            vT = _transposed(v_sb[:, kv0:kv0 + _KV_SUB], dt)
            nisa.nc_matmul(acc, sT, vT, accumulate=kv0 > 0)
    _store_rows(out, acc, i_q, via_f32=step < _U3_BF16)


def _transposed(x_sb, dt):
    """TensorE transpose of an SBUF [128, 128] tile into PSUM (x's dtype), copied out to SBUF as `dt` (VectorE)."""
    t_ps = nl.ndarray((x_sb.shape[1], x_sb.shape[0]), dtype=x_sb.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=t_ps, data=x_sb)
    t_sb = nl.ndarray((x_sb.shape[1], x_sb.shape[0]), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t_sb, src=t_ps)
    return t_sb


# ------------------------------------------------------------------------------------------------ U3 steps 8-10


def _u3_two_pass(q, k, v, out, step):
    """Steps 8-10: q, k loaded whole; V^T precomputed (per 128 keys: load [d, 128], TensorE transpose, copy to
    SBUF bf16); step 10 computes one running row max from query tile 0 for all tiles; then per query tile."""
    q_sb, k_sb = _load(q), _load(k)
    d, s_kv = v.shape
    n_sub = s_kv // _KV_SUB
    vT_sb = nl.ndarray((_KV_SUB, n_sub, d), dtype=nl.bfloat16, buffer=nl.sbuf)
    for col in range(n_sub):
        v_sb = _load(v[:, col * _KV_SUB:(col + 1) * _KV_SUB])
        t_ps = nl.ndarray((_KV_SUB, d), dtype=v.dtype, buffer=nl.psum)
        nisa.nc_transpose(dst=t_ps, data=v_sb)
        nisa.tensor_copy(dst=vT_sb[:, col, :], src=t_ps)
    shared_max = _u3_max_of_tile0(q_sb, k_sb) if step >= _U3_MAX_TILE0 else None
    for i_q in range(q.shape[1] // _Q_TILE):
        _u3_two_pass_tile(q_sb, k_sb, vT_sb, out, i_q, step, shared_max)


def _u3_max_of_tile0(q_sb, k_sb):
    """Step 10's pass A: running max over the key blocks of query tile 0's scores (memset to -1e38, then per block
    a max reduce and nl.maximum)."""
    m = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=m, value=_NEG_BIG)
    for i_k in range(k_sb.shape[1] // _KV_BLOCK):
        qk_ps = _qk_block(q_sb, k_sb, 0, i_k)
        blk = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=blk, op=nl.maximum, data=qk_ps, axis=1)
        nisa.tensor_tensor(dst=m, data1=m, data2=blk, op=nl.maximum)
    return m


def _u3_tile_max(q_sb, k_sb, i_q, cache):
    """Steps 8-9 pass 1 for one query tile: per key block QK^T and its max (into row_max_kv[:, i_k]); step 8 also
    copies the block to the bf16 cache (VectorE); then the max over the blocks."""
    n_kv = k_sb.shape[1] // _KV_BLOCK
    row_max_kv = nl.ndarray((P_MAX, n_kv), dtype=nl.float32, buffer=nl.sbuf)
    for i_k in range(n_kv):
        qk_ps = _qk_block(q_sb, k_sb, i_q, i_k)
        nisa.tensor_reduce(dst=row_max_kv[:, i_k:i_k + 1], op=nl.maximum, data=qk_ps, axis=1)
        if cache is not None:
            nisa.tensor_copy(dst=cache[:, i_k, :], src=qk_ps)
    m = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=m, op=nl.maximum, data=row_max_kv, axis=1)
    return m


def _u3_two_pass_tile(q_sb, k_sb, vT_sb, out, i_q, step, shared_max):
    """One query tile of steps 8-10: the row max (own pass, or step 10's shared one), then per 128-key piece
    (scores read from the step-8 cache or from a recomputed QK^T block in PSUM): -max, exp to bf16, row sum
    into sums[:, piece], TensorE transpose copied out of PSUM, PV matmul accumulated in PSUM; finally the sum
    over pieces, 1/sum, the PSUM result scaled in place (VectorE) and stored."""
    d = vT_sb.shape[2]
    n_kv = k_sb.shape[1] // _KV_BLOCK
    n_pieces = _KV_BLOCK // _KV_SUB
    acc = nl.ndarray((_Q_TILE, d), dtype=nl.float32, buffer=nl.psum)
    sums = nl.ndarray((P_MAX, n_kv * n_pieces), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=sums, value=0.0)
    cache = None
    if step == _U3_TWO_PASS:
        cache = nl.ndarray((_Q_TILE, n_kv, _KV_BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
    m = shared_max if shared_max is not None else _u3_tile_max(q_sb, k_sb, i_q, cache)
    for i_k in range(n_kv):
        scores = cache[:, i_k, :] if cache is not None else _qk_block(q_sb, k_sb, i_q, i_k)
        for j in range(n_pieces):
            col = i_k * n_pieces + j
            e_sb = nl.ndarray((_Q_TILE, _KV_SUB), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.activation(dst=e_sb, op=nl.exp, data=scores[:, j * _KV_SUB:(j + 1) * _KV_SUB], bias=_negated(m))
            nisa.tensor_reduce(dst=sums[:, col:col + 1], op=nl.add, data=e_sb, axis=1)
            nisa.nc_matmul(acc, _transposed(e_sb, nl.bfloat16), vT_sb[:, col, :], accumulate=col > 0)
    total = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=total, op=nl.add, data=sums, axis=1)
    inv = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv, data=total)
    nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=inv)
    _store_rows(out, acc, i_q)


# ------------------------------------------------------------------------------------------------ U5 steps 3-5


@nki.jit
def conv1d_u5(img, filt, step):
    """U5 step `step` (3, 4 or 5): depthwise conv1d, img [N, C, 1, W] fp32, filt [C, 1, 1, Wf], padding
    (Wf - 1) / 2 each side, out [N, C, 1, W]; C a multiple of 128. Every step computes each output column with
    one VectorE multiply of the [128, Wf] window by the filter and one reduce over Wf, as published."""
    n_img, c_total, _, w_in = img.shape
    taps = filt.shape[3]
    w_out = w_in - taps + 1 + 2 * ((taps - 1) // 2)
    out = nl.ndarray((n_img, c_total, 1, w_out), dtype=img.dtype, buffer=nl.shared_hbm)
    n_c = c_total // P_MAX
    if step >= _U5_FILTER_PSUM:
        for c in range(n_c):
            f_ps = _u5_filter_psum(filt, c)
            for i_n in range(n_img):
                _u5_columns_to_sbuf(img, f_ps, out, i_n, c)
        return out
    for i_n in range(n_img):
        for c in range(n_c):
            f_sb = _u5_zeroed_load(filt[c * P_MAX:(c + 1) * P_MAX, 0, 0, :], 0)
            if step >= _U5_PSUM_ACC:
                _u5_columns_psum_blocks(img, f_sb, out, i_n, c)
            else:
                _u5_columns_to_sbuf(img, f_sb, out, i_n, c)
    return out


def _u5_zeroed_load(src, pad):
    """nl.zeros SBUF tile [128, F + 2 pad] (memset) with src [128, F] DMA'd into columns pad ... pad + F."""
    f = src.shape[1]
    t = nl.ndarray((P_MAX, f + 2 * pad), dtype=src.dtype, buffer=nl.sbuf)
    nisa.memset(dst=t, value=0.0)
    nisa.dma_copy(dst=t[:, pad:pad + f], src=src)
    return t


def _u5_filter_psum(filt, c):
    """Step 5 phase A: the filter tile loaded into a zeroed SBUF tile, then copied into a zeroed PSUM tile."""
    f_sb = _u5_zeroed_load(filt[c * P_MAX:(c + 1) * P_MAX, 0, 0, :], 0)
    f_ps = nl.ndarray(f_sb.shape, dtype=f_sb.dtype, buffer=nl.psum)
    nisa.memset(dst=f_ps, value=0.0)
    nisa.tensor_copy(dst=f_ps, src=f_sb)
    return f_ps


def _u5_window_sum(img_sb, f_t, j, dst):
    """dst [128, 1] = sum over Wf of img_sb[:, j:j + Wf] * f_t (VectorE multiply, then VectorE reduce)."""
    taps = f_t.shape[1]
    prod = nl.ndarray((P_MAX, taps), dtype=img_sb.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=prod, data1=img_sb[:, j:j + taps], data2=f_t, op=nl.multiply)
    nisa.tensor_reduce(dst=dst, op=nl.add, data=prod, axis=1)


def _u5_columns_to_sbuf(img, f_t, out, i_n, c):
    """Steps 3 and 5, one (image, channel tile): zeroed padded image tile, zeroed output tile, every output column
    reduced straight into it, one store."""
    taps = f_t.shape[1]
    img_sb = _u5_zeroed_load(img[i_n, c * P_MAX:(c + 1) * P_MAX, 0, :], (taps - 1) // 2)
    w_out = out.shape[3]
    o_sb = nl.ndarray((P_MAX, w_out), dtype=out.dtype, buffer=nl.sbuf)
    nisa.memset(dst=o_sb, value=0.0)
    for j in range(w_out):
        _u5_window_sum(img_sb, f_t, j, o_sb[:, j:j + 1])
    nisa.dma_copy(dst=out[i_n, c * P_MAX:(c + 1) * P_MAX, 0, :], src=o_sb)


def _u5_columns_psum_blocks(img, f_sb, out, i_n, c):
    """Step 4, one (image, channel tile): per block of 512 output columns (one fp32 PSUM bank, the tail shorter)
    a zeroed PSUM tile; each column reduced into SBUF then added into its PSUM column (VectorE); the block copied
    to SBUF (VectorE) and stored."""
    taps = f_sb.shape[1]
    img_sb = _u5_zeroed_load(img[i_n, c * P_MAX:(c + 1) * P_MAX, 0, :], (taps - 1) // 2)
    w_out = out.shape[3]
    for b0 in range(0, w_out, PSUM_FMAX_FP32):
        blk = min(PSUM_FMAX_FP32, w_out - b0)
        o_ps = nl.ndarray((P_MAX, blk), dtype=out.dtype, buffer=nl.psum)
        nisa.memset(dst=o_ps, value=0.0)
        for t in range(blk):
            col = nl.ndarray((P_MAX, 1), dtype=out.dtype, buffer=nl.sbuf)
            _u5_window_sum(img_sb, f_sb, b0 + t, col)
            nisa.tensor_tensor(dst=o_ps[:, t:t + 1], data1=o_ps[:, t:t + 1], data2=col, op=nl.add)
        o_sb = nl.ndarray((P_MAX, blk), dtype=out.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o_sb, src=o_ps, engine=nisa.engine.vector)
        nisa.dma_copy(dst=out[i_n, c * P_MAX:(c + 1) * P_MAX, 0, b0:b0 + blk], src=o_sb)
