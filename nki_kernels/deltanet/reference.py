"""float64 NumPy references for the gated DeltaNet family, written from the math, token by token.

These never share code with the kernels. Parameter names match the public wrappers; outputs are named
by position exactly as the wrappers return them (state/pool updates are returned as new arrays).

Recurrence per v-head (state S [Dk, Dv]):
    S <- exp(g_t) * S;  delta = beta_t * (v_t - S^T k_t);  S <- S + k_t delta^T;  o_t = S^T q_t
with q, k optionally L2-normalised per head (eps 1e-6) and q scaled by Dk^-0.5.
"""
from __future__ import annotations

import numpy as np

from ..testing import to_float64 as _f64

L2NORM_EPS = 1e-6


def _l2norm(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=True,
                     use_qk_l2norm_in_kernel=False, valid_lengths=None, checkpoint_every=None, scale=None):
    """Token-sequential gated delta rule. Returns (o, final_state) or (o, final_state, checkpoints).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; initial_state [B, Hv, Dk, Dv];
    valid_lengths [B] (tokens t >= L_b are padding: state untouched, output 0);
    checkpoints [B, n_ckpt, Hv, Dk, Dv] = the state after (i+1) * checkpoint_every * chunk_size tokens.
    """
    q, k, v, g, beta = map(_f64, (q, k, v, g, beta))
    bsz, seq, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    group = hv // hk
    scale = dk ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    lengths = np.full(bsz, seq) if valid_lengths is None else np.asarray(valid_lengths).astype(np.int64)
    state = np.zeros((bsz, hv, dk, dv)) if initial_state is None else _f64(initial_state).copy()
    out = np.zeros((bsz, seq, hv, dv))
    ckpt_tokens = None if checkpoint_every is None else checkpoint_every * chunk_size
    n_ckpt = 0 if ckpt_tokens is None else seq // ckpt_tokens
    ckpts = np.zeros((bsz, n_ckpt, hv, dk, dv))
    for b in range(bsz):
        for t in range(seq):
            if t < lengths[b]:
                for h in range(hv):
                    kk, qq = k[b, t, h // group], q[b, t, h // group]
                    s = state[b, h] * np.exp(g[b, t, h])
                    delta = beta[b, t, h] * (v[b, t, h] - s.T @ kk)
                    s = s + np.outer(kk, delta)
                    state[b, h] = s
                    out[b, t, h] = s.T @ qq
            if ckpt_tokens is not None and (t + 1) % ckpt_tokens == 0:
                ckpts[b, (t + 1) // ckpt_tokens - 1] = state[b]
    final = state if output_final_state else None
    if checkpoint_every is not None:
        return out, final, ckpts
    return out, final


def gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False, scale=None):
    """Decode step(s) on rows state_pool[slot_ids] (slot_ids None: rows 0 .. B-1). Returns (o [B, T, Hv, Dv],
    new_state_pool)."""
    pool = _f64(state_pool).copy()
    slots = np.arange(np.shape(q)[0]) if slot_ids is None else np.asarray(slot_ids).astype(np.int64)
    init = pool[slots]
    o, final = gated_delta_rule(q, k, v, g, beta, initial_state=init,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, scale=scale)
    pool[slots] = final
    return o, pool


def _silu(x):
    return x / (1.0 + np.exp(-x))


def causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu"):
    """Depthwise causal conv over time. x [B, C, T], weight [C, K], conv_state [B, C, K] (the K inputs
    before x; zeros when None). Returns (y [B, C, T], new_conv_state [B, C, K] = last K valid inputs)."""
    x, w = _f64(x), _f64(weight)
    bsz, ch, seq = x.shape
    kw = w.shape[1]
    prev = np.zeros((bsz, ch, kw)) if conv_state is None else _f64(conv_state)
    lengths = np.full(bsz, seq) if valid_lengths is None else np.asarray(valid_lengths).astype(np.int64)
    y = np.zeros((bsz, ch, seq))
    new_state = np.zeros((bsz, ch, kw))
    for b in range(bsz):
        hist = np.concatenate([prev[b], x[b]], axis=1)          # [C, K + T], input t at column K + t
        for t in range(seq):
            window = hist[:, kw + t - (kw - 1): kw + t + 1]    # inputs t-K+1 .. t
            y[b, :, t] = np.sum(window * w, axis=1)
        new_state[b] = hist[:, lengths[b]: lengths[b] + kw]
    if activation == "silu":
        y = _silu(y)
    return y, new_state


def causal_conv1d_update(x, conv_state, weight, activation="silu"):
    """Single-step form: x [B, C, T] new inputs after the K inputs in conv_state [B, C, K].
    Returns (y [B, C, T], new_conv_state [B, C, K])."""
    return causal_conv1d(x, weight, conv_state=conv_state, activation=activation)
