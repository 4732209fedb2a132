"""Gated DeltaNet of the plugin's Qwen3.5 / Qwen3-Next-style model on our kernels.

Plugin contract (vllm-project/vllm-neuron, ``vllm_neuron/model/qwen3_5/deltanet.py`` @b3a5a71; activations
``[tokens, hidden]``, weights stored ``[in, out]``, per-rank heads after its TP sharding of ``[q | k | v]``):

* functional op ``chunk_gated_delta_rule(query, key, value, g, beta, initial_state, chunk_size=64)`` ->
  ``(output [B, H, T, Dv], final_state [B, H, Dk, Dv])``: q / k ``[B, H, T, Dk]`` already L2-normalised, the
  ``Dk^-0.5`` query scale applied inside, K heads already expanded to the V heads; g (log decay) and beta
  ``[B, H, T]`` float32, zeroed on the bucket's padding tokens (so pads leave the state unchanged);
  ``initial_state`` float32. Replaced at module level: ``forward_prefill`` looks it up by name.
* ``Qwen3_5GatedDeltaNet._causal_conv(qkv [T, conv_dim], num_tokens) -> [T, conv_dim]``: the depthwise causal
  conv (before SiLU) from a zero history, ``conv1d_weight [conv_dim, K]`` (not transposed).
* ``Qwen3_5GatedDeltaNet.forward_decode(hidden_states [B, hidden], metadata) -> [B, hidden]``: one token per
  request; the per-sequence caches are read with ``_read_states(read_idx)`` as ``conv_state [B, K - 1, conv_dim]``
  (the last K - 1 pre-conv inputs) and ``recurrent_state [B, Hv, Dk, Dv]`` float32, and written back with
  ``_write_states(write_idx, conv, rec)``. The replacement keeps that plumbing (``state_indices``, the zero
  and sink pages for padded rows) and runs the conv window update on `causal_conv1d_update` and the recurrence
  (L2 norm and scale in-kernel) on `gated_delta_rule_step`, instead of unrolled torch taps and a torch step.

Every kernel call goes through ``torch.ops.nki_kernels`` (`nki_kernels.torch_ops`), so the plugin's dynamo
path traces each launch as one graph node. Inputs outside our kernels' limits, a multi-token decode, or a
`KernelInputError` hand the call back to the plugin's own implementation.
"""
from __future__ import annotations

import functools


from ._common import fall_back, refusals, MARK, ORIGINAL_ATTR, disabled, instance_mismatch, ops, warn_once

FAMILY = "deltanet"
# Head-dim limit of gated_delta_rule / gated_delta_rule_step (Dk, Dv <= 128).
MAX_HEAD_DIM = 128
# The chunked kernel's chunk length (the plugin's torch path uses 64 too).
KERNEL_CHUNK = 64

FUNCTION_PARAMS = {
    "chunk_gated_delta_rule": ("query", "key", "value", "g", "beta", "initial_state", "chunk_size"),
}
METHOD_PARAMS = {
    "_causal_conv": ("qkv", "num_tokens"),
    "forward_decode": ("hidden_states", "metadata"),
}
# Methods the replacements call on the module; their signatures are verified at install time too.
USED_METHODS = {
    "_project": ("hidden_states",),
    "state_indices": ("metadata", "num_reqs"),
    "_read_states": ("indices",),
    "_write_states": ("indices", "conv", "rec"),
    "_split_heads": ("mixed", "leading"),
    "_output": ("core", "z", "num_tokens"),
}
INSTANCE_ATTRS = ("conv1d_weight", "conv_kernel_size", "num_v_heads", "head_k_dim", "head_v_dim", "world_size",
                  "tp_group")


def _fits(query, value):
    return query.shape[-1] <= MAX_HEAD_DIM and value.shape[-1] <= MAX_HEAD_DIM


def chunk_gated_delta_rule(query, key, value, g, beta, initial_state, chunk_size=KERNEL_CHUNK):
    """The plugin's prefill functional op on `nki_kernels.gated_delta_rule` (all batches and heads, one launch)."""
    import torch

    to_bthd = lambda x: x.transpose(1, 2).contiguous()                                  # noqa: E731
    o, final = ops().gated_delta_rule(
        to_bthd(query.float()), to_bthd(key.float()), to_bthd(value.float()), to_bthd(g.float()),
        to_bthd(beta.float()), chunk_size=KERNEL_CHUNK, initial_state=initial_state.to(torch.float32).contiguous(),
        use_qk_l2norm_in_kernel=False)
    return o.transpose(1, 2).to(query.dtype), final


