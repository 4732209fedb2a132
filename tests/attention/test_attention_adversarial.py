"""Adversarial inputs for flash_attention / flash_attention_decode (issues 14 and 16): LNC resolution, NumPy
scalars, float lengths, empty shapes, non-arrays, non-finite values contained per sequence, expanded K/V and
inputs left untouched."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import flash_attention, flash_attention_decode, flash_attention_varlen
from nki_kernels.attention._common import MAX_SOFTMAX_SCALE
from nki_kernels.attention.reference import (flash_attention_decode_ref, flash_attention_ref,
                                            flash_attention_varlen_ref)
from nki_kernels.lnc import LNC_ENV
from nki_kernels.testing import assert_close, program_signature
from nki_kernels.validation import KernelInputError

from contain_kit import assert_contained, poison_one, run_poisoned

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


def _qkv(rng, b, hq, hkv, sq, skv, d, dtype):
    return (rng.standard_normal((b, hq, sq, d)).astype(dtype), rng.standard_normal((b, hkv, skv, d)).astype(dtype),
            rng.standard_normal((b, hkv, skv, d)).astype(dtype))


@pytest.fixture
def launches():
    """The RunResult of every emulated launch made by the wrappers."""
    from nki_kernels.emulator import record_launches
    with record_launches() as runs:
        yield runs


# ------------------------------------------------------------------ LNC (issue 14)

def test_default_lnc_is_the_targets_and_env_wins(monkeypatch, launches):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, 4, 2, 70, 90, 128, BF16)
    lens = np.array([80, 90], np.int32)
    monkeypatch.delenv(LNC_ENV, raising=False)
    out_default = flash_attention(q, k, v, seq_lens=lens)                 # trn2: LNC=2
    monkeypatch.setenv(LNC_ENV, "2")
    out_env = flash_attention(q, k, v, seq_lens=lens)
    dec_env = flash_attention_decode(q[:, :, :2], k, v, lens)
    monkeypatch.setenv(LNC_ENV, "1")
    out_one = flash_attention(q, k, v, seq_lens=lens)
    out_explicit = flash_attention(q, k, v, seq_lens=lens, lnc=2)          # explicit lnc beats the env
    assert [(r.lnc, len(r.traces)) for r in launches] == [(2, 2), (2, 2), (2, 2), (1, 1), (2, 2)]
    ref = flash_attention_ref(q, k, v, seq_lens=lens)
    for out in (out_default, out_env, out_one, out_explicit):
        assert_close("lnc", ref, out, dtype="bfloat16")
    assert_close("decode lnc env", flash_attention_decode_ref(q[:, :, :2], k, v, lens), dec_env, dtype="bfloat16")


@pytest.mark.parametrize("raw", ["two", "3"])
def test_bad_env_lnc_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(LNC_ENV, raw)
    q = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(KernelInputError, match=f"flash_attention: {LNC_ENV}"):
        flash_attention(q, q, q)
    with pytest.raises(KernelInputError, match=f"flash_attention_decode: {LNC_ENV}"):
        flash_attention_decode(q, q, q, [4])


@given(lnc=st.sampled_from([1, 2]), b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.sampled_from([1, 2]),
       sq=st.integers(1, 150), extra=st.sampled_from([0, 7]), d=st.sampled_from([64, 96, 256]),
       dtype=st.sampled_from(["bfloat16", "float32"]), seed=st.integers(0, 2 ** 16))
def test_prefill_lnc1_and_lnc2_match_reference(lnc, b, hkv, group, sq, extra, d, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b, hkv * group, hkv, sq, sq + extra, d, DTYPES[dtype])
    out = flash_attention(q, k, v, causal=True, lnc=lnc)
    assert_close("prefill", flash_attention_ref(q, k, v, causal=True), out, dtype=dtype)


@given(lnc=st.sampled_from([1, 2]), b=st.integers(1, 3), hkv=st.integers(1, 3), sq=st.integers(1, 4),
       s=st.sampled_from([16, 300]), seed=st.integers(0, 2 ** 16))
def test_decode_lnc1_and_lnc2_match_reference(lnc, b, hkv, sq, s, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b, 2 * hkv, hkv, sq, s, 128, BF16)
    lens = rng.integers(sq, s + 1, size=b)
    out = flash_attention_decode(q, k, v, lens, lnc=lnc)
    assert_close("decode", flash_attention_decode_ref(q, k, v, lens), out, dtype="bfloat16")


# ------------------------------------------------------------------ arguments (issue 16)

@pytest.mark.parametrize("scale", [np.float32(0.1), np.float64(0.1), np.int64(1), 0.1])
def test_numpy_scalar_softmax_scale(scale):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 2, 1, 20, 20, 64, np.float32)
    assert_close("scale", flash_attention_ref(q, k, v, softmax_scale=float(scale)),
                 flash_attention(q, k, v, softmax_scale=scale), dtype="float32")
    assert_close("scale decode", flash_attention_decode_ref(q[:, :, :1], k, v, [20], softmax_scale=float(scale)),
                 flash_attention_decode(q[:, :, :1], k, v, [20], softmax_scale=scale), dtype="float32")


@pytest.mark.parametrize("scale", [True, np.bool_(True), "0.1", np.float32("nan"), float("inf"), -0.5, 0])
def test_bad_softmax_scale(scale):
    q = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(KernelInputError, match="softmax_scale must be a finite number > 0"):
        flash_attention(q, q, q, softmax_scale=scale)
    with pytest.raises(KernelInputError, match="softmax_scale must be a finite number > 0"):
        flash_attention_decode(q, q, q, [4], softmax_scale=scale)


def _three_kernels(rng, dtype):
    """(name, kernel call, reference call) of prefill (seq_lens, causal), decode and varlen (an empty sequence)."""
    q, k, v = _qkv(rng, 2, 2, 1, 200, 300, 64, dtype)
    lens = np.array([250, 3], np.int32)
    qd = q[:, :, :2]
    lq, lk = [60, 0, 70], [0, 200, 90]
    cq, ck = np.cumsum([0] + lq).astype(np.int32), np.cumsum([0] + lk).astype(np.int32)
    qv, kv, vv = (rng.standard_normal((sum(n), h, 64)).astype(dtype) for n, h in ((lq, 2), (lk, 1), (lk, 1)))
    return [
        ("flash_attention", lambda s: flash_attention(q, k, v, seq_lens=lens, softmax_scale=s),
         lambda s: flash_attention_ref(q, k, v, seq_lens=lens, softmax_scale=s)),
        ("flash_attention_decode", lambda s: flash_attention_decode(qd, k, v, lens, softmax_scale=s),
         lambda s: flash_attention_decode_ref(qd, k, v, lens, softmax_scale=s)),
        ("flash_attention_varlen", lambda s: flash_attention_varlen(qv, kv, vv, cq, ck, causal=False, softmax_scale=s),
         lambda s: flash_attention_varlen_ref(qv, kv, vv, cq, ck, causal=False, softmax_scale=s)),
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_largest_softmax_scale_matches_the_reference_and_larger_is_refused(dtype):
    """softmax_scale up to MAX_SOFTMAX_SCALE is exact against the float64 reference (at 1e8 the softmax is an
    argmax); above it the wrappers refuse, naming the argument and the limit (1e38 returned all-NaN rows while the
    reference is finite)."""
    rng = np.random.default_rng(7)
    for name, run, ref in _three_kernels(rng, DTYPES[dtype]):
        for scale in (MAX_SOFTMAX_SCALE, 4.0):
            out = np.asarray(run(scale), np.float64)
            assert np.all(np.isfinite(out)), (name, scale)
            assert_close(f"{name} scale={scale:g}", ref(scale), out, dtype=dtype)
        for scale in (np.nextafter(MAX_SOFTMAX_SCALE, np.inf), 1e38, np.float32(3e38)):
            with pytest.raises(KernelInputError, match=rf"{name}: softmax_scale must be <= 1e\+08"):
                run(scale)
        for scale in (float("nan"), float("inf"), -float("inf"), -1e-3, 0.0):
            with pytest.raises(KernelInputError, match=rf"{name}: softmax_scale must be a finite number > 0"):
                run(scale)


def _float_lens():
    torch = pytest.importorskip("torch")
    return [[7.9], [7.0], np.array([7.0], np.float32), torch.tensor([7.0]), np.array([True])]


def test_float_lengths_refused_by_both():
    q = np.zeros((1, 1, 4, 64), np.float32)
    k = np.zeros((1, 1, 8, 64), np.float32)
    for lens in _float_lens():
        with pytest.raises(KernelInputError, match="seq_lens must be integers"):
            flash_attention(q, k, k, seq_lens=lens)
        with pytest.raises(KernelInputError, match="cache_lens must be integers"):
            flash_attention_decode(q, k, k, lens)


def test_integer_lengths_of_any_kind_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 1, 1, 4, 8, 64, np.float32)
    ref = flash_attention_decode_ref(q, k, v, [6])
    for lens in ([6], (6,), np.array([6], np.int64), np.array([6], np.uint8), torch.tensor([6])):
        assert_close("lens kinds", ref, flash_attention_decode(q, k, v, lens), dtype="float32")


@pytest.mark.parametrize("shape_q, shape_kv, match", [
    ((0, 2, 4, 64), (0, 1, 8, 64), r"every dimension of q \[B, Hq, Sq, D\] must be >= 1"),
    ((1, 2, 0, 64), (1, 1, 8, 64), r"every dimension of q"),
    ((1, 2, 4, 64), (1, 1, 0, 64), r"every dimension of k"),
    ((1, 0, 4, 64), (1, 1, 8, 64), r"every dimension of q"),
    ((1, 2, 4, 0), (1, 1, 8, 0), r"every dimension of q"),
    ((2, 4, 64), (1, 1, 8, 64), r"q must be 4-D \[B, Hq, Sq, D\]"),
])
def test_empty_and_wrong_rank_shapes(shape_q, shape_kv, match):
    q, kv = np.zeros(shape_q, np.float32), np.zeros(shape_kv, np.float32)
    with pytest.raises(KernelInputError, match=match):
        flash_attention(q, kv, kv)


def test_decode_empty_batch_and_cache():
    q = np.zeros((0, 2, 1, 64), np.float32)
    with pytest.raises(KernelInputError, match="every dimension of q"):
        flash_attention_decode(q, np.zeros((0, 1, 8, 64), np.float32), np.zeros((0, 1, 8, 64), np.float32), [])
    q = np.zeros((1, 2, 1, 64), np.float32)
    kv = np.zeros((1, 1, 0, 64), np.float32)
    with pytest.raises(KernelInputError, match="every dimension of k_cache"):
        flash_attention_decode(q, kv, kv, [1])


def test_non_arrays_are_clear_errors():
    q = np.zeros((1, 1, 4, 64), np.float32).tolist()
    with pytest.raises(KernelInputError, match="q must be a NumPy array or torch tensor"):
        flash_attention(q, q, q)
    with pytest.raises(KernelInputError, match="q must be a NumPy array or torch tensor"):
        flash_attention_decode(q, q, q, [4])
    arr = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(KernelInputError, match="gate must be a NumPy array"):
        flash_attention(arr, arr, arr, gate=1.0)
    with pytest.raises(KernelInputError, match="cache_lens must be integers"):
        flash_attention_decode(arr, arr, arr, "4")


def test_meta_tensors_refused():
    torch = pytest.importorskip("torch")
    q = torch.empty(1, 1, 4, 64, device="meta")
    with pytest.raises(KernelInputError, match="q must be a CPU tensor"):
        flash_attention(q, q, q)
    qc = torch.zeros(1, 1, 4, 64)
    with pytest.raises(KernelInputError, match="cache_lens must be integers with values"):
        flash_attention_decode(qc, qc, qc, torch.tensor([4], device="meta"))


def test_float64_inputs_refused_with_the_dtypes_allowed():
    q = np.zeros((1, 1, 4, 64))
    with pytest.raises(KernelInputError, match=r"dtype must be one of .*got q.dtype=float64"):
        flash_attention(q, q, q)


def test_unknown_keyword_is_a_type_error():
    q = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(TypeError):
        flash_attention(q, q, q, seq_len=[4])          # typo of seq_lens
    with pytest.raises(TypeError):
        flash_attention_decode(q, q, q, [4], casual=True)


# ------------------------------------------------------------------ non-finite values stay in their sequence

@given(where=st.sampled_from(["q", "k", "v", "gate"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       b=st.integers(2, 3), causal=st.booleans(), dtype=st.sampled_from(["bfloat16", "float32"]),
       lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_prefill_non_finite_stays_in_its_sequence(where, value, b, causal, dtype, lnc, seed):
    """A non-finite value in one sequence's q / k / v / gate leaves every other sequence bit-identical to the
    clean run. Inside that sequence: a q or gate value reaches only its own row (query head, position)."""
    rng = np.random.default_rng(seed)
    hq, hkv, sq, skv, d = 4, 2, 150, 170, 64
    q, k, v = _qkv(rng, b, hq, hkv, sq, skv, d, DTYPES[dtype])
    gate = rng.standard_normal(q.shape).astype(DTYPES[dtype])
    clean = np.asarray(flash_attention(q, k, v, gate=gate, causal=causal, lnc=lnc), np.float64)
    bad_b = int(rng.integers(0, b))
    tensors = dict(q=q.copy(), k=k.copy(), v=v.copy(), gate=gate.copy())
    h, s = poison_one(rng, tensors, where, bad_b, value)
    assert_contained(run_poisoned(tensors, causal=causal, lnc=lnc), clean, where, bad_b, h, s)


@given(where=st.sampled_from(["q", "k", "v"]), value=st.sampled_from([np.nan, np.inf]), seed=st.integers(0, 2 ** 16),
       lnc=st.sampled_from([1, 2]))
def test_decode_non_finite_stays_in_its_sequence(where, value, seed, lnc):
    """Decode: a non-finite value in sequence b's new token or in its valid cache rows leaves the other
    sequences bit-identical."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, sq, s, d = 3, 4, 2, 2, 300, 128
    q, k, v = _qkv(rng, b, hq, hkv, sq, s, d, BF16)
    lens = rng.integers(sq, s + 1, size=b)
    clean = np.asarray(flash_attention_decode(q, k, v, lens, lnc=lnc), np.float64)
    bad_b = int(rng.integers(0, b))
    tensors = dict(q=q.copy(), k=k.copy(), v=v.copy())
    pos = int(rng.integers(0, sq)) if where == "q" else int(rng.integers(0, lens[bad_b]))
    tensors[where][bad_b, 0, pos, 3] = value
    out = np.asarray(flash_attention_decode(tensors["q"], tensors["k"], tensors["v"], lens, lnc=lnc), np.float64)
    others = [i for i in range(b) if i != bad_b]
    np.testing.assert_array_equal(out[others], clean[others])


