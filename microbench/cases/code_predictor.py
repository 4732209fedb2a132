"""Microbench cases for the code_predictor family (registered on import).

Real Qwen3-Omni code-predictor sizes (H=1024, 16 q / 8 kv heads of 128, I=3072, 5 layers, 15 steps, V=2048)
per rank: TP=1 (the whole model on one core) and one TP=8 rank (2 q / 1 kv heads, I=384; its o_proj/down
outputs are partial sums whose all-reduce is NOT modeled), with the 15 LM heads replicated (V=2048 rows) or
vocab-sharded (256 rows per rank; the cross-rank argmax/sampling exchange is NOT modeled). Greedy decoding
unless the label says "sample". Baselines: the no-KV-cache G-slot re-prefill in one launch, and the cached
algorithm as 15 separate launches.
"""
from __future__ import annotations

import numpy as np

from microbench.registry import BenchCase, register
from microbench.shapes import CATALOGUE

_B_LIST = (1, 8, 32)
_SHAPE = CATALOGUE["qwen3-omni code predictor tp1"]
_CACHE: dict = {}


def _weights(tp, vocab_sharded):
    key = (tp, vocab_sharded)
    if key not in _CACHE:
        from nki_kernels.codepredictor import random_weights, shard_weights
        rng = np.random.default_rng(2026)
        w = random_weights(rng, hidden=_SHAPE.hidden, n_q_heads=_SHAPE.q_heads, n_kv_heads=_SHAPE.kv_heads,
                           head_dim=_SHAPE.head_dim, intermediate=_SHAPE.mlp_inter, n_layers=_SHAPE.layers,
                           n_groups=_SHAPE.code_groups - 1, vocab=_SHAPE.vocab)
        _CACHE[key] = shard_weights(w, tp, 0, vocab_sharded=vocab_sharded) if (tp > 1 or vocab_sharded) else w
    return _CACHE[key]


def _make(B, tp, vocab_sharded, sample):
    def make_inputs(rng):
        w = _weights(tp, vocab_sharded)
        ph = rng.standard_normal((B, w.hidden)).astype(np.float32)
        c0 = rng.standard_normal((B, w.hidden)).astype(np.float32)
        u = rng.random((B, w.n_groups)).astype(np.float32)
        kw = dict(uniforms=u, do_sample=True, temperature=0.9, top_k=50, top_p=0.8) if sample else {}
        return dict(past_hidden=ph, code0_embed=c0, weights=w, kw=kw)
    return make_inputs


