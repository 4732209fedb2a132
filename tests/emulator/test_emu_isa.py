"""Every emulated nisa.* instruction against a NumPy statement of its semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from emu_kit import BF16, FP8_E4M3, FP8_E5M2, hbm_out, kernel_run, nisa, nl, on_chip, raises, rnd, sb_load
from hypothesis import given
from hypothesis import strategies as st

# ============================================================== rounding on write


def _bf16_round(x):
    """Round fp32 to bf16 by hand: round-to-nearest-even on the top 16 bits."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (b >> 16) & 1
    r = ((b + 0x7FFF + lsb) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def test_fp32_to_bf16_rounds_to_nearest_even(rng):
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130, 3.0e38, 1.0 + 2 ** -9], np.float32)
    x = np.concatenate([ties, rnd(rng, 122, scale=100.0)]).reshape(128, 1)
    out = on_chip(lambda t: _copy_to(t, nl.bfloat16), x)
    assert out.dtype == BF16
    np.testing.assert_array_equal(out.astype(np.float32), _bf16_round(x))
    assert float(out[0, 0]) == 1.0 and float(out[1, 0]) == 1 + 2 ** -6   # ties to even


def _copy_to(t, dtype, engine=None):
    out = nl.ndarray(t.shape, dtype, buffer=nl.sbuf)
    if engine is None:
        nisa.tensor_copy(dst=out, src=t)
    else:
        nisa.tensor_copy(dst=out, src=t, engine=engine)
    return out


@pytest.mark.parametrize("dtype,nkidt", [(FP8_E4M3, "float8_e4m3"), (FP8_E5M2, "float8_e5m2"),
                                         (np.float16, "float16")])
def test_fp32_to_small_floats_round_like_ml_dtypes(rng, dtype, nkidt):
    x = rnd(rng, (16, 40), scale=3.0)
    out = on_chip(lambda t: _copy_to(t, getattr(nl, nkidt)), x)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(dtype).astype(np.float32))


def test_fp8_e4m3_known_values():
    # e4m3 has 3 mantissa bits: representable near 1 are 1, 1.125, 1.25; 1.0625 is a tie -> even (1.0)
    x = np.array([[1.0625, 1.1875, 0.3, -2.75]], np.float32)
    out = on_chip(lambda t: _copy_to(t, nl.float8_e4m3), x).astype(np.float32)
    np.testing.assert_array_equal(out, [[1.0, 1.25, 0.3125, -2.75]])


@pytest.mark.parametrize("engine", [None, "gpsimd"])
def test_fp32_to_int_rounds_half_even_and_saturates(engine):
    x = np.array([[2.5, 3.5, -2.5, -0.5, 0.5, 1.49, 1e10, -1e10, np.nan, 7.0]], np.float32)
    eng = None if engine is None else nisa.gpsimd_engine
    i32 = on_chip(lambda t: _copy_to(t, nl.int32, eng), x)
    i8 = on_chip(lambda t: _copy_to(t, nl.int8, eng), x)
    u8 = on_chip(lambda t: _copy_to(t, nl.uint8, eng), x)
    imax, imin = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    np.testing.assert_array_equal(i32, [[2, 4, -2, 0, 0, 1, imax, imin, 0, 7]])
    np.testing.assert_array_equal(i8, [[2, 4, -2, 0, 0, 1, 127, -128, 0, 7]])
    np.testing.assert_array_equal(u8, [[2, 4, 0, 0, 0, 1, 255, 0, 0, 7]])


def test_dma_cast_goes_through_fp32_and_rounds(rng):
    x = rnd(rng, (20, 30), scale=10.0)

    def k(a):
        t = nl.ndarray(a.shape, nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=a)                 # cast on the DMA
        i = nl.ndarray(a.shape, nl.int16, buffer=nl.sbuf)
        nisa.dma_copy(dst=i, src=a)
        return hbm_out(t), hbm_out(i)
    b, i = kernel_run(k, x).outputs
    np.testing.assert_array_equal(b.astype(np.float32), _bf16_round(x))
    np.testing.assert_array_equal(i, np.rint(x).astype(np.int16))


def test_new_tensors_are_nan_or_sentinel():
    def k(a):
        f = nl.ndarray((4, 3), nl.float32, buffer=nl.sbuf)
        i = nl.ndarray((4, 3), nl.int32, buffer=nl.sbuf)
        u = nl.ndarray((4, 3), nl.uint16, buffer=nl.sbuf)
        return hbm_out(f), hbm_out(i), hbm_out(u)
    f, i, u = kernel_run(k, np.zeros((1, 1), np.float32)).outputs
    assert np.isnan(f).all()
    assert (i == np.iinfo(np.int32).min).all() and (u == np.iinfo(np.uint16).max).all()


# ============================================================== TensorE


@given(k=st.integers(1, 128), m=st.integers(1, 128), n=st.integers(1, 512), fp32=st.booleans())
def test_nc_matmul_is_stationary_T_at_moving(k, m, n, fp32):
    rng = np.random.default_rng(k * 1000 + m * 7 + n)
    dt = np.float32 if fp32 else BF16
    a, b = rnd(rng, (k, m), dt), rnd(rng, (k, n), dt)

    def step(st_, mv):
        ps = nl.ndarray((m, n), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, st_, mv)
        return ps
    out = on_chip(step, a, b)
    ref = a.astype(np.float64).T @ b.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-5 * math.sqrt(k))
    assert out.dtype == np.float32


