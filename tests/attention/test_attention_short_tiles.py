"""flash_attention's tile-major short body (`attention/short_tiles.py`: Skv <= 512, 2-byte dtypes, D = 256 on
trn2 / trn3): float64 reference over shapes / dtypes / masks / lengths / gates / LNC, the path rule, non-finite
containment, traced once, the largest accepted shapes, and the instruction structure it was built for."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import flash_attention
from nki_kernels.attention import prefill, short_tiles
from nki_kernels.attention.reference import flash_attention_ref
from nki_kernels.emulator import record_launches
from nki_kernels.emulator.runtime import last_run
from nki_kernels.emulator.targets import use_target
from nki_kernels.testing import assert_close

from contain_kit import assert_contained, poison_one, run_poisoned
from spy_kit import counting

BF16 = ml_dtypes.bfloat16
DTYPES = {"bfloat16": BF16, "float16": np.float16}
D = 256


def _inputs(rng, b, hq, hkv, sq, skv, dtype, d=D):
    f = lambda *s: rng.standard_normal(s).astype(dtype)     # noqa: E731
    return f(b, hq, sq, d), f(b, hkv, skv, d), f(b, hkv, skv, d), f(b, hq, sq, d)


def _taken():
    """Counts calls of the tile-major body (the dispatch in prefill_body calls it through the module)."""
    return counting(prefill, "tile_short_body")


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       sq=st.one_of(st.sampled_from([128, 256, 384, 512]), st.integers(1, 512)),
       extra=st.one_of(st.sampled_from([0, 128, 256]), st.integers(0, 200)),
       dtype=st.sampled_from(["bfloat16", "float16"]), causal=st.booleans(),
       use_lens=st.booleans(), use_gate=st.booleans(), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_matches_reference(b, hkv, group, sq, extra, dtype, causal, use_lens, use_gate, lnc, seed):
    """Sq and Skv anywhere up to 512 (partial tiles and chunks, Sq < Skv; whole tiles with the diagonal on a chunk
    boundary, where the PE tiles skip its hidden quadrant), GQA, both LNC degrees: the body runs, and its output
    matches the float64 reference."""
    rng = np.random.default_rng(seed)
    skv = min(512, sq + extra)
    q, k, v, g = _inputs(rng, b, hkv * group, hkv, sq, skv, DTYPES[dtype])
    g = g if use_gate else None
    lens = rng.integers(0, skv + 1, size=b).astype(np.int32) if use_lens else None
    patch, calls = _taken()
    with patch:
        out = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=causal, lnc=lnc)
    assert calls, "the tile-major body did not run"
    ref = flash_attention_ref(q, k, v, gate=g, seq_lens=lens, causal=causal)
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    assert_close("short tiles", ref, out, dtype=dtype)


def test_path_rule():
    """2-byte, D * 2 >= the target's full-rate DMA row (512 B on trn2 / trn3: D = 256), Skv <= 512, not trn1."""
    with use_target("trn2"):
        assert short_tiles.tile_short_path(512, 512, 256, BF16)
        assert short_tiles.tile_short_path(1, 1, 256, np.float16)
        assert not short_tiles.tile_short_path(512, 513, 256, BF16)
        assert not short_tiles.tile_short_path(512, 512, 128, BF16)
        assert not short_tiles.tile_short_path(512, 512, 256, np.float32)
        assert not short_tiles.tile_short_path(512, 512, 256, BF16, bhds=True)
    with use_target("trn3"):
        assert short_tiles.tile_short_path(300, 300, 256, BF16)
    with use_target("trn1"):
        assert not short_tiles.tile_short_path(100, 100, 256, BF16)


@pytest.mark.parametrize("target, expect", [("trn2", True), ("trn3", True), ("trn1", False)])
def test_dispatch_per_target(target, expect):
    rng = np.random.default_rng(1)
    q, k, v, g = _inputs(rng, 2, 2, 1, 200, 256, BF16)
    lens = np.array([256, 131], np.int32)
    patch, calls = _taken()
    with use_target(target), patch:
        out = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, lnc=1)
    assert bool(calls) == expect
    assert_close("dispatch", flash_attention_ref(q, k, v, gate=g, seq_lens=lens, causal=True), out,
                 dtype="bfloat16")


