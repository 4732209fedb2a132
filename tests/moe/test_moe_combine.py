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
from nki_kernels.moe import blockwise as bw
from nki_kernels.moe import combine as cb
from nki_kernels.moe.reference import moe_decode_reference
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


def test_group_tiles_split_every_tile_once():
    """H = 640 (5 tiles) with a forced small group: groups of 2, 2, 1 (LNC=1) and 2 + 1 per core (LNC=2)."""
    rng = np.random.default_rng(5)
    x, gu, dn, sh, w, idx = _problem(rng, 40, 640, 4, 32, 2, 32, "float32")
    tpos, b2e = moe_block_mapping(idx, 4, 16)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    inv = bw.token_slots(tpos, 40, 2).astype(np.uint32)
    table = bw.routing_table(idx, w)
    for gt in (1, 2, 5):
        out = bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *sh, table, 16, 0, gt, lnc=1)
        assert_close(f"GT={gt}", ref, out)
    for gt in (1, 2):
        out = bw.call(cb.moe_blockwise_onchip_kernel, x, None, gu, dn, tpos, b2e, inv, *sh, table, 16, 0, gt, lnc=2)
        assert_close(f"LNC=2 GT={gt}", ref, out)


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


def test_choice_depends_on_shapes_only_and_follows_the_rule():
    """Per-rank model shapes (LNC=2, bf16): Qwen3.5 TP4 at T=1024 (N=256 blocks of 48) fits the on-chip plan,
    at T=4096 (N=256 blocks of 160) it does not (one hidden tile's slot outputs plus the slot indices exceed
    SBUF) and takes the DMA combine; "auto" follows `_onchip_is_faster` (talker T=1024: on-chip)."""
    gt = bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2, combine="onchip")
    assert gt is not None and 1 <= gt <= 8
    assert cb.onchip_plan_bytes(1024, 2048, 128, 128, 256, 48, 8, gt, 2) <= bw.sbuf_budget()
    assert cb.onchip_plan_bytes(1024, 2048, 128, 128, 256, 48, 8, gt + 1, 2) > bw.sbuf_budget()
    assert bw.choose_combine(4096, 2048, 128, 128, 256, 160, 8, 2, 2) is None
    assert bw.choose_combine(4096, 2048, 128, 128, 256, 160, 8, 2, 2, combine="onchip") is None
    assert bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2, combine="dma") is None
    talker = (1024, 1024, 48, 96, 130, 64, 6, 2, 2)
    assert bw.choose_combine(*talker) == bw.choose_combine(*talker, combine="onchip") == 4
    auto = bw.choose_combine(1024, 2048, 128, 128, 256, 48, 8, 2, 2)
    assert auto == (gt if bw._onchip_is_faster(1024, 2048, 128, 256, 48, 8, 2, 2, gt) else None)


def test_onchip_refused_when_it_cannot_fit():
    rng = np.random.default_rng(0)
    x, gu, dn, sh, w, idx = _problem(rng, 20000, 128, 2, 16, 2, 0, "bfloat16")
    tpos, b2e = moe_block_mapping(idx, 2, 512)
    with pytest.raises(KernelInputError, match="combine='onchip' does not fit SBUF"):
        moe_blockwise(x, w, gu, dn, tpos, b2e, 512, top_k_index=idx, combine="onchip")
    with pytest.raises(KernelInputError, match="combine must be"):
        moe_blockwise(x, w, gu, dn, tpos, b2e, 512, top_k_index=idx, combine="fast")
