"""`nisa.sendrecv` on the emulator: the two cores of an LNC=2 launch swap SBUF tiles.

Semantics checked (isa stub docstring, NKI 0.6/0.7, `nki/api/nki/isa/__init__.py` of aws-neuron-sdk): NeuronCore-v3+
and LNC=2 only; `src` and `dst` in SBUF with the same dtype and shape; ranks 0 or 1 (each core names the other);
`pipe_id` groups exchanges; `dma_engine.gpsimd_dma` allows at most 1024 / 512 / 256 bytes per partition for
32- / 16- / 8-bit types. Expected values are computed here with NumPy from the inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import raises
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.backend import nki, nisa, nl
from nki_kernels.emulator import run, use_target
from nki_kernels.emulator.costmodel import model_launches, model_trace, params_for
from nki_kernels.emulator.lnc import LNC_ENV
from nki_kernels.emulator.targets import get_target


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(LNC_ENV, raising=False)


MODES = {"dma": nisa.dma_engine.dma, "gpsimd_dma": nisa.dma_engine.gpsimd_dma}
DTYPES = {"float32": nl.float32, "bfloat16": nl.bfloat16, "int8": nl.int8}


@nki.jit
def swap(x, mode="dma", dtype="float32", scale=3.0, pipe_id=0, dst_dtype=None, dst_cols=None,
         to_rank=None, from_rank=None, dst_memory="sbuf"):
    """Core p loads x[p], multiplies it by (p + 1) * scale, sends it to the other core; out[p] = what it got."""
    _, rows, cols = x.shape
    dt = DTYPES[dtype]
    pid = nl.program_id(0)
    out = nl.ndarray((2, rows, cols), dt, buffer=nl.shared_hbm)
    src = nl.ndarray((rows, cols), dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=src, src=x[pid])
    if dtype != "int8":
        nisa.tensor_scalar(dst=src, data=src, op0=nl.multiply, operand0=float(pid + 1) * scale)
    ddt = DTYPES[dst_dtype] if dst_dtype else dt
    dst = nl.ndarray((rows, dst_cols or cols), ddt, buffer=nl.psum if dst_memory == "psum" else nl.sbuf)
    other = 1 - pid
    nisa.sendrecv(src=src, dst=dst, send_to_rank=other if to_rank is None else to_rank,
                  recv_from_rank=other if from_rank is None else from_rank, pipe_id=pipe_id,
                  dma_engine=MODES[mode])
    nisa.dma_copy(dst=out[pid], src=dst)
    return out


def _expected(x, scale, np_dtype):
    got = [x[1].astype(np.float32) * np.float32(2 * scale), x[0].astype(np.float32) * np.float32(scale)]
    return np.stack(got).astype(np_dtype)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 128), cols=st.integers(1, 256), mode=st.sampled_from(sorted(MODES)),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**31 - 1))
def test_each_core_receives_the_other_cores_tile(rows, cols, mode, dtype, seed):
    import ml_dtypes
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    x = np.random.default_rng(seed).standard_normal((2, rows, cols)).astype(np_dtype)
    out = run(swap, x, mode=mode, dtype=dtype, lnc=2).outputs
    np.testing.assert_array_equal(out.astype(np.float32), _expected(x, 3.0, np_dtype).astype(np.float32))


def test_int8_tiles_are_swapped_bit_exactly(rng):
    x = rng.integers(-128, 128, size=(2, 16, 256)).astype(np.int8)
    out = run(swap, x, mode="gpsimd_dma", dtype="int8", lnc=2).outputs
    np.testing.assert_array_equal(out, x[::-1])


@nki.jit
def ring(x, rounds, pipes=(0,)):
    """Each round both cores add the other core's running tile to their own (sendrecv on pipe `pipes[k % n]`)."""
    _, rows, cols = x.shape
    pid = nl.program_id(0)
    acc = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=acc, src=x[pid])
    for k in range(rounds):
        theirs = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
        nisa.sendrecv(src=acc, dst=theirs, send_to_rank=1 - pid, recv_from_rank=1 - pid,
                      pipe_id=pipes[k % len(pipes)], dma_engine=nisa.dma_engine.gpsimd_dma)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=theirs, op=nl.add)
    out = nl.ndarray((2, rows, cols), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out[pid], src=acc)
    return out


