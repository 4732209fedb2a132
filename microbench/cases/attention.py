"""Microbench cases for the attention family (registered on import).

Qwen3.5-35B-A3B at TP=4, per rank: 4 query heads, 1 KV head, head_dim 256, bf16, sigmoid output gate.
Baseline: the same algorithm with KV heads expanded and q/k permuted BHSD -> BHDS by separate launches
(nki_kernels/attention/baseline.py), as in the earlier d=256 kernels.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from microbench.registry import BenchCase, register
from microbench.shapes import CATALOGUE, DECODE_BATCHES, DECODE_CONTEXT, PREFILL_LENGTHS

_MODEL = "qwen3.5-35b-a3b tp4"
_SHAPE = CATALOGUE[_MODEL]
_BF16 = ml_dtypes.bfloat16
_REF_Q_BLOCK = 512                # query rows per reference block (bounds the float64 logits in memory)


def _prefill_inputs(sq, skv):
    def make(rng):
        hq, hkv, d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
        return dict(q=rng.standard_normal((1, hq, sq, d)).astype(_BF16),
                    k=rng.standard_normal((1, hkv, skv, d)).astype(_BF16),
                    v=rng.standard_normal((1, hkv, skv, d)).astype(_BF16),
                    gate=rng.standard_normal((1, hq, sq, d)).astype(_BF16))
    return make


def _prefill_run(inp):
    from nki_kernels import flash_attention
    return flash_attention(inp["q"], inp["k"], inp["v"], gate=inp["gate"], causal=True)


def _prefill_baseline(inp):
    from nki_kernels.attention.baseline import baseline_flash_attention
    return baseline_flash_attention(inp["q"], inp["k"], inp["v"], gate=inp["gate"], causal=True)


def _prefill_reference(inp):
    """float64 reference in query blocks: block rows are the last positions of k[:, :, :end] (bottom-right)."""
    from nki_kernels.attention.reference import flash_attention_ref
    q, k, v, gate = inp["q"], inp["k"], inp["v"], inp["gate"]
    sq, skv = q.shape[2], k.shape[2]
    parts = []
    for r0 in range(0, sq, _REF_Q_BLOCK):
        r1 = min(sq, r0 + _REF_Q_BLOCK)
        end = skv - sq + r1
        parts.append(flash_attention_ref(q[:, :, r0:r1], k[:, :, :end], v[:, :, :end], gate=gate[:, :, r0:r1],
                                         causal=True).astype(np.float32))
    return np.concatenate(parts, axis=2)


def _prefill_flops(sq, skv, hq, d):
    """Useful FLOPs of causal attention: 2 matmuls x 2 FLOPs x D per (query, visible key) pair."""
    visible = int(np.sum(np.arange(sq) + (skv - sq) + 1))
    return 4 * d * hq * visible


def _register_prefill(sq, skv, label, quick):
    hq, hkv, d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
    io_bytes = 2 * (3 * hq * sq * d + 2 * hkv * skv * d)    # q, gate, out + k, v (bf16)
    register(BenchCase(
        kernel="flash_attention", shape=f"{_MODEL} {label} causal gated D={d}",
        make_inputs=_prefill_inputs(sq, skv), run=_prefill_run, reference=_prefill_reference,
        flops=_prefill_flops(sq, skv, hq, d), min_hbm_bytes=io_bytes, dtype="bfloat16", quick=quick,
        baseline_name="host permute + expanded KV", baseline_run=_prefill_baseline,
        tags=dict(sq=sq, skv=skv, hq=hq, hkv=hkv, d=d)))


for _s in PREFILL_LENGTHS:
    _register_prefill(_s, _s, f"Sq=Skv={_s}", quick=_s == min(PREFILL_LENGTHS))
_register_prefill(512, 8192, "chunked Sq=512 after 7680 cached", quick=False)


def _decode_inputs(b, s):
    def make(rng):
        hq, hkv, d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
        return dict(q=rng.standard_normal((b, hq, 1, d)).astype(_BF16),
                    k=rng.standard_normal((b, hkv, s, d)).astype(_BF16),
                    v=rng.standard_normal((b, hkv, s, d)).astype(_BF16),
                    lens=rng.integers(s - s // 8, s + 1, size=b).astype(np.int32))
    return make


def _decode_run(inp):
    from nki_kernels import flash_attention_decode
    return flash_attention_decode(inp["q"], inp["k"], inp["v"], inp["lens"])


def _decode_baseline(inp):
    from nki_kernels.attention.baseline import baseline_flash_attention_decode
    return baseline_flash_attention_decode(inp["q"], inp["k"], inp["v"], inp["lens"])


def _decode_reference(inp):
    from nki_kernels.attention.reference import flash_attention_decode_ref
    return flash_attention_decode_ref(inp["q"], inp["k"], inp["v"], inp["lens"]).astype(np.float32)


for _b in DECODE_BATCHES:
    _hq, _hkv, _d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
    register(BenchCase(
        kernel="flash_attention_decode", shape=f"{_MODEL} B={_b} S={DECODE_CONTEXT} Sq=1 D={_d}",
        make_inputs=_decode_inputs(_b, DECODE_CONTEXT), run=_decode_run, reference=_decode_reference,
        # FLOPs over the whole cache (the kernel reads S_max; the valid lengths are runtime masks)
        flops=4 * _d * _hq * _b * DECODE_CONTEXT,
        min_hbm_bytes=2 * (2 * _b * _hkv * DECODE_CONTEXT * _d + 2 * _b * _hq * _d),
        dtype="bfloat16", quick=_b == min(DECODE_BATCHES),
        baseline_name="host permute + expanded KV", baseline_run=_decode_baseline,
        tags=dict(b=_b, s=DECODE_CONTEXT, hq=_hq, hkv=_hkv, d=_d)))
