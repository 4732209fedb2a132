"""float64 NumPy references for the MoE family, written from the math (no code shared with the kernels).

Parameter names match the public wrappers (`moe_route`, `moe_blockwise`, `moe_decode`); `lnc` is ignored.

Math (transformers Qwen3-MoE / Qwen3.5-MoE / Qwen3-Omni sparse blocks):
    routing: p = softmax(router_logits) over all E experts; top-k of p; optionally renormalised to sum 1.
    expert e: y_e(x) = (silu(x @ G_e) * (x @ U_e)) @ D_e, with gate_up[e] = [H, 2, I] (G_e = [:, 0], U_e = [:, 1])
              and down[e] = [I, H].
    shared:   y_s(x) = sigmoid(x . w_sg) * (silu(x @ G_s) * (x @ U_s)) @ D_s.
    output:   out[t] = sum over the token's (local) experts of weight * y_e(x_t), plus y_s(x_t).
"""
from __future__ import annotations

import numpy as np

from ..testing import to_float64 as _f64


def _int(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x).astype(np.int64)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _swiglu_ffn(x, w_gate_up, w_down):
    """x [T, H], w_gate_up [H, 2, I], w_down [I, H] -> [T, H]."""
    g = x @ w_gate_up[:, 0, :]
    u = x @ w_gate_up[:, 1, :]
    return (_silu(g) * u) @ w_down


def _shared_term(x, shared):
    if shared is None:
        return np.zeros_like(x)
    s_gate_up, s_down, s_gate = (_f64(a) for a in shared)
    gate = 1.0 / (1.0 + np.exp(-(x @ s_gate)))
    return gate[:, None] * _swiglu_ffn(x, s_gate_up, s_down)


def moe_route_reference(router_logits, top_k, normalize):
    """(top_k_weights [T, TOPK] float64, top_k_index [T, TOPK] int64); ties go to the lower expert id."""
    z = _f64(router_logits)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p = p / p.sum(axis=-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return w, idx


def moe_blockwise_reference(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
                            block_size, shared=None, top_k_index=None, expert_offset=0):
    """out [T, H] float64 from the mapping: every (block, position) with a token id >= 0 contributes
    affinity(token, expert) * y_expert(x_token); plus the shared term for every token.

    affinity: dense expert_affinities [T, E_local] column e_local, or, with top_k_index [T, TOPK] (global ids),
    the top-k weight whose id equals e_local + expert_offset (0 if none)."""
    x = _f64(hidden)
    gu, dn = _f64(gate_up), _f64(down)
    tpos, b2e = _int(token_position_to_id).reshape(-1), _int(block_to_expert).reshape(-1)
    aff = _f64(expert_affinities)
    idx = None if top_k_index is None else _int(top_k_index)
    out = _shared_term(x, shared)
    for pos, t in enumerate(tpos):
        if t < 0:
            continue
        e = int(b2e[pos // block_size])
        if idx is None:
            a = aff[t, e]
        else:
            a = float(np.sum(aff[t] * (idx[t] == e + expert_offset)))
        out[t] += a * _swiglu_ffn(x[t:t + 1], gu[e], dn[e])[0]
    return out


def moe_decode_reference(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset=0):
    """out [T, H] float64: out[t] = sum_j w[t, j] * y_{idx[t, j]}(x_t) over the j whose global id is local
    (expert_offset <= id < expert_offset + E_local), plus the shared term."""
    x = _f64(hidden)
    gu, dn = _f64(gate_up), _f64(down)
    idx, w = _int(top_k_index), _f64(top_k_weights)
    n_local = gu.shape[0]
    out = _shared_term(x, shared)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j]) - expert_offset
            if 0 <= e < n_local:
                out[t] += w[t, j] * _swiglu_ffn(x[t:t + 1], gu[e], dn[e])[0]
    return out