def test_nc_matmul_accumulate_rules(rng):
    a1, a2, b = rnd(rng, (64, 32), BF16), rnd(rng, (64, 32), BF16), rnd(rng, (64, 48), BF16)
    p1 = a1.astype(np.float64).T @ b.astype(np.float64)
    p2 = a2.astype(np.float64).T @ b.astype(np.float64)

    def step(x1, x2, y):
        ps = nl.ndarray((32, 48), nl.float32, buffer=nl.psum)
        outs = []
        nisa.nc_matmul(ps, x1, y)                       # None, first write: overwrite (NaN memory ignored)
        nisa.nc_matmul(ps, x2, y)                       # None, later write: add
        outs.append(_evict(ps))
        nisa.nc_matmul(ps, x1, y, accumulate=False)     # False: overwrite
        outs.append(_evict(ps))
        nisa.nc_matmul(ps, x2, y, accumulate=True)      # True: add
        outs.append(_evict(ps))
        nisa.memset(ps, 5.0)                            # non-matmul write ends the accumulation group
        nisa.nc_matmul(ps, x2, y)                       # None after memset: overwrite
        outs.append(_evict(ps))
        nisa.nc_matmul(ps[0:16, 0:24], x1[:, 0:16], y[:, 0:24])   # sub-tile, continues accumulating
        outs.append(_evict(ps))
        return tuple(outs)
    o = on_chip(step, a1, a2, b)
    tol = dict(rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(o[0], p1 + p2, **tol)
    np.testing.assert_allclose(o[1], p1, **tol)
    np.testing.assert_allclose(o[2], p1 + p2, **tol)
    np.testing.assert_allclose(o[3], p2, **tol)
    want = p2.copy()
    want[0:16, 0:24] += p1[0:16, 0:24]
    np.testing.assert_allclose(o[4], want, **tol)


def _evict(ps):
    sb = nl.ndarray(ps.shape, nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=sb, src=ps)
    return sb


def test_nc_matmul_accumulate_true_on_unwritten_psum_is_rejected(rng):
    def step(x):
        ps = nl.ndarray((8, 8), nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x, accumulate=True)
        return ps
    with raises("nc_matmul", "accumulate=True"):
        on_chip(step, rnd(rng, (8, 8)))


def test_nc_transpose_pe_and_vector(rng):
    x = rnd(rng, (100, 70), BF16)
    y = rnd(rng, (20, 32))

    def step(a, b):
        pt = nl.ndarray((70, 100), nl.bfloat16, buffer=nl.psum)
        nisa.nc_transpose(pt, a)
        vt = nl.ndarray((32, 20), nl.float32, buffer=nl.sbuf)
        nisa.nc_transpose(vt, b, engine=nisa.vector_engine)
        return pt, vt
    pt, vt = on_chip(step, x, y)
    np.testing.assert_array_equal(pt, x.T)
    np.testing.assert_array_equal(vt, y.T)


def test_nc_transpose_limits(rng):
    def dtype_mismatch(a):
        pt = nl.ndarray((a.shape[1], a.shape[0]), nl.float32, buffer=nl.psum)
        nisa.nc_transpose(pt, a)
        return pt
    with raises("nc_transpose", "dst", "dtype"):
        on_chip(dtype_mismatch, rnd(rng, (8, 4), BF16))

    def too_big_for_vector(a):
        vt = nl.ndarray((a.shape[1], a.shape[0]), a.dtype, buffer=nl.sbuf)
        nisa.nc_transpose(vt, a, engine=nisa.vector_engine)
        return vt
    with raises("nc_transpose", "32x32"):
        on_chip(too_big_for_vector, rnd(rng, (33, 8)))


# ============================================================== ScalarE


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


ACT_CASES = {
    "copy": (lambda x: x, (-5, 5)),
    "exp": (np.exp, (-20, 20)),
    "log": (np.log, (1e-3, 50)),
    "tanh": (np.tanh, (-6, 6)),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), (-30, 30)),
    "silu": (lambda x: x / (1 + np.exp(-x)), (-30, 30)),
    "gelu": (_gelu, (-6, 6)),
    "gelu_apprx_tanh": (lambda x: 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3))), (-6, 6)),
    "relu": (lambda x: np.where(x > 0, x, 0), (-5, 5)),
    "square": (lambda x: x * x, (-50, 50)),
    "sqrt": (np.sqrt, (1e-4, 1e4)),
    "rsqrt": (lambda x: 1 / np.sqrt(x), (1e-4, 1e4)),
    "reciprocal": (lambda x: 1 / x, (0.01, 100)),
    "sin": (np.sin, (-3.1, 3.1)),
    "softplus": (lambda x: np.log1p(np.exp(x)), (-20, 20)),
    "erf": (np.vectorize(math.erf), (-4, 4)),
}


@pytest.mark.parametrize("name", sorted(ACT_CASES))
def test_activation_functions(name, rng):
    fn, (lo, hi) = ACT_CASES[name]
    x = rng.uniform(lo, hi, size=(64, 40)).astype(np.float32)
    op = getattr(nl, name)

    def step(t):
        o = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=op, data=t)
        return o
    out = on_chip(step, x)
    np.testing.assert_allclose(out, fn(x.astype(np.float64)), rtol=2e-6, atol=1e-6)


