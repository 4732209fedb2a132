"""gated_delta_rule_fused (conv1d + SiLU + split + L2 norm + chunked delta rule, one launch) against the float64
references: reference.causal_conv1d on mixed_qkv^T, the split into q / k / v, then reference.gated_delta_rule
(token by token). The references share no code with the kernel."""
import numpy as np
import pytest
from _gdn_inputs import BF16, DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import causal_conv1d, gated_delta_rule
from nki_kernels.deltanet import reference as ref
from nki_kernels.deltanet.fused import gated_delta_rule_fused
from nki_kernels.emulator import runtime
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


def _inputs(rng, b, t, hk, hv, dk, dv, kw=4, dtype=np.float32, conv_state=True, init=True):
    cd = 2 * hk * dk + hv * dv
    return dict(
        mixed_qkv=rng.standard_normal((b, t, cd)).astype(dtype),
        conv_weight=(rng.standard_normal((cd, kw)) * 0.5).astype(dtype),
        g=(-rng.uniform(0.0, 0.5, (b, t, hv))).astype(np.float32),
        beta=rng.uniform(0.0, 1.0, (b, t, hv)).astype(np.float32),
        conv_state=rng.standard_normal((b, cd, kw)).astype(dtype) if conv_state else None,
        initial_state=(rng.standard_normal((b, hv, dk, dv)) * 0.1).astype(np.float32) if init else None)


def _reference(x, hk, dk, hv):
    """float64: y = silu(conv(mixed_qkv^T)) [B, CH, T], split [q | k | v], delta rule with the L2 norm."""
    b, t, _ = x["mixed_qkv"].shape
    y, new_state = ref.causal_conv1d(np.asarray(x["mixed_qkv"]).transpose(0, 2, 1), x["conv_weight"],
                                     conv_state=x["conv_state"])
    y = y.transpose(0, 2, 1)
    nq = hk * dk
    q = y[..., :nq].reshape(b, t, hk, dk)
    k = y[..., nq:2 * nq].reshape(b, t, hk, dk)
    v = y[..., 2 * nq:].reshape(b, t, hv, -1)
    o, final = ref.gated_delta_rule(q, k, v, x["g"], x["beta"], initial_state=x["initial_state"],
                                    use_qk_l2norm_in_kernel=True)
    return o, final, new_state


def _run(x, hk, dk, **kw):
    return gated_delta_rule_fused(x["mixed_qkv"], x["conv_weight"], x["g"], x["beta"], hk, dk,
                                  conv_state=x["conv_state"], initial_state=x["initial_state"], **kw)


@settings(max_examples=12)
@given(b=st.integers(1, 2), t=st.integers(1, 150), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2]),
       dk=st.sampled_from([16, 32, 48]), dv=st.sampled_from([16, 32]), kw=st.sampled_from([2, 4]),
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), chunk=st.sampled_from([64, 128]),
       conv_state=st.booleans(), init=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_conv_and_deltanet_references(b, t, hk, ratio, dk, dv, kw, dtype, lnc, chunk, conv_state, init, seed):
    """Odd head counts (Hv = 1, 3: GVA groups straddling the LNC=2 split), channel tiles not multiples of 128, T
    across chunk boundaries and shorter than K."""
    rng = np.random.default_rng(seed)
    hv = hk * ratio
    x = _inputs(rng, b, t, hk, hv, dk, dv, kw, DTYPES[dtype], conv_state, init)
    with runtime.record_launches() as rec:
        o, final, new_conv = _run(x, hk, dk, chunk_size=chunk, lnc=lnc)
    assert [r.lnc for r in rec] == [lnc]                      # one launch
    ro, rfinal, rconv = _reference(x, hk, dk, hv)
    assert o.shape == (b, t, hv, dv) and o.dtype == x["mixed_qkv"].dtype
    assert new_conv.shape == (b, 2 * hk * dk + hv * dv, kw) and new_conv.dtype == x["mixed_qkv"].dtype
    assert_close("o", ro, o, dtype=dtype)
    assert_close("final_state", rfinal, final, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(new_conv, np.float64), rconv)     # a copy of inputs: exact


