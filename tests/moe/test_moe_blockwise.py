"""moe_blockwise against the float64 references, MoE properties, LNC=2 and input validation."""
import numpy as np
import pytest
import torch
from _moe_inputs import dense_affinities, moe_problem
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import moe_block_mapping, moe_blockwise
from nki_kernels.moe.reference import moe_blockwise_reference, moe_decode_reference
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


@given(t=st.integers(1, 150), h=st.sampled_from([128, 256]), e=st.integers(1, 9),
       inter=st.sampled_from([16, 48, 64, 96, 128, 192, 384]), data=st.data(),
       block_size=st.sampled_from([8, 32, 64, 128, 160]), normalize=st.booleans(), dense=st.booleans(),
       shared_inter=st.sampled_from([0, 32, 96]), seed=st.integers(0, 2 ** 16))
def test_matches_reference(t, h, e, inter, data, block_size, normalize, dense, shared_inter, seed):
    k = data.draw(st.integers(1, min(e, 4)))
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = moe_problem(rng, t, h, e, inter, k, shared_inter, normalize)
    tpos, b2e = moe_block_mapping(idx, e, block_size)
    if dense:
        out = moe_blockwise(x, dense_affinities(w, idx, e), gu, dn, tpos, b2e, block_size, shared=sh)
    else:
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, block_size, shared=sh, top_k_index=idx)
    assert out.shape == (t, h) and out.dtype == x.dtype
    assert_close("out", moe_decode_reference(x, idx, w, gu, dn, sh), out)
    assert_close("out vs mapping reference", moe_blockwise_reference(
        x, w, gu, dn, tpos, b2e, block_size, shared=sh, top_k_index=idx), out)


@given(t=st.integers(1, 70), e_local=st.integers(1, 6), n_ranks=st.integers(2, 3), data=st.data(),
       seed=st.integers(0, 2 ** 16))
def test_expert_parallel_subset(t, e_local, n_ranks, data, seed):
    """Each rank holds a contiguous subset of experts; summing the ranks' outputs gives the full MoE, and a
    rank's output only has its experts' contributions (plus the shared term on rank 0)."""
    rng = np.random.default_rng(seed)
    e_total = e_local * n_ranks
    k = data.draw(st.integers(1, min(e_total, 4)))
    x, gu_all, dn_all, sh, w, idx = moe_problem(rng, t, 128, e_total, 64, k, 32, True)
    total = np.zeros((t, 128))
    for r in range(n_ranks):
        sl = slice(r * e_local, (r + 1) * e_local)
        tpos, b2e = moe_block_mapping(idx, e_local, 32, expert_offset=r * e_local)
        dense = r % 2 == 1
        aff = dense_affinities(w, idx, e_local, r * e_local) if dense else w
        out = moe_blockwise(x, aff, gu_all[sl], dn_all[sl], tpos, b2e, 32, shared=sh if r == 0 else None,
                            top_k_index=None if dense else idx, expert_offset=r * e_local)
        ref_r = moe_decode_reference(x, idx, w, gu_all[sl], dn_all[sl], sh if r == 0 else None,
                                     expert_offset=r * e_local)
        assert_close(f"rank {r}", ref_r, out)
        total += out
    assert_close("sum over ranks", moe_decode_reference(x, idx, w, gu_all, dn_all, sh), total)


