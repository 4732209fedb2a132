"""code_predictor at LNC=1 and LNC=2 (issue 14): one launch, the batch rows split between the two cores, the
same codes and embeddings as the float64 reference and, bit for bit, as LNC=1; or each row's work split between
the cores (lnc_split="heads": partial sums exchanged through shared HBM with nisa.core_barrier); the default LNC
comes from NEURON_LOGICAL_NC_CONFIG / the target; the instruction sequence does not depend on tensor values."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.codepredictor import code_predictor, random_weights
from nki_kernels.emulator import last_run
from nki_kernels.lnc import LNC_ENV
from nki_kernels.validation import KernelInputError

from test_unrolled import _check  # noqa: E402  (tests/codepredictor is on sys.path: no package)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(LNC_ENV, raising=False)


def _weights(seed, V=64, G1=3, L=1, Hq=2, Hkv=1):
    rng = np.random.default_rng(seed)
    return random_weights(rng, hidden=128, n_q_heads=Hq, n_kv_heads=Hkv, head_dim=64, intermediate=128,
                          n_layers=L, n_groups=G1, vocab=V, lm_scale=3.0)


def _prompt(seed, B, H):
    rng = np.random.default_rng(seed + 1)
    return (rng.standard_normal((B, H)).astype(np.float32), rng.standard_normal((B, H)).astype(np.float32),
            rng.random((B, 8)).astype(np.float32))


def _outputs(ph, c0, w, **kw):
    out = code_predictor(ph, c0, w, return_sum=True, return_bad_rows=True, **kw)
    return [np.asarray(o) for o in out]


def _program_rows(run):
    """Rows each program instance wrote to the codes output (from its trace's DMA writes), for the split check."""
    return [sum(1 for ins in tr if ins.name == "dma_copy" and any(a.buffer == "hbm" for a in ins.writes))
            for tr in run.traces]


@given(B=st.integers(1, 9), V=st.sampled_from([64, 256]), sample=st.booleans(), G1=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_lnc2_matches_reference_and_lnc1(B, V, sample, G1, seed):
    w = _weights(seed % 5, V=V, G1=G1)
    ph, c0, u = _prompt(seed, B, w.hidden)
    sk = dict(uniforms=u[:, :G1], do_sample=True, temperature=0.9, top_k=13, top_p=0.8) if sample else {}
    _check(ph, c0, w, sampling=sk or None, lnc=2)
    run = last_run()
    assert run.lnc == 2 and len(run.traces) == 2
    two = _outputs(ph, c0, w, lnc=2, **sk)
    one = _outputs(ph, c0, w, lnc=1, **sk)
    for a, b in zip(two, one):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("env", ["1", "2"])
def test_env_sets_the_degree(monkeypatch, env):
    """NEURON_LOGICAL_NC_CONFIG with no lnc argument: that many program instances, results equal to the
    reference (and to the explicit launch)."""
    monkeypatch.setenv(LNC_ENV, env)
    w = _weights(1, V=256, G1=3)
    ph, c0, _ = _prompt(1, 5, w.hidden)
    _check(ph, c0, w)
    assert last_run().lnc == int(env) and len(last_run().traces) == int(env)
    got = _outputs(ph, c0, w)
    want = _outputs(ph, c0, w, lnc=int(env))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_default_is_lnc2_on_trn2():
    w = _weights(2)
    ph, c0, _ = _prompt(2, 4, w.hidden)
    code_predictor(ph, c0, w)
    assert last_run().lnc == 2


@pytest.mark.parametrize("B", [1, 2, 7])
def test_each_core_writes_only_its_rows(B):
    """Core 0 takes ceil(B / 2) rows, core 1 the rest (none at B = 1): its trace writes outputs only then.
    (The emulator also fails any shared-HBM element written by both cores.)"""
    w = _weights(3, G1=2)
    ph, c0, _ = _prompt(3, B, w.hidden)
    code_predictor(ph, c0, w, lnc=2)
    writes = _program_rows(last_run())
    assert writes[0] > 0
    assert (writes[1] > 0) == (B > 1)


@pytest.mark.parametrize("lnc, split", [(1, None), (2, "rows"), (2, "heads")])
@pytest.mark.parametrize("sample", [False, True])
def test_instruction_sequence_is_value_independent(lnc, split, sample):
    """Same shapes, different values (ordinary, huge, NaN rows, other uniforms): identical traces per core."""
    w = _split_weights(4, V=256, G1=3)
    B = 3
    sigs = []
    for k, fill in enumerate((None, 1e30, np.nan)):
        ph, c0, u = _prompt(10 + k, B, w.hidden)
        if fill is not None:
            ph[1] = fill
        sk = dict(uniforms=u[:, :3], do_sample=True, top_k=9, top_p=0.7) if sample else {}
        code_predictor(ph, c0, w, lnc=lnc, lnc_split=split, **sk)
        sigs.append([[(i.name, i.engine, tuple((a.buffer, a.dtype, a.shape) for a in i.reads + i.writes))
                      for i in tr] for tr in last_run().traces])
    assert sigs[0] == sigs[1] == sigs[2]


@pytest.mark.parametrize("lnc, msg", [(3, "lnc must be one of"), ("2", "lnc must be one of"),
                                      (0, "lnc must be one of")])
def test_bad_lnc_raises(lnc, msg):
    w = _weights(0)
    x = np.zeros((2, w.hidden), np.float32)
    with pytest.raises(KernelInputError, match=msg):
        code_predictor(x, x, w, lnc=lnc)


def test_bad_env_raises(monkeypatch):
    monkeypatch.setenv(LNC_ENV, "two")
    w = _weights(0)
    x = np.zeros((2, w.hidden), np.float32)
    with pytest.raises(KernelInputError, match=LNC_ENV):
        code_predictor(x, x, w)


# ---------------------------------------------------------------- LNC=2 split of each row's work ("heads")


def _split_weights(seed, V=256, G1=3, L=2):
    """Heads and MLP columns that halve: 2 q / 2 kv heads of 64, I = 256 (128 columns per core)."""
    rng = np.random.default_rng(seed)
    return random_weights(rng, hidden=128, n_q_heads=2, n_kv_heads=2, head_dim=64, intermediate=256,
                          n_layers=L, n_groups=G1, vocab=V, lm_scale=3.0)


@given(B=st.integers(1, 6), V=st.sampled_from([64, 256, 512]), sample=st.booleans(), G1=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_heads_split_matches_reference(B, V, sample, G1, seed):
    """Each core runs every row on half of the heads, MLP columns and LM-head vocab, exchanging partial sums and
    logits through shared HBM with core barriers; the codes satisfy the reference check (teacher-forced float64,
    near-tie rule) and the embeddings are the table rows. V = 64: the rows-layout selection; 256 / 512: vocab on
    partitions (128 / 256 LM-head rows per core)."""
    w = _split_weights(seed % 5, V=V, G1=G1)
    ph, c0, u = _prompt(seed, B, w.hidden)
    sk = dict(uniforms=u[:, :G1], do_sample=True, temperature=0.9, top_k=13, top_p=0.8) if sample else {}
    _check(ph, c0, w, sampling=sk or None, lnc=2, lnc_split="heads")
    run = last_run()
    assert run.lnc == 2 and all(sum(i.name == "core_barrier" for i in tr) > 0 for tr in run.traces)


def test_heads_split_core_roles():
    """Under the heads split core 0 writes the codes and bad-row flags, each core half of the embedding and sum
    columns (the emulator fails any shared-HBM element both cores write), and both issue the same barriers:
    2 per layer and pass (o_proj, down_proj) plus 1 per code (the logits)."""
    L, G1, B = 2, 3, 2
    w = _split_weights(5, L=L, G1=G1)
    ph, c0, _ = _prompt(5, B, w.hidden)
    code_predictor(ph, c0, w, lnc=2, lnc_split="heads")
    traces = last_run().traces
    barriers = [sum(i.name == "core_barrier" for i in tr) for tr in traces]
    assert barriers == [2 * L * G1 + G1] * 2        # passes: the prompt pass + G1 - 1 steps = G1

    def writes(tr, shape):
        return sum(1 for i in tr if i.name == "dma_copy" and any(a.buffer == "hbm" and tuple(a.shape) == shape
                                                                for a in i.writes))
    assert writes(traces[0], (B, 1)) == G1 + 1 and writes(traces[1], (B, 1)) == 0     # codes + bad rows
    assert writes(traces[0], (B, w.hidden // 2)) == writes(traces[1], (B, w.hidden // 2)) == G1 + 1


@pytest.mark.parametrize("sample", [False, True])
def test_heads_split_under_tp(sample):
    """TP=2 ranks x 2 cores: each rank's shard halved again between its cores (core exchange, then the all-reduce
    over the ranks); every rank's outputs equal, codes pass the reference check."""
    from nki_kernels.codepredictor import shard_weights
    from nki_kernels.codepredictor.unrolled import code_predictor_tp
    from nki_kernels.codepredictor.reference import code_predictor_reference
    rng = np.random.default_rng(11)
    w = random_weights(rng, hidden=128, n_q_heads=4, n_kv_heads=4, head_dim=32, intermediate=512, n_layers=2,
                       n_groups=3, vocab=512, lm_scale=3.0)
    B = 3
    ph, c0, u = _prompt(11, B, w.hidden)
    sk = dict(uniforms=u[:, :3], do_sample=True, temperature=0.9, top_k=13, top_p=0.8) if sample else {}
    for vocab_sharded in (False, True):
        shards = [shard_weights(w, 2, r, vocab_sharded=vocab_sharded) for r in range(2)]
        ranks = code_predictor_tp(ph, c0, shards, lnc=2, lnc_split="heads", return_ranks=True, **sk)
        assert sum(i.name == "core_barrier" for i in last_run().traces[0]) > 0
        for a, b in zip(ranks[1], ranks[0]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        codes, emb = ranks[0]
        rc = code_predictor_reference(ph, c0, w, forced_codes=codes, **sk)[0]
        assert np.mean(codes == rc) >= 0.75          # near-ties aside (the exact rule: test_heads_split_...)
        tables = np.asarray(w.codec_embed)
        np.testing.assert_array_equal(np.asarray(emb), np.stack([tables[j][codes[:, j]] for j in range(3)], axis=1))


def test_default_split_follows_residency():
    """The default (lnc_split=None) is a trace-time rule on shapes: "rows" when the matrices stay resident in
    SBUF, "heads" when they are streamed (resident=False stands in for a model too large for SBUF)."""
    from nki_kernels.codepredictor.unrolled import _launch_plan
    w = _split_weights(0)
    assert _launch_plan(w, 1, 2, False, None, None, "t")[0] is False
    assert _launch_plan(w, 1, 2, False, False, None, "t")[0] is True
    assert _launch_plan(w, 1, 1, False, False, None, "t")[0] is False
    odd = _weights(0)                                 # 1 KV head: cannot halve
    assert _launch_plan(odd, 1, 2, False, False, None, "t")[0] is False


@pytest.mark.parametrize("kw, msg", [(dict(lnc=2, lnc_split="cols"), "lnc_split must be None, 'rows' or 'heads'"),
                                     (dict(lnc=1, lnc_split="heads"), "got lnc=1"),
                                     (dict(lnc=2, lnc_split="heads", odd=True), "heads 2/1 must be even")])
def test_heads_split_bad_input(kw, msg):
    odd = kw.pop("odd", False)
    w = _weights(0) if odd else _split_weights(0)
    x = np.zeros((2, w.hidden), np.float32)
    with pytest.raises(KernelInputError, match=msg):
        code_predictor(x, x, w, **kw)
