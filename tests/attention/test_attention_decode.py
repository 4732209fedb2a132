"""flash_attention_decode against the float64 reference, against prefill (decode step == last prefill rows),
edge cases, LNC=2 and validation."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import flash_attention, flash_attention_decode
from nki_kernels.attention.reference import flash_attention_decode_ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


def _inputs(rng, b, hq, hkv, sq, s, d, dtype, scale=1.0):
    q = (rng.standard_normal((b, hq, sq, d)) * scale).astype(dtype)
    k = (rng.standard_normal((b, hkv, s, d)) * scale).astype(dtype)
    v = rng.standard_normal((b, hkv, s, d)).astype(dtype)
    return q, k, v


def _check(name, q, k, v, lens, dtype_name, **kw):
    out = flash_attention_decode(q, k, v, lens, **kw)
    kw.pop("lnc", None)
    ref = flash_attention_decode_ref(q, k, v, lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, dtype=np.float64))), f"{name}: non-finite output"
    assert_close(name, ref, out, dtype=dtype_name)
    return np.asarray(out, dtype=np.float64), ref


@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), sq=st.integers(1, 8),
       s=st.sampled_from([8, 100, 256, 700, 4200]), d=st.sampled_from([64, 128, 256]),
       dtype=st.sampled_from(["bfloat16", "float32"]), causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_reference(b, hkv, group, sq, s, d, dtype, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _inputs(rng, b, hkv * group, hkv, sq, s, d, DTYPES[dtype])
    lens = rng.integers(sq, s + 1, size=b).astype(np.int32)
    _check("decode", q, k, v, lens, dtype, causal=causal)


@pytest.mark.parametrize("sq", [1, 4])
def test_decode_step_equals_last_prefill_rows(sq):
    """Decode of the last Sq tokens == the last Sq rows of causal prefill over the same valid prefix."""
    rng = np.random.default_rng(10 + sq)
    b, hq, hkv, s, d = 2, 4, 1, 600, 256
    q_full, k, v = _inputs(rng, b, hq, hkv, s, s, d, BF16)
    lens = np.array([600, 457], np.int32)
    q_new = np.stack([q_full[i, :, lens[i] - sq:lens[i]] for i in range(b)])
    dec = np.asarray(flash_attention_decode(q_new, k, v, lens, causal=True), np.float64)
    for i in range(b):
        n = lens[i]
        pre = flash_attention(q_full[i:i + 1, :, n - sq:n], k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=True)
        assert_close(f"decode vs prefill b={i}", np.asarray(pre, np.float64)[0], dec[i], dtype="bfloat16")


def test_gqa_equals_repeated_kv():
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, 2, 8, 2, 3, 300, 128, np.float32)
    lens = np.array([3, 280], np.int32)
    gqa = flash_attention_decode(q, k, v, lens)
    rep = flash_attention_decode(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), lens)
    assert_close("gqa vs repeated", rep, gqa, dtype="float32")
    assert_close("gqa vs reference", flash_attention_decode_ref(q, k, v, lens), gqa, dtype="float32")


def test_only_the_new_token_valid():
    """cache_lens == Sq == 1: the only visible key is the new token itself; garbage beyond is ignored."""
    rng = np.random.default_rng(12)
    q, k, v = _inputs(rng, 2, 2, 1, 1, 300, 256, np.float32)
    k[:, :, 1:] = 3e3
    v[:, :, 1:] = -7e3
    out, _ = _check("one key", q, k, v, np.array([1, 1], np.int32), "float32")
    np.testing.assert_allclose(out[:, :, 0], np.repeat(v[:, :, 0].astype(np.float64), 2, axis=1), rtol=1e-6)


def test_causal_among_new_tokens():
    """Token 0 of Sq=3 must not see tokens 1 and 2 (check against the reference and a direct formula)."""
    rng = np.random.default_rng(13)
    q, k, v = _inputs(rng, 1, 1, 1, 3, 3, 64, np.float32)
    out, _ = _check("causal new", q, k, v, np.array([3], np.int32), "float32", causal=True)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0].astype(np.float64), rtol=1e-6)
    noncausal, _ = _check("noncausal new", q, k, v, np.array([3], np.int32), "float32", causal=False)
    assert np.max(np.abs(noncausal[0, 0, 0] - out[0, 0, 0])) > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_huge_logits_and_peaky(dtype):
    rng = np.random.default_rng(14)
    q, k, v = _inputs(rng, 2, 4, 1, 2, 520, 256, DTYPES[dtype], scale=50.0)
    _check("huge logits", q, k, v, np.array([520, 300], np.int32), dtype)
    k2 = k.copy()
    k2[:, 0, 100:102] = q[:, 0]           # q == k for the new tokens' own keys
    _check("q=k", q, k2, v, np.array([102, 102], np.int32), dtype)


def test_lnc2_equals_lnc1():
    rng = np.random.default_rng(15)
    q, k, v = _inputs(rng, 3, 4, 1, 2, 900, 256, BF16)
    lens = np.array([2, 800, 900], np.int32)
    one = flash_attention_decode(q, k, v, lens, lnc=1)
    two = flash_attention_decode(q, k, v, lens, lnc=2)
    np.testing.assert_array_equal(np.asarray(one, np.float64), np.asarray(two, np.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(d=512), "head dim D must be in"),
    (dict(hq=3, hkv=2), "Hq must be a multiple of Hkv"),
    (dict(sq=9), r"Sq \(new tokens\) must be in \[1, 8\]"),
    (dict(lens=[0, 5]), r"cache_lens must be in \[2, 16\]"),
    (dict(lens=[5, 17]), r"cache_lens must be in \[2, 16\]"),
    (dict(lens=[5]), r"cache_lens must have shape \[B\]"),
    (dict(flt_lens=True), "cache_lens must be integers"),
    (dict(vshape=True), "shapes differ"),
    (dict(hq=128, hkv=1), r"\(Hq / Hkv\) \* Sq rows must be <= 128"),
    (dict(scale=0.0), "softmax_scale must be a finite number > 0"),
])
def test_bad_inputs_raise(kwargs, match):
    b, hq, hkv = 2, kwargs.get("hq", 2), kwargs.get("hkv", 1)
    sq, s, d = kwargs.get("sq", 2), 16, kwargs.get("d", 64)
    q = np.zeros((b, hq, sq, d), np.float32)
    k = np.zeros((b, hkv, s, d), np.float32)
    v = np.zeros((b, hkv, s + (1 if kwargs.get("vshape") else 0), d), np.float32)
    lens = np.array(kwargs.get("lens", [5, 6]), np.float32 if kwargs.get("flt_lens") else np.int32)
    with pytest.raises(KernelInputError, match=match):
        flash_attention_decode(q, k, v, lens, softmax_scale=kwargs.get("scale"))


@pytest.mark.slow
def test_qwen35_tp4_decode_8k():
    rng = np.random.default_rng(16)
    q, k, v = _inputs(rng, 2, 4, 1, 1, 8192, 256, BF16)
    _check("qwen3.5 tp4 decode 8k", q, k, v, np.array([8192, 5000], np.int32), "bfloat16")


@given(d=st.sampled_from([1, 3, 5, 255]), s=st.sampled_from([256, 1000, 2600]), sq=st.integers(1, 3),
       group=st.sampled_from([1, 4]), b=st.sampled_from([1, 3]), dtype=st.sampled_from(["bfloat16", "float32"]),
       seed=st.integers(0, 2 ** 16))
def test_odd_head_dim_key_split_lnc2(d, s, sq, group, b, dtype, seed):
    """Odd D with the keys split across the cores (B * Hkv odd, S >= 256): the state swap sends the same number of
    columns both ways and D = 1 leaves core 1 nothing to write; LNC=2 matches the reference and LNC=1 bit for bit."""
    rng = np.random.default_rng(seed)
    q, k, v = _inputs(rng, b, group, 1, sq, s, d, DTYPES[dtype])
    lens = rng.integers(sq, s + 1, size=b).astype(np.int32)
    two, _ = _check(f"odd D={d} lnc=2", q, k, v, lens, dtype, lnc=2)
    one = np.asarray(flash_attention_decode(q, k, v, lens, lnc=1), np.float64)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("b, hq, hkv, s", [(3, 4, 1, 4224), (1, 24, 3, 4224), (3, 64, 1, 2176)])
def test_key_split_halves_of_different_piece_counts_lnc2(b, hq, hkv, s):
    """B * Hkv odd and >= 3 with key halves of different piece counts (here 2 and 1): the core with one piece must
    still issue the previous part's l exchange and O swap before this part's max exchange, the order the other
    core uses (before the fix, LNC=2 failed: the cores' sendrecvs paired pipe 2 with pipe 1)."""
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, b, hq, hkv, 1, s, 128, BF16)
    lens = np.full(b, s, np.int32)
    two, _ = _check(f"split halves b={b} hq={hq} s={s}", q, k, v, lens, "bfloat16", lnc=2)
    one = np.asarray(flash_attention_decode(q, k, v, lens, lnc=1), np.float64)
    np.testing.assert_array_equal(one, two)