# ------------------------------------------------------------------ padding never reaches valid outputs (issue 16)

_PAD_VALUES = [np.nan, np.inf, -np.inf, 1e30, -1e30]


@given(where=st.lists(st.sampled_from(["q", "k", "v", "gate"]), min_size=1, max_size=4, unique=True),
       value=st.sampled_from(_PAD_VALUES), causal=st.booleans(), dtype=st.sampled_from(["bfloat16", "float32"]),
       lnc=st.sampled_from([1, 2]), sq=st.sampled_from([1, 70, 150]), extra=st.sampled_from([0, 40]),
       d=st.sampled_from([64, 256]), whole=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_prefill_padding_never_reaches_valid_outputs(where, value, causal, dtype, lnc, sq, extra, d, whole, seed):
    """Positions >= seq_lens[b] of q / k / v / gate may hold anything (NaN, +-Inf, +-1e30, in one element or
    the whole pad region): the output is bit-identical to the same call with zeros there (valid rows: the same
    values; padded rows: 0)."""
    rng = np.random.default_rng(seed)
    b, hq, hkv = 2, 4, 2
    skv = sq + extra
    q, k, v = _qkv(rng, b, hq, hkv, sq, skv, d, DTYPES[dtype])
    gate = rng.standard_normal(q.shape).astype(DTYPES[dtype])
    lens = rng.integers(0, skv + 1, size=b)
    lens[int(rng.integers(0, b))] = rng.integers(0, skv)          # at least one sequence has padding
    zeros = dict(q=q, k=k, v=v, gate=gate)
    for name, arr in zeros.items():
        s0 = skv - sq if name in ("q", "gate") else 0                # q / gate row i sits at key position s0 + i
        for i in range(b):
            arr[i, :, max(0, lens[i] - s0):] = 0
    dirty = {name: arr.copy() for name, arr in zeros.items()}
    for name in where:
        arr = dirty[name]
        s0 = skv - sq if name in ("q", "gate") else 0
        for i in range(b):
            lo = max(0, lens[i] - s0)
            if lo >= arr.shape[2]:
                continue
            if whole:
                arr[i, :, lo:] = value
            else:
                arr[i, int(rng.integers(0, hkv if name in "kv" else hq)), int(rng.integers(lo, arr.shape[2])),
                    int(rng.integers(0, d))] = value
    ref = flash_attention(zeros["q"], zeros["k"], zeros["v"], gate=zeros["gate"], seq_lens=lens, causal=causal,
                          lnc=lnc)
    out = flash_attention(dirty["q"], dirty["k"], dirty["v"], gate=dirty["gate"], seq_lens=lens, causal=causal,
                          lnc=lnc)
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(ref, np.float64))
    assert_close("padded vs reference", flash_attention_ref(q, k, v, gate=gate, seq_lens=lens, causal=causal),
                 out, dtype=dtype)


