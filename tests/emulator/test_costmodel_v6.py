"""Cost model, v6 calibration round (docs/cost-model.md, "Constants" and "Calibration"): on NeuronCore-v2 a small
VectorE instruction costs `dve_min_ii` = 32 cycles per pass (fitted on U5.5 with U5 / U5.3) instead of the
documented MIN_II of 64, and a tensor_tensor with both inputs in SBUF (the isa's two-pass case) two such minimums.
NeuronCore-v3 / v4 keep one 64-cycle minimum. The 160-cycle VectorE result latency is unchanged everywhere.
Expected times are hand-computed from the cycle counts and the VectorE clocks (trn1 1.12 GHz, trn2 0.96 GHz)."""
from __future__ import annotations

import pytest

from nki_kernels.emulator.costmodel import PARAMS, PRESETS, model_trace, preset_params, use_params
from nki_kernels.emulator.targets import get_target
from emu_kit import cycles_us, trace_tile

from nki_kernels.emulator.trace import DVE, Instr, Trace

def _independent_small_ops(n):
    """n independent VectorE multiplies of a [128, 3] SBUF window by a [128, 3] PSUM filter (U5 step 5's first
    instruction): each 3 elements per partition, far below MIN_II."""
    tr = Trace()
    filt = trace_tile(3, buffer="psum")
    for i in range(n):
        tr.append(Instr(i, "tensor_tensor", DVE, (trace_tile(3), filt), (trace_tile(3),), {"op": "multiply"}))
    return tr


def _dependent_small_ops(n):
    """n VectorE tensor_scalar ops on one [128, 1] tile, each reading the previous one's output."""
    tr, x = Trace(), trace_tile(1)
    for i in range(n):
        tr.append(Instr(i, "tensor_scalar", DVE, (x,), (x,), {"op": "multiply"}))
    return tr


@pytest.mark.parametrize("target, ii", [("trn1", 32), ("trn2", 64), ("trn3", 64)])
def test_small_vector_instructions_issue_at_the_target_minimum(target, ii):
    t = get_target(target)
    rep = model_trace(_independent_small_ops(100), t)
    assert rep.engine_busy_us[DVE] == pytest.approx(cycles_us(100 * ii, t.dve_ghz), rel=1e-6)
    # independent: back to back, the last result visible one fixed latency after the last issue ends
    assert rep.total_us == pytest.approx(cycles_us(100 * ii + 160, t.dve_ghz), rel=1e-6)


@pytest.mark.parametrize("target, cyc", [("trn1", 64), ("trn2", 64), ("trn3", 64)])
def test_two_sbuf_inputs_pay_the_minimum_per_pass_on_nc_v2(target, cyc):
    """U5 step 3's multiply: a [128, 3] SBUF window times a [128, 3] SBUF filter, fp32 (isa: 2N, two passes)."""
    t = get_target(target)
    tr = Trace()
    for i in range(10):
        tr.append(Instr(i, "tensor_tensor", DVE, (trace_tile(3), trace_tile(3)), (trace_tile(3),), {"op": "multiply"}))
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(cycles_us(10 * cyc, t.dve_ghz), rel=1e-6)
    # trn1: 2 x 32 (two passes); trn2 / trn3: one 64-cycle minimum. One input in PSUM: one pass (32 / 64), as in
    # _independent_small_ops; a [128, 48] two-pass multiply on trn1 is 2N = 96 > 64; on trn2 / trn3 (v10: 2 elements
    # per partition per cycle) it is max(64, 2 x 48 / 2) = 64
    tr = Trace()
    tr.append(Instr(0, "tensor_tensor", DVE, (trace_tile(48), trace_tile(48)), (trace_tile(48),), {"op": "multiply"}))
    expect = 96 if target == "trn1" else 64
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(cycles_us(expect, t.dve_ghz), rel=1e-6)


def test_large_vector_instructions_are_unchanged_on_trn1():
    """The minimum only matters below it: a [128, 512] fp32 tensor_tensor from SBUF stays 2N = 1024 cycles."""
    t = get_target("trn1")
    tr = Trace()
    tr.append(Instr(0, "tensor_tensor", DVE, (trace_tile(512), trace_tile(512)), (trace_tile(512),),
                    {"op": "multiply"}))
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(cycles_us(1024, t.dve_ghz), rel=1e-6)


@pytest.mark.parametrize("target, ii, lat", [("trn1", 32, 160), ("trn2", 64, 160)])
def test_dependent_vector_chain_pays_the_static_overhead(target, ii, lat):
    t = get_target(target)
    rep = model_trace(_dependent_small_ops(10), t)
    assert rep.total_us == pytest.approx(cycles_us(10 * (ii + lat), t.dve_ghz), rel=1e-6)


def test_dve_min_ii_preset_spans_the_v2_fit_and_the_documented_minimum():
    assert PRESETS["dve-min-ii-low"] == {"dve_min_ii": 24.0}
    assert PRESETS["dve-min-ii-high"] == {"dve_min_ii": 64.0}
    assert preset_params("low", "trn2").dve_min_ii == 24.0 and preset_params("high", "trn1").dve_min_ii == 64.0
    t = get_target("trn2")
    with use_params("dve-min-ii-low"):
        # the low end carried over to v3: 24 cycles each
        assert model_trace(_independent_small_ops(10), t).engine_busy_us[DVE] == pytest.approx(
            cycles_us(240, t.dve_ghz), rel=1e-6)
    assert PARAMS["trn2"].dve_min_ii == 64.0 and PARAMS["trn1"].dve_min_ii == 32.0
    assert PARAMS["trn1"].dve_two_pass_min and not PARAMS["trn2"].dve_two_pass_min
