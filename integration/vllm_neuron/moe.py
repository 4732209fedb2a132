"""MoE of the plugin's Qwen3.5-MoE block (with the sigmoid-gated shared expert) and its Qwen3-MoE experts.

Plugin contracts (weights per rank, ``[in, out]``; routed experts ``[E_local, H, 2, I_r]`` / ``[E_local, I_r, H]``,
the layout of our kernels; router ``[E, H]`` replicated; EP rank r owns experts ``[r E_local, (r + 1) E_local)``):

* ``Qwen3_5SparseMoeBlock`` (``vllm_neuron/model/qwen3_5/moe.py``, read at whn09/vllm-neuron @3de9ea3, the
  qwen3_5_moe branch of the plugin): ``forward_prefill(hidden_states, norm, positions, rank)`` and
  ``forward_decode(hidden_states, norm, gamma, rank)``; hidden is the residual *before* the post-attention norm
  ``norm`` (zero-centred, ``1 + weight``); routing softmax over all experts, top-k, L1 renormalised; shared
  expert ``sigmoid(x @ shared_expert_gate_weight.T) * SwiGLU(x)`` with ``shared_{gate,up}_proj_weight [H, S_r]``,
  ``shared_down_proj_weight [S_r, H]``; ``_combine(out, is_prefill)`` reduces the rank's partial sum.
* ``Qwen3MoeExperts`` (``vllm_neuron/model/qwen3_moe/model_bf16.py`` @5f54272): ``forward_prefill(hidden_states,
  positions, rank)`` (normalises with its ``post_attention_layernorm``, gathers the sequence-parallel shards over
  ``tp_group``, reduce-scatters over ``moe_group``) and ``forward_decode(hidden_states, rank)`` (all-reduce over
  ``moe_group``); ``gate_up_proj_weight [E_local, H, 2 I_r]`` is ``[gate | up]``, viewed ``[E, H, 2, I_r]``.

Replacements: routing on `moe_route`, the mapping on `moe_block_mapping` (NxD's static worst-case block count,
so graphs keep static shapes), prefill on `moe_blockwise` with the shared expert *fused* (our kernel applies the
per-token sigmoid gate, which the plugin's vendored kernel cannot, so the plugin runs it in torch), decode on
`moe_decode` (only the selected experts' weights are read). Prefill padding (tokens after ``argmax(positions)``)
is routed nowhere, as the plugin's padding mask does. The plugin's norms, collectives and EP placement are kept.
Cross-data-parallel EP (``cross_dp_ep``) is handed back to the plugin.
"""
from __future__ import annotations

import functools
import math


from ._common import fall_back, refusals, MARK, ORIGINAL_ATTR, disabled, instance_mismatch, ops, plugin_flag, \
    warn_once

FAMILY = "moe"
# Largest block size moe_blockwise accepts.
MAX_BLOCK_SIZE = 512

QWEN35_METHOD_PARAMS = {
    "forward_prefill": ("hidden_states", "norm", "positions", "rank"),
    "forward_decode": ("hidden_states", "norm", "gamma", "rank"),
}
QWEN35_USED_METHODS = {"_combine": ("out", "is_prefill")}
QWEN35_ATTRS = ("experts_gate_up_weight", "experts_down_weight", "router_weight", "shared_gate_proj_weight",
                "shared_up_proj_weight", "shared_down_proj_weight", "shared_expert_gate_weight", "top_k",
                "num_local_experts", "ep_rank", "world_size", "tp_group")
QWEN3_METHOD_PARAMS = {
    "forward_prefill": ("hidden_states", "positions", "rank"),
    "forward_decode": ("hidden_states", "rank"),
}
QWEN3_ATTRS = ("gate_up_proj_weight", "down_proj_weight", "router_weight", "post_attention_layernorm",
               "num_experts_per_token", "num_local_experts", "intermediate_size_per_rank", "block_size", "ep_rank",
               "tp_group", "moe_group", "cross_dp_ep")


def static_num_blocks(num_tokens, top_k, num_local_experts, block_size):
    """NxD's worst-case block count N = min(ceil((T k - (E - 1)) / B) + E - 1, T k): enough for any routing."""
    n = math.ceil((num_tokens * top_k - (num_local_experts - 1)) / block_size) + num_local_experts - 1
    return max(1, min(n, num_tokens * top_k))


def route(normed, router_weight, top_k):
    """softmax over all experts (fp32) -> top-k -> renormalised: (weights [T, k] fp32, global ids [T, k] int32)."""
    import torch
    logits = normed.to(torch.float32) @ router_weight.to(torch.float32).transpose(0, 1)
    return ops().moe_route(logits.contiguous(), int(top_k), True)


def drop_padding(top_i, positions, num_tokens):
    """The plugin's padding mask: tokens after the last real one (argmax of positions; the plugin pads a bucket by
    repeating the last real position) are routed nowhere (id -1), so no block holds them."""
    import torch
    if positions is None or positions.dim() != 1 or positions.shape[0] != num_tokens:
        return top_i
    real = torch.arange(num_tokens, device=positions.device) <= torch.argmax(positions)
    return torch.where(real.view(-1, 1), top_i, torch.full_like(top_i, -1))


def _blockwise(normed, top_w, top_i, gate_up, down, num_local, offset, block_size, shared):
    num_blocks = static_num_blocks(normed.shape[0], top_i.shape[1], num_local, block_size)
    tok, blk = ops().moe_block_mapping(top_i.contiguous(), int(num_local), int(block_size),
                                       expert_offset=int(offset), num_blocks=int(num_blocks))
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    return ops().moe_blockwise(normed.contiguous(), top_w.to(normed.dtype).contiguous(), gate_up.contiguous(),
                               down.contiguous(), tok, blk, int(block_size), shared_gate_up=s_gu, shared_down=s_dn,
                               shared_gate=s_g, top_k_index=top_i.contiguous(), expert_offset=int(offset))