@given(where=st.lists(st.sampled_from(["k", "v"]), min_size=1, max_size=2, unique=True),
       value=st.sampled_from(_PAD_VALUES), causal=st.booleans(), sq=st.integers(1, 3),
       s=st.sampled_from([40, 300]), lnc=st.sampled_from([1, 2]), whole=st.booleans(),
       dtype=st.sampled_from(["bfloat16", "float32"]), seed=st.integers(0, 2 ** 16))
def test_decode_cache_padding_never_reaches_outputs(where, value, causal, sq, s, lnc, whole, dtype, seed):
    """Cache positions >= cache_lens[b] may hold anything (a torch.empty cache, stale NaN): the output is
    bit-identical to the same call with zeros there."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, d = 3, 4, 2, 128
    q, k, v = _qkv(rng, b, hq, hkv, sq, s, d, DTYPES[dtype])
    lens = rng.integers(sq, s + 1, size=b)
    lens[int(rng.integers(0, b))] = rng.integers(sq, s)
    for arr in (k, v):
        for i in range(b):
            arr[i, :, lens[i]:] = 0
    dirty = dict(k=k.copy(), v=v.copy())
    for name in where:
        for i in range(b):
            if lens[i] == s:
                continue
            if whole:
                dirty[name][i, :, lens[i]:] = value
            else:
                pos = int(rng.integers(lens[i], s))
                dirty[name][i, int(rng.integers(0, hkv)), pos, int(rng.integers(0, d))] = value
    ref = flash_attention_decode(q, k, v, lens, causal=causal, lnc=lnc)
    out = flash_attention_decode(q, dirty["k"], dirty["v"], lens, causal=causal, lnc=lnc)
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(ref, np.float64))
    assert_close("decode padded vs reference", flash_attention_decode_ref(q, k, v, lens, causal=causal), out,
                 dtype=dtype)


def test_huge_finite_values_stay_finite_and_contained():
    """|q|, |k| ~ 1e4 give logits ~1e9 (far beyond exp's range): still the reference's finite answer."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 2, 1, 40, 60, 64, np.float32)
    q[1] *= 1e4
    k[1] *= 1e4
    out = flash_attention(q, k, v, causal=True)
    assert np.all(np.isfinite(out))
    assert_close("huge", flash_attention_ref(q, k, v, causal=True), out, dtype="float32")


# ------------------------------------------------------------------ torch views and immutability

def test_expanded_kv_and_inputs_untouched():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(1, 1, 16, 64, generator=gen).expand(2, 1, 16, 64)
    q = torch.randn(2, 2, 16, 64, generator=gen)
    gate = torch.randn(2, 16, 2, 64, generator=gen).transpose(1, 2)          # non-contiguous view
    before = [t.clone() for t in (q, kv, gate)]
    versions = [t._version for t in (q, kv, gate)]
    out = flash_attention(q, kv, kv, gate=gate)
    assert_close("expanded kv", flash_attention_ref(q, kv, kv, gate=gate), out.numpy(), dtype="float32")
    dec = flash_attention_decode(q[:, :, :1], kv, kv, torch.tensor([16, 9]))
    assert_close("expanded kv decode", flash_attention_decode_ref(q[:, :, :1], kv, kv, [16, 9]), dec.numpy(),
                 dtype="float32")
    for t, b0, v0 in zip((q, kv, gate), before, versions):
        assert torch.equal(t, b0) and t._version == v0


def test_numpy_inputs_untouched():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 2, 1, 30, 40, 64, BF16)
    lens = np.array([40, 17], np.int64)
    copies = [a.copy() for a in (q, k, v, lens)]
    flash_attention(q, k, v, seq_lens=lens)
    flash_attention_decode(q[:, :, :2], k, v, lens)
    for a, c in zip((q, k, v, lens), copies):
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


