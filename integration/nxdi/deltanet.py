"""Gated DeltaNet hook adapters for the NxDI Qwen3.5 / Qwen3.6 contribution's ``NeuronGatedDeltaNet``.

NxDI has no first-class GDN module; the Qwen3.5 contribs (NxDI main @4bcdc54, ``contrib/models/
Qwen3.5-{2B,35B-A3B}/src/modeling_qwen35.py``, SDK 2.29-2.31) route the recurrence through hook methods
that we replace at class level. Their contract, as ``NeuronGatedDeltaNet.forward`` calls them:

* inputs: ``query``, ``key`` ``[B, H, S, Dk]`` and ``value`` ``[B, H, S, Dv]`` fp32, **not** normalised
  (the hook L2-normalises q and k, eps 1e-6, and scales q by Dk^-0.5), K heads already expanded to the
  Hv value heads (each k head repeated for Hv/Hk *consecutive* v heads); ``g`` (log decay <= 0) and
  ``beta`` ``[B, H, S]`` fp32, already zeroed on padding positions by ``deltanet_padding_mask`` (so a
  pad token leaves the state unchanged: exp(0) = 1 and beta = 0);
* state ``[B, H, Dk, Dv]`` fp32 (``recurrent_state_buffer`` rows, selected by ``seq_ids`` in forward).

Hooks (signatures as in the contrib; the adapters keep them):

* ``_fused_chunked_forward(query, key, value, g, beta, output_final_state=False, initial_state=None,
  _segment_disabled=False) -> (out [B, H, S, Dv], final_state or None)``: the CTE default;
  ``_chunk_forward(query, key, value, g, beta, output_final_state=False, initial_state=None)`` and
  ``_sequential_forward(query, key, value, g, beta, output_final_state=False)`` have the same meaning.
* ``_recurrent_step(query, key, value, g, beta, recurrent_state) -> (out [B, H, S, Dv], new_state)``:
  the TKG step (S = 1; up to 4 speculative tokens are accepted); ``_nki_recurrent_step`` is the same.

Our kernels take transformers / fla layouts (``[B, T, H, D]``), so each adapter transposes dims 1 and 2
on the way in and out; the chunked kernel runs all batches and heads in one launch (the contrib launches
one kernel per (b, h)), and the decode step updates the state rows in place through ``slot_ids``.
"""
from __future__ import annotations

import functools


from ._common import fall_back, refusals, ORIGINAL_PREFIX, AdapterInputError, accepted_kwargs, disabled, kernel

FAMILY = "deltanet"
PREFILL_KERNEL = "gated_delta_rule"
STEP_KERNEL = "gated_delta_rule_step"
# Head-dim limit of both kernels (issue 5: Dk, Dv up to 128).
MAX_HEAD_DIM = 128
# Most new tokens per sequence the decode-step kernel takes (issue 5: 1 <= T <= 4).
MAX_STEP_TOKENS = 4
# Chunk sizes the chunked kernel supports; short prompts use the small one.
CHUNK_SIZES = (64, 128)


def _check(query, key, value, g, beta, state=None):
    if query.dim() != 4 or key.shape != query.shape or value.dim() != 4 or value.shape[:3] != query.shape[:3]:
        return False, (f"expected query/key [B, H, S, Dk] and value [B, H, S, Dv], got {tuple(query.shape)}, "
                       f"{tuple(key.shape)}, {tuple(value.shape)}")
    if tuple(g.shape) != tuple(query.shape[:3]) or tuple(beta.shape) != tuple(query.shape[:3]):
        return False, f"expected g/beta [B, H, S]={tuple(query.shape[:3])}, got {tuple(g.shape)}, {tuple(beta.shape)}"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return False, f"head dims Dk={query.shape[-1]}, Dv={value.shape[-1]} exceed {MAX_HEAD_DIM}"
    if state is not None:
        want = (query.shape[0], query.shape[1], query.shape[-1], value.shape[-1])
        if tuple(state.shape) != want:
            return False, f"expected state [B, H, Dk, Dv]={want}, got {tuple(state.shape)}"
    return True, ""


def _bthd(x):
    """[B, H, S, D] -> [B, S, H, D] (and [B, H, S] -> [B, S, H]), contiguous fp32."""
    import torch
    return x.transpose(1, 2).to(torch.float32).contiguous()


