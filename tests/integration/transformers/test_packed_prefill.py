"""Packed-sequence prefill (several sequences end to end in one row, position_ids restarting at each, as
`DataCollatorWithFlattening` builds them) through the patched tiny Qwen3.5 model: attention goes to
flash_attention_varlen (segments read from transformers' block-diagonal mask), and with the `cu_seq_lens_q / k`
keyword arguments the gated DeltaNet and its conv run on the packed row with `cu_seqlens=` (one launch each per
layer, a state per sequence). Compared with the stock model run on each sequence alone, and with the stock model on
the packed row."""
import functools

import pytest
import torch

from integration.transformers import patch, tiny
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]

LENS = (7, 1, 12)


def _packed(lens, seed=3, vocab=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lens), 0)), dtype=torch.int32)
    return ids, pos, cu


def _logits(model, ids, pos, **kw):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits


def _alone(model, ids, lens):
    """The stock model on each sequence alone, concatenated."""
    outs, s = [], 0
    for n in lens:
        outs.append(_logits(model, ids[:, s:s + n], torch.arange(n)[None]))
        s += n
    return torch.cat(outs, dim=1)


def test_packed_attention_uses_varlen_and_matches_stock():
    """Position ids only (no cu_seq_lens kwargs): the attention layers see the packing through the mask and match
    stock exactly in what they compute; the DeltaNet layers get no packing information from transformers (stock
    and patched alike run them over the whole row), so the packed row equals the stock packed row."""
    model = tiny.qwen3_5(seed=2)
    ids, pos, _ = _packed(LENS)
    want = _logits(model, ids, pos)
    with patch(model) as handle:
        got = _logits(model, ids, pos)
        calls = handle.calls()
    assert calls.get("flash_attention_varlen", 0) == 1 and "flash_attention" not in calls, calls
    assert not [f for f in handle.fallbacks() if f[0] == "attention"], handle.fallbacks()
    assert_close("packed row", want.numpy(), got.numpy())


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "qwen3_5_moe"])
def test_packed_with_cu_seq_lens_equals_each_sequence_alone(family):
    """With cu_seq_lens_q / cu_seq_lens_k (the flash-attention packing kwargs), every layer keeps the sequences
    apart: the packed row equals the stock model run on each sequence alone. (Stock transformers refuses this call
    without flash-linear-attention installed: its torch DeltaNet cannot keep packed sequences apart.)"""
    model = tiny.build(family, seed=4)
    ids, pos, cu = _packed(LENS)
    alone = _alone(model, ids, LENS)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENS), max_length_k=max(LENS))
    with pytest.raises(ValueError, match="can't keep packed sequences apart"):
        _logits(model, ids, pos, **kw)
    with patch(model) as handle:
        got = _logits(model, ids, pos, **kw)
        calls = handle.calls()
    for name in ("flash_attention_varlen", "gated_delta_rule", "causal_conv1d"):
        assert calls.get(name, 0) > 0, calls
    assert not handle.fallbacks(), handle.fallbacks()
    assert_close("packed vs alone", alone.numpy(), got.numpy())


def _spy_packed(monkeypatch, module, name, refuse=False):
    """Replace nki_kernels.deltanet.<module>.<name> (what the hook resolves) by a wrapper recording the keyword
    arguments of every launch; with refuse=True a packed (cu_seqlens) launch raises KernelInputError instead."""
    import importlib
    mod = importlib.import_module(f"nki_kernels.deltanet.{module}")
    real = getattr(mod, name)
    seen = []

    @functools.wraps(real)
    def spy(*args, **kw):
        seen.append((tuple(args[0].shape), kw))
        if refuse and kw.get("cu_seqlens") is not None:
            raise KernelInputError(f"{name}: refused by the test, got cu_seqlens={kw['cu_seqlens']}")
        return real(*args, **kw)
    monkeypatch.setattr(mod, name, spy)
    return seen


def _packed_kw(cu):
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENS), max_length_k=max(LENS))


def test_packed_deltanet_launches_take_cu_seqlens(monkeypatch):
    """The DeltaNet and conv kernels get the packed row itself ([1, T, ...], cu_seqlens = transformers'
    cu_seq_lens_q), one launch per layer, no padding per sequence."""
    gdn = _spy_packed(monkeypatch, "chunk", "gated_delta_rule")
    conv = _spy_packed(monkeypatch, "conv1d", "causal_conv1d")
    model = tiny.qwen3_5(seed=4)
    ids, pos, cu = _packed(LENS)
    alone = _alone(model, ids, LENS)
    with patch(model) as handle:
        got = _logits(model, ids, pos, **_packed_kw(cu))
    n_gdn = sum(1 for t in model.config.layer_types if t == "linear_attention")
    assert len(gdn) == n_gdn and len(conv) == n_gdn, (gdn, conv)
    T = sum(LENS)
    for shape, kw in gdn:
        assert shape[:2] == (1, T) and kw["cu_seqlens"].tolist() == cu.tolist() and "valid_lengths" not in kw
    for shape, kw in conv:
        assert shape[0] == 1 and shape[2] == T and kw["cu_seqlens"].tolist() == cu.tolist()
    assert not handle.fallbacks(), handle.report()
    assert_close("packed vs alone", alone.numpy(), got.numpy())


def test_refused_packed_launch_runs_unpacked_and_is_recorded(monkeypatch):
    """A packed launch the kernel refuses is recorded in fallbacks and the sequences run unpacked to a padded
    batch with valid lengths (still our kernels, still equal to each sequence alone)."""
    gdn = _spy_packed(monkeypatch, "chunk", "gated_delta_rule", refuse=True)
    conv = _spy_packed(monkeypatch, "conv1d", "causal_conv1d", refuse=True)
    model = tiny.qwen3_5(seed=4)
    ids, pos, cu = _packed(LENS)
    alone = _alone(model, ids, LENS)
    with patch(model) as handle:
        got = _logits(model, ids, pos, **_packed_kw(cu))
    falls = handle.fallbacks()
    assert {h for h, _ in falls} == {"deltanet", "conv1d"}, falls
    assert all("packed launch: kernel refused" in why and why.endswith("ran unpacked") for _, why in falls), falls
    unpacked = [(shape, kw) for shape, kw in gdn if kw.get("cu_seqlens") is None]
    assert unpacked and all(shape[0] == len(LENS) and "valid_lengths" in kw for shape, kw in unpacked), gdn
    assert any(kw.get("cu_seqlens") is None and shape[0] == len(LENS) for shape, kw in conv), conv
    assert_close("unpacked vs alone", alone.numpy(), got.numpy())


def test_packed_on_the_reference_backend():
    """The float64 references take no cu_seqlens: the hook runs them unpacked, same result as each sequence alone."""
    model = tiny.qwen3_5(seed=4)
    ids, pos, cu = _packed(LENS)
    alone = _alone(model, ids, LENS)
    with patch(model, backend="reference") as handle:
        got = _logits(model, ids, pos, **_packed_kw(cu))
    assert not handle.fallbacks(), handle.report()
    assert handle.calls().get("gated_delta_rule", 0) > 0 and handle.calls().get("causal_conv1d", 0) > 0
    assert_close("reference packed vs alone", alone.numpy(), got.numpy())
