"""nisa.nc_n_gather, nisa.local_gather, nc_matmul tiling (tile_position / tile_size) and fp8 double_row,
against NumPy statements of the stub docstrings' semantics, plus their modeled costs."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import FP8_E4M3, FP8_E5M2, nisa, nl, on_chip, raises
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.emulator import jit, run
from nki_kernels.emulator.costmodel import model_launches, params_for
from nki_kernels.emulator.targets import get_target, use_target

# ============================================================== nc_n_gather


def _n_gather(data, idx):
    out = nl.ndarray(idx.shape, data.dtype, buffer=nl.sbuf)
    nisa.nc_n_gather(dst=out, data=data, indices=idx)
    return out


@settings(deadline=None)
@given(p=st.integers(1, 128), f=st.integers(1, 700), n=st.integers(1, 600), seed=st.integers(0, 2 ** 31))
def test_nc_n_gather_per_partition(p, f, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((p, f)).astype(np.float32)
    idx = rng.integers(0, f, size=(p, n)).astype(np.uint32)
    out = on_chip(_n_gather, data, idx)
    want = np.stack([data[i][idx[i]] for i in range(p)])      # row by row: partition i reads only its own row
    np.testing.assert_array_equal(out, want)


def test_nc_n_gather_flattens_free_dims_and_keeps_dtype(rng):
    data = rng.standard_normal((16, 4, 8)).astype(np.float32).astype(FP8_E4M3)
    idx = rng.integers(0, 32, size=(16, 2, 5)).astype(np.uint32)
    out = on_chip(_n_gather, data, idx)
    assert out.dtype == FP8_E4M3 and out.shape == (16, 2, 5)
    flat = data.reshape(16, 32)
    for i in range(16):
        np.testing.assert_array_equal(out[i].reshape(-1), flat[i][idx[i].reshape(-1)])


def test_nc_n_gather_checks(rng):
    data = rng.standard_normal((8, 16)).astype(np.float32)
    with raises("indices", "outside [0, 16)"):
        on_chip(_n_gather, data, np.full((8, 4), 16, np.uint32))
    with raises("indices", "uint32"):
        on_chip(_n_gather, data, np.zeros((8, 4), np.int32))
    with raises("partition dim 4 must equal"):
        on_chip(_n_gather, data, np.zeros((4, 4), np.uint32))


# ============================================================== local_gather


def _local_gather_ref(src, index, e, nv):
    """The NKI test's NumPy semantics, written out: each 16-partition group gathers with its own indices."""
    p = src.shape[0]
    flat = src.reshape(p, -1)
    out = np.zeros((p, nv, e), dtype=src.dtype)
    for c in range(p // 16):
        ids = [int(index[16 * c + (k % 16), k // 16]) for k in range(nv)]   # partition-major order
        for q in range(16 * c, 16 * c + 16):
            for j, i0 in enumerate(ids):
                out[q, j, :] = flat[q, i0:i0 + e]
    return out.reshape(p, nv * e)


def _lg(src, index, e, nv):
    out = nl.ndarray((src.shape[0], nv * e), src.dtype, buffer=nl.sbuf)
    nisa.local_gather(dst=out, src_buffer=src, index=index, num_elem_per_idx=e, num_valid_indices=nv)
    return out


@settings(deadline=None, max_examples=25)
@given(groups=st.integers(1, 8), w=st.integers(1, 6), e=st.sampled_from([1, 2, 4, 8, 16, 32]),
       f=st.integers(32, 300), seed=st.integers(0, 2 ** 31), frac=st.floats(0.05, 1.0))
def test_local_gather_matches_reference(groups, w, e, f, seed, frac):
    rng = np.random.default_rng(seed)
    p = 16 * groups
    nv = max(1, int(16 * w * frac))
    src = rng.standard_normal((p, f)).astype(np.float32)
    index = rng.integers(0, f - e + 1, size=(p, w)).astype(np.uint16)
    out = on_chip(_lg, src, index, e=e, nv=nv)
    np.testing.assert_array_equal(out, _local_gather_ref(src, index, e, nv))


def test_local_gather_published_example_shape(rng):
    """The stub's example: src (128, 512, 4), index (128, 4) of element offsets (idx * 4), 4 elements each."""
    src = (rng.random((128, 512, 4)) * 100).astype(np.float32)
    per_core = rng.integers(0, 512, size=(16, 4)).astype(np.uint16)
    index = np.tile(per_core, (8, 1)) * 4
    out = on_chip(_lg, src, index.astype(np.uint16), e=4, nv=64)
    ids = per_core.flatten(order="F")
    want = src[:, ids, :].reshape(128, 256)
    np.testing.assert_array_equal(out, want)


def test_local_gather_checks(rng):
    src = rng.standard_normal((16, 64)).astype(np.float32)
    idx = np.zeros((16, 2), np.uint16)
    with raises("num_elem_per_idx", "1, 2, 4"):
        on_chip(_lg, src, idx, e=3, nv=4)
    with raises("num_valid_indices", "[1, 32]"):
        on_chip(_lg, src, idx, e=1, nv=33)
    with raises("reaches past"):
        on_chip(_lg, src, np.full((16, 2), 62, np.uint16), e=4, nv=4)
    with raises("uint16"):
        on_chip(_lg, src, idx.astype(np.uint32), e=1, nv=4)
    with raises("multiple of 16"):
        on_chip(_lg, src[:8], idx[:8], e=1, nv=4)


# ============================================================== nc_matmul: double_row and tiling


def _mm(st_, mv, **kw):
    m = st_.shape[-1]
    n = mv.shape[-1]
    ps = nl.ndarray((m, n), nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=st_, moving=mv, **kw)
    return ps


@pytest.mark.parametrize("dt_s,dt_m", [(FP8_E4M3, FP8_E4M3), (FP8_E4M3, FP8_E5M2)])
def test_double_row_contracts_partitions_and_pairs(rng, dt_s, dt_m):
    k, m, n = 128, 24, 40
    a = rng.standard_normal((k, 2, m)).astype(np.float32).astype(dt_s)
    b = rng.standard_normal((k, 2, n)).astype(np.float32).astype(dt_m)
    out = on_chip(_mm, a, b, perf_mode=nisa.matmul_perf_mode.double_row)
    a32, b32 = a.astype(np.float64), b.astype(np.float64)
    want = np.einsum("kpm,kpn->mn", a32, b32)                  # the [1, 256] @ [256, 3] example, generalised
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


def test_double_row_checks(rng):
    a = rng.standard_normal((128, 2, 8)).astype(np.float32)
    with raises("double_row takes only"):
        on_chip(_mm, a, a, perf_mode=nisa.matmul_perf_mode.double_row)
    with raises("[K, 2, F]"):
        f8 = rng.standard_normal((128, 3, 8)).astype(np.float32).astype(FP8_E4M3)
        on_chip(_mm, f8, f8, perf_mode=nisa.matmul_perf_mode.double_row)
    f8 = a.astype(FP8_E4M3)
    with raises("column tiling"):
        on_chip(_mm, f8, f8, perf_mode=nisa.matmul_perf_mode.double_row, tile_position=(0, 0), tile_size=(128, 64))
    with use_target("trn1"), raises("NeuronCore-v3"):
        on_chip(_mm, f8, f8, perf_mode=nisa.matmul_perf_mode.double_row)


def test_tiled_matmul_values_and_limits(rng):
    a = rng.standard_normal((32, 20)).astype(np.float32)
    b = rng.standard_normal((32, 48)).astype(np.float32)
    out = on_chip(_mm, a, b, tile_position=(96, 0), tile_size=(32, 128))
    np.testing.assert_allclose(out, a.T @ b, rtol=1e-5, atol=1e-5)
    big = rng.standard_normal((64, 8)).astype(np.float32)
    with raises("K=64 exceeds", "row_size 32"):
        on_chip(_mm, big, big, tile_position=(0, 0), tile_size=(32, 128))
    with raises("must both be set"):
        on_chip(_mm, a, b, tile_position=(0, 0))
    with raises("multiple of the tile's 64"):
        on_chip(_mm, a, b, tile_position=(32, 0), tile_size=(64, 128))
    wide = rng.standard_normal((32, 40)).astype(np.float32)
    with raises("M=40", "column_size"):
        on_chip(_mm, wide, b, tile_position=(0, 32), tile_size=(32, 32))
    with use_target("trn1"), raises("not a PE tile size on trn1"):
        on_chip(_mm, a, b, tile_position=(0, 0), tile_size=(32, 128))


def _pe_us(kernel, *arrays):
    res = run(kernel, *arrays, lnc=1)
    rep = model_launches([res])
    return rep.launches[0].cores[0].engine_busy_us["pe"], rep.device_us


def test_four_row_tiles_take_a_quarter_of_the_pe_time(rng):
    """Four independent K=32 matmuls on the four 32-row tiles occupy TensorE as one full-array matmul."""
    x = rng.standard_normal((128, 512)).astype(np.float32).astype(np.dtype("float16"))

    def make(tiled):
        @jit
        def k(x):
            sb = nl.ndarray((128, 512), x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=sb, src=x)
            out = nl.ndarray((4, 32, 512), nl.float32, buffer=nl.shared_hbm)
            for i in range(4):
                ps = nl.ndarray((32, 512), nl.float32, buffer=nl.psum)
                kw = dict(tile_position=(32 * i, 0), tile_size=(32, 128)) if tiled else {}
                nisa.nc_matmul(dst=ps, stationary=sb[32 * i:32 * i + 32, 0:32], moving=sb[32 * i:32 * i + 32, :],
                               **kw)
                o = nl.ndarray((32, 512), nl.float32, buffer=nl.sbuf)
                nisa.tensor_copy(dst=o, src=ps)
                nisa.dma_copy(dst=out[i], src=o)
            return out
        return k

    plain, _ = _pe_us(make(False), x)
    tiled, _ = _pe_us(make(True), x)
    assert tiled == pytest.approx(plain / 4, rel=0.05)
    o1 = run(make(True), x, lnc=1).outputs
    o0 = run(make(False), x, lnc=1).outputs
    np.testing.assert_array_equal(o1, o0)


def test_double_row_doubles_fp8_throughput(rng):
    """One double_row matmul (K=256) takes the PE time of one K=128 matmul: twice the FLOPs per cycle."""
    a = rng.standard_normal((128, 2, 128)).astype(np.float32).astype(FP8_E4M3)
    b = rng.standard_normal((128, 2, 512)).astype(np.float32).astype(FP8_E4M3)

    def make(double):
        @jit
        def k(a, b):
            sa = nl.ndarray(a.shape, a.dtype, buffer=nl.sbuf)
            sb = nl.ndarray(b.shape, b.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=sa, src=a)
            nisa.dma_copy(dst=sb, src=b)
            ps = nl.ndarray((128, 512), nl.float32, buffer=nl.psum)
            if double:
                nisa.nc_matmul(dst=ps, stationary=sa, moving=sb, perf_mode=nisa.matmul_perf_mode.double_row)
            else:
                for r in range(2):
                    nisa.nc_matmul(dst=ps, stationary=sa[:, r, :], moving=sb[:, r, :], accumulate=r > 0)
            o = nl.ndarray((128, 512), nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=o, src=ps)
            out = nl.ndarray((128, 512), nl.float32, buffer=nl.shared_hbm)
            nisa.dma_copy(dst=out, src=o)
            return out
        return k

    r2 = run(make(True), a, b, lnc=1)
    r1 = run(make(False), a, b, lnc=1)
    np.testing.assert_allclose(r2.outputs, r1.outputs, rtol=1e-5, atol=1e-4)
    rep2, rep1 = model_launches([r2]), model_launches([r1])
    assert rep2.flops == rep1.flops == 2 * 256 * 128 * 512
    pe2 = rep2.launches[0].cores[0].engine_busy_us["pe"]
    pe1 = rep1.launches[0].cores[0].engine_busy_us["pe"]
    assert pe2 == pytest.approx(pe1 / 2, rel=0.1)


def test_gather_costs_are_charged_to_gpsimd(rng):
    data = rng.standard_normal((128, 2048)).astype(np.float32)
    idx = rng.integers(0, 2048, size=(128, 1024)).astype(np.uint32)

    @jit
    def k(data, idx):
        d = nl.ndarray(data.shape, data.dtype, buffer=nl.sbuf)
        i = nl.ndarray(idx.shape, idx.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=d, src=data)
        nisa.dma_copy(dst=i, src=idx)
        o = nl.ndarray(idx.shape, data.dtype, buffer=nl.sbuf)
        nisa.nc_n_gather(dst=o, data=d, indices=i)
        out = nl.ndarray(idx.shape, data.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=o)
        return out

    res = run(k, data, idx, lnc=1)
    np.testing.assert_array_equal(res.outputs, np.take_along_axis(data, idx.astype(np.int64), axis=1))
    pool = model_launches([res]).launches[0].cores[0].engine_busy_us["pool"]
    t = get_target("trn2")
    p = params_for(t)
    want = (2 * p.gather_fixed_cycles + 1024) / t.pool_ghz * 1e-3    # two 512-element groups + streaming
    assert pool == pytest.approx(want, rel=0.01)
