"""Qwen3-Omni vision and audio encoder attention through `AttentionInterface`, on `flash_attention_varlen`.

The encoders (`Qwen3OmniMoeVisionAttention`, `Qwen3OmniMoeAudioAttention`) attend non-causally inside each
image frame / 104-token audio window of one packed sequence. When their config's attention implementation is a
flash one (transformers checks ``"flash" in config._attn_implementation``) they make one call for the whole
packed sequence:

    fn(module, query[1, H, T, D], key[1, H, T, D], value[1, H, T, D], attention_mask=None, scaling=, dropout=,
       cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=, max_length_k=, is_causal=False)

and want ``(out[1, T, H, D], None)``; any other implementation splits the sequence into one call per window.
`patch_encoders(model)` registers `varlen_attention_forward` under ``"nki_flash_varlen"`` and sets it on the
vision / audio encoder configs only (the text model keeps its own implementation and hook). Anything the kernel
does not take (an attention mask, dropout, no cu_seqlens, a refused shape, grad) runs transformers' sdpa per
window, as the stock non-flash path does, and is counted in `fallbacks`.

This file is separate from `patch.py` on purpose (the general `patch()` is owned elsewhere); `patch_encoders`
can be used together with `patch()`.
"""
from __future__ import annotations

from nki_kernels.validation import KernelInputError

ENCODER_ATTN_KEY = "nki_flash_varlen"       # must contain "flash": the encoders then pass cu_seqlens
ENCODER_MODULES = ("Qwen3OmniMoeVisionAttention", "Qwen3OmniMoeAudioAttention")


class EncoderStats:
    def __init__(self):
        self.calls = 0
        self.fallbacks: dict = {}

    def fallback(self, reason):
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


STATS = EncoderStats()


def _per_window_sdpa(module, query, key, value, cu, scaling, dropout, is_causal, **kwargs):
    """What transformers does without flash attention: one sdpa call per window, concatenated."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    lengths = (cu[1:] - cu[:-1]).tolist()
    outs = []
    for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value))):
        outs.append(sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                           is_causal=is_causal, **kwargs)[0])
    return torch.cat(outs, dim=1), None


def varlen_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             is_causal=None, **kwargs):
    """AttentionInterface function for packed encoder attention (see the module docstring)."""
    import torch
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    reason = None
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        reason = "no cu_seqlens"
    elif attention_mask is not None:
        reason = "attention mask"
    elif dropout:
        reason = "dropout"
    elif query.shape[0] != 1:
        reason = "batch != 1"
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        reason = "grad enabled (forward-only kernel)"
    if reason is None:
        from nki_kernels import flash_attention_varlen
        packed = [t[0].transpose(0, 1) for t in (query, key, value)]          # [T, H, D] views
        try:
            out = flash_attention_varlen(*packed, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
                                         causal=causal, softmax_scale=scaling,
                                         max_seqlen_q=None if max_length_q is None else int(max_length_q),
                                         max_seqlen_k=None if max_length_k is None else int(max_length_k))
            STATS.calls += 1
            return out.unsqueeze(0), None
        except KernelInputError as err:
            reason = f"refused: {err}"
    STATS.fallback(reason)
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    return _per_window_sdpa(module, query, key, value, cu_seq_lens_q, scaling, dropout, causal, **kwargs)


class EncoderPatch:
    """Undo handle of `patch_encoders`."""

    def __init__(self, saved):
        self._saved = saved

    def restore(self):
        for cfg, impl in self._saved:
            cfg._attn_implementation = impl
        self._saved = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def patch_encoders(model) -> EncoderPatch:
    """Route every Qwen3-Omni vision / audio encoder attention module of `model` to `flash_attention_varlen`."""
    from transformers import AttentionInterface
    AttentionInterface.register(ENCODER_ATTN_KEY, varlen_attention_forward)
    saved, seen = [], set()
    for mod in model.modules():
        if type(mod).__name__ in ENCODER_MODULES:
            cfg = mod.config
            if id(cfg) not in seen:
                seen.add(id(cfg))
                saved.append((cfg, cfg._attn_implementation))
                cfg._attn_implementation = ENCODER_ATTN_KEY
    if not saved:
        raise TypeError(f"patch_encoders: no Qwen3-Omni encoder attention ({', '.join(ENCODER_MODULES)}) in "
                        f"{type(model).__name__}")
    return EncoderPatch(saved)