def _decode(normed, top_w, top_i, gate_up, down, offset, shared):
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    return ops().moe_decode(normed.contiguous(), top_i.contiguous(), top_w.to(normed.dtype).contiguous(),
                            gate_up.contiguous(), down.contiguous(), shared_gate_up=s_gu, shared_down=s_dn,
                            shared_gate=s_g, expert_offset=int(offset))


def _qwen35_shared(block, dtype):
    """The shared expert in our kernel's layout: gate_up [H, 2, S_r], down [S_r, H], gate vector [H]."""
    import torch
    gate_up = torch.stack([block.shared_gate_proj_weight, block.shared_up_proj_weight], dim=1).to(dtype)
    return gate_up.contiguous(), block.shared_down_proj_weight.to(dtype).contiguous(), \
        block.shared_expert_gate_weight.reshape(-1).to(dtype).contiguous()


def qwen35_block_size(block):
    import sys
    return int(getattr(sys.modules.get(type(block).__module__), "BLOCK_SIZE", 128))


def qwen35_forward_prefill(block, hidden_states, norm, positions, rank):
    normed = norm(hidden_states)
    top_w, top_i = route(normed, block.router_weight, block.top_k)
    if block.world_size > 1 and plugin_flag(block, "SEQUENCE_PARALLEL"):
        top_w = block.tp_group.all_gather(top_w, dim=0)
        top_i = block.tp_group.all_gather(top_i, dim=0)
        normed = block.tp_group.all_gather(normed, dim=0)
    top_i = drop_padding(top_i, positions, normed.shape[0])
    out = _blockwise(normed, top_w, top_i, block.experts_gate_up_weight, block.experts_down_weight,
                     block.num_local_experts, block.ep_rank * block.num_local_experts, qwen35_block_size(block),
                     _qwen35_shared(block, normed.dtype))
    return block._combine(out, is_prefill=True)


def qwen35_forward_decode(block, hidden_states, norm, gamma, rank):
    normed = norm(hidden_states)
    top_w, top_i = route(normed, block.router_weight, block.top_k)
    out = _decode(normed, top_w, top_i, block.experts_gate_up_weight, block.experts_down_weight,
                  block.ep_rank * block.num_local_experts, _qwen35_shared(block, normed.dtype))
    return block._combine(out, is_prefill=False)


def _qwen3_gate_up(experts):
    return experts.gate_up_proj_weight.reshape(experts.num_local_experts, experts.gate_up_proj_weight.shape[1], 2,
                                               experts.intermediate_size_per_rank)


def qwen3_forward_prefill(experts, hidden_states, positions, rank):
    normed = experts.post_attention_layernorm(hidden_states)
    top_w, top_i = route(normed, experts.router_weight, experts.num_experts_per_token)
    if experts.tp_group.world_size > 1:
        top_w = experts.tp_group.all_gather(top_w, dim=0)
        top_i = experts.tp_group.all_gather(top_i, dim=0)
        normed = experts.tp_group.all_gather(normed, dim=0)
    top_i = drop_padding(top_i, positions, normed.shape[0])
    out = _blockwise(normed, top_w, top_i, _qwen3_gate_up(experts), experts.down_proj_weight,
                     experts.num_local_experts, experts.ep_rank * experts.num_local_experts,
                     min(int(experts.block_size), MAX_BLOCK_SIZE), None)
    if experts.moe_group.world_size > 1:
        out = experts.moe_group.reduce_scatter(out, dim=0)
    return out


def qwen3_forward_decode(experts, hidden_states, rank):
    normed = experts.post_attention_layernorm(hidden_states)
    top_w, top_i = route(normed, experts.router_weight, experts.num_experts_per_token)
    out = _decode(normed, top_w, top_i, _qwen3_gate_up(experts), experts.down_proj_weight,
                  experts.ep_rank * experts.num_local_experts, None)
    if experts.moe_group.world_size > 1:
        out = experts.moe_group.all_reduce(out)
    return out


def _wrap(original, impl, name, attrs, unsupported=None):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if disabled() or instance_mismatch(f"moe: {type(self).__name__}.{name}", self, attrs):
            return original(self, *args, **kwargs)
        reason = unsupported(self) if unsupported is not None else None
        if reason:
            warn_once(f"moe-{type(self).__name__}-{reason}",
                      f"vllm_neuron moe: {type(self).__name__}: {reason}; using the plugin's {name}")
            return original(self, *args, **kwargs)
        try:
            return impl(self, *args, **kwargs)
        except refusals() as exc:
            fall_back(f"moe: {type(self).__name__}.{name}", exc)
            return original(self, *args, **kwargs)

    setattr(method, MARK, FAMILY)
    setattr(method, ORIGINAL_ATTR, original)
    return method


def _qwen3_unsupported(experts):
    if getattr(experts, "cross_dp_ep", False):
        return "expert parallelism across data-parallel replicas (cross_dp_ep)"
    return None


QWEN35_MAKERS = {
    "forward_prefill": lambda orig: _wrap(orig, qwen35_forward_prefill, "forward_prefill", QWEN35_ATTRS),
    "forward_decode": lambda orig: _wrap(orig, qwen35_forward_decode, "forward_decode", QWEN35_ATTRS),
}
QWEN3_MAKERS = {
    "forward_prefill": lambda orig: _wrap(orig, qwen3_forward_prefill, "forward_prefill", QWEN3_ATTRS,
                                          _qwen3_unsupported),
    "forward_decode": lambda orig: _wrap(orig, qwen3_forward_decode, "forward_decode", QWEN3_ATTRS,
                                         _qwen3_unsupported),
}
