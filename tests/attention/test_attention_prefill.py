"""flash_attention (prefill) against the float64 reference: hypothesis sweep, edge cases, LNC=2, validation."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unittest import mock

from nki_kernels import flash_attention
from nki_kernels.attention import prefill
from nki_kernels.attention.reference import flash_attention_ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16, "float16": np.float16}


def _inputs(rng, b, hq, hkv, sq, skv, d, dtype, scale=1.0, gate=False):
    q = (rng.standard_normal((b, hq, sq, d)) * scale).astype(dtype)
    k = (rng.standard_normal((b, hkv, skv, d)) * scale).astype(dtype)
    v = rng.standard_normal((b, hkv, skv, d)).astype(dtype)
    g = rng.standard_normal((b, hq, sq, d)).astype(dtype) if gate else None
    return q, k, v, g


def _check(name, q, k, v, dtype_name, **kw):
    out = flash_attention(q, k, v, **kw)
    kw.pop("lnc", None)
    ref = flash_attention_ref(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, dtype=np.float64))), f"{name}: non-finite output"
    assert_close(name, ref, out, dtype=dtype_name)
    return np.asarray(out, dtype=np.float64), ref


@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
       sq=st.integers(1, 140), extra=st.sampled_from([0, 0, 5, 130]), d=st.sampled_from([32, 64, 128, 200, 256]),
       dtype=st.sampled_from(["bfloat16", "float32", "float16"]), causal=st.booleans(), use_lens=st.booleans(),
       use_gate=st.booleans(), seed=st.integers(0, 2 ** 16), path=st.sampled_from(["short", "pipeline"]))
def test_matches_reference(b, hkv, group, sq, extra, d, dtype, causal, use_lens, use_gate, seed, path):
    """path: Skv <= 512 takes the partition-major short body; "pipeline" forces the long-sequence pipeline."""
    rng = np.random.default_rng(seed)
    skv = sq + extra
    q, k, v, g = _inputs(rng, b, hkv * group, hkv, sq, skv, d, DTYPES[dtype], gate=use_gate)
    lens = rng.integers(0, skv + 1, size=b).astype(np.int32) if use_lens else None
    with _path(path):
        _check("prefill", q, k, v, dtype, gate=g, seq_lens=lens, causal=causal)


def _path(path):
    """The short body (Skv <= prefill._SHORT_SKV, the default rule) or the pipeline for every shape."""
    return mock.patch.object(prefill, "_SHORT_SKV", prefill._SHORT_SKV if path == "short" else 0)


def _body(body):
    """The short bodies' rule ("auto": tile-major for bf16 / fp16 at D = 256 on trn2 / trn3) or the partition-major
    body for every Skv <= 512 shape ("partition"), so that its 2-byte D = 256 path stays tested."""
    if body == "auto":
        return mock.patch.object(prefill, "tile_short_path", prefill.tile_short_path)
    return mock.patch.object(prefill, "tile_short_path", lambda *a, **kw: False)


@given(b=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), sq=st.integers(1, 512), extra=st.integers(0, 200),
       d=st.sampled_from([48, 128, 200, 256]), dtype=st.sampled_from(["bfloat16", "float32", "float16"]),
       causal=st.booleans(), use_lens=st.booleans(), use_gate=st.booleans(), lnc=st.sampled_from([1, 2]),
       seed=st.integers(0, 2 ** 16), body=st.sampled_from(["auto", "partition"]))
def test_short_body_matches_reference(b, group, sq, extra, d, dtype, causal, use_lens, use_gate, lnc, seed, body):
    """Skv <= 512: 1-4 query rows and 1-4 keys per partition (Sq, Skv not multiples of 128: a partial last
    partition and phantom rows / keys), GQA, both LNCs; either short body for 2-byte D = 256."""
    rng = np.random.default_rng(seed)
    skv = min(512, sq + extra)
    q, k, v, g = _inputs(rng, b, group, 1, sq, skv, d, DTYPES[dtype], gate=use_gate)
    lens = rng.integers(0, skv + 1, size=b).astype(np.int32) if use_lens else None
    assert prefill.short_path(sq, skv, False)
    with _body(body):
        _check("short", q, k, v, dtype, gate=g, seq_lens=lens, causal=causal, lnc=lnc)


@pytest.mark.parametrize("dtype, body", [("float32", "auto"), ("bfloat16", "auto"), ("float16", "auto"),
                                         ("bfloat16", "partition"), ("float16", "partition")])
def test_short_body_largest_shape_fits(dtype, body):
    """The largest short-body shape (Sq = Skv = 512, D = 256) with everything on: gate, lengths, GQA 4:1, fp32
    (the biggest tiles) runs within SBUF / PSUM and matches the reference; 2-byte dtypes in either short body."""
    rng = np.random.default_rng(512)
    q, k, v, g = _inputs(rng, 1, 4, 1, 512, 512, 256, DTYPES[dtype], gate=True)
    assert prefill.short_path(512, 512, False) and not prefill.short_path(513, 513, False)
    with _body(body):
        _check("short largest", q, k, v, dtype, gate=g, seq_lens=np.array([300], np.int32), causal=True)


@pytest.mark.parametrize("dtype, d, sq, causal, body", [("bfloat16", 256, 512, True, "auto"),
                                                        ("bfloat16", 256, 512, True, "partition"),
                                                        ("bfloat16", 200, 300, False, "auto"),
                                                        ("float32", 256, 512, True, "auto")])
def test_short_body_transposes(dtype, d, sq, causal, body):
    """2-byte dtypes: Q^T (one per head) and K^T (one per KV head) arrive by DMA transposes, so the only TensorE
    transposes are those of P (one per 128-key chunk of every query tile: the causal triangle, or every chunk);
    fp32 keeps PE transposes of Q and K (no DMA transposes). Counts from the layout, independent of the kernel."""
    from nki_kernels.emulator import record_launches
    rng = np.random.default_rng(5)
    b, hq, hkv, skv = 1, 4, 1, sq
    q, k, v, g = _inputs(rng, b, hq, hkv, sq, skv, d, DTYPES[dtype], gate=True)
    with record_launches() as runs, _body(body):
        out = flash_attention(q, k, v, gate=g, causal=causal, lnc=1)
    assert_close("short transposes", flash_attention_ref(q, k, v, gate=g, causal=causal), out, dtype=dtype)
    names = [ins.name for ins in runs[0].traces[0]]
    n_t, n_c = math.ceil(sq / 128), math.ceil(skv / 128)
    p_chunks = hq * (sum(min(n_c, t + 1) for t in range(n_t)) if causal else n_t * n_c)
    if dtype == "bfloat16" and d == 256 and body == "auto":    # tile-major: Q^T per (head, tile), K^T per chunk
        assert names.count("dma_transpose") == hq * n_t + hkv * n_c
        assert names.count("nc_transpose") == p_chunks
    elif dtype == "bfloat16":
        assert names.count("dma_transpose") == (hq + hkv) * (1 if d % 128 == 0 else math.ceil(d / 128))
        assert names.count("nc_transpose") == p_chunks
    else:
        assert names.count("dma_transpose") == 0
        assert names.count("nc_transpose") > p_chunks


@pytest.mark.parametrize("d", [64, 128, 256])
def test_multi_block_causal_gqa_bf16(d):
    """Several 2048-key blocks (online rescaling), GQA 4:1, Sq/Skv not multiples of 128, chunked prefill."""
    rng = np.random.default_rng(d)
    q, k, v, _ = _inputs(rng, 1, 4, 1, 300, 2400, d, BF16)
    _check("multi-block", q, k, v, "bfloat16", causal=True)


@pytest.mark.parametrize("path", ["short", "pipeline"])
@pytest.mark.parametrize("sq, hq, d", [(512, 4, 256), (384, 2, 64), (640, 4, 128), (512, 2, 192), (384, 2, 160)])
def test_pipeline_many_short_streams(sq, hq, d, path):
    """Causal Sq = Skv: many query tiles with one or two key blocks back to back through the pipeline slots
    (stream state reuse across generations). D = 160, 192: the PV accumulators of both slots must not straddle
    a PSUM bank (they did before their regions were padded to 256 columns)."""
    rng = np.random.default_rng(sq + hq)
    q, k, v, g = _inputs(rng, 1, hq, 1, sq, sq, d, BF16, gate=True)
    with _path(path):
        _check("short streams", q, k, v, "bfloat16", gate=g, causal=True)


def test_multi_block_fp32_lens_gate():
    rng = np.random.default_rng(7)
    q, k, v, g = _inputs(rng, 2, 2, 1, 200, 2200, 256, np.float32, gate=True)
    _check("multi-block fp32", q, k, v, "float32", gate=g, seq_lens=np.array([2100, 2150], np.int32), causal=True)


def test_sq1_and_skv1():
    rng = np.random.default_rng(1)
    q, k, v, _ = _inputs(rng, 2, 2, 1, 1, 1, 256, np.float32)
    out, _ = _check("Sq=Skv=1", q, k, v, "float32", causal=True)
    # one key: the output is that key's value, whatever q is
    np.testing.assert_allclose(out, np.repeat(v.astype(np.float64), 2, axis=1), rtol=1e-6)
    q, k, v, _ = _inputs(rng, 1, 2, 2, 1, 333, 128, BF16)
    _check("Sq=1", q, k, v, "bfloat16", causal=True)


def test_all_but_one_key_padded():
    rng = np.random.default_rng(2)
    q, k, v, _ = _inputs(rng, 2, 2, 1, 50, 50, 64, np.float32)
    k[:, :, 1:] = 1e4     # padded keys would dominate the softmax if they leaked in
    out, _ = _check("one key", q, k, v, "float32", seq_lens=np.array([1, 1], np.int32), causal=False)
    np.testing.assert_allclose(out[:, :, 0], np.repeat(v[:, :, 0:1].astype(np.float64), 2, axis=1)[:, :, 0],
                               rtol=1e-6)
    assert np.all(out[:, :, 1:] == 0.0), "padded query rows must be exactly zero"


def test_all_padding_rows_are_zero_not_nan():
    rng = np.random.default_rng(3)
    q, k, v, g = _inputs(rng, 3, 2, 1, 40, 100, 128, BF16, gate=True)
    lens = np.array([0, 60, 100], np.int32)     # seq 0: everything padded; seq 1: the queries are all padding
    out, _ = _check("padding", q, k, v, "bfloat16", gate=g, seq_lens=lens, causal=True)
    assert np.all(out[0] == 0.0) and np.all(out[1] == 0.0)
    assert np.any(out[2] != 0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_huge_logits_no_overflow(dtype):
    rng = np.random.default_rng(4)
    q, k, v, _ = _inputs(rng, 1, 2, 1, 130, 600, 256, DTYPES[dtype], scale=60.0)   # |logits| ~ 1e4..1e5
    _check("huge logits", q, k, v, dtype, causal=True)


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_fp16_mask_bias_is_not_nan(causal, lnc):
    """Regression: the short body's mask bias (MASK_BIAS = -1e30, -inf in fp16) was built in fp16 and added
    through an fp16 identity matmul, 0 * -inf = NaN in every score: all-NaN output for any fp16 call with a
    masked entry (causal, or Skv % 128 != 0, i.e. always at these sizes)."""
    rng = np.random.default_rng(16)
    q, k, v, _ = _inputs(rng, 1, 2, 1, 2, 3, 64, np.float16)
    assert prefill.short_path(2, 3, False)
    out = flash_attention(q, k, v, causal=causal, lnc=lnc)
    assert not np.any(np.isnan(np.asarray(out, np.float64)))
    assert_close("fp16 Sq=2 Skv=3", flash_attention_ref(q, k, v, causal=causal), out, dtype="float16")


@pytest.mark.parametrize("path", ["short", "pipeline"])
@pytest.mark.parametrize("sq, skv, causal", [(130, 200, True), (200, 300, False), (300, 300, True)])
def test_fp16_both_paths(sq, skv, causal, path):
    """fp16 through the short body and the pipeline: causal / key-padding biases, lengths and a gate, LNC=2."""
    rng = np.random.default_rng(sq + skv)
    q, k, v, g = _inputs(rng, 1, 2, 1, sq, skv, 128, np.float16, gate=True)
    lens = np.array([skv - 7], np.int32)
    with _path(path):
        _check("fp16 " + path, q, k, v, "float16", gate=g, seq_lens=lens, causal=causal, lnc=2)


def test_q_equals_k_peaky():
    rng = np.random.default_rng(5)
    q, _, v, _ = _inputs(rng, 1, 1, 1, 200, 200, 128, np.float32, scale=3.0)
    k = q.copy()
    out, ref = _check("q=k", q, k, v, "float32", causal=False)
    # the softmax is nearly one-hot on the diagonal: out ~ v
    assert np.max(np.abs(ref - v.astype(np.float64))) < 1e-3


def test_gqa_equals_repeated_kv():
    rng = np.random.default_rng(6)
    q, k, v, _ = _inputs(rng, 2, 6, 2, 70, 90, 64, np.float32)
    gqa = flash_attention(q, k, v, causal=True)
    rep = flash_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), causal=True)
    assert_close("gqa vs repeated", rep, gqa, dtype="float32")


def test_softmax_scale_argument():
    rng = np.random.default_rng(8)
    q, k, v, _ = _inputs(rng, 1, 2, 1, 64, 64, 128, np.float32)
    out, _ = _check("scale", q, k, v, "float32", softmax_scale=0.3, causal=True)
    default = flash_attention(q, k, v, causal=True)
    _, ref_default = _check("default scale", q, k, v, "float32", softmax_scale=1 / math.sqrt(128), causal=True)
    assert_close("default scale", ref_default, default, dtype="float32")
    assert np.max(np.abs(out - ref_default)) > 1e-3


@pytest.mark.parametrize("shape", [(2, 4, 1, 200, 260), (1, 4, 1, 300, 300), (3, 2, 2, 129, 129),
                                   (1, 4, 1, 512, 512), (1, 3, 1, 700, 700)])
@pytest.mark.parametrize("body", ["auto", "partition"])
def test_lnc2_equals_lnc1(shape, body):
    b, hq, hkv, sq, skv = shape
    rng = np.random.default_rng(sum(shape))
    q, k, v, g = _inputs(rng, b, hq, hkv, sq, skv, 256, BF16, gate=True)
    lens = rng.integers(1, skv + 1, size=b).astype(np.int32)
    with _body(body):
        one = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, lnc=1)
        two = flash_attention(q, k, v, gate=g, seq_lens=lens, causal=True, lnc=2)
    np.testing.assert_array_equal(np.asarray(one, np.float64), np.asarray(two, np.float64))


def test_torch_bf16_roundtrip():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 33, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 1, 40, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 1, 40, 64, generator=gen).to(torch.bfloat16)
    out = flash_attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert_close("torch", flash_attention_ref(q, k, v, causal=True), out.float().numpy(), dtype="bfloat16")


@pytest.mark.parametrize("kwargs, match", [
    (dict(d=320), "head dim D must be in"),
    (dict(hq=3, hkv=2), "Hq must be a multiple of Hkv"),
    (dict(sq=10, skv=5), "Sq must be <= Skv"),
    (dict(kd=32), "head dim differs"),
    (dict(vshape=True), "k and v shapes differ"),
    (dict(lens=[0, 11]), r"seq_lens must be in \[0, 10\]"),
    (dict(lens=[-1, 3]), r"seq_lens must be in \[0, 10\]"),
    (dict(lens=[3]), r"seq_lens must have shape \[B\]"),
    (dict(scale=-1.0), "softmax_scale must be a finite number > 0"),
    (dict(gate_shape=True), "gate must have q's shape"),
    (dict(lnc=3), r"lnc must be one of \(1, 2\) or None"),
    (dict(mixed=True), "dtypes differ"),
    (dict(int_dtype=True), "dtype must be one of"),
])
def test_bad_inputs_raise(kwargs, match):
    b, hq, hkv = 2, kwargs.get("hq", 2), kwargs.get("hkv", 1)
    sq, skv, d = kwargs.get("sq", 4), kwargs.get("skv", 10), kwargs.get("d", 64)
    q = np.zeros((b, hq, sq, d), np.float32)
    k = np.zeros((b, hkv, skv, kwargs.get("kd", d)), np.float32)
    v = np.zeros((b, hkv, skv + (1 if kwargs.get("vshape") else 0), kwargs.get("kd", d)), np.float32)
    if kwargs.get("mixed"):
        k = k.astype(BF16)
        v = v.astype(BF16)
    if kwargs.get("int_dtype"):
        q, k, v = q.astype(np.int32), k.astype(np.int32), v.astype(np.int32)
    gate = np.zeros((b, hq, sq + 1, d), np.float32) if kwargs.get("gate_shape") else None
    lens = np.array(kwargs["lens"]) if "lens" in kwargs else None
    with pytest.raises(KernelInputError, match=match):
        flash_attention(q, k, v, gate=gate, seq_lens=lens, softmax_scale=kwargs.get("scale"),
                        lnc=kwargs.get("lnc", 1))


def test_mixed_torch_and_numpy_inputs_are_named():
    """q a torch tensor, k / v NumPy arrays: the error says so (it read "dtypes differ, got torch.float32, float32,
    float32" before)."""
    import torch
    q = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(KernelInputError, match="q, k, v must be all NumPy arrays or all torch tensors, got q a torch"):
        flash_attention(torch.from_numpy(q), q, q)


def test_kv_too_large_for_sbuf_raises():
    q = np.zeros((1, 1, 1, 256), np.float32)
    k = np.zeros((1, 1, 40000, 256), np.float32)
    with pytest.raises(KernelInputError, match="one KV head must fit SBUF"):
        flash_attention(q, k, k)


@pytest.mark.parametrize("target, d, lens", [("trn1", 256, False), ("trn1", 200, True), ("trn2", 256, False)])
def test_largest_accepted_kv_fits_on_each_target(target, d, lens):
    """fp32, two query heads per KV head: the largest Skv the wrapper accepts on the target runs (the emulator's
    SBUF allocation check) and matches the reference; one more 64-key step is refused before any launch. On trn1
    (176 KiB partitions) the 128 KiB budget of trn2 let such shapes fail the allocation (Skv 7808 at D=256)."""
    from nki_kernels.emulator.targets import use_target
    budget = prefill._SBUF_KV_BUDGET[target]
    skv = max(t for t in range(128, 40000, 64) if prefill.kv_resident_bytes(t, d, 4, lens) <= budget)
    rng = np.random.default_rng(3)
    q, k, v, _ = _inputs(rng, 1, 2, 1, 128, skv, d, np.float32)
    lens_arr = np.array([skv - 3], np.int32) if lens else None
    with use_target(target):
        _check(f"{target} largest", q, k, v, "float32", seq_lens=lens_arr, causal=True)
        k2 = np.zeros((1, 1, skv + 64, d), np.float32)
        with pytest.raises(KernelInputError, match=f"one KV head must fit SBUF.*on {target}"):
            flash_attention(q, k2, k2, seq_lens=lens_arr, causal=True)


@pytest.mark.slow
def test_qwen35_tp4_shape_2k_causal():
    rng = np.random.default_rng(9)
    q, k, v, g = _inputs(rng, 1, 4, 1, 2048, 2048, 256, BF16, gate=True)
    _check("qwen3.5 tp4 2k", q, k, v, "bfloat16", gate=g, causal=True)


@pytest.mark.parametrize("n_q_tiles, group", [(16, 4), (64, 4), (4, 1), (6, 3)])
def test_lnc2_query_tiles_balance_causal_work(n_q_tiles, group):
    """B*Hkv odd at LNC=2: the (query head, query tile) streams are dealt out so that both cores get the same
    number of causal key chunks (tile i of a square causal prefill has i + 1) when the stream count is a multiple
    of 4, and differ by at most one tile's chunks otherwise; every stream has exactly one owner."""
    work = [0, 0]
    for g in range(group):
        for i_q in range(n_q_tiles):
            owner = prefill._owner(0, 0, g, i_q, 1, n_q_tiles, 1, 2)
            assert owner in (0, 1)
            work[owner] += i_q + 1
    assert sum(work) == group * n_q_tiles * (n_q_tiles + 1) // 2
    if (group * n_q_tiles) % 4 == 0:
        assert work[0] == work[1], work
    else:
        assert abs(work[0] - work[1]) <= n_q_tiles, work
