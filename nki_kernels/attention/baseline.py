"""Microbench baselines for the attention kernels. Not a public API; used by microbench/cases/attention.py only.

Headline baseline: what users run today for head_dim 256 (shared/reference/nxdi.md, anchors.md): the Qwen3.5
NxDI contribution's d=256 flash-attention kernel (`nki_flash_attn_d256_pipe`, public description: GQA-aware,
reads BHSD and DMA-transposes K on load, a 3-stage QK / exp + P transpose / PV pipeline over 128-row query tiles
and 512-key blocks, launched from a Python loop once per (batch, KV head), no LNC grid). Re-written here from that
description around this package's own pipeline: one LNC=1 launch per (b, KV head) of `flash_attention_kernel` on
that pair's slices (K DMA-transposed on load, the group's query heads sharing one K/V load; the pipeline for
every Skv, not the partition-major short body our kernel takes for Skv <= 512). It is therefore at
least as fast as the kernel it stands for (our pipeline is the tuned one); what it lacks is the LNC=2 split and
the single launch. Decode has no d=256 NKI kernel upstream (attention_tkg caps at 128); its baseline is the same
per-(b, KV head), one-core launch pattern applied to `flash_attention_decode_kernel`.

Extra rows (labelled "earlier d=256 kernels"): the approach of the first d=256 kernels: KV heads expanded (one copy
per query head) and q / k permuted BHSD -> BHDS by separate device launches (HBM -> SBUF -> HBM copies, modeled),
then the same prefill body on the permuted layout; for decode, the expanded KV cache through the decode kernel at
LNC=1.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from .decode import flash_attention_decode_kernel
from .prefill import prefill_body

_PERMUTE_KEYS = 2048              # sequence positions per permute tile (>= 2 KiB per partition for bf16)


def _scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)


def _cat(parts, axis):
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)


# ---------------------------------------------------------------- headline: per-(b, KV head) launches on one core

@nki.jit
def nxdi_style_prefill_kernel(q, k, v, gate, seq_lens, softmax_scale, causal):
    """`flash_attention_kernel` with the 128-row-tile pipeline at every Skv (K DMA-transposed on load)."""
    out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    prefill_body(q, k, v, gate, seq_lens, out, softmax_scale, causal, short=False)
    return out


def nxdi_style_flash_attention(q, k, v, gate=None, causal=True, softmax_scale=None):
    """One LNC=1 launch per (b, KV head) over that pair's query group, K DMA-transposed on load (bf16/fp16)."""
    n_b, n_hq = q.shape[:2]
    n_kv = k.shape[1]
    group = n_hq // n_kv
    scale = _scale(q, softmax_scale)
    rows = []
    for b in range(n_b):
        heads = []
        for kvh in range(n_kv):
            hs = slice(kvh * group, (kvh + 1) * group)
            g = None if gate is None else np.ascontiguousarray(gate[b:b + 1, hs])
            heads.append(call(nxdi_style_prefill_kernel, np.ascontiguousarray(q[b:b + 1, hs]),
                              np.ascontiguousarray(k[b:b + 1, kvh:kvh + 1]),
                              np.ascontiguousarray(v[b:b + 1, kvh:kvh + 1]), g, None, scale, causal, lnc=1))
        rows.append(_cat(heads, 1))
    return _cat(rows, 0)


def nxdi_style_flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None):
    """One LNC=1 decode launch per (b, KV head)."""
    n_b, n_hq = q.shape[:2]
    n_kv = k_cache.shape[1]
    group = n_hq // n_kv
    scale = _scale(q, softmax_scale)
    lens = np.asarray(cache_lens, np.int32)
    rows = []
    for b in range(n_b):
        heads = []
        for kvh in range(n_kv):
            hs = slice(kvh * group, (kvh + 1) * group)
            heads.append(call(flash_attention_decode_kernel, np.ascontiguousarray(q[b:b + 1, hs]),
                              np.ascontiguousarray(k_cache[b:b + 1, kvh:kvh + 1]),
                              np.ascontiguousarray(v_cache[b:b + 1, kvh:kvh + 1]), lens[b:b + 1], scale, causal,
                              lnc=1))
        rows.append(_cat(heads, 1))
    return _cat(rows, 0)


# ---------------------------------------------------------------- extra rows: host permute + expanded KV

