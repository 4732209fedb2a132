"""code_predictor_tp (issue 17): one launch per rank with in-kernel all-reduces. Every rank returns the same codes
and embeddings, equal to the TP=1 float64 reference (greedy; sampling with the same uniforms), at TP 2, 4, 8 and
LNC 1, 2; bad shards and replica groups are clear errors.

Codes are compared with the rule of test_unrolled.py: the reference is teacher-forced on the kernel's codes and
each code must be the reference's decision unless that decision is a near-tie (bf16 network vs float64)."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.codepredictor import code_predictor, random_weights, shard_weights
from nki_kernels.codepredictor.reference import code_predictor_reference
from nki_kernels.codepredictor.unrolled import code_predictor_tp
from nki_kernels.emulator import last_run
from nki_kernels.emulator.collectives import ReplicaGroup
from nki_kernels.validation import KernelInputError
from test_unrolled import DELTA_REL, _sampling_ambiguous  # noqa: E402  (tests/codepredictor is on sys.path)


def _weights(seed, V=64, G1=3, L=2):
    """Head and MLP counts that split 8 ways: 8 q / 8 kv heads of 32, I = 8 x 128."""
    rng = np.random.default_rng(seed)
    return random_weights(rng, hidden=128, n_q_heads=8, n_kv_heads=8, head_dim=32, intermediate=1024, n_layers=L,
                          n_groups=G1, vocab=V, lm_scale=3.0)


def _check_tp(ph, c0, w, tp, lnc, sk, vocab_sharded=False):
    shards = [shard_weights(w, tp, r, vocab_sharded=vocab_sharded) for r in range(tp)]
    ranks = code_predictor_tp(ph, c0, shards, return_sum=True, return_bad_rows=True, return_ranks=True, lnc=lnc,
                              **sk)
    assert len(ranks) == tp
    for r in range(1, tp):               # every rank: the same outputs, bit for bit
        for a, b in zip(ranks[r], ranks[0]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    codes, emb, csum, bad = ranks[0]
    assert not np.asarray(bad).any()
    rc, re, rs, lg = code_predictor_reference(ph, c0, w, return_sum=True, return_logits=True, forced_codes=codes,
                                              **sk)
    near = 0
    for b in range(codes.shape[0]):
        for j in range(w.n_groups):
            if codes[b, j] == rc[b, j]:
                continue
            l = lg[b, j]
            delta = DELTA_REL * np.sqrt(np.mean(l * l))
            if sk.get("do_sample"):
                amb = _sampling_ambiguous(l, sk["uniforms"][b, j], sk["temperature"], sk["top_k"], sk["top_p"], delta)
            else:
                amb = l.max() - l[codes[b, j]] <= delta
                near += 1
            assert amb, f"row {b} step {j}: code {codes[b, j]} != reference {rc[b, j]}, not a near-tie"
    assert near <= max(2, 0.25 * codes.size)
    tables = np.asarray(w.codec_embed)
    want = np.stack([tables[j][codes[:, j]] for j in range(w.n_groups)], axis=1)
    np.testing.assert_array_equal(np.asarray(emb), want)
    np.testing.assert_allclose(np.asarray(csum, np.float32), rs, rtol=2e-2, atol=2e-2)
    return codes


@given(tp=st.sampled_from([2, 4, 8]), lnc=st.sampled_from([1, 2]), B=st.integers(1, 5), sample=st.booleans(),
       V=st.sampled_from([64, 256, 1024]), vocab_sharded=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_tp_matches_reference_on_every_rank(tp, lnc, B, sample, V, vocab_sharded, seed):
    """V=1024 with vocab sharding: each rank's 128..512 LM-head rows on the vocab-on-partitions paths."""
    rng = np.random.default_rng(seed)
    w = _weights(seed % 5, V=V)
    ph = rng.standard_normal((B, w.hidden)).astype(np.float32)
    c0 = rng.standard_normal((B, w.hidden)).astype(np.float32)
    u = rng.random((B, w.n_groups)).astype(np.float32)
    sk = dict(uniforms=u, do_sample=True, temperature=0.9, top_k=13, top_p=0.8) if sample else {}
    _check_tp(ph, c0, w, tp, lnc, sk, vocab_sharded)