def test_activation_scale_bias_and_bf16_output(rng):
    x = rnd(rng, (32, 50))
    s_tile = rng.uniform(0.5, 2, (32, 1)).astype(np.float32)
    b_tile = rnd(rng, (32, 1))

    def step(t, s, b):
        o1 = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o1, op=nl.exp, data=t, scale=s, bias=b)
        o2 = nl.ndarray(t.shape, nl.bfloat16, buffer=nl.sbuf)
        nisa.activation(dst=o2, op=nl.tanh, data=t, scale=0.5, bias=-0.25)
        return o1, o2
    o1, o2 = on_chip(step, x, s_tile, b_tile)
    np.testing.assert_allclose(o1, np.exp(x * s_tile + b_tile), rtol=1e-5)
    ref2 = np.tanh(x.astype(np.float64) * 0.5 - 0.25)
    np.testing.assert_array_equal(o2, ref2.astype(np.float32).astype(BF16))


def test_activation_outside_valid_range_is_nan():
    x = np.array([[0.0, -1.0, 2.0 ** -70, 1.0]], np.float32)

    def step(t):
        lg = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=lg, op=nl.log, data=t)
        sn = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sn, op=nl.sin, data=t, scale=4.0)     # 4 > pi
        return lg, sn
    lg, sn = on_chip(step, x)
    assert np.isnan(lg[0, :3]).all() and lg[0, 3] == 0.0
    assert not np.isnan(sn[0, 0]) and np.isnan(sn[0, 1]) and np.isnan(sn[0, 3])


def test_activation_reduce_registers(rng):
    x1, x2 = rnd(rng, (48, 30)), rnd(rng, (48, 20))

    def step(a, b):
        o1 = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        o2 = nl.ndarray(b.shape, nl.float32, buffer=nl.sbuf)
        r1 = nl.ndarray((48, 1), nl.float32, buffer=nl.sbuf)
        r2 = nl.ndarray((48, 1), nl.float32, buffer=nl.sbuf)
        r3 = nl.ndarray((48, 1), nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o1, op=nl.square, data=a, reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reset_reduce,
                        reduce_res=r1)
        nisa.activation(dst=o2, op=nl.exp, data=b, reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reduce,
                        reduce_res=r2)                                  # keeps accumulating
        nisa.activation(dst=o2, op=nl.copy, data=b, reduce_cmd=nisa.reduce_cmd.reset)
        nisa.activation_reduce(dst=o1, op=nl.copy, data=a, reduce_op=nl.add, reduce_res=r3)
        return r1, r2, r3
    r1, r2, r3 = on_chip(step, x1, x2)
    s1 = (x1.astype(np.float64) ** 2).sum(1, keepdims=True)
    np.testing.assert_allclose(r1, s1, rtol=1e-5)
    np.testing.assert_allclose(r2, s1 + np.exp(x2.astype(np.float64)).sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(r3, x1.astype(np.float64).sum(1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_activation_reduce_needs_add_and_a_command(rng):
    x = rnd(rng, (4, 8))

    def wrong_op(t):
        o = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        r = nl.ndarray((4, 1), nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(dst=o, op=nl.exp, data=t, reduce_op=nl.maximum, reduce_res=r)
        return r

    def no_cmd(t):
        o = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        r = nl.ndarray((4, 1), nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=o, op=nl.exp, data=t, reduce_res=r)
        return r
    with raises("activation", "reduce_op", "nl.add"):
        on_chip(wrong_op, x)
    with raises("activation", "reduce_res", "reduce_cmd"):
        on_chip(no_cmd, x)


# ============================================================== VectorE / GpSimd element-wise

BINARY = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
    "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal,
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_tensor_tensor_float_ops(name, rng):
    a = rnd(rng, (40, 33), BF16)
    b = rnd(rng, (40, 33), BF16)
    b[:, 0] = a[:, 0]                      # some equal elements for the comparisons

    def step(x, y):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=x, data2=y, op=getattr(nl, name))
        ob = nl.ndarray(x.shape, nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=ob, data1=x, data2=y, op=getattr(nl, name))
        return o, ob
    o, ob = on_chip(step, a, b)
    ref = BINARY[name](a.astype(np.float32), b.astype(np.float32)).astype(np.float32)   # fp32 compute
    np.testing.assert_array_equal(o, ref)
    np.testing.assert_array_equal(ob, ref.astype(BF16))


def test_tensor_tensor_integer_ops_are_exact():
    a = np.array([[2 ** 24 + 1, -7, 12, 0x0F0F]], np.int32)
    b = np.array([[1, 3, 5, 0x00FF]], np.int32)
    res = {}
    for name in ("add", "multiply", "subtract", "bitwise_and", "bitwise_or", "bitwise_xor", "left_shift"):
        def step(x, y, name=name):
            o = nl.ndarray(x.shape, nl.int32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=o, data1=x, data2=y, op=getattr(nl, name))
            return o
        res[name] = on_chip(step, a, b)
    np.testing.assert_array_equal(res["add"], a + b)                 # 2**24 + 2 is not an fp32 value
    np.testing.assert_array_equal(res["multiply"], a * b)
    np.testing.assert_array_equal(res["subtract"], a - b)
    np.testing.assert_array_equal(res["bitwise_and"], a & b)
    np.testing.assert_array_equal(res["bitwise_or"], a | b)
    np.testing.assert_array_equal(res["bitwise_xor"], a ^ b)
    np.testing.assert_array_equal(res["left_shift"], a << b)


def test_tensor_tensor_one_input_in_psum_ok_both_rejected(rng):
    a = rnd(rng, (16, 16))

    def one(x):
        ps = nl.ndarray(x.shape, nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=ps, data2=x, op=nl.add)
        return o
    np.testing.assert_allclose(on_chip(one, a), a.T.astype(np.float64) @ a + a, rtol=1e-5, atol=1e-5)

    def both(x):
        ps = nl.ndarray(x.shape, nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, x, x)
        ps2 = nl.ndarray(x.shape, nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps2, x, x)
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=ps, data2=ps2, op=nl.add)
        return o
    with raises("tensor_tensor", "data2", "psum"):
        on_chip(both, a)


def test_tensor_scalar_float_tile_reverse_and_chain(rng):
    x = rnd(rng, (30, 20))
    col = rnd(rng, (30, 1))

    def step(t, c):
        o1 = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=o1, data=t, op0=nl.subtract, operand0=c, reverse0=True)        # c - t
        o2 = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=o2, data=t, op0=nl.multiply, operand0=3.0, op1=nl.maximum, operand1=c)
        o3 = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=o3, data=t, op0=nl.add, operand0=1.0, op1=nl.subtract, operand1=2.0,
                           reverse1=True)                                                      # 2 - (t + 1)
        return o1, o2, o3
    o1, o2, o3 = on_chip(step, x, col)
    np.testing.assert_allclose(o1, col - x, rtol=1e-6)
    np.testing.assert_allclose(o2, np.maximum(x * 3.0, col), rtol=1e-6)
    np.testing.assert_allclose(o3, 2.0 - (x + 1.0), rtol=1e-6, atol=1e-7)


