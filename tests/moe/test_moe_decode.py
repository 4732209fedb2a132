"""moe_decode against the float64 reference, selective loading (each selected expert streamed once), EP, LNC=2,
validation."""
import numpy as np
import pytest
import torch
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


def _weight_dmas(runs, gate_up):
    """(gate_up-sized dynamic weight DMAs per program, instruction names per program) of the recorded launches."""
    n, names = [], []
    for r in runs:
        for tr in r.traces:
            n.append(sum(1 for ins in tr if ins.engine == "dma" and any(
                a.buffer == "hbm" and a.nbytes == gate_up[0].nbytes and a.dynamic for a in ins.reads)))
            names.append([ins.name for ins in tr])
    return n, names


def test_slot_count_is_static_and_duplicates_load_once(rng):
    """min(T * TOPK, E) weight slots whatever the routing values (traced once); a batch of 4 distinct experts among
    12 routing rows gives the same instruction sequence as one with 10 distinct experts, and the same result as the
    reference (duplicates counted once per routing row, not per slot)."""
    x, gu, dn, sh, w, _ = moe_problem(rng, 4, 128, 10, 64, 3, 0, True)
    few = np.array([[1, 4, 7], [4, 1, 2], [7, 4, 1], [2, 1, 4]], dtype=np.int32)   # 4 distinct experts
    many = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]], dtype=np.int32)   # all 10
    seqs = []
    for idx in (few, many):
        with record_launches() as runs:
            out = moe_decode(x, idx, w, gu, dn, lnc=1)
        n, names = _weight_dmas(runs, gu)
        assert len(runs) == 1 and n == [10]
        seqs.append(names)
        assert_close("out", moe_decode_reference(x, idx, w, gu, dn), out)
    assert seqs[0] == seqs[1]


def test_lnc2_is_one_launch_each_core_writes_its_share(rng, monkeypatch):
    """LNC=2 (explicit, or from NEURON_LOGICAL_NC_CONFIG with lnc=None): one launch of two programs, each writing
    its share: the tokens split for T >= 2 (odd T too); for T = 1 the cores split the slots and exchange partial
    sums, each writing its hidden columns (H = 128: core 0 alone)."""
    for t, h in ((5, 384), (2, 128), (1, 384), (1, 128)):
        x, gu, dn, sh, w, idx = moe_problem(rng, t, h, 7, 48, 3, 32, True)
        ref = moe_decode_reference(x, idx, w, gu, dn, sh)
        monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
        with record_launches() as runs:
            out = moe_decode(x, idx, w, gu, dn, shared=sh)
        assert len(runs) == 1 and len(runs[0].traces) == 2
        assert_close(f"lnc2 T={t} H={h}", ref, out)
        monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
        with record_launches() as runs:
            out1 = moe_decode(x, idx, w, gu, dn, shared=sh)
        assert len(runs) == 1 and len(runs[0].traces) == 1
        assert_close(f"lnc1 T={t} H={h}", ref, out1)