@pytest.mark.parametrize("V, sample", [(64, False), (256, False), (256, True), (1024, True)])
def test_vocab_sharded_heads_equal_replicated(V, sample):
    """Vocab-sharded LM heads (each rank its V / tp rows, logits all-gathered in-kernel) give bit for bit the
    replicated heads' outputs: each rank's logits are the same matmul columns, the selection then runs on the
    full gathered vocab."""
    w = _weights(7, V=V)
    rng = np.random.default_rng(7)
    ph = rng.standard_normal((3, w.hidden)).astype(np.float32)
    c0 = rng.standard_normal((3, w.hidden)).astype(np.float32)
    sk = dict(uniforms=rng.random((3, w.n_groups)).astype(np.float32), do_sample=True, top_k=20,
              top_p=0.9) if sample else {}
    a = code_predictor_tp(ph, c0, [shard_weights(w, 2, r) for r in range(2)], return_sum=True, **sk)
    b = code_predictor_tp(ph, c0, [shard_weights(w, 2, r, vocab_sharded=True) for r in range(2)], return_sum=True,
                          **sk)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    run = last_run()
    assert sum(1 for i in run.traces[0] if i.meta.get("collective") == "all_gather") == w.n_groups


def test_default_top_k_clamps_to_the_full_sharded_vocabulary():
    """Vocab-sharded heads: top_k=50 is clamped to the whole vocabulary Vh = 32 (2 ranks x 16 rows), not to one
    rank's rows, and gives the TP=1 reference's codes (it was refused)."""
    w = _weights(3, V=32)
    rng = np.random.default_rng(3)
    ph = rng.standard_normal((3, w.hidden)).astype(np.float32)
    c0 = rng.standard_normal((3, w.hidden)).astype(np.float32)
    sk = dict(uniforms=rng.random((3, w.n_groups)).astype(np.float32), do_sample=True, temperature=1.0, top_k=50,
              top_p=0.9)
    codes = _check_tp(ph, c0, w, 2, 1, sk, vocab_sharded=True)
    full = code_predictor_tp(ph, c0, [shard_weights(w, 2, r, vocab_sharded=True) for r in range(2)],
                             **{**sk, "top_k": 32})[0]
    np.testing.assert_array_equal(codes, full)


def test_tp_launch_records_the_all_reduces():
    """One launch of tp ranks (x lnc program instances); 2 all-reduces per layer and pass on each program that
    has rows: L x 2 x G1 passes (the 2-position prompt pass and G1 - 1 steps)."""
    w = _weights(1, G1=3, L=2)
    rng = np.random.default_rng(1)
    ph = rng.standard_normal((1, w.hidden)).astype(np.float32)
    code_predictor_tp(ph, ph, [shard_weights(w, 4, r) for r in range(4)], lnc=2)
    run = last_run()
    assert run.ranks == 4 and len(run.traces) == 8
    n_ar = [sum(1 for i in tr if i.meta.get("collective") == "all_reduce") for tr in run.traces]
    assert n_ar == [2 * 2 * 3, 0] * 4          # B = 1: core 1 of each rank has no rows


def test_bad_rows_under_tp():
    w = _weights(2)
    rng = np.random.default_rng(2)
    ph = rng.standard_normal((3, w.hidden)).astype(np.float32)
    c0 = rng.standard_normal((3, w.hidden)).astype(np.float32)
    ph[1, 4] = np.nan
    codes, _, bad = code_predictor_tp(ph, c0, [shard_weights(w, 2, r) for r in range(2)], return_bad_rows=True)
    np.testing.assert_array_equal(bad, [0, 1, 0])
    np.testing.assert_array_equal(codes[1], 0)


