"""NxDI attention prefill adapter: `perform_prefill` backed by `nki_kernels.flash_attention` (head_dim <= 256).

NxDI contract (``NeuronAttentionBase.perform_prefill``, identical in NxDI 0.8 / SDK 2.28 and 0.9 / SDK 2.29;
the Qwen3.5 contribs keep the same signature, PR #60 adds ``cos_cache=None, sin_cache=None``):

    perform_prefill(self, Q, K, V, q_len, bsz, attention_mask) -> (attn_output, FlashAttentionStrategy)

* Q ``[B, Hq, S, D]``, K and V ``[B, Hkv, S, D]`` (BHSD, per-rank heads, KV head not replicated under GQA:
  TP=4 on Qwen3.5-35B-A3B gives Hq=4, Hkv=1, D=256), already RoPE'd and q/k-normed.
* ``self.softmax_scale`` is a *divisor* (``sqrt(head_dim)`` by default); the softmax scale is its inverse.
* Causality follows NxDI's kernel call: causal iff ``attention_mask is not None``. The CTE mask is the
  plain causal ``[B, 1, S, S]`` (right padding: it carries no padding information; padded query rows
  are garbage NxDI never reads, padded keys sit after every valid query so causality already hides them).
* Return convention (``attention_context_encode``): a strategy other than NONE means the output is BHDS
  ``[B, Hq, D, S]`` and gets ``permute(0, 3, 1, 2)``; NONE means BHSD and gets ``transpose(1, 2)``.
  Our kernel writes BHSD, so the adapter returns ``(BHSD, NONE)`` by default (no extra transpose, and the
  only form the Qwen3.5 contrib's own ``forward`` accepts: it ignores the strategy and expects BHSD).
  ``layout="BHDS"`` reproduces the stock kernel convention (BHDS + UNSHARDED/SHARDED_KERNEL by LNC).

Unsupported cases defer to the method the adapter replaced, with a one-time warning (the adapter never
changes results, only who computes them):

* ``attn_kernel_enabled is False`` on the module (or its ``neuron_config``), for classes using NxDI's
  ``perform_prefill`` (the Qwen3.5 contribs' own override ignores the flag and the mask): NxDI's own
  ``get_flash_attention_strategy`` then returns NONE and honours the mask. The vision encoders that subclass
  ``NeuronAttentionBase`` (``NeuronQwen3VLVisionAttention``, ``NeuronPixtralImageAttention``; NxDI main
  @4bcdc54, ``validate_vision_model_supported_configs`` forces the flag to False) rely on this: their masks are
  block-diagonal (one block per image), not causal;
* a mask whose *shape* is not NxDI's CTE mask ``[B or 1, 1, S, S]`` (e.g. a 2-D ``[S, S]`` vision mask);
* a mask that is not plain causal, when its values can be read without a device sync (a CPU tensor, i.e.
  outside XLA tracing; under tracing NxDI's own kernel path treats any non-None mask as causal, and so do we:
  the mask's values are never read on a device, see "A kernel is traced once");
* sliding window, learned sinks, context parallel, head_dim above the kernel's limit, q_len != kv_len.
"""
from __future__ import annotations

import enum
import functools
import math


from ._common import (
    AdapterInputError,
    fall_back,
    refusals,
    ORIGINAL_PREFIX,
    accepted_kwargs,
    disabled,
    is_cpu_tensor,
    kernel,
    warn_once,
)

FAMILY = "attention"
KERNEL_NAME = "flash_attention"
# Largest head_dim the flash_attention kernel accepts (issue 4: "D up to 256").
MAX_HEAD_DIM = 256
LAYOUTS = ("BHSD", "BHDS")
CAUSAL_MODES = ("mask", "always")
# Contrib classes whose own perform_prefill is always causal (it ignores the mask it is given).
ALWAYS_CAUSAL_CLASSES = ("NeuronQwen35Attention", "NeuronQwen35MoeAttention", "NeuronQwen3NextAttention")


class _FallbackFlashAttentionStrategy(enum.Enum):
    """NxDI's enum (attention_base.py @4bcdc54: a plain Enum, not an int), mirrored for machines without NxDI."""
    NONE = 0
    UNSHARDED_KERNEL = 1
    SHARDED_KERNEL = 2
    CONTEXT_PARALLEL_KERNEL = 3
    STRIDED_CONTEXT_PARALLEL_KERNEL = 4


def _strategy_enum():
    try:
        from neuronx_distributed_inference.modules.attention.attention_base import FlashAttentionStrategy
        return FlashAttentionStrategy
    except Exception:  # NxDI absent (or the PyPI placeholder)
        return _FallbackFlashAttentionStrategy


FlashAttentionStrategy = _strategy_enum()


