"""float64 NumPy references for the attention kernels, written from the math (no code shared with the kernels).

Parameter names match the public wrappers (`flash_attention`, `flash_attention_decode`); `lnc` is accepted
and ignored.
"""
from __future__ import annotations

import math

import numpy as np

from ..testing import to_float64 as _f64


def _masked_softmax_attention(q, k, v, allowed):
    """q [..., Sq, D], k/v [..., Skv, D], allowed [..., Sq, Skv] bool -> [..., Sq, D]; rows with nothing allowed
    give 0."""
    logits = q @ np.swapaxes(k, -1, -2)
    logits = np.where(allowed, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    w = np.where(allowed, np.exp(logits - row_max), 0.0)
    denom = np.sum(w, axis=-1, keepdims=True)
    w = np.divide(w, denom, out=np.zeros_like(w), where=denom > 0)
    return w @ v


def _expand_kv(x, n_hq):
    """[B, Hkv, S, D] -> [B, Hq, S, D]: query head h uses KV head h // (Hq / Hkv)."""
    group = n_hq // x.shape[1]
    return np.repeat(x, group, axis=1)


def flash_attention_ref(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=1):
    """softmax(scale * q k^T + mask) v per head (float64), optionally * sigmoid(gate).

    Positions: query i sits at key position Skv - Sq + i. Causal: it sees keys j <= Skv - Sq + i.
    seq_lens[b]: keys j >= seq_lens[b] are masked, and query rows at positions >= seq_lens[b] are 0.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    n_b, n_hq, sq, d = q.shape
    skv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    k, v = _expand_kv(k, n_hq), _expand_kv(v, n_hq)
    q_pos = np.arange(sq) + (skv - sq)
    k_pos = np.arange(skv)
    allowed = np.ones((n_b, 1, sq, skv), dtype=bool)
    if causal:
        allowed &= (k_pos[None, :] <= q_pos[:, None])[None, None]
    q_valid = np.ones((n_b, 1, sq, 1), dtype=bool)
    if seq_lens is not None:
        lens = np.asarray(_f64(seq_lens)).astype(np.int64)
        allowed &= (k_pos[None, None, None, :] < lens[:, None, None, None])
        q_valid = q_pos[None, None, :, None] < lens[:, None, None, None]
    out = _masked_softmax_attention(q * scale, k, v, allowed)
    out = np.where(q_valid, out, 0.0)
    if gate is not None:
        out = out / (1.0 + np.exp(-_f64(gate)))
    return out


def flash_attention_decode_ref(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=1):
    """Decode attention over a KV cache (float64).

    cache_lens[b] counts the valid cache positions of sequence b *including* the Sq new tokens, which the
    caller has already written at positions cache_lens[b] - Sq .. cache_lens[b] - 1. New token i (0-based)
    sits at position cache_lens[b] - Sq + i and sees keys j < cache_lens[b] - Sq + i + 1 when causal (else
    all j < cache_lens[b]).
    """
    q, kc, vc = _f64(q), _f64(k_cache), _f64(v_cache)
    n_b, n_hq, sq, d = q.shape
    s_max = kc.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    kc, vc = _expand_kv(kc, n_hq), _expand_kv(vc, n_hq)
    lens = np.asarray(_f64(cache_lens)).astype(np.int64)
    k_pos = np.arange(s_max)
    out = np.zeros_like(q)
    for b in range(n_b):
        limit = np.full(sq, lens[b])
        if causal:
            limit = lens[b] - sq + np.arange(sq) + 1
        allowed = k_pos[None, :] < limit[:, None]
        out[b] = _masked_softmax_attention(q[b] * scale, kc[b], vc[b], allowed[None])
    return out


def flash_attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None,
                               lnc=None, max_seqlen_q=None, max_seqlen_k=None):
    """Packed-sequence attention (float64), one sequence at a time (max_seqlen_* are accepted and ignored: they
    only bound the kernel's work).

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s+1] and key rows
    cu_seqlens_k[s]:cu_seqlens_k[s+1]. Causal is bottom-right aligned within the sequence: query i of Lq sees
    keys j <= Lk - Lq + i. Rows that see no key are 0.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    cu_q = np.asarray(_f64(cu_seqlens_q)).astype(np.int64)
    cu_k = np.asarray(_f64(cu_seqlens_k)).astype(np.int64)
    tq, n_hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = np.zeros_like(q)
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qs = np.swapaxes(q[q0:q1], 0, 1)[None]                      # [1, Hq, Lq, D]
        ks = _expand_kv(np.swapaxes(k[k0:k1], 0, 1)[None], n_hq)    # [1, Hq, Lk, D]
        vs = _expand_kv(np.swapaxes(v[k0:k1], 0, 1)[None], n_hq)
        allowed = np.ones((lq, lk), dtype=bool)
        if causal:
            allowed = np.arange(lk)[None, :] <= (lk - lq + np.arange(lq))[:, None]
        o = _masked_softmax_attention(qs * scale, ks, vs, allowed[None, None])
        out[q0:q1] = np.swapaxes(o[0], 0, 1)
    if gate is not None:
        out = out / (1.0 + np.exp(-_f64(gate)))
    return out