def test_scalar_tensor_tensor(rng):
    x, y = rnd(rng, (24, 36)), rnd(rng, (24, 36))
    col = rnd(rng, (24, 1))

    def step(a, b, c):
        o1 = nl.ndarray(a.shape, nl.float32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=o1, data=a, op0=nl.multiply, operand0=c, op1=nl.add, operand1=b)
        o2 = nl.ndarray(a.shape, nl.bfloat16, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=o2, data=a, op0=nl.subtract, operand0=0.5, op1=nl.subtract, operand1=b,
                                  reverse0=True, reverse1=True)         # b - (0.5 - a)
        return o1, o2
    o1, o2 = on_chip(step, x, y, col)
    np.testing.assert_allclose(o1, x * col + y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(o2, (y - (np.float32(0.5) - x)).astype(BF16))


def test_reciprocal_tensor_copy_memset(rng):
    x = rng.uniform(0.5, 4, (16, 10)).astype(np.float32)

    def step(t):
        r = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(dst=r, data=t)
        m = nl.ndarray((16, 3), nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=m, value=-9)
        c = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=c, src=t, engine=nisa.scalar_engine)
        return r, m, c
    r, m, c = on_chip(step, x)
    np.testing.assert_allclose(r, 1.0 / x, rtol=1e-7)
    assert (m == -9).all() and m.dtype == np.int32
    np.testing.assert_array_equal(c, x)

    def bad_memset(t):
        m = nl.ndarray((16, 3), nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=m, value=0.5)
        return m
    with raises("memset", "value", "int32"):
        on_chip(bad_memset, x)


def test_tensor_copy_same_dtype_is_bit_exact():
    x = np.array([[np.nan, -0.0, np.inf, 1e-45]], np.float32)
    out = on_chip(lambda t: _copy_to(t, nl.float32), x)
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))


# ============================================================== reductions and scans


def test_tensor_reduce_ops_axes_negate_keepdims(rng):
    x = rnd(rng, (20, 6, 7))

    def step(t):
        s = nl.ndarray((20, 1), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=s, op=nl.add, data=t, axis=(1, 2))
        mx = nl.ndarray((20, 6, 1), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=mx, op=nl.maximum, data=t, axis=2, keepdims=True, negate=True)
        mn = nl.ndarray((20, 6), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=mn, op=nl.minimum, data=t, axis=-1)
        pr = nl.ndarray((20, 6), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=pr, op=nl.multiply, data=t, axis=[2])
        return s, mx, mn, pr
    s, mx, mn, pr = on_chip(step, x)
    np.testing.assert_allclose(s[:, 0], x.astype(np.float64).sum((1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mx, -x.max(2, keepdims=True))
    np.testing.assert_array_equal(mn, x.min(2))
    np.testing.assert_allclose(pr, x.astype(np.float64).prod(2), rtol=1e-5)


def test_tensor_reduce_rejects_partition_and_non_trailing_axes(rng):
    x = rnd(rng, (8, 4, 5))

    def part(t):
        o = nl.ndarray((1, 20), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=o, op=nl.add, data=t, axis=0)
        return o

    def middle(t):
        o = nl.ndarray((8, 5), nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=o, op=nl.add, data=t, axis=1)
        return o
    with raises("tensor_reduce", "axis", "partition"):
        on_chip(part, x)
    with raises("tensor_reduce", "axis", "trailing"):
        on_chip(middle, x)


def test_tensor_tensor_scan_cumsum_and_decay(rng):
    d = rng.uniform(0.2, 1.0, (10, 17)).astype(np.float32)
    u = rnd(rng, (10, 17))
    init = rnd(rng, (10, 1))

    def step(dec, x, h0):
        ones = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=ones, value=1.0)
        cs = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=cs, data0=ones, data1=x, initial=0.0, op0=nl.multiply, op1=nl.add)
        rec = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=rec, data0=dec, data1=x, initial=h0, op0=nl.multiply, op1=nl.add)
        return cs, rec
    cs, rec = on_chip(step, d, u, init)
    np.testing.assert_allclose(cs, np.cumsum(u.astype(np.float64), axis=1), rtol=1e-5, atol=1e-5)
    h = init[:, 0].astype(np.float64)
    want = np.empty_like(u, dtype=np.float64)
    for i in range(u.shape[1]):
        h = d[:, i] * h + u[:, i]
        want[:, i] = h
    np.testing.assert_allclose(rec, want, rtol=1e-5, atol=1e-6)


