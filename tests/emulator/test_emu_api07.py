"""NKI 0.7 behaviour of the emulated API: deprecated range helpers are Python's range, tile functions take
exactly their real parameters, compiled loops (nl.fori_loop / nl.while_loop) run and are traced per
iteration, and the ISA calls whose signatures changed behave as the real ones."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from emu_kit import hbm_out, kernel_run, nisa, nl, on_chip, raises, rnd, sb_load
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.emulator import language as nl_mod
from nki_kernels.emulator import use_target
from nki_kernels.emulator.costmodel import model_launches

RANGES = ("affine_range", "sequential_range", "static_range")

# ---------------------------------------------------------------- deprecated range helpers


@pytest.mark.parametrize("helper", RANGES)
@given(a=st.integers(-5, 12), b=st.integers(-5, 12), c=st.integers(1, 4).flatmap(lambda n: st.sampled_from([n, -n])))
def test_range_helpers_are_python_range(helper, a, b, c):
    fn = getattr(nl, helper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert list(fn(a)) == list(range(a))
        assert list(fn(a, b)) == list(range(a, b))
        assert list(fn(a, b, c)) == list(range(a, b, c))
        assert list(fn(a, b, step=c)) == list(range(a, b, c))
        assert list(fn(start=a, stop=b, step=c)) == list(range(a, b, c))
        assert list(fn(a, stop=b)) == list(range(a, b))
        assert list(fn(0, 10, step=3)) == [0, 3, 6, 9]
        with pytest.raises(ValueError):
            fn(0, 10, 0)                      # as range(0, 10, 0)
        with pytest.raises(TypeError):
            fn(0, 10, bogus=1)


@pytest.mark.parametrize("helper", RANGES)
def test_range_helpers_warn_once(helper, monkeypatch):
    monkeypatch.setattr(nl_mod, "_warned", set())
    with pytest.warns(DeprecationWarning, match=f"nl.{helper} is deprecated in NKI 0.7"):
        getattr(nl, helper)(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(getattr(nl, helper)(3)) == [0, 1, 2]        # second use: no warning


def test_dynamic_range_is_gone():
    assert not hasattr(nl, "dynamic_range")


# ---------------------------------------------------------------- exact parameters


def test_tile_functions_take_exactly_their_parameters(rng):
    x = rnd(rng, (4, 8))
    np.testing.assert_allclose(on_chip(lambda a: nl.exp(a, dtype=nl.float32), x), np.exp(x), rtol=1e-6)
    np.testing.assert_allclose(on_chip(lambda a: nl.add(a, a, dtype=nl.float32), x), x + x, rtol=1e-6)
    np.testing.assert_allclose(on_chip(lambda a: nl.add(x=a, y=2.0), x), x + 2.0, rtol=1e-6)
    for call in (lambda a: nl.add(a, a, bogus=1), lambda a: nl.exp(a, None, None), lambda a: nl.add(a),
                 lambda a: nl.exp(a, axis=1), lambda a: nl.load(a, name="t")):
        with pytest.raises(TypeError):
            on_chip(call, x)


def test_load_broadcast_and_num_programs(rng):
    x = rnd(rng, (1, 8))

    def k(a):
        t = nl.load(a)
        b = nl.broadcast_to(t, shape=(4, 8), dtype=nl.bfloat16)
        assert nl.num_programs(axes=0) == 1 and nl.program_id(axis=0) == 0
        return hbm_out(b)
    out = kernel_run(k, x).outputs
    assert out.dtype.name == "bfloat16"
    np.testing.assert_allclose(out.astype(np.float32), np.broadcast_to(x, (4, 8)), rtol=1e-2)


def test_memory_regions_are_an_enum():
    assert nl.hbm is nl.private_hbm and isinstance(nl.sbuf, nl.MemoryRegion)
    assert [m.name for m in nl.MemoryRegion] == ["sbuf", "psum", "private_hbm", "shared_hbm"]
    assert nl.sbuf.on_chip and not nl.shared_hbm.on_chip


def test_nki_tensor_is_made_by_ndarray():
    with raises("NkiTensor", "nl.ndarray"):
        nl.NkiTensor((2, 2), nl.float32, None)


def test_enum_values_are_the_real_ones():
    assert [(m.name, m.value) for m in nisa.dge_mode] == [("unknown", 0), ("swdge", 1), ("hwdge", 2), ("none", 3)]
    assert [(m.name, m.value) for m in nisa.matmul_perf_mode] == [("none", "none"), ("double_row", "double_row")]


def test_affine_select_and_iota_real_order_and_defaults(rng):
    x = rnd(rng, (8, 8))

    def step(a):
        sel = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        # positional, real order: dst, pattern, channel_multiplier, on_true_tile, on_false_value (offset=0)
        nisa.affine_select(sel, [[-1, 8]], 1, a, -5.0, nl.greater_equal)      # keep where p - i >= 0
        pos = nl.ndarray((8, 8), nl.int32, buffer=nl.sbuf)
        nisa.iota(pos, [[1, 8]])                                             # offset=0 by default
        return sel, pos
    sel, pos = on_chip(step, x)
    p, i = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(sel, np.where(p - i >= 0, x, np.float32(-5.0)))
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(8), (8, 8)))


def test_dma_transpose_priority_and_oob_mode(rng):
    x = rnd(rng, (16, 32)).astype(nl.bfloat16)

    def k(a, **kw):
        t = nl.ndarray((32, 16), nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(t, a, None, **kw)
        return hbm_out(t)
    np.testing.assert_array_equal(kernel_run(k, x).outputs, x.T)
    with raises("dma_transpose", "priority", "NeuronCore-v4"):
        kernel_run(k, x, priority=1)
    with use_target("trn3"):
        np.testing.assert_array_equal(kernel_run(k, x, priority=1).outputs, x.T)
    with raises("dma_transpose", "oob_mode", "member"):
        kernel_run(k, x, oob_mode=0)


# ---------------------------------------------------------------- compiled loops


def _accumulate_kernel(x, n_iter, loop):
    """out = x + n_iter (adds 1.0 per iteration of a compiled loop)."""
    out = nl.ndarray(x.shape, nl.float32, buffer=nl.shared_hbm)
    acc = sb_load(x)
    seen = []

    def body(i):
        seen.append(i)
        nisa.tensor_scalar(dst=acc, data=acc, op0=nl.add, operand0=1.0)

    if loop == "fori":
        nl.fori_loop(0, n_iter, body)
    else:
        def while_body(r):
            body(r)
            return r - 1
        nl.while_loop(n_iter, while_body)
    nisa.dma_copy(dst=out, src=acc)
    assert len(seen) == n_iter
    return out


@pytest.mark.parametrize("loop", ["fori", "while"])
@pytest.mark.parametrize("n_iter", [0, 1, 5])
def test_compiled_loops_run_and_trace_each_iteration(rng, loop, n_iter):
    x = rnd(rng, (4, 8))
    res = kernel_run(_accumulate_kernel, x, n_iter=n_iter, loop=loop)
    np.testing.assert_allclose(res.outputs, x + np.float32(n_iter), rtol=1e-6)
    body = [ins for ins in res.trace if "loop" in ins.meta]
    assert [ins.name for ins in body] == ["tensor_scalar"] * n_iter
    kind = "fori_loop" if loop == "fori" else "while_loop"
    assert [ins.meta["loop"] for ins in body] == [((kind, 0, it),) for it in range(n_iter)]


def test_cost_model_charges_the_body_per_iteration(rng):
    x = rnd(rng, (128, 512))
    t = {n: model_launches([kernel_run(_accumulate_kernel, x, n_iter=n, loop="fori")], target="trn2").device_us
         for n in (1, 9, 17)}
    assert t[9] > t[1] and t[17] - t[9] == pytest.approx(t[9] - t[1], rel=0.05)


def test_fori_loop_step_nesting_and_errors(rng):
    x = rnd(rng, (2, 2))
    visits = []

    def k(a):
        t = sb_load(a)

        def inner(j):
            visits.append(j)
            nisa.memset(t, 0.0)
        nl.fori_loop(1, 8, lambda i: nl.fori_loop(0, i, inner, step=3), step=4)   # i = 1, 5
        return hbm_out(t)
    res = kernel_run(k, x)
    assert visits == [0, 0, 3]
    tags = [ins.meta["loop"] for ins in res.trace if "loop" in ins.meta]
    assert tags == [(("fori_loop", 0, 0), ("fori_loop", 1, 0)), (("fori_loop", 0, 1), ("fori_loop", 2, 0)),
                    (("fori_loop", 0, 1), ("fori_loop", 2, 1))]
    for bad in (0, -1, 1.5, True):
        with raises("fori_loop", "step"):
            kernel_run(lambda a: nl.fori_loop(0, 4, lambda i: None, step=bad) or hbm_out(sb_load(a)), x)
    with raises("fori_loop", "upper"):
        kernel_run(lambda a: nl.fori_loop(0, 2.5, lambda i: None) or hbm_out(sb_load(a)), x)
    with raises("while_loop", "condition"):
        kernel_run(lambda a: nl.while_loop("go", lambda r: 0) or hbm_out(sb_load(a)), x)
