"""microbench.floors: the floors recomputed by hand from the documented cost-model constants, and the kernels
never modeled below them (a floor above a kernel's modeled time would be a wrong floor)."""
from __future__ import annotations

import dataclasses

import pytest

from microbench import floors
from microbench.registry import cases
from microbench.runner import run_case

# trn2 constants as documented in docs/cost-model.md (DMA)
_BW = 2 * 362.5e9        # bytes/s of a launch at the default LNC=2 (two cores)
_LAT = 1.3               # µs per DMA
_DYN = 0.6               # µs more for a dynamic DMA (hardware DGE)


def _eff(run):
    return run / max(run, 512.0)             # trn2 packet floor (v11): a row keeps its engine busy >= 512 B at its peak


def test_moe_prefill_floor_by_hand():
    f = floors.moe_prefill_floor("qwen3.5-35b-a3b tp4", 4096)
    rows_us = 4096 * 8 * 2048 * 2 / (_BW * _eff(4096)) * 1e6   # T * TOPK rows of H bf16, 4 KiB runs
    assert f["routed_rows_pass_us"] == pytest.approx(rows_us, rel=1e-9)
    assert f["passes_any"] == 2                           # 128 MiB of slot outputs cannot stay in 26 MiB of SBUF
    assert f["floor_any_us"] == pytest.approx(f["roofline_us"] + 2 * rows_us, rel=1e-9)
    full_us = 4096 * 8 * 2048 * 2 / _BW * 1e6            # the design floor counts its passes at full efficiency
    # this kernel's DMA combine gathers x on chip at T=4096 (round 37): its slot-row store and read-back remain
    assert f["floor_design_us"] == pytest.approx(f["roofline_us"] + 2 * full_us, rel=1e-9)
    # where x comes in by DMA row gathers too (trn1: the resident x.T does not fit its SBUF), three passes
    t1 = floors.moe_prefill_floor("qwen3.5-35b-a3b tp4", 4096, target="trn1")
    full1 = 4096 * 8 * 2048 * 2 / 272e9 * 1e6             # trn1: one core (LNC=1) at 272 GB/s
    assert t1["floor_design_us"] == pytest.approx(t1["roofline_us"] + 3 * full1, rel=1e-9)
    talker = floors.moe_prefill_floor("qwen3-omni talker tp8", 1024)
    assert talker["passes_any"] == 0                      # 1024 * 6 * 2 KiB = 12 MiB fits on chip
    assert talker["routed_rows_pass_us"] == pytest.approx(1024 * 6 * 2048 / (_BW * _eff(2048)) * 1e6, rel=1e-9)


def test_moe_decode_floor_by_hand():
    f = floors.moe_decode_floor("qwen3-omni talker tp8", 1)
    routed = 6 * 3 * 1024 * 48 * 2                        # TOPK experts of H=1024, I=48
    shared = (3 * 1024 * 96 + 1024) * 2
    # ids by DMA, routed bytes booked after them, the last landing one DMA latency later (software DGE: no
    # hardware DGE time at the end), the output DMA
    want = max(_LAT + _LAT + routed / _BW * 1e6, _LAT + (routed + shared) / _BW * 1e6) + _LAT
    assert f["floor_design_us"] == pytest.approx(want, rel=1e-9)
    assert f["floor_design_us"] / f["roofline_us"] > 1.3      # this kernel's design family cannot reach the goal


_REG_US = 64 / 1.2e3     # one GpSimd register_load / register_store: MIN_II = 64 cycles at 1.2 GHz (trn2), µs