@settings(max_examples=4)
@given(t=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_bf16_compute_matches_reference(t, seed):
    rng = np.random.default_rng(seed)
    x = _inputs(rng, 1, t, 2, 4, 64, 64, dtype=BF16)
    o, final, _ = _run(x, 2, 64, chunk_size=128, compute_dtype="bfloat16", lnc=2)
    ro, rfinal, _ = _reference(x, 2, 64, 4)
    assert_close("o", ro, o, dtype="bfloat16")
    assert_close("final_state", rfinal, final, dtype="bfloat16")


def test_qwen35_tp4_rank_matches_unfused_pair(rng):
    """The real width (Qwen3.5 TP4 rank: Hk=4, Hv=8, Dk=Dv=128, conv_dim 2048, K=4), bf16, LNC=2, three chunks of
    128 (the last partial), a conv state and an initial state: against the float64 reference, and as accurate as
    the unfused causal_conv1d + gated_delta_rule pair (which rounds the conv output to bf16 in HBM)."""
    hk, hv, d, t = 4, 8, 128, 300
    x = _inputs(rng, 1, t, hk, hv, d, d, dtype=BF16)
    o, final, new_conv = _run(x, hk, d, chunk_size=128, lnc=2)
    ro, rfinal, rconv = _reference(x, hk, d, hv)
    assert_close("o", ro, o, dtype="bfloat16")
    assert_close("final_state", rfinal, final, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(new_conv, np.float64), rconv)
    y, _ = causal_conv1d(np.ascontiguousarray(x["mixed_qkv"].transpose(0, 2, 1)), x["conv_weight"],
                         conv_state=x["conv_state"], lnc=2)
    y = np.asarray(y).transpose(0, 2, 1)
    q, k, v = (np.ascontiguousarray(y[..., lo:hi].reshape(1, t, -1, d)) for lo, hi in ((0, 512), (512, 1024),
                                                                                      (1024, 2048)))
    po, pfinal = gated_delta_rule(q, k, v, x["g"], x["beta"], chunk_size=128, initial_state=x["initial_state"],
                                  use_qk_l2norm_in_kernel=True, lnc=2)

    def rms(a, r):
        return float(np.sqrt(np.mean((np.asarray(a, np.float64) - r) ** 2)))
    assert rms(o, ro) <= 1.05 * rms(po, ro)
    assert rms(final, rfinal) <= 1.05 * rms(pfinal, rfinal)


@pytest.mark.parametrize("dtype,compute", [("bfloat16", "bfloat16"), ("bfloat16", None), ("float32", None)])
def test_largest_accepted_shapes_fit_on_chip(dtype, compute):
    """The limits: ceil(Hv / lnc) * chunk_size = 1024 at Dk = Dv = 128 and the widest front end the wrapper
    accepts (one q/k head per v head: 3 x 8 heads x 128 channels per core at LNC=1) run on the emulator,
    whose allocator fails a launch that overflows SBUF or PSUM; one more head is refused."""
    rng = np.random.default_rng(0)
    hv = 8
    x = _inputs(rng, 1, 130, hv, hv, 128, 128, dtype=DTYPES[dtype])
    o, final, _ = _run(x, hv, 128, chunk_size=128, compute_dtype=compute, lnc=1)
    ro, rfinal, _ = _reference(x, hv, 128, hv)
    assert_close("o", ro, o, dtype=dtype)
    x = _inputs(rng, 1, 4, hv + 1, hv + 1, 128, 128, dtype=DTYPES[dtype])
    with pytest.raises(KernelInputError, match="ceil\\(Hv / lnc\\) \\* chunk_size must be <= 1024"):
        _run(x, hv + 1, 128, chunk_size=128, compute_dtype=compute, lnc=1)


def test_nan_stays_in_its_sequence_and_after_its_token(rng):
    """A NaN in mixed_qkv[b, t] (a q, k or v channel): the other sequence is bit-identical to the clean launch, and
    so are sequence b's tokens before t; tokens t.. are allowed to differ (as in the unfused pair, whose conv mixes
    the channels of a 128-channel tile at one time step)."""
    hk, hv, d, t, bad_t = 2, 4, 32, 150, 70
    x = _inputs(rng, 2, t, hk, hv, d, d, dtype=np.float32)
    clean = _run(x, hk, d, chunk_size=64, lnc=2)
    for ch in (3, hk * d + 5, 2 * hk * d + 7):
        xb = dict(x, mixed_qkv=x["mixed_qkv"].copy())
        xb["mixed_qkv"][1, bad_t, ch] = np.nan
        o, final, conv = _run(xb, hk, d, chunk_size=64, lnc=2)
        np.testing.assert_array_equal(o[0], clean[0][0])
        np.testing.assert_array_equal(final[0], clean[1][0])
        np.testing.assert_array_equal(conv[0], clean[2][0])
        np.testing.assert_array_equal(o[1, :bad_t], clean[0][1, :bad_t])
        assert not np.all(np.isfinite(o[1, bad_t:]))


def test_inputs_are_not_modified(rng):
    x = _inputs(rng, 2, 20, 1, 2, 16, 16)
    before = {k: (None if v is None else v.copy()) for k, v in x.items()}
    _run(x, 1, 16, lnc=2)
    for key, v in x.items():
        if v is not None:
            np.testing.assert_array_equal(v, before[key])


def test_torch_tensors_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    x = _inputs(rng, 1, 9, 1, 2, 16, 16, dtype=BF16, conv_state=False, init=False)
    tx = {k: (None if v is None else torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
              if v.dtype == BF16 else torch.from_numpy(v)) for k, v in x.items()}
    o, final, conv = _run(tx, 1, 16)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and isinstance(conv, torch.Tensor)
    ro, _, rconv = _reference(x, 1, 16, 2)
    assert_close("o", ro, o.float().numpy(), dtype="bfloat16")


@pytest.mark.parametrize("change,match", [
    (dict(valid_lengths=[3]), "valid_lengths is not supported"),
    (dict(cu_seqlens=[0, 9]), "cu_seqlens is not supported"),
    (dict(chunk_size=32), "chunk_size must be one of"),
    (dict(compute_dtype="float16"), "compute_dtype must be one of"),
    (dict(num_k_heads=3), "Hv \\(g.shape\\[2\\]\\) must be a multiple of num_k_heads"),
    (dict(head_k_dim=32), "conv_dim - 2 num_k_heads head_k_dim must be a positive multiple of Hv"),
    (dict(head_k_dim=200), "head_k_dim must be in \\[1, 128\\]"),
    (dict(conv_state="f32"), "conv_state dtype must equal mixed_qkv's bfloat16"),
    (dict(conv_state="shape"), "conv_state must be \\[B, conv_dim, K\\]"),
    (dict(conv_weight="rows"), "conv_weight must be \\[conv_dim=64, K\\]"),
    (dict(mixed_qkv="f64"), "mixed_qkv dtype must be one of"),
    (dict(beta="shape"), "beta must be \\[B, T, Hv\\]"),
    # scalars: checked types (they went through int() / bool() / float() before)
    (dict(num_k_heads=1.5), "num_k_heads must be an integer"),
    (dict(num_k_heads="1"), "num_k_heads must be an integer"),
    (dict(head_k_dim=16.9), "head_k_dim must be an integer"),
    (dict(chunk_size=64.0), "chunk_size must be an integer"),
    (dict(use_qk_l2norm_in_kernel="False"), "use_qk_l2norm_in_kernel must be True or False"),
    (dict(output_final_state="no"), "output_final_state must be True or False"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=-1.0), "scale must be > 0"),
])
def test_bad_inputs_refused(rng, change, match):
    x = _inputs(rng, 1, 9, 1, 2, 16, 16, dtype=BF16)
    args = dict(num_k_heads=1, head_k_dim=16)
    for key, val in change.items():
        if val == "f32":
            x[key] = x[key].astype(np.float32)
        elif val == "f64":
            x[key] = x[key].astype(np.float64)
        elif val == "shape":
            x[key] = x[key][..., :-1]
        elif val == "rows":
            x[key] = x[key][:-1]
        else:
            args[key] = val
    with pytest.raises(KernelInputError, match=match):
        gated_delta_rule_fused(x["mixed_qkv"], x["conv_weight"], x["g"], x["beta"], conv_state=x["conv_state"],
                               initial_state=x["initial_state"], **args)


