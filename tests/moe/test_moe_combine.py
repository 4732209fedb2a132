"""moe_blockwise's two combines (on-chip nc_n_gather combine, DMA combine): both against the float64 reference for
every dtype, with and without the shared expert, dense and top-k affinities, LNC 1 and 2; the trace-time rule that
picks one; non-finite containment and bad-value robustness of the on-chip path."""
import ml_dtypes
import numpy as np
import pytest
from _moe_inputs import dense_affinities, moe_problem
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import moe_block_mapping, moe_blockwise
from nki_kernels.emulator import record_launches
from nki_kernels.emulator.targets import use_target
from nki_kernels.moe import blockwise as bw
from nki_kernels.moe import combine as cb
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.moe.routing import static_num_blocks
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

_DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _problem(rng, t, h, e, inter, k, si, dtype):
    x, gu, dn, sh, w, idx = moe_problem(rng, t, h, e, inter, k, si, True)
    dt = _DT[dtype]
    cast = (lambda a: None if a is None else a.astype(dt))
    sh = None if sh is None else tuple(cast(a) for a in sh)
    return cast(x), cast(gu), cast(dn), sh, cast(w), idx


@given(t=st.integers(1, 140), h=st.sampled_from([128, 256, 384]), e=st.integers(1, 7),
       inter=st.sampled_from([16, 48, 96, 128, 192]), data=st.data(), block_size=st.sampled_from([8, 32, 64, 160]),
       shared_inter=st.sampled_from([0, 32, 96]), dtype=st.sampled_from(sorted(_DT)), dense=st.booleans(),
       lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_onchip_combine_matches_reference(t, h, e, inter, data, block_size, shared_inter, dtype, dense, lnc, seed):
    k = data.draw(st.integers(1, min(e, 4)))
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = _problem(rng, t, h, e, inter, k, shared_inter, dtype)
    tpos, b2e = moe_block_mapping(idx, e, block_size)
    if dense:
        out = moe_blockwise(x, dense_affinities(w, idx, e), gu, dn, tpos, b2e, block_size, shared=sh,
                            max_experts_per_token=k, lnc=lnc, combine="onchip")
    else:
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, block_size, shared=sh, top_k_index=idx, lnc=lnc,
                            combine="onchip")
    assert out.shape == (t, h) and out.dtype == x.dtype
    assert_close("onchip", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype=dtype)


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("shared_inter", [0, 64])
def test_both_combines_agree(lnc, shared_inter):
    rng = np.random.default_rng(3)
    x, gu, dn, sh, w, idx = _problem(rng, 300, 512, 6, 64, 3, shared_inter, "bfloat16")
    tpos, b2e = moe_block_mapping(idx, 6, 128)
    outs = {c: moe_blockwise(x, w, gu, dn, tpos, b2e, 128, shared=sh, top_k_index=idx, lnc=lnc, combine=c)
            for c in ("onchip", "dma")}
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    for c, out in outs.items():
        assert_close(c, ref, out, dtype="bfloat16")
    assert_close("onchip vs dma", np.asarray(outs["dma"], np.float64), outs["onchip"], dtype="bfloat16")


@pytest.mark.parametrize("mode", cb.INDEX_MODES)
def test_group_tiles_split_every_tile_once(mode):
    """H = 640 (5 tiles) with a forced small group: groups of 2, 2, 1 (LNC=1) and 2 + 1 per core (LNC=2); each
    index mode (resident uint32 / uint16, streamed per 128-token chunk; T = 140: a full chunk and a partial one)."""
    rng = np.random.default_rng(5)
    t = 140
    x, gu, dn, sh, w, idx = _problem(rng, t, 640, 4, 32, 2, 32, "float32")
    tpos, b2e = moe_block_mapping(idx, 4, 16)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    inv = bw.token_slots(tpos, t, 2).astype(np.uint16 if mode == "u16" else np.uint32)
    table = bw.routing_table(idx, w)
    for lnc, gts in ((1, (1, 2, 5)), (2, (1, 2))):
        for gt in gts:
            out = bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *sh, table, 16, 0, gt,
                          mode, lnc=lnc)
            assert_close(f"LNC={lnc} GT={gt} {mode}", ref, out)


