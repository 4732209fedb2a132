"""Attention hook: an `AttentionInterface` function (plus its `AttentionMaskInterface` entry) running our kernels.

transformers calls ``fn(module, query[B,Hq,Sq,D], key[B,Hkv,Skv,D], value[B,Hkv,Skv,D], attention_mask, dropout=,
scaling=, **kwargs)`` and wants ``(out[B,Sq,Hq,D], None)``. We register `sdpa_mask` as the mask builder, so the
mask is None (plain causal, no padding) or a bool ``[B,1,Sq,Skv]`` (True = attend); see
shared/reference/transformers.md section 3 and pitfall P1.

How a mask maps onto the kernels (which know causal bottom-right alignment and per-sequence valid lengths):
  * None: one launch for the whole batch (prefill `flash_attention`, or `flash_attention_decode` when the new
    tokens are few and follow a cache);
  * bool: per sequence, the valid queries are the rows whose own key is attended, the valid keys the union of
    what they attend. Right padding with Sq == Skv is one launch with valid lengths; left padding with
    Sq == Skv is the same after rotating each sequence's pads to the end (a gather, rotated back after);
    otherwise (decode after left padding) each sequence runs on its window ``q[qs:qe], k/v[ks:ke]``. Every
    window is checked first: the mask inside it must be exactly causal bottom-right and empty outside it.
    Padded query rows get zeros (they never reach a valid position: keys at padded positions are masked, GDN
    zeroes padded hidden states).
  * packed sequences (position_ids that restart inside a row, e.g. `DataCollatorWithFlattening`: transformers'
    mask is then block-diagonal causal): every row of the batch cut into its segments, all segments of all rows
    in one `flash_attention_varlen` launch (cu_seqlens from the mask). The `cu_seq_lens_q / k` keyword arguments
    the flash-attention path uses are not needed (stock sdpa ignores them; the mask is what it computes).
  * anything else (sliding window, non-causal modules, dropout, a mask pattern that is not causal + padding or
    packed causal, head dims the kernel refuses) runs transformers' own sdpa function and is counted as a
    fallback.

The attention output gate of Qwen3.5 / Qwen3-Next is applied by the model after this function (P6); the
instance-level `gated_attention_forward` installed by `patch()` moves it into the kernel call (`gate=`).
"""
from __future__ import annotations

import numpy as np


from ._common import FORWARD_ONLY_REASON, kernel_input, kernel_refusals, needs_grad, refusal_reason, to_torch


def _accepts(fn, name):
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False

ATTN_KEY = "nki_kernels"
# Most new tokens per sequence the decode kernel takes (speculative decoding window, issue 4).
_DECODE_MAX_NEW_TOKENS = 8