def test_moe_decode_floor_any_design_by_hand():
    """Every design: the busier core moves >= half the needed bytes (less what register_loads could carry in
    the floor's own time), the last lands one DMA latency after its booking, and the last-landing down columns
    are written by DMA (+1.3 µs) or by register stores (1 load + 1 store per 2 bf16 outputs per core)."""
    need = 6 * 3 * 1024 * 48 * 2 + (3 * 1024 * 96 + 1024) * 2 + 1024 * 2 + 6 * 8
    per_us = 362.5e9 * 1e-6                                  # bytes per µs per core
    col = (6 * 48 + 96) * 2                                  # routed + shared down bytes of one output column
    store_rate = per_us * (_REG_US / 2) / col                # register-store time per landing byte
    tail = _LAT * (1 - 1 / store_rate)
    # F = L + (need - 2 * 4 * F / reg) / (2 * per_us) + tail
    f_any = (_LAT + need / (2 * per_us) + tail) / (1 + 4 / (_REG_US * per_us))
    f = floors.moe_decode_floor("qwen3-omni talker tp8", 1)
    assert f["tail_us"] == pytest.approx(tail, rel=1e-9)
    assert f["floor_any_us"] == pytest.approx(f_any, rel=1e-9)
    assert 1.7 < f["floor_any_us"] / f["roofline_us"] < 1.8     # talker: the 1.3x goal is below every design
    thinker = floors.moe_decode_floor("qwen3-omni thinker tp8", 1)
    assert thinker["floor_any_us"] / thinker["roofline_us"] < 1.3   # thinker: not ruled out (no floor)
    for m in ("qwen3.5-35b-a3b tp4", "qwen3-omni thinker tp8", "qwen3-omni talker tp8"):
        g = floors.moe_decode_floor(m, 1)
        assert g["roofline_us"] < g["floor_any_us"] < g["floor_design_us"]


def test_no_gated_deltanet_decode_floor():
    """The step's goals are met and the old per-head 512 B-row floor (9.2 µs) was above the kernel's modeled
    8.30 µs (B=1, LNC=2): it was not a floor, so none is listed."""
    assert not hasattr(floors, "gdn_decode_floor")
    assert all(r["kernel"] != "gated_delta_rule_step" for r in floors.floor_table())


def test_render_marks_unreachable_goals():
    text = floors.render(floors.floor_table(), "trn2")
    assert text.count("**not reachable**") == 5        # cost model v3 (packet floor), floors at the default LNC=2
    assert "| moe_decode | qwen3-omni thinker tp8 | T=1 | 13.0 | 15.4 | 1.18x | <= 1.3x: reachable |" in text
    assert "| moe_decode | qwen3-omni talker tp8 | T=1 |" in text


def _case(kernel, shape_start):
    found = [c for c in cases() if c.kernel == kernel and c.shape.startswith(shape_start)]
    assert len(found) >= 1, (kernel, shape_start)
    return dataclasses.replace(found[0], baseline_run=None, baseline_name=None)


_FAST = [("moe_decode", "qwen3-omni talker tp8 T=1 ", lambda: floors.moe_decode_floor("qwen3-omni talker tp8")),
         ("moe_blockwise", "qwen3-omni talker tp8 T=1024 ",
          lambda: floors.moe_prefill_floor("qwen3-omni talker tp8", 1024))]
_SLOW = [("moe_blockwise", "qwen3.5-35b-a3b tp4 T=4096 ",
          lambda: floors.moe_prefill_floor("qwen3.5-35b-a3b tp4", 4096)),
         ("moe_blockwise", "qwen3-omni thinker tp8 T=4096 ",
          lambda: floors.moe_prefill_floor("qwen3-omni thinker tp8", 4096))]


@pytest.mark.parametrize("kernel, shape, floor", _FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in _SLOW])
def test_kernels_are_never_modeled_below_their_floor(kernel, shape, floor):
    res = run_case(_case(kernel, shape))
    assert res.ok, res.error
    f = floor()
    # the default-LNC figure; a case that launches at LNC=1 only (a 1-core floor) has its LNC=1 figure instead
    us = res.modeled_us if res.modeled_us == res.modeled_us else res.lnc1_us
    assert us >= f["floor_any_us"]
    if "floor_design_us" in f:
        assert us >= f["floor_design_us"]


def test_console_output_fits_120_columns_and_states_the_goals(capsys):
    assert floors.main([]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "goal modeled time <= 1.3x the time to stream" in text and "goal modeled time <= 1.5x its roofline" in text
    assert floors.main(["--markdown"]) == 0
    assert "| kernel | model |" in capsys.readouterr().out
