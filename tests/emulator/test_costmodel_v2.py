"""Cost model v2: DMA engines per partitions, DMA efficiency curve, descriptor generators (hardware / software DGE),
the VectorE/GpSimd shared port, presets and the honest roofline (docs/cost-model.md)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nki_kernels.emulator import isa as nisa
from nki_kernels.emulator import jit, run
from nki_kernels.emulator import language as nl
from nki_kernels.emulator.costmodel import (
    PARAMS, PRESETS, dma_efficiency, hbm_bytes_per_s, model_launches, model_trace, pe_peak_flops, preset_params,
    roofline_us, use_params)
from nki_kernels.emulator.targets import get_target
from nki_kernels.emulator.trace import DVE, POOL, Access, Instr, Trace


@jit
def _load(x):
    t = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    return None


def _dma_us(x, target="trn2"):
    return model_launches([run(_load, x, target=target, lnc=1)]).device_us


def test_fewer_partitions_use_fewer_dma_engines():
    """Same 64 KiB, same 4 KiB+ runs: 8 partitions run on one engine (23 B/ns), 128 partitions on all 16."""
    t = get_target("trn2")
    p = PARAMS["trn2"]
    narrow = np.ones((8, 2048), np.float32)          # 8 KiB per partition, one engine
    wide = np.ones((128, 128), np.float32)           # 512 B per partition, 16 engines
    one_engine = narrow.nbytes / (t.dma_bytes_per_ns_per_queue * 1e9 * dma_efficiency(8192, t)) * 1e6
    assert _dma_us(narrow) == pytest.approx(p.dma_fixed_us + one_engine, rel=1e-6)
    all_engines = wide.nbytes / (hbm_bytes_per_s(t) * dma_efficiency(512, t)) * 1e6
    assert _dma_us(wide) == pytest.approx(p.dma_fixed_us + all_engines, rel=1e-6)


# Relative DMA throughput against bytes per partition (p_dim = 128), read off the published figure
# (nki-dma-overview.rst, "DMA Throughput varying Bytes per Partition"; y normalised to the 32 KiB point).
_PUBLISHED_DMA_CURVE = {64: 0.026, 128: 0.050, 256: 0.103, 512: 0.209, 1024: 0.424, 2048: 0.813, 4096: 0.966,
                        8192: 0.983, 16384: 0.990}


def test_dma_efficiency_follows_the_published_curve_on_trn1():
    """NeuronCore-v2: within 0.05 of the published curve at every plotted size, monotone, and saturated at
    >= 4 KiB."""
    e = {b: dma_efficiency(b, "trn1") for b in _PUBLISHED_DMA_CURVE}
    for b, want in _PUBLISHED_DMA_CURVE.items():
        assert e[b] == pytest.approx(want, abs=0.05), (b, e[b], want)
    sizes = sorted(e)
    assert all(e[a] <= e[b] for a, b in zip(sizes, sizes[1:]))
    assert dma_efficiency(65536, "trn1") > 0.99


@jit
def _load_cols(x, cols):
    t = nl.ndarray((x.shape[0], cols), x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[:, 0:cols])
    return None


def test_isolated_transfer_with_separate_hbm_rows_follows_the_published_curve_on_trn1():
    """v13: one [128, F] load whose partition rows are separate HBM runs (the first F columns of a wider tensor), on
    its own, moves at the published curve's rate: its modeled time minus the fixed latency is the bytes at the
    core's bandwidth times the curve's efficiency at F bytes per partition (one packet per partition row)."""
    t = get_target("trn1")
    p = PARAMS["trn1"]
    x = np.ones((128, 8192), np.float32)
    for row, want in _PUBLISHED_DMA_CURVE.items():
        if row > 8192 * 4 // 2:
            continue
        cols = row // 4 if row >= 4 else 1
        us = model_launches([run(_load_cols, x, cols, target="trn1", lnc=1)]).device_us - p.dma_fixed_us
        eff = 128 * cols * 4 / (hbm_bytes_per_s(t) * us * 1e-6)
        assert eff == pytest.approx(want, abs=0.05), (row, eff, want)


@pytest.mark.parametrize("target", ["trn1", "trn2", "trn3"])
def test_packet_spans_one_engines_rows_only_on_trn1_and_only_over_contiguous_hbm(target):
    """v13 (NeuronCore-v2): a [128, F] load from a contiguous HBM tensor is one packet of 8 rows (8F bytes) per engine
    (nki-dma-overview.rst example 2: one 2 KiB operation of 8 rows x 256 B per engine; the Neuron Explorer DMA guide:
    packets "one per engine per group of SBUF partitions"); 4 partitions on one engine are one packet of 4 rows
    (example 1). The same columns cut from a wider tensor (rows separate in HBM) keep one packet per row. trn2 /
    trn3 keep one packet per partition row (their v11 knee was fitted per row)."""
    tg = get_target(target)
    p = PARAMS[target]
    span = target == "trn1"
    assert p.dma_packet_spans_rows is span
    for parts, cols in ((128, 8), (128, 64), (4, 64)):
        x = np.ones((parts, cols), np.float32)
        engines = -(-parts // 8)
        rows = (parts // engines) if span else 1
        bw = min(hbm_bytes_per_s(tg), engines * tg.dma_bytes_per_ns_per_queue * 1e9)
        want = p.dma_fixed_us + x.nbytes / (bw * dma_efficiency(4 * cols * rows, tg)) * 1e6
        assert _dma_us(x, target) == pytest.approx(want, rel=1e-6), (parts, cols)
        wide = np.ones((parts, 2 * cols), np.float32)
        sliced = model_launches([run(_load_cols, wide, cols, target=target, lnc=1)]).device_us
        assert sliced == pytest.approx(p.dma_fixed_us + x.nbytes / (bw * dma_efficiency(4 * cols, tg)) * 1e6,
                                       rel=1e-6), (parts, cols)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_dma_efficiency_on_v3_saturates_at_512_bytes(target):
    """NeuronCore-v3 / v4 (v11): rows of 512 B and longer at the full engine rate (the published trn2 rope tiles
    of 128, 256 and 512 fp32 columns ran within 2% of each other); shorter rows a fixed time per packet, so
    throughput proportional to bytes; the preset range 256-1024 B moves it."""
    assert dma_efficiency(512, target) == dma_efficiency(2048, target) == dma_efficiency(65536, target) == 1.0
    for b in (8, 64, 128, 256):
        assert dma_efficiency(b, target) == pytest.approx(b / 512)
    assert dma_efficiency(512, target, preset_params("dma-eff-high", target)) == pytest.approx(0.5)
    assert dma_efficiency(256, target, preset_params("dma-eff-low", target)) == 1.0
    # the trn1 range is the published curve's knee, 2048-3072 B, whatever the v3 range
    assert (preset_params("dma-eff-low", "trn1").dma_knee_bytes,
            preset_params("dma-eff-high", "trn1").dma_knee_bytes) == (2048.0, 3072.0)


def test_element_strided_dma_pays_the_per_element_rate():
    """A packet gathered element by element (a transposing load) costs the packet floor plus dma_elem_ns per
    element on top; the same row read contiguously costs the floor alone."""
    t = get_target("trn1")
    p = PARAMS["trn1"]
    row = 128 * 4                                     # 128 fp32 elements per partition row
    contiguous = dma_efficiency(row, t, p)
    strided = dma_efficiency(row, t, p, chunks=128)
    floor_ns = max(row, p.dma_knee_bytes) / t.dma_bytes_per_ns_per_queue
    assert contiguous == pytest.approx((row / t.dma_bytes_per_ns_per_queue) / floor_ns)
    assert strided == pytest.approx((row / t.dma_bytes_per_ns_per_queue) / (floor_ns + 127 * p.dma_elem_ns))
    lo, hi = preset_params("dma-elem-low", "trn1"), preset_params("dma-elem-high", "trn1")
    assert dma_efficiency(row, t, hi, chunks=128) < strided < dma_efficiency(row, t, lo, chunks=128)


@jit
def _load_transposed(x):
    """x [S, D] fp32 in HBM -> [D, S] in SBUF through a permuted (element-strided) view, then stored back."""
    s, d = x.shape
    xt = nl.ndarray((d, s), x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xt, src=x.permute((1, 0)))
    out = nl.ndarray((d, s), x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=xt)
    return out


def test_transposing_load_is_charged_per_element_not_per_descriptor():
    """[128, 64] fp32 loaded transposed: 64 partition rows of 128 strided elements each, on all 16 engines (a
    DMA transpose uses them cooperatively). The engine time is rows x (packet floor + 127 elements x
    dma_elem_ns), not 8192 full packets."""
    t = get_target("trn1")
    p = PARAMS["trn1"]
    x = np.arange(128 * 64, dtype=np.float32).reshape(128, 64)
    res = run(_load_transposed, x, target="trn1", lnc=1)
    np.testing.assert_array_equal(res.outputs, x.T)
    rep = model_trace(res.traces[0], "trn1", timeline=True)
    load = rep.timeline[0]
    engines = t.dma_queues
    per_row_ns = max(512, p.dma_knee_bytes) / t.dma_bytes_per_ns_per_queue + 127 * p.dma_elem_ns
    expect_us = 64 * per_row_ns / engines * 1e-3 + p.dma_fixed_us
    assert load[5] - load[4] == pytest.approx(expect_us, rel=1e-6)
    assert load[5] - load[4] < 8192 * p.dma_knee_bytes / t.dma_bytes_per_ns_per_queue / 16 * 1e-3


@jit
def _dynamic_rows(table, idx, indirect):
    """Gather one row per partition (vector_offset: software DGE) or read a row block at a runtime offset
    (scalar_offset: hardware DGE on trn2)."""
    i_sb = nl.ndarray(idx.shape, idx.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=i_sb, src=idx)
    rows = nl.ndarray((idx.shape[0], table.shape[1]), table.dtype, buffer=nl.sbuf)
    f = table.shape[1]
    if indirect:
        src = table.ap(pattern=[[f, idx.shape[0]], [1, f]], vector_offset=i_sb, indirect_dim=0)
    else:
        src = table.ap(pattern=[[f, idx.shape[0]], [1, f]], scalar_offset=i_sb[0:1, 0:1])
    nisa.dma_copy(dst=rows, src=src)
    return None


def test_software_dge_charges_gpsimd_and_hardware_dge_adds_latency():
    t = get_target("trn2")
    p = PARAMS["trn2"]
    table = np.ones((256, 512), np.float32)
    idx = np.arange(16, dtype=np.int32).reshape(16, 1)
    sw = model_launches([run(_dynamic_rows, table, idx, True, target="trn2", lnc=1)])
    hw = model_launches([run(_dynamic_rows, table, idx, False, target="trn2", lnc=1)])
    # software DGE: GpSimd writes the descriptors (max(600, N) cycles), hardware DGE: none on GpSimd
    assert sw.engine_busy_us[POOL] == pytest.approx(max(p.swdge_min_cycles, 512) / t.pool_ghz * 1e-3)
    assert hw.engine_busy_us[POOL] == 0.0
    tr = run(_dynamic_rows, table, idx, False, target="trn2", lnc=1).traces[0]
    assert [i.meta.get("dge") for i in tr if i.engine == "dma"] == ["none", "hwdge"]
    no_dge = model_trace(tr, t, params=dataclasses.replace(p, hwdge_us=0.0)).total_us
    assert hw.device_us == pytest.approx(no_dge + p.hwdge_us, rel=1e-6)


def _tile(sid, dtype="bfloat16", p=128, f=2048):
    item = 2 if dtype == "bfloat16" else 4
    return Access(sid, "sbuf", dtype, (p, f), p, f, p * f * item, 0, p * f, f * item, False, f)


def test_vector_perf_mode_and_gpsimd_share_a_port_on_trn2():
    """A bf16 tensor_copy in VectorE perf mode and an independent GpSimd op cannot overlap on trn2; fp32
    (no perf mode) can. On trn1 VectorE and GpSimd never access SBUF in parallel."""
    def trace(dtype):
        tr = Trace()
        tr.append(Instr(0, "tensor_copy", DVE, (_tile(1, dtype),), (_tile(2, dtype),), {}))
        tr.append(Instr(1, "iota", POOL, (), (_tile(3, "float32"),), {}))
        return tr

    t2 = get_target("trn2")
    for dtype, shared in (("bfloat16", True), ("float32", False)):
        rep = model_trace(trace(dtype), t2)
        busy = rep.engine_busy_us[DVE] + rep.engine_busy_us[POOL]
        overlapped = rep.total_us < busy
        assert overlapped is not shared, dtype
    rep1 = model_trace(trace("float32"), get_target("trn1"))
    assert rep1.total_us >= rep1.engine_busy_us[DVE] + rep1.engine_busy_us[POOL]


def test_vector_perf_mode_rules():
    from nki_kernels.emulator.costmodel import dve_perf_factor
    t2, p = get_target("trn2"), PARAMS["trn2"]
    bf = _tile(1)
    strided = dataclasses.replace(bf, contig_bytes=2)
    psum = dataclasses.replace(bf, buffer="psum")
    f32 = _tile(2, "float32")
    cases = [("tensor_copy", (bf,), (bf,), 4.0), ("tensor_scalar", (strided,), (bf,), 2.0),
             ("tensor_copy", (psum,), (bf,), 2.0), ("tensor_tensor", (bf, bf), (bf,), 2.0),
             ("tensor_tensor", (psum, bf), (bf,), 1.0), ("tensor_copy", (f32,), (bf,), 1.0)]
    for name, reads, writes, want in cases:
        assert dve_perf_factor(Instr(0, name, DVE, reads, writes, {}), t2, p) == want, (name, want)
    assert dve_perf_factor(Instr(0, "tensor_copy", DVE, (bf,), (bf,), {}), get_target("trn1"), PARAMS["trn1"]) == 1


def test_presets_move_the_uncertain_constants_and_restore():
    base = PARAMS["trn2"]
    lo, hi = preset_params("low", "trn2"), preset_params("high", "trn2")
    assert lo.dma_fixed_us < base.dma_fixed_us < hi.dma_fixed_us
    assert lo.dma_knee_bytes < base.dma_knee_bytes < hi.dma_knee_bytes
    assert lo.dma_elem_ns < base.dma_elem_ns < hi.dma_elem_ns
    assert hi.reorder_window < base.reorder_window < lo.reorder_window
    x = np.ones((128, 64), np.float32)
    t_default = _dma_us(x)
    with use_params("dma-latency-high"):
        assert PARAMS["trn2"].dma_fixed_us == 2.0
        assert _dma_us(x) == pytest.approx(t_default + 2.0 - base.dma_fixed_us)
    assert PARAMS["trn2"] == base
    assert {"default", "low", "high", "dma-latency-low", "dge-high"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown cost-model preset"):
        preset_params("nope", "trn2")


def test_roofline_ignores_the_kernels_precision_and_uses_fp8_peak_for_fp8_inputs():
    t = get_target("trn2")
    flops = 10 ** 12
    bf16 = roofline_us(flops, 0, t)
    assert roofline_us(flops, 0, t, fp32_flops=flops) == bf16           # fp32 choice does not raise the bound
    assert roofline_us(flops, 0, t, fp8=True) == pytest.approx(bf16 / 2)
    assert pe_peak_flops(t, fp8=True) == 2 * pe_peak_flops(t)
    assert pe_peak_flops("trn1", fp8=True) == pe_peak_flops("trn1")      # no fp8 double mode on NeuronCore-v2


def test_gdn_useful_flops_are_the_minimal_chunked_count():
    from microbench.roofline import gdn_chunked_flops
    c, dk, dv = 64, 128, 128
    # per token: the C-wide products on their triangles (K K^T, Q K^T, W, U, P V') + the state-wide W S, Q S, K^T V'
    macs_per_token = (c / 2) * (dk + dk + dk + dv + dv) + 3 * dk * dv
    assert gdn_chunked_flops(1, 1, 1, dk, dv, c) == 2 * macs_per_token
    assert gdn_chunked_flops(2, 10, 8, dk, dv, c) == 160 * 2 * macs_per_token


def test_every_preset_resolves_to_numbers_on_every_target():
    """Per-target preset values (v11's `dma-eff`) resolve for each target; no dict reaches CostParams."""
    import dataclasses

    from nki_kernels.emulator.targets import TARGETS
    for name in PRESETS:
        for tname in TARGETS:
            p = preset_params(name, tname)
            for f in dataclasses.fields(p):
                assert not isinstance(getattr(p, f.name), dict), (name, tname, f.name)
    assert preset_params("low", "trn1").dma_knee_bytes == 2048.0
    assert preset_params("high", "trn2").dma_knee_bytes == 1024.0
