"""flash_attention_varlen's tile-major body for short packs (`short_tiles.tile_short_varlen_body`: Tq, Tk <= 512,
2-byte dtypes, any D <= 256, trn2 / trn3): float64 reference over packings / head dims / dtypes / masks / gates / GQA
/ LNC, each sequence equal to its own run, rows without keys, non-finite containment between sequences that share a
128-key chunk, traced once, the rule (also for torch inputs), the largest shapes."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nki_kernels import flash_attention_varlen
from nki_kernels.attention import short_tiles, varlen
from nki_kernels.attention.reference import flash_attention_varlen_ref
from nki_kernels.emulator.runtime import last_run
from nki_kernels.emulator.targets import use_target
from nki_kernels.testing import assert_close, program_signature

from spy_kit import counting
from varlen_kit import assert_each_sequence_alone, cu, packed

BF16 = ml_dtypes.bfloat16
DTYPES = {"bfloat16": BF16, "float16": np.float16}
D = 256
LIMIT = 512


def _taken():
    """Counts calls of the tile-major varlen body (varlen_body calls it through the varlen module)."""
    return counting(varlen, "tile_short_varlen_body")


@st.composite
def short_lengths(draw, causal):
    """1..8 sequences with at most 512 queries and 512 keys in all, lengths around the 128-row edges, empty
    sequences included; causal: every sequence has at least as many keys as queries (a cached prefix); not causal:
    keys without queries and queries without keys too."""
    n = draw(st.integers(1, 8))
    pick = st.one_of(st.sampled_from([0, 1, 2, 17, 63, 64, 65, 127, 128, 129, 200, 256]), st.integers(0, 300))
    lq = draw(st.lists(pick, min_size=n, max_size=n))
    extra = draw(st.lists(st.sampled_from([0, 0, 1, 5, 64, 128]), min_size=n, max_size=n))
    lk = [a + b for a, b in zip(lq, extra)]
    if not causal and draw(st.booleans()):
        lk = [a if draw(st.booleans()) else draw(st.sampled_from([0, 3, 130])) for a in lk]
    while sum(lk) > LIMIT or sum(lq) > LIMIT:          # trim the longest sequence (keys >= queries kept)
        i = int(np.argmax(lk)) if sum(lk) > LIMIT else int(np.argmax(lq))
        over = max(sum(lk) - LIMIT, sum(lq) - LIMIT)
        lk[i] = max(0, lk[i] - over)
        lq[i] = min(lq[i], lk[i]) if causal else max(0, lq[i] - over)
    if sum(lq) == 0:
        lq[-1], lk[-1] = 1, max(lk[-1], 1)
    if sum(lk) == 0:
        lk[-1] = 1
    return lq, lk


@settings(max_examples=60, deadline=None)
@given(data=st.data(), causal=st.booleans(), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([256, 128, 96, 80, 72, 64, 1]), dtype=st.sampled_from(["bfloat16", "float16"]),
       use_gate=st.booleans(), lnc=st.sampled_from([1, 2]), band=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_reference(data, causal, hkv, group, d, dtype, use_gate, lnc, band, seed):
    """Any packing of up to 512 queries / keys (partial tiles and chunks, sequences sharing a chunk, Tq < Tk), any
    head dim: the tile-major body runs (causal, or one sequence: also when max_seqlen_* fit the per-sequence
    windows; several non-causal sequences: unless they do), its output matches the float64 reference, and rows that
    see no key are exactly 0."""
    lq, lk = data.draw(short_lengths(causal))
    rng = np.random.default_rng(seed)
    q, k, v, g = packed(rng, lq, lk, hkv * group, hkv, d, DTYPES[dtype], gate=use_gate)
    m = dict(max_seqlen_q=max(lq), max_seqlen_k=max(lk)) if band else {}
    windows = (not causal and band and len(lq) > 1
               and varlen.windows_plan(sum(lq), sum(lk), len(lq), d, 2, causal, max(lq), max(lk)) is not None)
    patch, calls = _taken()
    with patch:
        out = flash_attention_varlen(q, k, v, cu(lq), cu(lk), causal=causal, gate=g, lnc=lnc, **m)
    assert bool(calls) != windows, "the tile-major varlen body ran where the windows fit, or did not run"
    ref = flash_attention_varlen_ref(q, k, v, cu(lq), cu(lk), causal=causal, gate=g)
    out64 = np.asarray(out, np.float64)
    assert out.shape == q.shape and out.dtype == q.dtype and np.all(np.isfinite(out64))
    assert_close(f"short varlen lq={lq} lk={lk}", ref, out, dtype=dtype)
    cq = cu(lq)
    for s in np.nonzero(np.asarray(lk) == 0)[0]:
        assert np.all(out64[cq[s]:cq[s + 1]] == 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_each_sequence_as_if_alone(causal):
    """Every sequence equals flash_attention on that sequence alone; five sequences share the first chunks."""
    rng = np.random.default_rng(21)
    lq = [40, 1, 129, 0, 77, 3]
    lk = [40 + 30, 1, 129, 5, 77, 3] if causal else [40, 3, 129, 5, 0, 3]
    q, k, v, g = packed(rng, lq, lk, 4, 1, D, BF16, gate=True)
    patch, calls = _taken()
    with patch:
        out = np.asarray(flash_attention_varlen(q, k, v, cu(lq), cu(lk), causal=causal, gate=g), np.float64)
    assert calls
    assert_each_sequence_alone(out, q, k, v, g, lq, lk, causal)


@pytest.mark.parametrize("scale", [4.0, 0.01, None])
def test_rows_without_keys_are_zero_beside_huge_values(scale):
    """A sequence with queries and no keys (not causal) gives exact zeros, whatever the scale and whatever the
    other sequences hold (3e38 in v, -3e38 in k: their sums overflow): its rows see only hidden keys, whose
    probabilities the capped bias makes 0, and 1 / l stays finite."""
    rng = np.random.default_rng(22)
    lq, lk = [60, 50, 70], [0, 200, 90]
    q, k, v, g = packed(rng, lq, lk, 2, 1, D, BF16, gate=True)
    v[0:200, :, 3] = 3e38
    k[0:100, :, 7] = -3e38
    out = np.asarray(flash_attention_varlen(q, k, v, cu(lq), cu(lk), causal=False, gate=g, softmax_scale=scale),
                     np.float64)
    assert np.all(out[0:60] == 0.0)
    ref = flash_attention_varlen_ref(q, k, v, cu(lq), cu(lk), causal=False, gate=g, softmax_scale=scale)
    assert_close("last sequence", ref[110:], out[110:], dtype="bfloat16")


@settings(max_examples=40, deadline=None)
@given(where=st.sampled_from(["q", "k", "v", "gate"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       causal=st.booleans(), lnc=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_non_finite_stays_in_its_sequence(where, value, causal, lnc, seed):
    """Short sequences share 128-key chunks (and query tiles): a non-finite value in one leaves every other
    sequence bit-identical; inside its sequence it reaches only the rows that see it (q / gate: its own row and
    head; k / v: the rows that attend that key)."""
    rng = np.random.default_rng(seed)
    lq = [int(x) for x in rng.integers(1, 120, size=4)]
    lk = [x + int(rng.integers(0, 3)) for x in lq]
    q, k, v, g = packed(rng, lq, lk, 4, 2, D, BF16, gate=True)
    cq, ck = cu(lq), cu(lk)
    clean = np.asarray(flash_attention_varlen(q, k, v, cq, ck, causal=causal, gate=g, lnc=lnc), np.float64)
    t = dict(q=q.copy(), k=k.copy(), v=v.copy(), gate=g.copy())
    head = int(rng.integers(0, t[where].shape[1]))
    pos = int(rng.integers(cq[1], cq[2])) if where in ("q", "gate") else int(rng.integers(ck[1], ck[2]))
    col = int(rng.integers(0, D))
    t[where][pos, head, col] = value
    before = {name: x.copy() for name, x in t.items()}
    out = np.asarray(flash_attention_varlen(t["q"], t["k"], t["v"], cq, ck, causal=causal, gate=t["gate"], lnc=lnc),
                     np.float64)
    for name, x in t.items():                              # inputs untouched (NaN included)
        np.testing.assert_array_equal(x.view(np.uint16), before[name].view(np.uint16))
    in_seq = np.zeros(len(out), bool)
    in_seq[cq[1]:cq[2]] = True
    np.testing.assert_array_equal(out[~in_seq], clean[~in_seq])
    if where in ("q", "gate"):
        others = np.ones(out.shape[:2], bool)
        others[pos, head] = False
        np.testing.assert_array_equal(out[others], clean[others])
    else:                                                  # KV head `head` serves query heads 2 head, 2 head + 1
        i = np.arange(lq[1])
        key = pos - ck[1]
        sees = (key <= lk[1] - lq[1] + i) if causal else np.ones(lq[1], bool)
        untouched = np.ones(out.shape[:2], bool)
        untouched[np.ix_(cq[1] + i[sees], [2 * head, 2 * head + 1])] = False
        np.testing.assert_array_equal(out[untouched], clean[untouched])
        if where == "v":                                   # and every row that sees the value is not finite there
            assert not np.any(np.isfinite(out[np.ix_(cq[1] + i[sees], [2 * head, 2 * head + 1], [col])]))


def test_rule():
    """Tq, Tk <= 512 (causal: Tq <= Tk), 2-byte, any D <= 256, a target with range_select (not trn1)."""
    with use_target("trn2"):
        assert short_tiles.tile_short_varlen_path(512, 512, 256, BF16, True)
        assert short_tiles.tile_short_varlen_path(1, 1, 256, np.float16, False)
        assert short_tiles.tile_short_varlen_path(300, 100, 256, BF16, False)
        assert not short_tiles.tile_short_varlen_path(300, 100, 256, BF16, True)
        assert not short_tiles.tile_short_varlen_path(513, 513, 256, BF16, False)
        assert not short_tiles.tile_short_varlen_path(100, 513, 256, BF16, True)
        assert short_tiles.tile_short_varlen_path(512, 512, 128, BF16, True)
        assert short_tiles.tile_short_varlen_path(512, 512, 72, BF16, False)
        assert not short_tiles.tile_short_varlen_path(512, 512, 257, BF16, True)
        assert not short_tiles.tile_short_varlen_path(512, 512, 256, np.float32, True)
    with use_target("trn3"):
        assert short_tiles.tile_short_varlen_path(200, 300, 256, BF16, True)
    with use_target("trn1"):
        assert not short_tiles.tile_short_varlen_path(100, 100, 256, BF16, True)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_causal_pack_the_windows_fit_goes_tile_major(kind):
    """A causal pack that max_seqlen_* would send to the per-sequence windows runs tile-major, for NumPy and torch
    bf16 inputs alike (the wrapper's rule sees the dtype by name)."""
    rng = np.random.default_rng(27)
    lq = [128, 128, 128, 128]
    q, k, v, g = packed(rng, lq, lq, 4, 1, D, BF16, gate=True)
    assert varlen.windows_plan(512, 512, 4, D, 2, True, 128, 128) is not None
    args = (q, k, v, cu(lq), cu(lq))
    if kind == "torch":
        torch = pytest.importorskip("torch")
        args = tuple(torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16) for x in (q, k, v)) + (
            torch.from_numpy(cu(lq)), torch.from_numpy(cu(lq)))
        g = torch.from_numpy(np.asarray(g, np.float32)).to(torch.bfloat16)
    patch, calls = _taken()
    with patch:
        out = flash_attention_varlen(*args, causal=True, gate=g, max_seqlen_q=128, max_seqlen_k=128)
    assert calls, "the tile-major varlen body did not run"
    out = np.asarray(out.float().numpy() if kind == "torch" else out, np.float64)
    assert_close(kind, flash_attention_varlen_ref(q, k, v, cu(lq), cu(lq), gate=np.asarray(g, np.float32) if kind ==
                                                  "numpy" else g.float().numpy()), out, dtype="bfloat16")


