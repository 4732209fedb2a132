"""Packed sequences (issue 20 item 2): gated_delta_rule(..., cu_seqlens=...) with B = 1 and the N sequences end
to end along T equals each sequence run alone (the float64 reference, and the kernel's own per-sequence launch),
initial and final states [N, Hv, Dk, Dv] included; no state leaks between sequences; bad cu_seqlens are clear
errors naming the argument. causal_conv1d(..., cu_seqlens=...) likewise, with conv states [N, C, K]."""
import numpy as np
import pytest
from _gdn_inputs import DTYPES, gdn_inputs
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from nki_kernels import causal_conv1d, gated_delta_rule
from nki_kernels.deltanet import reference as ref
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

_NAMES = ("q", "k", "v", "g", "beta")


def _pack(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _f32(x):
    return np.asarray(x, dtype=np.float32)


@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(lens=st.lists(st.sampled_from([0, 1, 2, 63, 64, 65, 100, 128, 130]) | st.integers(0, 140), min_size=1,
                     max_size=5).filter(lambda ls: sum(ls) >= 1),
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), with_init=st.booleans(),
       l2norm=st.booleans(), chunk=st.sampled_from([64, 128]), seed=st.integers(0, 2 ** 16))
def test_packed_equals_each_sequence_alone(lens, dtype, lnc, with_init, l2norm, chunk, seed):
    """Outputs and final states of the packed launch: close to the float64 reference of each sequence alone and
    bit-identical to the kernel run on that sequence alone (same chunk alignment: each sequence's chunks start at
    its first token); a length-0 sequence returns its initial state (or zeros)."""
    rng = np.random.default_rng(seed)
    cu = _pack(lens)
    n, t = len(lens), int(cu[-1])
    hk, hv, d = 2, 4, 16
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, t, hk, hv, d, d, DTYPES[dtype])))
    s0 = rng.standard_normal((n, hv, d, d)).astype(np.float32) if with_init else None
    kw = dict(chunk_size=chunk, use_qk_l2norm_in_kernel=l2norm)
    o, s = gated_delta_rule(**x, **kw, initial_state=s0, cu_seqlens=cu, lnc=lnc)
    assert o.shape == (1, t, hv, d) and s.shape == (n, hv, d, d)
    st_dt = "float32" if dtype == "float32" else "bfloat16"
    for i in range(n):
        a, b = int(cu[i]), int(cu[i + 1])
        init = None if s0 is None else s0[i:i + 1]
        if b == a:
            np.testing.assert_array_equal(s[i], np.zeros((hv, d, d), np.float32) if s0 is None else s0[i])
            continue
        part = {nm: arr[:, a:b] for nm, arr in x.items()}
        ro, rs = ref.gated_delta_rule(**part, **kw, initial_state=init)
        assert_close(f"o[seq {i}]", ro[0], o[0, a:b], dtype=dtype)
        assert_close(f"state[seq {i}]", rs[0], s[i], dtype=st_dt)
        ko, ks = gated_delta_rule(**part, **kw, initial_state=init, lnc=lnc)
        np.testing.assert_array_equal(_f32(o[0, a:b]), _f32(ko[0]), err_msg=f"o of sequence {i}")
        np.testing.assert_array_equal(s[i], ks[0], err_msg=f"state of sequence {i}")


@settings(max_examples=8, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(lens=st.lists(st.integers(0, 200), min_size=1, max_size=4).filter(lambda ls: sum(ls) >= 1),
       every=st.sampled_from([1, 2]), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_packed_checkpoints_per_sequence(lens, every, lnc, seed):
    """checkpoints [N, T // (every * C), Hv, Dk, Dv]: entry (n, i) is sequence n's state after (i + 1) * every * C
    of its own tokens (as the reference run on it alone); entries a sequence does not reach are 0."""
    rng = np.random.default_rng(seed)
    cu = _pack(lens)
    n, t, c = len(lens), int(cu[-1]), 64
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, t, 1, 2, 16, 16)))
    s0 = rng.standard_normal((n, 2, 16, 16)).astype(np.float32)
    kw = dict(chunk_size=c, use_qk_l2norm_in_kernel=True, checkpoint_every=every)
    o, s, ck = gated_delta_rule(**x, **kw, initial_state=s0, cu_seqlens=cu, lnc=lnc)
    n_ck = t // (every * c)
    assert ck.shape == (n, n_ck, 2, 16, 16)
    for i in range(n):
        a, b = int(cu[i]), int(cu[i + 1])
        want = np.zeros((n_ck, 2, 16, 16))
        if b > a:
            _, _, rck = ref.gated_delta_rule(**{nm: arr[:, a:b] for nm, arr in x.items()}, **kw,
                                             initial_state=s0[i:i + 1])
            want[:rck.shape[1]] = rck[0]
        assert_close(f"checkpoints[seq {i}]", want, ck[i], dtype="float32")
        np.testing.assert_array_equal(ck[i][np.all(want == 0, axis=(1, 2, 3))], 0)


