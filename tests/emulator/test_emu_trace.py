"""The instruction trace: what it records, that it holds no tensors, and what it costs per instruction."""
from __future__ import annotations

import gc
import time
from dataclasses import fields

import numpy as np
from emu_kit import BF16, hbm_out, jit, kernel_run, nisa, nl, rnd, run, sb_load

from nki_kernels.emulator import compiler_lnc, record_launches

# Per-instruction emulation + tracing cost budget in CPU time (measured ~25-30 us on the 2-core dev box for
# (128, 64) fp32 tiles; the bound leaves a wide margin).
_MAX_US_PER_INSTR = 250.0


def test_trace_records_engine_operands_and_bytes(rng):
    a, b = rnd(rng, (64, 32), BF16), rnd(rng, (64, 100), BF16)

    def k(x, y):
        xs, ys = sb_load(x), sb_load(y)
        ps = nl.ndarray((32, 100), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, xs, ys)
        return hbm_out(ps)
    r = kernel_run(k, a, b)
    names = [(i.name, i.engine) for i in r.trace]
    assert names == [("dma_copy", "dma"), ("dma_copy", "dma"), ("nc_matmul", "pe"), ("tensor_copy", "dve"),
                     ("dma_copy", "dma")]
    mm = r.trace[2]
    assert mm.meta["K"] == 64 and mm.meta["M"] == 32 and mm.meta["N"] == 100
    st_acc, mv_acc = mm.reads
    assert (st_acc.buffer, st_acc.dtype, st_acc.shape, st_acc.partitions, st_acc.elems_pp) == \
        ("sbuf", "bfloat16", (64, 32), 64, 32)
    assert mv_acc.nbytes == 64 * 100 * 2
    assert mm.writes[0].buffer == "psum" and mm.writes[0].nbytes == 32 * 100 * 4
    load = r.trace[0]
    assert load.reads[0].buffer == "hbm" and load.meta["bytes"] == 64 * 32 * 2
    assert load.reads[0].contig_bytes == 64 * 32 * 2          # whole rows: one contiguous run
    assert [i.idx for i in r.trace] == list(range(5))


def test_trace_holds_no_tensors(rng):
    def k(x):
        t = sb_load(x)
        return hbm_out(t)
    r = kernel_run(k, rnd(rng, (4, 4)))
    gc.collect()
    from nki_kernels.emulator.tensor import Storage, Tensor
    for ins in r.trace:
        for acc in ins.reads + ins.writes:
            assert not any(isinstance(getattr(acc, f.name), (Tensor, Storage)) for f in fields(acc))
        assert not any(isinstance(v, (Tensor, Storage)) for v in ins.meta.values())


def test_record_launches_collects_run_results(rng):
    @jit
    def k(x):
        return hbm_out(sb_load(x))
    x = rnd(rng, (4, 4))
    with record_launches() as runs, compiler_lnc(1):
        k(x)
        run(k, x, lnc=1)
    assert len(runs) == 2 and all(len(r.traces) == 1 for r in runs)
    np.testing.assert_array_equal(runs[1].outputs, x)


def test_per_instruction_overhead_is_small():
    n_iter = 500

    def k(a):
        x = sb_load(a)
        y = nl.ndarray((128, 64), nl.float32, buffer=nl.sbuf)
        for _ in range(n_iter):
            nisa.tensor_scalar(dst=y, data=x, op0=nl.multiply, operand0=0.5)
            nisa.tensor_tensor(dst=x, data1=y, data2=x, op=nl.add)
            nisa.activation(dst=y, op=nl.tanh, data=x)
            t = nl.ndarray((128, 64), nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=t, src=y)
        return hbm_out(x)
    a = np.ones((128, 64), np.float32)
    kernel_run(k, a)                           # warm-up
    t0 = time.process_time()                   # CPU time of this process: robust to a loaded machine
    r = kernel_run(k, a)
    us = (time.process_time() - t0) * 1e6 / len(r.trace)
    print(f"emulator cost: {us:.1f} us per instruction over {len(r.trace)} instructions")
    assert len(r.trace) == 4 * n_iter + 2
    assert us < _MAX_US_PER_INSTR