@pytest.mark.parametrize("pipes", [(0,), (0, 1, 2)])
def test_repeated_exchanges_pair_in_program_order(rng, pipes):
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    out = run(ring, x, 5, pipes=pipes, lnc=2).outputs
    a, b = x[0], x[1]
    for _ in range(5):
        a, b = a + b, b + a
    np.testing.assert_allclose(out, np.stack([a, b]), rtol=1e-6)


# ============================================================== constraints


def test_needs_lnc2_and_neuroncore_v3(rng):
    x = rng.standard_normal((2, 4, 4)).astype(np.float32)
    with raises("sendrecv", "LNC=2", "LNC=1"):
        run(swap, x, lnc=1)
    with use_target("trn1"), raises("sendrecv", "NeuronCore-v3", "trn1"):
        run(swap, x, lnc=1)


@pytest.mark.parametrize("dtype,cols,ok", [("float32", 256, True), ("float32", 257, False),
                                           ("bfloat16", 256, True), ("bfloat16", 257, False),
                                           ("int8", 256, True), ("int8", 257, False)])
def test_gpsimd_dma_size_limit_per_partition(rng, dtype, cols, ok):
    x = rng.standard_normal((2, 4, cols)).astype(np.float32)
    if dtype == "int8":
        x = rng.integers(-5, 5, size=(2, 4, cols)).astype(np.int8)
    if ok:
        run(swap, x, mode="gpsimd_dma", dtype=dtype, lnc=2)
        return
    limit = {"float32": "1024", "bfloat16": "512", "int8": "256"}[dtype]
    with raises("sendrecv", "'src'", "gpsimd_dma", f"limit of {limit} bytes per partition"):
        run(swap, x, mode="gpsimd_dma", dtype=dtype, lnc=2)
    run(swap, x, mode="dma", dtype=dtype, lnc=2)                # the standard DMA mode has no such limit


def test_src_and_dst_must_match(rng):
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with raises("sendrecv", "'dst'", "dtype"):
        run(swap, x, dst_dtype="bfloat16", lnc=2)
    with raises("sendrecv", "'dst'", "shape"):
        run(swap, x, dst_cols=4, lnc=2)
    with raises("sendrecv", "'dst'", "SBUF"):
        run(swap, x, dst_memory="psum", lnc=2)


@pytest.mark.parametrize("kw,role", [({"to_rank": 2}, "send_to_rank"), ({"from_rank": -1}, "recv_from_rank"),
                                     ({"to_rank": True}, "send_to_rank")])
def test_ranks_must_be_0_or_1(rng, kw, role):
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with raises("sendrecv", f"'{role}'", "0 or 1"):
        run(swap, x, lnc=2, **kw)


def test_a_core_must_name_the_other_core(rng):
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with raises("sendrecv", "'send_to_rank'", "other core"):
        run(swap, x, to_rank=0, from_rank=1, lnc=2)            # program 0 names itself


@nki.jit
def mismatched(x, what):
    _, rows, cols = x.shape
    pid = nl.program_id(0)
    t = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[pid])
    u = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
    out = nl.ndarray((2, rows, cols), nl.float32, buffer=nl.shared_hbm)
    if what == "pipe":
        nisa.sendrecv(src=t, dst=u, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=pid)
    elif what == "barrier" and pid == 1:
        nisa.core_barrier(data=out, cores=(0, 1))
    elif what == "barrier" or what == "missing" and pid == 0:
        nisa.sendrecv(src=t, dst=u, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0)
    elif what == "shape":
        v = nl.ndarray((rows, cols * (pid + 1)), nl.float32, buffer=nl.sbuf)
        w = nl.ndarray((rows, cols * (pid + 1)), nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=v, value=0.0)
        nisa.sendrecv(src=v, dst=w, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0)
    nisa.dma_copy(dst=out[pid], src=t)
    return out


