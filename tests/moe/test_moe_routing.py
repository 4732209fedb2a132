"""moe_route and moe_block_mapping: values against the float64 reference and the NxDI mapping contract."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import moe_block_mapping, moe_route
from nki_kernels.moe.reference import moe_route_reference
from nki_kernels.moe.routing import static_num_blocks
from nki_kernels.validation import KernelInputError


@given(t=st.integers(1, 40), e=st.integers(1, 64), data=st.data(), normalize=st.booleans(), seed=st.integers(0, 999))
def test_route_matches_reference(t, e, data, normalize, seed):
    k = data.draw(st.integers(1, e))
    logits = np.random.default_rng(seed).standard_normal((t, e)) * 3
    w, idx = moe_route(logits, k, normalize)
    rw, ridx = moe_route_reference(logits, k, normalize)
    assert idx.dtype == np.int32 and w.dtype == np.float32 and idx.shape == (t, k)
    np.testing.assert_allclose(w, rw, rtol=1e-5, atol=1e-7)
    # ties only matter where probabilities are equal; compare the selected probabilities set-wise
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(ridx, 1))
    if normalize:
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)


def test_route_huge_logits_and_torch():
    logits = np.array([[1e30, -1e30, 0.0, 5.0], [88.0, 88.0, -88.0, 0.0]], dtype=np.float32)
    w, idx = moe_route(torch.from_numpy(logits), 2, True)
    assert isinstance(w, torch.Tensor) and isinstance(idx, torch.Tensor)
    assert np.all(np.isfinite(w.numpy()))
    assert idx[0, 0].item() == 0 and abs(w[0, 0].item() - 1.0) < 1e-6
    assert sorted(idx[1].tolist()) == [0, 1]      # tie: both top experts, weights 0.5 each
    np.testing.assert_allclose(w[1].numpy(), [0.5, 0.5], rtol=1e-6)


def _check_contract(tpos, b2e, idx, n_experts, block_size, expert_offset=0):
    n_blocks = b2e.size
    assert tpos.dtype == np.int32 and b2e.dtype == np.int32 and tpos.size == n_blocks * block_size
    pairs = set()
    for b in range(n_blocks):
        for t in tpos[b * block_size:(b + 1) * block_size]:
            if t >= 0:
                assert (int(t), int(b2e[b])) not in pairs
                pairs.add((int(t), int(b2e[b])))
    want = {(t, int(e) - expert_offset) for t in range(idx.shape[0]) for e in idx[t]
            if 0 <= int(e) - expert_offset < n_experts}
    assert pairs == want
    assert np.all(np.diff(b2e) >= 0)                             # experts contiguous, ascending
    return pairs


@given(t=st.integers(1, 60), e=st.integers(1, 16), data=st.data(), block_size=st.sampled_from([1, 3, 8, 32, 128]),
       seed=st.integers(0, 999))
def test_mapping_contract(t, e, data, block_size, seed):
    k = data.draw(st.integers(1, e))
    _, idx = moe_route(np.random.default_rng(seed).standard_normal((t, e)), k, False)
    tpos, b2e = moe_block_mapping(idx, e, block_size)
    _check_contract(tpos, b2e, idx, e, block_size)
    counts = np.bincount(idx.reshape(-1), minlength=e)
    assert b2e.size == max(1, int(np.sum(-(-counts // block_size))))
    assert b2e.size <= static_num_blocks(t, k, e, block_size) or t * k < e
    # within each expert, tokens ascending, padding only at the end of the expert's last block
    for ex in np.unique(b2e):
        slots = tpos.reshape(-1, block_size)[b2e == ex].reshape(-1)
        real = slots[slots >= 0]
        assert np.all(np.diff(real) > 0) and np.all(slots[real.size:] == -1)


def test_mapping_expert_parallel_subset_and_static_blocks():
    idx = np.array([[0, 5], [6, 7], [1, 4], [7, 3]], dtype=np.int64)
    tpos, b2e = moe_block_mapping(idx, num_experts=4, block_size=2, expert_offset=4, num_blocks=6)
    _check_contract(tpos, b2e, idx, 4, 2, expert_offset=4)
    assert b2e.size == 6 and np.all(tpos[8:] == -1)             # 4 real blocks (experts 4..7 local 0..3) + 2 pads
    np.testing.assert_array_equal(b2e[:4], [0, 1, 2, 3])
    # nothing local: one all-padding block
    tpos, b2e = moe_block_mapping(np.array([[0, 1]]), num_experts=2, block_size=4, expert_offset=8)
    assert np.all(tpos == -1) and b2e.tolist() == [0]


def test_mapping_torch_roundtrip():
    idx = torch.tensor([[2, 0], [0, 1]], dtype=torch.int64)
    tpos, b2e = moe_block_mapping(idx, 3, 2)
    assert isinstance(tpos, torch.Tensor) and tpos.dtype == torch.int32
    assert tpos.tolist() == [0, 1, 1, -1, 0, -1] and b2e.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k_index=np.zeros(3, np.int32), num_experts=2, block_size=4), "must be \\[T, TOPK\\]"),
    (dict(top_k_index=np.zeros((3, 1), np.float32), num_experts=2, block_size=4), "must be integer"),
    (dict(top_k_index=np.zeros((3, 1), np.int32), num_experts=0, block_size=4), "num_experts"),
    (dict(top_k_index=np.zeros((3, 1), np.int32), num_experts=2, block_size=0), "block_size"),
    (dict(top_k_index=np.zeros((3, 1), np.int32), num_experts=2, block_size=1, num_blocks=2), "num_blocks=2"),
])
def test_mapping_bad_inputs(kwargs, match):
    with pytest.raises(KernelInputError, match=match):
        moe_block_mapping(**kwargs)


@pytest.mark.parametrize("offset", [-1, 1.0, True])
def test_block_mapping_refuses_the_offsets_the_kernels_refuse(offset):
    """expert_offset follows moe_blockwise / moe_decode's rule (an int in [0, 2^24 - E]): -1 was accepted here."""
    with pytest.raises(KernelInputError, match="moe_block_mapping: expert_offset must be an int"):
        moe_block_mapping(np.zeros((2, 1), np.int32), 4, 8, expert_offset=offset)


def test_route_bad_inputs():
    with pytest.raises(KernelInputError, match="top_k"):
        moe_route(np.zeros((2, 4)), 5, True)
    with pytest.raises(KernelInputError, match=r"\[T, E\]"):
        moe_route(np.zeros(4), 1, True)
    for bad in ("no", 0, None):      # a typo'd flag is refused, not read as its truthiness
        with pytest.raises(KernelInputError, match="normalize must be True or False"):
            moe_route(np.zeros((2, 4)), 2, bad)
