"""The three example kernels against their float64 references, at LNC 1 and 2, for hypothesis-drawn shapes."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import rmsnorm, softmax, tiled_matmul
from nki_kernels.emulator import last_run
from nki_kernels.examples.reference import rmsnorm_reference, softmax_reference, tiled_matmul_reference
from nki_kernels.hw import NEG_INF
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = st.sampled_from(["float32", "bfloat16"])
LNC = st.sampled_from([1, 2])


def _np_dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


# ============================================================== tiled matmul


@given(k=st.integers(1, 300), m=st.integers(1, 300), n=st.integers(1, 700), dtype=DTYPES, lnc=LNC)
def test_tiled_matmul_matches_reference(k, m, n, dtype, lnc):
    rng = np.random.default_rng(k * 7 + m * 13 + n)
    lhsT = rng.standard_normal((k, m)).astype(_np_dtype(dtype))
    rhs = rng.standard_normal((k, n)).astype(_np_dtype(dtype))
    out = tiled_matmul(lhsT, rhs, lnc=lnc)
    assert out.shape == (m, n) and out.dtype == _np_dtype(dtype)
    assert_close("tiled_matmul", tiled_matmul_reference(lhsT, rhs), out, dtype=dtype)


def test_tiled_matmul_lnc2_equals_lnc1_and_splits_work(rng):
    lhsT = rng.standard_normal((200, 300)).astype(BF16)
    rhs = rng.standard_normal((200, 600)).astype(BF16)
    o1 = tiled_matmul(lhsT, rhs, lnc=1)
    n1 = len(last_run().trace)
    o2 = tiled_matmul(lhsT, rhs, lnc=2)
    r2 = last_run()
    np.testing.assert_array_equal(o1, o2)
    assert len(r2.traces) == 2
    mm = [sum(i.name == "nc_matmul" for i in t) for t in r2.traces]
    assert mm == [2 * 2 * 2, 2 * 1 * 2]            # n tiles x (m tiles of this program) x k tiles
    assert sum(len(t) for t in r2.traces) < 1.5 * n1


def test_tiled_matmul_streams_lhs_when_it_does_not_fit(rng):
    # n_m * n_k = 11 * 12 = 132 fp32 blocks of 128 x 128 exceed the 64 KiB resident budget per partition
    lhsT = rng.standard_normal((1500, 1400)).astype(np.float32)
    rhs = rng.standard_normal((1500, 37)).astype(np.float32)
    out = tiled_matmul(lhsT, rhs, lnc=1)
    loads = [i for i in last_run().trace if i.name == "dma_copy" and i.reads[0].buffer == "hbm"]
    assert len(loads) == 2 + 11 * 2                 # rhs (full K tiles + K tail), then lhsT per M tile
    assert_close("tiled_matmul", tiled_matmul_reference(lhsT, rhs), out, dtype="float32")


def test_tiled_matmul_adversarial_values():
    k, m, n = 130, 5, 9
    lhsT = np.zeros((k, m), np.float32)
    rhs = np.full((k, n), 1e30, np.float32)
    lhsT[0, :] = 1e-30                               # products at the fp32 extremes stay finite
    lhsT[129, 1] = -2.0
    out = tiled_matmul(lhsT, rhs)
    assert_close("tiled_matmul", tiled_matmul_reference(lhsT, rhs), out, dtype="float32")


def test_tiled_matmul_bad_inputs():
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(KernelInputError, match=r"tiled_matmul: contraction dims differ, got lhsT K=4, rhs K=5"):
        tiled_matmul(a, np.zeros((5, 4), np.float32))
    with pytest.raises(KernelInputError, match=r"tiled_matmul: lhsT and rhs must be 2-D"):
        tiled_matmul(a[0], a)
    with pytest.raises(KernelInputError, match=r"tiled_matmul: lhsT dtype must be one of .* got lhsT.dtype=int32"):
        tiled_matmul(a.astype(np.int32), a.astype(np.int32))
    with pytest.raises(KernelInputError, match=r"tiled_matmul: dtypes differ"):
        tiled_matmul(a, a.astype(BF16))
    with pytest.raises(KernelInputError, match=r"tiled_matmul: K \* itemsize must be <= 16384 B \(K <= 4096 for "
                                               r"float32\), got K=4097"):
        tiled_matmul(np.zeros((4097, 2), np.float32), np.zeros((4097, 2), np.float32))
    with pytest.raises(KernelInputError, match=r"tiled_matmul: lnc must be one of \(1, 2\) or None, got lnc=4"):
        tiled_matmul(a, a, lnc=4)


# ============================================================== softmax


@given(r=st.integers(1, 300), c=st.integers(1, 1200), dtype=DTYPES, lnc=LNC, scale=st.sampled_from([1.0, 30.0]))
def test_softmax_matches_reference(r, c, dtype, lnc, scale):
    rng = np.random.default_rng(r * 31 + c)
    x = (rng.standard_normal((r, c)) * scale).astype(_np_dtype(dtype))
    out = softmax(x, lnc=lnc)
    assert out.shape == (r, c) and out.dtype == _np_dtype(dtype)
    assert_close("softmax", softmax_reference(x), out, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_adversarial_rows(dtype):
    c = 200
    pad = float(ml_dtypes.finfo(BF16).min) if dtype == "bfloat16" else NEG_INF    # most negative finite value
    x = np.zeros((7, c), np.float32)
    x[0] = 1e30                                      # huge logits, all equal: uniform
    x[1, :] = -1e30
    x[1, 17] = 1e30                                  # one huge winner
    x[2] = pad                                   # an all-padding row (every logit masked): uniform
    x[3, :] = pad
    x[3, :5] = 0.0                                   # masked tail
    x[4] = np.linspace(-80, 80, c)                   # exp range far beyond fp32 without the max shift
    x[5, ::2] = 3e38
    x[6] = -3.0
    x = x.astype(_np_dtype(dtype))
    out = softmax(x, lnc=2)
    ref = softmax_reference(x)
    assert_close("softmax", ref, out, dtype=dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64).sum(1), 1.0, rtol=2e-2 if dtype == "bfloat16" else 1e-5)
    np.testing.assert_allclose(np.asarray(out[1, 17], np.float64), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[3, :5], np.float64), 0.2, rtol=1e-2)
    assert (np.asarray(out[3, 5:], np.float64) == 0).all()


def test_softmax_edge_shapes(rng):
    for shape in [(1, 1), (1, 5), (128, 1), (129, 3), (256, 16)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert_close(f"softmax {shape}", softmax_reference(x), softmax(x), dtype="float32")


def test_softmax_bad_inputs():
    with pytest.raises(KernelInputError, match=r"softmax: x must be 2-D \[R, C\], got x.shape=\(3,\)"):
        softmax(np.zeros(3, np.float32))
    with pytest.raises(KernelInputError, match=r"softmax: C must be in \[1, 16384\], got C=16385"):
        softmax(np.zeros((1, 16385), np.float32))
    with pytest.raises(KernelInputError, match=r"softmax: x dtype must be one of .* got x.dtype=int32"):
        softmax(np.zeros((2, 2), np.int32))
    with pytest.raises(KernelInputError, match=r"softmax: lnc must be one of \(1, 2\) or None, got lnc=0"):
        softmax(np.zeros((2, 2), np.float32), lnc=0)


def test_widest_rows_fit_sbuf_on_every_target(rng):
    from nki_kernels.emulator import use_target
    x = rng.standard_normal((130, 16384)).astype(np.float32)
    xr = np.ascontiguousarray(x[:, :12288])
    w = rng.standard_normal(12288).astype(np.float32)
    for target in ("trn1", "trn2", "trn3"):
        with use_target(target):
            assert_close("softmax", softmax_reference(x), softmax(x), dtype="float32")
            assert_close("rmsnorm", rmsnorm_reference(xr, w), rmsnorm(xr, w), dtype="float32")


# ============================================================== rmsnorm


@given(r=st.integers(1, 300), h=st.integers(1, 1200), dtype=DTYPES, lnc=LNC,
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rmsnorm_matches_reference(r, h, dtype, lnc, eps):
    rng = np.random.default_rng(r * 17 + h)
    x = (rng.standard_normal((r, h)) * 3).astype(_np_dtype(dtype))
    w = (1 + 0.1 * rng.standard_normal(h)).astype(_np_dtype(dtype))
    out = rmsnorm(x, w, eps, lnc=lnc)
    assert out.shape == (r, h) and out.dtype == _np_dtype(dtype)
    assert_close("rmsnorm", rmsnorm_reference(x, w, eps), out, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rmsnorm_adversarial_rows(dtype):
    h = 96
    x = np.ones((6, h), np.float32)
    x[0] = 0.0                                       # all-zero row: rsqrt(eps), output exactly 0
    x[1] = 1e12                                      # huge activations (mean square 1e24, fp32-safe)
    x[2] = 1e-20                                     # tiny activations: eps dominates
    x[3, ::3] = -5e3
    x[4] = np.linspace(-1, 1, h)
    x[5, 0] = 1e6                                    # one outlier
    w = np.linspace(-2, 2, h).astype(np.float32)
    xd, wd = x.astype(_np_dtype(dtype)), w.astype(_np_dtype(dtype))
    out = rmsnorm(xd, wd, 1e-6, lnc=2)
    assert_close("rmsnorm", rmsnorm_reference(xd, wd, 1e-6), out, dtype=dtype)
    assert (np.asarray(out[0], np.float64) == 0).all()
    np.testing.assert_allclose(np.asarray(out[1], np.float64), np.asarray(wd, np.float64), rtol=1e-2)


def test_rmsnorm_bad_inputs():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(KernelInputError, match=r"rmsnorm: weight must be \[H\] with H = x.shape\[1\] = 8, "
                                               r"got weight.shape=\(7,\)"):
        rmsnorm(x, np.zeros(7, np.float32))
    with pytest.raises(KernelInputError, match=r"rmsnorm: weight dtype must equal x's"):
        rmsnorm(x, np.zeros(8, BF16))
    with pytest.raises(KernelInputError, match=r"rmsnorm: H must be in \[1, 12288\], got H=12289"):
        rmsnorm(np.zeros((1, 12289), np.float32), np.zeros(12289, np.float32))
    with pytest.raises(KernelInputError, match=r"rmsnorm: eps must be a float >= 2\*\*-87 .* got eps=0.0"):
        rmsnorm(x, np.zeros(8, np.float32), eps=0.0)
    with pytest.raises(KernelInputError, match=r"rmsnorm: x must be 2-D"):
        rmsnorm(x[None], np.zeros(8, np.float32))


def test_rmsnorm_weight_is_broadcast_by_one_stride0_dma(rng):
    x = rng.standard_normal((300, 64)).astype(BF16)
    w = rng.standard_normal(64).astype(BF16)
    rmsnorm(x, w)
    first = last_run().trace[0]
    assert first.name == "dma_copy" and first.reads[0].shape == (128, 64)
    assert first.reads[0].lo == 0 and first.reads[0].hi == 64          # 128 partitions read the same 64 values


def test_non_finite_values_stay_in_their_row_or_column(rng):
    """KERNELS.md, per-kernel table: softmax / rmsnorm keep a NaN in its row; tiled_matmul: a NaN/inf in lhsT[k, m]
    reaches output row m only, one in rhs[k, n] output column n only."""
    from nki_kernels import rmsnorm, softmax, tiled_matmul
    x = rng.standard_normal((20, 33)).astype(np.float32)
    x[3, 5] = np.nan
    for out in (softmax(x), rmsnorm(x, np.ones(33, np.float32))):
        bad = ~np.isfinite(out)
        assert bad[3].all() and not bad[np.arange(20) != 3].any()
    lhsT = rng.standard_normal((64, 32)).astype(np.float32)
    rhs = rng.standard_normal((64, 48)).astype(np.float32)
    lhsT[2, 7], rhs[5, 11] = np.nan, np.inf
    bad = ~np.isfinite(tiled_matmul(lhsT, rhs))
    expected = np.zeros((32, 48), bool)
    expected[7, :], expected[:, 11] = True, True
    np.testing.assert_array_equal(bad, expected)
