"""Cost model, v9 / v10 calibration rounds (docs/cost-model.md, "v10 round"): NeuronCore-v3 VectorE at its
documented datapath (256 elements per cycle for fp32 = 2 per partition, 512 for bf16 performance mode = 4), the
isa's two-pass rule kept (preset `dve-one-pass-low` drops it on v3 / v4 only); nothing changes on NeuronCore-v2.
Expected times are hand-computed from the documented figures (trainium2_arch.rst, nki-api.md s4)."""
from __future__ import annotations

import pytest

from nki_kernels.emulator.costmodel import model_trace, preset_params
from nki_kernels.emulator.targets import get_target
from emu_kit import cycles_us, trace_tile

from nki_kernels.emulator.trace import DVE, Instr, Trace

def _stt(n):
    tr = Trace()
    tr.append(Instr(0, "scalar_tensor_tensor", DVE, (trace_tile(n), trace_tile(n)), (trace_tile(n),),
                    {"op": "multiply"}))
    return tr


@pytest.mark.parametrize("target, cycles", [("trn1", 2 * 4096), ("trn2", 2 * 4096 / 2), ("trn3", 2 * 4096 / 2)])
def test_two_input_vector_instruction_passes(target, cycles):
    """[128, 4096] fp32 scalar_tensor_tensor, both tensors in SBUF: two passes (2N) at the target's rate, 1 / cycle
    on NC-v2 and 2 / cycle on NC-v3 / v4."""
    t = get_target(target)
    assert model_trace(_stt(4096), t).engine_busy_us[DVE] == pytest.approx(cycles_us(cycles, t.dve_ghz), rel=1e-6)


@pytest.mark.parametrize("target, cycles", [("trn1", 2 * 4096), ("trn2", 4096 / 2)])
def test_one_pass_preset_only_changes_nc_v3(target, cycles):
    t = get_target(target)
    p = preset_params("dve-one-pass-low", t)
    assert model_trace(_stt(4096), t, params=p).engine_busy_us[DVE] == pytest.approx(cycles_us(cycles, t.dve_ghz),
                                                                                      rel=1e-6)


def test_bf16_tensor_tensor_gains_nothing_over_the_nc_v3_base():
    """Performance mode 'doubles ... compared to NeuronCore-v2' a bf16 add with both inputs in SBUF (one pass on
    v2, N cycles): N / 2 on trn2, the same as the v3 base rate gives."""
    t = get_target("trn2")
    tr = Trace()
    tr.append(Instr(0, "tensor_tensor", DVE, (trace_tile(4096, "bfloat16"), trace_tile(4096, "bfloat16")),
                    (trace_tile(4096, "bfloat16"),), {"op": "add"}))
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(cycles_us(4096 / 2, t.dve_ghz), rel=1e-6)


def test_psum_input_is_one_pass_at_the_nc_v3_rate():
    t = get_target("trn2")
    tr = Trace()
    tr.append(Instr(0, "tensor_tensor", DVE, (trace_tile(4096), trace_tile(4096, buffer="psum")), (trace_tile(4096),),
                    {"op": "multiply"}))
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(cycles_us(4096 / 2, t.dve_ghz), rel=1e-6)


def _with_gpsimd(vector_instr):
    """A VectorE instruction and an independent GpSimd SBUF copy of [128, 4096] fp32: the total shows whether they
    shared the SBUF bus (serialised) or ran in parallel."""
    tr = Trace()
    tr.append(vector_instr)
    tr.append(Instr(1, "tensor_copy", "pool", (trace_tile(4096),), (trace_tile(4096),), {}))
    return model_trace(tr, get_target("trn2")).total_us


def test_only_a_lifted_vector_instruction_holds_the_gpsimd_bus():
    """trainium2_arch.rst: performance mode 'leverages a shared memory bus between the VectorE and GpsimdE'. A bf16
    add of two SBUF tensors runs at the NC-v3 base rate (no lift), so it overlaps GpSimd like an fp32 one; a
    contiguous bf16 copy (4x lift) excludes it. Both VectorE instructions here are shorter than the GpSimd copy."""
    bf = "bfloat16"
    bf16_add = _with_gpsimd(Instr(0, "tensor_tensor", DVE, (trace_tile(4096, bf), trace_tile(4096, bf)),
                                  (trace_tile(4096, bf),), {"op": "add"}))
    bf16_copy = _with_gpsimd(Instr(0, "tensor_copy", DVE, (trace_tile(4096, bf),), (trace_tile(4096, bf),), {}))
    gpsimd_alone = cycles_us(4096, get_target("trn2").pool_ghz)       # 1 element per partition per cycle
    assert bf16_add < gpsimd_alone + cycles_us(4096 / 2, get_target("trn2").dve_ghz)     # not serialised
    assert bf16_copy >= gpsimd_alone + cycles_us(4096 / 4, get_target("trn2").dve_ghz)  # serialised with GpSimd
