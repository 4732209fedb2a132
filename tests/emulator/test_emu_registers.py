"""Virtual registers and register-bounded compiled loops (NKI 0.7: nisa.register_alloc / move / load / store,
nl.fori_loop / nl.while_loop with VirtualRegister bounds, .ap(scalar_offset=register)): a trip count and a DMA
offset read from data on the device, a register opaque to Python (no value-dependent tracing), the trace's
record of which loops had register bounds, and the checks."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import hbm_out, kernel_run, nisa, nl, raises, rnd, sb_load

from nki_kernels.testing import program_signature


@pytest.mark.parametrize("lo, hi", [(0, 4), (1, 3), (2, 2), (3, 1)])
def test_fori_loop_with_register_bounds_and_offsets(rng, lo, hi):
    x = rnd(rng, (1, 32))

    # a [1, 4, 8] SBUF base: scalar_offset j on dim 1 moves by 8 elements (the product of the dims after it)
    def k3(x_hbm, b_hbm):
        out = nl.ndarray((1, 32), nl.float32, buffer=nl.shared_hbm)
        x_sb = nl.ndarray((1, 4, 8), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb, src=x_hbm.reshape((1, 4, 8)))
        acc = nl.ndarray((1, 4, 8), nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=acc, value=0.0)
        b_sb = sb_load(b_hbm)
        r_lo, r_hi = nisa.register_alloc(), nisa.register_alloc()
        nisa.register_load(r_lo, b_sb[0:1, 0:1])
        nisa.register_load(r_hi, b_sb[0:1, 1:2])

        def body(j):
            with pytest.raises(TypeError, match="known only on the device"):
                bool(j)
            with pytest.raises(TypeError):
                range(j)
            row = nl.ndarray((1, 8), nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=row, src=x_sb.ap(pattern=[[32, 1], [1, 8]], offset=0, scalar_offset=j, indirect_dim=1))
            nisa.tensor_scalar(dst=row, data=row, op0=nl.multiply, operand0=2.0)
            nisa.dma_copy(dst=acc.ap(pattern=[[32, 1], [1, 8]], offset=0, scalar_offset=j, indirect_dim=1), src=row)
        nl.fori_loop(r_lo, r_hi, body)
        nisa.dma_copy(dst=out, src=acc.reshape((1, 32)))
        return out

    res = kernel_run(k3, x, np.array([[lo, hi]], np.int32))
    want = np.zeros((4, 8), np.float32)
    for j in range(lo, hi):
        want[j] = 2 * x.reshape(4, 8)[j]
    np.testing.assert_array_equal(res.outputs.reshape(4, 8), want)
    loops = res.trace.loops
    assert len(loops) == 1 and loops[0]["dynamic"] and loops[0]["trips"] == max(0, hi - lo)
    assert [i.name for i in res.trace if i.name.startswith("register")] == ["register_load", "register_load"]
    body = [i for i in res.trace if "loop" in i.meta]
    assert len(body) == 3 * max(0, hi - lo) and all(i.reads[0].dynamic or i.writes[0].dynamic or
                                                   i.name == "tensor_scalar" for i in body)


def test_program_signature_folds_register_loops(rng):
    """Different trip counts (0, 1, 3) give one compiled program; a body that changed between iterations would be
    reported."""
    x = rnd(rng, (1, 32))

    def k(x_hbm, b_hbm):
        out = nl.ndarray((1, 32), nl.float32, buffer=nl.shared_hbm)
        t = sb_load(x_hbm)
        b_sb = sb_load(b_hbm)
        n = nisa.register_alloc()
        nisa.register_load(n, b_sb[0:1, 0:1])

        def body(i):
            tmp = nl.ndarray((1, 32), nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=tmp, data=t, op0=nl.multiply, operand0=0.5)
            nisa.tensor_copy(dst=t, src=tmp)
        nl.fori_loop(0, n, body)
        nisa.dma_copy(dst=out, src=t)
        return out
    sigs = []
    for n in (0, 1, 3):
        res = kernel_run(k, x, np.array([[n]], np.int32))
        np.testing.assert_allclose(res.outputs, x * 0.5 ** n, rtol=1e-6)
        sigs.append(program_signature([res]))
    assert sigs[0] == sigs[1] == sigs[2]


def test_register_move_store_and_while_loop(rng):
    def k(x_hbm):
        out = nl.ndarray((1, 1), nl.int32, buffer=nl.shared_hbm)
        count = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=count, value=4)
        r = nisa.register_alloc()
        nisa.register_load(r, count)
        total = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=total, value=0)

        def body(c):
            nisa.tensor_scalar(dst=total, data=total, op0=nl.add, operand0=3)
            nisa.tensor_scalar(dst=count, data=count, op0=nl.subtract, operand0=1)
            nisa.register_load(c, count)
            return c
        nl.while_loop(r, body)
        r2 = nisa.register_alloc(7)
        r3 = nisa.register_alloc()
        nisa.register_move(r3, r2)
        s = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)
        nisa.register_store(s, r3)
        nisa.tensor_tensor(dst=s, data1=s, data2=total, op=nl.add)
        nisa.dma_copy(dst=out, src=s)
        return out
    res = kernel_run(k, rnd(rng, (1, 1)))
    assert int(res.outputs.reshape(-1)[0]) == 7 + 12
    assert res.trace.loops[0]["dynamic"] and res.trace.loops[0]["trips"] == 4


def test_register_checks(rng):
    x = rnd(rng, (2, 2))

    def uninitialised(a):
        nl.fori_loop(0, nisa.register_alloc(), lambda i: None)
        return hbm_out(sb_load(a))
    with raises("VirtualRegister", "read before any value"):
        kernel_run(uninitialised, x)

    def float_src(a):
        nisa.register_load(nisa.register_alloc(), sb_load(a)[0:1, 0:1])
        return hbm_out(sb_load(a))
    with raises("register_load", "src", "integer"):
        kernel_run(float_src, x)

    def two_elements(a):
        t = nl.ndarray((1, 2), nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=t, value=1)
        nisa.register_load(nisa.register_alloc(), t)
        return hbm_out(sb_load(a))
    with raises("register_load", "src", "exactly one element"):
        kernel_run(two_elements, x)

    def write_induction(a):
        nl.fori_loop(0, nisa.register_alloc(2), lambda i: nisa.register_move(i, 5))
        return hbm_out(sb_load(a))
    with raises("register_move", "induction register"):
        kernel_run(write_induction, x)

    with raises("VirtualRegister", "32-bit register"):
        kernel_run(lambda a: nisa.register_alloc(2 ** 40) or hbm_out(sb_load(a)), x)
