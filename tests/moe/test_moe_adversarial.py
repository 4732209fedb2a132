"""Adversarial inputs for the MoE kernels (hypothesis): non-finite or huge values in one token stay in that token;
any int32 expert id gives a defined, contained result (ids outside the local range ignored, never read out of
bounds); the instruction sequence does not depend on the routing values; inputs are never written; bad argument
kinds and dtypes are clear errors."""
import ml_dtypes
import numpy as np
import pytest
import torch
from _moe_inputs import moe_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import moe_block_mapping, moe_blockwise, moe_decode
from nki_kernels.emulator import record_launches
from nki_kernels.moe.reference import moe_blockwise_reference, moe_decode_reference
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

_BAD = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -1e30])
_FEW = settings(max_examples=min(settings().max_examples, 12))


def _others_match(ref, out, bad_tok):
    keep = np.ones(ref.shape[0], bool)
    keep[bad_tok] = False
    assert_close("other tokens", ref[keep], np.asarray(out)[keep])


@_FEW
@given(t=st.integers(2, 40), e=st.integers(1, 6), k=st.integers(1, 3), shared=st.booleans(), bad=_BAD,
       col=st.integers(0, 127), lnc=st.sampled_from([1, 2]), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_bad_value_in_one_token_stays_there(t, e, k, shared, bad, col, lnc, data, seed):
    k = min(k, e)
    bad_tok = data.draw(st.integers(0, t - 1))
    x, gu, dn, sh, w, idx = moe_problem(np.random.default_rng(seed), t, 128, e, 32, k, 32 if shared else 0)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    xb = x.copy()
    xb[bad_tok, col] = bad
    if t <= 32:
        _others_match(ref, moe_decode(xb, idx, w, gu, dn, shared=sh, lnc=lnc), bad_tok)
    tpos, b2e = moe_block_mapping(idx, e, 8)
    _others_match(ref, moe_blockwise(xb, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, lnc=lnc), bad_tok)
    wb = w.copy()
    wb[bad_tok, 0] = bad
    _others_match(ref, moe_blockwise(x, wb, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, lnc=lnc), bad_tok)


@_FEW
@given(t=st.integers(1, 32), e=st.integers(1, 8), k=st.integers(1, 6), offset=st.integers(0, 20),
       lnc=st.sampled_from([1, 2]), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_any_int32_ids_give_a_contained_defined_result(t, e, k, offset, lnc, data, seed):
    """Random ids over the whole int32 range mixed with local ones (duplicates included): the result equals the
    reference that ignores non-local ids, and no DMA leaves the weights (the emulator raises on any)."""
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, _ = moe_problem(rng, t, 128, e, 32, 1, 32)
    w = rng.random((t, k)).astype(np.float32)
    pool = data.draw(st.lists(st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), st.integers(offset, offset + e - 1),
                                        st.integers(offset - 2, offset + e + 2)), min_size=t * k, max_size=t * k))
    idx = np.array(pool, np.int64).reshape(t, k)
    out = moe_decode(x, idx, w, gu, dn, shared=sh, expert_offset=offset, lnc=lnc)
    assert_close("ids", moe_decode_reference(x, idx, w, gu, dn, sh, expert_offset=offset), out)


