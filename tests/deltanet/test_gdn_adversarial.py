"""Adversarial inputs for the gated DeltaNet family (issue 16): non-finite values stay in their token /
sequence, padding never reaches valid outputs or returned states, g = -inf is exact decay to zero, inputs are
never modified (except the documented in-place state arguments), and bad arguments are clear errors.

"Unaffected" is checked bit for bit against the same launch without the bad value: the kernels compute every
other token with the same instructions, so anything but exact equality means the bad value leaked."""
import numpy as np
import pytest
from _gdn_inputs import BF16, DTYPES, gdn_inputs
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from nki_kernels import causal_conv1d, causal_conv1d_update, gated_delta_rule, gated_delta_rule_step
from nki_kernels.deltanet import reference as ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

_BAD = st.sampled_from([np.nan, np.inf, -np.inf])
_NAMES = ("q", "k", "v", "g", "beta")


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def _args(q, k, v, g, beta):
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def _same(a, b):
    """Bit-identical, NaN == NaN."""
    np.testing.assert_array_equal(_f32(a), _f32(b))


# ------------------------------------------------------------------------------------------- prefill

@settings(max_examples=10)
@given(t=st.integers(2, 140), pos=st.data(), bad=_BAD, dtype=st.sampled_from(["float32", "bfloat16"]),
       l2norm=st.booleans(), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_prefill_nonfinite_q_stays_in_its_token(t, pos, bad, dtype, l2norm, lnc, seed):
    """q[b, t0, h, d] non-finite changes token t0's outputs only (the reference and transformers' chunked
    function do the same): every other token and the final state are bit-identical to the clean launch."""
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 2, t, 2, 4, 32, 16, DTYPES[dtype]))
    b0 = pos.draw(st.integers(0, 1))
    t0 = pos.draw(st.integers(0, t - 1))
    h0 = pos.draw(st.integers(0, 1))
    d0 = pos.draw(st.integers(0, 31))
    clean_o, clean_s = gated_delta_rule(**x, use_qk_l2norm_in_kernel=l2norm, lnc=lnc)
    x["q"] = x["q"].copy()
    x["q"][b0, t0, h0, d0] = bad
    o, s = gated_delta_rule(**x, use_qk_l2norm_in_kernel=l2norm, lnc=lnc)
    keep = np.ones((2, t), bool)
    keep[b0, t0] = False
    _same(o[keep], clean_o[keep])
    _same(s, clean_s)
    if np.isnan(bad) or l2norm:          # NaN, or inf * 0 in the norm: NaN in the v heads of q head h0
        group = 2
        assert np.isnan(_f32(o[b0, t0, h0 * group:(h0 + 1) * group])).any()


@settings(max_examples=10)
@given(lens=st.lists(st.integers(0, 100), min_size=2, max_size=2), name=st.sampled_from(_NAMES), bad=_BAD,
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), pos=st.data(),
       with_init=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_prefill_nonfinite_padding_reaches_nothing(lens, name, bad, dtype, lnc, pos, with_init, seed):
    """Non-finite q, k, v, g or beta at pad tokens (t >= valid_lengths[b]): valid outputs and the final state
    are bit-identical to the clean launch, pad outputs are 0, and both match the reference."""
    t = max(lens) + pos.draw(st.integers(1, 30))
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 2, t, 1, 2, 32, 16, DTYPES[dtype]))
    s0 = rng.standard_normal((2, 2, 32, 16)).astype(np.float32) if with_init else None
    kw = dict(initial_state=s0, use_qk_l2norm_in_kernel=True, valid_lengths=np.array(lens), lnc=lnc)
    clean_o, clean_s = gated_delta_rule(**x, **kw)
    bad_x = {n: a.copy() for n, a in x.items()}
    for b, n in enumerate(lens):
        rows = pos.draw(st.lists(st.integers(n, t - 1), min_size=1, max_size=3))
        bad_x[name][b, rows] = bad
    o, s = gated_delta_rule(**bad_x, **kw)
    _same(o, clean_o)
    _same(s, clean_s)
    for b, n in enumerate(lens):
        assert np.all(_f32(o[b, n:]) == 0)
    ro, rs = ref.gated_delta_rule(**x, initial_state=s0, use_qk_l2norm_in_kernel=True, valid_lengths=np.array(lens))
    assert_close("o", ro, o, dtype=dtype)
    assert_close("state", rs, s, dtype="float32" if dtype == "float32" else "bfloat16")


