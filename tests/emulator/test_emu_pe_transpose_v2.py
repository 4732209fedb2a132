"""TensorE transpose values on NeuronCore-v2 (trn1): an identity matmul, not bit-exact with NaN / Inf.

The real `nki.isa.nc_transpose` docstring (NKI stubs): the TensorE transpose multiplies `data` (stationary) by an
identity (moving), and "On NeuronCore-v2, Tensor Engine transpose is not bit-accurate if the input data contains
NaN/Inf ... Starting NeuronCore-v3, all Tensor Engine transpose is bit-accurate". So on trn1
out[j, i] = sum_k data[k, j] * I[k, i]: a NaN / Inf at data[k, j] is multiplied by 0 for every i != k and the whole
output row j becomes NaN (except column k, where an Inf alone survives as Inf). VectorE and DMA transposes are
exact everywhere. The reference below states that rule per element with NumPy masks (no matmul, no emulator code).
"""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import BF16, nisa, nl, run, sb_load
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import hw
from nki_kernels.emulator import jit
from nki_kernels.emulator.targets import TARGETS


def _identity_matmul_reference(x):
    """[P, F] -> [F, P]: ref[j, i] is NaN when column j of x holds a non-finite value in a row other than i,
    else x[i, j] (finite values exact, a lone Inf stays Inf in its own column)."""
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)                               # [P, F]
    bad_elsewhere = bad.sum(axis=0)[None, :] - bad      # [P, F]: non-finite values in column j outside row i
    ref = np.where(bad_elsewhere > 0, np.nan, x)        # [P, F], indexed [i, j]
    return ref.T


def _pe_transpose(x, target, engine=None):
    @jit
    def kernel(a):
        a_sb = sb_load(a)
        p, f = a.shape
        t_psum = nl.ndarray((f, p), a.dtype, buffer=nl.psum)
        if engine is None:
            nisa.nc_transpose(t_psum, a_sb)
        else:
            nisa.nc_transpose(t_psum, a_sb, engine=engine)
        t_sb = nl.ndarray((f, p), a.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t_sb, src=t_psum)
        out = nl.ndarray((f, p), a.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=t_sb)
        return out
    return np.asarray(run(kernel, x, lnc=1, target=target).outputs).astype(np.float64)


def _poisoned(rng, shape, dtype=np.float32):
    x = rng.standard_normal(shape).astype(dtype)
    x[3, 5] = np.nan
    x[10, 7] = np.inf
    x[11, 9] = -np.inf
    x[12, 9] = np.inf            # two Infs in one column: every element of row 9 is NaN (Inf - Inf, Inf * 0)
    return x


def test_mixing_targets_are_the_neuroncore_v2_targets():
    assert set(hw.NAN_MIXING_PE_TRANSPOSE_TARGETS) == {n for n, t in TARGETS.items() if t.nc_version < 3} == {"trn1"}


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_trn1_pe_transpose_spreads_nan_and_inf_over_the_output_row(rng, dtype):
    x = _poisoned(rng, (40, 24), dtype)
    got = _pe_transpose(x, "trn1")
    np.testing.assert_array_equal(got, _identity_matmul_reference(x))
    # spelled out: row 5 all NaN, row 7 NaN but Inf at column 10, row 9 all NaN, other rows exact
    assert np.isnan(got[5]).all()
    assert got[7, 10] == np.inf and np.isnan(np.delete(got[7], 10)).all()
    assert np.isnan(got[9]).all()
    clean = [j for j in range(24) if j not in (5, 7, 9)]
    np.testing.assert_array_equal(got[clean], np.asarray(x, np.float64).T[clean])


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_v3_and_later_pe_transpose_is_exact_with_nan_and_inf(rng, target):
    x = _poisoned(rng, (40, 24))
    np.testing.assert_array_equal(_pe_transpose(x, target), np.asarray(x, np.float64).T)


def test_trn1_pe_transpose_of_finite_data_is_bit_exact(rng):
    x = (rng.standard_normal((128, 128)) * 1e30).astype(np.float32)
    x[0, :] = np.finfo(np.float32).max
    x[1, :] = np.finfo(np.float32).tiny / 4        # subnormals
    np.testing.assert_array_equal(_pe_transpose(x, "trn1"), np.asarray(x, np.float64).T)


def test_trn1_vector_transpose_stays_exact(rng):
    x = _poisoned(rng, (32, 16))
    np.testing.assert_array_equal(_pe_transpose(x, "trn1", engine=nisa.vector_engine), np.asarray(x, np.float64).T)


def test_trn1_dma_transpose_stays_exact(rng):
    x = _poisoned(rng, (16, 24), BF16)

    @jit
    def kernel(a):
        a_sb = sb_load(a)
        t_sb = nl.ndarray((24, 16), a.dtype, buffer=nl.sbuf)
        nisa.dma_transpose(dst=t_sb, src=a_sb)
        out = nl.ndarray((24, 16), a.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=t_sb)
        return out
    got = np.asarray(run(kernel, x, lnc=1, target="trn1").outputs).astype(np.float64)
    np.testing.assert_array_equal(got, np.asarray(x, np.float64).T)


def test_trn1_pe_transpose_keeps_the_instruction_stream(rng):
    """Only values change on trn1: the trace entry (engine, shape) is the same as on trn2."""
    x = _poisoned(rng, (40, 24))
    streams = []
    for target in ("trn1", "trn2"):
        @jit
        def kernel(a):
            a_sb = sb_load(a)
            t_psum = nl.ndarray((24, 40), a.dtype, buffer=nl.psum)
            nisa.nc_transpose(t_psum, a_sb)
            t_sb = nl.ndarray((24, 40), a.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=t_sb, src=t_psum)
            out = nl.ndarray((24, 40), a.dtype, buffer=nl.shared_hbm)
            nisa.dma_copy(dst=out, src=t_sb)
            return out
        res = run(kernel, x, lnc=1, target=target)
        streams.append([(i.name, i.engine, i.meta) for i in res.trace])
    assert streams[0] == streams[1]


@settings(deadline=None)
@given(p=st.integers(1, 128), f=st.integers(1, 128), seed=st.integers(0, 2 ** 31 - 1),
       n_bad=st.integers(0, 6), bf16=st.booleans())
def test_trn1_pe_transpose_matches_identity_matmul_rule(p, f, seed, n_bad, bf16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((p, f)).astype(np.float32)
    for _ in range(n_bad):
        x[rng.integers(p), rng.integers(f)] = rng.choice([np.nan, np.inf, -np.inf])
    if bf16:
        x = x.astype(BF16)
    np.testing.assert_array_equal(_pe_transpose(x, "trn1"), _identity_matmul_reference(x))
