"""Gated attention prefill (head_dim 256) of the plugin's Qwen3.5 model on `nki_kernels.flash_attention`.

Plugin contract (``vllm_neuron/model/qwen3_5/model.py`` @aa9b76b, ``Qwen3_5Attention``):

    forward_prefill(hidden_states [T, hidden], position_embeddings (cos, sin), metadata) -> [T, hidden]

``_qkv(hidden_states, cos, sin)`` gives q ``[Hq, T, D]`` (q-normed, partial mRoPE), k / v ``[Hkv, T, D]`` and the
output gate ``[T, Hq * D]`` (per head ``[query | gate]`` in ``q_proj``); ``_write_kv(k, v, metadata)`` fills
the paged cache. The plugin then computes causal softmax attention in torch (D = 256 is above its vendored
flash kernel's 128), gates by ``sigmoid(gate)`` and applies the row-parallel ``o_proj_weight [o_size, hidden]``
(a narrowed window of the heads when query heads are replicated: ``o_offset``, ``o_size``), then all-reduces
(or reduce-scatters under sequence parallelism).

The replacement keeps ``_qkv``, ``_write_kv`` and the collectives and runs attention and the sigmoid gate in
one flash-attention launch (GQA without repeating K/V). Decode (``forward_decode``, paged gather) stays the
plugin's.
"""
from __future__ import annotations

import functools

from nki_kernels.validation import KernelInputError

from ._common import MARK, ORIGINAL_ATTR, disabled, ops, plugin_flag, warn_once

FAMILY = "attention"
# flash_attention's head_dim limit.
MAX_HEAD_DIM = 256

METHOD_PARAMS = {"forward_prefill": ("hidden_states", "position_embeddings", "metadata")}
USED_METHODS = {"_qkv": ("hidden_states", "cos", "sin"), "_write_kv": ("k", "v", "metadata")}
INSTANCE_ATTRS = ("head_dim", "scaling", "q_size", "q_replicas", "o_offset", "o_size", "o_proj_weight",
                  "num_heads_per_rank", "world_size", "tp_group")


def forward_prefill(module, hidden_states, position_embeddings, metadata):
    cos, sin = position_embeddings
    tokens = hidden_states.shape[0]
    q, k, v, gate = module._qkv(hidden_states, cos, sin)
    module._write_kv(k, v, metadata)
    heads, dim = module.num_heads_per_rank, module.head_dim
    gate_bhsd = gate.reshape(tokens, heads, dim).transpose(0, 1).unsqueeze(0).contiguous()
    out = ops().flash_attention(q.unsqueeze(0).contiguous(), k.unsqueeze(0).contiguous(),
                                v.unsqueeze(0).contiguous(), gate=gate_bhsd, causal=True,
                                softmax_scale=float(module.scaling))
    attn_output = out[0].transpose(0, 1).reshape(tokens, module.q_size)
    if module.q_replicas > 1:
        attn_output = attn_output[:, module.o_offset:module.o_offset + module.o_size]
    output = attn_output @ module.o_proj_weight
    if module.world_size > 1:
        if plugin_flag(module, "SEQUENCE_PARALLEL"):
            output = module.tp_group.reduce_scatter(output, dim=0)
        else:
            module.tp_group.all_reduce(output)
    return output.contiguous()


def make_forward_prefill(original):
    @functools.wraps(original)
    def forward_prefill_nki(self, hidden_states, position_embeddings, metadata):
        if disabled() or self.head_dim > MAX_HEAD_DIM:
            return original(self, hidden_states, position_embeddings, metadata)
        try:
            return forward_prefill(self, hidden_states, position_embeddings, metadata)
        except KernelInputError as exc:
            warn_once(f"attn-{exc}", f"vllm_neuron attention: {exc}; using the plugin's forward_prefill")
            return original(self, hidden_states, position_embeddings, metadata)

    setattr(forward_prefill_nki, MARK, FAMILY)
    setattr(forward_prefill_nki, ORIGINAL_ATTR, original)
    return forward_prefill_nki


METHOD_MAKERS = {"forward_prefill": make_forward_prefill}
