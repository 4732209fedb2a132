"""Packed-sequence inputs shared by the varlen tests (tests/attention/test_attention_varlen*.py)."""
import numpy as np
from hypothesis import strategies as st

from nki_kernels import flash_attention
from nki_kernels.testing import assert_close


def cu(lens):
    """cu_seqlens int32 [N+1] of the given lengths."""
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def packed(rng, lq, lk, hq, hkv, d, dtype, gate=False):
    """Random q [Tq, Hq, D], k and v [Tk, Hkv, D] (and the gate [Tq, Hq, D] when `gate`) for the lengths."""
    tq, tk = int(sum(lq)), int(sum(lk))
    q = rng.standard_normal((tq, hq, d)).astype(dtype)
    k = rng.standard_normal((tk, hkv, d)).astype(dtype)
    v = rng.standard_normal((tk, hkv, d)).astype(dtype)
    g = rng.standard_normal((tq, hq, d)).astype(dtype) if gate else None
    return q, k, v, g


@st.composite
def lengths(draw, causal, max_n):
    """Query and key lengths of 1..max_n sequences around the 128-row tile edges, empty ones included; causal
    sequences have at least as many keys as queries (a cached prefix); non-causal ones may have keys without
    queries or queries without keys (encoders: usually equal)."""
    n = draw(st.integers(1, max_n))
    lq = draw(st.lists(st.sampled_from([0, 1, 2, 17, 64, 127, 128, 129, 200]), min_size=n, max_size=n))
    extra = draw(st.lists(st.sampled_from([0, 0, 1, 5, 140]), min_size=n, max_size=n))
    lk = [a + b for a, b in zip(lq, extra)]
    if not causal:
        lk = [a if draw(st.booleans()) else b for a, b in zip(lq, lk)]
        if draw(st.booleans()):
            lk[0] = 0
    if sum(lq) == 0:
        lq[-1] = 1
        lk[-1] = max(lk[-1], 1)
    if sum(lk) == 0:
        lk[-1] = 1
    return lq, lk


def assert_each_sequence_alone(packed_out, q, k, v, g, lq, lk, causal):
    """packed_out [Tq, Hq, D] == flash_attention on each sequence alone (the padded path, B=1 per sequence);
    a sequence with queries but no keys is all zeros."""
    cq, ck = cu(lq), cu(lk)
    bhsd = lambda x: np.ascontiguousarray(np.swapaxes(x, 0, 1)[None])   # noqa: E731
    for s in range(len(lq)):
        if lq[s] == 0:
            continue
        sl_q, sl_k = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        if lk[s] == 0:
            assert np.all(packed_out[sl_q] == 0.0)
            continue
        alone = flash_attention(bhsd(q[sl_q]), bhsd(k[sl_k]), bhsd(v[sl_k]), gate=bhsd(g[sl_q]), causal=causal)
        alone = np.swapaxes(np.asarray(alone, np.float64)[0], 0, 1)
        assert_close(f"sequence {s}", alone, packed_out[sl_q], dtype="bfloat16")