@settings(max_examples=8, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(lens=st.lists(st.integers(0, 90), min_size=2, max_size=4).filter(lambda ls: sum(ls) >= 1),
       name=st.sampled_from(_NAMES), bad=st.sampled_from([np.nan, np.inf, -np.inf]), lnc=st.sampled_from([1, 2]),
       pos=st.data(), seed=st.integers(0, 2 ** 16))
def test_packed_nonfinite_stays_in_its_sequence(lens, name, bad, lnc, pos, seed):
    """A non-finite value in one packed sequence (sharing chunks-worth of rows with its neighbours in the packed
    layout) changes nothing in the other sequences' outputs and final states, and nothing before it in its own."""
    rng = np.random.default_rng(seed)
    cu = _pack(lens)
    t = int(cu[-1])
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, t, 1, 2, 16, 16)))
    s0 = rng.standard_normal((len(lens), 2, 16, 16)).astype(np.float32)
    kw = dict(chunk_size=64, initial_state=s0, use_qk_l2norm_in_kernel=True, cu_seqlens=cu, lnc=lnc)
    clean_o, clean_s = gated_delta_rule(**x, **kw)
    tok = pos.draw(st.integers(0, t - 1))
    seq = int(np.searchsorted(cu, tok, side="right") - 1)
    x[name] = x[name].copy()
    x[name][(0, tok) + tuple(pos.draw(st.integers(0, m - 1)) for m in x[name].shape[2:])] = bad
    o, s = gated_delta_rule(**x, **kw)
    outside = np.ones(t, bool)
    outside[tok:cu[seq + 1]] = False
    np.testing.assert_array_equal(_f32(o[0, outside]), _f32(clean_o[0, outside]))
    others = [i for i in range(len(lens)) if i != seq]
    np.testing.assert_array_equal(s[others], clean_s[others])


def test_packed_torch_inputs_and_no_state_leak(rng):
    """torch tensors in and out; the second sequence's result does not depend on the first one's state."""
    import torch
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, 70, 1, 2, 16, 16)))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    s0 = np.zeros((2, 2, 16, 16), np.float32)
    o1, s1 = gated_delta_rule(**{n: torch.from_numpy(a) for n, a in x.items()}, initial_state=torch.from_numpy(s0),
                              cu_seqlens=cu)
    s0[0] = 1e3                                       # a different state for sequence 0 only
    o2, s2 = gated_delta_rule(**x, initial_state=s0, cu_seqlens=cu.numpy())
    assert isinstance(o1, torch.Tensor)
    np.testing.assert_array_equal(o1.numpy()[0, 30:], o2[0, 30:])
    np.testing.assert_array_equal(s1.numpy()[1], s2[1])
    assert not np.allclose(o1.numpy()[0, :30], o2[0, :30])


@pytest.mark.parametrize("cu, match", [
    (np.array([0.0, 4.0]), "cu_seqlens must be integers"),
    ([0, 8.0], "cu_seqlens must be integers"),
    (np.array([1, 8], np.int32), "cu_seqlens must start at 0"),
    (np.array([0, 6, 3, 8], np.int32), r"non-decreasing, got cu_seqlens\[1\]=6 > cu_seqlens\[2\]=3"),
    (np.array([0, 3, 7], np.int32), "must end at T=8"),
    (np.array([0, 3, 9], np.int32), "must end at T=8"),
    (np.array([0], np.int32), r"cu_seqlens must be \[N\+1\]"),
    (np.array([[0, 8]], np.int32), r"cu_seqlens must be \[N\+1\]"),
])
def test_bad_cu_seqlens_refused(cu, match, rng):
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, 8, 1, 2, 16, 16)))
    with pytest.raises(KernelInputError, match=match):
        gated_delta_rule(**x, cu_seqlens=cu)


def test_packed_argument_combinations_refused(rng):
    x = dict(zip(_NAMES, gdn_inputs(rng, 2, 8, 1, 2, 16, 16)))
    cu = np.array([0, 3, 8], np.int32)
    with pytest.raises(KernelInputError, match="B must be 1, got B=2"):
        gated_delta_rule(**x, cu_seqlens=cu)
    x1 = {n: a[:1] for n, a in x.items()}
    with pytest.raises(KernelInputError, match=r"initial_state must be \[N, Hv, Dk, Dv\]=\(2, 2, 16, 16\)"):
        gated_delta_rule(**x1, cu_seqlens=cu, initial_state=np.zeros((1, 2, 16, 16), np.float32))
    with pytest.raises(KernelInputError, match="valid_lengths and cu_seqlens are exclusive"):
        gated_delta_rule(**x1, cu_seqlens=cu, valid_lengths=[8])