def strategy_enum_of(original):
    """The FlashAttentionStrategy the replaced method compares against: the one in its module's globals
    (attention_base.py imports or defines it), else NxDI's, else the mirror. Members of two different Enum
    classes never compare equal, so returning the caller's own member matters."""
    import inspect

    try:
        original = inspect.unwrap(original)
    except ValueError:
        pass
    enum_cls = getattr(original, "__globals__", {}).get("FlashAttentionStrategy")
    if isinstance(enum_cls, type) and issubclass(enum_cls, enum.Enum) and hasattr(enum_cls, "NONE"):
        return enum_cls
    return FlashAttentionStrategy


def _scale_of(module, head_dim):
    """Softmax scale: NxDI stores the divisor `softmax_scale`; default head_dim ** -0.5."""
    divisor = getattr(module, "softmax_scale", None)
    if divisor is None or not isinstance(divisor, (int, float)) or divisor == 0:
        return 1.0 / math.sqrt(head_dim)
    return 1.0 / float(divisor)


def _plain_causal(mask, bsz, q_len):
    """True when a concrete bool/0-1 mask equals the lower-triangular causal mask for every batch row."""
    import torch

    if mask.dim() != 4 or mask.shape[-2:] != (q_len, q_len):
        return False
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=mask.device).tril()
    return bool(torch.all(mask.to(torch.bool) == causal))


def kernel_disabled(module) -> bool:
    """True when the module (or its neuron_config) sets ``attn_kernel_enabled=False``.

    NxDI (attention_base.py @4bcdc54) copies ``neuron_config.attn_kernel_enabled`` to ``self.attn_kernel_enabled``
    in ``__init__``; None (the default) means enabled, only an explicit False turns the kernel off.
    """
    if getattr(module, "attn_kernel_enabled", None) is False:
        return True
    return getattr(getattr(module, "neuron_config", None), "attn_kernel_enabled", None) is False


def _mask_shape_ok(mask, bsz, q_len) -> bool:
    """NxDI's CTE mask shape: [B or 1, 1, S, S] (a shape check only: never reads values)."""
    shape = tuple(mask.shape)
    return len(shape) == 4 and shape[0] in (1, bsz) and shape[1] == 1 and shape[2:] == (q_len, q_len)


def check_prefill_support(module, Q, K, V, q_len, bsz, attention_mask, causal_mode="mask"):
    """(ok, reason): whether the kernel can stand in for NxDI's prefill on these inputs."""
    if causal_mode == "mask" and kernel_disabled(module):
        # (the Qwen3.5 contribs' own perform_prefill is causal whatever the flag: "always" mode keeps the kernel)
        return False, "attn_kernel_enabled=False (NxDI honours the mask on its softmax path)"
    if Q.dim() != 4 or K.dim() != 4 or V.dim() != 4:
        return False, f"Q/K/V must be 4-D BHSD, got {tuple(Q.shape)}, {tuple(K.shape)}, {tuple(V.shape)}"
    b, hq, s, d = Q.shape
    if d > MAX_HEAD_DIM:
        return False, f"head_dim {d} > {MAX_HEAD_DIM}"
    if K.shape[2] != s or V.shape[2] != s:
        return False, f"prefill with prior KV (q_len {s}, kv_len {K.shape[2]}) is handled by perform_prefix_prefill"
    if K.shape[1] == 0 or hq % K.shape[1] != 0:
        return False, f"Hq={hq} is not a multiple of Hkv={K.shape[1]}"
    if getattr(module, "sliding_window", None):
        return False, f"sliding_window={module.sliding_window} is not supported by the kernel"
    if getattr(module, "learned_sinks_size", None) is not None:
        return False, "learned sinks are not supported by the kernel"
    if (getattr(module, "cp_degree", 1) or 1) > 1:
        return False, f"context parallel (cp_degree={module.cp_degree}) is not supported by the adapter"
    if causal_mode == "mask" and attention_mask is not None and not _mask_shape_ok(attention_mask, b, s):
        return False, (f"the attention mask has shape {tuple(attention_mask.shape)}, not NxDI's causal CTE mask "
                       f"[{b} or 1, 1, {s}, {s}]")
    if causal_mode == "mask" and attention_mask is not None and is_cpu_tensor(attention_mask):
        # Only a host (CPU) mask is inspected; a device mask is never read (see the module docstring).
        if not _plain_causal(attention_mask, b, s):
            return False, "the attention mask is not the plain causal mask (left padding or custom mask)"
    return True, ""


def _bhsd_kernel_call(module, Q, K, V, causal):
    """Run flash_attention on BHSD tensors; returns BHSD in Q's compute dtype."""
    fn = kernel(KERNEL_NAME, FAMILY)
    dtype = getattr(module, "torch_dtype", None) or Q.dtype
    q, k, v = (t.as_subclass(_torch().Tensor) if type(t) is not _torch().Tensor else t for t in (Q, K, V))
    q, k, v = q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()
    lnc = int(getattr(module, "logical_nc_config", 1) or 1)
    kwargs = accepted_kwargs(fn, causal=bool(causal), softmax_scale=_scale_of(module, Q.shape[-1]), lnc=lnc)
    if "lnc" not in kwargs and lnc != 1:
        warn_once("attn-lnc", f"nxdi attention: {KERNEL_NAME} takes no lnc argument; running with LNC=1")
    return fn(q, k, v, **kwargs)


