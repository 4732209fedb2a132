"""Unrolled code predictor of the Qwen3-Omni talker: all residual-code steps x all layers in ONE launch.

Per talker frame, transformers runs `code_predictor.generate(inputs_embeds=[past_hidden, code0_embed],
max_new_tokens=G1)`: a 2-position prefill, then G1 - 1 single-token steps, each step j with its own LM head
and (for its input) its own codec embedding table. This kernel runs the whole loop on one NeuronCore: a KV
cache in SBUF (no recomputation of earlier positions), on-device argmax or sampling, the next step's input
embedding gathered by a dynamic DMA from the sampled code, and the per-step embeddings (and their sum, which
the talker adds to its next input) written out.

Layout: token rows (batch) on partitions for the residual stream, norms, RoPE, MLP activations and logits;
feature-major (transposed by TensorE) copies feed the matmuls as the stationary operand and the weights
stream through as the moving operand ([in, out] layout, see weights.py). Attention: q/k/v of each KV group
are transposed to [D, rows]; K^T and V^T are cached per (layer, KV head) as [D, B, G] in SBUF; scores for a
block of Bb batch rows are one matmul [(b, q-head), (b', t)] with a block-diagonal (b == b') mask.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import call, nisa, nki, nl
from ..hw import (GEMM_MOVING_FMAX, NEG_INF, P_MAX, PSUM_BANK_BYTES, SBUF_BYTES_PER_PARTITION)
from ..validation import kernel_check
from .weights import CodePredictorWeights, weights_from_state_dict, weights_from_transformers  # noqa: F401

# ---------------------------------------------------------------- tiling constants
_K_TILE = P_MAX                      # contraction rows per matmul (hidden / intermediate chunks)
_N_TILE = GEMM_MOVING_FMAX           # output columns per matmul = one fp32 PSUM bank
_MAX8 = 8                            # values per nisa.max8 / nc_find_index8 round
_MAX8_FMAX = 16384                   # max8 input elements per partition (vocab limit of the on-device argmax)
_BF16_BYTES = 2
# SBUF bytes per partition kept free for activations, KV cache, logits, streaming buffers when deciding
# whether every layer's weights can stay resident in SBUF for the whole frame.
_SBUF_HEADROOM = 56 * 1024
_MAX_TOP_K = 256                     # sampling: top-k candidates are found in ceil(k / 8) max8 rounds


# ================================================================ small building blocks


def _rms_norm(x_sb, w_sb, eps, n, rows, out_dtype):
    """out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w[r, :]  (w already broadcast over rows)."""
    sq = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    ss = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=sq, op=nl.square, data=x_sb, reduce_op=nl.add, reduce_res=ss,
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    rstd = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / n, bias=eps)
    out = nl.ndarray((rows, n), dtype=out_dtype, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=out, data=x_sb, op0=nl.multiply, operand0=rstd, op1=nl.multiply, operand1=w_sb)
    return out


def _transpose_chunks(x_sb, n_chunks, kp, rows, dtype):
    """x [rows, n_chunks * kp] -> xT [kp, n_chunks, rows] (TensorE transposes, grouped per PSUM bank)."""
    xT = nl.ndarray((kp, n_chunks, rows), dtype=dtype, buffer=nl.sbuf)
    per_bank = max(1, PSUM_BANK_BYTES // (rows * _BF16_BYTES))
    for c0 in range(0, n_chunks, per_bank):
        cn = min(per_bank, n_chunks - c0)
        t_psum = nl.ndarray((kp, cn, rows), dtype=dtype, buffer=nl.psum)
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


def _linear(dst_sb, xT, n_k, kp, w_res, w_hbm, n_out, rows, add, stat_cols=None):
    """dst[rows, n_out] (=|+=) x @ W, with xT [kp, n_k, rows] stationary and W [n_k * kp, n_out] moving.

    stat_cols: optional slice of xT's row axis (e.g. a strided pick of rows) used as the stationary columns.
    """
    for n0 in range(0, n_out, _N_TILE):
        nn = min(_N_TILE, n_out - n0)
        w_blk = _weight_block(w_res, w_hbm, kp, n_k, n0, nn)
        acc_psum = nl.ndarray((rows, _N_TILE), dtype=nl.float32, buffer=nl.psum)
        for k in range(n_k):
            st = xT[:, k, :] if stat_cols is None else xT[:, k, stat_cols]
            nisa.nc_matmul(acc_psum[:, 0:nn], st, w_blk[:, k, :], accumulate=(k > 0))
        if add:
            nisa.tensor_tensor(dst=dst_sb[:, n0:n0 + nn], data1=dst_sb[:, n0:n0 + nn], data2=acc_psum[:, 0:nn],
                               op=nl.add)
        else:
            nisa.tensor_copy(dst=dst_sb[:, n0:n0 + nn], src=acc_psum[:, 0:nn])


def _load_rows_bcast(src_hbm, rows, n, dtype=nl.float32):
    """A [n] HBM vector copied onto `rows` partitions (DMA with partition stride 0)."""
    t = nl.ndarray((rows, n), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src_hbm.ap(pattern=[[0, rows], [1, n]], offset=0))
    return t


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


def _attention_block(qT_blk, kT_blk, vT_blk, mask_blk, out_view, m, n, d, scale):
    """One block: out^T[d, m] = (softmax(q k^T * scale + mask) v)^T; q columns m, keys n (<= 128)."""
    s_psum = nl.ndarray((P_MAX, _N_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(s_psum[0:m, 0:n], qT_blk, kT_blk)
    s_sb = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=s_sb[0:m, :], data=s_psum[0:m, 0:n], op0=nl.multiply, operand0=scale,
                              op1=nl.add, operand1=mask_blk)
    nmax = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=nmax[0:m, :], op=nl.maximum, data=s_sb[0:m, :], axis=1, negate=True)
    p_sb = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    psum_row = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p_sb[0:m, :], op=nl.exp, data=s_sb[0:m, :], bias=nmax[0:m, :], reduce_op=nl.add,
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


# ================================================================ one decoder pass (all layers) over token rows


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


def _qk_norm_rope(c, qkv_sb, qn_sb, kn_sb, cos_sb, sin_sb):
    """q/k per-head RMSNorm (weights q_norm / k_norm) then RoPE; returns bf16 [rows, (Hq + Hkv) * D]."""
    R, NH, D = c.rows, c.NH, c.D
    half = D // 2
    qk = qkv_sb[:, 0:NH * D]
    sq = nl.ndarray((R, NH * D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=sq, data1=qk, data2=qk, op=nl.multiply)
    ss = nl.ndarray((R, NH), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=ss, op=nl.add, data=sq.reshape((R, NH, D)), axis=2)
    rstd = nl.ndarray((R, NH), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / D, bias=c.eps)
    qkn = nl.ndarray((R, NH, D), dtype=nl.float32, buffer=nl.sbuf)
    for h in range(NH):
        nisa.scalar_tensor_tensor(dst=qkn[:, h, :], data=qk[:, h * D:(h + 1) * D], op0=nl.multiply,
                                  operand0=rstd[:, h:h + 1], op1=nl.multiply,
                                  operand1=qn_sb if h < c.Hq else kn_sb)
    # RoPE: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    xc = nl.ndarray((R, NH, D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=xc, data1=qkn, data2=cos_sb, op=nl.multiply)
    xs = nl.ndarray((R, NH, D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=xs[:, :, 0:half], data1=qkn[:, :, half:D], data2=sin_sb[:, :, 0:half], op=nl.multiply)
    nisa.tensor_tensor(dst=xs[:, :, half:D], data1=qkn[:, :, 0:half], data2=sin_sb[:, :, half:D], op=nl.multiply)
    rot = nl.ndarray((R, NH * D), dtype=nl.bfloat16, buffer=nl.sbuf)
    rot3 = rot.reshape((R, NH, D))
    nisa.tensor_tensor(dst=rot3[:, :, 0:half], data1=xc[:, :, 0:half], data2=xs[:, :, 0:half], op=nl.subtract)
    nisa.tensor_tensor(dst=rot3[:, :, half:D], data1=xc[:, :, half:D], data2=xs[:, :, half:D], op=nl.add)
    return rot


def _layer(c, W, S, l, h_sb, cos_sb, sin_sb, attn):
    """One decoder layer on h_sb [rows, H] fp32 (in place). attn = ("cache", pos) or ("self", slots)."""
    R, D, Hq, Hkv, r = c.rows, c.D, c.Hq, c.Hkv, c.r
    # ---- attention
    xn = _rms_norm(h_sb, S["in_norm"][:, l, :], c.eps, c.H, R, nl.bfloat16)
    xT = _transpose_chunks(xn, c.KC, _K_TILE, R, nl.bfloat16)
    qkv = nl.ndarray((R, c.NQKV), dtype=nl.float32, buffer=nl.sbuf)
    _linear(qkv, xT, c.KC, _K_TILE, S["wqkv"][:, l] if S["wqkv"] is not None else None, W["wqkv_t"][l],
            c.NQKV, R, add=False)
    rot = _qk_norm_rope(c, qkv, S["q_norm"][:, l, :], S["k_norm"][:, l, :], cos_sb, sin_sb)
    v_bf = nl.ndarray((R, Hkv * D), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_copy(dst=v_bf, src=qkv[:, c.NH * D:c.NQKV])
    # q^T [D, Hkv, R, r]: column (row, head-in-group)
    qT = nl.ndarray((D, Hkv, R, r), dtype=nl.bfloat16, buffer=nl.sbuf)
    q_psum = nl.ndarray((D, Hq, R), dtype=nl.bfloat16, buffer=nl.psum)
    for hh in range(Hq):
        nisa.nc_transpose(dst=q_psum[:, hh, :], data=rot[:, hh * D:(hh + 1) * D])
    nisa.tensor_copy(dst=qT.permute((0, 1, 3, 2)), src=q_psum.reshape((D, Hkv, r, R)))
    kv_psum = nl.ndarray((D, 2, Hkv, R), dtype=nl.bfloat16, buffer=nl.psum)
    for g in range(Hkv):
        nisa.nc_transpose(dst=kv_psum[:, 0, g, :], data=rot[:, (Hq + g) * D:(Hq + g + 1) * D])
        nisa.nc_transpose(dst=kv_psum[:, 1, g, :], data=v_bf[:, g * D:(g + 1) * D])
    attnT = nl.ndarray((D, Hq, R), dtype=nl.bfloat16, buffer=nl.sbuf)
    mode, arg = attn
    if mode == "cache":
        pos = arg
        n_t = pos + 1
        kT_all, vT_all = S["kT"], S["vT"]
        nisa.tensor_copy(dst=kT_all[:, l, :, :, pos], src=kv_psum[:, 0, :, :])
        nisa.tensor_copy(dst=vT_all[:, l, :, :, pos], src=kv_psum[:, 1, :, :])
        bb = S["bb"]
        for g in range(Hkv):
            for b0 in range(0, R, bb):
                nb = min(bb, R - b0)
                m, n = nb * r, nb * n_t
                _attention_block(qT[:, g, b0:b0 + nb, :], kT_all[:, l, g, b0:b0 + nb, 0:n_t],
                                 vT_all[:, l, g, b0:b0 + nb, 0:n_t], S["mask"][0:m, 0:nb, 0:n_t],
                                 attnT[:, g * r:(g + 1) * r, b0:b0 + nb].permute((0, 2, 1)), m, n, D, c.scale)
    else:
        slots = arg
        kvT = nl.ndarray((D, 2, Hkv, R), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=kvT, src=kv_psum)
        bb = S["bb"]            # batches per block; rows of a block = bb * slots
        for g in range(Hkv):
            for b0 in range(0, R // slots, bb):
                nb = min(bb, R // slots - b0)
                r0, r1 = b0 * slots, (b0 + nb) * slots
                m, n = (r1 - r0) * r, r1 - r0
                _attention_block(qT[:, g, r0:r1, :], kvT[:, 0, g, r0:r1], kvT[:, 1, g, r0:r1],
                                 S["mask"][0:m, 0:nb, :],
                                 attnT[:, g * r:(g + 1) * r, r0:r1].permute((0, 2, 1)), m, n, D, c.scale)
    _linear(h_sb, attnT, Hq, D, S["wo"][:, l] if S["wo"] is not None else None, W["wo_t"][l], c.H, R, add=True)
    # ---- MLP
    xn2 = _rms_norm(h_sb, S["post_norm"][:, l, :], c.eps, c.H, R, nl.bfloat16)
    x2T = _transpose_chunks(xn2, c.KC, _K_TILE, R, nl.bfloat16)
    gu = nl.ndarray((R, 2 * c.I), dtype=nl.float32, buffer=nl.sbuf)
    _linear(gu, x2T, c.KC, _K_TILE, S["wgu"][:, l] if S["wgu"] is not None else None, W["wgu_t"][l],
            2 * c.I, R, add=False)
    sg = nl.ndarray((R, c.I), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=sg, op=nl.silu, data=gu[:, 0:c.I])
    act = nl.ndarray((R, c.I), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=act, data1=sg, data2=gu[:, c.I:2 * c.I], op=nl.multiply)
    actT = _transpose_chunks(act, c.IC, _K_TILE, R, nl.bfloat16)
    _linear(h_sb, actT, c.IC, _K_TILE, S["wd"][:, l] if S["wd"] is not None else None, W["wd_t"][l], c.H, R,
            add=True)


def _rope_rows(c, rope_hbm, pattern_rows):
    """cos or sin for every row and head: [rows, NH, D] fp32, from an HBM table by a broadcasting DMA."""
    t = nl.ndarray((c.rows, c.NH, c.D), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=rope_hbm.ap(pattern=pattern_rows + [[0, c.NH], [1, c.D]], offset=0))
    return t


def _setup(c, W, resident, with_cache, attn_bb, mask_args):
    """SBUF state shared by all passes: broadcast norms, optional resident weights, KV cache, mask."""
    R, L, D, H = c.rows, c.L, c.D, c.H
    S = {}
    for key, src, n in (("in_norm", W["input_norm"], H), ("post_norm", W["post_norm"], H),
                        ("q_norm", W["q_norm"], D), ("k_norm", W["k_norm"], D)):
        t = nl.ndarray((R, L, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=src.ap(pattern=[[0, R], [n, L], [1, n]], offset=0))
        S[key] = t
    S["final_norm"] = _load_rows_bcast(W["final_norm"], R, H)
    S["wqkv"] = S["wo"] = S["wgu"] = S["wd"] = None
    if resident:
        for key, src, kp, n_k, n_out in (("wqkv", W["wqkv_t"], _K_TILE, c.KC, c.NQKV),
                                         ("wo", W["wo_t"], D, c.Hq, H),
                                         ("wgu", W["wgu_t"], _K_TILE, c.KC, 2 * c.I),
                                         ("wd", W["wd_t"], _K_TILE, c.IC, H)):
            t = nl.ndarray((kp, L, n_k, n_out), dtype=src.dtype, buffer=nl.sbuf)
            for l in range(L):
                for n0 in range(0, n_out, 4 * _N_TILE):      # ~1-4 MB per DMA: several queues in flight
                    nn = min(4 * _N_TILE, n_out - n0)
                    nisa.dma_copy(dst=t[:, l, :, n0:n0 + nn],
                                  src=src[l].reshape((n_k, kp, n_out)).permute((1, 0, 2))[:, :, n0:n0 + nn])
            S[key] = t
    if with_cache:
        S["kT"] = nl.ndarray((D, L, c.Hkv, R, c.G), dtype=nl.bfloat16, buffer=nl.sbuf)
        S["vT"] = nl.ndarray((D, L, c.Hkv, R, c.G), dtype=nl.bfloat16, buffer=nl.sbuf)
    S["bb"] = attn_bb
    S["mask"] = _block_mask(*mask_args)
    return S


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
        vals8 = nl.ndarray((rows, _MAX8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=vals8, value=0.0)
        nisa.tensor_scalar(dst=vals8, data=vals8, op0=nl.add, operand0=val)
        nisa.nc_find_index8(dst=idx8, data=z, vals=vals8)
    code = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=code, src=idx8[:, 0:1])
    return code


def _gather_embed(codec_embed, j, code, rows, H, V):
    """emb[r, :] = codec_embed[j, code[r], :] by one indirect DMA (vector_offset on the vocab dim)."""
    emb = nl.ndarray((rows, H), dtype=codec_embed.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=emb, src=codec_embed.ap(pattern=[[V * H, 1], [H, rows], [1, H]], offset=j * V * H,
                                              vector_offset=code, indirect_dim=1))
    return emb


def _final_logits(c, W, S, h_sb, j, vh, stat_cols, n_rows):
    """logits [n_rows, vh] fp32 = final_norm(h) @ lm_head[j] for the selected rows."""
    hf = _rms_norm(h_sb, S["final_norm"], c.eps, c.H, c.rows, nl.bfloat16)
    hfT = _transpose_chunks(hf, c.KC, _K_TILE, c.rows, nl.bfloat16)
    logits = nl.ndarray((n_rows, vh), dtype=nl.float32, buffer=nl.sbuf)
    _linear(logits, hfT, c.KC, _K_TILE, None, W["lm_head_t"][j], vh, n_rows, add=False, stat_cols=stat_cols)
    return logits


_W_NAMES = ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm", "wqkv_t", "wo_t", "wgu_t", "wd_t",
            "lm_head_t", "codec_embed", "rope_cos", "rope_sin")


@nki.jit
def code_predictor_kernel(past_hidden, code0_embed, uniforms, input_norm, post_norm, q_norm, k_norm, final_norm,
                          wqkv_t, wo_t, wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin,
                          n_q_heads, n_kv_heads, eps, resident, do_sample, inv_temperature, top_k, top_p):
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
    Returns:
        codes: [B, G1] @ HBM int32; codec_embeds: [B, G1, H] @ HBM (codec_embed's dtype);
        codec_sum: [B, H] @ HBM = code0_embed + sum_j codec_embeds[:, j].
    Constraints: see `code_predictor`.
    Pseudocode:
        h = past_hidden; for pos in 0..G1: (pos >= 2: h = codec_embeds[:, pos - 2])
            for l: h += attn_l(rms(h)) with k, v of pos appended to the SBUF cache; h += mlp_l(rms(h))
            if pos >= 1: j = pos - 1; code_j = select(rms(h) @ lm_head[j]); codec_embeds[:, j] = embed[j][code_j]
    """
    B, H = past_hidden.shape
    L = wqkv_t.shape[0]
    D = q_norm.shape[1]
    I = wd_t.shape[1]
    G1, V, _ = codec_embed.shape
    vh = lm_head_t.shape[2]
    c = _Cfg(B, H, L, n_q_heads, n_kv_heads, D, I, G1 + 1, eps)
    W = dict(zip(_W_NAMES, (input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t, wd_t,
                            lm_head_t, codec_embed, rope_cos, rope_sin)))
    codes = nl.ndarray((B, G1), dtype=nl.int32, buffer=nl.shared_hbm)
    codec_embeds = nl.ndarray((B, G1, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    codec_sum = nl.ndarray((B, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)

    bb = max(1, min(B, P_MAX // c.G, P_MAX // c.r))       # batch rows per attention block
    S = _setup(c, W, resident, True, bb, (bb * c.r, c.r, bb, c.G))
    u_sb = nl.ndarray((B, G1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=u_sb, src=uniforms)
    acc = nl.ndarray((B, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=acc, src=code0_embed)
    sampling = (do_sample, inv_temperature, top_k, top_p)

    h_sb = nl.ndarray((B, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=h_sb, src=past_hidden)
    for pos in range(G1 + 1):
        if pos == 1:
            h_sb = nl.ndarray((B, H), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=h_sb, src=code0_embed)
        cos_sb = nl.ndarray((B, c.NH, D), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=cos_sb, src=rope_cos.ap(pattern=[[0, B], [0, c.NH], [1, D]], offset=pos * D))
        sin_sb = nl.ndarray((B, c.NH, D), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=sin_sb, src=rope_sin.ap(pattern=[[0, B], [0, c.NH], [1, D]], offset=pos * D))
        for l in range(L):
            _layer(c, W, S, l, h_sb, cos_sb, sin_sb, ("cache", pos))
        if pos == 0:
            continue
        j = pos - 1
        logits = _final_logits(c, W, S, h_sb, j, vh, None, B)
        code = _select_code(logits, B, vh, u_sb[:, j:j + 1], sampling)
        nisa.dma_copy(dst=codes[:, j:j + 1], src=code)
        emb = _gather_embed(codec_embed, j, code, B, H, V)
        nisa.dma_copy(dst=codec_embeds[:, j, :], src=emb)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=emb, op=nl.add)
        if pos < G1:
            h_sb = nl.ndarray((B, H), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=h_sb, src=emb)
    sum_out = nl.ndarray((B, H), dtype=codec_embed.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=sum_out, src=acc)
    nisa.dma_copy(dst=codec_sum, src=sum_out)
    return codes, codec_embeds, codec_sum


# ================================================================ host wrapper


def _dtype_name(x):
    return str(getattr(x, "dtype", "")).replace("torch.", "")


def resident_bytes_per_partition(w: CodePredictorWeights) -> int:
    """SBUF bytes per partition that keeping every layer's matrices resident would take."""
    L, H, D, I, Hq = w.n_layers, w.hidden, w.head_dim, w.intermediate, w.n_q_heads
    item = w.wqkv_t.dtype.itemsize
    nqkv = w.wqkv_t.shape[2]
    return L * item * ((H // _K_TILE) * nqkv + Hq * H + (H // _K_TILE) * 2 * I + (I // _K_TILE) * H)


def _activation_bytes_per_partition(w: CodePredictorWeights, B: int) -> int:
    """Rough SBUF bytes per partition of everything but resident weights (cache, rows tiles, logits)."""
    L, H, D, I, G = w.n_layers, w.hidden, w.head_dim, w.intermediate, w.n_groups + 1
    cache = 2 * L * w.n_kv_heads * B * G * _BF16_BYTES
    rows = 4 * (8 * H + 6 * I + 6 * w.head_vocab) + 4 * L * (2 * H + 2 * D)
    stream = (H // _K_TILE) * _N_TILE * 2 * 2
    return cache + rows + stream


def check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample, temperature, top_k, top_p, name):
    kernel_check(isinstance(weights, CodePredictorWeights),
                 f"{name}: weights must be a CodePredictorWeights, got weights={type(weights).__name__}")
    w = weights
    kernel_check(getattr(past_hidden, "ndim", 0) == 2 and getattr(code0_embed, "ndim", 0) == 2,
                 f"{name}: past_hidden and code0_embed must be [B, H], got past_hidden.shape="
                 f"{tuple(getattr(past_hidden, 'shape', ()))}, code0_embed.shape={tuple(getattr(code0_embed, 'shape', ()))}")
    B, H = past_hidden.shape
    kernel_check(tuple(code0_embed.shape) == (B, H),
                 f"{name}: code0_embed must match past_hidden [B, H]={B, H}, got {tuple(code0_embed.shape)}")
    kernel_check(1 <= B <= P_MAX, f"{name}: batch B must be in [1, {P_MAX}], got B={B}")
    kernel_check(H == w.hidden, f"{name}: hidden size of past_hidden must equal the weights' H={w.hidden}, got H={H}")
    kernel_check(H % _K_TILE == 0, f"{name}: hidden H must be a multiple of {_K_TILE}, got H={H}")
    kernel_check(w.intermediate % _K_TILE == 0 and w.intermediate > 0,
                 f"{name}: intermediate I must be a positive multiple of {_K_TILE}, got I={w.intermediate}")
    D = w.head_dim
    kernel_check(2 <= D <= P_MAX and D % 2 == 0, f"{name}: head_dim D must be even and <= {P_MAX}, got D={D}")
    kernel_check(w.n_kv_heads >= 1 and w.n_q_heads % w.n_kv_heads == 0,
                 f"{name}: n_q_heads must be a multiple of n_kv_heads, got {w.n_q_heads}/{w.n_kv_heads}")
    r = w.n_q_heads // w.n_kv_heads
    G = w.n_groups + 1
    kernel_check(w.n_groups >= 1 and G <= P_MAX and r <= P_MAX,
                 f"{name}: need 1 <= G1 and G1 + 1 <= {P_MAX} positions, got G1={w.n_groups}")
    kernel_check(w.n_q_heads * B <= PSUM_BANK_BYTES // _BF16_BYTES,
                 f"{name}: n_q_heads * B must be <= {PSUM_BANK_BYTES // _BF16_BYTES} (one PSUM bank of q^T), "
                 f"got {w.n_q_heads}*{B}")
    kernel_check(_MAX8 <= w.head_vocab <= _MAX8_FMAX,
                 f"{name}: LM-head vocab must be in [{_MAX8}, {_MAX8_FMAX}] (max8), got Vh={w.head_vocab}")
    kernel_check(w.head_vocab <= w.vocab, f"{name}: LM-head vocab {w.head_vocab} exceeds the embedding vocab {w.vocab}")
    kernel_check(w.lm_head_t.shape[:2] == (w.n_groups, H),
                 f"{name}: lm_head_t must be [G1, H, Vh] with G1={w.n_groups}, got {w.lm_head_t.shape}")
    kernel_check(w.rope_cos.shape[0] >= G and w.rope_cos.shape[1] == D,
                 f"{name}: rope tables must be [>= G1 + 1, D] = [{G}, {D}], got {w.rope_cos.shape}")
    if uniforms is not None:
        kernel_check(tuple(uniforms.shape) == (B, w.n_groups),
                     f"{name}: uniforms must be [B, G1] = {(B, w.n_groups)}, got {tuple(uniforms.shape)}")
    if do_sample:
        kernel_check(uniforms is not None, f"{name}: do_sample=True needs uniforms [B, G1], got uniforms=None")
        kernel_check(temperature > 0, f"{name}: temperature must be > 0, got temperature={temperature}")
        kernel_check(isinstance(top_k, (int, np.integer)) and 1 <= top_k <= min(_MAX_TOP_K, w.head_vocab),
                     f"{name}: top_k must be an int in [1, min({_MAX_TOP_K}, Vh={w.head_vocab})], got top_k={top_k}")
        kernel_check(0.0 < top_p <= 1.0, f"{name}: top_p must be in (0, 1], got top_p={top_p}")
        u = np.asarray(uniforms if not hasattr(uniforms, "detach") else uniforms.detach().float().numpy())
        kernel_check(bool(np.all((u >= 0.0) & (u < 1.0))),
                     f"{name}: uniforms must lie in [0, 1), got min={float(u.min())}, max={float(u.max())}")


def _weights_args(w: CodePredictorWeights):
    return [getattr(w, n) for n in _W_NAMES]


def code_predictor(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None, do_sample=False,
                   temperature=1.0, top_k=50, top_p=1.0, return_sum=False, resident=None):
    """Qwen3-Omni code predictor for one talker frame: the G1 residual codes and their embeddings.

    Args:
        past_hidden: [B, H] talker last-layer hidden of the last token (NumPy or torch CPU; bf16/fp32).
        code0_embed: [B, H] talker codec embedding of code 0.
        weights: CodePredictorWeights (weights.py; build with `weights_from_transformers(talker.code_predictor)`).
        uniforms: [B, G1] fp32 in [0, 1): one uniform draw per (row, step); needed when do_sample.
        do_sample / temperature / top_k / top_p: greedy when do_sample is False.
        return_sum: also return codec_sum [B, H] = code0_embed + sum_j codec_embeds[:, j] (what the talker adds
            to its next input embedding, before the trailing text hidden).
        resident: keep every layer's weights in SBUF for the whole frame (default: when they fit).
    Returns:
        (codes [B, G1] int32, codec_embeds [B, G1, H]) or with return_sum (codes, codec_embeds, codec_sum).
        codes[:, j] is residual code j + 1; codec_embeds[:, j] = codec_embedding[j](codes[:, j]), i.e. the input
        embedding of step j + 1 (transformers' `hidden_states[j + 1][0]`) and, for j = G1 - 1, the extra
        embedding the talker appends.
    Constraints:
        1 <= B <= 128, H and I multiples of 128, D even <= 128, Hq % Hkv == 0, Hq * B <= 1024, G1 + 1 <= 128,
        8 <= Vh <= 16384; sampling: temperature > 0, 1 <= top_k <= min(256, Vh), 0 < top_p <= 1.
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
    check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample, temperature, top_k, top_p, name)
    w = weights
    B = past_hidden.shape[0]
    if resident is None:
        budget = SBUF_BYTES_PER_PARTITION["trn2"] - _SBUF_HEADROOM - _activation_bytes_per_partition(w, B)
        resident = resident_bytes_per_partition(w) <= budget
    if uniforms is None:
        uniforms = np.zeros((B, w.n_groups), dtype=np.float32)
    elif hasattr(uniforms, "detach"):
        uniforms = uniforms.detach().float()
    else:
        uniforms = np.asarray(uniforms, dtype=np.float32)
    out = call(code_predictor_kernel, past_hidden, code0_embed, uniforms, *_weights_args(w),
               n_q_heads=w.n_q_heads, n_kv_heads=w.n_kv_heads, eps=float(w.eps), resident=bool(resident),
               do_sample=bool(do_sample), inv_temperature=float(1.0 / temperature) if do_sample else 1.0,
               top_k=int(top_k) if do_sample else 1, top_p=float(top_p))
    codes, embeds, csum = out
    return (codes, embeds, csum) if return_sum else (codes, embeds)