def _onchip_direct(x, w, idx, gu, dn, sh, e, bs, lnc, gt, mode, dense=False, x_gather="dma"):
    """The on-chip kernel with a forced plan (the wrapper picks the resident uint32 index and the on-chip x
    gather whenever they fit)."""
    t, k = idx.shape
    tpos, b2e = moe_block_mapping(idx, e, bs)
    inv = bw.token_slots(tpos, t, k).astype(np.uint16 if mode == "u16" else np.uint32)
    s3 = sh if sh is not None else (None, None, None)
    if dense:
        aff = dense_affinities(w, idx, e).reshape(t * e, 1)
        return bw.call(cb.moe_blockwise_onchip_kernel, x, aff, gu, dn, tpos, b2e, inv, *s3, None, bs, 0, gt, mode,
                       x_gather, lnc=lnc)
    return bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *s3, bw.routing_table(idx, w),
                   bs, 0, gt, mode, x_gather, lnc=lnc)


@given(t=st.integers(1, 300), h=st.sampled_from([128, 256, 384]), e=st.integers(1, 6),
       inter=st.sampled_from([16, 48, 96, 128]), data=st.data(), block_size=st.sampled_from([8, 32, 64, 160]),
       shared_inter=st.sampled_from([0, 32]), dtype=st.sampled_from(sorted(_DT)), dense=st.booleans(),
       lnc=st.sampled_from([1, 2]), mode=st.sampled_from(["u16", "stream"]),
       x_gather=st.sampled_from(["dma", "onchip"]),
       seed=st.integers(0, 2 ** 16))
