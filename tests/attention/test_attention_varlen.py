"""flash_attention_varlen (packed sequences, flash-attn varlen layout): against the per-sequence float64 reference
and per-sequence flash_attention runs, lengths including 0 and 1, causal and not, GQA, encoder head dims, LNC,
traced once (instructions independent of cu_seqlens values), non-finite values contained, bad inputs."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels import flash_attention_varlen
from nki_kernels.attention.reference import flash_attention_ref, flash_attention_varlen_ref
from nki_kernels.attention.varlen import _LOOP_BLOCK, _SBUF_KV_BUDGET, MAX_PACKED_Q, MAX_SEQS, kv_resident_bytes
from nki_kernels.emulator import use_target
from nki_kernels.emulator.runtime import last_run
from nki_kernels.testing import assert_close, program_signature
from nki_kernels.validation import KernelInputError
from varlen_kit import assert_each_sequence_alone, cu as _cu, lengths as _lengths, packed as _packed

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "bfloat16": BF16}


@given(data=st.data(), causal=st.booleans(), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([64, 72, 80, 96, 128, 256]), dtype=st.sampled_from(["bfloat16", "float32"]),
       use_gate=st.booleans(), lnc=st.sampled_from([1, 2]), band=st.sampled_from([None, 0, 3]),
       seed=st.integers(0, 2 ** 16))
def test_matches_per_sequence_reference(data, causal, hkv, group, d, dtype, use_gate, lnc, band, seed):
    """band: None (no max_seqlen_q), else max_seqlen_q = longest query sequence + band (self-attention
    packing when not causal)."""
    lq, lk = data.draw(_lengths(causal, 5))
    if band is not None and not causal:
        lk = list(lq)
    max_q = None if band is None else max(lq) + band
    rng = np.random.default_rng(seed)
    q, k, v, g = _packed(rng, lq, lk, hkv * group, hkv, d, DTYPES[dtype], gate=use_gate)
    out = flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g, lnc=lnc, max_seqlen_q=max_q)
    ref = flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    assert_close(f"varlen lq={lq} lk={lk}", ref, out, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_equals_each_sequence_run_alone(causal):
    """Packed output == flash_attention on each sequence alone (the padded path, B=1 per sequence)."""
    rng = np.random.default_rng(11)
    lq = [300, 1, 129, 0, 77]
    lk = [300 + 40, 1, 129, 5, 77] if causal else [300, 3, 129, 5, 77]
    q, k, v, g = _packed(rng, lq, lk, 4, 2, 128, BF16, gate=True)
    packed = np.asarray(flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=causal, gate=g), np.float64)
    assert_each_sequence_alone(packed, q, k, v, g, lq, lk, causal)


def test_queries_without_keys_are_zero():
    rng = np.random.default_rng(12)
    lq, lk = [4, 6], [0, 9]
    q, k, v, _ = _packed(rng, lq, lk, 2, 1, 64, np.float32)
    out = np.asarray(flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=False))
    assert np.all(out[:4] == 0.0)
    assert_close("rest", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=False), out)


def test_lnc2_bit_identical_to_lnc1_and_splits():
    rng = np.random.default_rng(13)
    lq = [200, 57, 300]
    for hkv in (2, 1):
        q, k, v, g = _packed(rng, lq, lq, 4, hkv, 256, BF16, gate=True)
        one = flash_attention_varlen(q, k, v, _cu(lq), _cu(lq), gate=g, lnc=1)
        two = flash_attention_varlen(q, k, v, _cu(lq), _cu(lq), gate=g, lnc=2)
        assert len(last_run().traces) == 2 and all(len(t) > 0 for t in last_run().traces)
        np.testing.assert_array_equal(np.asarray(one, np.float64), np.asarray(two, np.float64))


@pytest.mark.parametrize("causal", [True, False])
def test_instructions_independent_of_cu_seqlens_values(causal):
    """Traced once: the same shapes (Tq, Tk, N) with different boundaries give the same compiled program (the
    key-block loop of each query tile is one copy of its body; only its trip count comes from cu_seqlens)."""
    rng = np.random.default_rng(14)
    q, k, v, _ = _packed(rng, [300], [1100], 2, 1, 64, BF16)
    sigs, trips = [], []
    for lq, lk in (([100, 0, 200], [520, 380, 200]), ([1, 298, 1], [1, 1098, 1]), ([0, 0, 300], [0, 0, 1100])):
        out = flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=causal)
        assert_close("values", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=causal), out,
                     dtype="bfloat16")
        sigs.append(program_signature([last_run()]))
        trips.append([rec["trips"] for t in last_run().traces for rec in t.loops.values()])
    assert len(sigs) == 3 and sigs[0] == sigs[1] == sigs[2]
    assert len({tuple(t) for t in trips}) > 1            # the data did change how many blocks were visited


# ------------------------------------------------------------------ non-finite values

@given(where=st.sampled_from(["q", "k", "v", "gate"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       causal=st.booleans(), dtype=st.sampled_from(["bfloat16", "float32"]), seed=st.integers(0, 2 ** 16))
def test_non_finite_stays_in_its_sequence(where, value, causal, dtype, seed):
    """A non-finite value in one sequence leaves every other sequence bit-identical; inside the sequence it
    reaches only the rows that see it (q / gate: its own row; k / v: the rows that attend that key)."""
    rng = np.random.default_rng(seed)
    lq = [int(x) for x in rng.integers(0, 150, size=4)]
    lq[1] = max(lq[1], 1)
    lk = [x + int(rng.integers(0, 3)) for x in lq]
    lk[1] = max(lk[1], 1)
    q, k, v, g = _packed(rng, lq, lk, 2, 1, 64, DTYPES[dtype], gate=True)
    cq, ck = _cu(lq), _cu(lk)
    clean = np.asarray(flash_attention_varlen(q, k, v, cq, ck, causal=causal, gate=g), np.float64)
    t = dict(q=q.copy(), k=k.copy(), v=v.copy(), gate=g.copy())
    if where in ("q", "gate"):
        pos = int(rng.integers(cq[1], cq[2]))
    else:
        pos = int(rng.integers(ck[1], ck[2]))
    t[where][pos, 0, 5] = value
    out = np.asarray(flash_attention_varlen(t["q"], t["k"], t["v"], cq, ck, causal=causal, gate=t["gate"]),
                     np.float64)
    in_seq = np.zeros(len(out), bool)
    in_seq[cq[1]:cq[2]] = True
    np.testing.assert_array_equal(out[~in_seq], clean[~in_seq])
    if where in ("q", "gate"):
        others = np.ones(out.shape[:2], bool)
        others[pos] = False
        np.testing.assert_array_equal(out[others], clean[others])
    else:      # only the rows whose mask shows the key may change
        i = np.arange(lq[1])
        key = pos - ck[1]
        sees = (key <= lk[1] - lq[1] + i) if causal else np.ones(lq[1], bool)
        rows = cq[1] + i[~sees]
        np.testing.assert_array_equal(out[rows], clean[rows])


# ------------------------------------------------------------------ limits and bad inputs

def test_largest_packed_keys_fit_on_chip():
    """The SBUF check is exact enough: the largest Tk accepted for bf16 D=256 runs (emulator SBUF checks)."""
    from nki_kernels.attention.varlen import _SBUF_KV_BUDGET, kv_resident_bytes
    tk = max(t for t in range(128, 40000, 128) if kv_resident_bytes(t, 256, 2) <= _SBUF_KV_BUDGET)
    rng = np.random.default_rng(15)
    lq = [tk - 1000, 1000]
    q, k, v, _ = _packed(rng, [128, 1], lq, 1, 1, 256, BF16)
    out = flash_attention_varlen(q, k, v, _cu([128, 1]), _cu(lq), causal=True)
    assert_close("largest", flash_attention_varlen_ref(q, k, v, _cu([128, 1]), _cu(lq)), out, dtype="bfloat16")
    k2 = np.zeros((tk + 128, 1, 256), BF16)
    with pytest.raises(KernelInputError, match="must fit SBUF"):
        flash_attention_varlen(q, k2, k2, _cu([128, 1]), _cu([tk, 128]), causal=True)


def _largest_tk(d, itemsize):
    return max(t for t in range(128, 80000, 128) if kv_resident_bytes(t, d, itemsize) <= _SBUF_KV_BUDGET)


@pytest.mark.parametrize("target", ["trn1", "trn2"])
@pytest.mark.parametrize("dtype, d", [("float32", 256), ("bfloat16", 256), ("float32", 64), ("bfloat16", 64)])
def test_worst_case_loop_shapes_fit_on_chip(target, dtype, d):
    """The largest accepted Tk with the largest KV group (16 query heads per KV head, loop state, Q^T, gate and
    out staging at their largest), gated, on trn1's smaller SBUF too: runs (emulator SBUF checks) and matches.
    The K/V residency is what is big: the query tile (causal, the last 128 rows of a 384-key sequence) runs two
    loop blocks, the first sequence's keys have no queries."""
    dt = DTYPES[dtype]
    tk = _largest_tk(d, np.dtype(dt).itemsize)
    lq, lk = [0, 128], [tk - 384, 384]
    q, k, v, g = _packed(np.random.default_rng(16), lq, lk, 16, 1, d, dt, gate=True)
    with use_target(target):
        out = flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=True, gate=g, lnc=1)
    assert_close(f"worst {target} {dtype} D={d} Tk={tk}", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk),
                 causal=True, gate=g), out, dtype=dtype)


