"""NumPy float64 reference of the code predictor, following transformers' loop step by step.

`Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration.generate(inputs_embeds=[past_hidden, code0_embed],
max_new_tokens=G1)`: a 2-position prefill (causal), LM head 0 on its last position gives code 1; then step j
(j = 1..G1-1) embeds code j with codec_embedding[j - 1], runs one position against the KV cache and applies
lm_head[j]. Written from the math (Qwen3 decoder layer: RMSNorm x * w, q/k head RMSNorm, rotate-half RoPE, GQA
softmax attention with scale D^-0.5, SwiGLU MLP) without sharing code with the kernel.
"""
from __future__ import annotations

import numpy as np

from ..testing import to_float64 as _f64

from .weights import CodePredictorWeights, natural_layers


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, cos, sin):
    """x [..., T, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def sample_reference(logits, u, temperature, top_k, top_p):
    """The documented sampling procedure (see `code_predictor`), in float64, for one row."""
    z = np.asarray(logits, np.float64) / temperature
    remaining = z.copy()
    listed = []
    while len(listed) < top_k:
        srt = np.sort(remaining)[::-1]
        top8 = np.full(8, -np.inf)
        top8[:min(8, srt.size)] = srt[:8]
        listed.extend(top8.tolist())
        remaining = remaining[remaining < top8[7]]
    c = np.asarray(listed[:top_k])
    q = np.exp(c - c[0])
    q = q / q.sum()
    cum = np.cumsum(q)
    keep = (cum - q) < top_p
    n = int(keep.sum())
    mass = cum[n - 1]
    i = min(int(np.sum(cum[:n] <= u * mass)), n - 1)
    return int(np.flatnonzero(z == c[i])[0])


def code_predictor_reference(past_hidden, code0_embed, weights: CodePredictorWeights, *, uniforms=None,
                             do_sample=False, temperature=1.0, top_k=50, top_p=1.0, return_sum=False,
                             forced_codes=None, return_logits=False):
    """Same parameters as `code_predictor`; float64 math. Returns (codes, codec_embeds[, codec_sum][, logits]).

    forced_codes [B, G1]: teacher forcing (the next step's input uses these codes instead of the chosen ones;
    `codes` still reports the reference's own choice per step); logits [B, G1, Vh] are the per-step logits.
    """
    w = weights
    x0 = _f64(past_hidden)
    x1 = _f64(code0_embed)
    B, H = x0.shape
    Hq, Hkv, D, G1 = w.n_q_heads, w.n_kv_heads, w.head_dim, w.n_groups
    grp = Hq // Hkv
    eps = float(w.eps)
    layers = [{k: np.asarray(v, np.float64) for k, v in lw.items()} for lw in natural_layers(w)]
    final_norm = np.asarray(w.final_norm, np.float64)
    emb_tables = np.asarray(w.codec_embed, np.float64)
    heads = np.asarray(w.lm_head_t, np.float64)          # [G1, H, Vh]
    cos_t = np.asarray(w.rope_cos, np.float64)
    sin_t = np.asarray(w.rope_sin, np.float64)
    u = None if uniforms is None else _f64(uniforms)

    cache_k = [np.zeros((B, Hkv, 0, D)) for _ in layers]
    cache_v = [np.zeros((B, Hkv, 0, D)) for _ in layers]

    def forward(x, start):
        """x [B, T, H] at positions start..start+T-1; appends to the cache; returns final-normed [B, T, H]."""
        T = x.shape[1]
        cos, sin = cos_t[start:start + T], sin_t[start:start + T]
        h = x
        for li, lw in enumerate(layers):
            a = _rms(h, lw["input_norm"], eps)
            q = (a @ lw["q"].T).reshape(B, T, Hq, D).transpose(0, 2, 1, 3)
            k = (a @ lw["k"].T).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
            v = (a @ lw["v"].T).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
            q = _rope(_rms(q, lw["q_norm"], eps), cos, sin)
            k = _rope(_rms(k, lw["k_norm"], eps), cos, sin)
            cache_k[li] = np.concatenate([cache_k[li], k], axis=2)
            cache_v[li] = np.concatenate([cache_v[li], v], axis=2)
            K = np.repeat(cache_k[li], grp, axis=1)           # [B, Hq, Tk, D]
            Vv = np.repeat(cache_v[li], grp, axis=1)
            Tk = K.shape[2]
            s = q @ K.transpose(0, 1, 3, 2) / np.sqrt(D)      # [B, Hq, T, Tk]
            qpos = start + np.arange(T)[:, None]
            s = np.where(np.arange(Tk)[None, :] <= qpos, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p = p / p.sum(axis=-1, keepdims=True)
            o = (p @ Vv).transpose(0, 2, 1, 3).reshape(B, T, Hq * D)
            h = h + o @ lw["o"].T
            m = _rms(h, lw["post_norm"], eps)
            g = m @ lw["gate"].T
            up = m @ lw["up"].T
            h = h + ((g / (1.0 + np.exp(-g))) * up) @ lw["down"].T
        return _rms(h, final_norm, eps)

    def choose(logits_row, b, j):
        if not do_sample:
            return int(np.argmax(logits_row))
        return sample_reference(logits_row, u[b, j], temperature, top_k, top_p)

    codes = np.zeros((B, G1), dtype=np.int32)
    embeds = np.zeros((B, G1, H))
    all_logits = np.zeros((B, G1, heads.shape[2]))
    hidden = forward(np.stack([x0, x1], axis=1), 0)[:, -1]          # prefill, 2 positions
    for j in range(G1):
        logits = hidden @ heads[j]                                     # lm_head[j]
        all_logits[:, j] = logits
        codes[:, j] = [choose(logits[b], b, j) for b in range(B)]
        used = codes[:, j] if forced_codes is None else np.asarray(forced_codes)[:, j]
        embeds[:, j] = emb_tables[j][used]                              # codec_embedding[j](code j+1)
        if j + 1 < G1:
            hidden = forward(embeds[:, j:j + 1], j + 2)[:, -1]
    out = [codes, embeds]
    if return_sum:
        out.append(x1 + embeds.sum(axis=1))
    if return_logits:
        out.append(all_logits)
    return tuple(out)