def _nonfinite_as_reference(name, ref_x, got, dtype):
    """Non-finite exactly where the float64 reference is, and close to it elsewhere."""
    ref_x, got = np.asarray(ref_x, np.float64), _f32(got)
    np.testing.assert_array_equal(~np.isfinite(got), ~np.isfinite(ref_x), err_msg=f"{name}: non-finite pattern")
    fin = np.isfinite(ref_x)
    assert_close(name, ref_x[fin], got[fin], dtype=dtype)


@settings(max_examples=16, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(t=st.integers(2, 150), name=st.sampled_from(_NAMES), bad=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]),
       dtype=st.sampled_from(["float32", "bfloat16"]), l2norm=st.booleans(), lnc=st.sampled_from([1, 2]),
       with_init=st.booleans(), padded=st.booleans(), pos=st.data(), seed=st.integers(0, 2 ** 16))
def test_prefill_nonfinite_contained_inside_its_sequence(t, name, bad, dtype, l2norm, lnc, with_init, padded, pos,
                                                         seed):
    """A bad value (NaN, +-Inf, 1e30) in q, k, v, g or beta at token j of sequence b (anywhere in a chunk):
    tokens before j, the checkpoints before j and the other sequence are bit-identical to the clean launch (no
    0 x NaN through the intra-chunk products); tokens >= j, later checkpoints and the final state are
    non-finite exactly where the token-sequential float64 reference is, and match it elsewhere (NaN / Inf
    only: 1e30 overflows fp32 products the float64 reference keeps finite, so there only containment is
    checked)."""
    rng = np.random.default_rng(seed)
    hk, hv, d = 2, 4, 16
    x = _args(*gdn_inputs(rng, 2, t, hk, hv, d, d, DTYPES[dtype]))
    b0, j = pos.draw(st.integers(0, 1)), pos.draw(st.integers(0, t - 1))
    lens = np.array([t, t])
    if padded:
        lens[b0] = pos.draw(st.integers(j + 1, t))
        lens[1 - b0] = pos.draw(st.integers(0, t))
    idx = (b0, j) + tuple(pos.draw(st.integers(0, n - 1)) for n in x[name].shape[2:])
    s0 = rng.standard_normal((2, hv, d, d)).astype(np.float32) if with_init else None
    kw = dict(chunk_size=64, initial_state=s0, use_qk_l2norm_in_kernel=l2norm, checkpoint_every=1,
              valid_lengths=lens if padded else None)
    clean = gated_delta_rule(**x, **kw, lnc=lnc)
    x[name] = x[name].copy()
    x[name][idx] = bad
    o, s, ck = gated_delta_rule(**x, **kw, lnc=lnc)
    other = 1 - b0
    for got, ref_c in zip((o, s, ck), clean):
        _same(got[other], ref_c[other])
    _same(o[b0, :j], clean[0][b0, :j])
    n_before = j // 64                               # checkpoints after chunks that end at or before token j
    _same(ck[b0, :n_before], clean[2][b0, :n_before])
    if bad == 1e30:
        return
    ro, rs, rck = ref.gated_delta_rule(**x, **kw)
    st_dt = "float32" if dtype == "float32" else "bfloat16"
    _nonfinite_as_reference("o", ro[b0, j:], o[b0, j:], dtype)
    _nonfinite_as_reference("state", rs[b0], s[b0], st_dt)
    _nonfinite_as_reference("checkpoints", rck[b0], ck[b0], st_dt)


@settings(max_examples=8)
@given(t=st.integers(1, 140), n_inf=st.integers(1, 4), dtype=st.sampled_from(["float32", "bfloat16"]),
       lnc=st.sampled_from([1, 2]), pos=st.data(), seed=st.integers(0, 2 ** 16))
