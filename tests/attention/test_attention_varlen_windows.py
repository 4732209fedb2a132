"""flash_attention_varlen's per-sequence window mode (max_seqlen_q and max_seqlen_k given, trace-time rule
`windows_plan`): against the per-sequence float64 reference and flash_attention run on each sequence alone,
lengths including 0 and 1, causal and not, GQA, head dims 64..256, LNC=2; traced once; adversarial
cu_seqlens never move a DMA outside its tensor; non-finite values stay in their sequence; the mode rule."""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nki_kernels.attention.varlen as varlen
from nki_kernels import flash_attention_varlen
from nki_kernels.attention.reference import flash_attention_varlen_ref
from nki_kernels.backend import call
from nki_kernels.emulator.runtime import last_run
from nki_kernels.testing import assert_close, program_signature
from varlen_kit import assert_each_sequence_alone, cu as _cu, lengths as _lengths, packed as _packed

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


def _windows(fn, *args, **kw):
    """Run with the window mode forced wherever it fits (the tile-ratio rule lifted, the tile-major body for short
    causal packs off), and check it ran."""
    with mock.patch.object(varlen, "_WINDOW_TILE_RATIO", 1e9), \
            mock.patch.object(varlen, "tile_short_varlen_path", lambda *a: False):
        out = fn(*args, **kw)
    assert any(i.meta.get("indirect") for t in last_run().traces for i in t), "window mode did not run"
    return out


@given(data=st.data(), causal=st.booleans(), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([64, 72, 80, 96, 128, 256]), dtype=st.sampled_from(["bfloat16", "float32"]),
       use_gate=st.booleans(), lnc=st.sampled_from([1, 2]), slack=st.sampled_from([0, 3, 130]),
       seed=st.integers(0, 2 ** 16))
def test_windows_match_per_sequence_reference(data, causal, hkv, group, d, dtype, use_gate, lnc, slack, seed):
    """slack: max_seqlen_* = longest sequence + slack (a loose bound is allowed, clamped to Tq / Tk)."""
    lq, lk = data.draw(_lengths(causal, 4))
    rng = np.random.default_rng(seed)
    q, k, v, g = _packed(rng, lq, lk, hkv * group, hkv, d, DTYPES[dtype], gate=use_gate)
    out = _windows(flash_attention_varlen, q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g, lnc=lnc,
                   max_seqlen_q=max(max(lq), 1) + slack, max_seqlen_k=max(max(lk), 1) + slack)
    ref = flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    assert_close(f"windows lq={lq} lk={lk}", ref, out, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_windows_equal_each_sequence_run_alone(causal):
    """Packed output == flash_attention on each sequence alone (B=1 per sequence)."""
    rng = np.random.default_rng(21)
    lq = [300, 1, 129, 0, 77]
    lk = [340, 1, 129, 5, 77] if causal else [300, 3, 129, 5, 77]
    q, k, v, g = _packed(rng, lq, lk, 4, 2, 128, BF16, gate=True)
    packed = np.asarray(_windows(flash_attention_varlen, q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g,
                                 max_seqlen_q=max(lq), max_seqlen_k=max(lk)), np.float64)
    assert_each_sequence_alone(packed, q, k, v, g, lq, lk, causal)


def test_windows_lnc2_bit_identical_to_lnc1():
    rng = np.random.default_rng(22)
    lq = [200, 57, 300]
    for hkv in (2, 1):
        q, k, v, g = _packed(rng, lq, lq, 4, hkv, 256, BF16, gate=True)
        kw = dict(gate=g, max_seqlen_q=300, max_seqlen_k=300)
        one = _windows(flash_attention_varlen, q, k, v, _cu(lq), _cu(lq), lnc=1, **kw)
        two = _windows(flash_attention_varlen, q, k, v, _cu(lq), _cu(lq), lnc=2, **kw)
        assert len(last_run().traces) == 2 and all(len(t) > 0 for t in last_run().traces)
        np.testing.assert_array_equal(np.asarray(one, np.float64), np.asarray(two, np.float64))


@pytest.mark.parametrize("causal", [True, False])
def test_windows_instructions_independent_of_cu_seqlens_values(causal):
    """Same shapes and max_seqlen_*, different boundaries (sequences at the tensor's start and end, empty ones,
    windows clamped into the tensor): the same program, correct values."""
    rng = np.random.default_rng(23)
    q, k, v, _ = _packed(rng, [300], [420], 2, 1, 64, BF16)
    sigs = []
    for lq, lk in (([100, 0, 200], [150, 70, 200]), ([1, 200, 99], [1, 220, 199]), ([0, 100, 200], [0, 220, 200])):
        out = _windows(flash_attention_varlen, q, k, v, _cu(lq), _cu(lk), causal=causal, max_seqlen_q=200,
                       max_seqlen_k=220)
        assert_close("values", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=causal), out,
                     dtype="bfloat16")
        sigs.append(program_signature([last_run()]))
    assert sigs[0] == sigs[1] == sigs[2]


