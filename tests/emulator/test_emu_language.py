"""The nl.* tile functions against NumPy statements of their semantics."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import BF16, hbm_out, kernel_run, nl, on_chip, raises, rnd


def test_unary_tile_functions(rng):
    x = rng.uniform(0.1, 3, (16, 12)).astype(np.float32)
    fns = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sqrt": np.sqrt, "rsqrt": lambda v: 1 / np.sqrt(v),
           "reciprocal": lambda v: 1 / v, "square": np.square, "relu": lambda v: np.maximum(v, 0),
           "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "silu": lambda v: v / (1 + np.exp(-v)), "abs": np.abs}
    for name, ref in fns.items():
        out = on_chip(lambda t, name=name: getattr(nl, name)(t), x)
        assert out.shape == x.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, ref(x.astype(np.float64)), rtol=2e-6, err_msg=name)
    outb = on_chip(lambda t: nl.exp(t, dtype=nl.bfloat16), x)
    assert outb.dtype == BF16
    np.testing.assert_array_equal(outb, np.exp(x).astype(BF16))


def test_binary_tile_functions_and_scalars(rng):
    x, y = rnd(rng, (8, 10)), rnd(rng, (8, 10))

    def step(a, b):
        return (nl.add(a, b), nl.subtract(a, b), nl.multiply(a, 2.0), nl.subtract(1.0, a),
                nl.maximum(a, b), nl.minimum(a, 0.0), nl.greater(a, b), nl.equal(a, a))
    outs = on_chip(step, x, y)
    refs = (x + y, x - y, x * 2, 1 - x, np.maximum(x, y), np.minimum(x, 0), (x > y).astype(np.float32),
            np.ones_like(x))
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)


def test_where_broadcast_to_and_copy(rng):
    x, y = rnd(rng, (8, 6)), rnd(rng, (8, 6))
    row = rnd(rng, (1, 6))
    col = rnd(rng, (8, 1))

    def step(a, b, r, c):
        cond = nl.greater(a, b)
        return (nl.where(cond, a, b), nl.where(cond, a, -5.0), nl.broadcast_to(r, (8, 6)),
                nl.broadcast_to(c, (8, 6)), nl.copy(a, dtype=nl.bfloat16))
    w, w2, br, bc, cp = on_chip(step, x, y, row, col)
    np.testing.assert_array_equal(w, np.maximum(x, y))
    np.testing.assert_array_equal(w2, np.where(x > y, x, -5.0))
    np.testing.assert_array_equal(br, np.broadcast_to(row, (8, 6)))
    np.testing.assert_array_equal(bc, np.broadcast_to(col, (8, 6)))
    np.testing.assert_array_equal(cp, x.astype(BF16))
    with raises("nl.broadcast_to", "(8, 6)", "(8, 7)"):
        on_chip(lambda a: nl.broadcast_to(a, (8, 7)), x)


def test_reductions(rng):
    x = rnd(rng, (8, 5, 6))

    def step(a):
        return (nl.sum(a, axis=(1, 2)), nl.max(a, axis=2, keepdims=True), nl.min(a, axis=-1),
                nl.mean(a, axis=2, dtype=nl.float32))
    s, mx, mn, me = on_chip(step, x)
    np.testing.assert_allclose(s, x.astype(np.float64).sum((1, 2)), rtol=1e-5, atol=1e-5)
    assert mx.shape == (8, 5, 1)
    np.testing.assert_array_equal(mx, x.max(2, keepdims=True))
    np.testing.assert_array_equal(mn, x.min(2))
    np.testing.assert_allclose(me, x.astype(np.float64).mean(2), rtol=1e-5, atol=1e-6)


def test_nl_softmax_and_rms_norm(rng):
    x = rnd(rng, (16, 40), scale=4.0)
    w = rnd(rng, (1, 40))

    def step(a, b):
        return nl.softmax(a, axis=1), nl.rms_norm(a, b, axis=1, n=None, epsilon=1e-5)
    sm, rn = on_chip(step, x, w)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(1, keepdims=True))
    np.testing.assert_allclose(sm, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rn, x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5) * w, rtol=1e-5)


def test_nl_matmul_transpose_load_store(rng):
    a, b = rnd(rng, (40, 30), BF16), rnd(rng, (40, 50), BF16)

    def k(x, y):
        xs, ys = nl.load(x), nl.load(y)
        ps = nl.matmul(xs, ys, transpose_x=True)                 # [30, 50] fp32 PSUM
        assert ps.buffer is nl.psum and ps.dtype == nl.float32
        prod = nl.copy(ps, dtype=nl.float32)
        tp = nl.transpose(xs)                                     # [30, 40] PSUM, bf16
        tps = nl.copy(tp)
        out1 = nl.ndarray((30, 50), nl.float32, buffer=nl.shared_hbm)
        nl.store(out1, prod)
        return out1, hbm_out(tps)
    p, t = kernel_run(k, a, b).outputs
    np.testing.assert_allclose(p, a.astype(np.float64).T @ b.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t, a.T)


def test_creation_functions():
    def k(a):
        z = nl.zeros((4, 3), nl.float32)
        o = nl.ones((4, 3), nl.int32)
        f = nl.full((4, 3), 2.5, nl.bfloat16)
        zl = nl.zeros_like(f)
        h = nl.full((2, 2), 7.0, nl.float32, buffer=nl.shared_hbm)
        return hbm_out(z), hbm_out(o), hbm_out(f), hbm_out(zl), h
    z, o, f, zl, h = kernel_run(k, np.zeros((1, 1), np.float32)).outputs
    assert (z == 0).all() and (o == 1).all() and o.dtype == np.int32
    assert (f.astype(np.float32) == 2.5).all() and f.dtype == BF16 and zl.dtype == BF16 and (zl == 0).all()
    assert (h == 7.0).all()


def test_ranges_tile_size_and_ds():
    assert list(nl.affine_range(3)) == list(nl.sequential_range(3)) == list(nl.static_range(3)) == [0, 1, 2]
    assert list(nl.affine_range(2, 7, 2)) == [2, 4, 6]
    assert (nl.tile_size.pmax, nl.tile_size.gemm_stationary_fmax, nl.tile_size.gemm_moving_fmax,
            nl.tile_size.psum_fmax, nl.tile_size.psum_num_banks) == (128, 128, 512, 512, 8)
    assert nl.ds(256, 128) == slice(256, 384)


@pytest.mark.parametrize("name", ["divide", "mod", "fmod"])
def test_unsupported_functions_fail_clearly(rng, name):
    with raises(f"nl.{name}", "not"):
        on_chip(lambda a: getattr(nl, name)(a, a), rnd(rng, (2, 2)))


def test_rsqrt_tile_function_rejects_psum(rng):
    def step(a):
        ps = nl.matmul(a, a, transpose_x=True)
        return nl.rsqrt(ps)
    with raises("nl.rsqrt", "psum", "gpsimd"):
        on_chip(step, rnd(rng, (4, 4)))


def test_nl_functions_emit_traced_instructions(rng):
    def k(a):
        t = nl.load(a)
        e = nl.exp(t)
        s = nl.sum(e, axis=1, keepdims=True)
        out = nl.ndarray((4, 1), nl.float32, buffer=nl.shared_hbm)
        nl.store(out, s)
        return out
    r = kernel_run(k, rnd(rng, (4, 8)))
    assert [(i.name, i.engine) for i in r.trace] == [("dma_copy", "dma"), ("activation", "act"),
                                                     ("tensor_reduce", "dve"), ("dma_copy", "dma")]


def test_power_tiles_run_on_gpsimd_and_scalar_power_is_rejected(rng):
    x = rng.uniform(0.5, 2, (8, 6)).astype(np.float32)
    e = rng.uniform(-2, 2, (8, 6)).astype(np.float32)

    def k(a, b):
        p = nl.power(nl.load(a), nl.load(b))
        return hbm_out(p)
    r = kernel_run(k, x, e)
    np.testing.assert_allclose(r.outputs, x.astype(np.float64) ** e, rtol=1e-6)
    assert [i.engine for i in r.trace if i.name == "tensor_tensor"] == ["pool"]
    with raises("nl.power", "scalar operand", "not supported"):
        on_chip(lambda t: nl.power(t, 2.0), x)