def _rows_ref(q, k, v, n, rows):
    """float64 decode attention (Sq = 1, one KV head, no masking beyond the length n) of query heads `rows`."""
    kv_k = k[0, 0, :n].astype(np.float64)
    kv_v = v[0, 0, :n].astype(np.float64)
    out = []
    for h in rows:
        s = kv_k @ q[0, h, 0].astype(np.float64) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max())
        out.append(p @ kv_v / p.sum())
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_longest_context_fits(dtype):
    """S = 262144 (Qwen3.5's 256K context) at D = 256, B = 1, Hkv = 1 (the key split at LNC=2): fits in SBUF (the
    K preload of the split is bounded) and matches a float64 reference; cache positions past the length are NaN."""
    s, n, hq, d = 262144, 262144 - 777, 4, 256
    rng = np.random.default_rng(17)
    q = rng.standard_normal((1, hq, 1, d)).astype(DTYPES[dtype])
    k = rng.standard_normal((1, 1, s, d), dtype=np.float32).astype(DTYPES[dtype])
    v = rng.standard_normal((1, 1, s, d), dtype=np.float32).astype(DTYPES[dtype])
    k[0, 0, n:] = np.nan
    v[0, 0, n:] = np.nan
    out = np.asarray(flash_attention_decode(q, k, v, np.array([n], np.int32), lnc=2), np.float64)
    rows = [0, hq - 1]
    assert_close(f"S={s} {dtype}", _rows_ref(q, k, v, n, rows), out[0, rows, 0], dtype=dtype)