def test_packed_slot_limit_refused(rng):
    """N + T // chunk_size chunk slots beyond _MAX_SLOTS: refused before any launch, naming the limit."""
    x = dict(zip(_NAMES, gdn_inputs(rng, 1, 64 * 100, 1, 1, 8, 8)))
    cu = np.concatenate([np.arange(1000), [64 * 100]]).astype(np.int32)
    with pytest.raises(KernelInputError, match=r"N \+ T // chunk_size \(chunk slots\) must be <= 1024"):
        gated_delta_rule(**x, chunk_size=64, cu_seqlens=cu)


# ------------------------------------------------------------------------------------------- causal_conv1d

@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda ls: sum(ls) >= 1),
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), with_state=st.booleans(),
       n_ch=st.sampled_from([64, 200]), kw=st.sampled_from([2, 4]), seed=st.integers(0, 2 ** 16))
def test_conv_packed_equals_each_sequence_alone(lens, dtype, lnc, with_state, n_ch, kw, seed):
    """causal_conv1d with cu_seqlens: each sequence's outputs and new state [N, C, K] match the float64 reference
    run on it alone with its own conv state (sequences shorter than K take part of their state from the old one;
    length 0 keeps it), and the kernel run on it alone (bit-identical in fp32, where both use the same VectorE
    sums)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    cu = _pack(lens)
    n, t = len(lens), int(cu[-1])
    x = rng.standard_normal((1, n_ch, t)).astype(dt)
    w = (rng.standard_normal((n_ch, kw)) * 0.5).astype(dt)
    s0 = rng.standard_normal((n, n_ch, kw)).astype(dt) if with_state else None
    y, s = causal_conv1d(x, w, conv_state=s0, cu_seqlens=cu, lnc=lnc)
    assert y.shape == (1, n_ch, t) and s.shape == (n, n_ch, kw)
    for i in range(n):
        a, b = int(cu[i]), int(cu[i + 1])
        init = None if s0 is None else s0[i:i + 1]
        if b == a:
            np.testing.assert_array_equal(_f32(s[i]), np.zeros((n_ch, kw)) if s0 is None else _f32(s0[i]))
            continue
        ry, rs = ref.causal_conv1d(x[:, :, a:b], w, conv_state=init)
        assert_close(f"y[seq {i}]", ry[0], y[0, :, a:b], dtype=dtype)
        np.testing.assert_array_equal(_f32(s[i]), _f32(rs[0]), err_msg=f"state of sequence {i} (a copy of inputs)")
        if dtype == "float32":
            ky, _ = causal_conv1d(x[:, :, a:b], w, conv_state=init, lnc=lnc)
            np.testing.assert_array_equal(_f32(y[0, :, a:b]), _f32(ky[0]), err_msg=f"y of sequence {i}")


@pytest.mark.parametrize("lnc", [1, 2])
def test_conv_packed_nonfinite_stays_in_its_sequence(lnc, rng):
    """NaN / Inf inputs of one packed sequence change no output or state of the others (the taps over the packed
    row read across the boundary; those outputs are recomputed from each sequence's own history)."""
    cu = np.array([0, 7, 8, 8, 20], np.int32)
    x = rng.standard_normal((1, 160, 20)).astype(np.float32)
    w = rng.standard_normal((160, 4)).astype(np.float32)
    s0 = rng.standard_normal((4, 160, 4)).astype(np.float32)
    clean_y, clean_s = causal_conv1d(x, w, conv_state=s0, cu_seqlens=cu, lnc=lnc)
    xb = x.copy()
    xb[0, :, 5:8] = np.nan                            # the end of sequence 0 and all of sequence 1
    xb[0, 3, 6] = np.inf
    y, s = causal_conv1d(xb, w, conv_state=s0, cu_seqlens=cu, lnc=lnc)
    np.testing.assert_array_equal(y[0, :, 8:], clean_y[0, :, 8:])
    np.testing.assert_array_equal(y[0, :, :5], clean_y[0, :, :5])
    np.testing.assert_array_equal(s[2:], clean_s[2:])


def test_conv_packed_bad_arguments_refused(rng):
    x = rng.standard_normal((2, 8, 10)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    cu = np.array([0, 4, 10], np.int32)
    with pytest.raises(KernelInputError, match="B must be 1, got B=2"):
        causal_conv1d(x, w, cu_seqlens=cu)
    with pytest.raises(KernelInputError, match=r"conv_state must be \[N, C, K\]=\(2, 8, 4\)"):
        causal_conv1d(x[:1], w, conv_state=np.zeros((1, 8, 4), np.float32), cu_seqlens=cu)
    with pytest.raises(KernelInputError, match="cu_seqlens must start at 0"):
        causal_conv1d(x[:1], w, cu_seqlens=np.array([2, 10], np.int32))
    with pytest.raises(KernelInputError, match="must end at T=10"):
        causal_conv1d(x[:1], w, cu_seqlens=np.array([0, 4, 9], np.int32))
    with pytest.raises(KernelInputError, match="valid_lengths and cu_seqlens are exclusive"):
        causal_conv1d(x[:1], w, cu_seqlens=cu, valid_lengths=[10])