def test_rule_reads_the_cost_models_knee():
    """`hw.DMA_FULL_RATE_ROW_BYTES` (what the rule reads) is the cost model's default packet knee on every target."""
    from nki_kernels.emulator.costmodel import PARAMS
    from nki_kernels.hw import DMA_FULL_RATE_ROW_BYTES
    assert set(DMA_FULL_RATE_ROW_BYTES) == set(PARAMS)
    for name, knee in DMA_FULL_RATE_ROW_BYTES.items():
        assert PARAMS[name].dma_knee_bytes == knee, name


@pytest.mark.parametrize("scale", [4.0, 0.01])
def test_large_and_small_scale_with_an_empty_sequence(scale):
    """softmax_scale far from D ** -0.5, and a sequence of length 0 (every key hidden: its FP32_MIN row max times
    a scale > 1 overflows, and the finish's select still gives exact zeros)."""
    rng = np.random.default_rng(4)
    q, k, v, g = _inputs(rng, 2, 2, 1, 256, 256, BF16)
    lens = np.array([0, 5], np.int32)
    out = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, softmax_scale=scale, lnc=2)
    ref = flash_attention_ref(q, k, v, gate=g, seq_lens=lens, causal=True, softmax_scale=scale)
    assert np.all(np.asarray(out, np.float64)[0] == 0)
    assert_close("scale", ref, out, dtype="bfloat16")


