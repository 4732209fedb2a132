"""The MoE decode baseline (NxD-style selective loading) against the float64 reference, and the microbench rule
that picks NxD's decode path."""
import numpy as np
import pytest
from _moe_inputs import moe_problem
from hypothesis import given
from hypothesis import strategies as st

from microbench.cases.moe import nxd_decode_baseline
from nki_kernels.moe.baseline import moe_selective_loading
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


@given(t=st.integers(1, 6), e=st.integers(1, 9), h=st.sampled_from([128, 256]), inter=st.sampled_from([16, 48, 96]),
       shared_inter=st.sampled_from([0, 32]), offset=st.sampled_from([0, 3]), data=st.data(),
       dtype=st.sampled_from(["float32", "bfloat16"]), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_selective_loading_matches_reference(t, e, h, inter, shared_inter, offset, data, dtype, lnc, seed):
    """Ids of other ranks (expert_offset) weigh nothing; a duplicate id in a row counts with both weights."""
    k = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    x, gu, dn, sh, w, idx = moe_problem(rng, t, h, e, inter, min(k, e + offset), shared_inter, True, dtype=dtype,
                                        n_global=e + offset)
    if data.draw(st.booleans()):
        idx[0, -1] = idx[0, 0]                 # a duplicate choice
    out = moe_selective_loading(x, idx, w, gu, dn, shared=sh, expert_offset=offset, lnc=lnc)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close("selective", moe_decode_reference(x, idx, w, gu, dn, sh, expert_offset=offset), out, dtype=dtype)


def test_selective_loading_validates_like_moe_decode():
    rng = np.random.default_rng(0)
    x, gu, dn, sh, w, idx = moe_problem(rng, 33, 128, 4, 16, 2)
    with pytest.raises(KernelInputError, match="T must be <= 32"):
        moe_selective_loading(x, idx, w, gu, dn)
    with pytest.raises(KernelInputError, match="top_k_index"):
        moe_selective_loading(x[:2], idx[:1], w[:1], gu, dn)


@pytest.mark.parametrize("t,k,e,name", [(1, 8, 256, "NxD selective loading"), (8, 8, 256, "NxD selective loading"),
                                        (32, 8, 256, "all-experts dense loop"), (8, 8, 128, "NxD selective loading"),
                                        (16, 8, 128, "all-experts dense loop"), (32, 6, 128, "all-experts dense loop")])
def test_nxd_decode_rule(t, k, e, name):
    """NxD ExpertMLPsV2: selective loading when T * TOPK / E < 1 (strictly), else all experts."""
    assert nxd_decode_baseline(t, k, e)[0] == name


def test_selective_loading_more_than_512_choices():
    """One token with TOPK = 600 (> 512, the matmul moving free size): the routing weights are spread in slices."""
    rng = np.random.default_rng(3)
    h, e, i, k = 128, 4, 32, 600
    x = rng.standard_normal((1, h)).astype(np.float32)
    gu = (rng.standard_normal((e, h, 2, i)) / np.sqrt(h)).astype(np.float32)
    dn = (rng.standard_normal((e, i, h)) / np.sqrt(i)).astype(np.float32)
    idx = rng.integers(0, e, (1, k)).astype(np.int32)
    w = rng.uniform(0.0, 2.0 / k, (1, k)).astype(np.float32)
    assert_close("baseline TOPK=600", moe_decode_reference(x, idx, w, gu, dn),
                 moe_selective_loading(x, idx, w, gu, dn, lnc=1))
