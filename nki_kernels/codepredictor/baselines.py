"""Baselines for the code predictor (real kernels, same building blocks as `unrolled.py`).

* `code_predictor_reprefill`: the NxDI-style unroll in ONE launch with NO KV cache: every step re-runs all
  layers over a fixed G-slot buffer per batch row (prompt, embeddings so far, zeros), causal mask, and reads
  the logits of the last valid slot.
* `code_predictor_per_step`: the same cached algorithm as `code_predictor`, but as G1 separate launches (one
  per step, as a host loop of `generate` steps would do): the KV cache goes through HBM between launches and
  the weights are read again by every launch.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, call_ranks, nisa, nki, nl
from ..hw import P_MAX, SBUF_BYTES_PER_PARTITION
from ..validation import kernel_check
from .unrolled import (_K_TILE, _SBUF_HEADROOM, _Cfg, _activation_bytes_per_partition, _final_logits,
                       _gather_embed, _greedy_code_T, _greedy_consts, _layer, _rope_T, _rows_to_T, _select_code,
                       _setup, _weights_and_sizes, _weights_args, check_inputs, check_shards,
                       resident_bytes_per_partition, sampling_consts, tp_state)
from .weights import CodePredictorWeights


def _resident(w, rows, sample):
    budget = SBUF_BYTES_PER_PARTITION["trn2"] - _SBUF_HEADROOM - _activation_bytes_per_partition(w, rows, sample)
    return resident_bytes_per_partition(w) <= budget


@nki.jit
def code_predictor_reprefill_kernel(past_hidden, code0_embed, uniforms, input_norm, post_norm, q_norm, k_norm,
                                    final_norm, wqkv_t, wo_t, wgu_t, wd_t, lm_head_t, codec_embed, rope_cos,
                                    rope_sin, n_q_heads, n_kv_heads, eps, resident, do_sample, inv_temperature,
                                    top_k, top_p, replica_group=None, tp_degree=1):
    """No-KV-cache baseline: step j re-runs all L layers over G slots per row; same outputs as the kernel.

    Dimensions, Args, Returns: as `code_predictor_kernel`.
    Pseudocode:
        for j in 0..G1-1: for each group of rows: x[b, slot] = [past_hidden, code0_embed, emb_0..emb_{j-1}, 0...]
            h = layers(x) with a causal mask over the G slots; code_j = select(rms(h[:, j + 1]) @ lm_head[j])
    """
    B, H = past_hidden.shape
    W, L, D, I, G1, V, vh = _weights_and_sizes(input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t,
                                               wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin)
    slots = G1 + 1
    r = n_q_heads // n_kv_heads
    bg = max(1, min(B, P_MAX // slots))                  # batch rows per pass (rows = bg * slots <= 128)
    codes = nl.ndarray((B, G1), dtype=nl.int32, buffer=nl.shared_hbm)
    codec_embeds = nl.ndarray((B, G1, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    codec_sum = nl.ndarray((B, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    bb = max(1, P_MAX // (slots * r))                    # batches per attention block
    c_full = _Cfg(bg * slots, H, L, n_q_heads, n_kv_heads, D, I, slots, eps)
    S = _setup(c_full, W, resident, False, bb, (bb * slots * r, slots * r, bb, slots, slots))
    tp_state(S, replica_group, tp_degree)          # TP: o_proj / down_proj partial sums all-reduced in `_layer`
    sampling = (do_sample, inv_temperature, top_k, top_p)
    fm_greedy = (not do_sample) and vh % _K_TILE == 0
    if fm_greedy:
        _greedy_consts(S, vh)
    for b0 in range(0, B, bg):
        nbg = min(bg, B - b0)
        c = _Cfg(nbg * slots, H, L, n_q_heads, n_kv_heads, D, I, slots, eps)
        u_sb = nl.ndarray((nbg, G1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=u_sb, src=uniforms[b0:b0 + nbg, :])
        acc = nl.ndarray((nbg, H), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=acc, src=code0_embed[b0:b0 + nbg, :])
        cos_t = _rope_T(c, rope_cos, [[0, nbg], [D, slots]], 0)
        sin_t = _rope_T(c, rope_sin, [[0, nbg], [D, slots]], 0)
        for j in range(G1):
            x_rows = nl.ndarray((c.rows, H), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=x_rows, value=0.0)
            nisa.dma_copy(dst=x_rows[0::slots, :], src=past_hidden[b0:b0 + nbg, :])
            nisa.dma_copy(dst=x_rows[1::slots, :], src=code0_embed[b0:b0 + nbg, :])
            for t in range(2, j + 2):
                nisa.dma_copy(dst=x_rows[t::slots, :], src=codec_embeds[b0:b0 + nbg, t - 2, :])
            hT = _rows_to_T(x_rows, c)
            for l in range(L):
                _layer(c, W, S, l, hT, cos_t, sin_t, ("self", slots))
            if fm_greedy:
                code = _greedy_code_T(c, W, S, hT, j, vh, slice(j + 1, c.rows, slots), nbg)
            else:
                logits = _final_logits(c, W, S, hT, j, vh, slice(j + 1, c.rows, slots), nbg)
                code = _select_code(logits, nbg, vh, u_sb[:, j:j + 1], sampling)
            nisa.dma_copy(dst=codes[b0:b0 + nbg, j:j + 1], src=code)
            emb = _gather_embed(codec_embed, j, code, nbg, H, V)
            nisa.dma_copy(dst=codec_embeds[b0:b0 + nbg, j, :], src=emb)
            nisa.tensor_tensor(dst=acc, data1=acc, data2=emb, op=nl.add)
        sum_out = nl.ndarray((nbg, H), dtype=codec_embed.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=sum_out, src=acc)
        nisa.dma_copy(dst=codec_sum[b0:b0 + nbg, :], src=sum_out)
    return codes, codec_embeds, codec_sum


@nki.jit
def code_predictor_step_kernel(x_in, code0_embed, kv_k, kv_v, uniforms, input_norm, post_norm, q_norm, k_norm,
                               final_norm, wqkv_t, wo_t, wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin,
                               step, n_q_heads, n_kv_heads, eps, resident, do_sample, inv_temperature, top_k,
                               top_p, replica_group=None, tp_degree=1):
    """One step j of the cached predictor as its own launch; KV cache [D, L, Hkv, B, G] bf16 in HBM (in place).

    step 0 runs positions 0 (x_in = past_hidden) and 1 (code0_embed); step j >= 1 runs position j + 1 with
    x_in = the embedding of code j. Returns code [B, 1] int32 and emb [B, H] (codec_embed[j](code)).
    """
    B, H = x_in.shape
    W, L, D, I, G1, V, vh = _weights_and_sizes(input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t,
                                               wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin)
    c = _Cfg(B, H, L, n_q_heads, n_kv_heads, D, I, G1 + 1, eps)
    code_out = nl.ndarray((B, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    emb_out = nl.ndarray((B, H), dtype=codec_embed.dtype, buffer=nl.shared_hbm)
    bb = max(1, min(B, P_MAX // c.r))
    S = _setup(c, W, resident, True, bb, (bb * c.r, c.r, bb, c.G))
    tp_state(S, replica_group, tp_degree)
    if step > 0:
        nisa.dma_copy(dst=S["kT"], src=kv_k)
        nisa.dma_copy(dst=S["vT"], src=kv_v)
    u_sb = nl.ndarray((B, G1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=u_sb, src=uniforms)
    positions = [(0, x_in), (1, code0_embed)] if step == 0 else [(step + 1, x_in)]
    hT = None
    for pos, src in positions:
        x_rows = nl.ndarray((B, H), dtype=src.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_rows, src=src)
        hT = _rows_to_T(x_rows, c)
        cos_t = _rope_T(c, rope_cos, [[0, B]], pos * D)
        sin_t = _rope_T(c, rope_sin, [[0, B]], pos * D)
        for l in range(L):
            _layer(c, W, S, l, hT, cos_t, sin_t, ("cache", pos))
    if (not do_sample) and vh % _K_TILE == 0:
        _greedy_consts(S, vh)
        code = _greedy_code_T(c, W, S, hT, step, vh, None, B)
    else:
        logits = _final_logits(c, W, S, hT, step, vh, None, B)
        code = _select_code(logits, B, vh, u_sb[:, step:step + 1], (do_sample, inv_temperature, top_k, top_p))
    nisa.dma_copy(dst=code_out, src=code)
    emb = _gather_embed(codec_embed, step, code, B, H, V)
    nisa.dma_copy(dst=emb_out, src=emb)
    nisa.dma_copy(dst=kv_k, src=S["kT"])
    nisa.dma_copy(dst=kv_v, src=S["vT"])
    return code_out, emb_out


def _consts(w, rows, do_sample, temperature, top_k, top_p, resident):
    return dict(n_q_heads=w.n_q_heads, n_kv_heads=w.n_kv_heads, eps=float(w.eps),
                resident=bool(_resident(w, rows, do_sample) if resident is None else resident),
                **sampling_consts(do_sample, temperature, top_k, top_p, w.head_vocab))


def _uniforms(uniforms, B, G1):
    if uniforms is None:
        return np.zeros((B, G1), dtype=np.float32)
    return np.asarray(uniforms, dtype=np.float32)


def code_predictor_reprefill(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None,
                             do_sample=False, temperature=1.0, top_k=50, top_p=1.0, return_sum=False, resident=None):
    """Baseline: no KV cache, G-slot re-prefill every step, one launch. Same contract as `code_predictor`."""
    check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample, temperature, top_k, top_p,
                 "code_predictor_reprefill")
    w = weights
    B = past_hidden.shape[0]
    out = call(code_predictor_reprefill_kernel, past_hidden, code0_embed, _uniforms(uniforms, B, w.n_groups), lnc=1,
               *_weights_args(w), **_consts(w, min(B, P_MAX // (w.n_groups + 1)) * (w.n_groups + 1), do_sample,
                                            temperature, top_k, top_p, resident))
    return out if return_sum else out[:2]


def code_predictor_per_step(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None,
                            do_sample=False, temperature=1.0, top_k=50, top_p=1.0, resident=None):
    """Baseline: the cached algorithm as G1 launches (KV cache through HBM). Returns (codes, codec_embeds)."""
    check_inputs(past_hidden, code0_embed, weights, uniforms, do_sample, temperature, top_k, top_p,
                 "code_predictor_per_step")
    import ml_dtypes
    w = weights
    B, H = past_hidden.shape
    G1, D = w.n_groups, w.head_dim
    kv_k = np.zeros((D, w.n_layers, w.n_kv_heads, B, G1 + 1), dtype=ml_dtypes.bfloat16)
    kv_v = np.zeros_like(kv_k)
    u = _uniforms(uniforms, B, G1)
    consts = _consts(w, B, do_sample, temperature, top_k, top_p, resident)
    codes = np.zeros((B, G1), dtype=np.int32)
    embeds = np.zeros((B, G1, H), dtype=w.codec_embed.dtype)
    x = past_hidden
    for j in range(G1):
        code, emb = call(code_predictor_step_kernel, x, code0_embed, kv_k, kv_v, u, *_weights_args(w), lnc=1,
                         step=j, inplace=("kv_k", "kv_v"), **consts)
        codes[:, j] = np.asarray(code).reshape(-1)
        embeds[:, j] = np.asarray(emb)
        x = np.asarray(emb)
    return codes, embeds


def code_predictor_reprefill_tp(past_hidden, code0_embed, shards, *, replica_group=None, uniforms=None,
                                do_sample=False, temperature=1.0, top_k=50, top_p=1.0, resident=None):
    """The re-prefill baseline at TP = len(shards) (`code_predictor_tp`'s layout and all-reduces), LNC=1.
    Returns rank 0's (codes, codec_embeds)."""
    name = "code_predictor_reprefill_tp"
    tp, replica_group = check_shards(shards, replica_group, name)
    kernel_check(not shards[0].vocab_sharded, f"{name}: the baselines take replicated LM heads "
                 "(shard_weights(..., vocab_sharded=False))")
    w = shards[0]
    past_hidden, code0_embed, u = check_inputs(past_hidden, code0_embed, w, uniforms, do_sample, temperature,
                                               top_k, top_p, name)
    B = past_hidden.shape[0]
    consts = _consts(w, min(B, P_MAX // (w.n_groups + 1)) * (w.n_groups + 1), do_sample, temperature, top_k, top_p,
                     resident)
    args = [(past_hidden, code0_embed, u, *_weights_args(s)) for s in shards]
    outs = call_ranks(code_predictor_reprefill_kernel, args, lnc=1, replica_group=replica_group, tp_degree=tp,
                      **consts)
    return outs[0][:2]


def code_predictor_per_step_tp(past_hidden, code0_embed, shards, *, replica_group=None, uniforms=None,
                               do_sample=False, temperature=1.0, top_k=50, top_p=1.0, resident=None):
    """The per-step-launch baseline at TP = len(shards): G1 launches of every rank (each rank's KV cache through
    its own HBM), LNC=1. Returns rank 0's (codes, codec_embeds)."""
    import ml_dtypes
    name = "code_predictor_per_step_tp"
    tp, replica_group = check_shards(shards, replica_group, name)
    kernel_check(not shards[0].vocab_sharded, f"{name}: the baselines take replicated LM heads "
                 "(shard_weights(..., vocab_sharded=False))")
    w = shards[0]
    past_hidden, code0_embed, u = check_inputs(past_hidden, code0_embed, w, uniforms, do_sample, temperature,
                                               top_k, top_p, name)
    B, H = past_hidden.shape
    G1, D = w.n_groups, w.head_dim
    kv = [(np.zeros((D, w.n_layers, w.n_kv_heads, B, G1 + 1), dtype=ml_dtypes.bfloat16),
           np.zeros((D, w.n_layers, w.n_kv_heads, B, G1 + 1), dtype=ml_dtypes.bfloat16)) for _ in shards]
    consts = _consts(w, B, do_sample, temperature, top_k, top_p, resident)
    codes = np.zeros((B, G1), dtype=np.int32)
    embeds = np.zeros((B, G1, H), dtype=w.codec_embed.dtype)
    x = past_hidden
    for j in range(G1):
        outs = call_ranks(code_predictor_step_kernel, [(x, code0_embed, k, v, u, *_weights_args(s))
                                                       for s, (k, v) in zip(shards, kv)],
                          lnc=1, step=j, replica_group=replica_group, tp_degree=tp, inplace=("kv_k", "kv_v"),
                          **consts)
        code, emb = outs[0]
        codes[:, j] = np.asarray(code).reshape(-1)
        embeds[:, j] = np.asarray(emb)
        x = np.asarray(emb)
    return codes, embeds
