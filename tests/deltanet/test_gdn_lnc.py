"""LNC=2 for the gated DeltaNet family: each kernel launches two program instances that split the heads
(prefill, decode step) or the channels (convs), and matches the float64 reference at LNC=1 and LNC=2;
with NEURON_LOGICAL_NC_CONFIG=2 and no lnc argument, the wrappers launch two instances."""
import numpy as np
import pytest
from _gdn_inputs import BF16, DTYPES, gdn_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import causal_conv1d, causal_conv1d_update, gated_delta_rule, gated_delta_rule_step
from nki_kernels.deltanet import reference as ref
from nki_kernels.emulator import runtime
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


def _launch_lncs(fn, *args, **kwargs):
    """(result, [lnc of every launch]) of fn(*args, **kwargs)."""
    with runtime.record_launches() as rec:
        out = fn(*args, **kwargs)
    return out, [r.lnc for r in rec]


@settings(max_examples=8)
@given(b=st.integers(1, 2), t=st.integers(1, 140), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2]),
       dk=st.sampled_from([16, 32]), dv=st.sampled_from([16, 32]), dtype=st.sampled_from(["float32", "bfloat16"]),
       lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_prefill_matches_reference_at_both_lnc(b, t, hk, ratio, dk, dv, dtype, lnc, seed):
    """Odd head counts included (Hv = 1, 3: the second core owns fewer heads, or none)."""
    rng = np.random.default_rng(seed)
    hv = hk * ratio
    q, k, v, g, beta = gdn_inputs(rng, b, t, hk, hv, dk, dv, DTYPES[dtype])
    s0 = rng.standard_normal((b, hv, dk, dv)).astype(np.float32)
    (o, s), lncs = _launch_lncs(gated_delta_rule, q, k, v, g, beta, initial_state=s0,
                                use_qk_l2norm_in_kernel=True, lnc=lnc)
    assert lncs == [lnc]
    ro, rs = ref.gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm_in_kernel=True)
    assert_close("o", ro, o, dtype=dtype)
    assert_close("final_state", rs, s, dtype="float32" if dtype == "float32" else "bfloat16")


