"""Microbench cases for the moe family (registered on import).

Shapes (per rank, from microbench/shapes.py): Qwen3.5-35B-A3B at TP=4 (E=256, TOPK=8, H=2048, I=128, shared 128),
Qwen3-Omni thinker at TP=8 (E=128, TOPK=8, H=2048, I=96, no shared expert) and talker at TP=8 (E=128, TOPK=6,
H=1024, I=48, shared 96). Prefill T in {128, 1024, 4096} through moe_block_mapping + moe_blockwise with the
block size from `prefill_block_size`; decode T in {1, 8, 32} through moe_decode. Routing: moe_route on random
logits (near-uniform expert load).

Roofline bytes: the expected touched experts' weights (E * (1 - (1 - TOPK/E)^T) experts, uniform routing) +
shared expert + hidden in + output out. FLOPs: 2 * T * TOPK * 3 * H * I (+ shared 2 * T * (3 * H * Is + H)).

Baselines (real kernels): prefill "I padded to 256, block 512" = moe_blockwise on zero-padded weights (the NxDI
shard-on-I configuration); "all-experts dense loop" = moe_blockwise with every expert's block holding every token
(dense affinities, 0 where not routed), at T = 128 and in decode (T <= 32) only, because it is E x the work; the
padded baseline runs up to T = 1024 (emulation time). Decode: the headline baseline is what NxD runs at token
generation (`nxd_decode_baseline`): selective loading (`nki_kernels.moe.baseline`) when T*TOPK/E < 1, else the
all-experts loop; where it is selective loading, the all-experts loop stays as an extra "(vs all-experts loop,
former baseline)" row.
"""
from __future__ import annotations

import math
import sys

import ml_dtypes
import numpy as np

from microbench.registry import BenchCase, register
from microbench.shapes import CATALOGUE, DECODE_BATCHES

_BF16 = ml_dtypes.bfloat16
_PREFILL_T = (128, 1024, 4096)
_PADDED_I = 256            # NxDI qwen3_moe pads I_TP to a multiple of 256 (SHARD_ON_INTERMEDIATE_DIMENSION_PER_TP)
_PADDED_BLOCK = 512        # NxDI's default block size
_DENSE_BASELINE_MAX_T = 128
_BOTH_COMBINES_T = (1024, 4096)   # prefill T whose cases are also run with each combine forced
_PADDED_BASELINE_MAX_T = 1024   # the padded baseline (2x the weight bytes, 512-slot blocks) is emulated up to here
_MODELS = (("qwen3.5-35b-a3b tp4", "qwen3.5-35b-a3b tp4"),
           ("qwen3-omni thinker tp8", "qwen3-omni thinker tp8"),
           ("qwen3-omni talker tp8", "qwen3-omni talker tp8"))


def prefill_block_size(n_tokens: int, top_k: int, n_experts: int) -> int:
    """Block size for T tokens: mean tokens per expert m = T*TOPK/E plus 2 sigma (Poisson), rounded up to 16,
    within [32, 512]; most experts then fit in one block (weights streamed once) without much padding."""
    m = n_tokens * top_k / n_experts
    b = int(math.ceil((m + 2.0 * math.sqrt(m)) / 16.0)) * 16
    return max(32, min(512, b))


def _inputs(shape, n_tokens):
    def make(rng):
        h, e, i, k, si = shape.hidden, shape.experts, shape.expert_inter, shape.top_k, shape.shared_inter
        from nki_kernels import moe_route
        x = rng.standard_normal((n_tokens, h)).astype(_BF16)
        gate_up = (rng.standard_normal((e, h, 2, i), dtype=np.float32) / np.sqrt(h)).astype(_BF16)
        down = (rng.standard_normal((e, i, h), dtype=np.float32) / np.sqrt(i)).astype(_BF16)
        w, idx = moe_route(rng.standard_normal((n_tokens, e)), k, shape.normalize_topk)
        d = dict(hidden=x, gate_up=gate_up, down=down, top_k_weights=w.astype(_BF16), top_k_index=idx)
        if si:
            d["shared"] = ((rng.standard_normal((h, 2, si), dtype=np.float32) / np.sqrt(h)).astype(_BF16),
                           (rng.standard_normal((si, h), dtype=np.float32) / np.sqrt(si)).astype(_BF16),
                           (rng.standard_normal(h, dtype=np.float32) / np.sqrt(h)).astype(_BF16))
        return d
    return make