def test_index_modes_match_reference(t, h, e, inter, data, block_size, shared_inter, dtype, dense, lnc, mode, x_gather,
                                     seed):
    """The large-T index modes (resident uint16 widened per chunk; token-chunked: loaded per 128-token chunk
    and group) against the float64 reference: token counts across chunk boundaries, every GT that splits the
    core's tiles, phase A's x gathered by DMA or on chip (a core's first min(8, blocks / 8) blocks by DMA)."""
    k = data.draw(st.integers(1, min(e, 4)))
    gt = data.draw(st.integers(1, -(-(h // 128) // lnc)))
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = _problem(rng, t, h, e, inter, k, shared_inter, dtype)
    out = _onchip_direct(x, w, idx, gu, dn, sh, e, block_size, lnc, gt, mode, dense, x_gather)
    assert out.shape == (t, h) and out.dtype == x.dtype
    assert_close(f"index mode {mode}", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype=dtype)


@pytest.mark.parametrize("x_gather", ["dma", "onchip"])
@pytest.mark.parametrize("mode", ["u16", "stream"])
@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e38])
def test_bad_value_in_one_token_stays_there_index_modes(lnc, bad, mode, x_gather):
    rng = np.random.default_rng(12)
    t, e, k = 200, 5, 3
    x, gu, dn, sh, w, idx = _problem(rng, t, 256, e, 48, k, 32, "float32")
    x[150, 3] = bad
    w[20, 1] = np.nan if bad != 3e38 else w[20, 1]
    out = np.asarray(_onchip_direct(x, w, idx, gu, dn, sh, e, 32, lnc, 1, mode, x_gather=x_gather), np.float64)
    clean = np.ones(t, bool)
    clean[[150, 20]] = False
    assert np.all(np.isfinite(out[clean]))
    assert_close("clean tokens", moe_decode_reference(x, idx, w, gu, dn, sh)[clean], out[clean])
    assert not np.all(np.isfinite(out[150]))


@pytest.mark.parametrize("lnc", [1, 2])
def test_onchip_x_gather_reloads_slot_ids_and_keeps_bad_values_in_their_token(lnc):
    """Phase A's on-chip x gather over more than _REP_BLOCKS blocks per core (the replicated slot ids reloaded,
    on a core whose blocks start past 0 at LNC=2) after its first 8 blocks by DMA: against the reference, and a
    NaN in one token's x reaches only that token."""
    rng = np.random.default_rng(21)
    t, e, k = 300, 6, 4
    x, gu, dn, sh, w, idx = _problem(rng, t, 256, e, 48, k, 32, "float32")
    x[150, 3] = np.nan
    n_blocks = len(moe_block_mapping(idx, e, 8)[1])
    assert n_blocks // lnc >= max(bw._REP_BLOCKS + 1, bw._EARLY_BLOCKS ** 2)   # reloads; all 8 early blocks
    out = np.asarray(_onchip_direct(x, w, idx, gu, dn, sh, e, 8, lnc, 1, "u32", x_gather="onchip"), np.float64)
    clean = np.arange(t) != 150
    assert np.all(np.isfinite(out[clean])) and not np.all(np.isfinite(out[150]))
    assert_close("clean tokens", moe_decode_reference(x, idx, w, gu, dn, sh)[clean], out[clean])


@pytest.mark.parametrize("x_gather", ["dma", "onchip"])
@pytest.mark.parametrize("mode", ["u16", "stream"])
def test_index_mode_trace_does_not_depend_on_routing(mode, x_gather):
    """Two routings with the same shapes (T, N, B, KMAX) give the same instruction sequence."""
    names = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        x, gu, dn, sh, w, idx = _problem(rng, 150, 256, 4, 32, 2, 32, "bfloat16")
        n_blocks = static_num_blocks(150, 2, 4, 64)
        tpos, b2e = moe_block_mapping(idx, 4, 64, num_blocks=n_blocks)
        inv = bw.token_slots(tpos, 150, 2).astype(np.uint16 if mode == "u16" else np.uint32)
        with record_launches() as runs:
            bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *sh, bw.routing_table(idx, w),
                    64, 0, 1, mode, x_gather, lnc=2)
        names.append([[(i.name, i.engine) for i in tr] for r in runs for tr in r.traces])
    assert names[0] == names[1]


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_bad_value_in_one_token_stays_there_onchip(lnc, bad):
    rng = np.random.default_rng(11)
    t, e, k = 37, 5, 3
    x, gu, dn, sh, w, idx = _problem(rng, t, 256, e, 48, k, 32, "float32")
    x[7, 100] = bad
    w[20, 1] = np.nan if bad != 3e38 else w[20, 1]
    tpos, b2e = moe_block_mapping(idx, e, 16)
    out = np.asarray(moe_blockwise(x, w, gu, dn, tpos, b2e, 16, shared=sh, top_k_index=idx, lnc=lnc,
                                   combine="onchip"), np.float64)
    clean = np.ones(t, bool)
    clean[[7, 20]] = False
    assert np.all(np.isfinite(out[clean]))
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    assert_close("clean tokens", ref[clean], out[clean])
    assert not np.all(np.isfinite(out[7]))


@use_target("trn2")
def test_choice_depends_on_shapes_only_and_follows_the_rule():
    """Per-rank model shapes (LNC=2, bf16, trn2): Qwen3.5 TP4 at T=1024 (N=256 blocks of 48) fits the on-chip plan,
    at T=4096 (N=256 blocks of 160) "auto" takes the DMA combine. The picks at the registered T=128 / 1024 shapes
    are the faster path as modeled (docs/moe.md, "Round 32" and "Round 36"): on chip for Qwen3.5 and the thinker
    (with the on-chip x gather), the DMA combine for the talker (its small down slices' software-DGE descriptors
    load GpSimd in phase B)."""
    gt = bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2, combine="onchip")
    assert gt is not None and gt.index_mode == "u32" and 1 <= gt.group_tiles <= 8
    assert cb.onchip_plan_bytes(1024, 2048, 128, 128, 256, 48, 8, gt.group_tiles, 2) <= bw.sbuf_budget()
    assert cb.onchip_plan_bytes(1024, 2048, 128, 128, 256, 48, 8, gt.group_tiles + 1, 2) > bw.sbuf_budget()
    assert bw.choose_combine(4096, 2048, 128, 128, 256, 160, 8, 2, 2) is None
    assert bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2, combine="dma") is None
    talker = (1024, 1024, 48, 96, 130, 64, 6, 2, 2)
    assert bw.choose_combine(*talker, combine="onchip")[:3] == (4, "u32", "onchip")
    assert bw.choose_combine(*talker) is None
    assert bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2) == gt
    assert gt.x_gather == "onchip"
    assert gt.down_ring == cb.DOWN_RING   # a larger ring does not fit beside Qwen3.5's Y
    thinker = bw.choose_combine(1024, 2048, 96, 0, 128, 80, 8, 2, 2)
    assert thinker is not None and thinker.x_gather == "onchip" and thinker.down_ring == max(cb.DOWN_RINGS)
    for shape in ((128, 2048, 96, 0, 128, 32, 8), (128, 2048, 128, 128, 248, 32, 8)):
        plan = bw.choose_combine(*shape, 2, 2)   # T=128: the thinker and Qwen3.5 on chip
        assert plan is not None, shape
        assert cb.onchip_plan_bytes(*shape, plan.group_tiles, 2, plan.index_mode, plan.x_gather,
                                    plan.down_ring) <= bw.sbuf_budget()
    assert bw.choose_combine(128, 1024, 48, 96, 128, 32, 6, 2, 2) is None   # the talker's T=128: DMA combine
    # at LNC=1 the talker's forced on-chip plan keeps its slices at 64 KiB and up (hardware DGE alone): streamed
    # indices with GT = 8 rather than resident ones with GT = 4
    assert bw.choose_combine(1024, 1024, 48, 96, 130, 64, 6, 2, 1, combine="onchip")[:3] == (8, "stream", "onchip")