@given(t=st.integers(1, 60), e=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_result_independent_of_block_size(t, e, seed):
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = moe_problem(rng, t, 128, e, 48, min(e, 2), 0, True)
    outs = []
    for block_size in (4, 16, 128, 512):
        tpos, b2e = moe_block_mapping(idx, e, block_size)
        outs.append(moe_blockwise(x, w, gu, dn, tpos, b2e, block_size, top_k_index=idx))
    for b, o in zip((16, 128, 512), outs[1:]):
        np.testing.assert_allclose(o, outs[0], rtol=2e-5, atol=2e-6, err_msg=f"block_size {b} vs 4")


@given(t=st.integers(1, 50), e=st.integers(1, 5), n_tp=st.sampled_from([2, 3]), seed=st.integers(0, 2 ** 16))
def test_tensor_parallel_sharding_invariance(t, e, n_tp, seed):
    """Splitting I (and Is) across ranks and summing the partial outputs equals the unsharded result; the shared
    gate vector is replicated (every rank applies the same sigmoid gate to its partial shared term)."""
    rng = np.random.default_rng(seed)
    inter, s_inter = 96 * n_tp, 32 * n_tp
    x, gu, dn, sh, w, idx = moe_problem(rng, t, 128, e, inter, min(e, 3), s_inter, True)
    tpos, b2e = moe_block_mapping(idx, e, 32)
    full = moe_blockwise(x, w, gu, dn, tpos, b2e, 32, shared=sh, top_k_index=idx)
    acc = np.zeros_like(full, dtype=np.float64)
    for r in range(n_tp):
        si, ss = slice(r * 96, (r + 1) * 96), slice(r * 32, (r + 1) * 32)
        sh_r = (np.ascontiguousarray(sh[0][:, :, ss]), np.ascontiguousarray(sh[1][ss]), sh[2])
        acc += moe_blockwise(x, w, np.ascontiguousarray(gu[..., si]), np.ascontiguousarray(dn[:, si]), tpos, b2e,
                             32, shared=sh_r, top_k_index=idx)
    assert_close("sum of TP shards", full, acc)
    assert_close("vs reference", moe_decode_reference(x, idx, w, gu, dn, sh), acc)


@pytest.mark.parametrize("h, inter, shared_inter", [(512, 4096, 0), (2048, 512, 128), (2048, 640, 0)])
def test_small_t_with_large_intermediate_fits_psum(h, inter, shared_inter, rng):
    """T <= 128 takes the one-pass PSUM-accumulating path only when its accumulator and h^T S tiles fit the
    PSUM banks (2048 x 512: 5 banks, at the limit); larger I falls back to the two-phase path."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 8, h, 3, inter, 2, shared_inter, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, 3, 8)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx)
    assert_close("out", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype="bfloat16")


def test_token_routed_to_no_local_expert_gets_only_shared_term(rng):
    x, gu, dn, sh, w, _ = moe_problem(rng, 6, 256, 4, 64, 2, 64, True)
    idx = np.array([[0, 1], [9, 8], [2, 3], [8, 9], [1, 2], [10, 11]], dtype=np.int32)   # tokens 1, 3, 5: remote
    tpos, b2e = moe_block_mapping(idx, 4, 32)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 32, shared=sh, top_k_index=idx)
    shared_only = moe_decode_reference(x, np.full_like(idx, -1), w, gu, dn, sh)
    assert_close("remote tokens", shared_only[[1, 3, 5]], out[[1, 3, 5]])
    assert_close("all", moe_decode_reference(x, idx, w, gu, dn, sh), out)
    # without a shared expert those rows are exactly zero (they only gather the all-zero scratch row)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 32, top_k_index=idx)
    assert np.all(out[[1, 3, 5]] == 0.0)


def test_static_block_count_with_padding_blocks_and_huge_values(rng):
    """NxDI-style static N with all-padding blocks; large activations (silu saturation both ways) and zero
    weights."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 20, 128, 5, 96, 2, 0, False)
    x = (x * 30.0).astype(np.float32)
    w[3] = 0.0
    tpos, b2e = moe_block_mapping(idx, 5, 8, num_blocks=12)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 8, top_k_index=idx)
    assert_close("out", moe_decode_reference(x, idx, w, gu, dn), out)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dense", [False, True])
def test_lnc2_matches_lnc1(rng, dense):
    x, gu, dn, sh, w, idx = moe_problem(rng, 70, 256, 6, 64, 3, 64, True)
    tpos, b2e = moe_block_mapping(idx, 6, 16)
    aff = dense_affinities(w, idx, 6) if dense else w
    kw = {} if dense else {"top_k_index": idx}
    o1 = moe_blockwise(x, aff, gu, dn, tpos, b2e, 16, shared=sh, **kw)
    o2 = moe_blockwise(x, aff, gu, dn, tpos, b2e, 16, shared=sh, lnc=2, **kw)
    assert_close("lnc2", moe_decode_reference(x, idx, w, gu, dn, sh), o2)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-6)