@pytest.mark.parametrize("what,fragments", [
    ("pipe", ("sendrecv", "pipe_id=0", "pipe_id=1", "same order")),
    ("barrier", ("core barrier #0", "sendrecv #0", "same order")),
    ("missing", ("program 0 waits at sendrecv #0", "program 1 finished", "deadlock")),
    ("shape", ("sendrecv", "'dst'", "both cores' tiles must match")),
])
def test_both_cores_must_issue_matching_exchanges(rng, what, fragments):
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    with raises(*fragments):
        run(mismatched, x, what, lnc=2)


# ============================================================== cost


@nki.jit
def late_core(x, extra, mode="gpsimd_dma"):
    """Core 0 does `extra` VectorE ops before the exchange; then each copies what it received out."""
    _, rows, cols = x.shape
    pid = nl.program_id(0)
    t = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[pid])
    for _ in range(extra if pid == 0 else 0):      # a test-only divergence: the cores' traces differ
        nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=1.0)
    u = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
    nisa.sendrecv(src=t, dst=u, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0, dma_engine=MODES[mode])
    out = nl.ndarray((2, rows, cols), nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out[pid], src=u)
    return out


def _sync_entry(trace):
    return [e for e in model_trace(trace, timeline=True).timeline if e[1] == "sendrecv"][0]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sendrecv_cost_is_its_latency_plus_its_bytes(rng, mode):
    rows, cols = 128, 64
    x = rng.standard_normal((2, rows, cols)).astype(np.float32)
    res = run(late_core, x, 0, mode=mode, lnc=2)
    p, t = params_for(get_target()), get_target()
    stream = rows * cols * 4 / (t.dma_bytes_per_ns_per_queue * 1e3)
    want = p.sendrecv_gpsimd_us + stream if mode == "gpsimd_dma" else p.core_barrier_us + p.dma_fixed_us + stream
    e = _sync_entry(res.traces[0])
    assert e[5] - e[4] == pytest.approx(want)
    # the copy out reads dst: it starts after the release
    tl = model_trace(res.traces[0], timeline=True).timeline
    assert [f for f in tl if f[0] > e[0]][0][4] >= e[5]


def test_gpsimd_dma_is_cheaper_than_the_standard_dma_mode(rng):
    x = rng.standard_normal((2, 4, 256)).astype(np.float32)
    fast = model_launches([run(late_core, x, 0, mode="gpsimd_dma", lnc=2)]).device_us
    slow = model_launches([run(late_core, x, 0, mode="dma", lnc=2)]).device_us
    p = params_for(get_target())
    assert slow - fast == pytest.approx(p.core_barrier_us + p.dma_fixed_us - p.sendrecv_gpsimd_us, rel=1e-6)


def test_the_earlier_core_waits_for_the_later_one(rng):
    x = rng.standard_normal((2, 128, 256)).astype(np.float32)
    res = run(late_core, x, 80, lnc=2)
    alone = [model_trace(tr) for tr in res.traces]
    assert alone[0].total_us > alone[1].total_us + 10
    together = model_launches([res]).launches[0].cores
    assert together[1].total_us == pytest.approx(together[0].total_us, rel=1e-9)


@nki.jit
def two_pipes(x):
    """Two exchanges on different pipe_ids, issued back to back: they overlap (the isa stub: different pipes
    progress independently)."""
    _, rows, cols = x.shape
    pid = nl.program_id(0)
    out = nl.ndarray((2, 2, rows, cols), nl.float32, buffer=nl.shared_hbm)
    for i in range(2):
        t = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[pid])
        u = nl.ndarray((rows, cols), nl.float32, buffer=nl.sbuf)
        nisa.sendrecv(src=t, dst=u, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=i,
                      dma_engine=nisa.dma_engine.gpsimd_dma)
        nisa.dma_copy(dst=out[pid, i], src=u)
    return out


def test_exchanges_on_different_pipes_overlap(rng):
    x = rng.standard_normal((2, 4, 64)).astype(np.float32)
    res = run(two_pipes, x, lnc=2)
    np.testing.assert_array_equal(res.outputs[0], np.stack([x[1], x[1]]))
    np.testing.assert_array_equal(res.outputs[1], np.stack([x[0], x[0]]))
    tl = model_trace(res.traces[0], timeline=True).timeline
    ex = [e for e in tl if e[1] == "sendrecv"]
    assert len(ex) == 2 and ex[1][4] < ex[0][5]             # the second starts before the first is released
