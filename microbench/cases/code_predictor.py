"""Microbench cases for the code_predictor family (registered on import).

Real Qwen3-Omni code-predictor sizes (H=1024, 16 q / 8 kv heads of 128, I=3072, 5 layers, 15 steps, V=2048), full
frames (all 15 codes; the --quick case: 1 layer x 3 codes): TP=1 (the whole model on one logical core) and TP=8
(`code_predictor_tp`: all 8 ranks, each with its shard (2 q / 1 kv heads, I=384, 256 LM-head rows per step: the chosen
layout, see docs/code_predictor.md), the o_proj / down_proj all-reduces and the logits all-gathers in-kernel and
costed; the launch's time is its slowest rank). The TP=8 baselines run replicated LM heads (their kernels have no
vocab exchange), with their all-reduces. The LNC is the wrapper's default (resolve_lnc: 2 on trn2; the batch rows are
split between the two cores). Greedy decoding unless the label says "sample". Baselines, at the same TP with their
collectives and at LNC=1: the no-KV-cache G-slot re-prefill in one launch, and the cached algorithm as 15 separate
launches.
"""
from __future__ import annotations

import numpy as np

from microbench.registry import BenchCase, register
from microbench.shapes import CATALOGUE

_B_LIST = (1, 8, 32)
_SHAPE = CATALOGUE["qwen3-omni code predictor tp1"]
_CACHE: dict = {}


_FULL = (_SHAPE.layers, _SHAPE.code_groups - 1)     # (layers, residual codes per frame) of the real model
_QUICK = (1, 3)                                      # the --quick case: real widths, 1 layer, 3 codes


def _full_weights(depth=_FULL):
    key = ("w", depth)
    if key not in _CACHE:
        from nki_kernels.codepredictor import random_weights
        rng = np.random.default_rng(2026)
        _CACHE[key] = random_weights(rng, hidden=_SHAPE.hidden, n_q_heads=_SHAPE.q_heads,
                                     n_kv_heads=_SHAPE.kv_heads, head_dim=_SHAPE.head_dim,
                                     intermediate=_SHAPE.mlp_inter, n_layers=depth[0], n_groups=depth[1],
                                     vocab=_SHAPE.vocab)
    return _CACHE[key]


def _shards(w, tp, vocab_sharded):
    key = ("shards", id(w), tp, vocab_sharded)
    if key not in _CACHE:
        from nki_kernels.codepredictor import shard_weights
        _CACHE[key] = [shard_weights(w, tp, r, vocab_sharded=vocab_sharded) for r in range(tp)]
    return _CACHE[key]


def _make(B, tp, sample, depth=_FULL):
    def make_inputs(rng):
        w = _full_weights(depth)
        ph = rng.standard_normal((B, w.hidden)).astype(np.float32)
        c0 = rng.standard_normal((B, w.hidden)).astype(np.float32)
        u = rng.random((B, w.n_groups)).astype(np.float32)
        kw = dict(uniforms=u, do_sample=True, temperature=0.9, top_k=50, top_p=0.8) if sample else {}
        return dict(past_hidden=ph, code0_embed=c0, weights=w, tp=tp, kw=kw)
    return make_inputs


