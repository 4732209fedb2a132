"""Microbench cases for the attention family (registered on import).

Qwen3.5-35B-A3B at TP=4, per rank: 4 query heads, 1 KV head, head_dim 256, bf16, sigmoid output gate.
Baseline: what users run today (nki_kernels/attention/baseline.py): the NxDI d=256 kernel's launch pattern, one
LNC=1 launch per (b, KV head), GQA-aware, K DMA-transposed on load. Extra rows "(vs earlier d=256 kernels)": KV
heads expanded and q/k permuted BHSD -> BHDS by separate launches, as in the first d=256 kernels.
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
    from nki_kernels.attention.baseline import nxdi_style_flash_attention
    return nxdi_style_flash_attention(inp["q"], inp["k"], inp["v"], gate=inp["gate"], causal=True)


def _prefill_old_baseline(inp):
    from nki_kernels.attention.baseline import baseline_flash_attention
    return baseline_flash_attention(inp["q"], inp["k"], inp["v"], gate=inp["gate"], causal=True)


_BASELINE = "NxDI d=256 style: per-(b, KV head) launch, LNC=1, K DMA-transposed on load"
_OLD_BASELINE = "earlier d=256 kernels: host permute + expanded KV"
_DEC_BASELINE = "per-(b, KV head) launch, LNC=1 (NxDI launch pattern)"


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


def _register_prefill(sq, skv, label, quick, old=False):
    hq, hkv, d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
    io_bytes = 2 * (3 * hq * sq * d + 2 * hkv * skv * d)    # q, gate, out + k, v (bf16)
    register(BenchCase(
        kernel="flash_attention", shape=f"{_MODEL} {label} causal gated D={d}" + (" (vs earlier d=256 kernels)"
                                                                               if old else ""),
        make_inputs=_prefill_inputs(sq, skv), run=_prefill_run, reference=_prefill_reference,
        flops=_prefill_flops(sq, skv, hq, d), min_hbm_bytes=io_bytes, dtype="bfloat16", quick=quick,
        baseline_name=_OLD_BASELINE if old else _BASELINE,
        baseline_run=_prefill_old_baseline if old else _prefill_baseline,
        tags=dict(sq=sq, skv=skv, hq=hq, hkv=hkv, d=d)))


for _s in PREFILL_LENGTHS:
    _register_prefill(_s, _s, f"Sq=Skv={_s}", quick=_s == min(PREFILL_LENGTHS))
_register_prefill(2048, 2048, "Sq=Skv=2048", quick=False, old=True)
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
    from nki_kernels.attention.baseline import nxdi_style_flash_attention_decode
    return nxdi_style_flash_attention_decode(inp["q"], inp["k"], inp["v"], inp["lens"])


def _decode_old_baseline(inp):
    from nki_kernels.attention.baseline import baseline_flash_attention_decode
    return baseline_flash_attention_decode(inp["q"], inp["k"], inp["v"], inp["lens"])


def _decode_reference(inp):
    from nki_kernels.attention.reference import flash_attention_decode_ref
    return flash_attention_decode_ref(inp["q"], inp["k"], inp["v"], inp["lens"]).astype(np.float32)


for _b, _old in [(b, False) for b in DECODE_BATCHES] + [(min(DECODE_BATCHES), True)]:
    _hq, _hkv, _d = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim
    register(BenchCase(
        kernel="flash_attention_decode", shape=f"{_MODEL} B={_b} S={DECODE_CONTEXT} Sq=1 D={_d}"
                                               + (" (vs earlier d=256 kernels)" if _old else ""),
        make_inputs=_decode_inputs(_b, DECODE_CONTEXT), run=_decode_run, reference=_decode_reference,
        # FLOPs over the whole cache (the kernel reads S_max; the valid lengths are runtime masks)
        flops=4 * _d * _hq * _b * DECODE_CONTEXT,
        min_hbm_bytes=2 * (2 * _b * _hkv * DECODE_CONTEXT * _d + 2 * _b * _hq * _d),
        dtype="bfloat16", quick=_b == min(DECODE_BATCHES) and not _old,
        baseline_name=_OLD_BASELINE.replace("host permute + ", "") if _old else _DEC_BASELINE,
        baseline_run=_decode_old_baseline if _old else _decode_baseline,
        tags=dict(b=_b, s=DECODE_CONTEXT, hq=_hq, hkv=_hkv, d=_d)))


# ---------------------------------------------------------------- packed variable-length attention (issue 20)
# 8 sequences with lengths drawn uniformly in [64, 2048] (fixed seed), packed end to end, against the same batch
# padded to its longest sequence (flash_attention with seq_lens, the padded path). The Qwen3-Omni encoders:
# vision (16 heads, head_dim 72 = 1152 / 16, non-causal per frame: one 448x448 image and a 4-frame video of
# 28 x 28 patches) and audio (20 heads, head_dim 64 = 1280 / 20, non-causal per 104-token window: 2 minutes at
# 13 tokens/s). max_seqlen_q no longer changes the kernel's program (key blocks are skipped on device), so one
# registration per shape.

_VARLEN_LENS = tuple(int(x) for x in np.random.default_rng(20).integers(64, 2049, size=8))
_VISION = dict(lens=(784,) * 5, heads=16, d=72)
_AUDIO = dict(lens=(104,) * 15, heads=20, d=64)


def _cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _varlen_inputs(lens, hq, hkv, d, gated):
    def make(rng):
        t = int(sum(lens))
        inp = dict(q=rng.standard_normal((t, hq, d)).astype(_BF16), k=rng.standard_normal((t, hkv, d)).astype(_BF16),
                   v=rng.standard_normal((t, hkv, d)).astype(_BF16), cu=_cu(lens))
        inp["gate"] = rng.standard_normal((t, hq, d)).astype(_BF16) if gated else None
        return inp
    return make


def _varlen_run(causal, band):
    def run(inp):
        from nki_kernels import flash_attention_varlen
        m = int(np.max(np.diff(inp["cu"]))) if band else None
        return flash_attention_varlen(inp["q"], inp["k"], inp["v"], inp["cu"], inp["cu"], causal=causal,
                                      gate=inp["gate"], max_seqlen_q=m, max_seqlen_k=m)
    return run


def _padded_run(causal):
    """The padded path: [N, H, Lmax, D] right-padded with seq_lens (host packing not modeled), then unpacked."""
    def run(inp):
        from nki_kernels import flash_attention
        cu = inp["cu"]
        lens = np.diff(cu)
        n, lmax = len(lens), int(lens.max())

        def pad(x):
            out = np.zeros((n, x.shape[1], lmax, x.shape[2]), x.dtype)
            for s in range(n):
                out[s, :, :lens[s]] = np.swapaxes(x[cu[s]:cu[s + 1]], 0, 1)
            return out
        gate = None if inp["gate"] is None else pad(inp["gate"])
        o = np.asarray(flash_attention(pad(inp["q"]), pad(inp["k"]), pad(inp["v"]), gate=gate,
                                       seq_lens=lens.astype(np.int32), causal=causal))
        return np.concatenate([np.swapaxes(o[s, :, :lens[s]], 0, 1) for s in range(n)], axis=0)
    return run


def _varlen_reference(causal):
    def ref(inp):
        from nki_kernels.attention.reference import flash_attention_varlen_ref
        return flash_attention_varlen_ref(inp["q"], inp["k"], inp["v"], inp["cu"], inp["cu"], causal=causal,
                                          gate=inp["gate"]).astype(np.float32)
    return ref


def _register_varlen(label, lens, hq, hkv, d, causal, gated, band, quick=False):
    visible = sum(int(np.sum(np.arange(n) + 1)) if causal else n * n for n in lens)
    t = int(sum(lens))
    register(BenchCase(
        kernel="flash_attention_varlen",
        shape=f"{label} N={len(lens)} T={t} {'causal' if causal else 'non-causal'}{' gated' if gated else ''} "
              f"D={d}{' max_seqlen' if band else ''}",
        make_inputs=_varlen_inputs(lens, hq, hkv, d, gated), run=_varlen_run(causal, band),
        reference=_varlen_reference(causal), flops=4 * d * hq * visible,
        min_hbm_bytes=2 * t * d * ((3 if gated else 2) * hq + 2 * hkv), dtype="bfloat16", quick=quick,
        baseline_name="padded to the longest (flash_attention, seq_lens)", baseline_run=_padded_run(causal),
        tags=dict(lens=list(lens), hq=hq, hkv=hkv, d=d, causal=causal, max_seqlen=band)))


_register_varlen(f"{_MODEL} 8 packed in [64, 2048]", _VARLEN_LENS, _SHAPE.q_heads, _SHAPE.kv_heads,
                 _SHAPE.head_dim, causal=True, gated=True, band=True)
_register_varlen("qwen3-omni vision encoder 5 frames of 28x28", _VISION["lens"], _VISION["heads"], _VISION["heads"],
                 _VISION["d"], causal=False, gated=False, band=True)
_register_varlen("qwen3-omni audio encoder 104-token windows", _AUDIO["lens"], _AUDIO["heads"], _AUDIO["heads"],
                 _AUDIO["d"], causal=False, gated=False, band=True)
_register_varlen(f"{_MODEL} small: 4 packed", (120, 17, 64, 40), _SHAPE.q_heads, _SHAPE.kv_heads,
                 _SHAPE.head_dim, causal=True, gated=True, band=True, quick=True)
_register_varlen(f"{_MODEL} serving step: 8 prompts in 512 tokens", (100, 37, 64, 128, 20, 90, 41, 32),
                 _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.head_dim, causal=True, gated=True, band=True)
_THINKER = CATALOGUE["qwen3-omni thinker tp8"]
_register_varlen("qwen3-omni thinker tp8 serving step: 8 prompts in 512 tokens", (100, 37, 64, 128, 20, 90, 41, 32),
                 _THINKER.q_heads, _THINKER.kv_heads, _THINKER.head_dim, causal=True, gated=False, band=True)
