"""Microbench baseline for the attention kernels: the approach of the earlier d=256 kernels.

The same flash-attention algorithm (the same kernel bodies), but the host side first expands the KV heads
(one copy per query head) and permutes BHSD -> BHDS so the kernel can load Q^T / K^T with plain copies. The
expansion and the permute run as their own device launches (HBM -> SBUF -> HBM copies), so the modeled time
includes the traffic they cost. Not a public API; used by microbench/cases/attention.py only.
"""
from __future__ import annotations

import math

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from .decode import decode_body
from .prefill import prefill_body

_PERMUTE_KEYS = 2048              # sequence positions per permute tile (>= 2 KiB per partition for bf16)


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


@nki.jit
def baseline_decode_kernel(q, kT_cache, v_cache, cache_lens, softmax_scale, causal):
    """Decode on host-prepared caches: kT_cache [B, Hq, D, S], v_cache [B, Hq, S, D] (KV expanded)."""
    out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    decode_body(q, kT_cache, v_cache, cache_lens, out, softmax_scale, causal, k_is_bhds=True)
    return out


def baseline_flash_attention(q, k, v, gate=None, causal=True, softmax_scale=None):
    """Host-permute + expanded-KV baseline of `flash_attention` (bf16/fp16, no valid lengths)."""
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if group > 1:
        k = call(expand_kv_kernel, k, group, lnc=1)
        v = call(expand_kv_kernel, v, group, lnc=1)
    qT = call(bhsd_to_bhds_kernel, q, lnc=1)
    kT = call(bhsd_to_bhds_kernel, k, lnc=1)
    return call(baseline_prefill_kernel, qT, kT, v, gate, scale, causal, lnc=1)


def baseline_flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None):
    """Host-permute + expanded-KV baseline of `flash_attention_decode` (bf16/fp16)."""
    import numpy as np
    group = q.shape[1] // k_cache.shape[1]
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if group > 1:
        k_cache = call(expand_kv_kernel, k_cache, group, lnc=1)
        v_cache = call(expand_kv_kernel, v_cache, group, lnc=1)
    kT = call(bhsd_to_bhds_kernel, k_cache, lnc=1)
    return call(baseline_decode_kernel, q, kT, v_cache, np.asarray(cache_lens, np.int32), scale, causal, lnc=1)