def test_packed_query_limit():
    """Tq = MAX_PACKED_Q runs in the loop mode on trn1 with the largest Tk and matches; one more query is refused
    with a message naming Tq and the limit."""
    tk = _largest_tk(64, 2)
    lq, lk = [MAX_PACKED_Q, 0], [200, tk - 200]
    q, k, v, g = _packed(np.random.default_rng(17), lq, lk, 1, 1, 64, BF16, gate=True)
    with use_target("trn1"):
        out = flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=False, gate=g, lnc=1)
    assert_close("max Tq", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=False, gate=g), out,
                 dtype="bfloat16")
    q1 = np.zeros((MAX_PACKED_Q + 1, 1, 64), BF16)
    with pytest.raises(KernelInputError, match=f"at most {MAX_PACKED_Q} packed queries .* got Tq={MAX_PACKED_Q + 1}"):
        flash_attention_varlen(q1, k, v, _cu([MAX_PACKED_Q + 1, 0]), _cu(lk), causal=False)


def test_many_sequences_limit():
    q = np.zeros((MAX_SEQS + 1, 1, 64), np.float32)
    ones = _cu([1] * MAX_SEQS)
    out = flash_attention_varlen(q[:MAX_SEQS], q[:MAX_SEQS], q[:MAX_SEQS], ones, ones, causal=False)
    assert out.shape == (MAX_SEQS, 1, 64)
    more = _cu([1] * (MAX_SEQS + 1))
    with pytest.raises(KernelInputError, match=f"at most {MAX_SEQS} sequences"):
        flash_attention_varlen(q, q, q, more, more)