def test_traced_once_instruction_sequence_does_not_depend_on_values():
    """As tests/test_value_independence.py for the public names: random inputs vs adversarial ones (zeros, 1e4, a
    NaN, a state of huge values) of the same shapes give the same launches and instructions."""
    from nki_kernels.emulator import record_launches
    from nki_kernels.testing import program_signature

    def sig(adversarial):
        x = _inputs(np.random.default_rng(7), 2, 70, 2, 4, 32, 32, dtype=BF16)
        if adversarial:
            for key in ("mixed_qkv", "conv_state", "g", "beta", "initial_state"):
                flat = x[key].reshape(-1)
                flat[::3] = 0
                flat[1::3] = 1e4
                flat[-1] = np.nan
        with np.errstate(all="ignore"), record_launches() as runs:
            _run(x, 2, 32, chunk_size=64, lnc=2)
        return program_signature(runs)
    assert sig(False) == sig(True)


def test_fused_raw_key_below_old_prescale_threshold_meets_huge_state():
    """Fused path, conv outputs of norm ~2^9 .. 2^11 (below the former 2^12 pre-scale threshold) meeting a state of
    1e35: finite and close to the float64 reference (the raw bf16 products overflowed before)."""
    hk, hv, dk, dv, kw, t = 1, 2, 128, 32, 4, 64
    nqk = 2 * hk * dk
    rng = np.random.default_rng(0)
    mixed = rng.standard_normal((1, t, nqk + hv * dv))
    mixed[..., :nqk] = np.abs(mixed[..., :nqk]) * 100.0
    mixed = mixed.astype(BF16)
    weight = np.abs(rng.standard_normal((nqk + hv * dv, kw)) * 0.5).astype(BF16)
    g = (-rng.uniform(0, 0.5, (1, t, hv))).astype(np.float32)
    beta = rng.uniform(0, 1, (1, t, hv)).astype(np.float32)
    s0 = np.full((1, hv, dk, dv), 1e35, np.float32)
    y, _ = ref.causal_conv1d(np.asarray(mixed, np.float64).transpose(0, 2, 1), np.asarray(weight, np.float64))
    y = y.transpose(0, 2, 1)
    q = y[..., :hk * dk].reshape(1, t, hk, dk)
    k = y[..., hk * dk:nqk].reshape(1, t, hk, dk)
    v = y[..., nqk:].reshape(1, t, hv, dv)
    assert np.log2(np.linalg.norm(k, axis=-1)).max() < 12
    ro, rs = ref.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, initial_state=s0)
    assert np.isfinite(ro).all() and np.isfinite(rs).all()
    o, s, _ = gated_delta_rule_fused(mixed, weight, g, beta, hk, dk, chunk_size=64, lnc=1, initial_state=s0)
    assert_close("o fused big key", ro, o, dtype="bfloat16")
    assert_close("state fused big key", rs, s, dtype="bfloat16")   # q, k: the conv output rounded to bf16


