"""Helpers for the transformers integration tests: batches with padding, stock-vs-patched comparisons."""
from __future__ import annotations

import numpy as np

from nki_kernels.testing import assert_close

PAD_ID = 0


def padded_batch(padding: str, B: int = 2, T: int = 12, n_pad: int = 4, seed: int = 0, vocab: int = 96):
    """input_ids [B,T] and attention_mask [B,T]; sequence 1 has n_pad pad tokens on the given side."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        am[1, :n_pad] = 0
    elif padding == "right":
        am[1, T - n_pad:] = 0
    elif padding != "none":
        raise ValueError(padding)
    ids = ids.masked_fill(am == 0, PAD_ID)
    return ids, am


def forward_out(model, ids, am, **kw):
    import torch
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, **kw)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state), out


def assert_valid_close(name, ref, got, am):
    """Compare only positions whose token is not padding (padded rows are undefined in both)."""
    valid = am.bool().numpy()
    assert_close(name, ref.detach().numpy()[valid], got.detach().numpy()[valid], dtype="float32")


def assert_kernels_ran(handle, *names):
    calls = handle.calls()
    for n in names:
        assert calls.get(n, 0) > 0, f"kernel {n} did not run; calls={calls}\n{handle.report()}"


def max_abs_diff(a, b):
    return float(np.max(np.abs(a.detach().numpy() - b.detach().numpy())))
