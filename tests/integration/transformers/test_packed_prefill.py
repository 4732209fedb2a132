"""Packed-sequence prefill (several sequences end to end in one row, position_ids restarting at each, as
`DataCollatorWithFlattening` builds them) through the patched tiny Qwen3.5 model: attention goes to
flash_attention_varlen (segments read from transformers' block-diagonal mask), and with the `cu_seq_lens_q / k`
keyword arguments the gated DeltaNet and its conv run per sequence (unpacked to a padded batch). Compared with the
stock model run on each sequence alone, and with the stock model on the packed row."""
import pytest
import torch

from integration.transformers import patch, tiny
from nki_kernels.testing import assert_close

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


def test_packed_with_cu_seq_lens_equals_each_sequence_alone():
    """With cu_seq_lens_q / cu_seq_lens_k (the flash-attention packing kwargs), every layer keeps the sequences
    apart: the packed row equals the stock model run on each sequence alone. (Stock transformers refuses this call
    without flash-linear-attention installed: its torch DeltaNet cannot keep packed sequences apart.)"""
    model = tiny.qwen3_5(seed=4)
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