def test_prefill_g_minus_inf_is_exact_decay_to_zero(t, n_inf, dtype, lnc, pos, seed):
    """g = -inf at some (token, head): the state decays to exactly zero there, no NaN anywhere, as in the
    float64 reference."""
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 1, t, 1, 2, 32, 16, DTYPES[dtype]))
    s0 = rng.standard_normal((1, 2, 32, 16)).astype(np.float32)
    for _ in range(n_inf):
        x["g"][0, pos.draw(st.integers(0, t - 1)), pos.draw(st.integers(0, 1))] = -np.inf
    o, s = gated_delta_rule(**x, initial_state=s0, use_qk_l2norm_in_kernel=True, lnc=lnc)
    assert np.isfinite(_f32(o)).all() and np.isfinite(s).all()
    ro, rs = ref.gated_delta_rule(**x, initial_state=s0, use_qk_l2norm_in_kernel=True)
    assert_close("o", ro, o, dtype=dtype)
    assert_close("state", rs, s, dtype="float32" if dtype == "float32" else "bfloat16")


def test_prefill_g_minus_inf_on_last_token_zeroes_the_state_part(rng):
    """g = -inf on the last token with beta = 0 there: the final state of that head is exactly 0."""
    x = _args(*gdn_inputs(rng, 1, 70, 1, 2, 16, 16))
    x["g"][0, -1, 1] = -np.inf
    x["beta"][0, -1, 1] = 0.0
    o, s = gated_delta_rule(**x, initial_state=np.ones((1, 2, 16, 16), np.float32))
    assert np.all(s[0, 1] == 0) and np.isfinite(s[0, 0]).all() and np.all(s[0, 0] != 0)


def test_prefill_large_key_times_large_state_stays_finite(rng):
    """Finite inputs at the edge of fp32: a state of ~1e30 (v = 1e30 on early tokens) meets a key of norm ~1e9 in
    a later chunk. The raw-key products overflowed (the whole chunk went NaN) before the power-of-two pre-scale of
    large q / k rows; now every output matches the float64 reference."""
    q, k, v, g, beta = gdn_inputs(rng, 1, 128, 1, 1, 128, 128, dtype=BF16)
    g[:] = 0.0
    beta[:] = 1.0
    v[0, 0:40] = BF16(1e30)
    k[0, 100] = (k[0, 100].astype(np.float32) * 1e8).astype(BF16)
    want, want_s = ref.gated_delta_rule(*(_f32(x).astype(np.float64) for x in (q, k, v, g, beta)), chunk_size=64,
                                        use_qk_l2norm_in_kernel=True)
    assert np.isfinite(want).all()
    got, got_s = gated_delta_rule(q, k, v, g, beta, chunk_size=64, use_qk_l2norm_in_kernel=True)
    assert np.isfinite(_f32(got)).all()
    assert_close("o", want, _f32(got), dtype="bfloat16")
    assert_close("final_state", want_s, got_s, dtype="bfloat16")


def _scale_rows(x, rows, mag):
    """x with the (token) rows `rows` multiplied by mag (in float64, then rounded to x's dtype once)."""
    y = np.asarray(x, dtype=np.float64).copy()
    y[:, rows] *= mag
    return y.astype(x.dtype)


