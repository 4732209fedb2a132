"""fp8 weights for the code predictor: what per-channel e4m3 quantization does to the codes, and what it saves.

`python -m nki_kernels.codepredictor.fp8_study [--seeds N] [--batch B]` prints (1) the code agreement between the
float64 reference run on the bf16 weights and on the same weights quantized to float8_e4m3 with one fp32 scale
per output channel (column of each [in, out] matrix: q/k/v, o, gate/up, down and the LM heads), over N random
weight sets at the real widths (H=1024, 16 / 8 heads of 128, I=3072, 5 layers, 15 codes, V=2048) with B random
prompts each; (2) each layer-matrix set's resident SBUF bytes per partition per TP degree, bf16 vs fp8 (+ its
scales), against the SBUF of one NeuronCore.

Agreement is measured teacher-forced (each step's logits from the bf16 run's own earlier codes, so one flip does
not change every later step) and free-running (the whole frame's 15 codes equal). The kernel itself does not take
fp8 weights yet: this is the measurement that decides whether it should (Qwen3-Omni ships bf16; fp8 would be
the user's choice, e.g. to keep a TP=4 rank's weights resident).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import ml_dtypes
import numpy as np

from ..hw import SBUF_BYTES_PER_PARTITION
from .reference import code_predictor_reference
from .weights import CodePredictorWeights, random_weights, shard_weights

FP8 = np.dtype(ml_dtypes.float8_e4m3)
FP8_MAX = 240.0          # largest finite float8_e4m3 (IEEE-style, as ml_dtypes and NeuronCore-v3 define it)
_MATRICES = ("wqkv_t", "wo_t", "wgu_t", "wd_t", "lm_head_t")
_K_TILE = 128


def quantize_per_channel(w_t: np.ndarray):
    """[..., in, out] weights -> (fp8 [..., in, out], fp32 scales [..., 1, out]) with w ~ q * scale: each output
    channel scaled so that its largest magnitude maps to FP8_MAX."""
    x = np.asarray(w_t, np.float32)
    amax = np.max(np.abs(x), axis=-2, keepdims=True)
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    return (x / scale).astype(FP8), scale


def fp8_weights(w: CodePredictorWeights) -> CodePredictorWeights:
    """w with every matrix replaced by its per-channel fp8 quantization, dequantized to fp32 (for the reference)."""
    out = {}
    for name in _MATRICES:
        q, s = quantize_per_channel(getattr(w, name))
        out[name] = q.astype(np.float32) * s
    return replace(w, **out)


def agreement(seeds: int, batch: int, *, layers=5, groups=15):
    """(teacher-forced agreement, free-running frame agreement, worst teacher-forced seed) over `seeds` weight sets."""
    tf, fr, worst = [], [], 1.0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        w = random_weights(rng, hidden=1024, n_q_heads=16, n_kv_heads=8, head_dim=128, intermediate=3072,
                           n_layers=layers, n_groups=groups, vocab=2048)
        ph = rng.standard_normal((batch, w.hidden)).astype(np.float32)
        c0 = rng.standard_normal((batch, w.hidden)).astype(np.float32)
        ref = code_predictor_reference(ph, c0, w)[0]
        w8 = fp8_weights(w)
        forced = code_predictor_reference(ph, c0, w8, forced_codes=ref)[0]
        free = code_predictor_reference(ph, c0, w8)[0]
        a = float(np.mean(forced == ref))
        tf.append(a)
        worst = min(worst, a)
        fr.append(float(np.mean(np.all(free == ref, axis=1))))
    return float(np.mean(tf)), float(np.mean(fr)), worst


def resident_table(w: CodePredictorWeights, tps=(1, 2, 4, 8)):
    """Rows (TP, bf16 bytes per partition, fp8 + scales bytes per partition, SBUF bytes per partition)."""
    rows = []
    sbuf = SBUF_BYTES_PER_PARTITION["trn2"]
    for tp in tps:
        s = shard_weights(w, tp, 0)
        elems = sum(getattr(s, n).size for n in ("wqkv_t", "wo_t", "wgu_t", "wd_t"))
        out_cols = sum(getattr(s, n).shape[0] * getattr(s, n).shape[2] for n in ("wqkv_t", "wo_t", "wgu_t", "wd_t"))
        bf16 = 2 * elems // _K_TILE
        fp8 = elems // _K_TILE + 4 * out_cols // _K_TILE   # + one fp32 scale per output channel; outputs land
        #                                                  feature-major (channel on a partition): [128, out / 128]
        rows.append((tp, bf16, fp8, sbuf))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    tf, fr, worst = agreement(args.seeds, args.batch)
    print(f"fp8 e4m3 per-channel weights vs bf16, float64 reference, {args.seeds} weight sets x {args.batch} "
          f"prompts, 15 codes each:")
    print(f"  teacher-forced code agreement {tf:.2%} (worst weight set {worst:.2%}); whole frames equal "
          f"(free-running) {fr:.2%}")
    w = random_weights(np.random.default_rng(0), hidden=1024, n_q_heads=16, n_kv_heads=8, head_dim=128,
                       intermediate=3072, n_layers=5, n_groups=15, vocab=2048)
    print("resident layer matrices per rank, bytes per SBUF partition (trn2 SBUF "
          f"{SBUF_BYTES_PER_PARTITION['trn2']} B per partition):")
    for tp, bf16, fp8, sbuf in resident_table(w):
        print(f"  TP={tp}: bf16 {bf16} ({bf16 / sbuf:.2f} of SBUF), fp8 + scales {fp8} ({fp8 / sbuf:.2f}); "
              f"per core under the LNC=2 heads split: bf16 {bf16 // 2}, fp8 {fp8 // 2}")


if __name__ == "__main__":
    main()