def test_bf16_and_torch(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 50, 256, 8, 48, 4, 96, True, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, 8, 32)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 32, shared=sh, top_k_index=idx)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    assert_close("bf16", ref, out, dtype="bfloat16")
    from nki_kernels.backend import _to_torch
    tt = [_to_torch(a) for a in (x, w, gu, dn)]
    out_t = moe_blockwise(tt[0], tt[1], tt[2], tt[3], torch.from_numpy(tpos), torch.from_numpy(b2e), 32,
                          shared=tuple(_to_torch(s) for s in sh), top_k_index=torch.from_numpy(idx).long())
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.bfloat16
    assert_close("bf16 torch", ref, out_t.float().numpy(), dtype="bfloat16")


def _good(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 10, 128, 3, 32, 2, 32, True)
    tpos, b2e = moe_block_mapping(idx, 3, 8)
    return dict(hidden=x, expert_affinities=w, gate_up=gu, down=dn, token_position_to_id=tpos,
                block_to_expert=b2e, block_size=8, shared=sh, top_k_index=idx)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(block_to_expert=a["block_to_expert"] + 3), r"block_to_expert ids .* \[0, E=3\)"),
    (lambda a: a["token_position_to_id"].__setitem__(0, 10), r"token ids in \[0, T=10\)"),
    (lambda a: a["token_position_to_id"].__setitem__(0, -2), r"-1 or token ids"),
    (lambda a: a.update(token_position_to_id=a["token_position_to_id"][:-1]), "N\\*B"),
    (lambda a: a.update(block_size=1000), "block_size"),
    (lambda a: a.update(hidden=a["hidden"][:, :100]), "gate_up must be|H must be"),
    (lambda a: a.update(down=a["down"][:, :16]), "down must be"),
    (lambda a: a.update(top_k_index=None), "dense expert_affinities must be"),
    (lambda a: a.update(expert_affinities=a["expert_affinities"][:, :1]), r"expert_affinities must be \[T, TOPK\]"),
    (lambda a: a.update(shared=a["shared"][:2]), "shared must be"),
    (lambda a: a.update(shared=(a["shared"][0], a["shared"][1][:5], a["shared"][2])), "shared down"),
    (lambda a: a.update(gate_up=a["gate_up"].astype(np.float16)), "gate_up dtype"),
    (lambda a: a.update(gate_up=np.zeros((3, 128, 2, 201), np.float32), down=np.zeros((3, 201, 128), np.float32)),
     "equal chunks"),
])
def test_bad_inputs_raise(rng, mutate, match):
    args = _good(rng)
    mutate(args)
    with pytest.raises(KernelInputError, match=match):
        moe_blockwise(**args)


def test_duplicate_token_in_block_raises(rng):
    args = _good(rng)
    tpos = args["token_position_to_id"].copy()
    tpos[1] = tpos[0]
    args["token_position_to_id"] = tpos
    with pytest.raises(KernelInputError, match="more than once"):
        moe_blockwise(**args)


def test_output_pass_with_several_gather_groups(rng, monkeypatch):
    """The output pass gathers a token's slot rows in groups bounded by _GATHER_BYTES_PP (fp32 SBUF accumulation
    across groups when there are several); force 2-row groups so TOPK = 5 needs 3 groups."""
    from nki_kernels.moe import blockwise
    monkeypatch.setattr(blockwise, "_GATHER_BYTES_PP", 2 * 128 * 4)
    x, gu, dn, sh, w, idx = moe_problem(rng, 30, 128, 7, 64, 5, 32, False)
    tpos, b2e = moe_block_mapping(idx, 7, 16)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, 16, shared=sh, top_k_index=idx)
    assert_close("grouped output pass", moe_decode_reference(x, idx, w, gu, dn, sh), out)