@settings(max_examples=10, deadline=None)
@given(ek=st.integers(-30, 30), eq=st.integers(-30, 30), big_state=st.booleans(),
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_prefill_key_query_magnitudes_match_reference(ek, eq, big_state, dtype, lnc, seed):
    """With the L2 norm, keys and queries of any magnitude 1e-30 .. 1e30 (on a random half of the tokens, the others
    O(1)), optionally meeting a state of ~1e30 (v = 1e30 on the first 40 tokens): outputs and final state match the
    float64 reference (the norm makes them scale-free; the kernel's products on raw rows must not overflow)."""
    rng = np.random.default_rng(seed)
    q, k, v, g, beta = gdn_inputs(rng, 1, 150, 1, 2, 128, 32, dtype=DTYPES[dtype])
    k = _scale_rows(k, rng.random(150) < 0.5, 10.0 ** ek)
    q = _scale_rows(q, rng.random(150) < 0.5, 10.0 ** eq)
    if big_state:
        v = _scale_rows(v, slice(0, 40), 1e30)
    want, want_s = ref.gated_delta_rule(*(_f32(x).astype(np.float64) for x in (q, k, v, g, beta)),
                                        use_qk_l2norm_in_kernel=True)
    assert np.isfinite(want).all() and np.isfinite(want_s).all()
    got, got_s = gated_delta_rule(q, k, v, g, beta, chunk_size=64, use_qk_l2norm_in_kernel=True, lnc=lnc)
    assert_close("o", want, _f32(got), dtype=dtype)
    assert_close("final_state", want_s, got_s, dtype=dtype)


@settings(max_examples=6, deadline=None)
@given(e=st.integers(-30, 30), big_state=st.booleans(), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_fused_key_query_magnitudes_match_reference(e, big_state, lnc, seed):
    """The fused entry point (conv + SiLU in front): the q and k channels of mixed_qkv (and of the conv state) scaled
    by 1e-30 .. 1e30 on a random half of the tokens, optionally with a ~1e30 state: as the float64 references."""
    from nki_kernels.deltanet.fused import gated_delta_rule_fused
    rng = np.random.default_rng(seed)
    hk, hv, dk, dv, kw, t = 1, 2, 128, 32, 4, 150
    nqk = 2 * hk * dk
    mixed = rng.standard_normal((1, t, nqk + hv * dv))
    mixed[:, rng.random(t) < 0.5, :nqk] *= 10.0 ** e
    if big_state:
        mixed[:, 0:40, nqk:] *= 1e30
    mixed = mixed.astype(BF16)
    weight = (rng.standard_normal((nqk + hv * dv, kw)) * 0.5).astype(BF16)
    g = (-rng.uniform(0.0, 0.5, (1, t, hv))).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (1, t, hv)).astype(np.float32)
    y, _ = ref.causal_conv1d(_f32(mixed).astype(np.float64).transpose(0, 2, 1), _f32(weight).astype(np.float64))
    y = y.transpose(0, 2, 1)
    q = y[..., :hk * dk].reshape(1, t, hk, dk)
    k = y[..., hk * dk:nqk].reshape(1, t, hk, dk)
    v = y[..., nqk:].reshape(1, t, hv, dv)
    want, want_s = ref.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert np.isfinite(want).all() and np.isfinite(want_s).all()
    got, got_s, _ = gated_delta_rule_fused(mixed, weight, g, beta, hk, dk, chunk_size=64, lnc=lnc)
    assert_close("o", want, _f32(got), dtype="bfloat16")
    assert_close("final_state", want_s, got_s, dtype="bfloat16")


@settings(max_examples=8)
@given(name=st.sampled_from(_NAMES), bad=_BAD, seq=st.integers(0, 1), lnc=st.sampled_from([1, 2]),
       seed=st.integers(0, 2 ** 16))
def test_prefill_nonfinite_sequence_stays_in_its_sequence(name, bad, seq, lnc, seed):
    """Any non-finite input in sequence b changes nothing in the other sequence."""
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 2, 40, 1, 2, 16, 16))
    clean_o, clean_s = gated_delta_rule(**x, use_qk_l2norm_in_kernel=True, lnc=lnc)
    x[name] = x[name].copy()
    x[name][seq, 7] = bad
    o, s = gated_delta_rule(**x, use_qk_l2norm_in_kernel=True, lnc=lnc)
    other = 1 - seq
    _same(o[other], clean_o[other])
    _same(s[other], clean_s[other])
    _same(o[seq, :7], clean_o[seq, :7])


# ------------------------------------------------------------------------------------------- decode step

@settings(max_examples=8)
@given(name=st.sampled_from(_NAMES), bad=_BAD, row=st.integers(0, 2), dtype=st.sampled_from(["float32", "bfloat16"]),
       lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_step_nonfinite_sequence_stays_in_its_sequence(name, bad, row, dtype, lnc, seed):
    """A non-finite input in one sequence of the batch: the other sequences' outputs and state rows, and the
    rows of the pool no sequence uses, are bit-identical to the clean launch."""
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 3, 2, 2, 4, 32, 16, DTYPES[dtype]))
    pool0 = rng.standard_normal((6, 4, 32, 16)).astype(np.float32)
    slots = np.array([5, 1, 3])
    clean_pool = pool0.copy()
    clean_o = gated_delta_rule_step(**x, state_pool=clean_pool, slot_ids=slots, use_qk_l2norm_in_kernel=True,
                                    lnc=lnc)
    x[name] = x[name].copy()
    x[name][row, 1] = bad
    pool = pool0.copy()
    o = gated_delta_rule_step(**x, state_pool=pool, slot_ids=slots, use_qk_l2norm_in_kernel=True, lnc=lnc)
    others = [r for r in range(3) if r != row]
    _same(o[others], clean_o[others])
    untouched = [r for r in range(6) if r != slots[row]]
    _same(pool[untouched], clean_pool[untouched])