@pytest.mark.parametrize("compute, hv, limit", [(None, 7, 896), ("bfloat16", 8, 1024)])
def test_trn1_largest_accepted_shapes_fit_on_chip(compute, hv, limit):
    """trn1 (180224 B of SBUF per partition, LNC=1 only): bf16 inputs, Hk = Hv, Dk = Dv = 128, C = 128, K = 4 at
    the largest accepted ceil(Hv / lnc) * C there run on the emulator (which fails a launch that overflows SBUF) and
    match the reference; one more head is refused naming trn1 and the limit. With fp32 compute trn2's 1024 (Hv = 8)
    overflowed trn1 (180092 + 4096 B)."""
    from nki_kernels.emulator.targets import use_target
    rng = np.random.default_rng(1)
    x = _inputs(rng, 1, 130, hv, hv, 128, 128, dtype=BF16)
    with use_target("trn1"):
        o, final, _ = _run(x, hv, 128, chunk_size=128, compute_dtype=compute)
    ro, rfinal, _ = _reference(x, hv, 128, hv)
    assert_close("o trn1", ro, o, dtype="bfloat16")
    assert_close("state trn1", rfinal, final, dtype="bfloat16")
    what = "bf16" if compute else "fp32"
    x = _inputs(rng, 1, 4, hv + 1, hv + 1, 128, 128, dtype=BF16)
    with use_target("trn1"), pytest.raises(
            KernelInputError, match=rf"ceil\(Hv / lnc\) \* chunk_size must be <= {limit} with {what} compute on trn1"):
        _run(x, hv + 1, 128, chunk_size=128, compute_dtype=compute)