def test_nan_in_one_token_stays_in_that_token(rng):
    """The issue's example (T=8, H=128, E=4, I=64, block 8, x[3, 0] = NaN: before, tokens 0-7 were NaN) and a
    multi-chunk T, at LNC=1 and 2, with and without the shared expert; a NaN top-k weight of a local expert makes
    only its token NaN, one of another rank's expert changes nothing."""
    for t, sh_i in ((8, 0), (8, 32), (150, 32)):
        x, gu, dn, sh, w, idx = moe_problem(rng, t, 128, 4, 64, 2, sh_i, True)
        tpos, b2e = moe_block_mapping(idx, 4, 8)
        ref = moe_decode_reference(x, idx, w, gu, dn, sh)
        others = np.arange(t) != 3
        for lnc in (1, 2):
            xn = x.copy()
            xn[3, 0] = np.nan
            out = moe_blockwise(xn, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, lnc=lnc)
            assert np.all(np.isnan(out[3]))
            assert_close(f"T={t} lnc={lnc}", ref[others], out[others])
            dense = dense_affinities(w, idx, 4)
            out = moe_blockwise(xn, dense, gu, dn, tpos, b2e, 8, shared=sh, lnc=lnc, max_experts_per_token=2)
            assert_close(f"dense T={t} lnc={lnc}", ref[others], out[others])
            wn = w.copy()
            wn[3, 1] = np.nan
            out = moe_blockwise(x, wn, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, lnc=lnc)
            assert np.all(np.isnan(out[3]))
            assert_close(f"nan weight T={t} lnc={lnc}", ref[others], out[others])
    # another rank's expert with a NaN weight: ignored (expert_offset 0, ids 4.. are not local)
    x, gu, dn, sh, w, idx = moe_problem(rng, 8, 128, 8, 64, 2, 0, True)
    local = idx < 4
    tpos, b2e = moe_block_mapping(idx, 4, 8)
    wn = w.copy()
    wn[~local] = np.nan
    out = moe_blockwise(x, wn, gu[:4], dn[:4], tpos, b2e, 8, top_k_index=idx)
    assert_close("remote NaN weights", moe_decode_reference(x, idx, w, gu[:4], dn[:4]), out)


def test_mapping_must_match_routing(rng):
    """A mapping that drops a routed (token, expert), adds one the router did not choose, lists a pair twice, or
    gives a token more than KMAX slots is refused (host check of NumPy / CPU values; the kernel never reads them
    to specialize)."""
    args = _good(rng)
    idx, tpos, b2e = args["top_k_index"], args["token_position_to_id"], args["block_to_expert"]
    dropped = tpos.copy()
    dropped[np.argmax(dropped >= 0)] = -1
    with pytest.raises(KernelInputError, match="do not match top_k_index.*has no slot"):
        moe_blockwise(**{**args, "token_position_to_id": dropped})
    # token 0 moved into a block of an expert it did not choose
    other = int(np.setdiff1d(np.arange(3), idx[0])[0])
    blk = int(np.argmax(b2e == other))
    moved = tpos.copy()
    row = moved[blk * 8:(blk + 1) * 8]
    moved[blk * 8 + (int(np.argmax(row == -1)) if np.any(row == -1) else 0)] = 0
    with pytest.raises(KernelInputError, match="do not match top_k_index|more than once"):
        moe_blockwise(**{**args, "token_position_to_id": moved})
    dense = dense_affinities(args["expert_affinities"], idx, 3)
    dargs = {**args, "expert_affinities": dense, "top_k_index": None}
    with pytest.raises(KernelInputError, match=r"expert_affinities\[\d+, \d+\] is nonzero but the mapping has no slot"):
        moe_blockwise(**{**dargs, "token_position_to_id": dropped})
    with pytest.raises(KernelInputError, match="above KMAX=1"):
        moe_blockwise(**dargs, max_experts_per_token=1)
    with pytest.raises(KernelInputError, match="float64"):
        moe_blockwise(**{**dargs, "expert_affinities": dense.astype(np.float64)})
    with pytest.raises(KernelInputError, match="float64"):
        moe_blockwise(**{**args, "expert_affinities": args["expert_affinities"].astype(np.float64)})
    big = idx.astype(np.int64)
    big[0, 0] += 2 ** 32
    with pytest.raises(KernelInputError, match="fit int32"):
        moe_blockwise(**{**args, "top_k_index": big})


@pytest.mark.parametrize("combine", ["onchip", "dma"])
def test_instruction_sequence_independent_of_routing(rng, combine):
    """Two routings of the same shapes (static block count) give the same instruction sequence at LNC=1 and 2,
    on both combines; LNC=2 is one launch of two programs."""
    from nki_kernels.emulator import record_launches
    from nki_kernels.moe.routing import static_num_blocks
    n_blocks = static_num_blocks(40, 2, 5, 16)
    for lnc in (1, 2):
        seqs = []
        for seed in (1, 2):
            x, gu, dn, sh, w, idx = moe_problem(np.random.default_rng(seed), 40, 256, 5, 32, 2, 32, True)
            tpos, b2e = moe_block_mapping(idx, 5, 16, num_blocks=n_blocks)
            with record_launches() as runs:
                out = moe_blockwise(x, w, gu, dn, tpos, b2e, 16, shared=sh, top_k_index=idx, lnc=lnc,
                                    combine=combine)
            assert_close("out", moe_decode_reference(x, idx, w, gu, dn, sh), out)
            assert len(runs) == 1 and len(runs[0].traces) == lnc
            seqs.append([[ins.name for ins in tr] for r in runs for tr in r.traces])
        assert seqs[0] == seqs[1]