def _run(inputs):
    from nki_kernels.codepredictor import code_predictor
    from nki_kernels.codepredictor.unrolled import code_predictor_tp
    if inputs["tp"] == 1:
        return code_predictor(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"], **inputs["kw"])
    shards = _shards(inputs["weights"], inputs["tp"], True)
    return code_predictor_tp(inputs["past_hidden"], inputs["code0_embed"], shards, **inputs["kw"])


def _run_reprefill(inputs):
    from nki_kernels.codepredictor import baselines
    if inputs["tp"] == 1:
        return baselines.code_predictor_reprefill(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"],
                                                  **inputs["kw"])
    return baselines.code_predictor_reprefill_tp(inputs["past_hidden"], inputs["code0_embed"],
                                                 _shards(inputs["weights"], inputs["tp"], False), **inputs["kw"])


def _run_per_step(inputs):
    from nki_kernels.codepredictor import baselines
    if inputs["tp"] == 1:
        return baselines.code_predictor_per_step(inputs["past_hidden"], inputs["code0_embed"], inputs["weights"],
                                                 **inputs["kw"])
    return baselines.code_predictor_per_step_tp(inputs["past_hidden"], inputs["code0_embed"],
                                                _shards(inputs["weights"], inputs["tp"], False), **inputs["kw"])


def _reference_inputs(inputs):
    return {"inputs": inputs}


_NEAR_TIE = 0.03          # a pick may trail the k-th best reference logit by this fraction of the RMS logit
                          # (greedy flips of random configs trail by up to 2.2%: tests/codepredictor/test_unrolled.py)
_MAX_TIE_FLIPS = 0.05     # ... but at most this share of greedy picks (and at least one) may differ from the argmax


def _check(ref, out):
    """Teacher-forced on the kernel's codes (free-running rows diverge after one bf16 near-tie flip, since every
    later step sees a different prefix): the float64 reference recomputes each step's logits from the kernel's
    own earlier codes. Greedy: every code is the reference argmax or trails it by less than 3% of the RMS logit,
    and at most 5% of them (at least one allowed) are such near-ties; sampling: every code lies in the reference
    top-k with the same margin (the exact sampling procedure is tested in tests/codepredictor). The embedding rows
    must be exactly the tables' rows of the returned codes."""
    from nki_kernels.codepredictor.reference import code_predictor_reference
    inp = ref["inputs"]
    codes = np.asarray(out[0])
    kw = inp["kw"]
    _, _, lg = code_predictor_reference(inp["past_hidden"], inp["code0_embed"], inp["weights"], forced_codes=codes,
                                        return_logits=True, **kw)
    k = kw["top_k"] if kw.get("do_sample") else 1
    picked = np.take_along_axis(lg, codes[..., None], axis=-1)[..., 0]
    kth = np.sort(lg, axis=-1)[..., -k]
    margin = _NEAR_TIE * np.sqrt(np.mean(lg * lg, axis=-1))
    bad = np.argwhere(picked < kth - margin)
    if bad.size:
        b, j = bad[0]
        raise AssertionError(f"row {b} step {j}: code {codes[b, j]} is outside the reference top-{k} "
                             f"(logit {picked[b, j]:.4f} vs {kth[b, j]:.4f})")
    flips = int(np.sum(picked < kth))
    if k == 1 and flips > max(1, int(_MAX_TIE_FLIPS * picked.size)):
        raise AssertionError(f"code_predictor: {flips} of {picked.size} greedy codes are near-ties, not the "
                             "reference argmax")
    tables = np.asarray(inp["weights"].codec_embed)
    want = np.stack([tables[j][codes[:, j]] for j in range(codes.shape[1])], axis=1)
    if not np.array_equal(np.asarray(out[1]), want):
        raise AssertionError("codec_embeds are not the table rows of the returned codes")


def _cost(B, tp, depth=_FULL):
    """Useful FLOPs and minimum HBM bytes of a full frame, per rank: the frame's totals divided by `tp`.

    The totals are the model's math and its weights read once (layers, the G1 LM heads, the frame's inputs and
    outputs), whatever layout the kernel picks. The case's modeled time is the frame time with all `tp` ranks
    running in parallel, and the runner's roofline counts one rank's `lnc` cores, so the per-rank share of the
    totals is the roofline of the whole `tp`-rank group."""
    H, D, V = _SHAPE.hidden, _SHAPE.head_dim, _SHAPE.vocab
    L, G1 = depth
    hq, hkv, inter = _SHAPE.q_heads, _SHAPE.kv_heads, _SHAPE.mlp_inter
    layer_params = H * (hq + 2 * hkv) * D + hq * D * H + 3 * H * inter
    tokens = B * (G1 + 1)
    flops = 2 * layer_params * L * tokens + 2 * H * V * B * G1
    flops += L * B * sum(4 * hq * D * (t + 1) for t in range(G1 + 1))        # attention scores + PV
    hbm = 2 * (layer_params * L + G1 * H * V) + 2 * B * G1 * H * 2 + 4 * B * H * 2 + 4 * B * G1
    return -(-flops // tp), -(-hbm // tp)


def _register():
    for tp in (1, 8):
        label = "tp1" if tp == 1 else f"tp{tp} all ranks + collectives, LM heads vocab-sharded"
        for B in _B_LIST:
            flops, hbm = _cost(B, tp)
            base = dict(kernel="code_predictor", make_inputs=_make(B, tp, False), run=_run,
                        reference=_reference_inputs, flops=flops, min_hbm_bytes=hbm, dtype="bfloat16", check=_check,
                        tags=dict(tp=tp, B=B))
            quick = False
            with_base = not (tp == 1 and B == 32)      # emulation time budget
            register(BenchCase(shape=f"qwen3-omni code predictor {label} B={B} greedy", quick=quick,
                               baseline_name="no-KV-cache 16-slot re-prefill, 1 launch" if with_base else None,
                               baseline_run=_run_reprefill if with_base else None, **base))
            if B == 1:
                register(BenchCase(shape=f"qwen3-omni code predictor {label} B={B} greedy vs per-step launches",
                                   baseline_name="cached, 15 launches (KV cache via HBM)",
                                   baseline_run=_run_per_step, **base))
        if tp == 8:
            flops, hbm = _cost(1, tp)
            register(BenchCase(kernel="code_predictor",
                               shape=f"qwen3-omni code predictor {label} B=1 sample top_k=50 top_p=0.8",
                               make_inputs=_make(1, tp, True), run=_run, reference=_reference_inputs,
                               flops=flops, min_hbm_bytes=hbm, dtype="bfloat16", check=_check,
                               tags=dict(tp=tp, B=1, sample=True)))
    # --quick: the TP=8 B=1 layout (all 8 ranks, collectives) at real widths but 1 layer and 3 codes, so that
    # the quick run stays short (the full frame emulates 8 ranks x 5 layers x 16 passes)
    flops, hbm = _cost(1, 8, _QUICK)
    register(BenchCase(shape=f"qwen3-omni code predictor tp8 all ranks + collectives, LM heads vocab-sharded B=1 "
                             f"greedy, {_QUICK[0]} layer x {_QUICK[1]} codes (quick)", quick=True,
                       kernel="code_predictor", make_inputs=_make(1, 8, False, _QUICK), run=_run,
                       reference=_reference_inputs, flops=flops, min_hbm_bytes=hbm, dtype="bfloat16", check=_check,
                       tags=dict(tp=8, B=1)))


_register()