@settings(max_examples=25, deadline=None)
@given(where=st.sampled_from(["q", "k", "v", "gate"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       causal=st.booleans(), lnc=st.sampled_from([1, 2]), sq=st.sampled_from([300, 256]),
       use_lens=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_non_finite_stays_in_its_sequence(where, value, causal, lnc, sq, use_lens, seed):
    """A non-finite value in one sequence leaves the others bit-identical; in q or gate it reaches only its own
    row (query head, position); a key's reaches no row before it (causal). Sq = 256 after 128 cached keys puts
    the diagonal on a chunk boundary (the PE tiles skip its hidden quadrant); with lengths as well."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, skv = 2, 4, 2, 384
    q, k, v, g = _inputs(rng, b, hq, hkv, sq, skv, BF16)
    lens = np.array([skv, int(rng.integers(1, skv))], np.int32) if use_lens else None
    clean = np.asarray(flash_attention(q, k, v, gate=g, seq_lens=lens, causal=causal, lnc=lnc), np.float64)
    tensors = dict(q=q.copy(), k=k.copy(), v=v.copy(), gate=g.copy())
    bad_b = int(rng.integers(0, b))
    h, s = poison_one(rng, tensors, where, bad_b, value)
    out = run_poisoned(tensors, seq_lens=lens, causal=causal, lnc=lnc)
    assert_contained(out, clean, where, bad_b, h, s)
    if where == "k" and causal:          # a key is hidden from the rows before it: they stay bit-identical
        s_q = s - (skv - sq)
        if s_q > 0:
            np.testing.assert_array_equal(out[bad_b, :, :s_q], clean[bad_b, :, :s_q])


@pytest.mark.parametrize("lens", [[0, 512], [1, 0], [511, 257]])
def test_padding_holds_anything(lens):
    """Positions >= seq_lens[b] of q / k / v / gate hold NaN: bit-identical to zeros there (valid rows the same,
    padded rows 0), a length of 0 included (every key hidden: the rows are zeroed by the finish's select)."""
    rng = np.random.default_rng(3)
    q, k, v, g = _inputs(rng, 2, 4, 1, 512, 512, BF16)
    clean = [x.copy() for x in (q, k, v, g)]
    dirty = [x.copy() for x in (q, k, v, g)]
    for i, n in enumerate(lens):
        for c, d_ in zip(clean, dirty):
            c[i, :, n:] = 0
            d_[i, :, n:] = np.nan
    ref = flash_attention(*clean[:3], gate=clean[3], seq_lens=lens, causal=True)
    out = flash_attention(*dirty[:3], gate=dirty[3], seq_lens=lens, causal=True)
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(ref, np.float64))
    assert_close("padding", flash_attention_ref(*clean[:3], gate=clean[3], seq_lens=lens, causal=True), out,
                 dtype="bfloat16")


def _signature(run):
    return [[(i.name, i.engine, tuple((a.buffer, a.dtype, a.shape, a.lo, a.hi) for a in i.reads + i.writes))
             for i in trace] for trace in run.traces]


@pytest.mark.parametrize("lnc", [1, 2])
def test_instructions_independent_of_values(lnc):
    """Lengths and data are values: different ones give the same instruction stream (operands and address ranges
    included), and each result matches its reference."""
    sigs = []
    for seed, lens in ((1, [512, 3]), (2, [0, 300]), (3, [200, 512])):
        rng = np.random.default_rng(seed)
        q, k, v, g = _inputs(rng, 2, 2, 1, 512, 512, BF16)
        out = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, lnc=lnc)
        assert_close("values", flash_attention_ref(q, k, v, gate=g, seq_lens=lens, causal=True), out,
                     dtype="bfloat16")
        sigs.append(_signature(last_run()))
    assert sigs[0] == sigs[1] == sigs[2]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_largest_shapes_fit(dtype):
    """Skv = 512 with everything on (gate, lengths, GQA 8:1, 16 heads per core at LNC=2, B = 2): SBUF / PSUM fit
    (the emulator checks both) and the result is right."""
    rng = np.random.default_rng(7)
    q, k, v, g = _inputs(rng, 2, 16, 2, 512, 512, DTYPES[dtype])
    lens = np.array([512, 333], np.int32)
    out = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, lnc=2)
    assert_close("largest", flash_attention_ref(q, k, v, gate=g, seq_lens=lens, causal=True), out, dtype=dtype)


def test_instruction_structure():
    """Causal Sq = Skv = 512, 4 heads on one core: per (head, tile) one Q^T DMA transpose and one 64 KiB store; K^T
    by one DMA transpose per 128-key chunk; no bias matmul (the mask is the range_select, one per unit); the
    diagonal chunk's hidden quadrant skipped by PE tiles (QK: 128 x 64 + a 64-column tile; P V: a 64-row and a
    64 x 64 tile); P transposes one per visible chunk. Counts from the layout."""
    rng = np.random.default_rng(9)
    hq, n_t = 4, 4
    q, k, v, g = _inputs(rng, 1, hq, 1, 512, 512, BF16)
    with record_launches() as runs:
        out = flash_attention(q, k, v, gate=g, causal=True, lnc=1)
    assert_close("structure", flash_attention_ref(q, k, v, gate=g, causal=True), out, dtype="bfloat16")
    trace = runs[0].traces[0]
    names = [i.name for i in trace]
    chunks = sum(t + 1 for t in range(n_t))
    assert names.count("dma_transpose") == hq * n_t + n_t
    assert names.count("range_select") == hq * n_t
    assert names.count("nc_transpose") == hq * chunks
    mm = [i for i in trace if i.name == "nc_matmul"]
    qk = 2 * hq * sum((1 if t else 0) + 2 for t in range(n_t))   # per D chunk: the full chunks, half, quadrant
    pv = hq * sum(t + 2 for t in range(n_t))                       # one per full chunk + the two diagonal tiles
    assert len(mm) == qk + pv
    assert sum(i.meta.get("tile") == (128, 64) for i in mm) == 2 * hq * n_t
    assert sum(i.meta.get("tile") == (64, 128) for i in mm) == hq * n_t
    assert sum(i.meta.get("tile") == (64, 64) for i in mm) == hq * n_t
    stores = [i for i in trace if i.name == "dma_copy" and any(a.buffer == "hbm" for a in i.writes)]
    assert len(stores) == hq * n_t and all(sum(a.nbytes for a in i.writes) == 128 * D * 2 for i in stores)
