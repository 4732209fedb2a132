"""nisa.range_select (VectorE, NeuronCore-v3+): the docstring's semantics against an independent loop reference,
its constraints, and its cost (one VectorE pass over the tile)."""
from __future__ import annotations

import numpy as np
import pytest
from emu_kit import BF16, nisa, nl, on_chip, raises, rnd
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels.emulator.costmodel import model_trace
from nki_kernels.emulator.runtime import last_run
from nki_kernels.emulator.targets import get_target, use_target

FP32_MIN = float(np.float32(-3.4028235e38))   # the fill value as the fp32 hardware holds it
_CMP = {"equal": lambda a, b: a == b, "less": lambda a, b: a < b, "less_equal": lambda a, b: a <= b,
        "greater": lambda a, b: a > b, "greater_equal": lambda a, b: a >= b}


def _reference(x, lo, hi, op0, op1, start):
    """Element by element: keep x[p, j] where op0(start + j, lo[p]) and op1(start + j, hi[p]), else FP32_MIN;
    the row max of the kept values (FP32_MIN for an empty row)."""
    p, f = x.shape
    out = np.empty((p, f), np.float64)
    for i in range(p):
        for j in range(f):
            idx = float(start + j)
            keep = _CMP[op0](idx, float(lo[i, 0])) and _CMP[op1](idx, float(hi[i, 0]))
            out[i, j] = float(x[i, j]) if keep else FP32_MIN
    return out, out.max(axis=1, keepdims=True)


def _run(x, lo, hi, op0, op1, start, dst_dtype=np.float32, in_psum=False):
    def step(t, b0, b1):
        src = t
        if in_psum:
            src = nl.ndarray(t.shape, nl.float32, buffer=nl.psum)
            nisa.tensor_copy(dst=src, src=t)
        dst = nl.ndarray(t.shape, dst_dtype, buffer=nl.sbuf)
        m = nl.ndarray((t.shape[0], 1), nl.float32, buffer=nl.sbuf)
        nisa.range_select(dst=dst, on_true_tile=src, comp_op0=getattr(nl, op0), comp_op1=getattr(nl, op1),
                          bound0=b0, bound1=b1, reduce_res=m, range_start=start)
        return dst, m
    with use_target("trn2"):
        return on_chip(step, x, lo, hi)


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 128), f=st.integers(1, 300), op0=st.sampled_from(sorted(_CMP)),
       op1=st.sampled_from(sorted(_CMP)), start=st.integers(0, 600), in_psum=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_matches_the_loop_reference(p, f, op0, op1, start, in_psum, seed):
    rng = np.random.default_rng(seed)
    x = rnd(rng, (p, f), scale=10.0)
    lo = rng.integers(-5, start + f + 5, (p, 1)).astype(np.float32)
    hi = rng.integers(-5, start + f + 5, (p, 1)).astype(np.float32)
    dst, m = _run(x, lo, hi, op0, op1, start, in_psum=in_psum)
    want, want_m = _reference(x, lo, hi, op0, op1, start)
    np.testing.assert_array_equal(dst.astype(np.float64), want)
    np.testing.assert_array_equal(m.astype(np.float64), want_m)


def test_causal_rows_replace_non_finite_hidden_values_and_bf16_dst_holds_minus_inf():
    """The causal use: row p keeps keys j < p + 1; NaN / Inf past the bound are replaced (a select), the max sees
    only kept values; in a bf16 dst the fill FP32_MIN becomes -inf (the docstring's note), the max stays fp32."""
    x = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 7.0
    x[0, 3] = np.nan
    x[2, 7] = np.inf
    lo = np.zeros((16, 1), np.float32)
    hi = (np.arange(16, dtype=np.float32) + 1).reshape(16, 1)
    dst, m = _run(x, lo, hi, "greater_equal", "less", 0, dst_dtype=BF16)
    want, want_m = _reference(np.nan_to_num(x, nan=0.0, posinf=0.0), lo, hi, "greater_equal", "less", 0)
    kept = want > FP32_MIN
    np.testing.assert_array_equal(dst.astype(np.float64)[kept], want[kept].astype(BF16).astype(np.float64))
    assert np.all(np.isneginf(dst.astype(np.float64)[~kept]))
    np.testing.assert_array_equal(m.astype(np.float64), want_m)


def test_constraints():
    x = np.ones((4, 6), np.float32)
    b = np.zeros((4, 1), np.float32)

    def bad(**kw):
        def step(t, b0, b1):
            dst = nl.ndarray(t.shape, nl.float32, buffer=nl.sbuf)
            args = dict(dst=dst, on_true_tile=t, comp_op0=nl.greater_equal, comp_op1=nl.less, bound0=b0, bound1=b1)
            args.update(kw)
            if "bound1_shape" in args:
                args.pop("bound1_shape")
                args["bound1"] = nl.ndarray((4, 2), nl.float32, buffer=nl.sbuf)
                nisa.memset(dst=args["bound1"], value=0.0)
            nisa.range_select(**args)
            return dst
        return step
    with use_target("trn2"):
        with raises("range_select", "comp_op0"):
            on_chip(bad(comp_op0=nl.add), x, b, b)
        with raises("range_select", "reduce_op"):
            on_chip(bad(reduce_op=nl.add), x, b, b)
        with raises("range_select", "on_false_value", "FP32_MIN"):
            on_chip(bad(on_false_value=0.0), x, b, b)
        with raises("range_select", "bound1", "one element per partition"):
            on_chip(bad(bound1_shape=True), x, b, b)
        with raises("range_select", "reduce_cmd"):
            on_chip(bad(reduce_cmd=nisa.reduce_cmd.reduce), x, b, b)
        with raises("range_select", "range_start"):
            on_chip(bad(range_start=1.5), x, b, b)
        with raises("range_select", "bound0", "float32"):
            on_chip(bad(), x, b.astype(BF16), b)
    with use_target("trn1"), raises("range_select", "NeuronCore-v3"):
        on_chip(bad(), x, b, b)


@pytest.mark.parametrize("f", [64, 512])
def test_cost_is_one_vector_pass(f):
    """Modeled like a copy from the same source: max(64, F / 2) VectorE cycles at 0.96 GHz on trn2 (fp32)."""
    x = np.ones((128, f), np.float32)
    b = np.zeros((128, 1), np.float32)
    _run(x, b, b + f, "greater_equal", "less", 0)
    trace = last_run().traces[0]
    sel = [ins for ins in trace if ins.name == "range_select"]
    assert len(sel) == 1
    from nki_kernels.emulator.costmodel import PARAMS, compute_cycles, preset_params
    cyc, _ = compute_cycles(sel[0], get_target("trn2"), PARAMS["trn2"])
    assert cyc == max(64, f / 2)
    for preset, passes in (("range-select-high", 2), ("high", 2), ("low", 1)):
        cyc, _ = compute_cycles(sel[0], get_target("trn2"), preset_params(preset, "trn2"))
        assert cyc == max(preset_params(preset, "trn2").dve_min_ii, passes * f / 2), preset
    assert model_trace(trace, get_target("trn2")).total_us > 0