def _torch():
    import torch
    return torch


def perform_prefill(module, Q, K, V, q_len, bsz, attention_mask, *, layout="BHSD", causal_mode="mask",
                    strategy_enum=None):
    """Flash-attention prefill with NxDI's exact calling and return conventions.

    Args:
        module: the NeuronAttentionBase instance (reads num_heads, head_dim, softmax_scale, torch_dtype,
            logical_nc_config).
        Q: [B, Hq, S, D] @ HBM; K, V: [B, Hkv, S, D] @ HBM (BHSD, per-rank heads).
        q_len, bsz: S and B, as NxDI passes them.
        attention_mask: bool [B, 1, S, S] causal mask, or None for non-causal attention.
        layout: "BHSD" -> returns (out [B, Hq, S, D], NONE); "BHDS" -> (out [B, Hq, D, S], *_KERNEL).
        causal_mode: "mask" (stock NxDI: causal iff attention_mask is not None) or "always" (the Qwen3.5
            contribs' perform_prefill, which is causal whatever mask it gets).
        strategy_enum: the FlashAttentionStrategy class to answer with (default: the one the module's class
            compares against, see `strategy_enum_of`).
    Returns:
        (attn_output, FlashAttentionStrategy)
    """
    if layout not in LAYOUTS:
        raise AdapterInputError(f"nxdi attention: layout must be one of {LAYOUTS}, got layout={layout!r}")
    if Q.shape[0] != bsz or Q.shape[2] != q_len:
        raise AdapterInputError(
            f"nxdi attention: Q must be BHSD [bsz={bsz}, Hq, q_len={q_len}, D], got Q.shape={tuple(Q.shape)}")
    if causal_mode not in CAUSAL_MODES:
        raise AdapterInputError(f"nxdi attention: causal_mode must be one of {CAUSAL_MODES}, got {causal_mode!r}")
    causal = True if causal_mode == "always" else attention_mask is not None
    strategies = strategy_enum or strategy_enum_of(getattr(type(module), "perform_prefill", None))
    out = _bhsd_kernel_call(module, Q, K, V, causal).to(Q.dtype)     # NxDI's NONE path returns Q's dtype
    if layout == "BHSD":
        return out, strategies.NONE
    lnc = int(getattr(module, "logical_nc_config", 1) or 1)
    strategy = strategies.SHARDED_KERNEL if lnc > 1 else strategies.UNSHARDED_KERNEL
    return out.permute(0, 1, 3, 2).contiguous(), strategy


def make_perform_prefill(original, layout="BHSD", causal_mode="mask", name="perform_prefill"):
    """The class-level replacement for `perform_prefill`, deferring to `original` when unsupported."""
    strategies = strategy_enum_of(original)

    @functools.wraps(original)
    def perform_prefill_nki(self, Q, K, V, q_len, bsz, attention_mask=None, *args, **kwargs):
        if disabled():
            return original(self, Q, K, V, q_len, bsz, attention_mask, *args, **kwargs)
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if args or extra:
            # e.g. PR #60's cos_cache/sin_cache (RoPE fused in its kernel): our kernel expects RoPE'd inputs.
            warn_once(f"attn-extra-{type(self).__name__}",
                      f"nxdi attention: {type(self).__name__}.{name} got extra arguments {sorted(extra)}; "
                      "deferring to the original implementation")
            return original(self, Q, K, V, q_len, bsz, attention_mask, *args, **kwargs)
        ok, reason = check_prefill_support(self, Q, K, V, q_len, bsz, attention_mask, causal_mode)
        if not ok:
            warn_once(f"attn-{type(self).__name__}-{reason}",
                      f"nxdi attention: {type(self).__name__}: {reason}; using the original {name}")
            return original(self, Q, K, V, q_len, bsz, attention_mask, *args, **kwargs)
        try:
            return perform_prefill(self, Q, K, V, q_len, bsz, attention_mask, layout=layout, causal_mode=causal_mode,
                                   strategy_enum=strategies)
        except refusals() as exc:       # a kernel limit (e.g. K^T + V of one head must fit SBUF), a failed check
            fall_back(f"attention: {type(self).__name__}.{name}", exc)
            return original(self, Q, K, V, q_len, bsz, attention_mask, *args, **kwargs)

    perform_prefill_nki.__nki_kernels_adapter__ = FAMILY
    setattr(perform_prefill_nki, ORIGINAL_PREFIX + name, original)
    return perform_prefill_nki


# Parameter names NxDI passes positionally (after self); a class whose method differs is reported.
EXPECTED_PARAMS = ("Q", "K", "V", "q_len", "bsz", "attention_mask")