@pytest.mark.parametrize("k,shared_inter,h", [(1, 0, 128), (3, 33, 384), (8, 64, 256), (2, 32, 128), (5, 0, 384)])
def test_one_token_lnc2_splits_slots_and_shared(rng, k, shared_inter, h):
    """T = 1 at LNC=2: core 0 streams the first ceil(TOPK/2) experts, core 1 the rest (TOPK = 1: core 1 streams
    none and sends zeros); the shared expert's rows split in halves when Is / 2 tiles, else core 1 runs it; the
    summed result matches the float64 reference, and the two cores' results are exchanged exactly once."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 1, h, 9, 64, k, shared_inter, True)
    with record_launches() as runs:
        out = moe_decode(x, idx, w, gu, dn, shared=sh, lnc=2)
    n, names = _weight_dmas(runs, gu)
    assert n == [-(-k // 2), k // 2]
    assert [nm.count("sendrecv") for nm in names] == [1, 1]
    assert_close(f"T=1 lnc2 k={k} Is={shared_inter}", moe_decode_reference(x, idx, w, gu, dn, sh), out)


@pytest.mark.parametrize("k,h,inter", [(8, 256, 96), (5, 512, 96), (1, 256, 128), (2, 256, 80), (7, 256, 128)])
def test_one_token_lnc2_without_shared_exchanges_h(rng, k, h, inter):
    """T = 1 at LNC=2 with no shared expert and an unfolded gate_up (2I > 128, the thinker's case): each core
    streams the gate_up of its ceil / floor (TOPK/2) slots, sends their h to the other core (one sendrecv) and runs
    every slot's down projection on its half of the columns; the result matches the float64 reference, also with
    an out-of-range id (weight 0, loads a clamped expert) and a repeated id."""
    x, gu, dn, _, w, idx = moe_problem(rng, 1, h, 9, inter, k, 0, True)
    ref = moe_decode_reference(x, idx, w, gu, dn, None)
    with record_launches() as runs:
        out = moe_decode(x, idx, w, gu, dn, lnc=2)
    n, names = _weight_dmas(runs, gu)
    assert n == [-(-k // 2), k // 2]
    assert [nm.count("sendrecv") for nm in names] == [1, 1]
    # every core loads the down columns of all k slots (its own gate_up only): n_own + k dynamic weight DMAs
    dyn = [sum(1 for ins in tr if ins.engine == "dma" and any(a.dynamic for a in ins.reads)) for tr in runs[0].traces]
    assert dyn == [-(-k // 2) + k, k // 2 + k]
    assert_close(f"T=1 lnc2 no shared k={k} H={h} I={inter}", ref, out)
    if k >= 2:
        idx2 = idx.copy()
        idx2[0, 0], idx2[0, k - 1] = 1000, idx2[0, 1]
        ref2 = moe_decode_reference(x, idx2, w, gu, dn, None)
        assert_close("T=1 lnc2 bad / repeated id", ref2, moe_decode(x, idx2, w, gu, dn, lnc=2))


@pytest.mark.parametrize("shared_inter", [258, 640])
def test_one_token_lnc2_shared_half_that_does_not_tile(rng, shared_inter):
    """Is even but Is / 2 not a whole number of equal <= 128-row chunks (258 / 2 = 129 = 2 chunks of 64.5,
    640 / 2 = 320 = 3 chunks of 106.7): the shared expert's rows do not split (core 1 runs them all) and the
    result matches the float64 reference at both LNCs."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 1, 128, 8, 64, 2, shared_inter, True)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    for lnc in (1, 2):
        assert_close(f"T=1 lnc{lnc} Is={shared_inter}", ref, moe_decode(x, idx, w, gu, dn, shared=sh, lnc=lnc))


@pytest.mark.parametrize("lnc", [1, 2])
def test_one_token_more_than_512_choices(rng, lnc):
    """T = 1 with TOPK = 600 (> 512, the matmul moving free size; T * TOPK <= 1024 is accepted): the routing
    weights are spread in slices; duplicates of each id each count with their own weight."""
    h, e, i, k = 128, 4, 32, 600
    x = rng.standard_normal((1, h)).astype(np.float32)
    gu = (rng.standard_normal((e, h, 2, i)) / np.sqrt(h)).astype(np.float32)
    dn = (rng.standard_normal((e, i, h)) / np.sqrt(i)).astype(np.float32)
    idx = rng.integers(-1, e + 1, (1, k)).astype(np.int32)          # some ids not local
    w = rng.uniform(0.0, 2.0 / k, (1, k)).astype(np.float32)
    assert_close(f"TOPK={k} lnc{lnc}", moe_decode_reference(x, idx, w, gu, dn),
                 moe_decode(x, idx, w, gu, dn, lnc=lnc))


def test_trn1_several_tokens_no_tensor_engine_transpose_of_tokens(rng):
    """On trn1 (NeuronCore-v2) a TensorE transpose is a matmul by the identity and is not bit-exact with NaN /
    Inf, so a transpose with the tokens on its rows could carry 0 x NaN from one token into every other: there x
    reaches SBUF by DMA and no transpose runs (T = 2, no shared expert, p-major output); values still match."""
    from nki_kernels.emulator.targets import use_target
    for fold_inter in (32, 128):          # 2I <= 128 folds gate_up onto 64 partitions (a second x layout)
        x, gu, dn, sh, w, idx = moe_problem(rng, 2, 256, 4, fold_inter, 2, 0, True)
        with use_target("trn1"), record_launches() as runs:
            out = moe_decode(x, idx, w, gu, dn, lnc=1)
        assert not [ins.name for r in runs for tr in r.traces for ins in tr if ins.name == "nc_transpose"]
        assert_close(f"trn1 I={fold_inter}", moe_decode_reference(x, idx, w, gu, dn), out)
        xn = x.copy()
        xn[1, 5] = np.inf
        with use_target("trn1"):
            out = moe_decode(xn, idx, w, gu, dn, lnc=1)
        assert_close("trn1 other token", moe_decode_reference(x, idx, w, gu, dn)[0:1], out[0:1])


def test_out_of_range_ids_are_ignored_and_contained(rng):
    """Ids that are not local experts (negative, >= E, near the int32 limits, other ranks') contribute nothing and
    read nothing outside the weights; the other choices of the same token still count."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 6, 128, 5, 32, 3, 32, True)
    bad = idx.astype(np.int64).copy()
    bad[0, 0] = -1
    bad[1, :] = [2 ** 31 - 1, -2 ** 31, 5]
    bad[2, 1] = 1000
    bad[3, 2] = bad[3, 0]            # duplicate id within one token: both weights count
    for lnc in (1, 2):
        out = moe_decode(x, bad, w, gu, dn, shared=sh, lnc=lnc)
        assert np.all(np.isfinite(out))
        assert_close(f"lnc{lnc}", moe_decode_reference(x, bad, w, gu, dn, sh), out)
    out = moe_decode(x, bad.astype(np.int32), w, gu, dn, shared=sh, expert_offset=3)
    assert_close("offset", moe_decode_reference(x, bad, w, gu, dn, sh, expert_offset=3), out)


def test_int64_ids_beyond_int32_are_refused(rng):
    x, gu, dn, sh, w, idx = moe_problem(rng, 2, 128, 4, 32, 2, 0, True)
    big = idx.astype(np.int64)
    big[1, 1] = 2 ** 31 + 1              # would wrap to a negative int32 id
    with pytest.raises(KernelInputError, match="top_k_index ids must fit int32.*max=2147483649"):
        moe_decode(x, big, w, gu, dn)
    big[1, 1] = -2 ** 31 - 5
    with pytest.raises(KernelInputError, match="fit int32"):
        moe_decode(torch.from_numpy(x), torch.from_numpy(big), torch.from_numpy(w), torch.from_numpy(gu),
                   torch.from_numpy(dn))


def test_nan_in_one_token_stays_in_that_token(rng):
    """NaN in one token's hidden state or in one of its local routing weights: only that token's row is
    non-finite; a NaN weight of another rank's expert changes nothing."""
    x, gu, dn, sh, w, idx = moe_problem(rng, 8, 128, 4, 64, 2, 32, True)
    ref = moe_decode_reference(x, idx, w, gu, dn, sh)
    for lnc in (1, 2):
        xn = x.copy()
        xn[3, 0] = np.nan
        out = moe_decode(xn, idx, w, gu, dn, shared=sh, lnc=lnc)
        others = np.arange(8) != 3
        assert np.all(np.isnan(out[3]))
        assert_close("others", ref[others], out[others])
        wn = w.copy()
        wn[5, 1] = np.nan
        out = moe_decode(x, idx, wn, gu, dn, shared=sh, lnc=lnc)
        others = np.arange(8) != 5
        assert np.all(np.isnan(out[5]))
        assert_close("others w", ref[others], out[others])
        remote = idx.copy()
        remote[5, 1] = 99
        out = moe_decode(x, remote, wn, gu, dn, shared=sh, lnc=lnc)
        assert_close("remote nan weight", moe_decode_reference(x, remote, w, gu, dn, sh), out)


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
    (lambda a: a.update(top_k_index=a["top_k_index"].astype(np.float32)), "must be an integer array"),
    (lambda a: a.update(down=a["down"][:2]), "down must be"),
    (lambda a: a.update(lnc=3), "lnc"),
    (lambda a: a.update(top_k_weights=a["top_k_weights"].astype(np.float64)), "top_k_weights dtype"),
    (lambda a: a.update(top_k_index=a["top_k_index"].tolist()), "top_k_index must be"),
    (lambda a: a.update(expert_offset=-1), "expert_offset"),
    (lambda a: a.update(expert_offset=2 ** 24), "expert_offset"),
    (lambda a: a.update(hidden=np.zeros((32, 128), np.float32), top_k_index=np.zeros((32, 33), np.int32),
                        top_k_weights=np.zeros((32, 33), np.float32)), "T \\* TOPK must be <= 1024"),
])
def test_bad_inputs_raise(rng, mutate, match):
    x, gu, dn, sh, w, idx = moe_problem(rng, 4, 128, 3, 32, 2, 32, True)
    args = dict(hidden=x, top_k_index=idx, top_k_weights=w, gate_up=gu, down=dn, shared=sh)
    mutate(args)
    with pytest.raises(KernelInputError, match=match):
        moe_decode(**args)


