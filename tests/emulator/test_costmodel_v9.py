"""Cost model, v9 calibration round (docs/cost-model.md, "v9 round"): NeuronCore-v3 VectorE at its documented
datapath (256 elements per cycle for fp32 = 2 per partition, 512 for bf16 performance mode = 4) with two-input
instructions in one pass (fitted on the KDA adamw points); a launch modeled `alone` at LNC=1 on trn2 draws its
whole HBM bank and its idle partner's DMA engines (fitted on the KDA silu / adamw points); nothing changes on
NeuronCore-v2 and nothing changes for `alone=False`, the microbench's every-core-busy condition. Expected times
are hand-computed from the documented figures (trainium2_arch.rst, logical-neuroncore-config.rst, nki-api.md s4)."""
from __future__ import annotations

import numpy as np
import pytest

from nki_kernels.backend import nisa, nki, nl
from nki_kernels.emulator import run
from nki_kernels.emulator.costmodel import model_launches, model_trace, preset_params
from nki_kernels.emulator.targets import get_target
from nki_kernels.emulator.trace import DVE, Access, Instr, Trace

_SID = [9000]


def _tile(f, dtype="float32", buffer="sbuf"):
    _SID[0] += 1
    item = 2 if dtype == "bfloat16" else 4
    return Access(_SID[0], buffer, dtype, (128, f), 128, f, 128 * f * item, 0, 128 * f, 128 * f * item, False)


def _us(cycles, ghz):
    return cycles / ghz * 1e-3


def _stt(n):
    tr = Trace()
    tr.append(Instr(0, "scalar_tensor_tensor", DVE, (_tile(n), _tile(n)), (_tile(n),), {"op": "multiply"}))
    return tr


@pytest.mark.parametrize("target, cycles", [("trn1", 2 * 4096), ("trn2", 4096 / 2), ("trn3", 4096 / 2)])
def test_two_input_vector_instruction_passes(target, cycles):
    """[128, 4096] fp32 scalar_tensor_tensor, both tensors in SBUF: NC-v2 two passes at 1 / cycle (2N); NC-v3 / v4
    one pass at 2 / cycle (N / 2)."""
    t = get_target(target)
    assert model_trace(_stt(4096), t).engine_busy_us[DVE] == pytest.approx(_us(cycles, t.dve_ghz), rel=1e-6)


def test_two_pass_preset_restores_the_v2_rule_on_trn2():
    t = get_target("trn2")
    p = preset_params("dve-one-pass-high", t)
    assert model_trace(_stt(4096), t, params=p).engine_busy_us[DVE] == pytest.approx(_us(4096, t.dve_ghz),
                                                                                      rel=1e-6)


def test_bf16_tensor_tensor_gains_nothing_over_the_nc_v3_base():
    """Performance mode 'doubles ... compared to NeuronCore-v2' a bf16 tensor_tensor: 2 / cycle, the v3 base."""
    t = get_target("trn2")
    tr = Trace()
    tr.append(Instr(0, "tensor_tensor", DVE, (_tile(4096, "bfloat16"), _tile(4096, "bfloat16")),
                    (_tile(4096, "bfloat16"),), {"op": "add"}))
    assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(_us(4096 / 2, t.dve_ghz), rel=1e-6)


@nki.jit
def _stream(x):
    """[128, F] fp32 in 4 column chunks per core: load, store (HBM -> SBUF -> HBM)."""
    p, f = x.shape
    out = nl.ndarray((p, f), dtype=x.dtype, buffer=nl.shared_hbm)
    cores = nl.num_programs(0)
    w = f // (4 * cores)
    for j in range(4 * nl.program_id(0), 4 * nl.program_id(0) + 4):   # each core its own 4 chunks
        t = nl.ndarray((p, w), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[:, j * w:(j + 1) * w])
        nisa.dma_copy(dst=out[:, j * w:(j + 1) * w], src=t)
    return out


def _dma_busy(target, lnc, alone):
    res = run(_stream, np.ones((128, 65536), np.float32), target=target, lnc=lnc)
    return model_launches([res], alone=alone).engine_busy_us["dma"]


def test_alone_at_lnc1_on_trn2_draws_the_hbm_bank():
    """64 MiB each way (32 KiB rows: full efficiency). Every core busy: 2.9 TB/s / 8 cores = 362.5 GB/s per core;
    alone at LNC=1: the whole bank, 2.9 TB/s / 4 banks = 725 GB/s (32 engines x 23 B/ns = 736 do not bind)."""
    nbytes = 2 * 128 * 65536 * 4
    busy = _dma_busy("trn2", 1, False)
    alone = _dma_busy("trn2", 1, True)
    assert busy == pytest.approx(nbytes / 362.5e3, rel=1e-3)
    assert alone == pytest.approx(nbytes / 725e3, rel=1e-3)


@pytest.mark.parametrize("target, lnc", [("trn2", 2), ("trn1", 1)])
def test_alone_changes_nothing_at_lnc2_or_on_trn1(target, lnc):
    assert _dma_busy(target, lnc, True) == pytest.approx(_dma_busy(target, lnc, False), rel=1e-9)