@pytest.mark.parametrize("target", ["trn2", "trn1"])
@pytest.mark.parametrize("lnc,h,gt", [(1, 512, 2), (2, 512, 1), (1, 1024, 5), (2, 1536, 2)])
def test_slice_descriptor_estimate_counts_the_kernels_software_dge_slices(lnc, h, gt, target):
    """`_slice_descriptor_cycles` (the estimate's GpSimd term for phase B's down slices) counts the software-DGE
    slice DMAs the on-chip kernel issues: per core, the non-indirect dynamic DMAs with software-DGE descriptors,
    each max(600, elements per partition) cycles (the cost model's rule), group by group (a partial last group;
    slices of 640 elements per partition at GT = 5); on trn1 (no hardware DGE) every slice."""
    if target == "trn1" and lnc == 2:
        pytest.skip("trn1 runs LNC=1")
    rng = np.random.default_rng(3)
    t, e, inter, k, block = 150, 4, 48, 2, 32
    x, gu, dn, sh, w, idx = _problem(rng, t, h, e, inter, k, 32, "bfloat16")
    n_blocks = static_num_blocks(t, k, e, block)
    tpos, b2e = moe_block_mapping(idx, e, block, num_blocks=n_blocks)
    inv = bw.token_slots(tpos, t, k).astype(np.uint32)
    with use_target(target), record_launches() as runs:
        bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *sh, bw.routing_table(idx, w),
                block, 0, gt, "u32", "dma", lnc=lnc)
    n_core = h // cb.H_TILE // lnc
    want = bw._slice_descriptor_cycles(n_core, gt, inter, n_blocks, 2, target)
    assert want > 0
    for trace in [tr for r in runs for tr in r.traces]:
        slices = [i for i in trace if i.meta.get("dge") == "swdge" and i.meta.get("dynamic")
                  and not i.meta.get("indirect") and i.writes[0].partitions == inter]   # [I, n_i, n_t * 128]
        got = sum(max(bw._SWDGE_MIN_CYCLES, max(a.elems_pp for a in i.writes)) for i in slices)
        assert got == want