@pytest.mark.parametrize("target, lnc, fold", [("trn2", 2, 1), ("trn3", 2, 1), ("trn1", 1, 2)])
def test_gate_up_fold_follows_the_targets_dma_knee(target, lnc, fold, rng):
    """The talker's widths (H = 1024, I = 48, bf16): an expert's gate_up rows on 128 partitions are 1536 B, past
    trn2 / trn3's 512 B packet knee (`hw.DMA_FULL_RATE_ROW_BYTES`), so they stay on 128 partitions there; under
    trn1's 2560 B knee they fold onto 64. Rows of 256 B (H = 256, I = 32) fold everywhere; rows of 3072 B (H = 2048,
    I = 48: folded on trn1 under the earlier 4096 B rule) fold nowhere. Each layout matches the reference at T = 1
    and T = 3 (at LNC=2: the cores split the slots, then the tokens; trn1 runs LNC=1)."""
    from nki_kernels.emulator.targets import use_target
    from nki_kernels.moe.decode import _fold_for
    with use_target(target):
        assert _fold_for(1024, 48, 2) == fold
        assert _fold_for(256, 32, 2) == 2
        assert _fold_for(2048, 48, 2) == 1
        for t, h in ((1, 1024), (3, 1024), (1, 2048)):
            x, gu, dn, sh, w, idx = moe_problem(rng, t, h, 8, 48, 4, 96, True, dtype="bfloat16")
            out = moe_decode(x, idx, w, gu, dn, sh, lnc=lnc)
            assert_close(f"{target} T={t} H={h}", moe_decode_reference(x, idx, w, gu, dn, sh), out,
                         dtype="bfloat16")


def test_h_exchange_with_small_experts_unfolded(rng, monkeypatch):
    """T = 1 at LNC=2 without a shared expert exchanges h between the cores (`_h_exchange_token`) when the slots'
    weights fit SBUF. With the fold gone on trn2 / trn3 at the talker's widths (2I <= 128), that path now runs for
    small experts too: bf16 H = 1024, I = 48 and I = 64, fp32 H = 512, I = 32, each against the reference, with the
    path taken."""
    from nki_kernels.emulator.targets import use_target
    from nki_kernels.moe import decode
    calls = []
    real = decode._h_exchange_token
    monkeypatch.setattr(decode, "_h_exchange_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    for target in ("trn2", "trn3"):
        for h, inter, dt in ((1024, 48, "bfloat16"), (1024, 64, "bfloat16"), (512, 32, "float32")):
            x, gu, dn, _, w, idx = moe_problem(rng, 1, h, 8, inter, 4, 0, True, dtype=dt)
            calls.clear()
            with use_target(target):
                out = moe_decode(x, idx, w, gu, dn, lnc=2)
            assert calls, (target, h, inter)
            assert_close(f"{target} H={h} I={inter}", moe_decode_reference(x, idx, w, gu, dn), out, dtype=dt)