@nki.jit
def bhsd_to_bhds_kernel(x):
    """[B, H, S, D] -> [B, H, D, S] (2-byte dtypes): DMA transpose into SBUF, plain DMA out."""
    n_b, n_h, s, d = x.shape
    out = nl.ndarray((n_b, n_h, d, s), dtype=x.dtype, buffer=nl.shared_hbm)
    for b in range(n_b):
        for h in range(n_h):
            for s0 in range(0, s, _PERMUTE_KEYS):
                sn = min(_PERMUTE_KEYS, s - s0)
                for d0 in range(0, d, P_MAX):
                    dn = min(P_MAX, d - d0)
                    t_sb = nl.ndarray((P_MAX, _PERMUTE_KEYS), dtype=x.dtype, buffer=nl.sbuf)
                    nisa.dma_transpose(dst=t_sb[0:dn, 0:sn], src=x[b, h, s0:s0 + sn, d0:d0 + dn])
                    nisa.dma_copy(dst=out[b, h, d0:d0 + dn, s0:s0 + sn], src=t_sb[0:dn, 0:sn])
    return out


@nki.jit
def expand_kv_kernel(x, group):
    """[B, Hkv, S, D] -> [B, Hkv * group, S, D]: every KV head copied once per query head of its group."""
    n_b, n_kv, s, d = x.shape
    out = nl.ndarray((n_b, n_kv * group, s, d), dtype=x.dtype, buffer=nl.shared_hbm)
    rows = P_MAX * (_PERMUTE_KEYS // P_MAX)
    for b in range(n_b):
        for h in range(n_kv):
            for s0 in range(0, s, rows):
                sn = min(rows, s - s0)
                per = sn // P_MAX
                t_sb = nl.ndarray((P_MAX, _PERMUTE_KEYS // P_MAX * d), dtype=x.dtype, buffer=nl.sbuf)
                if sn % P_MAX == 0:
                    src = x[b, h, s0:s0 + sn, 0:d].reshape((P_MAX, per * d))
                    nisa.dma_copy(dst=t_sb[0:P_MAX, 0:per * d], src=src)
                    for g in range(group):
                        nisa.dma_copy(dst=out[b, h * group + g, s0:s0 + sn, 0:d].reshape((P_MAX, per * d)),
                                      src=t_sb[0:P_MAX, 0:per * d])
                else:
                    for r0 in range(0, sn, P_MAX):
                        rn = min(P_MAX, sn - r0)
                        nisa.dma_copy(dst=t_sb[0:rn, 0:d], src=x[b, h, s0 + r0:s0 + r0 + rn, 0:d])
                        for g in range(group):
                            nisa.dma_copy(dst=out[b, h * group + g, s0 + r0:s0 + r0 + rn, 0:d], src=t_sb[0:rn, 0:d])
    return out


@nki.jit
def baseline_prefill_kernel(qT, kT, v, gate, softmax_scale, causal):
    """Prefill on host-prepared inputs: qT [B, H, D, Sq], kT [B, H, D, Skv], v [B, H, Skv, D] (H = Hq)."""
    n_b, n_h, d, sq = qT.shape
    out = nl.ndarray((n_b, n_h, sq, d), dtype=qT.dtype, buffer=nl.shared_hbm)
    prefill_body(qT, kT, v, gate, None, out, softmax_scale, causal, bhds=True)
    return out


def baseline_flash_attention(q, k, v, gate=None, causal=True, softmax_scale=None):
    """Host-permute + expanded-KV baseline of `flash_attention` (bf16/fp16, no valid lengths)."""
    group = q.shape[1] // k.shape[1]
    scale = _scale(q, softmax_scale)
    if group > 1:
        k = call(expand_kv_kernel, k, group, lnc=1)
        v = call(expand_kv_kernel, v, group, lnc=1)
    qT = call(bhsd_to_bhds_kernel, q, lnc=1)
    kT = call(bhsd_to_bhds_kernel, k, lnc=1)
    return call(baseline_prefill_kernel, qT, kT, v, gate, scale, causal, lnc=1)


def baseline_flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None):
    """Expanded-KV baseline of `flash_attention_decode`: every KV head copied per query head, then LNC=1."""
    group = q.shape[1] // k_cache.shape[1]
    scale = _scale(q, softmax_scale)
    if group > 1:
        k_cache = call(expand_kv_kernel, k_cache, group, lnc=1)
        v_cache = call(expand_kv_kernel, v_cache, group, lnc=1)
    return call(flash_attention_decode_kernel, q, k_cache, v_cache, np.asarray(cache_lens, np.int32), scale, causal,
                lnc=1)