def test_decay_to_zero_scan_forgets_the_past():
    d = np.zeros((3, 5), np.float32)
    u = np.arange(15, dtype=np.float32).reshape(3, 5)

    def step(dec, x):
        o = nl.ndarray(x.shape, nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=o, data0=dec, data1=x, initial=1e30, op0=nl.multiply, op1=nl.add)
        return o
    np.testing.assert_array_equal(on_chip(step, d, u), u)


# ============================================================== GpSimd masks


def test_iota_multi_dim_pattern():
    def k(a):
        t = nl.ndarray((6, 3, 4), nl.int32, buffer=nl.sbuf)
        nisa.iota(t, pattern=[[10, 3], [-1, 4]], offset=5, channel_multiplier=100)
        f = nl.ndarray((6, 4), nl.float32, buffer=nl.sbuf)
        nisa.iota(f, pattern=[[2, 4]], offset=0, channel_multiplier=-1)
        return hbm_out(t), hbm_out(f)
    t, f = kernel_run(k, np.zeros((1, 1), np.float32)).outputs
    p, i, j = np.meshgrid(np.arange(6), np.arange(3), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(t, 5 + 100 * p + 10 * i - j)
    p2, j2 = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(f, (2 * j2 - p2).astype(np.float32))


def test_affine_select_causal_mask_and_default_equal(rng):
    x = rnd(rng, (16, 24))
    q0, k0 = 32, 24

    def step(t):
        m = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.affine_select(dst=m, pattern=[[-1, 24]], channel_multiplier=1, on_true_tile=t,
                           on_false_value=-3.4028235e38, cmp_op=nl.greater_equal, offset=q0 - k0)
        e = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
        nisa.affine_select(dst=e, pattern=[[-1, 24]], offset=0, channel_multiplier=1, on_true_tile=t,
                           on_false_value=0.0)
        return m, e
    m, e = on_chip(step, x)
    q = q0 + np.arange(16)[:, None]
    kk = k0 + np.arange(24)[None, :]
    np.testing.assert_array_equal(m, np.where(q >= kk, x, np.float32(-3.4028235e38)))
    np.testing.assert_array_equal(e, np.where(np.arange(16)[:, None] == np.arange(24)[None, :], x, 0.0))


# ============================================================== max8 / find_index8


@given(f=st.integers(8, 300), dup=st.booleans())
def test_max8_and_find_index8(f, dup):
    rng = np.random.default_rng(f)
    x = rng.integers(-20, 20, (12, f)).astype(np.float32) if dup else rnd(rng, (12, f))

    def step(t):
        top = nl.ndarray((12, 8), nl.float32, buffer=nl.sbuf)
        nisa.max8(dst=top, src=t)
        idx = nl.ndarray((12, 8), nl.uint32, buffer=nl.sbuf)
        nisa.nc_find_index8(dst=idx, data=t, vals=top)
        return top, idx
    top, idx = on_chip(step, x)
    np.testing.assert_array_equal(top, -np.sort(-x, axis=1)[:, :8])
    for r in range(12):
        # duplicates advance: each value's k-th repeat in vals maps to its k-th occurrence in data
        want, seen = [], {}
        for v in top[r]:
            occ = np.flatnonzero(x[r] == v)
            want.append(occ[seen.get(v, 0)])
            seen[v] = seen.get(v, 0) + 1
        np.testing.assert_array_equal(idx[r], want)
        np.testing.assert_array_equal(x[r, idx[r]], top[r])


def test_find_index8_miss_is_all_ones_and_dtype_rule():
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    v = np.array([[3, 99, 3, 15, -1, 0, 0, 7]], np.float32)

    def step(t, vals, dtype):
        idx = nl.ndarray((1, 8), dtype, buffer=nl.sbuf)
        nisa.nc_find_index8(dst=idx, data=t, vals=vals)
        return idx
    u16 = on_chip(step, x, v, dtype=nl.uint16)
    u32 = on_chip(step, x, v, dtype=nl.uint32)
    np.testing.assert_array_equal(u16, [[3, 0xFFFF, 0xFFFF, 15, 0xFFFF, 0, 0xFFFF, 7]])
    np.testing.assert_array_equal(u32[0, [1, 2]], [0xFFFFFFFF, 0xFFFFFFFF])
    with raises("nc_find_index8", "dst", "uint16 or uint32"):
        on_chip(step, x, v, dtype=nl.int32)


def test_max8_needs_8_elements(rng):
    def step(t):
        top = nl.ndarray((4, 8), nl.float32, buffer=nl.sbuf)
        nisa.max8(dst=top, src=t)
        return top
    with raises("max8", "src", "8 to 16384"):
        on_chip(step, rnd(rng, (4, 7)))


# ============================================================== bn_stats / bn_aggr


@given(f=st.integers(1, 512), chunks=st.integers(1, 4), shift=st.sampled_from([0.0, 1e3]))
def test_bn_stats_and_aggr(f, chunks, shift):
    """bn_stats per chunk (even / odd halves: count, mean, variance x count) and bn_aggr over all chunks give
    the row mean and the population variance of the whole row."""
    rng = np.random.default_rng(f * 7 + chunks)
    x = rnd(rng, (16, f * chunks)) + np.float32(shift)

    def step(t):
        stats = nl.ndarray((16, 6 * chunks), nl.float32, buffer=nl.sbuf)
        for c in range(chunks):
            nisa.bn_stats(dst=stats[:, 6 * c:6 * c + 6], data=t[:, c * f:(c + 1) * f])
        mv = nl.ndarray((16, 2), nl.float32, buffer=nl.sbuf)
        nisa.bn_aggr(dst=mv, data=stats)
        return stats, mv
    stats, mv = on_chip(step, x)
    x64 = x.astype(np.float64)
    first = x64[:, :f]
    even, odd = first[:, 0::2], first[:, 1::2]
    np.testing.assert_array_equal(stats[:, 0], even.shape[1])
    np.testing.assert_array_equal(stats[:, 3], odd.shape[1])
    np.testing.assert_allclose(stats[:, 1], even.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[:, 2], even.var(axis=1) * even.shape[1], rtol=1e-4, atol=1e-3)
    if odd.shape[1]:
        np.testing.assert_allclose(stats[:, 4], odd.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mv[:, 0], x64.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mv[:, 1], x64.var(axis=1), rtol=1e-3, atol=1e-4)


def test_bn_stats_limits(rng):
    def step(t, fdst):
        st_ = nl.ndarray((4, fdst), nl.float32, buffer=nl.sbuf)
        nisa.bn_stats(dst=st_, data=t)
        return st_
    with raises("bn_stats", "data", "at most 512"):
        on_chip(step, rnd(rng, (4, 513)), fdst=6)
    with raises("bn_stats", "dst", "must be (4, 6)"):
        on_chip(step, rnd(rng, (4, 64)), fdst=5)

    def aggr(t):
        mv = nl.ndarray((4, 2), nl.float32, buffer=nl.sbuf)
        nisa.bn_aggr(dst=mv, data=t)
        return mv
    with raises("bn_aggr", "data", "triples"):
        on_chip(aggr, rnd(rng, (4, 7)))


# ============================================================== DMA


def test_dma_gather_scatter_vector_offset(rng):
    table = rnd(rng, (50, 24))
    ids = rng.permutation(50)[:20].astype(np.int32).reshape(20, 1)
    rows = rnd(rng, (20, 24))

    def k(tab, idx, upd):
        idx_sb = sb_load(idx)
        g = nl.ndarray((20, 24), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=g, src=tab.ap(pattern=[[24, 20], [1, 24]], vector_offset=idx_sb, indirect_dim=0))
        out = nl.ndarray((50, 24), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=tab)
        u = sb_load(upd)
        nisa.dma_copy(dst=out.ap(pattern=[[24, 20], [1, 24]], vector_offset=idx_sb, indirect_dim=0), src=u)
        return hbm_out(g), out
    g, out = kernel_run(k, table, ids, rows).outputs
    np.testing.assert_array_equal(g, table[ids[:, 0]])
    want = table.copy()
    want[ids[:, 0]] = rows
    np.testing.assert_array_equal(out, want)


def test_dma_scalar_offset_selects_a_block(rng):
    w = rnd(rng, (5, 16, 12))
    e = np.array([[3]], np.int32)

    def k(wt, ex):
        e_sb = sb_load(ex)
        blk = nl.ndarray((16, 12), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=blk, src=wt.ap(pattern=[[12, 16], [1, 12]], offset=0, scalar_offset=e_sb,
                                         indirect_dim=0))
        blk2 = nl.ndarray((4, 12), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=blk2, src=wt.ap(pattern=[[12, 4], [1, 12]], offset=24, scalar_offset=1,
                                          indirect_dim=1))      # rows 2..5 of block 0, plus 1 row
        return hbm_out(blk), hbm_out(blk2)
    blk, blk2 = kernel_run(k, w, e).outputs
    np.testing.assert_array_equal(blk, w[3])
    np.testing.assert_array_equal(blk2, w[0, 3:7])


def test_dma_oob_skip_leaves_destination_and_error_mode_raises(rng):
    table = rnd(rng, (10, 8))
    ids = np.array([[2], [-1], [9], [10], [0]], np.int32)

    def k(tab, idx, skip):
        idx_sb = sb_load(idx)
        g = nl.ndarray((5, 8), nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=g, value=-7.0)
        src = tab.ap(pattern=[[8, 5], [1, 8]], vector_offset=idx_sb, indirect_dim=0)
        if skip:
            nisa.dma_copy(dst=g, src=src, oob_mode=nisa.oob_mode.skip)
        else:
            nisa.dma_copy(dst=g, src=src)
        return hbm_out(g)
    g = kernel_run(k, table, ids, skip=True).outputs
    np.testing.assert_array_equal(g[[0, 2, 4]], table[[2, 9, 0]])
    assert (g[[1, 3]] == -7.0).all()
    with raises("dma_copy", "outside"):
        kernel_run(k, table, ids, skip=False)


def test_dma_transpose(rng):
    x = rnd(rng, (40, 70), BF16)
    y = rnd(rng, (3, 4, 5), BF16)

    def k(a, b):
        t = nl.ndarray((70, 40), nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=t, src=a)
        t3 = nl.ndarray((5, 4, 3), nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=t3, src=b)
        return hbm_out(t), hbm_out(t3)
    t, t3 = kernel_run(k, x, y).outputs
    np.testing.assert_array_equal(t, x.T)
    np.testing.assert_array_equal(t3, np.transpose(y, (2, 1, 0)))

    def k32(a):
        t = nl.ndarray((a.shape[1], a.shape[0]), nl.float32, buffer=nl.sbuf)
        nisa.dma_transpose(dst=t, src=a)
        return hbm_out(t)
    with raises("dma_transpose", "src", "2-byte"):
        kernel_run(k32, rnd(rng, (4, 4)))


def test_dma_compute_scatter_add(rng):
    acc = rnd(rng, (30, 16))
    ids = np.array([[4], [17], [0], [29]], np.int32)
    upd = rnd(rng, (4, 16))

    def k(a, idx, u, unique):
        out = nl.ndarray((30, 16), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=a)
        idx_sb = sb_load(idx)
        u_sb = sb_load(u)
        view = out.ap(pattern=[[16, 4], [1, 16]], vector_offset=idx_sb, indirect_dim=0)
        nisa.dma_compute(dst=view, srcs=(view, u_sb), reduce_op=nl.add, unique_indices=unique)
        return out
    out = kernel_run(k, acc, ids, upd, unique=True).outputs
    want = acc.astype(np.float32).copy()
    want[ids[:, 0]] += upd
    np.testing.assert_allclose(out, want, rtol=1e-6)
    dup = np.array([[4], [4], [0], [29]], np.int32)
    with raises("dma_compute", "dst", "repeat"):
        kernel_run(k, acc, dup, upd, unique=True)

    def k_mul(a):
        t = sb_load(a)
        out = nl.ndarray(a.shape, nl.float32, buffer=nl.shared_hbm)
        nisa.dma_compute(dst=out, srcs=(t, t), reduce_op=nl.multiply)
        return out
    with raises("dma_compute", "reduce_op", "nl.add"):
        kernel_run(k_mul, acc)


def test_dma_compute_indirect_only_in_the_documented_rmw_forms(rng):
    """A vector_offset makes dma_compute a read-modify-write of exactly 2 sources, one of them dst (the docstring);
    a sum of several gathered sources into a static HBM dst (what a reverted combine once issued) is refused."""
    table = rnd(rng, (12, 8))
    ids = np.array([[3], [0], [11], [5]], np.int32)

    def k_many(tab, idx, n_src):
        out = nl.ndarray((4, 8), nl.float32, buffer=nl.shared_hbm)
        idx_sb = sb_load(idx)
        src = tab.ap(pattern=[[8, 4], [1, 8]], vector_offset=idx_sb, indirect_dim=0)
        nisa.dma_compute(dst=out, srcs=[src] * n_src, reduce_op=nl.add)
        return out
    with raises("dma_compute", "srcs", "exactly 2"):
        kernel_run(k_many, table, ids, 3)
    with raises("dma_compute", "srcs", "dst itself"):
        kernel_run(k_many, table, ids, 2)

    def k_gather(tab, idx, base):
        acc = sb_load(base)
        idx_sb = sb_load(idx)
        src = tab.ap(pattern=[[8, 4], [1, 8]], vector_offset=idx_sb, indirect_dim=0)
        nisa.dma_compute(dst=acc, srcs=[acc, src], reduce_op=nl.add)
        return hbm_out(acc)
    out = kernel_run(k_gather, table, ids, np.ones((4, 8), np.float32)).outputs
    np.testing.assert_allclose(out, 1.0 + table[ids[:, 0]], rtol=1e-6)

    def k_static(a):
        t = sb_load(a)
        out = nl.ndarray(a.shape, nl.float32, buffer=nl.shared_hbm)
        nisa.dma_compute(dst=out, srcs=[t] * 17, reduce_op=nl.add)
        return out
    with raises("dma_compute", "srcs", "at most 16"):
        kernel_run(k_static, table)


def test_dge_mode_only_in_the_documented_combinations(rng):
    """The dma_copy / dma_transpose docstrings of the NKI 0.7 API: an indirect (vector_offset) access takes dge_mode
    unknown or swdge; none (descriptors built before execution) cannot follow a runtime offset; hardware DGE exists
    on NeuronCore-v3+; `engine` (sync or scalar) is valid only with hwdge; a direct transpose takes unknown or hwdge,
    and a hardware-DGE one a 2-byte source with shape[-1] <= 128 and shape[0] == 16 (2-D) or shape[0] in {1, 2, 4,
    8, 16} with shape[0] * shape[-2] % 16 == 0 (3-D). The allowed forms still move the right values."""
    from nki_kernels.emulator import use_target
    table = rnd(rng, (12, 8))
    ids = np.array([[3], [0], [11], [5]], np.int32)

    def k_gather(tab, idx, mode):
        idx_sb = sb_load(idx)
        t = nl.ndarray((4, 8), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=tab.ap(pattern=[[8, 4], [1, 8]], vector_offset=idx_sb, indirect_dim=0),
                      dge_mode=getattr(nisa.dge_mode, mode))
        return hbm_out(t)
    for mode in ("hwdge", "none"):
        with raises("dma_copy", "dge_mode", "unknown or swdge"):
            kernel_run(k_gather, table, ids, mode=mode)
    for mode in ("unknown", "swdge"):
        out = kernel_run(k_gather, table, ids, mode=mode).outputs
        np.testing.assert_array_equal(out, table[ids[:, 0]])

    def k_dynamic(tab, idx, mode, eng):
        r = sb_load(idx[0:1, 0:1])
        t = nl.ndarray((1, 8), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=tab.ap(pattern=[[8, 1], [1, 8]], scalar_offset=r, indirect_dim=0),
                      dge_mode=getattr(nisa.dge_mode, mode), engine=getattr(nisa.engine, eng))
        return hbm_out(t)
    with raises("dma_copy", "dge_mode", "needs swdge or hwdge"):
        kernel_run(k_dynamic, table, ids, mode="none", eng="unknown")
    with raises("dma_copy", "engine", "sync or nisa.engine.scalar"):
        kernel_run(k_dynamic, table, ids, mode="hwdge", eng="gpsimd")
    for mode in ("swdge", "unknown"):
        with raises("dma_copy", "engine", "only valid with dge_mode=hwdge"):
            kernel_run(k_dynamic, table, ids, mode=mode, eng="scalar")
    for eng in ("unknown", "scalar", "sync"):
        np.testing.assert_array_equal(kernel_run(k_dynamic, table, ids, mode="hwdge", eng=eng).outputs, table[3:4])
    np.testing.assert_array_equal(kernel_run(k_dynamic, table, ids, mode="swdge", eng="unknown").outputs, table[3:4])
    with use_target("trn1"), raises("dma_copy", "dge_mode", "NeuronCore-v3"):
        kernel_run(k_dynamic, table, ids, mode="hwdge", eng="unknown")

    def k_transpose(a, mode):
        t = nl.ndarray(tuple(reversed(a.shape)), BF16, buffer=nl.shared_hbm)      # HBM -> HBM: any src shape
        nisa.dma_transpose(dst=t, src=a, dge_mode=getattr(nisa.dge_mode, mode))
        return t
    for shape in ((16, 128), (16, 40), (2, 8, 128)):
        x = rnd(rng, shape).astype(BF16)
        np.testing.assert_array_equal(kernel_run(k_transpose, x, mode="hwdge").outputs, np.transpose(x))
    for shape in ((32, 128), (16, 256), (2, 4, 128), (3, 16, 64)):
        with raises("dma_transpose", "dge_mode", "hardware-DGE transpose"):
            kernel_run(k_transpose, rnd(rng, shape).astype(BF16), mode="hwdge")
    for mode in ("swdge", "none"):
        with raises("dma_transpose", "dge_mode", "direct DMA transpose takes dge_mode unknown or hwdge"):
            kernel_run(k_transpose, rnd(rng, (16, 128)).astype(BF16), mode=mode)


def test_dma_hbm_to_hbm_and_sbuf_to_sbuf(rng):
    x = rnd(rng, (6, 10))

    def k(a):
        out = nl.ndarray((6, 10), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out[0:3, :], src=a[3:6, :])
        t = sb_load(a[0:3, :])
        t2 = nl.ndarray((3, 10), nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t2, src=t)
        nisa.dma_copy(dst=out[3:6, :], src=t2)
        return out
    out = kernel_run(k, x).outputs
    np.testing.assert_array_equal(out, np.concatenate([x[3:], x[:3]]))


# ============================================================== views


def test_views_int_index_hbm_drops_dim_sbuf_keeps_it_and_reshape_permute(rng):
    x = rnd(rng, (4, 6, 8))
    shapes = {}

    def k(a):
        shapes["hbm_int"] = a[1].shape
        t = sb_load(a[1])                               # (6, 8)
        shapes["sb_int"] = t[2].shape
        shapes["sb_ds"] = t[nl.ds(2, 3), 1:7:2].shape
        r = t.reshape((6, 2, 4))
        pm = r.permute((0, 2, 1))
        o = nl.ndarray((6, 4, 2), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=pm)
        neg = nl.ndarray((1, 8), nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=neg, src=t[-1])
        return hbm_out(o), hbm_out(neg)
    o, neg = kernel_run(k, x).outputs
    assert shapes == {"hbm_int": (6, 8), "sb_int": (1, 8), "sb_ds": (3, 3)}
    np.testing.assert_array_equal(o, x[1].reshape(6, 2, 4).transpose(0, 2, 1))
    np.testing.assert_array_equal(neg, x[1, -1:])
