"""Qwen3-Omni vision and audio encoder attention through `AttentionInterface`, on `flash_attention_varlen`.

The encoders (`Qwen3OmniMoeVisionAttention`, `Qwen3OmniMoeAudioAttention`) attend non-causally inside each
image frame / audio window of one packed sequence. When their config's attention implementation is a flash one
(transformers checks ``"flash" in config._attn_implementation``) they make one call for the whole packed
sequence:

    fn(module, query[1, H, T, D], key[1, H, T, D], value[1, H, T, D], attention_mask=None, scaling=, dropout=,
       cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=, max_length_k=, is_causal=False)

and want ``(out[1, T, H, D], None)``; any other implementation splits the sequence into one call per window.
`varlen_attention_forward` is registered under ``"nki_flash_varlen"`` and set on the vision / audio encoder
configs only (the text model keeps its own implementation and hook). Anything the kernel does not take (an
attention mask, dropout, no cu_seqlens, a refused shape, grad) runs transformers' sdpa per window, as the stock
non-flash path does, and is counted as a fallback.

Two ways in:
  * `integration.transformers.patch(model)` (kernel family "encoders"): each encoder attention module gets an
    `EncoderAttentionHook` bound to that patch's backend and counters (`handle.calls()`, `handle.fallbacks()`
    under hook "encoders"); `restore()` puts the configs back.
  * `patch_encoders(model)`: the encoders alone, on the default backend, counted in the module-level `STATS`.
"""
from __future__ import annotations

from ._common import FORWARD_ONLY_REASON, kernel_input, kernel_refusals, needs_grad, refusal_reason, to_torch

ENCODER_ATTN_KEY = "nki_flash_varlen"       # must contain "flash": the encoders then pass cu_seqlens
ENCODER_MODULES = ("Qwen3OmniMoeVisionAttention", "Qwen3OmniMoeAudioAttention")
HOOK_ATTR = "_nki_encoder_hook"


class EncoderStats:
    """Counters of `patch_encoders` (the per-handle counters of `patch()` are its `Stats`)."""

    def __init__(self):
        self.calls = 0
        self.fallbacks: dict = {}

    def called(self, kernel, n=1, family=None):
        self.calls += n

    def fell_back(self, hook, reason):
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


class EncoderAttentionHook:
    """Packed encoder attention on one backend's `flash_attention_varlen`, counting into `stats`."""

    def __init__(self, kernels, stats):
        self.kernels = kernels
        self.stats = stats

    def unsupported(self, query, key, value, attention_mask, dropout, cu_q, cu_k):
        if self.kernels.get("flash_attention_varlen") is None:
            return "flash_attention_varlen not available"
        if cu_q is None or cu_k is None:
            return "no cu_seqlens"
        if attention_mask is not None:
            return "attention mask"
        if dropout:
            return "dropout"
        if query.shape[0] != 1:
            return "batch != 1"
        if needs_grad(query, key, value):
            return FORWARD_ONLY_REASON
        return None

    def run(self, query, key, value, cu_q, cu_k, causal, scaling, max_q, max_k):
        """query/key/value [1, H, T, D] -> out [1, T, H, D] through one launch for every window."""
        import torch
        be = self.kernels.backend
        packed = [kernel_input(t[0].transpose(0, 1), be) for t in (query, key, value)]     # [T, H, D]
        kw = dict(causal=causal, softmax_scale=scaling)
        if max_q is not None:
            kw.update(max_seqlen_q=int(max_q), max_seqlen_k=int(max_k))
        out = self.kernels.get("flash_attention_varlen")(
            *packed, kernel_input(cu_q.to(torch.int32), be), kernel_input(cu_k.to(torch.int32), be), **kw)
        self.stats.called("flash_attention_varlen", family="encoders")
        return to_torch(out, like=query).unsqueeze(0)

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                 cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, is_causal=None,
                 **kwargs):
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        reason = self.unsupported(query, key, value, attention_mask, dropout, cu_seq_lens_q, cu_seq_lens_k)
        if reason is None:
            try:
                out = self.run(query, key, value, cu_seq_lens_q, cu_seq_lens_k, causal, scaling, max_length_q,
                               max_length_k if max_length_q is not None else None)
                return out, None
            except kernel_refusals() as err:
                reason = refusal_reason(err)
        self.stats.fell_back("encoders", reason)
        if cu_seq_lens_q is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=causal, **kwargs)
        return _per_window_sdpa(module, query, key, value, cu_seq_lens_q, scaling, dropout, causal, **kwargs)


_DEFAULT_HOOK = []


def _default_hook():
    """The hook `patch_encoders` uses: the default backend (emulator unless real NKI is active), `STATS`."""
    if not _DEFAULT_HOOK:
        from nki_kernels import backend as nkb
        from ._common import Kernels
        _DEFAULT_HOOK.append(EncoderAttentionHook(Kernels("nki" if nkb.ACTIVE == "nki" else "emulator"), STATS))
    return _DEFAULT_HOOK[0]


def varlen_attention_forward(module, query, key, value, attention_mask=None, **kwargs):
    """The function registered under ENCODER_ATTN_KEY: the module's own hook (set by `patch()`), else the
    `patch_encoders` one."""
    hook = getattr(module, HOOK_ATTR, None) or _default_hook()
    return hook(module, query, key, value, attention_mask, **kwargs)


def register():
    """Register ENCODER_ATTN_KEY (idempotent). It stays registered: a config still naming it after a restore
    (e.g. a copy saved while patched) runs `patch_encoders`' hook, which computes the same attention."""
    from transformers import AttentionInterface
    AttentionInterface.register(ENCODER_ATTN_KEY, varlen_attention_forward)


def encoder_modules(model):
    return [m for m in model.modules() if type(m).__name__ in ENCODER_MODULES]


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
    """Route every Qwen3-Omni vision / audio encoder attention module of `model` to `flash_attention_varlen`
    (only them; `patch(model)` does this and every other family at once)."""
    register()
    saved, seen = [], set()
    for mod in encoder_modules(model):
        cfg = mod.config
        if id(cfg) not in seen:
            seen.add(id(cfg))
            saved.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = ENCODER_ATTN_KEY
    if not saved:
        raise TypeError(f"patch_encoders: no Qwen3-Omni encoder attention ({', '.join(ENCODER_MODULES)}) in "
                        f"{type(model).__name__}")
    return EncoderPatch(saved)