@pytest.mark.parametrize("cu_q, cu_k, causal, match", [
    (np.array([0., 4.]), [0, 4], True, "cu_seqlens_q must be integers"),
    ([0, 4], np.array([0., 4.]), True, "cu_seqlens_k must be integers"),
    ([1, 4], [0, 4], True, r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\]=1"),
    ([0, 3, 2, 4], [0, 1, 2, 4], True, "cu_seqlens_q must be non-decreasing"),
    ([0, 3], [0, 4], True, r"cu_seqlens_q must end at the packed length 4, got cu_seqlens_q\[-1\]=3"),
    ([0, 4], [0, 5], True, r"cu_seqlens_k must end at the packed length 4"),
    ([0, 2, 4], [0, 4], True, "same number of sequences, got N=2 and cu_seqlens_k N=1"),
    ([0, 3, 4], [0, 2, 4], True, "at least as many keys as queries .* sequence 0 with 3 queries and 2 keys"),
    ([0], [0], False, r"cu_seqlens_q must be 1-D \[N\+1\] with N >= 1"),
    ([[0, 4]], [0, 4], False, r"cu_seqlens_q must be 1-D"),
    ("0,4", [0, 4], False, "cu_seqlens_q must be integers"),
])
def test_bad_cu_seqlens(cu_q, cu_k, causal, match):
    q = np.zeros((4, 2, 64), np.float32)
    with pytest.raises(KernelInputError, match=match):
        flash_attention_varlen(q, q[:, :1], q[:, :1], cu_q, cu_k, causal=causal)


def test_more_queries_than_keys_allowed_when_not_causal():
    rng = np.random.default_rng(16)
    q, k, v, _ = _packed(rng, [3, 1], [2, 4], 2, 1, 64, np.float32)
    out = flash_attention_varlen(q, k, v, [0, 3, 4], [0, 2, 6], causal=False)
    assert_close("noncausal", flash_attention_varlen_ref(q, k, v, [0, 3, 4], [0, 2, 6], causal=False), out)


@pytest.mark.parametrize("kw, match", [
    (dict(q_shape=(4, 2, 2, 64)), r"q must be 3-D \[Tq, Hq, D\]"),
    (dict(q_shape=(0, 2, 64)), "every dimension of q"),
    (dict(k_shape=(4, 3, 64)), "Hq must be a multiple of Hkv"),
    (dict(d=320), r"head dim D must be in \[1, 256\]"),
    (dict(gate_shape=(4, 2, 32)), "gate must have q's shape"),
    (dict(scale=np.float32(-1)), "softmax_scale must be a finite number > 0"),
    (dict(lnc=3), r"lnc must be one of \(1, 2\)"),
    (dict(causal=1), "causal must be a bool"),
    (dict(dtype=np.float64), "dtype must be one of"),
])
def test_bad_arguments(kw, match):
    d = kw.get("d", 64)
    dt = kw.get("dtype", np.float32)
    q = np.zeros(kw.get("q_shape", (4, 2, d)), dt)
    k = np.zeros(kw.get("k_shape", (4, 1, d)), dt)
    gate = np.zeros(kw["gate_shape"], np.float32) if "gate_shape" in kw else None
    with pytest.raises(KernelInputError, match=match):
        flash_attention_varlen(q, k, k, [0, 4], [0, 4], causal=kw.get("causal", True), gate=gate,
                               softmax_scale=kw.get("scale"), lnc=kw.get("lnc"))