# ------------------------------------------------------------------ traced once (issue 14)

def _signature(run):
    return [[(i.name, i.engine, tuple((a.buffer, a.dtype, a.shape, a.lo, a.hi) for a in i.reads + i.writes))
             for i in trace] for trace in run.traces]


@pytest.mark.parametrize("lnc", [1, 2])
def test_instructions_independent_of_length_values(lnc):
    """seq_lens / cache_lens are data: different values, same shapes -> the same instruction stream (operands
    and address ranges included), and each result matches its reference. Decode zeroes V only in chunk groups
    that hold positions past the length (register-bounded loops of 0 or 1 iterations): its compiled program is
    compared (`program_signature`, each loop once with its body), and the executed zeroing differs."""
    from nki_kernels.emulator.runtime import last_run
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 4, 1, 130, 300, 128, BF16)
    sigs = []
    for lens in ([300, 1], [0, 299], [150, 300]):
        out = flash_attention(q, k, v, seq_lens=lens, lnc=lnc)
        assert_close("prefill lens", flash_attention_ref(q, k, v, seq_lens=lens), out, dtype="bfloat16")
        sigs.append(_signature(last_run()))
    assert sigs[0] == sigs[1] == sigs[2]
    sigs, executed = [], []
    for lens in ([2, 300], [300, 2], [170, 171], [300, 300]):
        out = flash_attention_decode(q[:, :, :2], k, v, lens, lnc=lnc)
        assert_close("decode lens", flash_attention_decode_ref(q[:, :, :2], k, v, lens), out, dtype="bfloat16")
        sigs.append(program_signature([last_run()]))
        executed.append(sum(i.name == "tensor_copy_predicated" for t in last_run().traces for i in t))
    assert sigs[0] == sigs[1] == sigs[2] == sigs[3]
    assert executed[3] == 0 < executed[2]       # full caches: no zeroing runs