def _shards(tp=4, **kw):
    w = _weights(0)
    return w, [shard_weights(w, tp, r, **kw) for r in range(tp)]


def test_bad_shards_and_groups_raise():
    w, shards = _shards(4)
    x = np.zeros((1, w.hidden), np.float32)
    with pytest.raises(KernelInputError, match=r"shards\[1\] is sharded for TP=2 but 4 shards"):
        code_predictor_tp(x, x, [shards[0], shard_weights(w, 2, 1)] + shards[2:])
    with pytest.raises(KernelInputError, match=r"shards\[1\] must be rank 1's weights"):
        code_predictor_tp(x, x, [shards[0], shards[2], shards[1], shards[3]])
    other = dataclasses.replace(shards[3], wo_t=shards[3].wo_t[:, :-32, :])
    with pytest.raises(KernelInputError, match=r"shards\[3\]\.wo_t is .* same shapes"):
        code_predictor_tp(x, x, shards[:3] + [other])
    with pytest.raises(KernelInputError, match="replica_group must be"):
        code_predictor_tp(x, x, shards, replica_group=ReplicaGroup([[0, 1, 2, 5]]))
    with pytest.raises(KernelInputError, match="replica_group must be"):
        code_predictor_tp(x, x, shards, replica_group=[[0, 1], [2, 3]])
    with pytest.raises(KernelInputError,
                       match=r"replica_group as a list must hold rank lists, e.g. \[\[0, 1, \.\.\., 3\]\]"):
        code_predictor_tp(x, x, shards, replica_group=[0, 1, 2, 3])     # flat: a bare TypeError before
    with pytest.raises(KernelInputError, match="shards must be a list of CodePredictorWeights"):
        code_predictor_tp(x, x, w)
    with pytest.raises(KernelInputError, match="code_predictor_tp"):
        code_predictor(x, x, shards[0])
    _, vs = _shards(2, vocab_sharded=True)
    from nki_kernels.codepredictor.baselines import code_predictor_reprefill_tp
    with pytest.raises(KernelInputError, match="replicated LM heads"):
        code_predictor_reprefill_tp(x, x, vs)
    with pytest.raises(KernelInputError, match=r"shards\[1\]\.vocab_sharded=False differs"):
        code_predictor_tp(x, x, [vs[0], shard_weights(w, 2, 1)])


def test_shard_weights_rejects_bad_arguments():
    w = _weights(0)
    with pytest.raises(ValueError, match="rank must be an int in"):
        shard_weights(w, 4, 4)
    with pytest.raises(ValueError, match="must divide by tp=3"):
        shard_weights(w, 3, 0)
    with pytest.raises(ValueError, match="already rank"):
        shard_weights(shard_weights(w, 2, 1), 2, 0)


def test_per_rank_entry_point_checks_and_points_to_the_emulator_path():
    """code_predictor_rank is the per-process launch for a serving framework; on the emulator it validates and
    then says to use code_predictor_tp (one rank alone would wait forever at its first all-reduce)."""
    from nki_kernels.codepredictor.unrolled import code_predictor_rank
    w, shards = _shards(4)
    x = np.zeros((1, w.hidden), np.float32)
    g = ReplicaGroup([[0, 1, 2, 3]])
    with pytest.raises(KernelInputError, match="use code_predictor_tp"):
        code_predictor_rank(x, x, shards[2], replica_group=g)
    with pytest.raises(KernelInputError, match="rank-list of 4 ranks"):
        code_predictor_rank(x, x, shards[2], replica_group=ReplicaGroup([[0, 1], [2, 3]]))
    with pytest.raises(KernelInputError, match="replica_group is required"):
        code_predictor_rank(x, x, shards[2], replica_group=None)
    with pytest.raises(KernelInputError, match="shard must be one rank's"):
        code_predictor_rank(x, x, w, replica_group=g)