def _sdpa_fallback(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _window(mask_b, sq, skv):
    """For one sequence's bool mask [Sq, Skv] return (qs, qe, ks, ke) of its causal window, or None."""
    off = skv - sq
    rows = np.arange(sq)
    q_valid = mask_b[rows, rows + off] if off >= 0 else None
    if q_valid is None or not q_valid.any():
        return None if q_valid is None else (0, 0, 0, 0)
    qidx = np.nonzero(q_valid)[0]
    qs, qe = int(qidx[0]), int(qidx[-1]) + 1
    if not q_valid[qs:qe].all():
        return None
    k_any = mask_b[qs:qe].any(axis=0)
    kidx = np.nonzero(k_any)[0]
    ks, ke = int(kidx[0]), int(kidx[-1]) + 1
    if not k_any[ks:ke].all():
        return None
    nq, nk = qe - qs, ke - ks
    if nk < nq:
        return None
    # expected: causal bottom-right inside the window, nothing outside it (for the valid rows)
    expect = np.zeros((nq, skv), dtype=bool)
    j = np.arange(nk)[None, :]
    i = np.arange(nq)[:, None]
    expect[:, ks:ke] = j <= i + (nk - nq)
    if not np.array_equal(mask_b[qs:qe], expect):
        return None
    return qs, qe, ks, ke


def _packed_segments(m, sq, skv):
    """For a batch of bool masks [B, S, S] that are each block-diagonal causal (packed sequences, no padding and
    no cache) the segment starts of every row, else None."""
    if sq != skv:
        return None
    rows = np.arange(sq)
    out = []
    for mb in m:
        if not mb[rows, rows].all():
            return None
        first = np.argmax(mb, axis=1)                          # first attended key of each row
        starts = np.nonzero(first == rows)[0]
        seg = starts[np.searchsorted(starts, rows, side="right") - 1]
        if not np.array_equal(first, seg):
            return None
        expect = (rows[None, :] <= rows[:, None]) & (rows[None, :] >= seg[:, None])
        if not np.array_equal(mb, expect):
            return None
        out.append(starts)
    return out


class AttentionHook:
    """The registered attention function; bound to one patch handle's kernels and counters."""

    def __init__(self, kernels, stats):
        self.kernels = kernels
        self.stats = stats
        self.fuse_gate = _accepts(kernels.get("flash_attention"), "gate")

    # -- the two kernel entry points, in BHSD -------------------------------------------------------------
    def _prefill(self, q, k, v, scale, valid_lens=None, gate=None):
        fn = self.kernels.get("flash_attention")
        be = self.kernels.backend
        kw = dict(causal=True, softmax_scale=float(scale))
        if valid_lens is not None:
            kw["seq_lens"] = kernel_input(valid_lens, be)
        if gate is not None:
            kw["gate"] = kernel_input(gate, be)
        out = fn(kernel_input(q, be), kernel_input(k, be), kernel_input(v, be), **kw)
        self.stats.called("flash_attention")
        return to_torch(out, like=q)

    def _decode(self, q, k, v, scale, cache_lens, gate=None):
        import torch
        fn = self.kernels.get("flash_attention_decode")
        be = self.kernels.backend
        kw = dict(softmax_scale=float(scale))
        fused = gate is not None and _accepts(fn, "gate")
        if fused:
            kw["gate"] = kernel_input(gate, be)
        out = fn(kernel_input(q, be), kernel_input(k, be), kernel_input(v, be), kernel_input(cache_lens, be), **kw)
        self.stats.called("flash_attention_decode")
        out = to_torch(out, like=q)
        if gate is not None and not fused:   # the decode kernel has no gate input: the model's own op
            out = out * torch.sigmoid(gate.to(out.dtype))
        return out

    def _packed(self, q, k, v, scale, starts, gate=None):
        """Every segment of every batch row through one flash_attention_varlen launch (causal per segment);
        q [B,Hq,S,D], k/v [B,Hkv,S,D] -> out BSHD. None when the kernel is not available."""
        import torch
        fn = self.kernels.get("flash_attention_varlen")
        if fn is None:
            return None
        B, Hq, S, D = q.shape
        be = self.kernels.backend
        bounds = [int(b * S + x) for b, st in enumerate(starts) for x in st] + [B * S]
        cu = torch.tensor(bounds, dtype=torch.int32)
        pack = lambda t: t.transpose(1, 2).reshape(B * S, t.shape[1], t.shape[3])      # noqa: E731
        kw = dict(causal=True, softmax_scale=float(scale))
        if gate is not None:
            kw["gate"] = kernel_input(pack(gate), be)
        out = fn(kernel_input(pack(q), be), kernel_input(pack(k), be), kernel_input(pack(v), be),
                 kernel_input(cu, be), kernel_input(cu, be), **kw)
        self.stats.called("flash_attention_varlen")
        return to_torch(out, like=q).reshape(B, S, Hq, D)

    def _run(self, q, k, v, scale, valid_lens=None, gate=None):
        """q [b,Hq,sq,D], k/v [b,Hkv,skv,D] -> [b,Hq,sq,D], queries are the last sq positions of the keys."""
        import torch
        sq, skv = q.shape[2], k.shape[2]
        use_decode = (sq <= _DECODE_MAX_NEW_TOKENS and skv > sq and valid_lens is None
                      and self.kernels.get("flash_attention_decode") is not None)
        if use_decode:
            lens = torch.full((q.shape[0],), skv, dtype=torch.int32)
            return self._decode(q, k, v, scale, lens, gate=gate)
        return self._prefill(q, k, v, scale, valid_lens=valid_lens, gate=gate)

    def unsupported(self, module, query, key, attention_mask, dropout, kwargs):
        if self.kernels.get("flash_attention") is None:
            return "flash_attention not available"
        if dropout and module.training:
            return "attention dropout in training"
        if needs_grad(query, key):
            return FORWARD_ONLY_REASON
        if not getattr(module, "is_causal", True):
            return "non-causal module"
        if kwargs.get("sliding_window") is not None:
            return "sliding window"
        if query.shape[2] > key.shape[2]:
            return "more queries than keys"
        if attention_mask is not None and (attention_mask.dtype != __import__("torch").bool
                                           or attention_mask.dim() != 4):
            return f"mask {tuple(attention_mask.shape)} {attention_mask.dtype} is not a bool sdpa mask"
        return None

    def attend(self, module, query, key, value, attention_mask, scaling, gate=None):
        """Core: (out BSHD with the gate applied if given) or None if the mask cannot be expressed."""
        import torch
        B, Hq, Sq, D = query.shape
        Skv = key.shape[2]
        scale = scaling if scaling is not None else D ** -0.5
        if attention_mask is None:
            out = self._run(query, key, value, scale, gate=gate)
            return out.transpose(1, 2).contiguous()
        m = attention_mask[:, 0].cpu().numpy() if attention_mask.shape[1] == 1 else None
        if m is None or (attention_mask.shape[1] != 1):
            return None
        m = np.broadcast_to(m, (B, Sq, Skv))
        wins = [_window(m[b], Sq, Skv) for b in range(B)]
        if any(w is None for w in wins):
            starts = _packed_segments(m, Sq, Skv)
            if starts is None:
                return None
            return self._packed(query, key, value, scale, starts, gate)
        # right padding (or no padding) of a fresh prefill: one launch with valid lengths
        if Sq == Skv and all(w[0] == 0 and w[2] == 0 and w[1] == w[3] for w in wins):
            lens = torch.tensor([w[1] for w in wins], dtype=torch.int32)
            if int(lens.min()) > 0:
                full = bool((lens == Sq).all())
                out = self._run(query, key, value, scale, valid_lens=None if full else lens, gate=gate)
                if not full:  # padded query rows: zeros (the kernel's contract, enforced here too)
                    rows = torch.arange(Sq)[None, :] < lens[:, None]
                    out = out * rows[:, None, :, None].to(out.dtype)
                return out.transpose(1, 2).contiguous()
        # left padding of a fresh prefill: rotate each sequence's pads to the end (a gather of q/k/v, O(S D),
        # small next to the O(S^2 D) attention), one launch with valid lengths, rotate the output back
        if Sq == Skv and all(w[1] == Sq and w[3] == Skv and w[0] == w[2] for w in wins) \
                and min(Sq - w[0] for w in wins) > 0:
            pads = torch.tensor([w[0] for w in wins])
            fwd = (torch.arange(Sq)[None, :] + pads[:, None]) % Sq            # rotated t <- original (t + pad)
            lens = (Sq - pads).to(torch.int32)

            def rot(x, idx):
                return torch.gather(x, 2, idx[:, None, :, None].expand(x.shape[0], x.shape[1], Sq, x.shape[3]))
            g = None if gate is None else rot(gate, fwd)
            out = self._run(rot(query, fwd), rot(key, fwd), rot(value, fwd), scale, valid_lens=lens, gate=g)
            back = (torch.arange(Sq)[None, :] - pads[:, None]) % Sq           # original t <- rotated (t - pad)
            out = rot(out, back)
            rows = torch.arange(Sq)[None, :] >= pads[:, None]                  # padded query rows: zeros
            out = out * rows[:, None, :, None].to(out.dtype)
            return out.transpose(1, 2).contiguous()
        out = query.new_zeros((B, Hq, Sq, D))
        for b, (qs, qe, ks, ke) in enumerate(wins):
            if qe == qs:
                continue
            g = None if gate is None else gate[b:b + 1, :, qs:qe]
            out[b:b + 1, :, qs:qe] = self._run(query[b:b + 1, :, qs:qe], key[b:b + 1, :, ks:ke],
                                                value[b:b + 1, :, ks:ke], scale, gate=g)
        return out.transpose(1, 2).contiguous()

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        why = self.unsupported(module, query, key, attention_mask, dropout, kwargs)
        out = None
        if why is None:
            try:
                out = self.attend(module, query, key, value, attention_mask, scaling)
            except kernel_refusals() as exc:
                out, why = None, refusal_reason(exc)
            if out is None and why is None:
                why = "mask is not causal + padding"
        if out is None:
            self.stats.fell_back("attention", why)
            return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
        return out, None


class _Dispatcher:
    """The single function registered under ATTN_KEY; routes to the hook of the model that owns the module.

    AttentionInterface is a process-wide mapping, so several patched models share the key; each patched
    attention module carries `_nki_attention_hook`. A module without it (a model not patched but configured
    with our key, e.g. after save/load) runs sdpa.
    """

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        hook = getattr(module, "_nki_attention_hook", None)
        if hook is None:
            return _sdpa_fallback(module, query, key, value, attention_mask, **kwargs)
        return hook(module, query, key, value, attention_mask, **kwargs)


DISPATCH = _Dispatcher()


_REFS = [0]
_SAVED = {}


def register():
    """Register ATTN_KEY in AttentionInterface and AttentionMaskInterface; reference counted, `unregister()`
    removes the keys again (or puts back what was there) when the last patch is restored."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    if _REFS[0] == 0:
        for iface in (AttentionInterface, AttentionMaskInterface):
            _SAVED[iface] = iface._global_mapping.get(ATTN_KEY)
    _REFS[0] += 1
    AttentionInterface.register(ATTN_KEY, DISPATCH)
    AttentionMaskInterface.register(ATTN_KEY, sdpa_mask)


def unregister():
    if _REFS[0] == 0:
        return
    _REFS[0] -= 1
    if _REFS[0] == 0:
        for iface, old in _SAVED.items():
            if old is None:
                iface._global_mapping.pop(ATTN_KEY, None)
            else:
                iface._global_mapping[ATTN_KEY] = old
        _SAVED.clear()


# ------------------------------------------------------------------ gated attention: fuse the output gate


def gated_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """Forward of Qwen3NextAttention / Qwen3_5Attention / Qwen3_5MoeAttention with the sigmoid output gate passed
    to the kernel (`gate=`). Same steps as the stock forward; anything our kernel cannot express goes back to the
    stock forward (kept as `self._nki_stock_forward`)."""
    import torch
    hook = getattr(self, "_nki_attention_hook", None)
    fused = hook is not None and hook.kernels.get("flash_attention") is not None and hook.fuse_gate
    if not fused or self.config._attn_implementation != ATTN_KEY:
        return self._nki_stock_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    mod = __import__(type(self).__module__, fromlist=["apply_rotary_pos_emb"])
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states, gate = torch.chunk(self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1)
    query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)
    key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = mod.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    dropout = 0.0 if not self.training else self.attention_dropout
    why = hook.unsupported(self, query_states, key_states, attention_mask, dropout, kwargs)
    out = None
    if why is None:
        try:
            out = hook.attend(self, query_states, key_states, value_states, attention_mask, self.scaling,
                              gate=gate.transpose(1, 2))   # gate [B,S,Hq,D] -> BHSD like the output
        except kernel_refusals() as exc:
            out, why = None, refusal_reason(exc)
        if out is None and why is None:
            why = "mask is not causal + padding"
    if out is None:
        hook.stats.fell_back("attention", why)
        attn_output, _ = _sdpa_fallback(self, query_states, key_states, value_states, attention_mask,
                                        dropout=dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = attn_output * torch.sigmoid(gate.reshape(*input_shape, -1))
    else:
        attn_output = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), None