def test_choice_on_trn1():
    """trn1 (LNC=1, VectorE transposes): the DMA combine at the registered T=128 / 1024 shapes, the modeled faster
    path except for the talker at T=128 (on chip 335.7 against 360.8 µs: docs/moe.md, "Round 32")."""
    shapes = {(128, 1024, 48, 96, 128, 32, 6): False, (128, 2048, 96, 0, 128, 32, 8): False,
              (128, 2048, 128, 128, 248, 32, 8): False, (1024, 1024, 48, 96, 128, 64, 6): False,
              (1024, 2048, 96, 0, 128, 80, 8): False, (1024, 2048, 128, 128, 256, 48, 8): False}
    for shape, onchip in shapes.items():
        assert (bw.choose_combine(*shape, 2, 1, target="trn1") is not None) == onchip, shape


@pytest.mark.parametrize("shape,mode", [
    ((4096, 2048, 128, 128, 257, 160, 8), "stream"),   # Qwen3.5-35B-A3B TP4, T=4096 (the bench's N=257, B=160)
    ((4096, 2048, 96, 0, 129, 288, 8), "stream"),      # Qwen3-Omni thinker TP8
    ((4096, 1024, 48, 96, 130, 224, 6), "u16")])       # Qwen3-Omni talker TP8
@use_target("trn2")
def test_t4096_fits_with_compact_or_streamed_index_and_auto_follows_the_estimate(shape, mode):
    """At T=4096 (LNC=2, bf16) the resident uint32 slot indices (T * KMAX per partition) leave no room for one
    tile's slot outputs; the talker fits them as uint16 with GT=1, the other two only token-chunked (GT=1; GT=2
    fits neither); "auto" takes the on-chip path only when `_onchip_is_faster` says so (it does not at these
    shapes: docs/moe.md has the modeled figures)."""
    t, h, i, si, n, b, k = shape
    plan = bw.choose_combine(t, h, i, si, n, b, k, 2, 2, combine="onchip")
    assert plan[:2] == (1, mode)
    # H = 2048: the resident x.T (16 x 4097 elements per partition) is above the free-size limit; H = 1024 fits
    assert plan.x_gather == ("dma" if h == 2048 else "onchip")
    budget = bw.sbuf_budget()
    assert cb.onchip_plan_bytes(t, h, i, si, n, b, k, 1, 2, "u32") > budget
    assert (cb.onchip_plan_bytes(t, h, i, si, n, b, k, 1, 2, "u16") <= budget) == (mode == "u16")
    assert cb.onchip_plan_bytes(t, h, i, si, n, b, k, 1, 2, "stream") <= budget
    assert cb.onchip_plan_bytes(t, h, i, si, n, b, k, 2, 2, "stream") > budget
    assert bw.choose_combine(t, h, i, si, n, b, k, 2, 2) is None
    assert not bw._onchip_is_faster(t, h, i, n, b, k, 2, 2, *plan[:3])


def test_onchip_refused_when_it_cannot_fit():
    rng = np.random.default_rng(0)
    x, gu, dn, sh, w, idx = _problem(rng, 40000, 128, 2, 16, 2, 0, "bfloat16")   # 80000 slots: Y + h.T
    tpos, b2e = moe_block_mapping(idx, 2, 512)
    with pytest.raises(KernelInputError, match="combine='onchip' does not fit SBUF"):
        moe_blockwise(x, w, gu, dn, tpos, b2e, 512, top_k_index=idx, combine="onchip")
    with pytest.raises(KernelInputError, match="combine must be"):
        moe_blockwise(x, w, gu, dn, tpos, b2e, 512, top_k_index=idx, combine="fast")
