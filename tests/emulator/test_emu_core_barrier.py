"""`nisa.core_barrier` on the emulator: the two cores of an LNC=2 launch exchange data through shared HBM.

Semantics checked (isa stub docstring, NKI 0.6/0.7): NeuronCore-v3+ and LNC=2 only, ``cores=(0, 1)``, ``data`` in
shared HBM; both program instances reach the barrier before either goes on, so one core's writes to ``data``
before it are visible to the other after it. Without it the emulator flags the race. Expected values are
computed here with NumPy from the inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import raises
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.backend import nki, nisa, nl
from nki_kernels.emulator import record_launches, run, run_ranks, use_target
from nki_kernels.emulator.collectives import ReplicaGroup
from nki_kernels.emulator.costmodel import model_launches, model_trace, params_for
from nki_kernels.emulator.lnc import LNC_ENV
from nki_kernels.emulator.targets import get_target


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(LNC_ENV, raising=False)


def _load(src, rows, f):
    t = nl.ndarray((rows, f), nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    return t


@nki.jit
def swap_halves(x, barrier=True, scale=2.0):
    """out[my half] = scale * x[other half]: each core scales its half into `ex`, then reads the other's."""
    n, f = x.shape
    half = n // 2
    pid = nl.program_id(0)
    other = 1 - pid
    ex = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    t = _load(x[pid * half:(pid + 1) * half, :], half, f)
    nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=scale)
    nisa.dma_copy(dst=ex[pid * half:(pid + 1) * half, :], src=t)
    if barrier:
        nisa.core_barrier(data=ex, cores=(0, 1))
    u = _load(ex[other * half:(other + 1) * half, :], half, f)
    nisa.dma_copy(dst=out[pid * half:(pid + 1) * half, :], src=u)
    return out


def _swapped(x, scale=2.0):
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]]) * np.float32(scale)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 64), f=st.integers(1, 96), seed=st.integers(0, 2**31 - 1))
def test_exchange_through_shared_hbm(rows, f, seed):
    x = np.random.default_rng(seed).standard_normal((2 * rows, f)).astype(np.float32)
    out = run(swap_halves, x, lnc=2).outputs
    np.testing.assert_array_equal(out, _swapped(x))


