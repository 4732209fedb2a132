"""Cost model: the schedule and the per-engine formulas against hand-computed expectations (modeled time)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nki_kernels.emulator import isa as nisa
from nki_kernels.emulator import jit, record_launches, run
from nki_kernels.emulator import language as nl
from nki_kernels.emulator.costmodel import (
    PARAMS, dma_efficiency, hbm_bytes_per_s, model_launches, model_trace, pe_peak_flops, roofline_us)
from nki_kernels.emulator.targets import get_target
from nki_kernels.testing import assert_close
from nki_kernels.emulator.trace import ACT, DVE, PE, POOL, Access, Instr, Trace

BF16 = np.dtype(ml_dtypes.bfloat16)

# ----------------------------------------------------------------------------------- test kernels


@jit
def _mm_hoisted(lhsT, rhs):
    """out[M, N] = lhsT.T @ rhs (K, M, N multiples of 128/128/512). lhsT is loaded whole first (one DMA per K
    tile, whole rows); then N blocks outer, M blocks inner, one rhs block loaded just before its use."""
    k_total, m_total = lhsT.shape
    n_total = rhs.shape[1]
    n_k, n_m, n_n = k_total // 128, m_total // 128, n_total // 512
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    out = nl.ndarray((m_total, n_total), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    lhs_sb = nl.ndarray((128, n_k, m_total), dtype=lhsT.dtype, buffer=nl.sbuf)
    for k in range(n_k):
        nisa.dma_copy(dst=lhs_sb[:, k, :], src=lhsT[k * 128:(k + 1) * 128, :])
    for n in range(n_n):
        rhs_sb = nl.ndarray((128, n_k, 512), dtype=rhs.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=rhs_sb, src=rhs[:, n * 512:(n + 1) * 512].reshape((n_k, 128, 512)).permute((1, 0, 2)))
        for m in range(n_m):
            if m % n_prog != pid:
                continue
            acc = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
            for k in range(n_k):
                nisa.nc_matmul(acc, lhs_sb[:, k, m * 128:(m + 1) * 128], rhs_sb[:, k, :], accumulate=k > 0)
            res = nl.ndarray((128, 512), dtype=lhsT.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res, src=acc)
            nisa.dma_copy(dst=out[m * 128:(m + 1) * 128, n * 512:(n + 1) * 512], src=res)
    return out


@jit
def _copy(x, free_tile):
    """out = x through SBUF in [128, free_tile] tiles; under LNC=2 tile i goes to program i % 2."""
    rows, cols = x.shape
    out = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.shared_hbm)
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    i = 0
    for r in range(rows // 128):
        for c in range(cols // free_tile):
            if i % n_prog == pid:
                t = nl.ndarray((128, free_tile), dtype=x.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=t, src=x[r * 128:(r + 1) * 128, c * free_tile:(c + 1) * free_tile])
                nisa.dma_copy(dst=out[r * 128:(r + 1) * 128, c * free_tile:(c + 1) * free_tile], src=t)
            i += 1
    return out


# ----------------------------------------------------------------------------------- synthetic traces

_SID = [1000]


def _tile(p=128, f=512, dtype="float32", buffer="sbuf", sid=None):
    if sid is None:
        _SID[0] += 1
        sid = _SID[0]
    item = 2 if dtype == "bfloat16" else 4
    return Access(sid, buffer, dtype, (p, f), p, f, p * f * item, 0, p * f, p * f * item, False)


def _ins(trace, name, eng, reads, writes, **meta):
    trace.append(Instr(len(trace), name, eng, tuple(reads), tuple(writes), meta))


def _act_chain(trace, n, tile):
    for _ in range(n):
        _ins(trace, "activation", ACT, [tile], [tile], op="exp")


def _dve_chain(trace, n, tile):
    for _ in range(n):
        _ins(trace, "tensor_scalar", DVE, [tile], [tile], op="add")


def _us(cycles, ghz):
    return cycles / ghz * 1e-3


# ----------------------------------------------------------------------------------- tests


def _mm_report(k, m, n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m)).astype(BF16)
    b = rng.standard_normal((k, n)).astype(BF16)
    res = run(_mm_hoisted, a, b, target="trn2", lnc=1)
    ref = a.astype(np.float64).T @ b.astype(np.float64)
    assert_close("matmul", ref, res.outputs, dtype="bfloat16")
    return model_launches([res], target="trn2")


def test_large_matmul_at_tensore_roofline():
    k, m = 1024, 1024
    small, large = _mm_report(k, m, 2048), _mm_report(k, m, 4096)
    for rep, n in ((small, 2048), (large, 4096)):
        flops = 2 * k * m * n
        assert rep.flops == flops
        pe_us = flops / pe_peak_flops("trn2") * 1e6
        assert rep.engine_busy_us[PE] == pytest.approx(pe_us, rel=0.01)
        assert rep.roofline_us == pytest.approx(pe_us, rel=1e-6)     # compute-bound shape
    # steady state: every extra FLOP costs TensorE peak time (within 2%); the fixed part is the operand
    # prologue (first loads) and the epilogue (last PSUM evacuation and store)
    extra_flops = 2 * k * m * (4096 - 2048)
    marginal = (large.total_us - small.total_us) / (extra_flops / pe_peak_flops("trn2") * 1e6)
    assert 0.99 <= marginal <= 1.02, marginal
    assert 1.0 <= large.roofline_ratio < 1.2, large.summary()        # includes the fixed part
    assert large.tensor_util > 0.83


def test_fp32_matmul_runs_at_quarter_rate():
    k, m, n = 512, 256, 1024
    rng = np.random.default_rng(1)
    a = rng.standard_normal((k, m)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    r32 = model_launches([run(_mm_hoisted, a, b, target="trn2", lnc=1)])
    r16 = model_launches([run(_mm_hoisted, a.astype(BF16), b.astype(BF16), target="trn2", lnc=1)])
    # 4 passes, each N=512 cycles + the 64-cycle per-pass issue overhead (calibrated on A2/A5)
    p = PARAMS["trn2"]
    assert r32.engine_busy_us[PE] == pytest.approx(4 * (512 + p.pe_fp32_pass_overhead) / 512 * r16.engine_busy_us[PE],
                                                   rel=0.01)


def test_dma_copy_models_at_documented_bandwidth():
    rows, cols = 1024, 8192                      # 32 MiB fp32 read + 32 MiB written, 16 KiB per partition per tile
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    res = run(_copy, x, 4096, target="trn2", lnc=1)
    np.testing.assert_array_equal(res.outputs, x)
    rep = model_launches([res], target="trn2")
    assert rep.hbm_read_bytes == x.nbytes and rep.hbm_write_bytes == x.nbytes
    bw = hbm_bytes_per_s("trn2")
    t = get_target("trn2")
    assert bw == pytest.approx(min(t.hbm_gbps_per_core, t.dma_queues * t.dma_bytes_per_ns_per_queue) * 1e9)
    ideal_us = 2 * x.nbytes / bw * 1e6
    # achieved bandwidth within 10% of the per-core figure (descriptor efficiency 4096/(4096+64), start latency)
    assert ideal_us <= rep.total_us <= 1.10 * ideal_us, rep.summary()
    assert rep.roofline_ratio == pytest.approx(rep.total_us / ideal_us)


def test_small_dma_is_latency_bound():
    x = np.ones((128, 64), np.float32)           # 256 B per partition: far below 2 KiB
    rep = model_launches([run(_copy, x, 64, target="trn2", lnc=1)])
    p = PARAMS["trn2"]
    # load then store, each paying the fixed start latency and moving 256 B runs at their (low) efficiency
    xfer = x.nbytes / (hbm_bytes_per_s("trn2") * dma_efficiency(256, "trn2")) * 1e6
    assert rep.total_us == pytest.approx(2 * (p.dma_fixed_us + xfer), rel=0.02)
    assert 2 * p.dma_fixed_us > 2 * xfer          # latency-bound


def test_independent_chains_on_two_engines_overlap():
    t = get_target("trn2")
    a, b = _tile(), _tile()
    tr_a, tr_b, tr_ab = Trace(), Trace(), Trace()
    _act_chain(tr_a, 20, a)
    _dve_chain(tr_b, 20, b)
    for i in range(20):            # interleaved in program order, still independent
        _act_chain(tr_ab, 1, a)
        _dve_chain(tr_ab, 1, b)
    ta, tb, tab = (model_trace(x, t).total_us for x in (tr_a, tr_b, tr_ab))
    assert tab == pytest.approx(max(ta, tb), rel=1e-9)
    assert tab < 0.75 * (ta + tb)


def test_dependent_chain_across_engines_serialises():
    t = get_target("trn2")
    x = _tile()
    tr = Trace()
    for _ in range(10):
        _act_chain(tr, 1, x)
        _dve_chain(tr, 1, x)
    rep = model_trace(tr, t)
    busy_sum = rep.engine_busy_us[ACT] + rep.engine_busy_us[DVE]
    assert rep.total_us >= busy_sum          # no overlap at all
    p = PARAMS["trn2"]
    lat = 10 * (_us(p.act_fixed_latency, t.act_ghz) + _us(p.dve_fixed_latency, t.dve_ghz))
    assert rep.total_us == pytest.approx(busy_sum + lat, rel=1e-6)


def test_write_after_read_waits_for_the_reader():
    t = get_target("trn2")
    src, dst = _tile(), _tile()
    tr = Trace()
    _ins(tr, "activation", ACT, [src], [dst], op="exp")          # reads src (long)
    _ins(tr, "memset", DVE, [], [src])                            # overwrites src: must wait for the read
    rep = model_trace(tr, t)
    assert rep.total_us >= rep.engine_busy_us[ACT] + rep.engine_busy_us[DVE]


def test_disjoint_partitions_of_one_tile_do_not_depend():
    t = get_target("trn2")

    def trace_with(second):
        big = _tile(128, 512)
        lo = Access(big.sid, "sbuf", "float32", (64, 512), 64, 512, 64 * 512 * 4, 0, 64 * 512, 64 * 512 * 4, False)
        hi = Access(big.sid, "sbuf", "float32", (64, 512), 64, 512, 64 * 512 * 4, 64 * 512, 128 * 512,
                    64 * 512 * 4, False)
        tr = Trace()
        _ins(tr, "memset", POOL, [], [big])
        _ins(tr, "activation", ACT, [lo], [lo], op="exp")
        other = {"lo": lo, "hi": hi, "fresh": _tile(64, 512)}[second]
        _ins(tr, "tensor_scalar", DVE, [other], [other], op="add")
        return model_trace(tr, t).total_us

    # partitions 64..127 do not overlap the ACT instruction's rows 0..63
    # with 'lo' the DVE instruction must wait for the ACT one (RAW + WAR on rows 0..63)
    assert trace_with("lo") > trace_with("hi") + 0.4


def test_lnc2_halves_a_perfectly_split_kernel():
    x = np.ones((1024, 4096), np.float32)
    r1 = run(_copy, x, 2048, lnc=1, target="trn2")
    r2 = run(_copy, x, 2048, lnc=2, target="trn2")
    np.testing.assert_array_equal(r2.outputs, x)
    m1, m2 = model_launches([r1]), model_launches([r2])
    assert len(m2.launches[0].cores) == 2
    assert m2.hbm_bytes == m1.hbm_bytes
    assert m2.total_us == pytest.approx(m1.total_us / 2, rel=0.05)
    # compute-bound split too
    a = np.ones((256, 512), BF16)
    b = np.ones((256, 2048), BF16)
    c1 = model_launches([run(_mm_hoisted, a, b, lnc=1)])
    c2 = model_launches([run(_mm_hoisted, a, b, lnc=2)])
    assert c2.engine_busy_us[PE] == pytest.approx(c1.engine_busy_us[PE] / 2, rel=0.01)


def test_matmul_cycle_formula_and_minimum():
    t = get_target("trn1")
    tr = Trace()
    st = _tile(128, 128, "bfloat16")
    mv = _tile(128, 32, "bfloat16")
    ps = _tile(128, 32, "float32", "psum")
    for _ in range(100):
        _ins(tr, "nc_matmul", PE, [st, mv], [ps], K=128, M=128, N=32, fp32=False)
    rep = model_trace(tr, t)
    # N=32 < 64: every instruction costs the 64-cycle minimum; the stationary is loaded once (M/4 cycles)
    assert rep.engine_busy_us[PE] == pytest.approx(_us(100 * 64 + 128 / 4, t.pe_ghz), rel=1e-6)


def test_vector_costs_follow_documented_formulas():
    t = get_target("trn1")                 # NC-v2 table, no perf mode
    p = PARAMS["trn1"]
    x, y, z = _tile(128, 1024), _tile(128, 1024), _tile(128, 1024)
    for name, reads, cyc in (("tensor_tensor", [x, y], 2048), ("tensor_scalar", [x], 1024),
                             ("reciprocal", [x], 8192), ("tensor_tensor_scan", [x, y], 2048)):
        tr = Trace()
        _ins(tr, name, DVE, reads, [z], op="add")
        rep = model_trace(tr, t)
        assert rep.engine_busy_us[DVE] == pytest.approx(_us(cyc, t.dve_ghz), rel=1e-6), name
        assert rep.total_us == pytest.approx(_us(cyc + p.dve_fixed_latency, t.dve_ghz), rel=1e-6), name


def test_bn_stats_and_bn_aggr_costs_follow_documented_formulas():
    """isa: bn_stats max(MIN_II, N), bn_aggr max(MIN_II, 13 N / 3), N = input elements per partition (VectorE);
    the VectorE minimum is 32 cycles on NC-v2 since the v6 round (dve_min_ii), 64 on trn2."""
    t = get_target("trn1")
    for name, f_in, f_out, cyc in (("bn_stats", 512, 6, 512), ("bn_aggr", 96, 2, 416), ("bn_aggr", 6, 2, 32)):
        tr = Trace()
        _ins(tr, name, DVE, [_tile(128, f_in)], [_tile(128, f_out)])
        assert model_trace(tr, t).engine_busy_us[DVE] == pytest.approx(_us(cyc, t.dve_ghz), rel=1e-6), name
    t2 = get_target("trn2")
    tr = Trace()
    _ins(tr, "bn_aggr", DVE, [_tile(128, 6)], [_tile(128, 2)])
    assert model_trace(tr, t2).engine_busy_us[DVE] == pytest.approx(_us(64, t2.dve_ghz), rel=1e-6)


def test_report_fields_and_launch_overhead_are_separate():
    x = np.ones((128, 512), np.float32)
    with record_launches() as runs:
        run(_copy, x, 512, lnc=1)
        run(_copy, x, 512, lnc=1)
    rep = model_launches(runs, target="trn2")
    assert rep.n_launches == 2 and len(rep.launches) == 2
    assert rep.total_us == pytest.approx(sum(L.device_us for L in rep.launches))
    assert rep.launch_overhead_us == pytest.approx(2 * PARAMS["trn2"].launch_overhead_us)
    assert rep.total_with_launch_us == pytest.approx(rep.total_us + rep.launch_overhead_us)
    for key in ("pe", "act", "dve", "pool", "dma"):
        assert key in rep.engine_busy_us and key in rep.engine_util
    assert rep.hbm_bytes == rep.hbm_read_bytes + rep.hbm_write_bytes == 4 * x.nbytes
    assert rep.flops == 0 and rep.tensor_util == 0.0
    assert rep.roofline_us == pytest.approx(roofline_us(0, 4 * x.nbytes, "trn2"))


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="unknown target"):
        model_launches([], target="trn9")


def test_tile_buffer_rotation_limits_prefetch():
    """A loop-body tile rotates through `tile_buffers` buffers: with one buffer, load k+1 waits for store k."""
    import dataclasses
    x = np.ones((128, 16 * 1024), np.float32)
    res = run(_copy, x, 1024, target="trn2", lnc=1)
    assert getattr(res.traces[0], "alloc_sites", None), "allocation sites are recorded"
    base = PARAMS["trn2"]
    t1, t3, t64 = (model_launches([res], params=dataclasses.replace(base, tile_buffers=n)).total_us
                   for n in (1, 3, 64))
    assert t1 > 1.5 * t3
    assert t3 >= t64
    # one buffer: every tile pays load + store latency in series
    assert t1 >= 16 * 2 * base.dma_fixed_us


@jit
def _copy_keep(x, free_tile):
    """Like _copy but every tile is kept alive in a list: no buffer can be reused."""
    rows, cols = x.shape
    out = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.shared_hbm)
    kept = []
    for c in range(cols // free_tile):
        t = nl.ndarray((128, free_tile), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[:, c * free_tile:(c + 1) * free_tile])
        nisa.dma_copy(dst=out[:, c * free_tile:(c + 1) * free_tile], src=t)
        kept.append(t)
    return out


def test_tiles_kept_alive_are_not_rotated():
    import dataclasses
    x = np.ones((128, 8 * 1024), np.float32)
    res = run(_copy_keep, x, 1024, target="trn2", lnc=1)
    two = dataclasses.replace(PARAMS["trn2"], tile_buffers=2)
    many = dataclasses.replace(PARAMS["trn2"], tile_buffers=64)
    assert model_launches([res], params=two).total_us == pytest.approx(
        model_launches([res], params=many).total_us, rel=1e-9)


def test_short_dma_rows_lose_bandwidth():
    """Same bytes, 512 B rows vs 4 KiB rows: the DMA busy time grows by the efficiency curve."""
    p = PARAMS["trn2"]
    x = np.ones((1024, 1024), np.float32)          # rows of 4 KiB
    wide = model_launches([run(_copy, x, 1024, target="trn2", lnc=1)])
    narrow = model_launches([run(_copy, x, 128, target="trn2", lnc=1)])   # tiles of 128 columns: 512 B runs
    expect = dma_efficiency(4096, "trn2", p) / dma_efficiency(512, "trn2", p)
    assert narrow.engine_busy_us["dma"] == pytest.approx(expect * wide.engine_busy_us["dma"], rel=0.01)
    assert narrow.hbm_bytes == wide.hbm_bytes


def test_dma_descriptors_stop_at_on_chip_partition_rows():
    """A contiguous 64 KiB HBM block landing in 512 B SBUF partition rows moves at the 512 B-run efficiency:
    partitions are separate address ranges, so no descriptor spans two of them."""
    p = PARAMS["trn2"]
    wide = model_launches([run(_copy, np.ones((1024, 1024), np.float32), 1024, target="trn2", lnc=1)])
    tall = np.ones((8192, 128), np.float32)      # every [128, 128] tile is one contiguous block in HBM
    narrow = model_launches([run(_copy, tall, 128, target="trn2", lnc=1)])
    expect = dma_efficiency(4096, "trn2", p) / dma_efficiency(512, "trn2", p)
    assert narrow.engine_busy_us["dma"] == pytest.approx(expect * wide.engine_busy_us["dma"], rel=0.01)


def test_trn2_vector_bf16_perf_mode():
    t = get_target("trn2")
    tr32, tr16 = Trace(), Trace()
    x32, y32 = _tile(128, 4096), _tile(128, 4096)
    x16, y16 = _tile(128, 4096, "bfloat16"), _tile(128, 4096, "bfloat16")
    _ins(tr32, "tensor_scalar", DVE, [x32], [y32], op="multiply")
    _ins(tr16, "tensor_scalar", DVE, [x16], [y16], op="multiply")
    b32 = model_trace(tr32, t).engine_busy_us[DVE]
    b16 = model_trace(tr16, t).engine_busy_us[DVE]
    # trainium2_arch.rst: VectorE datapath 256 elements / cycle for fp32, 512 for bf16 (performance mode), over
    # 128 partitions at 0.96 GHz
    assert b32 == pytest.approx(_us(4096 / (256 / 128), t.dve_ghz), rel=1e-6)
    assert b16 == pytest.approx(_us(4096 / (512 / 128), t.dve_ghz), rel=1e-6)
    # trn1 has no performance mode
    assert model_trace(tr16, get_target("trn1")).engine_busy_us[DVE] == pytest.approx(
        _us(4096, get_target("trn1").dve_ghz), rel=1e-6)


def test_reorder_window_lets_independent_work_fill_gaps():
    """An engine waiting on a slow producer can run later independent instructions first (window > 0)."""
    import dataclasses
    t = get_target("trn2")
    tr = Trace()
    slow_src, a = _tile(128, 8192, "float32", "hbm"), _tile(128, 8192)
    _ins(tr, "dma_copy", "dma", [slow_src], [a], bytes=128 * 8192 * 4)
    _ins(tr, "tensor_scalar", DVE, [a], [a], op="add")                 # waits for the DMA
    for _ in range(8):
        b = _tile(128, 512)
        _ins(tr, "tensor_scalar", DVE, [b], [b], op="add")             # independent
    strict = model_trace(tr, t, params=dataclasses.replace(PARAMS["trn2"], reorder_window=0)).total_us
    loose = model_trace(tr, t).total_us
    assert loose < strict


def _strided_tile_accesses():
    _SID[0] += 1
    sid = _SID[0]
    F = 8 * 1024

    def acc(shape, epp, lo, hi, contig):
        return Access(sid, "sbuf", "float32", shape, 128, epp, 128 * epp * 4, lo, hi, contig, False)

    full = acc((128, 8, 1024), F, 0, 128 * F, 128 * F * 4)
    col = [acc((128, 8, 128), 1024, m * 128, 127 * F + 7 * 1024 + m * 128 + 128, 512) for m in range(8)]

    def kread(k, m):
        return acc((128, 128), 128, k * 1024 + m * 128, 127 * F + k * 1024 + m * 128 + 128, 512)
    return full, col, kread


def test_strided_column_slices_of_a_3d_tile_are_told_apart():
    """t[:, :, 128:256] of a [128, 8, 1024] tile does not overlap t[:, 3, 0:128]; t[:, :, 0:128] does."""
    t = get_target("trn2")

    def run_with(m):
        full, col, kread = _strided_tile_accesses()
        tr = Trace()
        _ins(tr, "memset", POOL, [], [full])
        _ins(tr, "activation", ACT, [kread(3, 0)], [_tile(128, 8192)], op="exp")    # long read of block (3, 0)
        _ins(tr, "memset", DVE, [], [col[m]])                                      # overwrite column block m
        return model_trace(tr, t, timeline=True).timeline

    other, same = run_with(1), run_with(0)
    act_end = same[1][5]
    assert other[2][4] < act_end          # column block 1 starts before the read of block (3, 0) ends
    assert same[2][4] >= same[1][4] + 8192 / t.act_ghz * 1e-3 - 1e-9     # column block 0 waits for it