@_FEW
@given(t=st.integers(1, 32), e=st.integers(2, 12), k=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_decode_instruction_sequence_does_not_depend_on_routing(t, e, k, seed):
    k = min(k, e)
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = moe_problem(rng, t, 128, e, 32, k, 32)
    other = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    other[0, 0] = -7                       # a non-local id too
    seqs = []
    for ids in (idx, other):
        with record_launches() as runs:
            moe_decode(x, ids, w, gu, dn, shared=sh, lnc=2)
        seqs.append([[(ins.name, ins.engine) for ins in tr] for r in runs for tr in r.traces])
    assert seqs[0] == seqs[1]


@pytest.mark.parametrize("torch_in", [False, True])
def test_inputs_are_never_written(rng, torch_in):
    x, gu, dn, sh, w, idx = moe_problem(rng, 12, 128, 4, 32, 2, 32, dtype="bfloat16")
    tpos, b2e = moe_block_mapping(idx, 4, 8)
    args = [x, idx, w, gu, dn, *sh, tpos, b2e]
    if torch_in:
        from nki_kernels.backend import _to_torch
        args = [_to_torch(a) if a.dtype == ml_dtypes.bfloat16 else torch.from_numpy(a) for a in args]
        before = [(a.clone(), a._version) for a in args]
    else:
        before = [a.copy() for a in args]
    x_, idx_, w_, gu_, dn_, sg, sd, sgt, tpos_, b2e_ = args
    moe_decode(x_, idx_, w_, gu_, dn_, shared=(sg, sd, sgt))
    moe_blockwise(x_, w_, gu_, dn_, tpos_, b2e_, 8, shared=(sg, sd, sgt), top_k_index=idx_)
    for a, b in zip(args, before):
        if torch_in:
            assert torch.equal(a, b[0]) and a._version == b[1]
        else:
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_bad_kinds_and_dtypes_are_clear_errors(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 4, 128, 3, 32, 2, 32)
    tpos, b2e = moe_block_mapping(idx, 3, 8)
    cases = [
        (lambda: moe_decode(x.tolist(), idx, w, gu, dn), "hidden must be"),
        (lambda: moe_decode(x, idx.tolist(), w, gu, dn), "top_k_index must be"),
        (lambda: moe_decode(x, idx, w.astype(np.float64), gu, dn), "float64"),
        (lambda: moe_decode(x, idx.astype(np.float32), w, gu, dn), "integer"),
        (lambda: moe_decode(x, idx, w, gu, dn, expert_offset=1.5), "expert_offset"),
        (lambda: moe_decode(x[:0], idx[:0], w[:0], gu, dn), "at least one token"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos.tolist(), b2e, 8, top_k_index=idx), "token_position_to_id"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos.astype(np.float32), b2e, 8, top_k_index=idx), "1-D int"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos, b2e, 8.0, top_k_index=idx), "block_size"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos, b2e, 8, top_k_index=idx, max_experts_per_token=0),
         r"max_experts_per_token is the dense form's KMAX; with top_k_index KMAX is TOPK=2 .*got "
         r"max_experts_per_token=0"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos, b2e, 8, top_k_index=idx, max_experts_per_token=1),
         "max_experts_per_token is the dense form's KMAX"),
        (lambda: moe_blockwise(x, w, gu, dn, tpos, b2e, 8, top_k_index=idx, max_experts_per_token=2.0),
         "max_experts_per_token is the dense form's KMAX"),
    ]
    for fn, match in cases:
        with pytest.raises(KernelInputError, match=match):
            fn()
    with pytest.raises(TypeError):
        moe_decode(x, idx, w, gu, dn, bogus=1)


@pytest.mark.parametrize("combine", ["dma", "onchip"])
def test_max_experts_per_token_in_the_top_k_form_is_topk_or_refused(rng, combine):
    """In the top-k form KMAX is TOPK: max_experts_per_token=TOPK gives the reference's values (as None does); any
    other value is refused instead of being silently ignored (round 36 audit: 1 and even 0 went through)."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 20, 128, 4, 64, 2, 64)
    tpos, b2e = moe_block_mapping(idx, 4, 8)
    ref = moe_blockwise_reference(x, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx)
    for kmax in (None, 2, np.int64(2)):
        out = moe_blockwise(x, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, max_experts_per_token=kmax,
                            combine=combine)
        assert_close(f"top-k form, max_experts_per_token={kmax}", ref, out, dtype="float32")
    for kmax in (1, 3, 0, True):
        with pytest.raises(KernelInputError, match=rf"with top_k_index KMAX is TOPK=2 .*got "
                           rf"max_experts_per_token={kmax!r}"):
            moe_blockwise(x, w, gu, dn, tpos, b2e, 8, shared=sh, top_k_index=idx, max_experts_per_token=kmax,
                          combine=combine)