def _run(inputs):
    from nki_kernels.codepredictor import code_predictor
    return code_predictor(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"], **inputs["kw"])


def _run_reprefill(inputs):
    from nki_kernels.codepredictor.baselines import code_predictor_reprefill
    return code_predictor_reprefill(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"], **inputs["kw"])


def _run_per_step(inputs):
    from nki_kernels.codepredictor.baselines import code_predictor_per_step
    return code_predictor_per_step(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"], **inputs["kw"])


def _reference(inputs):
    from nki_kernels.codepredictor.reference import code_predictor_reference
    return code_predictor_reference(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"], **inputs["kw"])


def _check(ref, out):
    """Codes: >= 90% equal to the float64 reference (bf16 near-ties flip a few and the rest of that row then
    follows a different prefix); embeddings of rows whose codes all match within bf16 tolerance."""
    from nki_kernels.testing import assert_close
    codes, emb = np.asarray(out[0]), np.asarray(out[1], dtype=np.float64)
    rc, re = np.asarray(ref[0]), np.asarray(ref[1])
    same = float(np.mean(codes == rc))
    if same < 0.9:
        raise AssertionError(f"code_predictor: only {same:.1%} of codes equal the reference")
    rows = np.all(codes == rc, axis=1)
    if rows.any():
        assert_close("codec_embeds", re[rows], emb[rows], dtype="bfloat16")


def _reference_inputs(inputs):
    return {"inputs": inputs}


def _check_sample(ref, out):
    """Sampling flips under bf16-level logit differences (a 1% change in a probability moves the inverse-CDF
    boundaries), so free-running sequences diverge; the exact procedure is tested in tests/codepredictor.
    Here, teacher-forced on the kernel's codes: every sampled code must lie in the reference's top-k (with a
    near-tie margin) and the embedding rows must be exactly the tables' rows of those codes."""
    from nki_kernels.codepredictor.reference import code_predictor_reference
    inp = ref["inputs"]
    codes = np.asarray(out[0])
    kw = inp["kw"]
    _, _, lg = code_predictor_reference(inp["past_hidden"], inp["code0_embed"], inp["weights"], forced_codes=codes,
                                        return_logits=True, **kw)
    k = kw["top_k"]
    for b in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            l = lg[b, j]
            kth = np.sort(l)[::-1][k - 1]
            if l[codes[b, j]] < kth - 0.01 * np.sqrt(np.mean(l * l)):
                raise AssertionError(f"row {b} step {j}: sampled code {codes[b, j]} is outside the reference top-{k}")
    tables = np.asarray(inp["weights"].codec_embed)
    want = np.stack([tables[j][codes[:, j]] for j in range(codes.shape[1])], axis=1)
    if not np.array_equal(np.asarray(out[1]), want):
        raise AssertionError("codec_embeds are not the table rows of the sampled codes")


def _cost(B, tp, vocab_sharded):
    H, D, L, G1, V = _SHAPE.hidden, _SHAPE.head_dim, _SHAPE.layers, _SHAPE.code_groups - 1, _SHAPE.vocab
    hq, hkv, inter = _SHAPE.q_heads // tp, _SHAPE.kv_heads // tp, _SHAPE.mlp_inter // tp
    vh = V // tp if vocab_sharded else V
    layer_params = H * (hq + 2 * hkv) * D + hq * D * H + 3 * H * inter
    tokens = B * (G1 + 1)
    flops = 2 * layer_params * L * tokens + 2 * H * vh * B * G1
    flops += L * B * sum(4 * hq * D * (t + 1) for t in range(G1 + 1))        # attention scores + PV
    hbm = 2 * (layer_params * L + G1 * H * vh) + 2 * B * G1 * H * 2 + 4 * B * H * 2 + 4 * B * G1
    return flops, hbm


def _register():
    variants = [(1, False, "tp1"), (8, False, "tp8 rank, LM heads replicated"),
                (8, True, "tp8 rank, LM heads vocab-sharded")]
    for tp, vs, label in variants:
        for B in (_B_LIST if not vs else _B_LIST[:2]):
            flops, hbm = _cost(B, tp, vs)
            base = dict(kernel="code_predictor", make_inputs=_make(B, tp, vs, False), run=_run,
                        reference=_reference, flops=flops, min_hbm_bytes=hbm, dtype="bfloat16", check=_check,
                        tags=dict(tp=tp, B=B, vocab_sharded=vs))
            quick = tp == 8 and not vs and B == 1
            with_base = not vs and not (tp == 1 and B == 32)      # emulation time budget
            register(BenchCase(shape=f"qwen3-omni code predictor {label} B={B} greedy", quick=quick,
                               baseline_name="no-KV-cache 16-slot re-prefill, 1 launch" if with_base else None,
                               baseline_run=_run_reprefill if with_base else None, **base))
            if B == 1 and not vs:
                register(BenchCase(shape=f"qwen3-omni code predictor {label} B={B} greedy vs per-step launches",
                                   baseline_name="cached, 15 launches (KV cache via HBM)",
                                   baseline_run=_run_per_step, **base))
        if tp == 8 and not vs:
            for B in (1,):
                flops, hbm = _cost(B, tp, vs)
                register(BenchCase(kernel="code_predictor",
                                   shape=f"qwen3-omni code predictor {label} B={B} sample top_k=50 top_p=0.8",
                                   make_inputs=_make(B, tp, vs, True), run=_run, reference=_reference_inputs,
                                   flops=flops, min_hbm_bytes=hbm, dtype="bfloat16", check=_check_sample,
                                   tags=dict(tp=tp, B=B, sample=True)))


_register()