@settings(max_examples=8)
@given(name=st.sampled_from(_NAMES), bad=_BAD, n_tok=st.integers(2, 4), dtype=st.sampled_from(["float32", "bfloat16"]),
       lnc=st.sampled_from([1, 2]), l2norm=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_step_nonfinite_token_reaches_no_earlier_token(name, bad, n_tok, dtype, lnc, l2norm, seed):
    """Several new tokens per sequence (speculative decoding): a non-finite input at the last token leaves every
    earlier token's output bit-identical to the clean launch, and equal to the float64 reference."""
    rng = np.random.default_rng(seed)
    x = _args(*gdn_inputs(rng, 2, n_tok, 2, 4, 32, 16, DTYPES[dtype]))
    pool0 = rng.standard_normal((2, 4, 32, 16)).astype(np.float32)
    clean_o = gated_delta_rule_step(**x, state_pool=pool0.copy(), use_qk_l2norm_in_kernel=l2norm, lnc=lnc)
    x[name] = x[name].copy()
    x[name][1, n_tok - 1] = bad
    o = gated_delta_rule_step(**x, state_pool=pool0.copy(), use_qk_l2norm_in_kernel=l2norm, lnc=lnc)
    _same(o[:, :n_tok - 1], clean_o[:, :n_tok - 1])
    want, _ = ref.gated_delta_rule_step(**{k: _f32(a) for k, a in x.items()}, state_pool=pool0.copy(),
                                        use_qk_l2norm_in_kernel=l2norm)
    assert_close("o before the bad token", want[:, :n_tok - 1], o[:, :n_tok - 1], dtype=dtype)


def test_step_g_minus_inf_is_exact_decay_to_zero(rng):
    x = _args(*gdn_inputs(rng, 2, 1, 1, 2, 16, 16))
    x["g"][0, 0, 1] = -np.inf
    x["beta"][0, 0, 1] = 0.0
    pool = np.ones((2, 2, 16, 16), np.float32)
    o = gated_delta_rule_step(**x, state_pool=pool, slot_ids=np.array([0, 1]))
    assert np.all(pool[0, 1] == 0) and np.isfinite(_f32(o)).all()


# ------------------------------------------------------------------------------------------- convs

@settings(max_examples=8)
@given(bad=_BAD, lens=st.lists(st.integers(1, 12), min_size=2, max_size=2), dtype=st.sampled_from(
    ["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), pos=st.data(), seed=st.integers(0, 2 ** 16))
def test_conv_nonfinite_padding_and_sequences_contained(bad, lens, dtype, lnc, pos, seed):
    """causal_conv1d: non-finite x at pad positions leaves the valid outputs and the new states bit-identical;
    a non-finite x in sequence 0 changes nothing in sequence 1."""
    rng = np.random.default_rng(seed)
    t = max(lens) + 3
    dt = DTYPES[dtype]
    x = rng.standard_normal((2, 160, t)).astype(dt)
    w = (rng.standard_normal((160, 4)) * 0.5).astype(dt)
    s0 = rng.standard_normal((2, 160, 4)).astype(dt)
    kw = dict(conv_state=s0, valid_lengths=np.array(lens), lnc=lnc)
    clean_y, clean_s = causal_conv1d(x, w, **kw)
    xb = x.copy()
    for b, n in enumerate(lens):
        xb[b, pos.draw(st.integers(0, 159)), pos.draw(st.integers(n, t - 1))] = bad
    y, s = causal_conv1d(xb, w, **kw)
    for b, n in enumerate(lens):
        _same(y[b, :, :n], clean_y[b, :, :n])
    _same(s, clean_s)
    xb = x.copy()
    xb[0, 3, 1] = bad
    y, s = causal_conv1d(xb, w, **kw)
    _same(y[1], clean_y[1])
    _same(s[1], clean_s[1])


@pytest.mark.parametrize("lnc", [1, 2])
def test_conv_update_nonfinite_sequence_contained(lnc, rng):
    x = rng.standard_normal((3, 300, 1)).astype(BF16)
    w = rng.standard_normal((300, 4)).astype(BF16)
    st0 = rng.standard_normal((3, 300, 4)).astype(BF16)
    clean_state = st0.copy()
    clean_y = causal_conv1d_update(x, clean_state, w, lnc=lnc)
    xb = x.copy()
    xb[1, 17, 0] = np.nan
    state = st0.copy()
    y = causal_conv1d_update(xb, state, w, lnc=lnc)
    _same(y[[0, 2]], clean_y[[0, 2]])
    _same(state[[0, 2]], clean_state[[0, 2]])
    _same(y[1, [c for c in range(300) if c != 17]], clean_y[1, [c for c in range(300) if c != 17]])


# ------------------------------------------------------------------------------------------- inputs untouched

def test_inputs_are_not_modified(rng):
    """Prefill, conv: every input bit-identical after the call (the step's state_pool and the conv update's
    conv_state are the documented in-place arguments; their other inputs are untouched too)."""
    x = _args(*gdn_inputs(rng, 2, 70, 1, 2, 16, 16, BF16))
    s0 = rng.standard_normal((2, 2, 16, 16)).astype(np.float32)
    before = {n: a.copy() for n, a in x.items()}
    s0_before = s0.copy()
    gated_delta_rule(**x, initial_state=s0, valid_lengths=np.array([70, 9]), use_qk_l2norm_in_kernel=True)
    for n in x:
        _same(x[n], before[n])
    _same(s0, s0_before)
    step_x = {n: a[:, :1].copy() for n, a in x.items()}
    step_before = {n: a.copy() for n, a in step_x.items()}
    gated_delta_rule_step(**step_x, state_pool=np.zeros((2, 2, 16, 16), np.float32), slot_ids=np.array([1, 0]))
    for n in step_x:
        _same(step_x[n], step_before[n])
    cx = rng.standard_normal((2, 64, 5)).astype(np.float32)
    cw = rng.standard_normal((64, 4)).astype(np.float32)
    cs = rng.standard_normal((2, 64, 4)).astype(np.float32)
    copies = (cx.copy(), cw.copy(), cs.copy())
    causal_conv1d(cx, cw, conv_state=cs, valid_lengths=np.array([5, 2]))
    causal_conv1d_update(cx[:, :, :1].copy(), cs.copy(), cw)
    for a, b in zip((cx, cw, cs), copies):
        _same(a, b)


# ------------------------------------------------------------------------------------------- bad arguments

def _small(rng, b=1, t=4):
    return _args(*gdn_inputs(rng, b, t, 1, 2, 16, 16))


@pytest.mark.parametrize("call", [
    lambda x: gated_delta_rule(**x, initial_sate=None),
    lambda x: gated_delta_rule(**x, chunk_sise=64),
    lambda x: gated_delta_rule_step(**{n: a[:, :1] for n, a in x.items()}, state_pool=np.zeros((1, 2, 16, 16),
                                    np.float32), slot_ids=np.array([0]), use_l2norm=True),
    lambda x: causal_conv1d(np.zeros((1, 8, 4), np.float32), np.zeros((8, 4), np.float32), initial_state=None),
    lambda x: causal_conv1d_update(np.zeros((1, 8, 1), np.float32), np.zeros((1, 8, 4), np.float32),
                                   np.zeros((8, 4), np.float32), seq_idx=None),
])
def test_unknown_keywords_raise_type_error(call, rng):
    with pytest.raises(TypeError):
        call(_small(rng))


@pytest.mark.parametrize("lengths", [[7.9], [8.0], np.array([3.5]), [True]])
def test_non_integral_lengths_refused(lengths, rng):
    x = _small(rng, 1, 8)
    with pytest.raises(KernelInputError, match="valid_lengths must be integers"):
        gated_delta_rule(**x, valid_lengths=lengths)
    with pytest.raises(KernelInputError, match="valid_lengths must be integers"):
        causal_conv1d(np.zeros((1, 8, 8), np.float32), np.zeros((8, 4), np.float32), valid_lengths=lengths)


def test_integer_lengths_accepted_as_list_and_torch(rng):
    import torch
    x = _small(rng, 2, 8)
    o1, s1 = gated_delta_rule(**x, valid_lengths=[8, 3])
    o2, s2 = gated_delta_rule(**x, valid_lengths=torch.tensor([8, 3]))
    _same(o1, o2)
    _same(s1, s2)


@pytest.mark.parametrize("b, t", [(0, 4), (1, 0), (0, 0)])
def test_empty_batches_are_clear_errors(b, t):
    x = _args(*gdn_inputs(np.random.default_rng(0), b, t, 1, 2, 16, 16))
    with pytest.raises(KernelInputError, match="must not be empty"):
        gated_delta_rule(**x)
    with pytest.raises(KernelInputError, match="must not be empty"):
        gated_delta_rule_step(**x, state_pool=np.zeros((2, 2, 16, 16), np.float32), slot_ids=np.zeros(b, np.int32))
    with pytest.raises(KernelInputError, match="must not be empty|T must be in"):
        causal_conv1d(np.zeros((b, 8, t), np.float32), np.zeros((8, 4), np.float32))


@pytest.mark.parametrize("name", _NAMES)
def test_float64_refused_with_the_accepted_dtypes(name, rng):
    """NumPy's default float64 is refused (never cast silently), naming the accepted dtypes."""
    x = _small(rng)
    x[name] = x[name].astype(np.float64)
    with pytest.raises(KernelInputError, match="float32"):
        gated_delta_rule(**x)
    with pytest.raises(KernelInputError, match="float32"):
        gated_delta_rule_step(**{n: a[:, :1] for n, a in x.items()}, state_pool=np.zeros((1, 2, 16, 16),
                              np.float32), slot_ids=np.array([0]))


def test_float64_state_and_conv_refused(rng):
    x = _small(rng)
    with pytest.raises(KernelInputError, match="initial_state must be float32"):
        gated_delta_rule(**x, initial_state=np.zeros((1, 2, 16, 16)))
    with pytest.raises(KernelInputError, match="x dtype must be one of"):
        causal_conv1d(np.zeros((1, 8, 4)), np.zeros((8, 4), np.float32))


@pytest.mark.parametrize("bad", [[[1.0]], 3.0, None])
def test_non_arrays_refused(bad, rng):
    x = _small(rng)
    x["q"] = bad
    with pytest.raises(KernelInputError, match="q must be a NumPy array or a torch CPU tensor"):
        gated_delta_rule(**x)
    with pytest.raises(KernelInputError, match="x must be a NumPy array"):
        causal_conv1d(bad, np.zeros((8, 4), np.float32))


def test_torch_and_numpy_mixes_are_named(rng):
    """One call's float arrays are all NumPy or all torch (validation.check_same_kind, the attention wrappers'
    rule): gated_delta_rule_step took NumPy q beside torch k / state_pool (round 36 audit) and returned torch. The
    unmixed torch call still matches the reference and updates state_pool in place."""
    torch = pytest.importorskip("torch")
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 1, 2, 16, 16)
    pool = (rng.standard_normal((3, 2, 16, 16)) * 0.1).astype(np.float32)
    slots = np.array([2, 0])
    t = {n: torch.from_numpy(a.copy()) for n, a in dict(q=q, k=k, v=v, g=g, beta=beta, state_pool=pool).items()}
    with pytest.raises(KernelInputError, match=r"gated_delta_rule_step: q, k, v, g, beta, state_pool must be all "
                                               r"NumPy arrays or all torch tensors, got q a NumPy array, k a torch"):
        gated_delta_rule_step(q, t["k"], t["v"], t["g"], t["beta"], t["state_pool"], slots)
    with pytest.raises(KernelInputError, match="state_pool a NumPy array"):
        gated_delta_rule_step(t["q"], t["k"], t["v"], t["g"], t["beta"], pool, slots)
    with pytest.raises(KernelInputError, match=r"gated_delta_rule: q, initial_state must be all NumPy arrays or "
                                               r"all torch tensors, got q a torch tensor, initial_state a NumPy"):
        gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=pool[:2])
    x = rng.standard_normal((2, 8, 5)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(KernelInputError, match="causal_conv1d: x, weight must be all NumPy arrays"):
        causal_conv1d(x, torch.from_numpy(w))
    with pytest.raises(KernelInputError, match="causal_conv1d_update: x, weight, conv_state must be all NumPy"):
        causal_conv1d_update(x, torch.zeros(2, 8, 4), w)
    want_o, want_pool = ref.gated_delta_rule_step(q, k, v, g, beta, pool, slots)
    o = gated_delta_rule_step(t["q"], t["k"], t["v"], t["g"], t["beta"], t["state_pool"], slots)
    assert isinstance(o, torch.Tensor)
    assert_close("step o", want_o, o, dtype="float32")
    assert_close("step state_pool", want_pool, t["state_pool"], dtype="float32")
