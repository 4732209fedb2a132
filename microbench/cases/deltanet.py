"""Microbench cases for the deltanet family (registered on import).

Shapes: Qwen3.5-35B-A3B per rank at TP=4 (Hk=4, Hv=8, Dk=Dv=128; conv_dim = 2 Hk Dk + Hv Dv = 2048).
Baselines (issue 18 item 5: what users run today, nki_kernels/deltanet/baseline_nxdi.py): NxDI's default
prefill, a chunked fused fp32 kernel launched once per (batch, v-head), and NxDI's batched decode step (all
B x Hv rows in one launch, looping over them). The previous baselines (token-sequential kernel, one launch per
(b, h), for prefill and decode) remain as extra rows labelled "old baseline".
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from microbench.registry import BenchCase, register
from microbench.shapes import CATALOGUE, DECODE_BATCHES, PREFILL_LENGTHS, QWEN35_35B_A3B
from nki_kernels.deltanet import reference as ref
from nki_kernels.deltanet.baseline_nxdi import gdn_batched_decode_step, gdn_fused_chunked_per_head
from nki_kernels.deltanet.baseline_sequential import gdn_per_head_decode_step, gdn_per_head_sequential

_SHAPE = CATALOGUE["qwen3.5-35b-a3b tp4"]
_HK, _HV, _DK, _DV = _SHAPE.gdn_k_heads, _SHAPE.gdn_v_heads, _SHAPE.gdn_dk, _SHAPE.gdn_dv
_CONV_DIM = 2 * _HK * _DK + _HV * _DV
_KW = _SHAPE.conv_kernel
_BF16 = ml_dtypes.bfloat16
_CHUNK = 128                       # chunk used by the optimised prefill (faster than 64 in the cost model)
_FLOP_CHUNK = 64                   # chunk of the useful-FLOP count (the standard FLA chunk size)
_BASELINE_MAX_T = 2048             # the per-(b, h) baselines are emulated only up to this length
_OLD_BASELINE = "old baseline: token-sequential kernel, one launch per (b, h)"
_LABEL = "qwen3.5-35b-a3b tp4"


def _gdn_inputs(rng, b, t):
    return dict(
        q=rng.standard_normal((b, t, _HK, _DK)).astype(_BF16),
        k=rng.standard_normal((b, t, _HK, _DK)).astype(_BF16),
        v=rng.standard_normal((b, t, _HV, _DV)).astype(_BF16),
        g=(-rng.uniform(0.0, 0.5, (b, t, _HV))).astype(np.float32),       # fp32 as in transformers
        beta=rng.uniform(0.0, 1.0, (b, t, _HV)).astype(_BF16))


def _prefill_flops(b, t, c=_FLOP_CHUNK):
    """Useful FLOPs: the minimal count of the chunked WY form (microbench.roofline.gdn_chunked_flops, derivation
    in docs/cost-model.md), at the fixed chunk 64 whatever chunk the kernel uses."""
    from microbench.roofline import gdn_chunked_flops
    return gdn_chunked_flops(b, t, _HV, _DK, _DV, chunk=c)


def _gdn_bytes(b, t, state_rw):
    io = b * t * (2 * _HK * _DK + 2 * _HV * _DV) * 2 + b * t * _HV * (4 + 2)
    return io + state_rw * b * _HV * _DK * _DV * 4


def _prefill_case(t, quick=False, compute_dtype=None):
    """compute_dtype None: the default (fp32 matmuls, as accurate as transformers' chunked function);
    "bfloat16": the opt-in bf16-operand path (shape suffix " bf16 compute")."""
    from nki_kernels import gated_delta_rule

    def run(x):
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=_CHUNK,
                                use_qk_l2norm_in_kernel=True, compute_dtype=compute_dtype)

    def reference(x):
        return ref.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=_CHUNK,
                                    use_qk_l2norm_in_kernel=True)

    def baseline(x):
        return gdn_fused_chunked_per_head(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)

    with_baseline = t <= _BASELINE_MAX_T and compute_dtype is None
    suffix = " bf16 compute" if compute_dtype == "bfloat16" else ""
    register(BenchCase(
        kernel="gated_delta_rule", shape=f"{_LABEL} B=1 T={t} Hk={_HK} Hv={_HV} D={_DK} l2norm{suffix}",
        make_inputs=lambda rng: _gdn_inputs(rng, 1, t), run=run, reference=reference,
        flops=_prefill_flops(1, t), min_hbm_bytes=_gdn_bytes(1, t, state_rw=1), dtype="bfloat16", quick=quick,
        baseline_name="NxDI fused chunked fp32 kernel, one launch per (b, h)" if with_baseline else None,
        baseline_run=baseline if with_baseline else None))


def _old_prefill_baseline_row(t):
    """The previous prefill baseline as its own labelled row (its figure is the row's modeled time)."""
    def run(x):
        return gdn_per_head_sequential(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)

    def reference(x):
        return ref.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)

    register(BenchCase(
        kernel="gated_delta_rule", shape=f"{_LABEL} B=1 T={t} Hk={_HK} Hv={_HV} D={_DK} l2norm [{_OLD_BASELINE}]",
        make_inputs=lambda rng: _gdn_inputs(rng, 1, t), run=run, reference=reference,
        flops=_prefill_flops(1, t), min_hbm_bytes=_gdn_bytes(1, t, state_rw=1), dtype="bfloat16"))


def _split_qkv(y, b, t):
    """conv output y [B, conv_dim, T] (channels [q | k | v]) -> q, k [B, T, Hk, Dk], v [B, T, Hv, Dv]."""
    y = np.asarray(y)
    nq = _HK * _DK
    q = y[:, 0:nq].transpose(0, 2, 1).reshape(b, t, _HK, _DK)
    k = y[:, nq:2 * nq].transpose(0, 2, 1).reshape(b, t, _HK, _DK)
    v = y[:, 2 * nq:].transpose(0, 2, 1).reshape(b, t, _HV, _DV)
    return [np.ascontiguousarray(x) for x in (q, k, v)]


def _conv_pair_case(t):
    """The layer's front end as it runs today, unfused: causal_conv1d (+ SiLU) on mixed_qkv, then
    gated_delta_rule with the L2 norm in kernel (two launches; the host-side split of the conv output into
    q, k, v is not modeled). Its roofline is the pair's fused minimum: mixed_qkv read once, no conv output
    round trip, so the ratio is the figure of the 'conv + DeltaNet fused <= 3.5x' goal."""
    from nki_kernels import causal_conv1d, gated_delta_rule

    def make(rng):
        return _pair_inputs(rng, t)

    def run(x):
        y, _ = causal_conv1d(x["mixed_qkv"], x["conv_weight"])
        q, k, v = _split_qkv(y, 1, t)
        return gated_delta_rule(q, k, v, x["g"], x["beta"], chunk_size=_CHUNK, use_qk_l2norm_in_kernel=True)

    def reference(x):
        y, _ = ref.causal_conv1d(x["mixed_qkv"], x["conv_weight"])
        q, k, v = _split_qkv(y, 1, t)
        return ref.gated_delta_rule(q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True)

    pair_bytes = _pair_bytes(t)
    register(BenchCase(
        kernel="gated_delta_rule", shape=f"{_LABEL} B=1 T={t} Hk={_HK} Hv={_HV} D={_DK} l2norm "
        f"conv1d K={_KW} + gated_delta_rule (unfused pair)",
        make_inputs=make, run=run, reference=reference,
        flops=_prefill_flops(1, t) + 2 * _KW * _CONV_DIM * t, min_hbm_bytes=pair_bytes, dtype="bfloat16"))


def _pair_inputs(rng, t):
    x = _gdn_inputs(rng, 1, t)
    x["mixed_qkv"] = rng.standard_normal((1, _CONV_DIM, t)).astype(_BF16)
    x["conv_weight"] = (rng.standard_normal((_CONV_DIM, _KW)) * 0.5).astype(_BF16)
    return x


def _pair_bytes(t):
    """The fused pair's minimum HBM traffic: mixed_qkv and the weights read once, o written, g and beta read, the
    state written (no conv output round trip)."""
    return 2 * (t * _CONV_DIM + _CONV_DIM * _KW + t * _HV * _DV) + t * _HV * (4 + 2) + _HV * _DK * _DV * 4


def _fused_case(t, quick=False):
    """conv1d + SiLU + split + L2 norm + gated_delta_rule in one launch (gated_delta_rule_fused): mixed_qkv
    [B, T, conv_dim] as the layer's in_proj_qkv writes it. Same inputs, FLOPs and minimum bytes as the unfused pair
    row, so its ratio is the figure of the 'conv + DeltaNet fused <= 3.5x' goal."""
    from nki_kernels.deltanet.fused import gated_delta_rule_fused

    def make(rng):
        x = _pair_inputs(rng, t)
        x["mixed_qkv_tmajor"] = np.ascontiguousarray(x["mixed_qkv"].transpose(0, 2, 1))
        return x

    def run(x):
        o, final, _ = gated_delta_rule_fused(x["mixed_qkv_tmajor"], x["conv_weight"], x["g"], x["beta"], _HK, _DK,
                                             chunk_size=_CHUNK, use_qk_l2norm_in_kernel=True)
        return o, final

    def reference(x):
        y, _ = ref.causal_conv1d(x["mixed_qkv"], x["conv_weight"])
        q, k, v = _split_qkv(y, 1, t)
        return ref.gated_delta_rule(q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True)

    register(BenchCase(
        kernel="gated_delta_rule_fused", shape=f"{_LABEL} B=1 T={t} Hk={_HK} Hv={_HV} D={_DK} l2norm "
        f"conv1d K={_KW} + gated_delta_rule (fused)",
        make_inputs=make, run=run, reference=reference,
        flops=_prefill_flops(1, t) + 2 * _KW * _CONV_DIM * t, min_hbm_bytes=_pair_bytes(t), dtype="bfloat16",
        quick=quick))


def _decode_inputs(rng, b):
    x = _gdn_inputs(rng, b, 1)
    n_slots = 2 * b + 2
    x["state_pool"] = rng.standard_normal((n_slots, _HV, _DK, _DV)).astype(np.float32) * 0.1
    x["slot_ids"] = rng.permutation(n_slots)[:b].astype(np.int32)
    return x


def _decode_case(b, quick=False, lnc=None, static_rows=False):
    """lnc None: the default (resolve_lnc: 2 on trn2); an explicit lnc adds " lnc=N" to the shape.
    static_rows: slot_ids=None, sequence b on row b of a [B, Hv, Dk, Dv] buffer (NxDI's aliased state)."""
    from nki_kernels import gated_delta_rule_step

    def rows(x):
        return np.arange(b) if static_rows else x["slot_ids"]

    def run(x):
        pool = x["state_pool"][:b].copy() if static_rows else x["state_pool"].copy()
        o = gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool,
                                  None if static_rows else x["slot_ids"], use_qk_l2norm_in_kernel=True, lnc=lnc)
        return o, pool[rows(x)]

    def reference(x):
        pool0 = x["state_pool"][:b] if static_rows else x["state_pool"]
        o, pool = ref.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool0,
                                            None if static_rows else x["slot_ids"], use_qk_l2norm_in_kernel=True)
        return o, pool[rows(x)]

    def baseline(x):
        pool = x["state_pool"][:b].copy() if static_rows else x["state_pool"].copy()
        o = gdn_batched_decode_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool,
                                    None if static_rows else x["slot_ids"], use_qk_l2norm_in_kernel=True)
        return o, pool[rows(x)]

    register(BenchCase(
        kernel="gated_delta_rule_step",
        shape=f"{_LABEL} B={b} T=1 Hk={_HK} Hv={_HV} D={_DK} fp32 state" + (" static rows" if static_rows else "")
        + (f" lnc={lnc}" if lnc else ""),
        make_inputs=lambda rng: _decode_inputs(rng, b), run=run, reference=reference,
        flops=b * _HV * 6 * _DK * _DV, min_hbm_bytes=_gdn_bytes(b, 1, state_rw=2), dtype="bfloat16", quick=quick,
        lnc=lnc or 1, baseline_name="NxDI batched step, one launch looping over the B x Hv rows",
        baseline_run=baseline))