def test_torch_inputs_and_expanded_kv_untouched():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(30, 4, 64, generator=gen).to(torch.bfloat16)
    kv = torch.randn(30, 1, 64, generator=gen).to(torch.bfloat16).expand(30, 2, 64)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    before = (q.clone(), kv.clone(), cu.clone())
    out = flash_attention_varlen(q, kv, kv, cu, cu, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert_close("torch", flash_attention_varlen_ref(q, kv, kv, cu, cu), out.float().numpy(), dtype="bfloat16")
    assert torch.equal(q, before[0]) and torch.equal(kv, before[1]) and torch.equal(cu, before[2])


def test_reference_matches_the_padded_reference():
    """The varlen reference agrees with flash_attention_ref run per sequence (two independent references)."""
    rng = np.random.default_rng(17)
    lq, lk = [3, 5], [7, 5]
    q, k, v, _ = _packed(rng, lq, lk, 2, 1, 16, np.float32)
    ref = flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=True)
    for s, (a, b, c, e) in enumerate([(0, 3, 0, 7), (3, 8, 7, 12)]):
        bhsd = lambda t: np.swapaxes(t, 0, 1)[None]   # noqa: E731
        alone = flash_attention_ref(bhsd(q[a:b]), bhsd(k[c:e]), bhsd(v[c:e]), causal=True)
        np.testing.assert_allclose(np.swapaxes(alone[0], 0, 1), ref[a:b], rtol=1e-12)


def _expected_blocks(lq, lk, causal, block=_LOOP_BLOCK, tile=128):
    """Key blocks each 128-row query tile must visit: those holding a key some row of the tile sees (computed
    here from the lengths, independently of the kernel)."""
    cq, ck = _cu(lq), _cu(lk)
    out = []
    for q0 in range(0, int(cq[-1]), tile):
        seen = set()
        for r in range(q0, min(q0 + tile, int(cq[-1]))):
            s = int(np.searchsorted(cq, r, side="right")) - 1
            lo, hi = int(ck[s]), int(ck[s + 1])
            if causal:
                hi = r - int(cq[s]) + int(ck[s + 1]) - (int(cq[s + 1]) - int(cq[s])) + 1
            seen.update(range(lo // block, (hi + block - 1) // block) if hi > lo else ())
        out.append(len(seen))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_blocks_are_skipped(causal):
    """Each query tile runs exactly the key blocks its own sequences span (none of another sequence's blocks):
    the executed QK matmuls are (blocks the tile needs) x heads x D chunks, far fewer than every tile visiting
    every block; same result as the reference."""
    rng = np.random.default_rng(18)
    lq = [500, 300, 520, 20, 660, 900]
    lk = [x + 4 for x in lq] if causal else lq
    hq, d = 2, 64
    q, k, v, _ = _packed(rng, lq, lk, hq, 1, d, BF16)
    out = flash_attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=causal, lnc=1)
    assert_close("skip", flash_attention_varlen_ref(q, k, v, _cu(lq), _cu(lk), causal=causal), out, dtype="bfloat16")
    qk = sum(1 for t in last_run().traces for i in t if i.name == "nc_matmul" and i.meta.get("N") == _LOOP_BLOCK)
    need = _expected_blocks(lq, lk, causal)
    assert qk == sum(need) * hq
    every = len(need) * -(-sum(lk) // _LOOP_BLOCK)
    assert sum(need) < 0.45 * every


@pytest.mark.parametrize("kw, match", [
    (dict(max_seqlen_q=3), "max_seqlen_q must bound every sequence length, got max_seqlen_q=3 and a sequence of 4"),
    (dict(max_seqlen_k=3, causal=True), "max_seqlen_k must bound every sequence length"),
    (dict(max_seqlen_q=0), "max_seqlen_q must be an int >= 1 or None"),
    (dict(max_seqlen_q=4.0), "max_seqlen_q must be an int >= 1 or None"),
])
def test_bad_max_seqlen(kw, match):
    q = np.zeros((6, 1, 64), np.float32)
    with pytest.raises(KernelInputError, match=match):
        flash_attention_varlen(q, q, q, [0, 4, 6], kw.pop("cu_k", [0, 4, 6]), causal=kw.pop("causal", False), **kw)