def _reference(x):
    """float32 NumPy MoE grouped by expert (fine for the bench's large shapes; tests use the float64 reference)."""
    hid = np.asarray(x["hidden"], np.float32)
    idx, w = x["top_k_index"], np.asarray(x["top_k_weights"], np.float32)
    out = np.zeros_like(hid)
    for e in np.unique(idx):
        t, j = np.nonzero(idx == e)
        gu = np.asarray(x["gate_up"][e], np.float32)
        g, u = hid[t] @ gu[:, 0], hid[t] @ gu[:, 1]
        y = (g / (1 + np.exp(-g)) * u) @ np.asarray(x["down"][e], np.float32)
        np.add.at(out, t, w[t, j][:, None] * y)
    if "shared" in x:
        s_gu, s_dn, s_g = (np.asarray(a, np.float32) for a in x["shared"])
        g, u = hid @ s_gu[:, 0], hid @ s_gu[:, 1]
        gate = 1 / (1 + np.exp(-(hid @ s_g)))
        out += gate[:, None] * ((g / (1 + np.exp(-g)) * u) @ s_dn)
    return out


def _costs(shape, n_tokens):
    h, e, i, k, si = shape.hidden, shape.experts, shape.expert_inter, shape.top_k, shape.shared_inter
    touched = e * (1.0 - (1.0 - k / e) ** n_tokens)
    w_bytes = int(touched * 3 * h * i * 2) + (3 * h * si + h) * 2 * (si > 0)
    io = 2 * n_tokens * h * 2 + n_tokens * k * 8
    flops = 2 * n_tokens * k * 3 * h * i + (2 * n_tokens * (3 * h * si + h) if si else 0)
    return flops, w_bytes + io


def _blockwise(x, block_size, gate_up=None, down=None, shared=None, combine="auto"):
    from nki_kernels import moe_block_mapping, moe_blockwise
    gate_up = x["gate_up"] if gate_up is None else gate_up
    down = x["down"] if down is None else down
    tpos, b2e = moe_block_mapping(x["top_k_index"], gate_up.shape[0], block_size)
    if combine == "other":
        from nki_kernels.lnc import resolve_lnc
        from nki_kernels.moe.blockwise import choose_combine
        t, h = x["hidden"].shape
        s_inter = x["shared"][1].shape[0] if "shared" in x else 0
        auto = choose_combine(t, h, gate_up.shape[3], s_inter, len(b2e), block_size, x["top_k_index"].shape[1], 2,
                              resolve_lnc(None, "moe_blockwise"))
        combine = "dma" if auto is not None else "onchip"
    return moe_blockwise(x["hidden"], x["top_k_weights"], gate_up, down, tpos, b2e, block_size,
                         shared=x.get("shared") if shared is None else shared, top_k_index=x["top_k_index"],
                         combine=combine)


def _padded(x):
    """Baseline: I (and Is) zero-padded to 256, block size 512."""
    def pad_i(a, axis):
        n = a.shape[axis]
        tgt = -(-n // _PADDED_I) * _PADDED_I
        if tgt == n:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, tgt - n)
        return np.pad(a, widths)
    shared = None
    if "shared" in x:
        s_gu, s_dn, s_g = x["shared"]
        shared = (pad_i(s_gu, 2), pad_i(s_dn, 0), s_g)
    return _blockwise(x, _PADDED_BLOCK, pad_i(x["gate_up"], 3), pad_i(x["down"], 1), shared)