@given(t=st.integers(1, 40), e_local=st.integers(1, 6), offset=st.integers(0, 6), k=st.integers(1, 4),
       block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2 ** 16))
def test_token_slots_topk_points_each_choice_at_its_slot(t, e_local, offset, k, block_size, seed):
    """The top-k-order inverse the DMA combine weights by: entry (t, j) is the one slot whose block's expert is
    choice j of token t and whose token is t; N * B (the zero row) exactly where choice j is not a local expert.
    Checked slot by slot against the mapping (a plain loop, no code shared with the function)."""
    from nki_kernels.moe.blockwise import token_slots_topk
    rng = np.random.default_rng(seed)
    e_total = e_local + offset + 3
    k = min(k, e_total)
    idx = np.stack([rng.choice(e_total, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    tpos, b2e = moe_block_mapping(idx, e_local, block_size, expert_offset=offset)
    tpos, b2e = np.asarray(tpos), np.asarray(b2e)
    inv = token_slots_topk(tpos, b2e, idx, block_size, e_local, offset)
    assert inv.shape == (t, k) and inv.dtype == np.int32
    for tok in range(t):
        for j in range(k):
            e = int(idx[tok, j]) - offset
            if not 0 <= e < e_local:
                assert inv[tok, j] == tpos.size
                continue
            s = int(inv[tok, j])
            assert 0 <= s < tpos.size and tpos[s] == tok and b2e[s // block_size] == e


@pytest.mark.parametrize("combine", ["dma", "onchip"])
def test_duplicate_expert_in_one_tokens_top_k(rng, combine):
    """A token whose top-k names one expert twice (the mapping holds the pair once): both choices' weights apply to
    that expert's one output, as in the reference (a reverted combine once summed the slot row twice)."""
    t, h, e, inter, k, bs = 8, 128, 4, 64, 2, 16
    x, gu, dn, _, w, idx = moe_problem(rng, t, h, e, inter, k)
    idx = idx.copy()
    idx[3, 1] = idx[3, 0]
    idx_map = idx.copy()
    idx_map[3, 1] = -1
    tpos, b2e = moe_block_mapping(idx_map, e, bs)
    out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx, lnc=1, combine=combine)
    ref = moe_blockwise_reference(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx)
    assert_close(f"duplicate expert id, {combine}", ref, out, dtype="float32")


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("combine", ["dma", "onchip"])
def test_trn1_padding_slots_carry_no_stale_values(rng, combine, dense):
    """The padding rows the x gather (and, in the dense form, the affinity gather) skips keep stale SBUF contents
    (here NaN from an earlier launch): on trn1 the x and h transposes are VectorE transposes (a TensorE one, an
    identity matmul there, would spread a stale NaN over the block's tokens), so those values stay in the padding
    slots, which nothing reads back. Blocks of 16 with 37 tokens over 4 experts have padding; clean inputs must
    match the reference."""
    from nki_kernels.emulator import use_target
    t, h, e, inter, k, bs = 37, 128, 4, 64, 2, 16
    x, gu, dn, _, w, idx = moe_problem(rng, t, h, e, inter, k)
    tpos, b2e = moe_block_mapping(idx, e, bs)
    assert (tpos < 0).any()
    aff, kw = (dense_affinities(w, idx, e), {}) if dense else (w, dict(top_k_index=idx))
    aff_nan = np.where(aff != 0, np.nan, 0).astype(aff.dtype)   # NaN wherever a slot reads an affinity
    with use_target("trn1"):
        junk = moe_blockwise(np.full_like(x, np.nan), aff_nan, gu, dn, tpos, b2e, bs, lnc=1,
                             combine=combine, **kw)   # leaves NaN in SBUF where the next launch may allocate
        assert np.isnan(np.asarray(junk, np.float64)).all()
        out = moe_blockwise(x, aff, gu, dn, tpos, b2e, bs, lnc=1, combine=combine, **kw)
    ref = moe_blockwise_reference(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx)
    assert_close(f"trn1 padding, {combine}, dense={dense}", ref, out, dtype="float32")


@pytest.mark.parametrize("lnc,dense,dtype", [(1, False, "float32"), (2, False, "bfloat16"), (2, True, "float32")])
def test_onchip_x_gather_matches_reference_and_keeps_nan_in_its_token(rng, lnc, dense, dtype):
    """The DMA combine's blocks phase with the on-chip x gather (resident x.T + nc_n_gather; a core's first
    min(8, blocks / 8) blocks still gather by DMA): 300 tokens (a partial last 128-token chunk), blocks of 8 with
    padding, enough blocks per core that both x paths run; padding slots gather token 0's x.T (their outputs are
    never read back). A NaN in one token's hidden row - token 0's too, which every padding slot collects - reaches
    only that token's output row."""
    from nki_kernels.emulator import record_launches
    from nki_kernels.moe.blockwise import onchip_x_gather
    t, h, e, inter, k, bs = 300, 256, 12, 64, 3, 8
    x, gu, dn, sh, w, idx = moe_problem(rng, t, h, e, inter, k, 32, dtype=dtype)
    tpos, b2e = moe_block_mapping(idx, e, bs)
    assert len(b2e) >= 16 * lnc and (tpos < 0).any()
    assert onchip_x_gather(t, h, inter, bs, k, 4 if dtype == "float32" else 2)
    aff = dense_affinities(w, idx, e) if dense else w
    kw = dict(shared=sh, top_k_index=None if dense else idx, lnc=lnc, combine="dma")
    with record_launches() as runs:
        out = moe_blockwise(x, aff, gu, dn, tpos, b2e, bs, **kw)
    names = [ins.name for tr in list(runs)[0].traces for ins in tr]
    assert "nc_n_gather" in names and names.count("dma_copy") > 0
    assert_close("on-chip x gather", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype=dtype)
    for bad in (137, 0):
        x_bad = x.copy()
        x_bad[bad, 5] = np.nan
        out_bad = np.asarray(moe_blockwise(x_bad, aff, gu, dn, tpos, b2e, bs, **kw), np.float64)
        assert np.isnan(out_bad[bad]).any()
        others = np.delete(out_bad, bad, axis=0)
        assert np.isfinite(others).all()
        assert np.array_equal(others, np.delete(np.asarray(out, np.float64), bad, axis=0))


@pytest.mark.parametrize("target,h,inter,bs", [
    ("trn2", 2048, 128, 160),    # Qwen3.5-35B-A3B TP4 widths, T=4096's block size
    ("trn2", 2048, 96, 288),     # Qwen3-Omni thinker TP8
    ("trn3", 2048, 96, 288),
    ("trn2", 1024, 48, 224),     # Qwen3-Omni talker TP8
    ("trn1", 1024, 48, 224)])    # ... on trn1 (gate/up on 64 partitions: n_h = 16)
def test_onchip_x_gather_sbuf_bound_holds_at_the_free_size_limit(rng, target, h, inter, bs):
    """At T=4096 (n_h * T = 65536 for n_h = 16: the largest T the on-chip x gather takes) the model widths' blocks
    phase takes the on-chip x gather, runs within SBUF by the emulator's liveness check, its peak is within the
    plan's bound (`blocks_phase_bytes` + `resident_xT_bytes` with `x_gather_plan`'s replicated-id count: what
    `onchip_x_gather` compares with the budget) and the output matches the reference. Few experts and TOPK 1-2
    keep the emulation short: the bound depends on H, I, B, T and the dtype, not on E or the routing."""
    from nki_kernels.emulator import record_launches, use_target
    from nki_kernels.moe.blockwise import blocks_phase_bytes, gate_up_parts, resident_xT_bytes, x_gather_plan
    t, e, k = 4096, 4, 2 if h == 1024 else 1
    x, gu, dn, _, w, idx = moe_problem(rng, t, h, e, inter, k, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, e, bs)
    with use_target(target):
        n_rep = x_gather_plan(t, h, inter, bs, k, 2)
        assert n_rep is not None
        n_h = h // gate_up_parts(h, inter, 2, bs, k)
        bound = blocks_phase_bytes(h, inter, bs, k, 2) + resident_xT_bytes(t, h, n_h, bs, 2, n_rep)
        with record_launches() as runs:
            out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx, lnc=1 if target == "trn1" else 2,
                                combine="dma")
    res = list(runs)[0]
    assert "nc_n_gather" in [ins.name for tr in res.traces for ins in tr]
    assert max(res.sbuf_peak_bytes) <= bound
    assert_close(f"on-chip x gather at T=4096, H={h}, B={bs}, {target}", moe_decode_reference(x, idx, w, gu, dn),
                 out, dtype="bfloat16")


@pytest.mark.parametrize("dense", [False, True])
def test_tight_output_pass_loads_fewer_table_chunks(rng, dense):
    """The output pass budgets one 128-token chunk's tables (slot ids; top-k routing rows only in the top-k form)
    and loads as many chunks at once as the SBUF left allows: trn1 fp32 H=4736 with a shared expert (Is=144) has
    no room for 8 chunks' tables beside one gathered row, yet fits with fewer, so it runs (it was refused when the
    check budgeted the full batch, and in the dense form routing rows the kernel never loads) and matches the
    reference."""
    from nki_kernels.emulator import use_target
    from nki_kernels.moe.blockwise import output_pass_bytes, output_plan, sbuf_budget, table_chunks
    h, e, inter, s_inter, item = 4736, 4, 16, 144, 4
    t, k, bs, kmax = (20, 4, 1, 4) if dense else (130, 2, 32, 2)
    routing_k = 0 if dense else k
    full = table_chunks(kmax, routing_k)
    chunks, group = output_plan(h, s_inter, kmax, item, routing_k, target="trn1")
    if dense:   # the full batch fits without routing rows; with one routing pair per chunk row it would not
        assert chunks == full and output_pass_bytes(h, s_inter, kmax, item, top_k=1, chunks=full) > sbuf_budget(
            "trn1")
    else:
        assert output_pass_bytes(h, s_inter, kmax, item, top_k=routing_k, chunks=full) > sbuf_budget("trn1")
        assert 1 <= chunks < full
    assert group == 1
    assert output_pass_bytes(h, s_inter, kmax, item, top_k=routing_k, chunks=chunks) <= sbuf_budget("trn1")
    x, gu, dn, sh, w, idx = moe_problem(rng, t, h, e, inter, k, s_inter)
    tpos, b2e = moe_block_mapping(idx, e, bs)
    aff, kw = (dense_affinities(w, idx, e), {}) if dense else (w, dict(top_k_index=idx))
    with use_target("trn1"):
        out = moe_blockwise(x, aff, gu, dn, tpos, b2e, bs, shared=sh, lnc=1, combine="dma", **kw)
    assert_close(f"trn1 tight output pass, dense={dense}", moe_decode_reference(x, idx, w, gu, dn, sh), out,
                 dtype="float32")


@pytest.mark.parametrize("target,h,inter,bs,t", [
    ("trn2", 1024, 8, 64, 4097), ("trn3", 2048, 128, 48, 4497), ("trn2", 1024, 8, 64, 4096),
    ("trn3", 2048, 32, 64, 4097), ("trn3", 2048, 32, 64, 4096)])
def test_onchip_x_gather_respects_the_n_gather_free_size_limit(target, h, inter, bs, t):
    """The resident x.T is the data operand of one nc_n_gather: n_h * T elements per partition must stay within the
    65536-element per-instruction SBUF limit, not only within SBUF. These bf16 shapes fit SBUF; past T=4096 they
    cross the limit (n_h = 16: H = 1024 on 64 partitions, whose 256 B gate/up run is under trn2's 512 B knee, or
    H = 2048 on 128) and must take the DMA gather, as must the trn3 shape; T=4096 is on it."""
    from nki_kernels.emulator import use_target
    from nki_kernels.moe.blockwise import gate_up_parts, onchip_x_gather
    with use_target(target):
        n_h = h // gate_up_parts(h, inter, 2, bs, 1)
        assert onchip_x_gather(t, h, inter, bs, 1, 2) == (n_h * t <= 65536)
    assert (n_h * t <= 65536) == (t == 4096)


def test_n_gather_limit_shape_runs_with_the_dma_gather(rng):
    """The smallest kind of shape past the nc_n_gather limit (trn2 bf16, H = 1024 with I = 8: gate/up on 64
    partitions, T=4097, blocks of 64, LNC=2, DMA combine) runs and matches the reference (it failed the emulator's
    free-size check)."""
    from nki_kernels.emulator import record_launches
    t, h, e, inter, k, bs = 4097, 1024, 4, 8, 1, 64
    x, gu, dn, _, w, idx = moe_problem(rng, t, h, e, inter, k, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, e, bs)
    with record_launches() as runs:
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx, lnc=2, combine="dma")
    assert "nc_n_gather" not in [ins.name for tr in list(runs)[0].traces for ins in tr]
    assert_close("past the nc_n_gather limit", moe_decode_reference(x, idx, w, gu, dn), out, dtype="bfloat16")


def test_output_pass_columns_follow_the_targets_vectore_rate():
    """`hw.DVE_ELEMS_PER_CYCLE` is the cost model's VectorE base rate on every target; with it the output pass's
    column split gives VectorE every column on trn2 / trn3 up to H = 4096 (2 elements per cycle: VectorE's adds then
    take less time than GpSimd's gather descriptors alone; at H = 8192 GpSimd keeps a smaller share than on trn1) and
    keeps GpSimd a share on trn1 (1 per cycle), the ranges covering the hidden columns once, in order."""
    from nki_kernels.backend import nisa
    from nki_kernels.emulator.costmodel import PARAMS
    from nki_kernels.emulator.targets import use_target
    from nki_kernels.hw import DVE_ELEMS_PER_CYCLE
    from nki_kernels.moe.blockwise import _add_ranges
    assert set(DVE_ELEMS_PER_CYCLE) == set(PARAMS)
    for name, rate in DVE_ELEMS_PER_CYCLE.items():
        assert PARAMS[name].dve_elems_pp_per_cycle == rate, name
    for h in (1024, 2048, 4096, 8192):
        pool = {}
        for target in ("trn1", "trn2", "trn3"):
            with use_target(target):
                ranges = _add_ranges(h)
            assert ranges[0][0] == 0 and ranges[-1][1] == h
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            pool[target] = sum(c1 - c0 for c0, c1, eng, _ in ranges if eng == nisa.engine.gpsimd)
        assert pool["trn1"] > 0 and pool["trn2"] == pool["trn3"] < pool["trn1"], (h, pool)
        assert pool["trn2"] == 0 or h > 4096, (h, pool)


@pytest.mark.parametrize("target, lnc, parts", [("trn2", 2, 128), ("trn3", 2, 128), ("trn1", 1, 64)])
def test_gate_up_partitions_follow_the_targets_dma_knee(target, lnc, parts, rng):
    """The talker's widths (H = 1024, I = 48, bf16): an expert's gate/up run at 128 partitions is 1536 B, past
    trn2 / trn3's 512 B packet knee (`hw.DMA_FULL_RATE_ROW_BYTES`, the cost model's `dma_knee_bytes`), so the
    blocks phase keeps 128 partitions there; under trn1's 2560 B knee it loads gate/up on 64 partitions (twice the
    run). Qwen3.5's 8 KiB runs take 128 everywhere. Both layouts (the DMA combine's blocks phase) match the
    reference."""
    from nki_kernels.emulator.costmodel import PARAMS
    from nki_kernels.emulator.targets import use_target
    from nki_kernels.hw import DMA_FULL_RATE_ROW_BYTES
    from nki_kernels.moe.blockwise import gate_up_parts
    assert all(PARAMS[name].dma_knee_bytes == knee for name, knee in DMA_FULL_RATE_ROW_BYTES.items())
    t, h, e, inter, k, bs = 96, 1024, 8, 48, 2, 32
    x, gu, dn, _, w, idx = moe_problem(rng, t, h, e, inter, k, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, e, bs)
    ref = moe_decode_reference(x, idx, w, gu, dn)
    with use_target(target):
        assert gate_up_parts(h, inter, 2, bs, k) == parts
        assert gate_up_parts(2048, 512, 2, bs, k) == 128
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, bs, top_k_index=idx, lnc=lnc, combine="dma")
    assert_close(f"{target}", ref, out, dtype="bfloat16")
