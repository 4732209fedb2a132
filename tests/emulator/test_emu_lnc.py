"""LNC=2: two program instances share HBM, split work by program_id, equal LNC=1; the race check."""
from __future__ import annotations

import numpy as np
from emu_kit import jit, kernel_run, nisa, nl, raises, rnd, run, sb_load
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.emulator import compiler_lnc


@jit
def _scale_rows(x, factor):
    """out = x * factor, row tiles of 16 split round-robin over the programs."""
    n_rows, n_cols = x.shape
    out = nl.ndarray((n_rows, n_cols), nl.float32, buffer=nl.shared_hbm)
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    for i in nl.affine_range((n_rows + 15) // 16):
        if i % n_prog != pid:
            continue
        r0, r_sz = i * 16, min(16, n_rows - i * 16)
        t = nl.ndarray((16, n_cols), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:r_sz, :], src=x[r0:r0 + r_sz, :])
        nisa.tensor_scalar(dst=t[0:r_sz, :], data=t[0:r_sz, :], op0=nl.multiply, operand0=factor)
        nisa.dma_copy(dst=out[r0:r0 + r_sz, :], src=t[0:r_sz, :])
    return out


@given(rows=st.integers(1, 70), cols=st.integers(1, 40))
def test_lnc2_equals_lnc1(rows, cols):
    x = np.random.default_rng(rows * 100 + cols).standard_normal((rows, cols)).astype(np.float32)
    r1 = run(_scale_rows, x, 3.0, lnc=1)
    r2 = run(_scale_rows, x, 3.0, lnc=2)
    np.testing.assert_array_equal(r1.outputs, x * np.float32(3.0))
    np.testing.assert_array_equal(r2.outputs, r1.outputs)
    assert len(r1.traces) == 1 and len(r2.traces) == 2
    n_tiles = (rows + 15) // 16
    # each program did only its own tiles: 3 instructions per tile
    assert [len(t) for t in r2.traces] == [3 * len(range(p, n_tiles, 2)) for p in (0, 1)]
    assert [t.pid for t in r2.traces] == [0, 1]


def test_program_id_and_num_programs():
    seen = []

    def k(a):
        seen.append((nl.program_id(0), nl.num_programs(0)))
        out = nl.ndarray((2, 1), nl.int32, buffer=nl.shared_hbm)
        pid = nl.program_id(0)
        t = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)
        nisa.memset(t, 10 + pid)
        nisa.dma_copy(dst=out[pid:pid + 1, :], src=t)
        return out
    one = np.zeros((1, 1), np.float32)
    kernel = jit(k)
    r1 = run(kernel, one, lnc=1)
    r2 = run(kernel, one, lnc=2)
    assert seen == [(0, 1), (0, 2), (1, 2)]
    assert r1.outputs[0, 0] == 10
    np.testing.assert_array_equal(r2.outputs[:, 0], [10, 11])
    # called without brackets: one program (LNC=1 when NEURON_LOGICAL_NC_CONFIG is unset)
    with compiler_lnc(1):
        np.testing.assert_array_equal(kernel(one)[0], [10])
    with compiler_lnc(2):
        np.testing.assert_array_equal(kernel[2](one)[:, 0], [10, 11])


def test_race_check_write_write_and_write_read(rng):
    x = rnd(rng, (8, 4))

    def write_same(a):
        out = nl.ndarray((8, 4), nl.float32, buffer=nl.shared_hbm)
        t = sb_load(a)
        nisa.dma_copy(dst=out[0:4, :], src=t[0:4, :])        # both programs write rows 0..3
        if nl.program_id(0) == 0:
            nisa.dma_copy(dst=out[4:8, :], src=t[4:8, :])
        return out
    with raises("dma_copy", "'dst'", "program 1 writes", "program 0"):
        kernel_run(write_same, x, lnc=2)

    def read_other(a):
        out = nl.ndarray((8, 4), nl.float32, buffer=nl.shared_hbm)
        pid = nl.program_id(0)
        t = sb_load(a[pid * 4:pid * 4 + 4, :])
        nisa.dma_copy(dst=out[pid * 4:pid * 4 + 4, :], src=t)
        back = nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=back, src=out[0:4, :])             # program 1 reads program 0's rows
        return out
    with raises("dma_copy", "'src'", "program 1 reads", "program 0"):
        kernel_run(read_other, x, lnc=2)

    def disjoint(a):
        out = nl.ndarray((8, 4), nl.float32, buffer=nl.shared_hbm)
        pid = nl.program_id(0)
        t = sb_load(a)                                       # both read all of the input: fine
        nisa.dma_copy(dst=out[pid * 4:pid * 4 + 4, :], src=t[pid * 4:pid * 4 + 4, :])
        return out
    np.testing.assert_array_equal(kernel_run(disjoint, x, lnc=2).outputs, x)


def test_lnc2_in_place_input_update_and_private_sbuf(rng):
    state = rnd(rng, (8, 4))
    before = state.copy()

    def k(s):
        pid = nl.program_id(0)
        t = nl.ndarray((4, 4), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=s[pid * 4:pid * 4 + 4, :])
        nisa.tensor_scalar(dst=t, data=t, op0=nl.add, operand0=1.0)
        nisa.dma_copy(dst=s[pid * 4:pid * 4 + 4, :], src=t)
        return None
    assert kernel_run(k, state, lnc=2).outputs is None
    np.testing.assert_array_equal(state, before + 1.0)


def test_shared_hbm_allocations_must_match_across_programs():
    def k(a):
        n = 4 + nl.program_id(0)
        out = nl.ndarray((n, 1), nl.float32, buffer=nl.shared_hbm)
        return out
    with raises("ndarray", "program 1 allocated shared_hbm", "identical"):
        kernel_run(k, np.zeros((1, 1), np.float32), lnc=2)


def test_private_hbm_is_per_program(rng):
    x = rnd(rng, (4, 4))

    def k(a):
        scratch = nl.ndarray((4, 4), nl.float32, buffer=nl.hbm)       # private: no race between cores
        nisa.dma_copy(dst=scratch, src=a)
        out = nl.ndarray((8, 4), nl.float32, buffer=nl.shared_hbm)
        pid = nl.program_id(0)
        nisa.dma_copy(dst=out[pid * 4:pid * 4 + 4, :], src=scratch)
        return out
    np.testing.assert_array_equal(kernel_run(k, x, lnc=2).outputs, np.concatenate([x, x]))


def test_nki_simulate_entry_points(rng):
    from nki_kernels.emulator import simulate
    x = rnd(rng, (40, 8))
    with compiler_lnc(1):
        np.testing.assert_array_equal(simulate(_scale_rows)(x, 2.0), x * np.float32(2.0))
    with compiler_lnc(2):
        np.testing.assert_array_equal(simulate(_scale_rows[2])(x, 2.0), x * np.float32(2.0))
