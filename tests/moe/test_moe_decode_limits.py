"""moe_decode's one-token LNC=2 h-exchange path (`_h_exchange_token`) holds every slot's weights at once (no
ring): it runs only when that plan fits the target's SBUF (`h_exchange_bytes` <= `sbuf_budget()`), else the
partial-sum path does. Shapes the wrapper accepts whose h-exchange plan does not fit (each raised an emulator
SBUF overflow before the check, fed6042 .. ad14598) must match the NumPy reference, and so must the largest
TOPK whose plan fits (which must take the h-exchange path) and one TOPK more (which must not)."""
import ml_dtypes
import numpy as np
import pytest

from nki_kernels import moe_decode
from nki_kernels.moe import decode as dec
from nki_kernels.moe.blockwise import sbuf_budget
from nki_kernels.moe.reference import moe_decode_reference
from nki_kernels.testing import assert_close

DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
ITEM = {"float32": 4, "bfloat16": 2}


def _problem(dtype, h, e, i, k, seed=0):
    """x [1, H], gate_up [E, H, 2, I], down [E, I, H] scaled to O(1) outputs, TOPK distinct ids, weights in
    (0, 1)."""
    dt = DT[dtype]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, h)).astype(dt)
    gu = (rng.standard_normal((e, h, 2, i)) / np.sqrt(h)).astype(dt)
    dn = (rng.standard_normal((e, i, h)) / np.sqrt(i)).astype(dt)
    idx = rng.permutation(e)[:k].reshape(1, k).astype(np.int32)
    w = rng.random((1, k)).astype(dt)
    return x, idx, w, gu, dn


def _run(monkeypatch, dtype, h, e, i, k):
    """moe_decode at T=1, LNC=2 (no shared expert); returns (out, reference, whether h was exchanged)."""
    calls = []
    orig = dec._h_exchange_token

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(dec, "_h_exchange_token", spy)
    x, idx, w, gu, dn = _problem(dtype, h, e, i, k)
    out = moe_decode(x, idx, w, gu, dn, lnc=2)
    monkeypatch.undo()
    return out, moe_decode_reference(x, idx, w, gu, dn), bool(calls)


@pytest.mark.parametrize("dtype,h,e,i,k", [
    ("float32", 4096, 8, 96, 8),      # Qwen3-235B-A22B expert widths at TP16 (I = 1536 / 16)
    ("float32", 8192, 8, 128, 8),
    ("bfloat16", 8192, 8, 128, 8),
    ("bfloat16", 2048, 32, 128, 32),
])
def test_h_exchange_plan_too_big_falls_back_and_is_exact(monkeypatch, dtype, h, e, i, k):
    assert dec.h_exchange_bytes(k, h, i, ITEM[dtype]) > sbuf_budget()
    out, ref, exchanged = _run(monkeypatch, dtype, h, e, i, k)
    assert not exchanged
    assert_close(f"T=1 LNC=2 H={h} I={i} TOPK={k} {dtype}", ref, out, dtype=dtype)


def _largest_top_k(h, i, item):
    return max(k for k in range(1, 65) if dec.h_exchange_bytes(k, h, i, item) <= sbuf_budget())


@pytest.mark.parametrize("dtype,h,i", [("bfloat16", 8192, 128), ("float32", 4096, 96),
                                       pytest.param("bfloat16", 2048, 128, marks=pytest.mark.slow)])
def test_h_exchange_at_its_largest_top_k(monkeypatch, dtype, h, i):
    """The largest TOPK whose h-exchange plan fits runs that path on the emulator (which raises on any SBUF
    overflow, each tile counted from its first to its last use) and matches the reference; one more runs the
    partial-sum path, also exact."""
    k_max = _largest_top_k(h, i, ITEM[dtype])
    for k, expect in ((k_max, True), (k_max + 1, False)):
        out, ref, exchanged = _run(monkeypatch, dtype, h, k + 1, i, k)
        assert exchanged is expect, (k, exchanged)
        assert_close(f"T=1 LNC=2 H={h} I={i} TOPK={k} {dtype}", ref, out, dtype=dtype)


def test_h_exchange_budget_is_the_target_in_force():
    """trn1's SBUF is the smallest: a plan that fits trn2 but not trn1 is refused there."""
    from nki_kernels.emulator import use_target
    h, i, item = 4096, 96, 4
    k2 = _largest_top_k(h, i, item)
    with use_target("trn1"):
        k1 = _largest_top_k(h, i, item)
    assert k1 < k2
    assert dec.h_exchange_bytes(k2, h, i, item) > sbuf_budget("trn1")
