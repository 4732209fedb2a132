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
one flash-attention launch (GQA without repeating K/V). whn09/vllm-neuron @3de9ea3 (the Qwen3.5-MoE branch) has
the same methods without query-head replication: no ``q_replicas`` / ``o_offset`` / ``o_size``, ``o_proj_weight
[q_size, hidden]``; both contracts are supported (an instance with only some of the three falls back).

Decode: ``forward_decode(hidden_states, positions, position_embeddings, metadata)``, one token per request. The
plugin gathers each request's pages (``block_table_tensor``; dead rows and stale ids redirected to the zero page
``kv_pages.shape[0] - 2``) from ``kv_pages [pages, 2, kv_heads, block_size, D]``, attends to the positions before
``positions[r]`` plus the token itself (appended), in torch. The replacement gathers the same pages per KV head
(not per query head) into a ``[B, Hkv, ctx, D]`` cache, places the token's own K/V at ``positions[r]`` with a
select (static shapes), zeroes the unwritten tail (it may hold another cache group's bytes) and runs
`flash_attention_decode` with ``cache_lens = positions + 1``; the gate and ``o_proj`` stay the plugin's
``_finish``.
"""
from __future__ import annotations

import functools


from ._common import fall_back, refusals, MARK, ORIGINAL_ATTR, contract_fallback, disabled, instance_mismatch, ops, \
    plugin_flag

FAMILY = "attention"
# flash_attention's head_dim limit.
MAX_HEAD_DIM = 256

METHOD_PARAMS = {"forward_prefill": ("hidden_states", "position_embeddings", "metadata"),
                 "forward_decode": ("hidden_states", "positions", "position_embeddings", "metadata")}
USED_METHODS = {"_qkv": ("hidden_states", "cos", "sin"), "_write_kv": ("k", "v", "metadata"),
                "_finish": ("attn_output", "gate")}
INSTANCE_ATTRS = ("head_dim", "scaling", "q_size", "o_proj_weight", "num_heads_per_rank", "num_kv_heads_per_rank",
                  "kv_pages", "world_size", "tp_group")
# Query-head replication (TP wider than the query heads): all three or none. vllm-project @aa9b76b has them;
# whn09/vllm-neuron @3de9ea3 (the Qwen3.5-MoE branch) has none, with o_proj_weight [q_size, hidden] and a
# _finish that does not narrow. Both are supported.
REPLICATION_ATTRS = ("q_replicas", "o_offset", "o_size")


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
    if getattr(module, "q_replicas", 1) > 1:
        attn_output = attn_output[:, module.o_offset:module.o_offset + module.o_size]
    output = attn_output @ module.o_proj_weight
    if module.world_size > 1:
        if plugin_flag(module, "SEQUENCE_PARALLEL"):
            output = module.tp_group.reduce_scatter(output, dim=0)
        else:
            module.tp_group.all_reduce(output)
    return output.contiguous()


def o_proj_mismatch(module):
    """Why `module.o_proj_weight` is not the row-parallel window forward_prefill multiplies by, or None: o_size
    rows under query-head replication, q_size rows without it."""
    rows = module.o_size if hasattr(module, "o_size") else module.q_size
    if module.o_proj_weight.shape[0] != rows:
        return (f"o_proj_weight has {module.o_proj_weight.shape[0]} rows, expected {rows} "
                f"({'o_size' if hasattr(module, 'o_size') else 'q_size, no query-head replication'})")
    return None


def make_forward_prefill(original):
    @functools.wraps(original)
    def forward_prefill_nki(self, hidden_states, position_embeddings, metadata):
        hook = f"attention: {type(self).__name__}.forward_prefill"
        if disabled() or instance_mismatch(hook, self, INSTANCE_ATTRS, REPLICATION_ATTRS) \
                or self.head_dim > MAX_HEAD_DIM:
            return original(self, hidden_states, position_embeddings, metadata)
        reason = o_proj_mismatch(self)
        if reason:
            contract_fallback(hook, reason)
            return original(self, hidden_states, position_embeddings, metadata)
        try:
            return forward_prefill(self, hidden_states, position_embeddings, metadata)
        except refusals() as exc:
            fall_back(hook, exc)
            return original(self, hidden_states, position_embeddings, metadata)

    setattr(forward_prefill_nki, MARK, FAMILY)
    setattr(forward_prefill_nki, ORIGINAL_ATTR, original)
    return forward_prefill_nki


def _gather_pages(module, metadata, num_reqs):
    """(k_ctx, v_ctx) [B, Hkv, ctx, D]: each request's pages in block-table order, per KV head."""
    import torch

    pages = module.kv_pages
    num_pages, nkh, block_size, dim = pages.shape[0], pages.shape[2], pages.shape[3], pages.shape[4]
    zero_page = num_pages - 2
    bt = metadata["block_table_tensor"].to(torch.long)
    live = (metadata["slot_mapping"].view(num_reqs, -1)[:, 0] > 0).view(-1, 1)
    blocks = torch.where(live & (bt > 0) & (bt < zero_page), bt, torch.full_like(bt, zero_page))
    # row of (page p, K/V column j, kv head h) in the flattened pool: (p * 2 + j) * nkh + h
    heads = torch.arange(nkh, device=blocks.device).view(1, nkh, 1)
    base = blocks.unsqueeze(1) * (2 * nkh) + heads                                   # [B, Hkv, blocks]
    flat = pages.reshape(num_pages * 2 * nkh, block_size, dim)
    ctx = blocks.shape[1] * block_size
    k_ctx = flat[base.reshape(-1)].reshape(num_reqs, nkh, ctx, dim)
    v_ctx = flat[(base + nkh).reshape(-1)].reshape(num_reqs, nkh, ctx, dim)
    return k_ctx, v_ctx


def forward_decode(module, hidden_states, positions, position_embeddings, metadata):
    import torch

    num_reqs = metadata["block_table_tensor"].shape[0]
    cos, sin = position_embeddings
    q, k, v, gate = module._qkv(hidden_states, cos, sin)               # q [Hq, B, D]; k, v [Hkv, B, D]
    module._write_kv(k, v, metadata)
    k_ctx, v_ctx = _gather_pages(module, metadata, num_reqs)
    ctx = k_ctx.shape[2]
    pos = positions.reshape(num_reqs).to(torch.long).clamp(0, ctx - 1)
    key_pos = torch.arange(ctx, device=pos.device).view(1, 1, ctx, 1)
    here = key_pos == pos.view(-1, 1, 1, 1)
    before = key_pos < pos.view(-1, 1, 1, 1)
    zeros = torch.zeros((), dtype=k_ctx.dtype, device=k_ctx.device)
    k_cache = torch.where(here, k.transpose(0, 1).unsqueeze(2).to(k_ctx.dtype), torch.where(before, k_ctx, zeros))
    v_cache = torch.where(here, v.transpose(0, 1).unsqueeze(2).to(v_ctx.dtype), torch.where(before, v_ctx, zeros))
    q_b = q.transpose(0, 1).unsqueeze(2).to(k_cache.dtype).contiguous()                      # [B, Hq, 1, D]
    out = ops().flash_attention_decode(q_b, k_cache.contiguous(), v_cache.contiguous(),
                                       (pos + 1).to(torch.int32), causal=True, softmax_scale=float(module.scaling))
    attn_output = out[:, :, 0].reshape(num_reqs, module.q_size).to(v.dtype)
    output = module._finish(attn_output, gate)
    if module.world_size > 1:
        module.tp_group.all_reduce(output)
    return output


def make_forward_decode(original):
    @functools.wraps(original)
    def forward_decode_nki(self, hidden_states, positions, position_embeddings, metadata):
        one_token_each = hidden_states.shape[0] == metadata["block_table_tensor"].shape[0]
        hook = f"attention: {type(self).__name__}.forward_decode"
        if disabled() or instance_mismatch(hook, self, INSTANCE_ATTRS, REPLICATION_ATTRS) \
                or self.head_dim > MAX_HEAD_DIM or not one_token_each:
            return original(self, hidden_states, positions, position_embeddings, metadata)
        try:
            return forward_decode(self, hidden_states, positions, position_embeddings, metadata)
        except refusals() as exc:
            fall_back(hook, exc)
            return original(self, hidden_states, positions, position_embeddings, metadata)

    setattr(forward_decode_nki, MARK, FAMILY)
    setattr(forward_decode_nki, ORIGINAL_ATTR, original)
    return forward_decode_nki


METHOD_MAKERS = {"forward_prefill": make_forward_prefill, "forward_decode": make_forward_decode}
