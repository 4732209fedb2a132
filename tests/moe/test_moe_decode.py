"""moe_decode against the float64 reference, selective loading (each selected expert streamed once), EP, LNC=2,
validation."""
import numpy as np
import pytest
from _moe_inputs import moe_problem
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import moe_block_mapping, moe_blockwise, moe_decode
from nki_kernels.emulator import record_launches
from nki_kernels.hw import PSUM_FMAX_FP32
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


@given(t=st.integers(1, 32), h=st.sampled_from([128, 256]), e=st.integers(1, 12),
       inter=st.sampled_from([16, 48, 64, 96, 128, 384]), data=st.data(), shared_inter=st.sampled_from([0, 48, 128]),
       normalize=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_reference(t, h, e, inter, data, shared_inter, normalize, seed):
    k = data.draw(st.integers(1, min(e, 8)))
    x, gu, dn, sh, w, idx = moe_problem(np.random.default_rng(seed), t, h, e, inter, k, shared_inter, normalize)
    out = moe_decode(x, idx, w, gu, dn, shared=sh)
    assert out.shape == (t, h) and out.dtype == x.dtype
    assert_close("out", moe_decode_reference(x, idx, w, gu, dn, sh), out)


def _weight_dma_bytes(runs, gate_up):
    """Bytes the kernel DMAed out of expert weight storage (gate_up) in the recorded launches."""
    n = 0
    for r in runs:
        for tr in r.traces:
            for ins in tr:
                if ins.engine == "dma" and any(a.buffer == "hbm" and a.nbytes == gate_up[0].nbytes and a.dynamic
                                               for a in ins.reads):
                    n += 1
    return n


def test_each_selected_expert_is_streamed_once(rng):
    x, gu, dn, sh, w, _ = moe_problem(rng, 4, 128, 10, 64, 3, 0, True)
    idx = np.array([[1, 4, 7], [4, 1, 2], [7, 4, 1], [2, 1, 4]], dtype=np.int32)   # 4 distinct experts
    with record_launches() as runs:
        out = moe_decode(x, idx, w, gu, dn)
    assert _weight_dma_bytes(runs, gu) == 4
    assert_close("out", moe_decode_reference(x, idx, w, gu, dn), out)


def test_expert_parallel_and_shared_only(rng):
    x, gu_all, dn_all, sh, w, idx = moe_problem(rng, 8, 256, 12, 96, 4, 64, False)
    total = np.zeros(x.shape)
    for r in range(3):
        sl = slice(4 * r, 4 * r + 4)
        out = moe_decode(x, idx, w, gu_all[sl], dn_all[sl], shared=sh if r == 0 else None, expert_offset=4 * r)
        assert_close(f"rank {r}", moe_decode_reference(x, idx, w, gu_all[sl], dn_all[sl], sh if r == 0 else None,
                                                       expert_offset=4 * r), out)
        total += out
    assert_close("sum over ranks", moe_decode_reference(x, idx, w, gu_all, dn_all, sh), total)
    # a batch routed entirely to other ranks: only the shared term (and exact zeros without it)
    remote = idx + 100
    out = moe_decode(x, remote, w, gu_all[:4], dn_all[:4], shared=sh)
    assert_close("shared only", moe_decode_reference(x, remote, w, gu_all[:4], dn_all[:4], sh), out)
    out = moe_decode(x, remote, w, gu_all[:4], dn_all[:4])
    assert np.all(out == 0.0)


def test_decode_equals_blockwise_and_lnc2(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 16, 256, 9, 48, 4, 96, True)
    tpos, b2e = moe_block_mapping(idx, 9, 16)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    blk = moe_blockwise(x, w, gu, dn, tpos, b2e, 16, shared=sh, top_k_index=idx)
    dec = moe_decode(x, idx, w, gu, dn, shared=sh)
    dec2 = moe_decode(x, idx, w, gu, dn, shared=sh, lnc=2)
    assert_close("decode", ref, dec)
    assert_close("lnc2", ref, dec2)
    np.testing.assert_allclose(dec, blk, rtol=1e-5, atol=1e-6)


def test_many_slots_stream_in_waves(rng):
    """More distinct experts than weight buffers (T * TOPK affinities > one PSUM bank): several waves, both
    routing-row tiles (T * TOPK > 128), LNC=2."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 32, 128, 40, 64, 6, 48, True)
    assert np.unique(idx).size > PSUM_FMAX_FP32 // 32
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    assert_close("waves", ref, moe_decode(x, idx, w, gu, dn, shared=sh))
    assert_close("waves lnc2", ref, moe_decode(x, idx, w, gu, dn, shared=sh, lnc=2))


def test_big_shared_expert_shrinks_the_weight_ring(rng):
    """A 96 KiB-per-partition shared expert (H=2048, Is=1024, bf16) leaves room for fewer routed-expert buffers
    (the ring budget counts the shared weights); the result is unchanged."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 1, 2048, 8, 256, 5, 1024, True, dtype="bfloat16")
    out = moe_decode(x, idx, w, gu, dn, shared=sh)
    assert_close("big shared", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype="bfloat16")


def test_bf16_large_values(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 8, 256, 16, 128, 8, 128, True, dtype="bfloat16")
    x = (np.asarray(x, np.float32) * 20).astype(x.dtype)       # silu deep in both tails
    out = moe_decode(x, idx, w, gu, dn, shared=sh)
    assert_close("bf16", moe_decode_reference(x, idx, w, gu, dn, sh), out, dtype="bfloat16")


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(hidden=np.zeros((33, 128), np.float32), top_k_index=np.zeros((33, 2), np.int32),
                        top_k_weights=np.zeros((33, 2), np.float32)), "T must be <= 32"),
    (lambda a: a.update(top_k_index=a["top_k_index"][:, :1]), "top_k_weights must be"),
    (lambda a: a.update(top_k_index=a["top_k_index"].astype(np.float32)), "must be integer"),
    (lambda a: a.update(down=a["down"][:2]), "down must be"),
    (lambda a: a.update(lnc=3), "lnc"),
])
def test_bad_inputs_raise(rng, mutate, match):
    x, gu, dn, sh, w, idx = moe_problem(rng, 4, 128, 3, 32, 2, 32, True)
    args = dict(hidden=x, top_k_index=idx, top_k_weights=w, gate_up=gu, down=dn, shared=sh)
    mutate(args)
    with pytest.raises(KernelInputError, match=match):
        moe_decode(**args)