def _old_decode_baseline_row(b):
    """The previous decode baseline (one launch per (b, h)) as its own labelled row."""
    def run(x):
        pool = x["state_pool"].copy()
        o = gdn_per_head_decode_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool, x["slot_ids"],
                                     use_qk_l2norm_in_kernel=True)
        return o, pool[x["slot_ids"]]

    def reference(x):
        pool = x["state_pool"].copy()
        o, new_pool = ref.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], pool, x["slot_ids"],
                                                use_qk_l2norm_in_kernel=True)
        return o, new_pool[x["slot_ids"]]

    register(BenchCase(
        kernel="gated_delta_rule_step", shape=f"{_LABEL} B={b} T=1 Hk={_HK} Hv={_HV} D={_DK} fp32 state "
        f"[old baseline: per-(b, h) decode step, one launch per pair]",
        make_inputs=lambda rng: _decode_inputs(rng, b), run=run, reference=reference,
        flops=b * _HV * 6 * _DK * _DV, min_hbm_bytes=_gdn_bytes(b, 1, state_rw=2), dtype="bfloat16"))


def _conv_case(t, b=1, quick=False):
    from nki_kernels import causal_conv1d

    def make(rng):
        return dict(x=rng.standard_normal((b, _CONV_DIM, t)).astype(_BF16),
                    weight=(rng.standard_normal((_CONV_DIM, _KW)) * 0.5).astype(_BF16))

    register(BenchCase(
        kernel="causal_conv1d", shape=f"{_LABEL} B={b} C={_CONV_DIM} T={t} K={_KW} silu",
        make_inputs=make, run=lambda x: causal_conv1d(x["x"], x["weight"]),
        reference=lambda x: ref.causal_conv1d(x["x"], x["weight"]),
        flops=2 * _KW * b * _CONV_DIM * t,
        min_hbm_bytes=2 * (2 * b * _CONV_DIM * t + _CONV_DIM * _KW + b * _CONV_DIM * _KW),
        dtype="bfloat16", quick=quick))