@pytest.mark.parametrize("cu_q, cu_k", [
    ([0, 500, -7, 300], [0, 9999, 3, 420]),       # beyond T, negative, decreasing
    ([300, 0, 0, 0], [420, 420, 0, 0]),
    ([0, 2 ** 30, 2 ** 30, 300], [-2 ** 30, 0, 0, 420]),
])
def test_windows_adversarial_cu_seqlens_stay_in_the_tensors(cu_q, cu_k):
    """The kernel itself (no host validation: a compiled graph passes device values) with invalid boundaries:
    every dynamic DMA offset is clamped into its tensor, every scatter index is in the output or skipped (the
    emulator fails on any access outside a tensor)."""
    rng = np.random.default_rng(24)
    q, k, v, _ = _packed(rng, [300], [420], 2, 1, 64, BF16)
    for causal in (True, False):
        out = call(varlen.flash_attention_varlen_windows_kernel, q, k, v, None, np.array(cu_q, np.int32),
                   np.array(cu_k, np.int32), 0.125, causal, 200, 220, lnc=2)
        assert out.shape == q.shape


@given(where=st.sampled_from(["q", "k", "v", "gate"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       causal=st.booleans(), dtype=st.sampled_from(["bfloat16", "float32"]), seed=st.integers(0, 2 ** 16))
def test_windows_non_finite_stays_in_its_sequence(where, value, causal, dtype, seed):
    """A non-finite value in sequence 1 leaves every other sequence bit-identical (their windows overlap
    sequence 1's rows and keys); inside it, it reaches only the rows that see it."""
    rng = np.random.default_rng(seed)
    lq = [int(x) for x in rng.integers(0, 150, size=4)]
    lq[1] = max(lq[1], 1)
    lk = [x + int(rng.integers(0, 3)) for x in lq]
    lk[1] = max(lk[1], 1)
    q, k, v, g = _packed(rng, lq, lk, 2, 1, 64, DTYPES[dtype], gate=True)
    cq, ck = _cu(lq), _cu(lk)
    kw = dict(causal=causal, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    clean = np.asarray(_windows(flash_attention_varlen, q, k, v, cq, ck, gate=g, **kw), np.float64)
    t = dict(q=q.copy(), k=k.copy(), v=v.copy(), gate=g.copy())
    pos = int(rng.integers(cq[1], cq[2])) if where in ("q", "gate") else int(rng.integers(ck[1], ck[2]))
    t[where][pos, 0, 5] = value
    out = np.asarray(_windows(flash_attention_varlen, t["q"], t["k"], t["v"], cq, ck, gate=t["gate"], **kw),
                     np.float64)
    in_seq = np.zeros(len(out), bool)
    in_seq[cq[1]:cq[2]] = True
    np.testing.assert_array_equal(out[~in_seq], clean[~in_seq])
    if where in ("q", "gate"):
        others = np.ones(out.shape[:2], bool)
        others[pos] = False
        np.testing.assert_array_equal(out[others], clean[others])
    else:
        i = np.arange(lq[1])
        sees = (pos - ck[1] <= lk[1] - lq[1] + i) if causal else np.ones(lq[1], bool)
        rows = cq[1] + i[~sees]
        np.testing.assert_array_equal(out[rows], clean[rows])


def test_windows_largest_window_fits_on_chip():
    """The largest window the SBUF rule accepts (bf16, D=256, causal) runs under the emulator's SBUF checks."""
    mk = max(m for m in range(128, 20000, 128) if varlen.window_sbuf_bytes(m, m, 256, 2, True)
             <= varlen._SBUF_KV_BUDGET)
    assert varlen.windows_plan(2 * mk, 2 * mk, 2, 256, 2, True, mk, mk) == (mk, mk)
    assert varlen.windows_plan(2 * mk + 256, 2 * mk + 256, 2, 256, 2, True, mk + 128, mk + 128) is None
    rng = np.random.default_rng(25)
    lens = [mk, mk]
    q, k, v, _ = _packed(rng, lens, lens, 1, 1, 256, BF16)
    out = flash_attention_varlen(q, k, v, _cu(lens), _cu(lens), max_seqlen_q=mk, max_seqlen_k=mk)
    assert any(i.meta.get("indirect") for t in last_run().traces for i in t)
    assert_close("largest", flash_attention_varlen_ref(q, k, v, _cu(lens), _cu(lens)), out, dtype="bfloat16")


def test_mode_rule():
    """Trace-time rule on shapes and options: windows for the encoders' equal windows, the packed loop without
    both max_seqlen_* or when the windows would run more query tiles than the packed tiles."""
    plan = varlen.windows_plan
    assert plan(3920, 3920, 5, 72, 2, False, 784, 784) == (784, 784)          # vision: 5 frames of 784
    assert plan(1560, 1560, 15, 64, 2, False, 104, 104) == (104, 104)         # audio: 15 windows of 104
    assert plan(3920, 3920, 5, 72, 2, False, 784, None) is None
    assert plan(3920, 3920, 5, 72, 2, False, None, 784) is None
    assert plan(241, 241, 4, 256, 2, True, 120, 120) is None                 # 4 tiles vs 2 packed
    assert plan(256, 400, 2, 64, 2, True, 128, 100) == (128, 128)            # causal: mk >= mq
