"""Unrolled code predictor of the Qwen3-Omni talker: all residual-code steps x all layers in ONE launch.

Per talker frame, transformers runs `code_predictor.generate(inputs_embeds=[past_hidden, code0_embed],
max_new_tokens=G1)`: a 2-position prefill, then G1 - 1 single-token steps, each step j with its own LM head
and (for its input) its own codec embedding table. This kernel runs the whole loop on one NeuronCore: a KV
cache in SBUF (no recomputation of earlier positions), on-device argmax or sampling, the next step's input
embedding gathered by a dynamic DMA from the sampled code, and the per-step embeddings (and their sum, which
the talker adds to its next input) written out.

Layout: the residual stream and activations are feature-major, hT [128, H / 128, rows] (feature c * 128 + p on
partition p), so decode-sized batches still use every partition; projections are weight-stationary 128 x 128
matmuls ([in, out] weights, see weights.py) with the activations moving, and their outputs land feature-major
again. Row sums over features (RMSNorm, q/k head norms) are per-partition partial sums plus an all-ones matmul;
RoPE's rotate-half is a +-1 permutation matmul (with the q/k norm weights folded in). K^T and V^T are cached per
(layer, KV head) as [D, B, G] in SBUF. The prompt's two positions run as one pass over 2B rows.

At B = 1 a frame is a chain of small dependent instructions, so the steps keep it short: the residual stream lives
in PSUM (o_proj / down_proj accumulate onto it), RMSNorm's 1/rms is applied to the projections' outputs while
the matmuls run on x * w, the cached steps' attention works on transposed scores without a max subtraction when
the q/k norm weights bound the scores, and the next step's LM head streams into an SBUF ring during the layers.
Greedy argmax and (Vh % 128 == 0) sampling run with the vocab spread over partitions; other vocabularies use
logits rows with nisa.max8 / nc_find_index8. See docs/code_predictor.md for the loop nest, memory plan
and modeled numbers.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import call, call_ranks, is_emulated, nisa, nki, nl
from ..lnc import current_target_name, resolve_lnc
from ..hw import (GEMM_MOVING_FMAX, NEG_INF, P_MAX, PSUM_BANK_BYTES, SBUF_BYTES_PER_PARTITION,
                  TILE_ACTIVATION_BIAS_TARGETS)
from ..validation import kernel_check
from .weights import CodePredictorWeights, weights_from_state_dict, weights_from_transformers  # noqa: F401
from .weights import CORE_SPLIT_NAMES, core_split_problem, core_split_weights

# ---------------------------------------------------------------- tiling constants
_K_TILE = P_MAX                      # contraction rows per matmul (hidden / intermediate chunks)
_N_TILE = GEMM_MOVING_FMAX           # output columns per matmul = one fp32 PSUM bank
_MAX8 = 8                            # values per nisa.max8 / nc_find_index8 round
_MAX8_FMAX = 16384                   # max8 input elements per partition (vocab limit of the on-device argmax)
_BF16_BYTES = 2
# SBUF bytes per partition kept free for activations, KV cache, logits, streaming buffers when deciding
# whether every layer's weights can stay resident in SBUF for the whole frame.
_SBUF_HEADROOM = 4 * 1024
_FIXED_SBUF_BYTES = 20 * 1024        # norms, constants, streamed LM-head blocks, [B, H] row tiles
_LM_BLOCK_BYTES = 8 * 1024           # of which the streamed [128, H / 128, 512] bf16 LM-head block (H = 1024)
_SAMPLING_LOGIT_TILES = 3.5          # fp32 [rows, Vh] tiles live while sampling (logits, z, work, kill)
_BYTES_PER_ROW = 512                 # feature-major activations and KV cache per token row
_MAX_TOP_K = 256                     # sampling: top-k candidates are found in ceil(k / 8) max8 rounds
MIN_TEMPERATURE = 1e-30              # sampling scales the fp32 logits by 1 / temperature: below this, logits of
#                                      |l| > 3.4e8 already overflow to inf (and 1 / temperature itself from ~2.9e-39),
#                                      which the candidate search turns into wrong codes
_FM_SAMPLE_MAX_ROWS = 16             # sampling rows looped over on the vocab-on-partitions path (more: rows path)
_EXP_SAFE_BOUND = 60.0               # |attention score| bound under which softmax may skip the max subtraction
_LM_DMA_BYTES = 1 << 20              # LM-head ring loads: ~1 MB per DMA (several queues in flight)
# Input rows (past_hidden, code0_embed) holding a NaN, an Inf or a value with |x| >= this are "bad rows": they are
# zeroed in-kernel before any arithmetic, their codes forced to 0 and flagged. ScalarE's rsqrt takes inputs in
# [2^-87, 2^97] (the emulator gives NaN outside, as the device gives garbage), so an RMSNorm's mean square must
# stay below 2^97: |x| < 2^40 (~1.1e12) keeps it below 2^80 with room for the residual stream's growth.
INPUT_ABS_LIMIT = float(2.0 ** 40)
# ... and the smallest RMSNorm eps: a zeroed (bad) or all-zero row's mean square is 0, so rsqrt sees eps alone.
MIN_EPS = 1e-20


# ================================================================ small building blocks


def _ones(n, dtype=nl.float32):
    """[n, n] all-ones stationary: a matmul with it sums over partitions and broadcasts to all of them."""
    t = nl.ndarray((n, n), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=t, value=1.0)
    return t


def _square_sums(xT, kc, rows):
    """Per-partition sums of squares [128, rows] fp32 of feature-major xT [128, kc, rows]: ScalarE squares,
    summed by its accumulator (one row) or a VectorE reduce."""
    sq = nl.ndarray((_K_TILE, kc, rows), dtype=nl.float32, buffer=nl.sbuf)
    part = nl.ndarray((_K_TILE, rows), dtype=nl.float32, buffer=nl.sbuf)
    if rows == 1:       # the ScalarE accumulator sums the whole free dim: the per-partition partial sum
        nisa.activation(dst=sq, op=nl.square, data=xT, reduce_op=nl.add, reduce_res=part,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
    else:
        nisa.activation(dst=sq, op=nl.square, data=xT)
        nisa.tensor_reduce(dst=part, op=nl.add, data=sq.permute((0, 2, 1)), axis=2)
    return part


def _rms_norm_T(xT, w_col, ones, eps, n, kc, rows, out_dtype):
    """Feature-major RMSNorm: xT [128, kc, rows] (feature f = c * 128 + p) -> [128, kc, rows] of out_dtype.

    Sum of squares per row: per-partition partial sums (VectorE), then an all-ones matmul sums them over the
    partitions and broadcasts the total to every partition. w_col [128, kc] is the norm weight.
    """
    part = _square_sums(xT, kc, rows)
    tot_psum = nl.ndarray((_K_TILE, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(tot_psum, ones, part)
    rstd = nl.ndarray((_K_TILE, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=tot_psum, scale=1.0 / n, bias=eps)
    out = nl.ndarray((_K_TILE, kc, rows), dtype=out_dtype, buffer=nl.sbuf)
    if rows <= kc:      # one instruction per row: rstd is a per-partition scalar, w a [128, kc] tile
        for b in range(rows):
            nisa.scalar_tensor_tensor(dst=out[:, :, b], data=xT[:, :, b], op0=nl.multiply,
                                      operand0=rstd[:, b:b + 1], op1=nl.multiply, operand1=w_col)
    else:               # one instruction per feature chunk: w is a per-partition scalar, rstd a [128, rows] tile
        for i in range(kc):
            nisa.scalar_tensor_tensor(dst=out[:, i, :], data=xT[:, i, :], op0=nl.multiply,
                                      operand0=w_col[:, i:i + 1], op1=nl.multiply, operand1=rstd)
    return out


def _transpose_chunks(x_sb, n_chunks, kp, rows, dtype):
    """x [rows, n_chunks * kp] -> xT [kp, n_chunks, rows] (TensorE transposes, grouped per PSUM bank)."""
    xT = nl.ndarray((kp, n_chunks, rows), dtype=dtype, buffer=nl.sbuf)
    per_bank = max(1, PSUM_BANK_BYTES // (rows * x_sb.dtype.itemsize))
    for c0 in range(0, n_chunks, per_bank):
        cn = min(per_bank, n_chunks - c0)
        t_psum = nl.ndarray((kp, cn, rows), dtype=x_sb.dtype, buffer=nl.psum)
        for c in range(cn):
            nisa.nc_transpose(dst=t_psum[:, c, :], data=x_sb[:, (c0 + c) * kp:(c0 + c + 1) * kp])
        nisa.tensor_copy(dst=xT[:, c0:c0 + cn, :], src=t_psum)
    return xT


def _weight_block(w_res, w_hbm, kp, n_k, n0, nn):
    """[kp, n_k, nn] weight block: a view of the resident SBUF copy, or streamed from HBM now."""
    if w_res is not None:
        return w_res[:, :, n0:n0 + nn]
    blk = nl.ndarray((kp, n_k, nn), dtype=w_hbm.dtype, buffer=nl.sbuf)
    n_total = w_hbm.shape[1]
    nisa.dma_copy(dst=blk, src=w_hbm.reshape((n_k, kp, n_total)).permute((1, 0, 2))[:, :, n0:n0 + nn])
    return blk


def _linear_T(dst, xT, n_k, kp, w_res, w_hbm, n_out, oc, rows, mode, cols=None, hook=None):
    """Feature-major projection: dst[oc, n_out / oc, rows] (= or +=) (x @ W)^T.

    W [n_k * kp, n_out] is the stationary operand in [kp, oc] blocks, xT [kp, n_k, rows] the moving one; the
    output lands with the output features on partitions. mode: "copy", "add" (residual update), "accum" (dst is
    the PSUM-resident residual stream: the matmuls accumulate onto it) or "psum" (when the whole output fits one
    PSUM bank: return the PSUM tile itself, no eviction; else copy to dst).
    hook = (i, fn): fn() is emitted after the matmuls of output chunk i (program order for in-order engines).
    """
    n_oc = n_out // oc
    per_bank = max(1, PSUM_BANK_BYTES // (rows * 4))      # output chunks per fp32 PSUM bank
    if mode == "psum" and n_oc > per_bank:
        mode = "copy"
    blk_cols = max(oc, (_N_TILE // oc) * oc)              # weight columns per streamed block
    w_blk, blk0 = None, -1
    for g0 in range(0, n_oc, per_bank):
        gn = min(per_bank, n_oc - g0)
        if mode == "accum":
            acc_psum = dst[:, g0:g0 + gn, :]
        else:
            acc_psum = nl.ndarray((oc, gn, rows), dtype=nl.float32, buffer=nl.psum)
        for i in range(gn):
            col = (g0 + i) * oc
            if col // blk_cols != blk0:
                blk0 = col // blk_cols
                w_blk = _weight_block(w_res, w_hbm, kp, n_k, blk0 * blk_cols, min(blk_cols, n_out - blk0 * blk_cols))
            lc = col - blk0 * blk_cols
            for k in range(n_k):
                mv = xT[:, k, :] if cols is None else xT[:, k, cols]
                nisa.nc_matmul(acc_psum[:, i, :], w_blk[:, k, lc:lc + oc], mv, accumulate=(k > 0 or mode == "accum"))
            if hook is not None and g0 + i == hook[0]:
                hook[1]()
        if mode == "accum":
            continue
        if mode == "add":
            nisa.tensor_tensor(dst=dst[:, g0:g0 + gn, :], data1=dst[:, g0:g0 + gn, :], data2=acc_psum, op=nl.add)
        elif mode == "psum":
            return acc_psum
        else:
            nisa.tensor_copy(dst=dst[:, g0:g0 + gn, :], src=acc_psum)
    return dst


def _linear_rows(dst_sb, xT, n_k, kp, w_hbm, n_out, rows, stat_cols=None, w_res=None):
    """Row-major projection dst[rows, n_out] = x @ W (xT stationary, W the moving operand: a view of the
    SBUF copy w_res [kp, n_k, n_out], or streamed from HBM)."""
    for n0 in range(0, n_out, _N_TILE):
        nn = min(_N_TILE, n_out - n0)
        w_blk = _weight_block(w_res, w_hbm, kp, n_k, n0, nn)
        acc_psum = nl.ndarray((rows, _N_TILE), dtype=nl.float32, buffer=nl.psum)
        for k in range(n_k):
            st = xT[:, k, :] if stat_cols is None else xT[:, k, stat_cols]
            nisa.nc_matmul(acc_psum[:, 0:nn], st, w_blk[:, k, :], accumulate=(k > 0))
        nisa.tensor_copy(dst=dst_sb[:, n0:n0 + nn], src=acc_psum[:, 0:nn])


def _block_mask(m_rows, r, nb_max, n_t, causal_slots=0):
    """Additive attention mask [m_rows, nb_max, n_t]: 0 where key batch b' == query batch, else -inf.

    Query rows are ordered (b, q) with q in [0, r) (r query columns per batch: heads, or slots x heads);
    with causal_slots = S > 0, q = slot * heads + head and key t must also satisfy t <= slot.
    """
    zero = nl.ndarray((m_rows, nb_max, n_t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    m1 = nl.ndarray((m_rows, nb_max, n_t), dtype=nl.float32, buffer=nl.sbuf)
    # p - r * b' >= 0
    nisa.affine_select(dst=m1, pattern=[[-r, nb_max], [0, n_t]], offset=0, channel_multiplier=1,
                       on_true_tile=zero, on_false_value=NEG_INF, cmp_op=nl.greater_equal)
    mask = nl.ndarray((m_rows, nb_max, n_t), dtype=nl.float32, buffer=nl.sbuf)
    # r * b' + r - 1 - p >= 0
    nisa.affine_select(dst=mask, pattern=[[r, nb_max], [0, n_t]], offset=r - 1, channel_multiplier=-1,
                       on_true_tile=m1, on_false_value=NEG_INF, cmp_op=nl.greater_equal)
    if causal_slots:
        heads = r // causal_slots
        full = nl.ndarray((m_rows, nb_max, n_t), dtype=nl.float32, buffer=nl.sbuf)
        # p - r * b' - heads * t >= 0  (with b' == b: slot >= t)
        nisa.affine_select(dst=full, pattern=[[-r, nb_max], [-heads, n_t]], offset=0, channel_multiplier=1,
                           on_true_tile=mask, on_false_value=NEG_INF, cmp_op=nl.greater_equal)
        return full
    return mask


def _attention_block(qT_blk, kT_blk, vT_blk, mask_blk, out_view, m, n, d, masked):
    """One block: out^T[d, m] = (softmax(q k^T + mask) v)^T (q pre-scaled); q columns m, keys n (<= 128).

    masked=False (a block of one batch row: every key is valid) skips the mask add and reads the scores
    straight from PSUM.
    """
    s_psum = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(s_psum[0:m, 0:n], qT_blk, kT_blk)
    if masked:
        s_sb = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=s_sb[0:m, :], data1=s_psum[0:m, 0:n], data2=mask_blk, op=nl.add)
        s_v = s_sb[0:m, :]
    else:
        s_v = s_psum[0:m, 0:n]
    nmax = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=nmax[0:m, :], op=nl.maximum, data=s_v, axis=1, negate=True)
    p_sb = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    psum_row = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p_sb[0:m, :], op=nl.exp, data=s_v, bias=nmax[0:m, :], reduce_op=nl.add,
                    reduce_res=psum_row[0:m, :], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    rsum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=rsum[0:m, :], data=psum_row[0:m, :])
    pn_sb = nl.ndarray((P_MAX, n), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=pn_sb[0:m, :], data=p_sb[0:m, :], op0=nl.multiply, operand0=rsum[0:m, :])
    pT_psum = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.psum)
    nisa.nc_transpose(dst=pT_psum[0:n, 0:m], data=pn_sb[0:m, :])
    pT_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pT_sb[0:n, 0:m], src=pT_psum[0:n, 0:m])
    v_psum = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.psum)
    nisa.nc_transpose(dst=v_psum[0:n, 0:d], data=vT_blk)
    v_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=v_sb[0:n, 0:d], src=v_psum[0:n, 0:d])
    o_psum = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(o_psum[0:d, 0:m], v_sb[0:n, 0:d], pT_sb[0:n, 0:m])
    nisa.tensor_copy(dst=out_view, src=o_psum[0:d, 0:m])


def _attention_block_T(qT_blk, kT_blk, v_rows, ones_nd, maskT, out_view, m, n, d):
    """One block with the scores transposed: s^T [n keys, m queries] = K^T q, p^T = exp(s^T (+ mask^T)) in bf16,
    out^T [d, m] = (V^T p^T) / (1^T p^T): the sum over keys (partitions) is an all-ones matmul beside V^T p^T.

    No max subtraction: only for launches whose q/k RMSNorm weights bound |s| (see `_exp_is_safe`), so exp
    neither overflows nor underflows. v_rows [n, d] are the value rows (keys on partitions)."""
    s_psum = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(s_psum[0:n, 0:m], kT_blk, qT_blk)
    src = s_psum[0:n, 0:m]
    if maskT is not None:
        s_sb = nl.ndarray((P_MAX, m), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=s_sb[0:n, :], data1=src, data2=maskT, op=nl.add)
        src = s_sb[0:n, :]
    pT = nl.ndarray((P_MAX, m), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.activation(dst=pT[0:n, :], op=nl.exp, data=src)
    o_psum = nl.ndarray((P_MAX, m), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(o_psum[0:d, :], v_rows, pT[0:n, :])
    sum_psum = nl.ndarray((P_MAX, m), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(sum_psum[0:d, :], ones_nd, pT[0:n, :])
    rsum = nl.ndarray((P_MAX, m), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=rsum[0:d, :], data=sum_psum[0:d, :])
    nisa.tensor_tensor(dst=out_view, data1=o_psum[0:d, :], data2=rsum[0:d, :], op=nl.multiply)


def _block_mask_T(nb, r, n_t):
    """Additive mask^T [nb * n_t, nb * r] of `_attention_block_T`: keys (b', t) on partitions, queries (b, q)
    along the free dim; 0 where b == b', else -inf."""
    zero = nl.ndarray((nb * n_t, nb, r), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    m1 = nl.ndarray((nb * n_t, nb, r), dtype=nl.float32, buffer=nl.sbuf)
    # p - n_t * b >= 0
    nisa.affine_select(dst=m1, pattern=[[-n_t, nb], [0, r]], offset=0, channel_multiplier=1,
                       on_true_tile=zero, on_false_value=NEG_INF, cmp_op=nl.greater_equal)
    mask = nl.ndarray((nb * n_t, nb, r), dtype=nl.float32, buffer=nl.sbuf)
    # n_t * b + n_t - 1 - p >= 0
    nisa.affine_select(dst=mask, pattern=[[n_t, nb], [0, r]], offset=n_t - 1, channel_multiplier=-1,
                       on_true_tile=m1, on_false_value=NEG_INF, cmp_op=nl.greater_equal)
    return mask.reshape((nb * n_t, nb * r))


# ================================================================ bad-row containment (non-finite / huge inputs)


def _good_mask(x_sb, rows, n, dtype):
    """[rows, n] of `dtype`: 1 where |x| < INPUT_ABS_LIMIT (False for NaN, whose comparisons fail), else 0."""
    good = nl.ndarray((rows, n), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=good, data=x_sb, op0=nl.abs_max, operand0=0.0, op1=nl.less, operand1=INPUT_ABS_LIMIT)
    return good


def _sanitized(x_sb, rows, n):
    """Copy of x_sb [rows, n] with every NaN / Inf / |x| >= INPUT_ABS_LIMIT element replaced by 0 (a predicated
    copy: no arithmetic touches the bad values, so nothing non-finite reaches the matmuls or another row)."""
    pred = _good_mask(x_sb, rows, n, nl.uint8)
    clean = nl.ndarray((rows, n), dtype=x_sb.dtype, buffer=nl.sbuf)
    nisa.memset(dst=clean, value=0.0, engine=nisa.engine.gpsimd)
    nisa.tensor_copy_predicated(dst=clean, src=x_sb, predicate=pred)
    return clean


def _row_guard(past_hidden, code0_embed, B, H, vh):
    """Per-row validity of the prompt, off the critical path: (okv [B, 1] fp32 = (Vh - 1) if the row of both
    past_hidden and code0_embed is finite with |x| < INPUT_ABS_LIMIT else 0, the clamp bound `_guard_code`
    uses; bad [B, 1] int32 = 1 for a bad row; c0 [B, H] fp32 = code0_embed with bad rows zeroed)."""
    chk = nl.ndarray((B, 2, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=chk[:, 0, :], src=past_hidden)
    nisa.dma_copy(dst=chk[:, 1, :], src=code0_embed)
    flat = chk.reshape((B, 2 * H))
    good = _good_mask(flat, B, 2 * H, nl.float32)
    ok = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=ok, op=nl.minimum, data=good, axis=1)
    okv = nl.ndarray((B, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=okv, data=ok, op0=nl.multiply, operand0=float(vh - 1))
    bad = nl.ndarray((B, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=bad, data=ok, op0=nl.multiply, operand0=-1.0, op1=nl.add, operand1=1.0)
    # whole-row predicate: ok broadcast along the row (0 * good is exact: good is 0 or 1)
    pred = nl.ndarray((B, H), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=pred, data=good[:, H:2 * H], op0=nl.multiply, operand0=0.0, op1=nl.add, operand1=ok)
    c0 = nl.ndarray((B, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=c0, value=0.0, engine=nisa.engine.gpsimd)
    nisa.tensor_copy_predicated(dst=c0, src=chk[:, 1, :], predicate=pred)
    return okv, bad, c0


def _guard_code(code, okv, rows):
    """The code as the embedding gather's index: clamped to [0, Vh - 1] whatever the selection computed (an
    int32 tile holds no NaN), and 0 for bad rows (okv = 0). So no input can move the gather out of its table."""
    safe = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=safe, data=code, op0=nl.maximum, operand0=0.0, op1=nl.minimum, operand1=okv)
    return safe


# ================================================================ one decoder pass (all layers) over token rows


def _bias_rows(eps, parts):
    """The activation bias eps: a float, or rows 0 .. parts - 1 of the [128, 1] eps tile (tile_bias, trn1)."""
    return eps if isinstance(eps, float) else eps[0:parts]


class _Cfg:
    """Trace-time sizes of one launch (plain ints)."""

    def __init__(self, rows, H, L, Hq, Hkv, D, I, G, eps):
        self.rows, self.H, self.L, self.Hq, self.Hkv, self.D, self.I, self.G = rows, H, L, Hq, Hkv, D, I, G
        self.r = Hq // Hkv
        self.NH = Hq + Hkv
        self.NQKV = (Hq + 2 * Hkv) * D
        self.KC = H // _K_TILE
        self.IC = I // _K_TILE
        self.eps = eps
        self.scale = 1.0 / math.sqrt(D)


def _rotate_half_matrix(D):
    """[D, D] fp32 stationary Rm with Rm^T x = rotate_half(x) = [-x2, x1] (x on partitions)."""
    half = D // 2
    zero = nl.ndarray((D, D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    pos = nl.ndarray((D, D), dtype=nl.float32, buffer=nl.sbuf)
    # Rm[k, d] = 1 where k = d - half  (d >= half)
    nisa.affine_select(dst=pos, pattern=[[-1, D]], offset=half, channel_multiplier=1, on_true_tile=zero,
                       on_false_value=1.0, cmp_op=nl.not_equal)
    rm = nl.ndarray((D, D), dtype=nl.float32, buffer=nl.sbuf)
    # Rm[k, d] = -1 where k = d + half  (d < half)
    nisa.affine_select(dst=rm, pattern=[[-1, D]], offset=-half, channel_multiplier=1, on_true_tile=pos,
                       on_false_value=-1.0, cmp_op=nl.not_equal)
    return rm


def _bcast_mid(t, p, n, rows, row_len, offset=0):
    """[p, n, rows] view of the [p, rows] block of t at `offset`, repeated n times (stride-0 middle dim)."""
    return t.ap(pattern=[[row_len, p], [0, n], [1, rows]], offset=offset)


def _bcast_last(t, p, n, rows, row_len, offset=0):
    """[p, n, rows] view of the [p, n] block of t at `offset`, repeated along a stride-0 last dim."""
    return t.ap(pattern=[[row_len, p], [1, n], [0, rows]], offset=offset)


def _rms_partials(xT, kc, rows):
    """First half of 1/rms for feature-major xT [128, kc, rows]: per-partition sums of squares (ScalarE), split
    into bf16 hi + lo (GpSimd, off VectorE) so that `_rms_finish` sums them over the partitions with two 1-pass
    bf16 all-ones matmuls instead of a 4-pass fp32 one (hi + lo keeps ~16 mantissa bits of each partial sum)."""
    part = _square_sums(xT, kc, rows)
    hi = nl.ndarray((_K_TILE, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=hi, src=part, engine=nisa.engine.gpsimd)
    lo = nl.ndarray((_K_TILE, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=lo, data1=part, data2=hi, op=nl.subtract, engine=nisa.engine.gpsimd)
    return hi, lo


def _rms_finish(parts, ones_bf, eps, n, rows):
    """Second half: 1 / rms [128, rows] fp32 (the same on every partition) from `_rms_partials`. Callers emit
    it amid their projection matmuls, so TensorE's in-order window is not held up waiting for the partials."""
    hi, lo = parts
    tot_psum = nl.ndarray((_K_TILE, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(tot_psum, ones_bf, hi)
    nisa.nc_matmul(tot_psum, ones_bf, lo, accumulate=True)
    rstd = nl.ndarray((_K_TILE, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=tot_psum, scale=1.0 / n, bias=eps)
    return rstd


def _weighted_T(xT, w_all, row_len, offset, kc, rows):
    """bf16 x * w for feature-major xT [128, kc, rows]; w is the [128, kc] block of w_all at `offset`.

    RMSNorm(x) @ W = (1 / rms(x)) * ((x * w) @ W): the projections run on this while `_rms_partials` and
    `_rms_finish` compute 1 / rms beside them, and the scale is applied to their (much smaller) outputs."""
    xw = nl.ndarray((_K_TILE, kc, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=xw, data1=xT, data2=_bcast_last(w_all, _K_TILE, kc, rows, row_len, offset),
                       op=nl.multiply)
    return xw


def _qk_consts(c, S):
    """Per-layer q/k constants with the q/k RMSNorm weights (and q's 1/sqrt(D)) folded in:
    rotw [D, L, 2, D]: (diag(w) Rm) for q and k, so rotw^T x = rotate_half(w * x); wqk [D, L, NH]: w per head."""
    D, L, Hq, NH = c.D, c.L, c.Hq, c.NH
    qn = nl.ndarray((D, L), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=qn, data=S["q_norm"], op0=nl.multiply, operand0=c.scale)
    ones = nl.ndarray((D, NH), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    rotw = nl.ndarray((D, L, 2, D), dtype=nl.float32, buffer=nl.sbuf)
    wqk = nl.ndarray((D, L, NH), dtype=nl.float32, buffer=nl.sbuf)
    for l in range(L):
        for i, wn in enumerate((qn, S["k_norm"])):
            nisa.tensor_scalar(dst=rotw[:, l, i, :], data=S["rot"], op0=nl.multiply, operand0=wn[:, l:l + 1])
        nisa.tensor_scalar(dst=wqk[:, l, 0:Hq], data=ones[:, 0:Hq], op0=nl.multiply, operand0=qn[:, l:l + 1])
        nisa.tensor_scalar(dst=wqk[:, l, Hq:NH], data=ones[:, Hq:NH], op0=nl.multiply,
                           operand0=S["k_norm"][:, l:l + 1])
    S["rotw"], S["wqk"] = rotw, wqk


def _pass_consts(c, S, cos_t):
    """Per pass at one position (cos_t [D, 1]): wcos [D, L, NH] = w * cos, off the layers' critical path."""
    S["maskT"] = {}
    if cos_t.shape[1] != 1:
        S["wcos"] = None
        return
    wcos = nl.ndarray((c.D, c.L, c.NH), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=wcos, data=S["wqk"], op0=nl.multiply, operand0=cos_t)
    S["wcos"] = wcos


def _qk_norm_rope_T(c, S, l, x, cos_t, sin_t, q_dst, k_dst, sq_src=None):
    """q/k per-head RMSNorm then RoPE of x [D, NH + Hkv, rows] fp32 (q_proj | k_proj | v_proj outputs).

    rope(w * x / rms(x)) = (1 / rms(x)) * (x * w * cos + rotate_half(w * x) * sin): the rotation runs on x itself
    (weights folded into rotw), beside the per-head 1/rms. Writes q (scaled by 1/sqrt(D)) to q_dst
    [D, Hkv, r, rows] and k to k_dst [D, Hkv, rows] (any dtype, e.g. the bf16 KV cache column)."""
    D, NH, R, Hq, L = c.D, c.NH, c.rows, c.Hq, c.L
    hpb = max(1, _N_TILE // R)          # heads per matmul: N = heads * rows <= 512 (one fp32 PSUM bank)
    one_pos = cos_t.shape[1] == 1       # one position for every row: cos/sin are per-partition (d) scalars
    # per-head 1/rms first (the longer chain: square, all-ones matmul, rsqrt), the rotation beside it
    sq = nl.ndarray((D, NH, R), dtype=nl.float32, buffer=nl.sbuf)
    if sq_src is None:
        nisa.activation(dst=sq, op=nl.square, data=x[:, 0:NH, :])
    else:               # (psum, scale [D, 1]): square the unevicted projections, beside the eviction
        nisa.activation(dst=sq, op=nl.square, data=sq_src[0][:, 0:NH, :], scale=sq_src[1])
    rstd = nl.ndarray((D, NH, R), dtype=nl.float32, buffer=nl.sbuf)
    for h0 in range(0, NH, hpb):
        hn = min(hpb, NH - h0)
        ss_psum = nl.ndarray((D, hn, R), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ss_psum, S["onesD"], sq[:, h0:h0 + hn, :])
        nisa.activation(dst=rstd[:, h0:h0 + hn, :], op=nl.rsqrt, data=ss_psum, scale=1.0 / D,
                        bias=_bias_rows(c.eps, D))
    xwc = nl.ndarray((D, NH, R), dtype=nl.float32, buffer=nl.sbuf)
    if one_pos:
        nisa.tensor_tensor(dst=xwc, data1=x[:, 0:NH, :], op=nl.multiply,
                           data2=_bcast_last(S["wcos"], D, NH, R, L * NH, l * NH))
    else:
        nisa.tensor_tensor(dst=xwc, data1=x[:, 0:NH, :], data2=cos_t, op=nl.multiply)
        nisa.tensor_tensor(dst=xwc, data1=xwc, op=nl.multiply,
                           data2=_bcast_last(S["wqk"], D, NH, R, L * NH, l * NH))
    u = nl.ndarray((D, NH, R), dtype=nl.float32, buffer=nl.sbuf)
    for seg, (s0, s1) in enumerate(((0, Hq), (Hq, NH))):
        for h0 in range(s0, s1, hpb):
            hn = min(hpb, s1 - h0)
            rot_psum = nl.ndarray((D, hn, R), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_matmul(rot_psum, S["rotw"][:, l, seg, :], x[:, h0:h0 + hn, :])
            if one_pos:
                nisa.scalar_tensor_tensor(dst=u[:, h0:h0 + hn, :], data=rot_psum, op0=nl.multiply,
                                          operand0=sin_t, op1=nl.add, operand1=xwc[:, h0:h0 + hn, :])
            else:
                nisa.tensor_tensor(dst=u[:, h0:h0 + hn, :], data1=rot_psum, data2=sin_t[:, h0:h0 + hn, :],
                                   op=nl.multiply)
    if not one_pos:
        nisa.tensor_tensor(dst=u, data1=u, data2=xwc, op=nl.add)
    nisa.tensor_tensor(dst=q_dst, data1=u[:, 0:Hq, :].reshape((D, c.Hkv, c.r, R)),
                       data2=rstd[:, 0:Hq, :].reshape((D, c.Hkv, c.r, R)), op=nl.multiply)
    nisa.tensor_tensor(dst=k_dst, data1=u[:, Hq:NH, :], data2=rstd[:, Hq:NH, :], op=nl.multiply)


def _layer(c, W, S, l, hT, cos_t, sin_t, attn, res="add"):
    """One decoder layer on hT [128, KC, rows] fp32 (in place). attn = ("cache", pos) or ("self", slots).
    res = "add" (hT in SBUF, VectorE residual adds) or "accum" (hT in PSUM: o_proj / down_proj accumulate on it)."""
    R, D, Hq, Hkv, r, NH = c.rows, c.D, c.Hq, c.Hkv, c.r, c.NH
    load = S.get("w_load", lambda l, keys=None: None)
    load(l)                 # (already issued in all but the first pass)
    # ---- attention: the input RMSNorm's 1/rms scales the q/k/v outputs (evicted from PSUM with it)
    parts = _rms_partials(hT, c.KC, R)
    xw = _weighted_T(hT, S["in_norm"], c.L * c.KC, l * c.KC, c.KC, R)
    qkvT = nl.ndarray((D, NH + Hkv, R), dtype=nl.float32, buffer=nl.sbuf)
    fin = {}
    hook = ((NH + Hkv) // 4, lambda: fin.setdefault("rstd", _rms_finish(parts, S["ones_bf"], c.eps, c.H, R)))
    qkv = _linear_T(qkvT, xw, c.KC, _K_TILE, S["wqkv"][:, l] if S["wqkv"] is not None else None,
                    W["wqkv_t"][l], c.NQKV, D, R, "psum", hook=hook)
    rstd = fin["rstd"] if "rstd" in fin else _rms_finish(parts, S["ones_bf"], c.eps, c.H, R)
    sq_src = (qkv, rstd[0:D, 0:1]) if R == 1 and qkv is not qkvT else None
    nisa.tensor_tensor(dst=qkvT, data1=qkv, data2=_bcast_mid(rstd, D, NH + Hkv, R, R), op=nl.multiply)
    # q^T [D, Hkv, R, r]: column (row, head-in-group)
    qT = nl.ndarray((D, Hkv, R, r), dtype=nl.bfloat16, buffer=nl.sbuf)
    attnT = nl.ndarray((D, Hq, R), dtype=nl.bfloat16, buffer=nl.sbuf)
    mode, arg = attn
    if mode == "cache":
        pos = arg
        n_t = pos + 1
        kT_all, vT_all = S["kT"], S["vT"]
        _qk_norm_rope_T(c, S, l, qkvT, cos_t, sin_t, qT.permute((0, 1, 3, 2)), kT_all[:, l, :, :, pos], sq_src)
        nisa.tensor_copy(dst=vT_all[:, l, :, :, pos], src=qkvT[:, NH:NH + Hkv, :])
        # rows per block: as many as the keys allow (nb * n_t <= 128 partitions for P^T / V rows)
        bb = max(1, min(S["bb"], P_MAX // n_t))
        for g in range(Hkv):
            for b0 in range(0, R, bb):
                nb = min(bb, R - b0)
                m, n = nb * r, nb * n_t
                out_view = attnT[:, g * r:(g + 1) * r, b0:b0 + nb].permute((0, 2, 1))
                if S["exp_safe"]:
                    v_psum = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.psum)
                    nisa.nc_transpose(dst=v_psum[0:n, 0:D], data=vT_all[:, l, g, b0:b0 + nb, 0:n_t])
                    v_rows = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
                    nisa.tensor_copy(dst=v_rows[0:n, 0:D], src=v_psum[0:n, 0:D])
                    maskT = None
                    if nb > 1:      # one mask per block shape and pass, shared by the layers
                        if (nb, n_t) not in S["maskT"]:
                            S["maskT"][(nb, n_t)] = _block_mask_T(nb, r, n_t)
                        maskT = S["maskT"][(nb, n_t)]
                    _attention_block_T(qT[:, g, b0:b0 + nb, :], kT_all[:, l, g, b0:b0 + nb, 0:n_t],
                                       v_rows[0:n, 0:D], S["ones_bf"][0:n, 0:D], maskT, out_view, m, n, D)
                else:
                    _attention_block(qT[:, g, b0:b0 + nb, :], kT_all[:, l, g, b0:b0 + nb, 0:n_t],
                                     vT_all[:, l, g, b0:b0 + nb, 0:n_t], S["mask"][0:m, 0:nb, 0:n_t],
                                     out_view, m, n, D, nb > 1)
    else:   # "self" (no cache: attend within the pass) or "prefill" (the same, and fill cache slots 0..slots-1)
        slots = arg
        kT = nl.ndarray((D, Hkv, R), dtype=nl.bfloat16, buffer=nl.sbuf)
        _qk_norm_rope_T(c, S, l, qkvT, cos_t, sin_t, qT.permute((0, 1, 3, 2)), kT, sq_src)
        vT = nl.ndarray((D, Hkv, R), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=vT, src=qkvT[:, NH:NH + Hkv, :])
        mask = S["mask"] if mode == "self" else S["mask2"]
        bb = S["bb"] if mode == "self" else S["bb2"]     # batches per block; rows of a block = bb * slots
        if mode == "prefill":
            nb_all = R // slots
            nisa.tensor_copy(dst=S["kT"][:, l, :, :, 0:slots], src=kT.reshape((D, Hkv, nb_all, slots)))
            nisa.tensor_copy(dst=S["vT"][:, l, :, :, 0:slots], src=vT.reshape((D, Hkv, nb_all, slots)))
        for g in range(Hkv):
            for b0 in range(0, R // slots, bb):
                nb = min(bb, R // slots - b0)
                r0, r1 = b0 * slots, (b0 + nb) * slots
                m, n = (r1 - r0) * r, r1 - r0
                _attention_block(qT[:, g, r0:r1, :], kT[:, g, r0:r1], vT[:, g, r0:r1],
                                 mask[0:m, 0:nb, :],
                                 attnT[:, g * r:(g + 1) * r, r0:r1].permute((0, 2, 1)), m, n, D, True)
    _row_parallel(c, S, hT, res, lambda dst, mode: _linear_T(
        dst, attnT, Hq, D, S["wo"][:, l] if S["wo"] is not None else None, W["wo_t"][l], c.H, _K_TILE, R, mode))
    load(l + 1, ("wqkv", "wo"))
    _mlp(c, W, S, l, hT, res)
    load(l + 1, ("wgu", "wd"))


def _row_parallel(c, S, hT, res, project):
    """hT += the output of a row-parallel projection (o_proj, down_proj): project(dst, mode) runs its matmuls.

    TP = 1: straight onto the residual (mode `res`). TP = t > 1 (hT in SBUF): each rank evicts its partial sum
    plus hT / t (t is a power of two: exact) into [128, KC * rows] fp32, and the SBUF all-reduce over the replica
    group (`nki.collectives.all_reduce`) writes the sum, h + sum of the partials, straight into hT: one
    collective and no separate residual add per projection."""
    group = S.get("tp_group")
    if not _partial_sums(S):
        project(hT, res)
        return
    KC, R = c.KC, c.rows
    part = nl.ndarray((_K_TILE, KC * R), dtype=nl.float32, buffer=nl.sbuf)
    part3 = part.reshape((_K_TILE, KC, R))
    out = project(part3, "psum")            # the PSUM tile when it fits one bank, else copied into part
    if out is part3:
        nisa.scalar_tensor_tensor(dst=part3, data=hT, op0=nl.multiply, operand0=S["inv_tp"], op1=nl.add,
                                  operand1=part3)
    else:
        nisa.scalar_tensor_tensor(dst=part3, data=hT, op0=nl.multiply, operand0=S["inv_tp"], op1=nl.add,
                                  operand1=out)
    h2 = hT.reshape((_K_TILE, KC * R))
    if S["core_split"]:     # this core's + the other core's partial (the same sum on both: + is commutative)
        other = _core_exchange(S, part, _K_TILE, KC * R)
        if group is None:
            nisa.tensor_tensor(dst=h2, data1=part, data2=other, op=nl.add)
            return
        nisa.tensor_tensor(dst=part, data1=part, data2=other, op=nl.add)
    nki.collectives.all_reduce(srcs=[part], dsts=[h2], replica_group=group, op=nl.add)


def _mlp(c, W, S, l, hT, res="add"):
    """hT += down(silu(gate(xn)) * up(xn)), xn = RMSNorm(h); the norm's 1/rms scales the gate/up outputs."""
    R, IC = c.rows, c.IC
    parts = _rms_partials(hT, c.KC, R)
    xw = _weighted_T(hT, S["post_norm"], c.L * c.KC, l * c.KC, c.KC, R)
    fin = {}
    hook = (IC, lambda: fin.setdefault("rstd", _rms_finish(parts, S["ones_bf"], c.eps, c.H, R)))
    guT = nl.ndarray((_K_TILE, 2 * IC, R), dtype=nl.float32, buffer=nl.sbuf)
    sg = nl.ndarray((_K_TILE, IC, R), dtype=nl.float32, buffer=nl.sbuf)
    act = nl.ndarray((_K_TILE, IC, R), dtype=nl.bfloat16, buffer=nl.sbuf)
    if R == 1 and S["wgu"] is not None:
        # gate and up in two PSUM tiles: silu(gate) (1/rms as ScalarE's per-partition scale) runs while the
        # up matmuls stream; then one fused VectorE op
        wgu = S["wgu"][:, l]
        g = _linear_T(guT[:, 0:IC, :], xw, c.KC, _K_TILE, wgu[:, :, 0:c.I], None, c.I, _K_TILE, R, "psum")
        rstd = _rms_finish(parts, S["ones_bf"], c.eps, c.H, R)
        nisa.activation(dst=sg, op=nl.silu, data=g, scale=rstd)
        u = _linear_T(guT[:, IC:2 * IC, :], xw, c.KC, _K_TILE, wgu[:, :, c.I:2 * c.I], None, c.I, _K_TILE, R,
                      "psum")
        nisa.scalar_tensor_tensor(dst=act, data=u, op0=nl.multiply, operand0=rstd, op1=nl.multiply, operand1=sg)
    else:
        gu = _linear_T(guT, xw, c.KC, _K_TILE, S["wgu"][:, l] if S["wgu"] is not None else None, W["wgu_t"][l],
                       2 * c.I, _K_TILE, R, "psum", hook=hook)
        rstd = fin["rstd"] if "rstd" in fin else _rms_finish(parts, S["ones_bf"], c.eps, c.H, R)
        nisa.tensor_tensor(dst=guT, data1=gu, data2=_bcast_mid(rstd, _K_TILE, 2 * IC, R, R), op=nl.multiply)
        nisa.activation(dst=sg, op=nl.silu, data=guT[:, 0:IC, :])
        nisa.tensor_tensor(dst=act, data1=sg, data2=guT[:, IC:2 * IC, :], op=nl.multiply)
    _row_parallel(c, S, hT, res, lambda dst, mode: _linear_T(
        dst, act, IC, _K_TILE, S["wd"][:, l] if S["wd"] is not None else None, W["wd_t"][l], c.H, _K_TILE, R, mode))


def _rope_T(c, rope_hbm, pattern_rows, offset):
    """cos or sin laid out [D, NH, rows] fp32 (feature d on partitions), by one broadcasting DMA."""
    t = nl.ndarray((c.D, c.NH, c.rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=rope_hbm.ap(pattern=[[1, c.D], [0, c.NH]] + pattern_rows, offset=offset))
    return t


def _rope_col(rope_hbm, D, pos):
    """cos or sin of one position as a [D, 1] fp32 column (feature d on partitions)."""
    t = nl.ndarray((D, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=rope_hbm.ap(pattern=[[1, D], [1, 1]], offset=pos * D))
    return t


def _rows_to_T(x_rows, c):
    """[rows, H] (any float dtype) -> hT [128, KC, rows] fp32 (TensorE transposes, evicted as fp32)."""
    return _transpose_chunks(x_rows, c.KC, _K_TILE, c.rows, nl.float32)


def _rows_to_psum(x_rows, c, ident):
    """[rows, H] -> hT [128, KC, rows] fp32 in PSUM, the residual stream of a pass: per 128-feature chunk one
    matmul x_chunk^T @ I (exact: one nonzero product per output). The layers' o_proj / down_proj matmuls then
    accumulate onto it and the norms read it in place (no VectorE residual adds, no eviction)."""
    h_psum = nl.ndarray((_K_TILE, c.KC, c.rows), dtype=nl.float32, buffer=nl.psum)
    for i in range(c.KC):
        nisa.nc_matmul(h_psum[:, i, :], x_rows[:, i * _K_TILE:(i + 1) * _K_TILE], ident[0:c.rows, 0:c.rows])
    return h_psum


def _psum_residual_ok(c):
    """The PSUM residual needs hT [128, KC, rows] fp32 within one 2 KiB bank."""
    return c.KC * c.rows * 4 <= PSUM_BANK_BYTES


def _identity(dtype):
    """[128, 128] identity of `dtype` (stationary / moving operand of exact transposes by matmul)."""
    zero = nl.ndarray((_K_TILE, _K_TILE), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    ident = nl.ndarray((_K_TILE, _K_TILE), dtype=dtype, buffer=nl.sbuf)
    # p - j == 0 -> 1.0
    nisa.affine_select(dst=ident, pattern=[[-1, _K_TILE]], offset=0, channel_multiplier=1, on_true_tile=zero,
                       on_false_value=1.0, cmp_op=nl.not_equal)
    return ident


def _load_transposed(dst, src, n, m):
    """dst [m, n] fp32 SBUF = src [n, m]^T (an fp32 HBM matrix with contiguous rows, m <= 128): row blocks of
    <= 128 loaded whole (m * 4 contiguous bytes per descriptor) and turned by TensorE transposes. Loading the
    transposed layout straight from HBM would move 4-byte descriptors (a 20 KB norm table then holds the DMA
    queues for ~13 us, ahead of the first layer's weights)."""
    for r0 in range(0, n, _K_TILE):
        rn = min(_K_TILE, n - r0)
        rows = nl.ndarray((rn, m), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=src[r0:r0 + rn, :])
        t_psum = nl.ndarray((m, rn), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=t_psum, data=rows)
        nisa.tensor_copy(dst=dst[:, r0:r0 + rn], src=t_psum)


def _setup(c, W, resident, with_cache, attn_bb, mask_args):
    """SBUF state shared by all passes: norms (feature-major), optional resident weights, KV cache, mask."""
    L, D, H = c.L, c.D, c.H
    S = {}
    for key, src in (("in_norm", W["input_norm"]), ("post_norm", W["post_norm"])):
        t = nl.ndarray((_K_TILE, L, c.KC), dtype=nl.float32, buffer=nl.sbuf)
        _load_transposed(t.reshape((_K_TILE, L * c.KC)), src.reshape((L * c.KC, _K_TILE)), L * c.KC, _K_TILE)
        S[key] = t
    for key, src in (("q_norm", W["q_norm"]), ("k_norm", W["k_norm"])):
        t = nl.ndarray((D, L), dtype=nl.float32, buffer=nl.sbuf)
        _load_transposed(t, src, L, D)
        S[key] = t
    fn = nl.ndarray((_K_TILE, c.KC), dtype=nl.float32, buffer=nl.sbuf)
    _load_transposed(fn, W["final_norm"].reshape((c.KC, _K_TILE)), c.KC, _K_TILE)
    S["final_norm"] = fn
    S["ones"] = _ones(_K_TILE)
    S["ones_bf"] = _ones(_K_TILE, nl.bfloat16)
    S["onesD"] = _ones(D)
    S["rot"] = _rotate_half_matrix(D)
    _qk_consts(c, S)
    S["wqkv"] = S["wo"] = S["wgu"] = S["wd"] = None
    if resident:
        # one allocation per matrix kind (distinct call sites: all four stay live for the whole launch)
        S["wqkv"] = nl.ndarray((_K_TILE, L, c.KC, c.NQKV), dtype=W["wqkv_t"].dtype, buffer=nl.sbuf)
        S["wo"] = nl.ndarray((D, L, c.Hq, H), dtype=W["wo_t"].dtype, buffer=nl.sbuf)
        S["wgu"] = nl.ndarray((_K_TILE, L, c.KC, 2 * c.I), dtype=W["wgu_t"].dtype, buffer=nl.sbuf)
        S["wd"] = nl.ndarray((_K_TILE, L, c.IC, H), dtype=W["wd_t"].dtype, buffer=nl.sbuf)
        S["w_loaded"] = set()
        S["w_load"] = lambda l, keys=_W_RESIDENT: _load_layer_weights(c, W, S, l, keys)
        S["w_load"](0)          # later layers: during the layer before, in the first pass (`_layer`)
    if with_cache:
        S["kT"] = nl.ndarray((D, L, c.Hkv, c.rows, c.G), dtype=nl.bfloat16, buffer=nl.sbuf)
        S["vT"] = nl.ndarray((D, L, c.Hkv, c.rows, c.G), dtype=nl.bfloat16, buffer=nl.sbuf)
    S["bb"] = attn_bb
    S["mask"] = _block_mask(*mask_args)
    S["exp_safe"] = False           # cache-mode attention without the max subtraction (`_exp_is_safe`)
    S["maskT"] = {}
    return S


_W_RESIDENT = ("wqkv", "wo", "wgu", "wd")


def _load_layer_weights(c, W, S, l, keys=_W_RESIDENT):
    """DMA layer l's matrices `keys` into their resident SBUF tensors (each once; no-op for l >= L). The first
    pass issues layer l + 1's attention matrices after layer l's attention and its MLP matrices after layer l's
    MLP (`_layer`), not everything up front: DMAs in flight hold the queues and the bandwidth that the pass's
    latency-critical transfers (TP all-reduces, core exchanges) need, so loading all layers first delays those
    behind ~20 MB of weights (modeled: the TP=8 B=1 prompt pass took ~190 us, most of it such waits)."""
    D, H = c.D, c.H
    for key, src, kp, n_k, n_out in (("wqkv", W["wqkv_t"], _K_TILE, c.KC, c.NQKV),
                                     ("wo", W["wo_t"], D, c.Hq, H),
                                     ("wgu", W["wgu_t"], _K_TILE, c.KC, 2 * c.I),
                                     ("wd", W["wd_t"], _K_TILE, c.IC, H)):
        if l >= c.L or key not in keys or (l, key) in S["w_loaded"]:
            continue
        S["w_loaded"].add((l, key))
        for n0 in range(0, n_out, 4 * _N_TILE):      # ~1-4 MB per DMA: several queues in flight
            nn = min(4 * _N_TILE, n_out - n0)
            nisa.dma_copy(dst=S[key][:, l, :, n0:n0 + nn],
                          src=src[l].reshape((n_k, kp, n_out)).permute((1, 0, 2))[:, :, n0:n0 + nn])


def _select_code(logits, rows, vh, u_col, sampling):
    """Code per row from fp32 logits [rows, vh] (see `code_predictor` for the exact procedure)."""
    do_sample, inv_temp, top_k, top_p = sampling
    idx8 = nl.ndarray((rows, _MAX8), dtype=nl.uint32, buffer=nl.sbuf)
    if not do_sample:
        top8 = nl.ndarray((rows, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.max8(dst=top8, src=logits)
        nisa.nc_find_index8(dst=idx8, data=logits, vals=top8)
    else:
        z = nl.ndarray((rows, vh), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=z, data=logits, op0=nl.multiply, operand0=inv_temp)
        n_rounds = (top_k + _MAX8 - 1) // _MAX8
        cand = nl.ndarray((rows, n_rounds * _MAX8), dtype=nl.float32, buffer=nl.sbuf)
        work = nl.ndarray((rows, vh), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=work, src=z)
        for rnd in range(n_rounds):
            nisa.max8(dst=cand[:, rnd * _MAX8:(rnd + 1) * _MAX8], src=work)
            if rnd < n_rounds - 1:
                kill = nl.ndarray((rows, vh), dtype=nl.float32, buffer=nl.sbuf)
                last = cand[:, rnd * _MAX8 + _MAX8 - 1:rnd * _MAX8 + _MAX8]
                nisa.tensor_scalar(dst=kill, data=work, op0=nl.greater_equal, operand0=last,
                                   op1=nl.multiply, operand1=NEG_INF)
                nisa.tensor_tensor(dst=work, data1=work, data2=kill, op=nl.add)
        val = _sample_pick(cand, rows, top_k, top_p, u_col)
        vals8 = nl.ndarray((rows, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=vals8, value=0.0)
        nisa.tensor_scalar(dst=vals8, data=vals8, op0=nl.add, operand0=val)
        nisa.nc_find_index8(dst=idx8, data=z, vals=vals8)
    code = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=code, src=idx8[:, 0:1])
    return code


def _sample_pick(cand, rows, top_k, top_p, u_col):
    """The sampled value c_{i*} [rows, 1] from the rounds' candidates cand [rows, >= top_k] (steps 2-4 of the
    procedure in `code_predictor`); u_col [rows, 1] holds the uniforms."""
    c_sb = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=c_sb, data=cand[:, 0:top_k], op0=nl.maximum, operand0=NEG_INF)
    negc1 = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=negc1, data=c_sb[:, 0:1], op0=nl.multiply, operand0=-1.0)
    e = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    zsum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=e, op=nl.exp, data=c_sb, bias=negc1, reduce_op=nl.add, reduce_res=zsum,
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    rz = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=rz, data=zsum)
    q = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=q, data=e, op0=nl.multiply, operand0=rz)
    ones = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    cum = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor_scan(dst=cum, data0=ones, data1=q, initial=0.0, op0=nl.multiply, op1=nl.add)
    excl = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=excl, data1=cum, data2=q, op=nl.subtract)
    keep = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=keep, data=excl, op0=nl.less, operand0=top_p)
    cum_keep = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=cum_keep, data1=cum, data2=keep, op=nl.multiply)
    mass = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=mass, op=nl.maximum, data=cum_keep, axis=1)
    theta = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=theta, data1=mass, data2=u_col, op=nl.multiply)
    below = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=below, data=cum, op0=nl.less_equal, operand0=theta, op1=nl.multiply,
                              operand1=keep)
    cnt = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=cnt, op=nl.add, data=below, axis=1)
    n_keep = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=n_keep, op=nl.add, data=keep, axis=1)
    last_i = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=last_i, data=n_keep, op0=nl.add, operand0=-1.0)
    pick = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=pick, data1=cnt, data2=last_i, op=nl.minimum)
    pos_i = nl.ndarray((rows, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=pos_i, pattern=[[1, top_k]], offset=0, channel_multiplier=0)
    pos_f = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pos_f, src=pos_i)
    onehot_val = nl.ndarray((rows, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=onehot_val, data=pos_f, op0=nl.equal, operand0=pick, op1=nl.multiply,
                              operand1=c_sb)
    val = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=val, op=nl.add, data=onehot_val, axis=1)
    return val


def _fm_sampling_ok(vh, rows):
    """Feature-major sampling needs whole 128-row vocab chunks and vc * 8 <= 512 (one matmul merges a round).
    It loops over the rows, so from _FM_SAMPLE_MAX_ROWS rows on the rows layout (all rows at once) is cheaper."""
    return vh % _K_TILE == 0 and (vh // _K_TILE) * _MAX8 <= _N_TILE and rows <= _FM_SAMPLE_MAX_ROWS


def _sample_consts(S, vh):
    """Constants of `_sample_code_T` (vc = Vh / 128 chunks): ones [vc, 1] and [1, vc], the block mask
    sel[k, j, i] = (j == k) [vc, vc, 8] and vidxT[c, p] = c * 128 + p - Vh (fp32)."""
    vc = vh // _K_TILE
    ones_col = nl.ndarray((vc, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_col, value=1.0)
    ones_row = nl.ndarray((1, vc), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_row, value=1.0)
    ones_blk = nl.ndarray((vc, vc, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_blk, value=1.0)
    sel = nl.ndarray((vc, vc, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
    # j - k == 0 -> 1.0, else 0.0
    nisa.affine_select(dst=sel, pattern=[[1, vc], [0, _MAX8]], offset=0, channel_multiplier=-1,
                       on_true_tile=ones_blk, on_false_value=0.0, cmp_op=nl.equal)
    vi = nl.ndarray((vc, _K_TILE), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=vi, pattern=[[1, _K_TILE]], offset=-vh, channel_multiplier=_K_TILE)
    vf = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=vf, src=vi)
    S["s_ones_col"], S["s_ones_row"], S["s_sel"], S["s_vidx"] = ones_col, ones_row, sel, vf


def _sample_code_T(c, W, S, hT, j, vh, cols, n_rows, u_row, sampling):
    """Sampled code [n_rows, 1] int32 with the vocab spread over vc = Vh / 128 partitions (the procedure of
    `code_predictor`, exactly as `_select_code` runs it on [rows, Vh] logits, at ~1/vc of the VectorE work).

    Per row b: z^T [vc, 128] (v = c * 128 + p) by a TensorE transpose of the weight-stationary logits. A max8
    round: max8 per partition -> [vc, 8]; the vc x 8 values moved onto one partition by an all-ones matmul over
    a block-diagonal copy ([vc, vc * 8], exact: one nonzero per column); max8 of those = the round's global top 8
    (with repeats); the 8th value broadcast back by a ones-row matmul removes every value >= it. The index of
    the sampled value: (z == c) * (v - Vh) -> min per partition, transposed, min, + Vh. u_row [1, B] holds the
    step's uniforms on one partition; codes are assembled on one partition and transposed to [B, 1].
    """
    _, inv_temp, top_k, top_p = sampling
    vc = vh // _K_TILE
    n_rounds = (top_k + _MAX8 - 1) // _MAX8
    vc_l = vc // S["vocab_shards"]
    hf = _rms_norm_T(hT, S["final_norm"], S["ones"], c.eps, c.H, c.KC, c.rows, nl.bfloat16)
    lgT = nl.ndarray((_K_TILE, vc_l, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    lg = _linear_T(lgT, hf, c.KC, _K_TILE, _lm_head_resident(S, j), W["lm_head_t"][j], vc_l * _K_TILE, _K_TILE,
                   n_rows, "copy", cols=cols)      # in SBUF: TensorE transposes read SBUF
    if S["vocab_shards"] > 1:
        lg = _vocab_gather(S, lg, _K_TILE, vc_l * n_rows).reshape((_K_TILE, vc, n_rows))
    code_row = nl.ndarray((1, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    for b in range(n_rows):
        zT_psum = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=zT_psum, data=lg[:, :, b])
        zT = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=zT, data=zT_psum, op0=nl.multiply, operand0=inv_temp)
        work = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=work, src=zT)
        cand = nl.ndarray((1, n_rounds * _MAX8), dtype=nl.float32, buffer=nl.sbuf)
        for rnd in range(n_rounds):
            m8 = nl.ndarray((vc, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
            nisa.max8(dst=m8, src=work)
            blk = nl.ndarray((vc, vc, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
            # max(., NEG_INF): removed values may have reached -inf, and -inf * 0 would be NaN
            nisa.scalar_tensor_tensor(dst=blk, data=m8.ap(pattern=[[_MAX8, vc], [0, vc], [1, _MAX8]], offset=0),
                                      op0=nl.maximum, operand0=NEG_INF, op1=nl.multiply, operand1=S["s_sel"])
            flat_psum = nl.ndarray((1, vc * _MAX8), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_matmul(flat_psum, S["s_ones_col"], blk.reshape((vc, vc * _MAX8)))
            top8 = cand[:, rnd * _MAX8:(rnd + 1) * _MAX8]
            nisa.max8(dst=top8, src=flat_psum)
            if rnd < n_rounds - 1:
                thr_psum = nl.ndarray((vc, 1), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_matmul(thr_psum, S["s_ones_row"], top8[:, _MAX8 - 1:_MAX8])
                kill = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(dst=kill, data=work, op0=nl.greater_equal, operand0=thr_psum,
                                   op1=nl.multiply, operand1=NEG_INF)
                nisa.tensor_tensor(dst=work, data1=work, data2=kill, op=nl.add)
        val = _sample_pick(cand, 1, top_k, top_p, u_row[:, b:b + 1])
        val_psum = nl.ndarray((vc, 1), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(val_psum, S["s_ones_row"], val)
        hit = nl.ndarray((vc, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=hit, data=zT, op0=nl.equal, operand0=val_psum, op1=nl.multiply,
                                  operand1=S["s_vidx"])
        pmin = nl.ndarray((vc, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=pmin, op=nl.minimum, data=hit, axis=1)
        pminT = nl.ndarray((1, vc), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=pminT, data=pmin)
        nisa.tensor_reduce(dst=code_row[:, b:b + 1], op=nl.minimum, data=pminT, axis=1)
    code_psum = nl.ndarray((n_rows, 1), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=code_psum, data=code_row)
    code = nl.ndarray((n_rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=code, data=code_psum, op0=nl.add, operand0=float(vh))
    return code


def _gather_embed(codec_embed, j, code, rows, H, V):
    """emb[r, :] = codec_embed[j, code[r], :] by one indirect DMA (vector_offset on the vocab dim)."""
    emb = nl.ndarray((rows, H), dtype=codec_embed.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=emb, src=codec_embed.ap(pattern=[[V * H, 1], [H, rows], [1, H]], offset=j * V * H,
                                              vector_offset=code, indirect_dim=1))
    return emb


def _greedy_code_T(c, W, S, hT, j, vh, cols, n_rows):
    """Greedy code [n_rows, 1] int32 with vocab on partitions: logits^T [128, Vh / 128, rows] by 128 x 128
    weight-stationary matmuls (read straight from PSUM), then max and first index across partitions.

    index = min{v : l[v] == max(l)}. Per partition p: its max pmax[p] and the first index pidx[p] (stored as
    v - Vh < 0) among its chunks holding pmax[p]; both transposed to rows, the global max m, and the min of
    pidx over the partitions with pmax == m (0 elsewhere), + Vh. The pidx chain runs beside the max transpose.
    """
    vc = vh // _K_TILE
    vc_l = vc // S["vocab_shards"]          # this rank's LM-head chunks (all of them unless vocab-sharded)
    hf = _rms_norm_T(hT, S["final_norm"], S["ones"], c.eps, c.H, c.KC, c.rows, nl.bfloat16)
    lgT = nl.ndarray((_K_TILE, vc_l, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    lg = _linear_T(lgT, hf, c.KC, _K_TILE, _lm_head_resident(S, j), W["lm_head_t"][j], vc_l * _K_TILE, _K_TILE,
                   n_rows, "psum", cols=cols)
    if S["vocab_shards"] > 1:
        lg = _vocab_gather(S, lg, _K_TILE, vc_l * n_rows).reshape((_K_TILE, vc, n_rows))
    pmax = nl.ndarray((_K_TILE, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=pmax, op=nl.maximum, data=lg.permute((0, 2, 1)), axis=2)
    pmaxT = nl.ndarray((n_rows, _K_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=pmaxT, data=pmax)
    cand = nl.ndarray((_K_TILE, vc, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    vmb = S["vidx"]
    for b in range(n_rows):
        nisa.scalar_tensor_tensor(dst=cand[:, :, b], data=lg[:, :, b], op0=nl.equal, operand0=pmax[:, b:b + 1],
                                  op1=nl.multiply, operand1=vmb[:, 0:vc])
    pidx = nl.ndarray((_K_TILE, n_rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=pidx, op=nl.minimum, data=cand.permute((0, 2, 1)), axis=2)
    gmax = nl.ndarray((n_rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=gmax, op=nl.maximum, data=pmaxT, axis=1)
    pmaxT_sb = nl.ndarray((n_rows, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pmaxT_sb, src=pmaxT)
    pidxT = nl.ndarray((n_rows, _K_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=pidxT, data=pidx)
    hit = nl.ndarray((n_rows, _K_TILE), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=hit, data=pmaxT_sb, op0=nl.equal, operand0=gmax, op1=nl.multiply, operand1=pidxT)
    gmin = nl.ndarray((n_rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=gmin, op=nl.minimum, data=hit, axis=1)
    code = nl.ndarray((n_rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=code, data=gmin, op0=nl.add, operand0=float(vh))
    return code


def _greedy_consts(S, vh):
    """Constant of `_greedy_code_T`: vidx[p, c] = c * 128 + p - Vh (fp32)."""
    vc = vh // _K_TILE
    vi = nl.ndarray((_K_TILE, vc), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=vi, pattern=[[_K_TILE, vc]], offset=-vh, channel_multiplier=1)
    vf = nl.ndarray((_K_TILE, vc), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=vf, src=vi)
    S["vidx"] = vf


def _lm_head_ring(S, W, c, vh, n_steps):
    """Allocate the SBUF ring [128, KC, Vh] that holds one step's LM head, and start loading step 0's.

    Step j + 1's head is loaded as soon as step j's matmuls have read the ring, so it streams during the next
    pass's layers instead of after them (whole Vh rows: 2 * Vh contiguous bytes per descriptor)."""
    S["lm_ring"] = nl.ndarray((_K_TILE, c.KC, vh), dtype=W["lm_head_t"].dtype, buffer=nl.sbuf)
    S["lm_steps"] = n_steps
    _prefetch_lm_head(S, W, 0)


def _prefetch_lm_head(S, W, j):
    """DMA step j's LM head into the ring (no-op without a ring or past the last step). Issue it after the
    previous step's embedding gather: the DMA queues then serve that latency-critical gather first."""
    ring = S.get("lm_ring")
    if ring is None or j >= S["lm_steps"]:
        return
    _, kc, vh = ring.shape
    src = W["lm_head_t"][j].reshape((kc, _K_TILE, vh)).permute((1, 0, 2))
    kb = max(1, _LM_DMA_BYTES // (_K_TILE * vh * _BF16_BYTES))
    for k0 in range(0, kc, kb):
        kn = min(kb, kc - k0)
        nisa.dma_copy(dst=ring[:, k0:k0 + kn, :], src=src[:, k0:k0 + kn, :])


def _lm_head_resident(S, j):
    """The ring holding step j's LM head, or None (stream it block by block)."""
    ring = S.get("lm_ring")
    if ring is None:
        return None
    return ring


def _final_logits(c, W, S, hT, j, vh, stat_cols, n_rows):
    """logits [n_rows, vh] fp32 = final_norm(h) @ lm_head[j] for the selected rows (rows on partitions)."""
    hf = _rms_norm_T(hT, S["final_norm"], S["ones"], c.eps, c.H, c.KC, c.rows, nl.bfloat16)
    vh_l = vh // S["vocab_shards"]
    logits = nl.ndarray((n_rows, vh_l), dtype=nl.float32, buffer=nl.sbuf)
    _linear_rows(logits, hf, c.KC, _K_TILE, W["lm_head_t"][j], vh_l, n_rows, stat_cols=stat_cols,
                 w_res=_lm_head_resident(S, j))
    logits = _vocab_gather(S, logits, n_rows, vh_l)
    return logits


def _prefill_pass(c2, W, S, x2, rope2, L):
    """Positions 0 and 1 of every row as one pass over 2B rows (b, slot), causal within the row; fills the
    KV cache slots 0 and 1. Returns (cfg, hT, columns of position 1) for the first code."""
    bb2 = max(1, min(c2.rows // 2, P_MAX // (2 * c2.r)))
    S["mask2"] = _block_mask(bb2 * 2 * c2.r, 2 * c2.r, bb2, 2, 2)
    S["bb2"] = bb2
    res = "accum" if _psum_residual_ok(c2) and not _partial_sums(S) else "add"
    h2 = _rows_to_psum(x2, c2, _identity(x2.dtype)) if res == "accum" else _rows_to_T(x2, c2)
    for l in range(L):
        _layer(c2, W, S, l, h2, rope2[0], rope2[1], ("prefill", 2), res)
    return c2, h2, slice(1, c2.rows, 2)


_W_NAMES = ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm", "wqkv_t", "wo_t", "wgu_t", "wd_t",
            "lm_head_t", "codec_embed", "rope_cos", "rope_sin")


def _weights_and_sizes(input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t, wd_t, lm_head_t,
                       codec_embed, rope_cos, rope_sin):
    """The weights as the {name: tensor} dict the steps take, and the sizes read from them:
    (W, L layers, D head dim, I intermediate, G1 code groups, V embedding vocab, Vh LM-head vocab)."""
    W = dict(zip(_W_NAMES, (input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t, wd_t,
                            lm_head_t, codec_embed, rope_cos, rope_sin)))
    n_groups, vocab, _ = codec_embed.shape
    return W, wqkv_t.shape[0], q_norm.shape[1], wd_t.shape[1], n_groups, vocab, lm_head_t.shape[2]


@nki.jit
def code_predictor_kernel(past_hidden, code0_embed, uniforms, input_norm, post_norm, q_norm, k_norm, final_norm,
                          wqkv_t, wo_t, wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin,
                          n_q_heads, n_kv_heads, eps, resident, do_sample, inv_temperature, top_k, top_p,
                          lm_ring=False, exp_safe=False, replica_group=None, tp_degree=1, vocab_shards=1,
                          core_split=False, tile_bias=False):
    """All G1 residual-code steps x L layers of the code predictor in one launch (KV cache in SBUF).

    Dimensions: B batch (<= 128), H hidden, L layers, Hq/Hkv heads of this rank, D head dim, I intermediate
    of this rank, G1 residual groups, V codec vocab, Vh LM-head rows, G = G1 + 1 positions.

    Args:
        past_hidden: [B, H] @ HBM, talker last hidden state (position 0 of the prompt).
        code0_embed: [B, H] @ HBM, talker codec embedding of code 0 (position 1).
        uniforms: [B, G1] @ HBM fp32 in [0, 1), the sampling draws (unused when greedy).
        input_norm, post_norm: [L, H] @ HBM; q_norm, k_norm: [L, D] @ HBM; final_norm: [H] @ HBM.
        wqkv_t: [L, H, (Hq + 2 Hkv) D] @ HBM; wo_t: [L, Hq D, H]; wgu_t: [L, H, 2 I]; wd_t: [L, I, H].
        lm_head_t: [G1, H, Vh] @ HBM; codec_embed: [G1, V, H] @ HBM; rope_cos, rope_sin: [G, D] @ HBM fp32.
        core_split (LNC=2 only): split each row's work between the two cores instead of the batch rows:
            wqkv_t, wo_t, wgu_t, wd_t and lm_head_t then carry a leading core dim of 2 (`core_split_weights`:
            core p's half of the heads, intermediate columns and LM-head rows; n_q_heads / n_kv_heads are per
            core), and the cores exchange their o_proj / down_proj partial sums and their logits through shared
            HBM with `nisa.core_barrier` (see `_core_exchange`).
        tile_bias: trace-time (trn1: NeuronCore-v2 has no float activation bias): the RMSNorms' eps bias is a
            [128, 1] fp32 tile (one memset per frame) instead of the float eps.
    Returns:
        codes: [B, G1] @ HBM int32; codec_embeds: [B, G1, H] @ HBM (codec_embed's dtype);
        codec_sum: [B, H] @ HBM = code0_embed + sum_j codec_embeds[:, j].
    Constraints: see `code_predictor`.
    Pseudocode:
        h = past_hidden; for pos in 0..G1: (pos >= 2: h = codec_embeds[:, pos - 2])
            for l: h += attn_l(rms(h)) with k, v of pos appended to the SBUF cache; h += mlp_l(rms(h))
            if pos >= 1: j = pos - 1; code_j = select(rms(h) @ lm_head[j]); codec_embeds[:, j] = embed[j][code_j]
    """
    B_all, H = past_hidden.shape
    if core_split:      # this core's half of the split matrices
        pid = nl.program_id(0)
        wqkv_t, wo_t, wgu_t, wd_t, lm_head_t = (t[pid] for t in (wqkv_t, wo_t, wgu_t, wd_t, lm_head_t))
    W, L, D, I, G1, V, vh = _weights_and_sizes(input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t,
                                               wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin)
    codes_all = nl.ndarray((B_all, G1), dtype=nl.int32, buffer=nl.shared_hbm)
    embeds_all = nl.ndarray((B_all, G1, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    sum_all = nl.ndarray((B_all, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    bad_all = nl.ndarray((B_all, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    # LNC: the batch rows are split between the cores (rows are independent: no exchange), each core writing
    # only its rows; a core without rows (B = 1 under LNC=2) has nothing to do. Or (core_split) both cores run
    # every row on their halves of the matrices and split the output columns.
    r0, r1 = (0, B_all) if core_split else _core_rows(B_all)
    if r1 > r0:
        rows = slice(r0, r1)
        _frame(past_hidden[rows, :], code0_embed[rows, :], uniforms[rows, :], W, codes_all[rows, :],
               embeds_all[rows, :, :], sum_all[rows, :], bad_all[rows, :], n_q_heads, n_kv_heads, eps, resident,
               do_sample, inv_temperature, top_k, top_p, lm_ring, exp_safe, replica_group, tp_degree,
               vocab_shards, core_split, tile_bias)
    return codes_all, embeds_all, sum_all, bad_all


def tp_state(S, replica_group, tp_degree, vocab_shards=1, core_split=False):
    """Record the launch's TP setting in the kernel state S: the replica group (None: TP = 1), 1 / (the number of
    partial sums: TP, times 2 under the core split), into how many rank shards the LM heads' vocab is split
    (1: replicated) and into how many shards in all (x 2 under the core split)."""
    S["tp_group"] = replica_group
    S["core_split"] = core_split
    n_cores = 2 if core_split else 1
    S["inv_tp"] = 1.0 / (tp_degree * n_cores)
    S["rank_vocab_shards"] = vocab_shards
    S["vocab_shards"] = vocab_shards * n_cores


def _partial_sums(S) -> bool:
    """Row-parallel projections give partial sums (TP > 1 or the core split): the residual stays in SBUF."""
    return S.get("tp_group") is not None or S.get("core_split", False)


def _core_exchange(S, src, p, n, dst=None):
    """Core split: this core's fp32 SBUF tile src [p, n] -> the other core's [p, n] (into dst when given, else a
    new SBUF tile), through shared HBM: write this core's half of an exchange slot, `nisa.core_barrier`, read
    the other core's half. Two slots alternate, so a slot is rewritten only two barriers after the other core
    last read it."""
    k = S["xk"]
    S["xk"] = k + 1
    slot = k % 2
    pid = S["pid"]
    buf = S["xbuf"]
    nisa.dma_copy(dst=buf[slot, pid, 0:p, 0:n], src=src)
    nisa.core_barrier(data=buf, cores=(0, 1))
    if dst is None:
        dst = nl.ndarray((p, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=dst, src=buf[slot, 1 - pid, 0:p, 0:n])
    return dst


def _vocab_gather(S, lg, p, n):
    """Vocab-sharded LM heads: this rank's logits lg [p, n] (PSUM or SBUF, n = (vocab, rows) elements per
    partition, vocab-major) -> every rank's [p, shards * n] in SBUF by one SBUF all-gather along the free dim.
    Rank r holds vocab rows [r Vh_l, (r + 1) Vh_l), so the rank-major concatenation is the full vocab in order.
    Without vocab sharding lg itself."""
    t = S["rank_vocab_shards"]
    if S["core_split"]:      # first the two cores' halves of this rank's vocab: [core 0 | core 1]
        pid = S["pid"]
        both = nl.ndarray((p, 2 * n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=both[:, pid * n:(pid + 1) * n], src=lg.reshape((p, n)))
        _core_exchange(S, both[:, pid * n:(pid + 1) * n], p, n, dst=both[:, (1 - pid) * n:(2 - pid) * n])
        lg, n = both, 2 * n
    if t == 1:
        return lg
    src = nl.ndarray((p, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=src, src=lg.reshape((p, n)))
    full = nl.ndarray((p, t * n), dtype=nl.float32, buffer=nl.sbuf)
    nki.collectives.all_gather(srcs=[src], dsts=[full], replica_group=S["tp_group"], collective_dim=1)
    return full


def _core_rows(B):
    """This core's batch rows [r0, r1): ceil(B / n) per core, the last core the rest."""
    n = nl.num_programs(0)
    pid = nl.program_id(0)
    per = -(-B // n)
    return min(B, pid * per), min(B, (pid + 1) * per)


def _frame(past_hidden, code0_embed, uniforms, W, codes, codec_embeds, codec_sum, bad_rows, n_q_heads, n_kv_heads,
           eps, resident, do_sample, inv_temperature, top_k, top_p, lm_ring, exp_safe, replica_group, tp_degree,
           vocab_shards, core_split=False, tile_bias=False):
    """The whole frame for B rows (one core's share): prompt pass, then G1 steps. Inputs and outputs are HBM
    views of those rows: past_hidden, code0_embed [B, H]; uniforms [B, G1]; codes [B, G1]; codec_embeds
    [B, G1, H]; codec_sum [B, H]; bad_rows [B, 1]."""
    B, H = past_hidden.shape
    L, D, I = W["wqkv_t"].shape[0], W["q_norm"].shape[1], W["wd_t"].shape[1]
    codec_embed = W["codec_embed"]
    G1, V, _ = codec_embed.shape
    vh_l = W["lm_head_t"].shape[2]          # this rank's (core's, under the core split) LM-head rows
    vh = vh_l * vocab_shards * (2 if core_split else 1)     # the whole vocab the codes index
    # output columns this core writes (the core split: both cores hold every row; core 0 writes the codes)
    pid = nl.program_id(0) if core_split else 0
    hs = slice(pid * (H // 2), (pid + 1) * (H // 2)) if core_split else slice(0, H)
    writes_codes = pid == 0
    rope_cos, rope_sin = W["rope_cos"], W["rope_sin"]
    if tile_bias:       # NeuronCore-v2: the rsqrt's eps bias as a [128, 1] tile (c.eps is then that tile)
        eps_sb = nl.ndarray((_K_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=eps_sb, value=float(eps))
        eps = eps_sb
    c = _Cfg(B, H, L, n_q_heads, n_kv_heads, D, I, G1 + 1, eps)

    # inputs first: the DMA queues serve them before the ~20 MB of resident weights
    u_sb = nl.ndarray((B, G1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=u_sb, src=uniforms)
    u_row = None
    if do_sample and _fm_sampling_ok(vh, B) and vh_l % _K_TILE == 0:  # [1, (j, b)]: step j's uniforms
        u_row = nl.ndarray((1, G1 * B), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=u_row, src=uniforms.ap(pattern=[[0, 1], [1, G1], [G1, B]], offset=0))
    one_pass = 2 * B <= P_MAX
    if one_pass:
        c2 = _Cfg(2 * B, H, L, n_q_heads, n_kv_heads, D, I, G1 + 1, eps)
        x2_raw = nl.ndarray((2 * B, H), dtype=code0_embed.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x2_raw[0::2, :], src=past_hidden)
        nisa.dma_copy(dst=x2_raw[1::2, :], src=code0_embed)
        x2 = _sanitized(x2_raw, 2 * B, H)
        del x2_raw
        rope2 = (_rope_T(c2, rope_cos, [[0, B], [D, 2]], 0), _rope_T(c2, rope_sin, [[0, B], [D, 2]], 0))
    # bad rows (non-finite or huge prompt values): codes forced to 0, flagged; code0_embed zeroed in the sum
    okv, bad, acc = _row_guard(past_hidden, code0_embed, B, H, vh)
    if writes_codes:
        nisa.dma_copy(dst=bad_rows, src=bad)
    bb = max(1, min(B, P_MAX // c.r))        # most batch rows per attention block (also <= 128 // keys per step)
    S = _setup(c, W, resident, True, bb, (bb * c.r, c.r, bb, c.G))
    if lm_ring:
        _lm_head_ring(S, W, c, vh_l, G1)
    S["exp_safe"] = exp_safe
    tp_state(S, replica_group, tp_degree, vocab_shards, core_split)
    if core_split:      # the exchange slots: 2 slots x 2 cores x [128, the largest exchange]
        S["pid"], S["xk"] = pid, 0
        width = max(c.KC * (2 * B if one_pass else B), vh_l, (vh_l // _K_TILE) * B)
        S["xbuf"] = nl.ndarray((2, 2, _K_TILE, width), dtype=nl.float32, buffer=nl.shared_hbm)
    # steps' residual stream in PSUM (see `_rows_to_psum`); under TP or the core split in SBUF (sums are added)
    res = "accum" if _psum_residual_ok(c) and not _partial_sums(S) else "add"
    if res == "accum":
        S["ident_emb"] = _identity(codec_embed.dtype)
    sampling = (do_sample, inv_temperature, top_k, top_p)
    fm_greedy = (not do_sample) and vh_l % _K_TILE == 0   # vocab-on-partitions argmax
    fm_sample = do_sample and _fm_sampling_ok(vh, B) and vh_l % _K_TILE == 0   # vocab over Vh / 128 partitions
    if fm_greedy:
        _greedy_consts(S, vh)
    if fm_sample:
        _sample_consts(S, vh)

    # ---- prefill: positions 0 (past_hidden) and 1 (code0_embed) as one pass over 2B rows (b, slot)
    if one_pass:
        last = _prefill_pass(c2, W, S, x2, rope2, L)
        del x2, rope2
    else:   # too many rows for one pass: two single-position passes
        hT = None
        for pos, src in ((0, past_hidden), (1, code0_embed)):
            x_raw = nl.ndarray((B, H), dtype=src.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=x_raw, src=src)
            hT = _rows_to_T(_sanitized(x_raw, B, H), c)
            cos_t = _rope_col(rope_cos, D, pos)
            sin_t = _rope_col(rope_sin, D, pos)
            _pass_consts(c, S, cos_t)
            for l in range(L):
                _layer(c, W, S, l, hT, cos_t, sin_t, ("cache", pos))
        last = (c, hT, None)
    # ---- steps: code j from the last pass, then (j < G1 - 1) one pass at position j + 2
    for j in range(G1):
        cl, hl, cols = last
        if fm_greedy:
            code = _greedy_code_T(cl, W, S, hl, j, vh, cols, B)
        elif fm_sample:
            code = _sample_code_T(cl, W, S, hl, j, vh, cols, B, u_row[:, j * B:(j + 1) * B], sampling)
        else:
            logits = _final_logits(cl, W, S, hl, j, vh, cols, B)
            code = _select_code(logits, B, vh, u_sb[:, j:j + 1], sampling)
        code = _guard_code(code, okv, B)
        if writes_codes:
            nisa.dma_copy(dst=codes[:, j:j + 1], src=code)
        emb = _gather_embed(codec_embed, j, code, B, H, V)
        nisa.dma_copy(dst=codec_embeds[:, j, hs], src=emb[:, hs])
        _prefetch_lm_head(S, W, j + 1)
        if j < G1 - 1:
            pos = j + 2
            hT = _rows_to_psum(emb, c, S["ident_emb"]) if res == "accum" else _rows_to_T(emb, c)
            cos_t = _rope_col(rope_cos, D, pos)
            sin_t = _rope_col(rope_sin, D, pos)
            _pass_consts(c, S, cos_t)
            for l in range(L):
                _layer(c, W, S, l, hT, cos_t, sin_t, ("cache", pos), res)
            # off the critical path: issued after the pass, GpSimd fits it into a gap between the layers' norm
            # ops (issued before them it would hold up layer 0's norm in GpSimd's in-order queue)
            nisa.tensor_tensor(dst=acc, data1=acc, data2=emb, op=nl.add, engine=nisa.engine.gpsimd)
            last = (c, hT, None)
        else:
            nisa.tensor_tensor(dst=acc, data1=acc, data2=emb, op=nl.add, engine=nisa.engine.gpsimd)
    sum_out = nl.ndarray((B, H), dtype=codec_embed.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=sum_out, src=acc)
    nisa.dma_copy(dst=codec_sum[:, hs], src=sum_out[:, hs])


# ================================================================ host wrapper


def resident_bytes_per_partition(w: CodePredictorWeights) -> int:
    """SBUF bytes per partition that keeping every layer's matrices resident would take."""
    L, H, I, Hq = w.n_layers, w.hidden, w.intermediate, w.n_q_heads
    item = w.wqkv_t.dtype.itemsize
    nqkv = w.wqkv_t.shape[2]
    return L * item * ((H // _K_TILE) * nqkv + Hq * H + (H // _K_TILE) * 2 * I + (I // _K_TILE) * H)


def _activation_bytes_per_partition(w: CodePredictorWeights, rows: int, sample: bool) -> int:
    """SBUF bytes per partition of everything but resident weights: calibrated on the emulator's measured
    peaks at the real sizes (fixed tiles ~20 KB, logits/sampling rows, per-row feature-major tiles). Greedy
    decoding with Vh % 128 == 0 keeps its logits feature-major (in the per-row term), not as [rows, Vh] rows."""
    row_logits = (sample and not _fm_sampling_ok(w.head_vocab, rows)) or w.head_vocab % _K_TILE != 0
    tiles = (_SAMPLING_LOGIT_TILES if sample else 1) if row_logits else 0
    qk_consts = 4 * w.n_layers * (2 * w.head_dim + 2 * (w.n_q_heads + w.n_kv_heads))   # rotw, wqk, wcos
    return _FIXED_SBUF_BYTES + int(4 * w.head_vocab * tiles) + _BYTES_PER_ROW * rows + qk_consts


def _exp_is_safe(w: CodePredictorWeights) -> bool:
    """Can the cached steps' softmax skip the max subtraction? After the q/k RMSNorms |q_h| <= max|w_q| (with
    q's 1/sqrt(D)) and |k_h| <= sqrt(D) max|w_k| (rotation keeps norms), so |score| <= sqrt(D) max|w_q| max|w_k|;
    below _EXP_SAFE_BOUND exp neither overflows nor underflows in fp32/bf16 (e^+-60 ~ 1e+-26)."""
    qn = float(np.max(np.abs(np.asarray(w.q_norm, np.float32))))
    kn = float(np.max(np.abs(np.asarray(w.k_norm, np.float32))))
    return bool(np.isfinite(qn * kn)) and math.sqrt(w.head_dim) * qn * kn <= _EXP_SAFE_BOUND


def lm_ring_bytes_per_partition(w: CodePredictorWeights) -> int:
    """SBUF bytes per partition of the LM-head ring (one step's head [128, H / 128, Vh])."""
    return (w.hidden // _K_TILE) * w.head_vocab * w.lm_head_t.dtype.itemsize


def _sbuf_plan(w: CodePredictorWeights, rows: int, sample: bool, resident):
    """(resident, lm_ring): keep the layer weights in SBUF when they fit, then the LM-head ring when it fits
    in what is left (it replaces the streamed LM-head block counted in the fixed bytes)."""
    budget = SBUF_BYTES_PER_PARTITION["trn2"] - _SBUF_HEADROOM - _activation_bytes_per_partition(w, rows, sample)
    if resident is None:
        resident = resident_bytes_per_partition(w) <= budget
    free = budget - (resident_bytes_per_partition(w) if resident else 0) + _LM_BLOCK_BYTES
    return bool(resident), lm_ring_bytes_per_partition(w) <= free


def _is_number(x) -> bool:
    """A real number (Python or NumPy), not a bool or a string."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _dtype_name(x) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


_PROMPT_DTYPES = ("float32", "bfloat16", "float16")


def _prompt_array(x, arg, name):
    """past_hidden / code0_embed as the kernel takes them: a NumPy array or torch CPU tensor of a float dtype;
    float64 is cast to float32 (the kernel computes in bf16 with fp32 accumulation: no precision it could use
    is lost). Anything else (lists, integer dtypes) is refused naming the argument."""
    kernel_check(hasattr(x, "shape") and hasattr(x, "dtype"),
                 f"{name}: {arg} must be a NumPy array or torch tensor [B, H], got {arg}={type(x).__name__}")
    dt = _dtype_name(x)
    if dt == "float64":
        return x.float() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    kernel_check(dt in _PROMPT_DTYPES, f"{name}: {arg} must be float32, bfloat16, float16 or float64 (cast to "
                 f"float32), got {arg}.dtype={dt}")
    return x


def check_sampling(uniforms, do_sample, temperature, top_k, top_p, B, G1, vh, name, read_values=True):
    """The decoding arguments: types first (temperature='1' is an error, not a TypeError deep inside), then
    ranges. Returns the uniforms as a float32 array or tensor [B, G1] (zeros when None and greedy).
    read_values=False leaves the uniforms' range to `check_uniform_values` (torch_ops' fake has no values)."""
    kernel_check(isinstance(do_sample, (bool, np.bool_)),
                 f"{name}: do_sample must be a bool, got do_sample={do_sample!r}")
    for arg, v in (("temperature", temperature), ("top_p", top_p)):
        kernel_check(_is_number(v) and math.isfinite(float(v)),
                     f"{name}: {arg} must be a finite real number, got {arg}={v!r}")
    kernel_check(isinstance(top_k, (int, np.integer)) and not isinstance(top_k, (bool, np.bool_)),
                 f"{name}: top_k must be an int, got top_k={top_k!r}")
    if uniforms is not None:
        kernel_check(hasattr(uniforms, "shape") and hasattr(uniforms, "dtype"),
                     f"{name}: uniforms must be a NumPy array or torch tensor [B, G1], got "
                     f"uniforms={type(uniforms).__name__}")
        kernel_check(tuple(uniforms.shape) == (B, G1),
                     f"{name}: uniforms must be [B, G1] = {(B, G1)}, got {tuple(uniforms.shape)}")
        kernel_check(_dtype_name(uniforms) in ("float32", "float64", "bfloat16", "float16"),
                     f"{name}: uniforms must be a float array, got uniforms.dtype={_dtype_name(uniforms)}")
        uniforms = uniforms.detach().float() if hasattr(uniforms, "detach") else np.asarray(uniforms, np.float32)
    if do_sample:
        kernel_check(uniforms is not None, f"{name}: do_sample=True needs uniforms [B, G1], got uniforms=None")
        kernel_check(temperature > 0, f"{name}: temperature must be > 0, got temperature={temperature}")
        kernel_check(temperature >= MIN_TEMPERATURE,
                     f"{name}: temperature must be >= {MIN_TEMPERATURE:g} (logits are scaled by 1 / temperature in "
                     f"fp32; smaller values overflow it), got temperature={temperature}")
        kernel_check(1 <= top_k and effective_top_k(True, top_k, vh) <= _MAX_TOP_K,
                     f"{name}: top_k must be an int in [1, {_MAX_TOP_K}] (a top_k above the LM-head vocab Vh={vh} "
                     f"is clamped to Vh, as transformers does), got top_k={top_k}")
        kernel_check(0.0 < top_p <= 1.0, f"{name}: top_p must be in (0, 1], got top_p={top_p}")
        if read_values:
            check_uniform_values(name, uniforms)
    if uniforms is None:
        uniforms = np.zeros((B, G1), dtype=np.float32)
    return uniforms


def check_uniform_values(name, uniforms):
    """Sampling's uniforms (float32, as `check_sampling` returns them) lie in [0, 1) (host values)."""
    u = np.asarray(uniforms if not hasattr(uniforms, "detach") else uniforms.numpy())
    kernel_check(bool(np.all((u >= 0.0) & (u < 1.0))),
                 f"{name}: uniforms must lie in [0, 1), got min={float(np.min(u))}, max={float(np.max(u))}")


def effective_top_k(do_sample, top_k, vh) -> int:
    """The top_k the kernel traces: min(top_k, Vh) when sampling, as transformers' TopKLogitsWarper clamps it
    (`top_k = min(self.top_k, scores.size(-1))`, src/transformers/generation/logits_process.py), so the default
    top_k=50 keeps every code of a smaller vocabulary; 1 when greedy (unused)."""
    return min(int(top_k), int(vh)) if do_sample else 1


def sampling_consts(do_sample, temperature, top_k, top_p, vh) -> dict:
    """The kernel's trace-time decoding options from checked arguments (`check_sampling`); vh is the full LM-head
    vocabulary (every vocab shard's rows)."""
    return dict(do_sample=bool(do_sample), inv_temperature=float(1.0 / temperature) if do_sample else 1.0,
                top_k=effective_top_k(do_sample, top_k, vh), top_p=float(top_p))


def check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample, temperature, top_k, top_p, name,
                 head_vocab=None, read_values=True):
    """Validate every argument before any emulator work. Returns (past_hidden, code0_embed, uniforms) as the
    kernel takes them (float64 prompts cast to float32; uniforms float32, zeros when greedy without them)."""
    kernel_check(isinstance(weights, CodePredictorWeights),
                 f"{name}: weights must be a CodePredictorWeights (build it with weights_from_transformers("
                 f"talker.code_predictor)), got weights={type(weights).__name__}")
    w = weights
    past_hidden = _prompt_array(past_hidden, "past_hidden", name)
    code0_embed = _prompt_array(code0_embed, "code0_embed", name)
    kernel_check(past_hidden.ndim == 2 and code0_embed.ndim == 2,
                 f"{name}: past_hidden and code0_embed must be [B, H], got past_hidden.shape="
                 f"{tuple(past_hidden.shape)}, code0_embed.shape={tuple(code0_embed.shape)}")
    for arg in ("wqkv_t", "wo_t", "wgu_t", "wd_t", "lm_head_t", "codec_embed"):
        dt = str(getattr(w, arg).dtype).replace("torch.", "")
        kernel_check(dt == "bfloat16", f"{name}: weights.{arg} must be bfloat16 (the kernel's matmuls pair bf16 "
                     f"weights with bf16 activations; pack with dtype='bfloat16'), got dtype={dt}")
    B, H = past_hidden.shape
    kernel_check(tuple(code0_embed.shape) == (B, H),
                 f"{name}: code0_embed must match past_hidden [B, H]={B, H}, got {tuple(code0_embed.shape)}")
    kernel_check(1 <= B <= P_MAX, f"{name}: batch B must be in [1, {P_MAX}], got B={B}")
    kernel_check(H == w.hidden, f"{name}: hidden size of past_hidden must equal the weights' H={w.hidden}, got H={H}")
    kernel_check(H % _K_TILE == 0, f"{name}: hidden H must be a multiple of {_K_TILE}, got H={H}")
    kernel_check(w.intermediate % _K_TILE == 0 and w.intermediate > 0,
                 f"{name}: intermediate I must be a positive multiple of {_K_TILE}, got I={w.intermediate}")
    kernel_check(_is_number(w.eps) and MIN_EPS <= float(w.eps) <= 1.0,
                 f"{name}: weights.eps (RMSNorm epsilon) must be in [{MIN_EPS}, 1], got eps={w.eps!r}")
    D = w.head_dim
    kernel_check(2 <= D <= P_MAX and D % 2 == 0, f"{name}: head_dim D must be even and <= {P_MAX}, got D={D}")
    kernel_check(w.n_kv_heads >= 1 and w.n_q_heads % w.n_kv_heads == 0,
                 f"{name}: n_q_heads must be a multiple of n_kv_heads, got {w.n_q_heads}/{w.n_kv_heads}")
    r = w.n_q_heads // w.n_kv_heads
    G = w.n_groups + 1
    kernel_check(w.n_groups >= 1 and G <= P_MAX and r <= P_MAX,
                 f"{name}: need 1 <= G1 and G1 + 1 <= {P_MAX} positions, got G1={w.n_groups}")
    kernel_check(_MAX8 <= w.head_vocab <= _MAX8_FMAX,
                 f"{name}: LM-head vocab must be in [{_MAX8}, {_MAX8_FMAX}] (max8), got Vh={w.head_vocab}")
    kernel_check(w.head_vocab <= w.vocab, f"{name}: LM-head vocab {w.head_vocab} exceeds the embedding vocab {w.vocab}")
    kernel_check(w.lm_head_t.shape[:2] == (w.n_groups, H),
                 f"{name}: lm_head_t must be [G1, H, Vh] with G1={w.n_groups}, got {w.lm_head_t.shape}")
    kernel_check(w.rope_cos.shape[0] >= G and w.rope_cos.shape[1] == D,
                 f"{name}: rope tables must be [>= G1 + 1, D] = [{G}, {D}], got {w.rope_cos.shape}")
    uniforms = check_sampling(uniforms, do_sample, temperature, top_k, top_p, B, w.n_groups,
                              head_vocab or w.head_vocab, name, read_values)
    return past_hidden, code0_embed, uniforms


def _weights_args(w: CodePredictorWeights):
    return [getattr(w, n) for n in _W_NAMES]


LNC_SPLITS = ("rows", "heads")
_CORE_SPLIT_CACHE: dict = {}


def _core_weights(w: CodePredictorWeights):
    """`core_split_weights(w)`, prepared once per weights object (kept while w lives)."""
    key = id(w)
    hit = _CORE_SPLIT_CACHE.get(key)
    if hit is None or hit[0]() is not w:
        import weakref
        hit = (weakref.ref(w), core_split_weights(w))
        _CORE_SPLIT_CACHE[key] = hit
        weakref.finalize(w, _CORE_SPLIT_CACHE.pop, key, None)
    return hit[1]


def _launch_split(w: CodePredictorWeights, B: int, lnc: int, sample: bool, resident, lnc_split, name):
    """`_launch_plan`'s choice and its checks, from shapes and options only (torch_ops' fake runs it too):
    (core_split, resident, lm_ring) of the rows split."""
    kernel_check(lnc_split is None or lnc_split in LNC_SPLITS,
                 f"{name}: lnc_split must be None, 'rows' or 'heads', got lnc_split={lnc_split!r}")
    res_rows, ring_rows = _sbuf_plan(w, -(-B // lnc), sample, resident)
    problem = core_split_problem(w)
    if lnc_split == "heads":
        kernel_check(lnc == 2, f"{name}: lnc_split='heads' splits each row between the two cores of LNC=2, got "
                     f"lnc={lnc}")
        kernel_check(problem is None, f"{name}: lnc_split='heads' needs weights that halve: {problem}")
    split = lnc == 2 and (lnc_split == "heads" or (lnc_split is None and problem is None and not res_rows))
    return split, res_rows, ring_rows


def _launch_plan(w: CodePredictorWeights, B: int, lnc: int, sample: bool, resident, lnc_split, name):
    """How an LNC launch shares the work (a trace-time choice from shapes only), and what it is given:
    (core_split, weight args, per-core q / KV heads, resident, lm_ring).

    "rows": the batch rows are split between the cores (each streams or holds all of the rank's matrices).
    "heads": each row's work is split (`core_split_weights`: half the heads, intermediate columns and LM-head
    rows per core), exchanging partial sums through shared HBM. Default (lnc_split=None), from the cost model
    (docs/code_predictor.md, "LNC=2: which split"): "heads" when the matrices do not stay resident in SBUF (the
    frame then streams them from HBM every pass and halving each core's stream outweighs the ~175 exchanges),
    "rows" when they are resident (the frame is a latency-bound chain and each exchange adds to it)."""
    split, res_rows, ring_rows = _launch_split(w, B, lnc, sample, resident, lnc_split, name)
    if not split:
        return False, _weights_args(w), w.n_q_heads, w.n_kv_heads, res_rows, ring_rows
    cw, stacked = _core_weights(w)
    res, ring = _sbuf_plan(cw, B, sample, resident)
    args = [stacked[n] if n in CORE_SPLIT_NAMES else getattr(w, n) for n in _W_NAMES]
    return True, args, cw.n_q_heads, cw.n_kv_heads, res, ring


def code_predictor(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None, do_sample=False,
                   temperature=1.0, top_k=50, top_p=1.0, return_sum=False, return_bad_rows=False, resident=None,
                   lnc=None, lnc_split=None):
    """Qwen3-Omni code predictor for one talker frame: the G1 residual codes and their embeddings.

    Args:
        past_hidden: [B, H] talker last-layer hidden of the last token (NumPy or torch CPU; fp32/bf16/fp16;
            float64 is cast to float32).
        code0_embed: [B, H] talker codec embedding of code 0.
        weights: CodePredictorWeights (weights.py; build with `weights_from_transformers(talker.code_predictor)`).
        uniforms: [B, G1] fp32 in [0, 1): one uniform draw per (row, step); needed when do_sample.
        do_sample / temperature / top_k / top_p: greedy when do_sample is False (do_sample a bool, temperature
            and top_p real numbers, top_k an int).
        return_sum: also return codec_sum [B, H] = code0_embed + sum_j codec_embeds[:, j] (what the talker adds
            to its next input embedding, before the trailing text hidden).
        return_bad_rows: also return bad_rows [B] int32 (see "Bad rows").
        resident: keep every layer's weights in SBUF for the whole frame (default: when they fit).
        lnc: logical NeuronCore degree, 1 or 2 (default: `nki_kernels.lnc.resolve_lnc`: NEURON_LOGICAL_NC_CONFIG,
            else the target's default, 2 on trn2).
        lnc_split: how LNC=2 shares the work: "rows" (the batch rows split between the two cores, ceil(B / 2) on
            core 0, the rest on core 1, each writing only its rows; B = 1 runs on core 0) or "heads" (every row on
            both cores, each with half of the heads, MLP columns and LM-head vocab, partial sums exchanged through
            shared HBM with nisa.core_barrier; core 0 writes the codes, each core half of the embedding columns).
            None (default): "heads" when the weights are streamed from HBM (not resident) and they halve, else
            "rows" (see `_launch_plan`).
    Returns:
        (codes [B, G1] int32, codec_embeds [B, G1, H]) then codec_sum if return_sum, then bad_rows if
        return_bad_rows. codes[:, j] is residual code j + 1; codec_embeds[:, j] = codec_embedding[j](codes[:, j]),
        i.e. the input embedding of step j + 1 (transformers' `hidden_states[j + 1][0]`) and, for j = G1 - 1, the
        extra embedding the talker appends.
    Bad rows: a row b whose past_hidden[b] or code0_embed[b] holds a NaN, an Inf or a value with
        |x| >= INPUT_ABS_LIMIT (2^40 ~ 1.1e12) gets codes[b] = 0, codec_embeds[b, j] = codec_embedding[j](0),
        codec_sum[b] = sum_j codec_embedding[j](0) (code0_embed[b] counted as zero) and bad_rows[b] = 1. The
        kernel zeroes those values before any arithmetic, so the other rows' results are exactly what they are
        without the bad row; the embedding gather's index is clamped in-kernel to [0, Vh - 1] whatever the data.
    Constraints:
        1 <= B <= 128, H and I multiples of 128, D even <= 128, Hq % Hkv == 0, G1 + 1 <= 128,
        8 <= Vh <= 16384; sampling: temperature >= MIN_TEMPERATURE (1e-30), 1 <= min(top_k, Vh) <= 256 (a
        top_k above Vh is clamped to Vh, as transformers' TopKLogitsWarper does),
        0 < top_p <= 1.
    Decoding (per row b, step j, on fp32 logits l[v] = final_norm(h) @ lm_head[j]):
        greedy: the smallest v with l[v] == max(l) (first index wins ties).
        sampling: z = l * (1 / temperature) (fp32).
          1. Candidates by rounds of 8: round r takes the 8 largest remaining values (descending, with
             repeats); then every remaining value >= the round's 8th value is removed. c_1 >= ... >= c_k are
             the first k = top_k values of the concatenated rounds (values of removed-but-unlisted repeats are
             dropped; with distinct logits this is exactly the top-k).
          2. q_i = exp(c_i - c_1) / sum_{i' <= k} exp(c_i' - c_1); P_i = q_1 + ... + q_i; E_i = P_i - q_i.
          3. keep_i = E_i < top_p (a prefix, i = 1 always kept); n = #kept; M = P_n.
          4. i* = min(#{kept i : P_i <= u * M}, n - 1) (0-based), u = uniforms[b, j].
          5. code = the smallest v with z[v] == c_{i*}.
    """
    name = "code_predictor"
    past_hidden, code0_embed, uniforms, lnc = check_code_predictor(
        past_hidden, code0_embed, weights, uniforms=uniforms, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, return_sum=return_sum, return_bad_rows=return_bad_rows, resident=resident, lnc=lnc,
        lnc_split=lnc_split)
    if do_sample:
        check_uniform_values(name, uniforms)
    w = weights
    B = past_hidden.shape[0]
    split, wargs, nq, nkv, resident, lm_ring = _launch_plan(w, B, lnc, bool(do_sample), resident, lnc_split, name)
    exp_safe = _exp_is_safe(w)
    out = call(code_predictor_kernel, past_hidden, code0_embed, uniforms, *wargs,
               n_q_heads=nq, n_kv_heads=nkv, eps=float(w.eps), resident=bool(resident),
               **sampling_consts(do_sample, temperature, top_k, top_p, w.head_vocab), lm_ring=lm_ring,
               exp_safe=exp_safe, core_split=split, tile_bias=current_target_name() in TILE_ACTIVATION_BIAS_TARGETS,
               lnc=lnc)
    codes, embeds, csum, bad = out
    res = [codes, embeds] + ([csum] if return_sum else []) + ([bad.reshape(-1)] if return_bad_rows else [])
    return tuple(res)


def check_code_predictor(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None, do_sample=False,
                         temperature=1.0, top_k=50, top_p=1.0, return_sum=False, return_bad_rows=False,
                         resident=None, lnc=None, lnc_split=None):
    """`code_predictor`'s checks that read no tensor values (shapes, dtypes, options, the launch plan's fit), so
    that torch_ops' fake runs them at trace time; the uniforms' range is checked by the wrapper. Returns
    (past_hidden, code0_embed, uniforms) as the kernel takes them and the resolved lnc."""
    name = "code_predictor"
    past_hidden, code0_embed, uniforms = check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample,
                                                      temperature, top_k, top_p, name, read_values=False)
    for arg, v in (("return_sum", return_sum), ("return_bad_rows", return_bad_rows)):
        kernel_check(isinstance(v, (bool, np.bool_)), f"{name}: {arg} must be a bool, got {arg}={v!r}")
    kernel_check(resident is None or isinstance(resident, (bool, np.bool_)),
                 f"{name}: resident must be None or a bool, got resident={resident!r}")
    kernel_check(weights.tp == 1, f"{name}: weights are rank {weights.rank} of a TP={weights.tp} split "
                 "(shard_weights); run every rank with code_predictor_tp(past_hidden, code0_embed, shards), "
                 f"got weights.tp={weights.tp}")
    lnc = resolve_lnc(lnc, name)
    _launch_split(weights, past_hidden.shape[0], lnc, bool(do_sample), resident, lnc_split, name)
    return past_hidden, code0_embed, uniforms, lnc


# ================================================================ tensor parallelism: one launch per rank


def default_replica_group(tp: int):
    """All tp ranks in one rank-list: `nki.collectives.ReplicaGroup([[0, ..., tp - 1]])`."""
    return nki.collectives.ReplicaGroup([list(range(tp))])


def check_shards(shards, replica_group, name):
    """The per-rank weights of a TP launch: rank r's `shard_weights(w, tp, r)` for r = 0..tp-1, all of one split
    (same tp, vocab sharding and shapes), and a replica group whose one rank-list holds exactly ranks 0..tp-1.
    Returns (tp, replica_group)."""
    kernel_check(isinstance(shards, (list, tuple)) and len(shards) >= 1 and
                 all(isinstance(w, CodePredictorWeights) for w in shards),
                 f"{name}: shards must be a list of CodePredictorWeights, one per rank (shard_weights(w, tp, r) for "
                 f"r in range(tp)), got shards={type(shards).__name__}")
    tp = len(shards)
    for r, w in enumerate(shards):
        kernel_check(w.tp == tp, f"{name}: shards[{r}] is sharded for TP={w.tp} but {tp} shards were given "
                     f"(shard_weights(w, tp={tp}, rank={r})), got shards[{r}].tp={w.tp}")
        kernel_check(w.rank == r, f"{name}: shards[{r}] must be rank {r}'s weights, got shards[{r}].rank={w.rank}")
        kernel_check(w.vocab_sharded == shards[0].vocab_sharded,
                     f"{name}: shards[{r}].vocab_sharded={w.vocab_sharded} differs from shards[0]'s")
        for f in _W_NAMES:
            a, b = getattr(w, f), getattr(shards[0], f)
            kernel_check(tuple(a.shape) == tuple(b.shape) and str(a.dtype) == str(b.dtype),
                         f"{name}: shards[{r}].{f} is {tuple(a.shape)} {a.dtype} but shards[0].{f} is "
                         f"{tuple(b.shape)} {b.dtype}; every rank's shard must have the same shapes")
        kernel_check((w.n_q_heads, w.n_kv_heads, float(w.eps)) ==
                     (shards[0].n_q_heads, shards[0].n_kv_heads, float(shards[0].eps)),
                     f"{name}: shards[{r}] heads/eps differ from shards[0]'s")
    if shards[0].vocab_sharded:
        vh = shards[0].head_vocab * tp
        kernel_check(vh <= shards[0].vocab, f"{name}: the LM heads' vocab {vh} (tp x {shards[0].head_vocab}) exceeds "
                     f"the embedding vocab {shards[0].vocab}")
    if replica_group is None:
        replica_group = default_replica_group(tp)
    if isinstance(replica_group, (list, tuple)):
        kernel_check(all(isinstance(g, (list, tuple)) for g in replica_group),
                     f"{name}: replica_group as a list must hold rank lists, e.g. [[0, 1, ..., {tp - 1}]] (a "
                     f"nki.collectives.ReplicaGroup's rank_lists), got replica_group={replica_group!r}")
        replica_group = nki.collectives.ReplicaGroup([list(g) for g in replica_group])
    lists = getattr(replica_group, "rank_lists", None)
    kernel_check(lists is not None and len(lists) == 1 and sorted(int(x) for x in lists[0]) == list(range(tp)),
                 f"{name}: replica_group must be a nki.collectives.ReplicaGroup with one rank-list holding exactly "
                 f"ranks 0..{tp - 1} (the {tp} shards), got replica_group={replica_group!r}")
    return tp, replica_group


def code_predictor_tp(past_hidden, code0_embed, shards, *, replica_group=None, uniforms=None, do_sample=False,
                      temperature=1.0, top_k=50, top_p=1.0, return_sum=False, return_bad_rows=False, resident=None,
                      lnc=None, return_ranks=False, lnc_split=None):
    """`code_predictor` at tensor-parallel degree TP = len(shards): one launch per rank, collectives in-kernel.

    Args:
        shards: [shard_weights(w, tp, r) for r in range(tp)]: rank r holds q/k/v heads and gate/up columns
            (column-parallel) and the matching o_proj / down_proj rows (row-parallel); LM heads replicated.
        replica_group: the ranks' `nki.collectives.ReplicaGroup` (default: one rank-list [0, ..., tp - 1]).
        return_ranks: return the list of every rank's outputs instead of rank 0's.
        lnc_split: as `code_predictor` ("heads": each rank's shard halved again between its two cores).
        Everything else as `code_predictor` (prompt and uniforms are the same on every rank).
    Each rank runs `code_predictor_kernel` on its shard; after each o_proj and each down_proj the rank's partial
    sum [H, rows] fp32 is all-reduced in SBUF (`nki.collectives.all_reduce`, 2 per layer and pass), so every
    rank holds the full residual stream and computes the same logits, codes and embeddings (equal to TP=1 up to
    the order of fp32 additions). On a Trainium host each rank's process launches that kernel itself with
    `replica_group=`; here the emulator runs the ranks together (`emulator.collectives.run_ranks`).
    """
    name = "code_predictor_tp"
    tp, replica_group = check_shards(shards, replica_group, name)
    w0 = shards[0]
    vocab_shards = tp if w0.vocab_sharded else 1
    past_hidden, code0_embed, uniforms = check_inputs(past_hidden, code0_embed, w0, uniforms, do_sample,
                                                      temperature, top_k, top_p, name,
                                                      head_vocab=w0.head_vocab * vocab_shards)
    for arg, v in (("return_sum", return_sum), ("return_bad_rows", return_bad_rows), ("return_ranks", return_ranks)):
        kernel_check(isinstance(v, (bool, np.bool_)), f"{name}: {arg} must be a bool, got {arg}={v!r}")
    kernel_check(resident is None or isinstance(resident, (bool, np.bool_)),
                 f"{name}: resident must be None or a bool, got resident={resident!r}")
    lnc = resolve_lnc(lnc, name)
    B = past_hidden.shape[0]
    plans = [_launch_plan(w, B, lnc, bool(do_sample), resident, lnc_split, name) for w in shards]
    split, _, nq, nkv, resident, lm_ring = plans[0]
    consts = dict(n_q_heads=nq, n_kv_heads=nkv, eps=float(w0.eps), resident=bool(resident),
                  **sampling_consts(do_sample, temperature, top_k, top_p, w0.head_vocab * vocab_shards),
                  lm_ring=lm_ring,
                  exp_safe=all(_exp_is_safe(w) for w in shards), replica_group=replica_group, tp_degree=tp,
                  vocab_shards=vocab_shards, core_split=split,
                  tile_bias=current_target_name() in TILE_ACTIVATION_BIAS_TARGETS)
    outs = call_ranks(code_predictor_kernel, [(past_hidden, code0_embed, uniforms, *plan[1]) for plan in plans],
                      lnc=lnc, **consts)
    per_rank = []
    for codes, embeds, csum, bad in outs:
        res = [codes, embeds] + ([csum] if return_sum else []) + ([bad.reshape(-1)] if return_bad_rows else [])
        per_rank.append(tuple(res))
    return per_rank if return_ranks else per_rank[0]


def code_predictor_rank(past_hidden, code0_embed, shard, *, replica_group, uniforms=None, do_sample=False,
                        temperature=1.0, top_k=50, top_p=1.0, return_sum=False, return_bad_rows=False, resident=None,
                        lnc=None, lnc_split=None):
    """One rank's launch of a TP code predictor, for a serving framework where every rank is its own process
    (e.g. NxDI at tp_degree > 1): `shard` is this rank's `shard_weights(w, tp, rank)`, `replica_group` the
    talker's TP group as a `nki.collectives.ReplicaGroup`. All ranks must call it with the same prompt, uniforms
    and arguments; each returns the same outputs as `code_predictor_tp`. The emulator cannot run one rank alone
    (its collectives wait for the others): there use `code_predictor_tp` with every rank's shard."""
    name = "code_predictor_rank"
    kernel_check(isinstance(shard, CodePredictorWeights) and shard.tp > 1,
                 f"{name}: shard must be one rank's CodePredictorWeights from shard_weights(w, tp, rank) with "
                 f"tp > 1, got {type(shard).__name__}" + (f" with tp={shard.tp}" if hasattr(shard, "tp") else ""))
    kernel_check(replica_group is not None, f"{name}: replica_group is required, got replica_group=None")
    lists = getattr(replica_group, "rank_lists", None)
    if lists is not None:
        mine = [g for g in lists if shard.rank in g]
        kernel_check(len(mine) == 1 and len(mine[0]) == shard.tp,
                     f"{name}: replica_group must hold rank {shard.rank} in a rank-list of {shard.tp} ranks "
                     f"(the shard's TP), got replica_group={replica_group!r}")
    vocab_shards = shard.tp if shard.vocab_sharded else 1
    past_hidden, code0_embed, uniforms = check_inputs(past_hidden, code0_embed, shard, uniforms, do_sample,
                                                      temperature, top_k, top_p, name,
                                                      head_vocab=shard.head_vocab * vocab_shards)
    kernel_check(not is_emulated(), f"{name}: the emulator runs all ranks of a TP launch together; use "
                 "code_predictor_tp(past_hidden, code0_embed, shards) with every rank's shard")
    lnc = resolve_lnc(lnc, name)  # pragma: no cover - needs real NKI from here on
    B = past_hidden.shape[0]
    split, wargs, nq, nkv, resident, lm_ring = _launch_plan(shard, B, lnc, bool(do_sample), resident, lnc_split,
                                                            name)
    out = call(code_predictor_kernel, past_hidden, code0_embed, uniforms, *wargs,
               n_q_heads=nq, n_kv_heads=nkv, eps=float(shard.eps), resident=bool(resident), core_split=split,
               **sampling_consts(do_sample, temperature, top_k, top_p, shard.head_vocab * vocab_shards),
               lm_ring=lm_ring,
               exp_safe=_exp_is_safe(shard), replica_group=replica_group, tp_degree=shard.tp,
               vocab_shards=vocab_shards, tile_bias=current_target_name() in TILE_ACTIVATION_BIAS_TARGETS, lnc=lnc)
    codes, embeds, csum, bad = out
    return tuple([codes, embeds] + ([csum] if return_sum else []) + ([bad.reshape(-1)] if return_bad_rows else []))