@pytest.mark.parametrize("target, expect", [("trn2", True), ("trn3", True), ("trn1", False)])
def test_dispatch_per_target(target, expect):
    rng = np.random.default_rng(23)
    lq = [100, 57, 200]
    q, k, v, g = packed(rng, lq, lq, 2, 1, D, BF16, gate=True)
    patch, calls = _taken()
    with use_target(target), patch:
        out = flash_attention_varlen(q, k, v, cu(lq), cu(lq), gate=g, lnc=1)
    assert bool(calls) == expect
    assert_close("dispatch", flash_attention_varlen_ref(q, k, v, cu(lq), cu(lq), gate=g), out, dtype="bfloat16")


@pytest.mark.parametrize("causal", [True, False])
def test_instructions_independent_of_cu_seqlens_values(causal):
    """Traced once: the same Tq, Tk, N with different boundaries give the same program (operands and address ranges
    included); LNC=2 equals LNC=1 bit for bit."""
    rng = np.random.default_rng(24)
    q, k, v, g = packed(rng, [400], [480], 4, 1, D, BF16, gate=True)
    sigs = []
    for lq, lk in (([100, 0, 300], [150, 30, 300]), ([1, 398, 1], [1, 478, 1]), ([0, 0, 400], [0, 0, 480])):
        out = flash_attention_varlen(q, k, v, cu(lq), cu(lk), causal=causal, gate=g, lnc=2)
        sigs.append(program_signature([last_run()]))
        assert_close("values", flash_attention_varlen_ref(q, k, v, cu(lq), cu(lk), causal=causal, gate=g), out,
                     dtype="bfloat16")
        one = flash_attention_varlen(q, k, v, cu(lq), cu(lk), causal=causal, gate=g, lnc=1)
        np.testing.assert_array_equal(np.asarray(one, np.float64), np.asarray(out, np.float64))
    bad = [x.copy() for x in (q, k, v, g)]                # non-finite values: the same program too
    for x, val in zip(bad, (np.inf, np.nan, -np.inf, np.nan)):
        x[int(rng.integers(0, x.shape[0])), 0, 3] = val
    flash_attention_varlen(*bad[:3], cu(lq), cu(lk), causal=causal, gate=bad[3], lnc=2)
    sigs.append(program_signature([last_run()]))
    assert sigs[0] == sigs[1] == sigs[2] == sigs[3]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_largest_shapes_fit(dtype):
    """Tq = Tk = 512 with everything on (gate, GQA 8:1, 16 query heads per core at LNC=2, two KV heads per core):
    SBUF / PSUM fit (the emulator checks both) and the result is right."""
    rng = np.random.default_rng(25)
    lq = [200, 1, 311]
    q, k, v, g = packed(rng, lq, lq, 32, 4, D, DTYPES[dtype], gate=True)
    patch, calls = _taken()
    with patch:
        out = flash_attention_varlen(q, k, v, cu(lq), cu(lq), gate=g, lnc=2)
    assert calls
    assert_close("largest", flash_attention_varlen_ref(q, k, v, cu(lq), cu(lq), gate=g), out, dtype=dtype)


def test_most_sequences():
    """512 sequences of one token each (the row bounds in pieces of the sequence test): right, and each row sees
    only its own key."""
    rng = np.random.default_rng(26)
    lq = [1] * varlen.MAX_SEQS
    q, k, v, g = packed(rng, lq, lq, 2, 1, D, BF16, gate=True)
    out = flash_attention_varlen(q, k, v, cu(lq), cu(lq), gate=g, causal=False)
    ref = flash_attention_varlen_ref(q, k, v, cu(lq), cu(lq), gate=g, causal=False)
    assert_close("one-token sequences", ref, out, dtype="bfloat16")