def test_without_barrier_the_race_is_an_error(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    with raises("program 1 writes shared-HBM elements", "program 0 also accesses", "no synchronisation"):
        run(swap_halves, x, barrier=False, lnc=2)


@nki.jit
def read_before_barrier(x):
    """Core 1 reads core 0's half of `ex` before the barrier (core 0 wrote it already in the emulator's order)."""
    n, f = x.shape
    half = n // 2
    pid = nl.program_id(0)
    ex = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    t = _load(x[pid * half:(pid + 1) * half, :], half, f)
    nisa.dma_copy(dst=ex[pid * half:(pid + 1) * half, :], src=t)
    u = _load(ex[0:half, :], half, f)
    nisa.core_barrier(data=ex, cores=(0, 1))
    nisa.dma_copy(dst=out[pid * half:(pid + 1) * half, :], src=u)
    return out


def test_reading_the_other_cores_region_before_the_barrier_is_an_error(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    with raises("program 1 reads shared-HBM elements", "program 0 also accesses"):
        run(read_before_barrier, x, lnc=2)


@nki.jit
def ring_sum(x, rounds, double_buffer=True):
    """Each round both cores add the other core's running value to their own (through `ex`); core p starts with
    x[p]. Double buffering (round k uses slot k % 2) keeps a slot's reuse two barriers after its last read."""
    _, f = x.shape
    pid = nl.program_id(0)
    other = 1 - pid
    slots = 2 if double_buffer else 1
    ex = nl.ndarray((slots * 2, f), nl.float32, buffer=nl.shared_hbm)
    out = nl.ndarray((2, f), nl.float32, buffer=nl.shared_hbm)
    acc = _load(x[pid:pid + 1, :], 1, f)
    for k in range(rounds):
        s = (k % slots) * 2
        nisa.dma_copy(dst=ex[s + pid:s + pid + 1, :], src=acc)
        nisa.core_barrier(data=ex, cores=(0, 1))
        theirs = _load(ex[s + other:s + other + 1, :], 1, f)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=theirs, op=nl.add)
    nisa.dma_copy(dst=out[pid:pid + 1, :], src=acc)
    return out


def _ring_reference(x, rounds):
    a, b = x[0].astype(np.float32), x[1].astype(np.float32)
    for _ in range(rounds):
        a, b = a + b, b + a
    return np.stack([a, b])


@pytest.mark.parametrize("rounds", [1, 2, 5])
def test_several_barriers_with_double_buffering(rng, rounds):
    x = rng.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(run(ring_sum, x, rounds, lnc=2).outputs, _ring_reference(x, rounds), rtol=1e-6)


def test_reusing_one_buffer_without_a_second_barrier_is_a_race(rng):
    """Round 2 overwrites the slot the other core read in round 1 with no barrier in between (write after read)."""
    x = rng.standard_normal((2, 16)).astype(np.float32)
    with raises("shared-HBM elements", "no synchronisation"):
        run(ring_sum, x, 2, double_buffer=False, lnc=2)


# ============================================================== bad use


@nki.jit
def barrier_kernel(x, cores=(0, 1), memory="shared", only_core0=False, second_tensor=False):
    n, f = x.shape
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    t = _load(x, n, f)
    if memory == "shared":
        data = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
        if second_tensor and nl.program_id(0) == 1:
            data = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    elif memory == "private":
        data = nl.ndarray((n, f), nl.float32, buffer=nl.private_hbm)
    else:
        data = t
    if not only_core0 or nl.program_id(0) == 0:
        nisa.core_barrier(data=data, cores=cores)
    if nl.program_id(0) == 0:
        nisa.dma_copy(dst=out, src=t)
    return out


def test_needs_lnc2(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with raises("core_barrier", "LNC=2", "LNC=1"):
        run(barrier_kernel, x, lnc=1)
    with use_target("trn1"), raises("core_barrier", "NeuronCore-v3", "trn1"):
        run(barrier_kernel, x, lnc=1)


@pytest.mark.parametrize("cores", [(0,), (1, 0), (0, 1, 2), "01", (0, True)])
def test_cores_must_be_0_1(rng, cores):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with raises("core_barrier", "'cores'", "(0, 1)"):
        run(barrier_kernel, x, cores=cores, lnc=2)


@pytest.mark.parametrize("memory", ["private", "sbuf"])
def test_data_must_be_shared_hbm(rng, memory):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with raises("core_barrier", "'data'", "shared_hbm"):
        run(barrier_kernel, x, memory=memory, lnc=2)


def test_a_core_that_never_reaches_the_barrier_is_a_deadlock(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with raises("program 0 waits at core barrier #0", "program 1 finished", "deadlock"):
        run(barrier_kernel, x, only_core0=True, lnc=2)


def test_both_cores_must_name_the_same_tensor(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with raises("core_barrier", "same shared-HBM tensor"):
        run(barrier_kernel, x, second_tensor=True, lnc=2)


@nki.jit
def fails_on_core1(x):
    n, f = x.shape
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    t = _load(x, n, f)
    if nl.program_id(0) == 1:
        nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=1.0, op1=nl.add)   # op1 without operand1
    nisa.core_barrier(data=out, cores=(0, 1))
    return out


def test_an_error_on_one_core_is_reported_not_a_hang(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    with pytest.raises(Exception) as info:
        run(fails_on_core1, x, lnc=2)
    assert "tensor_scalar" in str(info.value)


# ============================================================== cost


@nki.jit
def unequal_work(x, extra):
    """Core 0 does `extra` more VectorE ops than core 1 before the barrier, then both copy the same tile out."""
    n, f = x.shape
    pid = nl.program_id(0)
    ex = nl.ndarray((2, n, f), nl.float32, buffer=nl.shared_hbm)
    t = _load(x, n, f)
    for _ in range(extra if pid == 0 else 0):      # a test-only divergence: the cores' traces differ in length
        nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=1.0)
    nisa.dma_copy(dst=ex[pid], src=t)
    nisa.core_barrier(data=ex, cores=(0, 1))
    u = _load(ex[1 - pid], n, f)
    out = nl.ndarray((2, n, f), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out[pid], src=u)
    return out


def test_the_faster_core_waits_for_the_slower_one(rng):
    x = rng.standard_normal((128, 512)).astype(np.float32)
    res = run(unequal_work, x, 40, lnc=2)
    p = params_for(get_target())
    alone = [model_trace(tr) for tr in res.traces]          # each core as if the other arrived with it
    assert alone[0].total_us > alone[1].total_us + 10       # 40 [128, 512] fp32 VectorE ops
    together = model_launches([res]).launches[0].cores
    # after the barrier both cores do the same work, starting core_barrier_us after the slower one arrived
    assert together[1].total_us == pytest.approx(together[0].total_us, rel=1e-9)
    assert together[0].total_us == pytest.approx(alone[0].total_us, rel=1e-9)
    bar0 = [e for e in model_trace(res.traces[0], timeline=True).timeline if e[1] == "core_barrier"][0]
    assert bar0[5] - bar0[4] == pytest.approx(p.core_barrier_us)


def test_later_reads_of_data_wait_for_the_release(rng):
    x = rng.standard_normal((128, 512)).astype(np.float32)
    res = run(unequal_work, x, 0, lnc=2)
    tl = model_trace(res.traces[1], timeline=True).timeline
    bar = [e for e in tl if e[1] == "core_barrier"][0]
    after = [e for e in tl if e[0] > bar[0]]
    assert after and after[0][4] >= bar[5]                  # the read of `ex` waits for the release


# ============================================================== with collectives


@nki.jit
def tp_then_cores(x, replica_group):
    """All-reduce over the ranks (each core its own half of the rows), then each core adds the other core's
    half of the reduced rows to its own through a core barrier."""
    n, f = x.shape
    half = n // 2
    pid = nl.program_id(0)
    part = _load(x[pid * half:(pid + 1) * half, :], half, f)
    total = nl.ndarray((half, f), nl.float32, buffer=nl.sbuf)
    nki.collectives.all_reduce(srcs=[part], dsts=[total], replica_group=replica_group, op=nl.add)
    ex = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=ex[pid * half:(pid + 1) * half, :], src=total)
    nisa.core_barrier(data=ex, cores=(0, 1))
    theirs = _load(ex[(1 - pid) * half:(2 - pid) * half, :], half, f)
    nisa.tensor_tensor(dst=total, data1=total, data2=theirs, op=nl.add)
    out = nl.ndarray((n, f), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out[pid * half:(pid + 1) * half, :], src=total)
    return out


def test_ranks_at_lnc2_use_collectives_and_the_barrier_together(rng):
    tp, n, f = 4, 8, 16
    xs = [rng.standard_normal((n, f)).astype(np.float32) for _ in range(tp)]
    group = ReplicaGroup([list(range(tp))])
    with record_launches() as launches:
        res = run_ranks(tp_then_cores, world_size=tp, per_rank_inputs=[((x,), {"replica_group": group}) for x in xs],
                        lnc=2)
    s = np.sum(xs, axis=0, dtype=np.float32)
    both = s[:n // 2] + s[n // 2:]
    for out in res.outputs:
        np.testing.assert_allclose(out, np.concatenate([both, both]), rtol=1e-5, atol=1e-5)
    assert len(launches) == 1 and len(res.traces) == 2 * tp
    assert model_launches([res]).device_us > 0