def chunked_forward(query, key, value, g, beta, output_final_state=False, initial_state=None):
    """Prefill through `nki_kernels.gated_delta_rule` in the hooks' layouts (see module docstring)."""
    import torch

    ok, reason = _check(query, key, value, g, beta, initial_state)
    if not ok:
        raise AdapterInputError(f"nxdi deltanet: {reason}")
    fn = kernel(PREFILL_KERNEL, FAMILY)
    seq = query.shape[2]
    chunk = CHUNK_SIZES[0] if seq <= CHUNK_SIZES[0] else CHUNK_SIZES[-1]
    init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    kwargs = accepted_kwargs(fn, chunk_size=chunk, initial_state=init, output_final_state=True,
                             use_qk_l2norm_in_kernel=True)
    res = fn(_bthd(query), _bthd(key), _bthd(value), _bthd(g), _bthd(beta), **kwargs)
    out, final = res[0], res[1]
    out = out.transpose(1, 2).contiguous().to(query.dtype)
    return out, (final.to(torch.float32) if output_final_state else None)


def recurrent_step(query, key, value, g, beta, recurrent_state):
    """Decode step(s) through `nki_kernels.gated_delta_rule_step`; returns (out [B, H, S, Dv], new_state)."""
    import torch

    ok, reason = _check(query, key, value, g, beta, recurrent_state)
    if not ok:
        raise AdapterInputError(f"nxdi deltanet: {reason}")
    if query.shape[2] > MAX_STEP_TOKENS:
        raise AdapterInputError(f"nxdi deltanet: a decode step takes at most {MAX_STEP_TOKENS} tokens, "
                                f"got S={query.shape[2]}")
    fn = kernel(STEP_KERNEL, FAMILY)
    bsz = query.shape[0]
    # The step kernel updates rows of a state pool in place: the hook's state is a pool of B rows.
    pool = recurrent_state.to(torch.float32).clone().contiguous()
    # built where the state lives: a CPU tensor here would be a host constant inside NxDI's traced graph
    slot_ids = torch.arange(bsz, dtype=torch.int32, device=pool.device)
    res = fn(_bthd(query), _bthd(key), _bthd(value), _bthd(g), _bthd(beta), pool, slot_ids,
             **accepted_kwargs(fn, use_qk_l2norm_in_kernel=True))
    if isinstance(res, tuple):           # (o, new_pool) if the wrapper returns the pool as well
        out, pool = res[0], res[1]
    else:
        out = res
    return out.transpose(1, 2).contiguous().to(query.dtype), pool


def _wrap(original, name, impl):
    @functools.wraps(original)
    def hook(self, *args, **kwargs):
        if disabled():
            return original(self, *args, **kwargs)
        try:
            return impl(*args, **kwargs)
        except refusals() as exc:        # outside the contract, a kernel limit or a failed hardware check
            fall_back(f"deltanet: {type(self).__name__}.{name}", exc)
            return original(self, *args, **kwargs)

    hook.__nki_kernels_adapter__ = FAMILY
    setattr(hook, ORIGINAL_PREFIX + name, original)
    return hook


def _prefill_impl(query, key, value, g, beta, output_final_state=False, initial_state=None,
                  _segment_disabled=False):
    return chunked_forward(query, key, value, g, beta, output_final_state=output_final_state,
                           initial_state=initial_state)


def _sequential_impl(query, key, value, g, beta, output_final_state=False):
    return chunked_forward(query, key, value, g, beta, output_final_state=output_final_state)


# hook name -> (expected parameter names after self, implementation, required for the family)
HOOKS = {
    "_fused_chunked_forward": (("query", "key", "value", "g", "beta", "output_final_state", "initial_state"),
                               _prefill_impl, True),
    "_recurrent_step": (("query", "key", "value", "g", "beta", "recurrent_state"), recurrent_step, True),
    "_nki_recurrent_step": (("query", "key", "value", "g", "beta", "recurrent_state"), recurrent_step, False),
    "_chunk_forward": (("query", "key", "value", "g", "beta", "output_final_state", "initial_state"),
                       _prefill_impl, False),
    "_sequential_forward": (("query", "key", "value", "g", "beta", "output_final_state"), _sequential_impl, False),
}


def make_hook(original, name):
    """Class-level replacement for hook `name` (a key of HOOKS), deferring to `original` when unsupported."""
    return _wrap(original, name, HOOKS[name][1])