def make_chunk_gated_delta_rule(original):
    @functools.wraps(original)
    def chunk_gated_delta_rule_nki(query, key, value, g, beta, initial_state, chunk_size=KERNEL_CHUNK):
        if disabled() or not _fits(query, value):
            return original(query, key, value, g, beta, initial_state, chunk_size)
        try:
            return chunk_gated_delta_rule(query, key, value, g, beta, initial_state, chunk_size)
        except refusals() as exc:
            fall_back("deltanet: chunk_gated_delta_rule", exc)
            return original(query, key, value, g, beta, initial_state, chunk_size)

    setattr(chunk_gated_delta_rule_nki, MARK, FAMILY)
    setattr(chunk_gated_delta_rule_nki, ORIGINAL_ATTR, original)
    return chunk_gated_delta_rule_nki


def causal_conv(module, qkv, num_tokens):
    """``_causal_conv`` on `nki_kernels.causal_conv1d` (no activation: the plugin applies SiLU after)."""
    x = qkv[:num_tokens].transpose(0, 1).unsqueeze(0).contiguous()                 # [1, conv_dim, T]
    y, _ = ops().causal_conv1d(x, module.conv1d_weight.to(qkv.dtype).contiguous(), activation=None)
    return y[0].transpose(0, 1)


def make_causal_conv(original):
    @functools.wraps(original)
    def _causal_conv(self, qkv, num_tokens):
        hook = f"deltanet: {type(self).__name__}._causal_conv"
        if disabled() or instance_mismatch(hook, self, ("conv1d_weight",)):
            return original(self, qkv, num_tokens)
        try:
            return causal_conv(self, qkv, num_tokens)
        except refusals() as exc:
            fall_back(hook, exc)
            return original(self, qkv, num_tokens)

    setattr(_causal_conv, MARK, FAMILY)
    setattr(_causal_conv, ORIGINAL_ATTR, original)
    return _causal_conv


def forward_decode(module, hidden_states, metadata):
    """One recurrent step per request on our conv-update and decode-step kernels (see the module docstring)."""
    import torch

    num_reqs = metadata["block_table_tensor"].shape[0]
    qkv, z, beta, g = module._project(hidden_states)
    read_idx, write_idx = module.state_indices(metadata, num_reqs)
    conv_prev, state = module._read_states(read_idx)              # [B, K - 1, C] and [B, Hv, Dk, Dv] float32
    # Our conv state holds the K inputs of the window ([B, C, K]); the plugin's cache the K - 1 before the token.
    lead = torch.zeros(num_reqs, qkv.shape[-1], 1, dtype=qkv.dtype, device=qkv.device)
    window = torch.cat([lead, conv_prev.to(qkv.dtype).transpose(1, 2)], dim=-1).contiguous()
    mixed = ops().causal_conv1d_update(qkv.unsqueeze(-1).contiguous(), window,
                                       module.conv1d_weight.to(qkv.dtype).contiguous(), activation="silu")
    q, k, v = module._split_heads(mixed[..., 0], (num_reqs,))
    pool = state.to(torch.float32).contiguous().clone()
    slot_ids = torch.arange(num_reqs, dtype=torch.int32, device=pool.device)
    step = lambda x: x.float().unsqueeze(1).contiguous()                                 # noqa: E731
    core = ops().gated_delta_rule_step(step(q), step(k), step(v), step(g), step(beta), pool, slot_ids,
                                       use_qk_l2norm_in_kernel=True)
    module._write_states(write_idx, window[..., 1:].transpose(1, 2), pool)
    output = module._output(core[:, 0], z, num_reqs)
    if module.world_size > 1:
        module.tp_group.all_reduce(output)
    return output


def make_forward_decode(original):
    @functools.wraps(original)
    def forward_decode_nki(self, hidden_states, metadata):
        hook = f"deltanet: {type(self).__name__}.forward_decode"
        if disabled() or instance_mismatch(hook, self, INSTANCE_ATTRS):
            return original(self, hidden_states, metadata)
        if hidden_states.shape[0] != metadata["block_table_tensor"].shape[0]:
            return original(self, hidden_states, metadata)       # multi-token decode: the plugin raises, keep that
        if max(self.head_k_dim, self.head_v_dim) > MAX_HEAD_DIM:
            warn_once("gdn-decode-dims", f"vllm_neuron deltanet: head dims {self.head_k_dim}/{self.head_v_dim} > "
                      f"{MAX_HEAD_DIM}; using the plugin's forward_decode")
            return original(self, hidden_states, metadata)
        try:
            return forward_decode(self, hidden_states, metadata)
        except refusals() as exc:
            fall_back(hook, exc)
            return original(self, hidden_states, metadata)

    setattr(forward_decode_nki, MARK, FAMILY)
    setattr(forward_decode_nki, ORIGINAL_ATTR, original)
    return forward_decode_nki


FUNCTION_MAKERS = {"chunk_gated_delta_rule": make_chunk_gated_delta_rule}
METHOD_MAKERS = {"_causal_conv": make_causal_conv, "forward_decode": make_forward_decode}