def test_prefill_lnc2_checkpoints_and_qwen_widths(rng):
    """A TP4 rank of Qwen3-Next (Hk=4, Hv=8, Dk=Dv=128), bf16, with checkpoints: LNC=2 equals LNC=1 bit for bit
    (each core computes its heads exactly as the single core does)."""
    q, k, v, g, beta = gdn_inputs(rng, 1, 256, 4, 8, 128, 128, BF16)
    o1, s1, c1 = gated_delta_rule(q, k, v, g, beta, chunk_size=64, use_qk_l2norm_in_kernel=True,
                                  checkpoint_every=2, lnc=1)
    (o2, s2, c2), lncs = _launch_lncs(gated_delta_rule, q, k, v, g, beta, chunk_size=64,
                                      use_qk_l2norm_in_kernel=True, checkpoint_every=2, lnc=2)
    assert lncs == [2]
    np.testing.assert_array_equal(np.asarray(o1, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(c1, c2)
    ro, rs, rc = ref.gated_delta_rule(q, k, v, g, beta, chunk_size=64, use_qk_l2norm_in_kernel=True,
                                      checkpoint_every=2)
    assert_close("o", ro, o2, dtype="bfloat16")
    assert_close("ckpt", rc, c2, dtype="bfloat16")


@pytest.mark.parametrize("hv, hk, dtype", [(1, 1, "float32"), (3, 1, "bfloat16"), (6, 3, "float32"),
                                           (8, 4, "bfloat16")])
@pytest.mark.parametrize("lnc", [1, 2])
def test_step_matches_reference_at_both_lnc(hv, hk, dtype, lnc, rng):
    q, k, v, g, beta = gdn_inputs(rng, 3, 2, hk, hv, 32, 16, DTYPES[dtype])
    pool = rng.standard_normal((5, hv, 32, 16)).astype(np.float32)
    slots = np.array([4, 0, 2])
    before = pool.copy()
    o, lncs = _launch_lncs(gated_delta_rule_step, q, k, v, g, beta, pool, slots, use_qk_l2norm_in_kernel=True,
                           lnc=lnc)
    assert lncs == [lnc]
    ro, rpool = ref.gated_delta_rule_step(q, k, v, g, beta, before, slots, use_qk_l2norm_in_kernel=True)
    assert_close("o", ro, o, dtype=dtype)
    assert_close("pool", rpool, pool, dtype=dtype)


@pytest.mark.parametrize("n_ch, dtype", [(1, "float32"), (77, "bfloat16"), (300, "float32"), (2048, "bfloat16")])
@pytest.mark.parametrize("lnc", [1, 2])
def test_convs_match_reference_at_both_lnc(n_ch, dtype, lnc, rng):
    dt = DTYPES[dtype]
    x = rng.standard_normal((2, n_ch, 9)).astype(dt)
    w = (rng.standard_normal((n_ch, 4)) * 0.5).astype(dt)
    st0 = rng.standard_normal((2, n_ch, 4)).astype(dt)
    lens = np.array([9, 5])
    (y, s), lncs = _launch_lncs(causal_conv1d, x, w, conv_state=st0, valid_lengths=lens, lnc=lnc)
    assert lncs == [lnc]
    ry, rs = ref.causal_conv1d(x, w, conv_state=st0, valid_lengths=lens)
    assert_close("y", ry, y, dtype=dtype)
    assert_close("state", rs, s, dtype=dtype)
    xu = rng.standard_normal((2, n_ch, 1)).astype(dt)
    state = st0.copy()
    yu, lncs = _launch_lncs(causal_conv1d_update, xu, state, w, lnc=lnc)
    assert lncs == [lnc]
    ryu, rsu = ref.causal_conv1d_update(xu, st0, w)
    assert_close("y update", ryu, yu, dtype=dtype)
    assert_close("state update", rsu, state, dtype=dtype)


def test_env_lnc2_is_the_default_for_all_four(rng, monkeypatch):
    """NEURON_LOGICAL_NC_CONFIG=2 and no lnc argument: two program instances, results match the references."""
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    q, k, v, g, beta = gdn_inputs(rng, 2, 70, 2, 4, 32, 32)
    (o, s), lncs = _launch_lncs(gated_delta_rule, q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert lncs == [2]
    ro, rs = ref.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert_close("o", ro, o)
    assert_close("state", rs, s)
    pool = rng.standard_normal((3, 4, 32, 32)).astype(np.float32)
    before = pool.copy()
    o, lncs = _launch_lncs(gated_delta_rule_step, q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], pool,
                           np.array([2, 0]), use_qk_l2norm_in_kernel=True)
    assert lncs == [2]
    ro, rpool = ref.gated_delta_rule_step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], before,
                                          np.array([2, 0]), use_qk_l2norm_in_kernel=True)
    assert_close("step o", ro, o)
    assert_close("step pool", rpool, pool)
    x = rng.standard_normal((2, 256, 6)).astype(np.float32)
    w = rng.standard_normal((256, 4)).astype(np.float32)
    (y, s), lncs = _launch_lncs(causal_conv1d, x, w)
    assert lncs == [2]
    assert_close("conv y", ref.causal_conv1d(x, w)[0], y)
    state = np.zeros((2, 256, 4), np.float32)
    y, lncs = _launch_lncs(causal_conv1d_update, x[:, :, :1], state, w)
    assert lncs == [2]
    ry, rs = ref.causal_conv1d_update(x[:, :, :1], np.zeros((2, 256, 4)), w)
    assert_close("conv update y", ry, y)
    assert_close("conv update state", rs, state)


def test_env_lnc1_and_explicit_lnc_win(rng, monkeypatch):
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    x = rng.standard_normal((1, 128, 4)).astype(np.float32)
    w = rng.standard_normal((128, 4)).astype(np.float32)
    _, lncs = _launch_lncs(causal_conv1d, x, w)
    assert lncs == [1]
    _, lncs = _launch_lncs(causal_conv1d, x, w, lnc=2)
    assert lncs == [2]


@pytest.mark.parametrize("fn, args", [
    (gated_delta_rule, lambda q, k, v, g, b: (q, k, v, g, b)),
    (gated_delta_rule_step, lambda q, k, v, g, b: (q, k, v, g, b, np.zeros((2, 2, 16, 16), np.float32),
                                                   np.array([0, 1]))),
])
@pytest.mark.parametrize("bad", [3, 0, "2", 1.5])
def test_bad_lnc_raises(fn, args, bad, rng):
    q, k, v, g, beta = gdn_inputs(rng, 2, 1, 1, 2, 16, 16)
    with pytest.raises(KernelInputError, match="lnc"):
        fn(*args(q, k, v, g, beta), lnc=bad)