def _conv_update_case(b, quick=False, conv_dim=_CONV_DIM, label=_LABEL):
    from nki_kernels import causal_conv1d_update

    def make(rng):
        return dict(x=rng.standard_normal((b, conv_dim, 1)).astype(_BF16),
                    conv_state=rng.standard_normal((b, conv_dim, _KW)).astype(_BF16),
                    weight=(rng.standard_normal((conv_dim, _KW)) * 0.5).astype(_BF16))

    def run(x):
        state = x["conv_state"].copy()
        return causal_conv1d_update(x["x"], state, x["weight"]), state

    register(BenchCase(
        kernel="causal_conv1d_update", shape=f"{label} B={b} C={conv_dim} T=1 K={_KW} silu",
        make_inputs=make, run=run, reference=lambda x: ref.causal_conv1d_update(x["x"], x["conv_state"], x["weight"]),
        flops=2 * _KW * b * conv_dim,
        min_hbm_bytes=2 * (2 * b * conv_dim + conv_dim * _KW + 2 * b * conv_dim * _KW),
        dtype="bfloat16", quick=quick))


for _t in PREFILL_LENGTHS:
    _prefill_case(_t)
_prefill_case(64, quick=True)
_prefill_case(PREFILL_LENGTHS[1], compute_dtype="bfloat16")    # the fast opt-in path beside the accurate default
for _b in DECODE_BATCHES:
    _decode_case(_b, quick=(_b == 1))
_decode_case(DECODE_BATCHES[0], lnc=1)          # the single-core figure beside the default (LNC=2 on trn2)
_decode_case(DECODE_BATCHES[0], static_rows=True)
_old_prefill_baseline_row(PREFILL_LENGTHS[1])
_conv_pair_case(PREFILL_LENGTHS[1])
_fused_case(PREFILL_LENGTHS[1])
_fused_case(64, quick=True)
_old_decode_baseline_row(DECODE_BATCHES[0])
for _t in PREFILL_LENGTHS[:2]:
    _conv_case(_t, quick=(_t == PREFILL_LENGTHS[0]))
for _b in DECODE_BATCHES:
    _conv_update_case(_b, quick=(_b == DECODE_BATCHES[1]))
_FULL = QWEN35_35B_A3B                     # TP=1: the whole conv (what the transformers integration sees)
_conv_update_case(1, conv_dim=2 * _FULL.gdn_k_heads * _FULL.gdn_dk + _FULL.gdn_v_heads * _FULL.gdn_dv,
                  label="qwen3.5-35b-a3b tp1")