def _dense_all_experts(x):
    """Baseline: every expert runs on every token (block e = all tokens of expert e, dense affinities)."""
    from nki_kernels import moe_blockwise
    n_tokens = x["hidden"].shape[0]
    n_exp = x["gate_up"].shape[0]
    dense = np.zeros((n_tokens, n_exp), np.float32)
    np.put_along_axis(dense, x["top_k_index"].astype(np.int64), np.asarray(x["top_k_weights"], np.float32), 1)
    block = -(-n_tokens // 16) * 16
    slots = np.full(block, -1, np.int32)
    slots[:n_tokens] = np.arange(n_tokens)
    tpos = np.tile(slots, n_exp)
    b2e = np.arange(n_exp, dtype=np.int32)
    return moe_blockwise(x["hidden"], dense.astype(x["hidden"].dtype), x["gate_up"], x["down"], tpos, b2e, block,
                         shared=x.get("shared"))


def _prefill_case(label, shape, n_tokens, quick=False):
    block = prefill_block_size(n_tokens, shape.top_k, shape.experts)
    flops, nbytes = _costs(shape, n_tokens)
    dense_bl = n_tokens <= _DENSE_BASELINE_MAX_T
    padded_bl = not dense_bl and n_tokens <= _PADDED_BASELINE_MAX_T
    register(BenchCase(
        kernel="moe_blockwise",
        shape=f"{label} T={n_tokens} E={shape.experts} TOPK={shape.top_k} H={shape.hidden} I={shape.expert_inter}"
              f" Is={shape.shared_inter} B={block}",
        make_inputs=_inputs(shape, n_tokens), run=lambda x: _blockwise(x, block), reference=_reference,
        flops=flops, min_hbm_bytes=nbytes, dtype="bfloat16", quick=quick,
        baseline_name="all-experts dense loop" if dense_bl else
        (f"I padded to {_PADDED_I}, block {_PADDED_BLOCK}" if padded_bl else None),
        baseline_run=_dense_all_experts if dense_bl else (_padded if padded_bl else None),
        tags={"block_size": block}))
    if n_tokens in _BOTH_COMBINES_T:   # the figure behind the "auto" rule (docs/moe.md): the other combine
        register(BenchCase(
            kernel="moe_blockwise", shape=f"{label} T={n_tokens} B={block} (the combine 'auto' does not pick)",
            make_inputs=_inputs(shape, n_tokens), run=lambda x: _blockwise(x, block, combine="other"),
            reference=_reference, flops=flops, min_hbm_bytes=nbytes, dtype="bfloat16"))
    if dense_bl:   # the padded baseline as its own entry at the smallest T (both baselines measured there)
        register(BenchCase(
            kernel="moe_blockwise",
            shape=f"{label} T={n_tokens} B={block} (vs padded)",
            make_inputs=_inputs(shape, n_tokens), run=lambda x: _blockwise(x, block), reference=_reference,
            flops=flops, min_hbm_bytes=nbytes, dtype="bfloat16",
            baseline_name=f"I padded to {_PADDED_I}, block {_PADDED_BLOCK}", baseline_run=_padded))


def _selective_loading(x):
    """Baseline: NxD-style selective loading (every (token, choice) reads its expert's weights)."""
    from nki_kernels.moe.baseline import moe_selective_loading
    return moe_selective_loading(x["hidden"], x["top_k_index"], x["top_k_weights"], x["gate_up"], x["down"],
                                 shared=x.get("shared"))


def nxd_decode_baseline(n_tokens, top_k, n_experts):
    """What NxD runs at token generation (ExpertMLPsV2.forward): selective loading when T * TOPK / E < 1, else
    all experts. Returns (label, runner)."""
    if n_tokens * top_k / n_experts < 1.0:
        return "NxD selective loading", _selective_loading
    return "all-experts dense loop", _dense_all_experts


def _decode_case(label, shape, n_tokens, quick=False):
    from nki_kernels import moe_decode
    flops, nbytes = _costs(shape, n_tokens)

    def run(x):
        return moe_decode(x["hidden"], x["top_k_index"], x["top_k_weights"], x["gate_up"], x["down"],
                          shared=x.get("shared"))

    name = f"{label} T={n_tokens} E={shape.experts} TOPK={shape.top_k} H={shape.hidden} I={shape.expert_inter}" \
           f" Is={shape.shared_inter}"
    bl_name, bl_run = nxd_decode_baseline(n_tokens, shape.top_k, shape.experts)
    register(BenchCase(
        kernel="moe_decode", shape=name, make_inputs=_inputs(shape, n_tokens), run=run, reference=_reference,
        flops=flops, min_hbm_bytes=nbytes, dtype="bfloat16", quick=quick, baseline_name=bl_name,
        baseline_run=bl_run))
    if bl_run is not _dense_all_experts:   # the former headline baseline, kept as an extra labelled row
        register(BenchCase(
            kernel="moe_decode", shape=f"{name} (vs all-experts loop, former baseline)",
            make_inputs=_inputs(shape, n_tokens), run=run, reference=_reference, flops=flops,
            min_hbm_bytes=nbytes, dtype="bfloat16", baseline_name="all-experts dense loop (former baseline)",
            baseline_run=_dense_all_experts))


for _label, _key in (_MODELS if __name__ != "__main__" else ()):   # registered once, on import by the package
    _shape = CATALOGUE[_key]
    for _t in _PREFILL_T:
        _prefill_case(_label, _shape, _t)
    for _t in DECODE_BATCHES:
        _decode_case(_label, _shape, _t, quick=(_t == 1 and _key == "qwen3-omni talker tp8"))


# ------------------------------------------------------------------------- where the time goes (docs/moe.md)


def breakdown(model: str, n_tokens: int, combine: str = "auto", target: str = "trn2", lnc: int | None = None) -> dict:
    """Where one moe_blockwise prefill case spends its modeled time at LNC `lnc` (default: the target's default
    degree; core 0's trace): the
    launch's modeled time (slower core), core 0's end time, the core barrier's time, and per phase (before /
    after the barrier) each engine's busy µs, with the DMA pipe's occupancy split by transfer kind (descriptor
    generator, run length). Same inputs as the registered case (seed 0)."""
    from collections import defaultdict

    from microbench.runner import _lnc_env
    from nki_kernels.emulator import record_launches
    from nki_kernels.emulator.costmodel import (_engine_ghz, _packet_shape, _run_cores, _schedule, _tgt,
                                                compute_cycles, dma_bytes_per_s, dma_transfer, hbm_bytes_per_s,
                                                params_for)
    from nki_kernels.emulator.lnc import degree_in_force
    from nki_kernels.emulator.targets import use_target
    shape = CATALOGUE[model]
    block = prefill_block_size(n_tokens, shape.top_k, shape.experts)
    x = _inputs(shape, n_tokens)(np.random.default_rng(0))
    with use_target(target), _lnc_env(lnc or degree_in_force(target)):
        with record_launches() as runs:
            _blockwise(x, block, combine=combine)
    t = _tgt(target)
    p = params_for(t)
    res = list(runs)[0]
    reps = _run_cores([_schedule(tr, t, p, 1.0, True) for tr in res.traces], p)
    trace, rep = list(res.traces[0]), reps[0]
    barrier = next((e[4] for e in rep.timeline if e[1] == "core_barrier"), math.inf)
    busy, dma = defaultdict(float), defaultdict(float)
    for idx, name, eng, _ready, start, _end in rep.timeline:
        ins, phase = trace[idx], ("A" if start < barrier else "B")
        if name == "core_barrier":
            continue
        if eng == "dma":
            c = dma_transfer(ins, t, p, hbm_bytes_per_s(t), dma_bytes_per_s(t))
            busy[(phase, "dma")] += c.occupancy
            busy[(phase, "pool")] += c.pool_cycles / (t.pool_ghz * 1e3)
            run, chunks = _packet_shape(ins)
            dma[(phase, c.dge, "dynamic" if ins.meta.get("dynamic") else "static", int(run), int(chunks))] += \
                c.occupancy
        else:
            busy[(phase, eng)] += compute_cycles(ins, t, p)[0] / (_engine_ghz(eng, t) * 1e3)
    return {"total_us": rep.total_us, "device_us": max(r.total_us for r in reps), "barrier_us": barrier,
            "block": block,
            "busy_us": dict(busy), "dma_us": dict(dma)}


def decode_breakdown(model: str, n_tokens: int, target: str = "trn2") -> dict:
    """Where one moe_decode case spends its modeled time at the default LNC: the launch's modeled µs, the
    roofline, per core each engine's busy µs, the DMA pipe's occupancy by (descriptor generator, packet bytes,
    contiguous chunks per packet), and core 0's DMA chain (issue, end, kind, bytes per DMA). Same inputs as the
    registered case (seed 0)."""
    from collections import defaultdict

    from microbench.runner import _lnc_env
    from nki_kernels import moe_decode
    from nki_kernels.emulator import record_launches
    from nki_kernels.emulator.costmodel import (_engine_ghz, _packet_shape, _run_cores, _schedule, _tgt,
                                                compute_cycles, dma_bytes_per_s, dma_transfer, hbm_bytes_per_s,
                                                model_launches, params_for, roofline_us)
    from nki_kernels.emulator.lnc import degree_in_force
    from nki_kernels.emulator.targets import use_target
    shape = CATALOGUE[model]
    x = _inputs(shape, n_tokens)(np.random.default_rng(0))
    lnc = degree_in_force(target)
    with use_target(target), _lnc_env(lnc):
        with record_launches() as runs:
            moe_decode(x["hidden"], x["top_k_index"], x["top_k_weights"], x["gate_up"], x["down"],
                       shared=x.get("shared"))
    runs = list(runs)
    t = _tgt(target)
    p = params_for(t)
    flops, nbytes = _costs(shape, n_tokens)
    res = runs[0]
    reps = _run_cores([_schedule(tr, t, p, 1.0, True) for tr in res.traces], p)
    cores = []
    for tr, rep in zip(res.traces, reps):
        tr = list(tr)
        busy, dma, chain = defaultdict(float), defaultdict(float), []
        for idx, name, eng, _ready, start, end in rep.timeline:
            ins = tr[idx]
            if eng == "dma":
                c = dma_transfer(ins, t, p, hbm_bytes_per_s(t), dma_bytes_per_s(t))
                busy["dma"] += c.occupancy
                run, chunks = _packet_shape(ins)
                dma[(c.dge, int(run), int(chunks))] += c.occupancy
                chain.append((start, end, c.dge, int(ins.meta.get("bytes") or sum(a.nbytes for a in ins.writes))))
            else:
                busy[eng] += compute_cycles(ins, t, p)[0] / (_engine_ghz(eng, t) * 1e3)
            if name == "sendrecv":
                chain.append((start, end, "sendrecv", 0))
        cores.append({"end_us": rep.total_us, "busy_us": dict(busy), "dma_us": dict(dma), "chain": chain})
    return {"us": model_launches(runs, target=target).device_us, "lnc": lnc,
            "roofline_us": roofline_us(flops, nbytes, target, cores=lnc), "cores": cores}


if __name__ == "__main__" and sys.argv[1:2] == ["decode"]:   # python -m microbench.cases.moe decode MODEL T
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    _d = decode_breakdown(sys.argv[2], int(sys.argv[3]))
    print(f"{sys.argv[2]} T={sys.argv[3]} LNC={_d['lnc']}: modeled {_d['us']:.3f} us, roofline "
          f"{_d['roofline_us']:.3f} us ({_d['us'] / _d['roofline_us']:.3f}x)")
    for _c, _core in enumerate(_d["cores"]):
        print(f"  core {_c}: ends {_core['end_us']:.3f} us; busy " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(_core["busy_us"].items())))
        for _k, _v in sorted(_core["dma_us"].items(), key=lambda kv: -kv[1]):
            print(f"    dma {_k[0]:>6} packets of {_k[1]:>6} B in {_k[2]:>3} chunks: {_v:6.2f} us")
    print("  core 0 DMA chain (start, end, kind, bytes):")
    for _s, _e, _k, _n in _d["cores"][0]["chain"]:
        print(f"    {_s:7.3f} {_e:7.3f} {_k:>8} {_n}")
elif __name__ == "__main__":   # python -m microbench.cases.moe MODEL T [combine [LNC]]
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    _lnc = int(sys.argv[4]) if len(sys.argv) > 4 else None
    _b = breakdown(sys.argv[1], int(sys.argv[2]), *(sys.argv[3:4] or ["auto"]), lnc=_lnc)
    _deg = f" LNC={_lnc}" if _lnc else ""
    print(f"{sys.argv[1]} T={sys.argv[2]} B={_b['block']}{_deg}: modeled {_b['device_us']:.1f} us (slower core); "
          f"core 0 {_b['total_us']:.1f} us, barrier at {_b['barrier_us']:.1f} us")
    for _k in sorted(_b["busy_us"]):
        print(f"  phase {_k[0]} {_k[1]:>5} busy {_b['busy_us'][_k]:8.1f} us")
    for _k, _v in sorted(_b["dma_us"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"  phase {_k[0]} dma {_k[1]:>6} {_k[2]:>8} packets of {_k[3]:>6} B in {_k[4]:>4} chunks: "
              f"{_v:8.1f} us")