@pytest.mark.parametrize("lnc", [1, 2])
def test_decode_skips_chunk_groups_past_the_length(lnc):
    """Decode: a 512-key group of a piece that lies entirely past cache_lens[b] is neither zeroed nor multiplied
    (register-bounded loops), the first group of a piece always is; the program is the same for every length,
    the result matches the reference with NaN in every padded position, and the executed P V matmuls drop by
    the skipped chunks (bounds counted from the lengths)."""
    from nki_kernels.emulator.runtime import last_run
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 1, 4, 1, 1, 2048, 128, BF16)
    sigs, pv_mm = [], []
    for n in (2048, 1000, 300, 3):
        kp, vp = k.copy(), v.copy()
        kp[:, :, n:] = np.nan
        vp[:, :, n:] = np.nan
        out = flash_attention_decode(q, kp, vp, [n], lnc=lnc)
        assert_close("decode", flash_attention_decode_ref(q, k, v, [n]), out, dtype="bfloat16")
        sigs.append(program_signature([last_run()]))
        # P V matmuls: R = 4 rows out, moving V [keys, D | ones column] or, in a split part's last piece, half of D
        # at a time (its row sums come from P^T alone); executed chunks = output columns // D
        pv_mm.append(sum(i.writes[0].elems_pp for t in last_run().traces for i in t
                         if i.name == "nc_matmul" and i.writes[0].partitions == 4) // 128)
    assert sigs[0] == sigs[1] == sigs[2] == sigs[3]
    # 2048 keys = 16 chunks (two halves of 1024 keys, split at LNC 1 and 2 alike); per executed chunk D = 128
    # output columns (two matmuls of 64: each half's only piece is its last). Every chunk holding a key < n runs;
    # past the length only the first group (<= 4 chunks) of each of the two pieces may run, and the straddling
    # group's other chunks
    run = pv_mm
    assert run[0] == 16
    for n, r in zip((1000, 300, 3), run[1:]):
        valid = -(-n // 128)
        assert valid <= r <= valid + 2 * 4, (n, r)
    assert run[0] > run[1] > run[2] >= run[3]
