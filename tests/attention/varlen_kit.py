"""Packed-sequence inputs shared by the varlen tests (tests/attention/test_attention_varlen*.py)."""
import numpy as np
from hypothesis import strategies as st


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
