"""Property tests of the packed DeltaNet / conv hooks (integration/transformers/deltanet.py): for random packs
(1-4 sequences of 0-70 tokens, empty ones included), random head counts and fp32 / bf16, the hook's output on the
packed row equals transformers' own torch functions run on each sequence alone, and a non-finite value in one
sequence never reaches another. The hooks are called as transformers calls the module functions."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.transformers._common import Kernels, Stats
from integration.transformers.deltanet import DeltaNetHook

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]


def _stock():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    return m


def _pack(data):
    lens = data.draw(st.lists(st.integers(0, 70), min_size=1, max_size=4).filter(lambda x: sum(x) > 0), label="lens")
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    return lens, cu


def _segments(lens):
    s = 0
    for n in lens:
        yield s, s + n
        s += n


def _hook():
    return DeltaNetHook(Kernels("emulator"), Stats())


@settings(deadline=None)
@given(data=st.data())
def test_packed_gated_delta_rule_hook_equals_stock_per_sequence(data):
    lens, cu = _pack(data)
    T = int(cu[-1])
    hk = data.draw(st.sampled_from([1, 2]), label="Hk")
    hv = hk * data.draw(st.sampled_from([1, 2]), label="group")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    q, k = (torch.randn(1, T, hk, 32, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(1, T, hv, 32, generator=gen).to(dtype)
    g = -torch.rand(1, T, hv, generator=gen) * 2
    beta = torch.rand(1, T, hv, generator=gen).to(dtype)
    bad = data.draw(st.sampled_from([None, float("nan"), float("inf")]), label="bad")
    hit = None
    if bad is not None:
        hit = data.draw(st.sampled_from([i for i, n in enumerate(lens) if n]), label="poisoned sequence")
        v[0, int(cu[hit]), 0, 0] = bad
    hook = _hook()
    with torch.no_grad():
        out, final = hook.chunk(q, k, v, g, beta, 64, None, False, True, cu, {})
    assert final is None and out.shape == v.shape and out.dtype == dtype
    assert hook.stats.calls["gated_delta_rule"] == 1 and not hook.stats.fallbacks
    stock = _stock()
    # transformers' torch function expands k/q heads to v heads itself only via the layer: repeat here
    rep = hv // hk
    for i, (lo, hi) in enumerate(_segments(lens)):
        if hi == lo:
            continue
        with torch.no_grad():
            want, _ = stock.torch_chunk_gated_delta_rule(
                q[:, lo:hi].float().repeat_interleave(rep, 2), k[:, lo:hi].float().repeat_interleave(rep, 2),
                v[:, lo:hi].float(), g=g[:, lo:hi], beta=beta[:, lo:hi].float(), use_qk_l2norm_in_kernel=True)
        got = out[:, lo:hi].float()
        if i == hit:
            continue                                   # the poisoned sequence: stock is non-finite too
        assert torch.isfinite(got).all(), (lens, i)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        err = float((got - want).norm() / max(float(want.norm()), 1e-6))
        assert err < tol, (lens, i, err)


@settings(deadline=None)
@given(data=st.data())
def test_packed_conv_hook_equals_stock_per_sequence(data):
    lens, cu = _pack(data)
    T = int(cu[-1])
    C = data.draw(st.sampled_from([32, 128, 160]), label="C")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    x = torch.randn(1, C, T, generator=gen).to(dtype)
    w = (torch.randn(C, 4, generator=gen) / math.sqrt(4)).to(dtype)
    bad = data.draw(st.sampled_from([None, float("nan"), float("-inf")]), label="bad")
    hit = None
    if bad is not None:
        hit = data.draw(st.sampled_from([i for i, n in enumerate(lens) if n]), label="poisoned sequence")
        x[0, 0, int(cu[hit + 1]) - 1] = bad              # the last token: the next sequence's window follows it
    hook = _hook()
    with torch.no_grad():
        y = hook.conv(x, w, None, "silu", {"cu_seq_lens_q": cu})
    assert y.shape == x.shape and y.dtype == dtype
    assert hook.stats.calls["causal_conv1d"] == 1 and not hook.stats.fallbacks
    stock = _stock()
    for i, (lo, hi) in enumerate(_segments(lens)):
        if hi == lo or i == hit:
            continue
        with torch.no_grad():
            want = stock.causal_conv1d_fn(x[:, :, lo:hi].float(), w.float(), None, activation="silu")
        got = y[:, :, lo:hi].float()
        assert torch.isfinite(got).all(), (lens, i)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, **tol)
