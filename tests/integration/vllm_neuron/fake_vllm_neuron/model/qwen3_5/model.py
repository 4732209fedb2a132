"""Stand-in for vllm_neuron/model/qwen3_5/model.py (@aa9b76b): zero-centred RMSNorm, partial rotary, the gated
attention with its [q | gate]-per-head q_proj, paged KV cache [pages, 2, kv_heads, block_size, D], the decoder
layer and a text model; torch bodies."""
from __future__ import annotations

import torch
import torch.nn as nn

from fake_vllm_neuron.parallel import get_tp_group

from .config import Qwen3_5TextConfig
from .deltanet import Qwen3_5GatedDeltaNet
from .flags import SEQUENCE_PARALLEL
from .moe import Qwen3_5SparseMoeBlock

LINEAR_ATTENTION = "linear_attention"


class Qwen3_5RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).to(input_dtype)


class Qwen3_5RotaryEmbedding(nn.Module):
    """1-D positions only (text): (cos, sin) [T, rotary_dim / 2]."""

    def __init__(self, config):
        super().__init__()
        dim = config.rotary_dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim)),
                             persistent=False)

    def forward(self, position_ids, dtype=torch.bfloat16):
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_partial_rotary(x, cos, sin):
    rotary_dim = 2 * cos.shape[-1]
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(0)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(0)
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, passthrough), dim=-1)


class Qwen3_5Attention(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_name = f"layers.{layer_idx}.self_attn"
        self.dtype = config.torch_dtype
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.rms_norm_eps = config.rms_norm_eps
        self.scaling = config.head_dim ** -0.5
        self.tp_group = get_tp_group()
        self.world_size = self.tp_group.world_size
        self.rank = self.tp_group.rank_in_group
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_replicas = max(1, self.world_size // num_heads)
        self.num_heads_per_rank = max(1, num_heads // self.world_size)
        if self.world_size >= num_kv_heads:
            self.num_kv_heads_per_rank = 1
            self.num_kv_replicas = self.world_size // num_kv_heads
        else:
            self.num_kv_heads_per_rank = num_kv_heads // self.world_size
            self.num_kv_replicas = 1
        self.num_kv_groups = self.num_heads_per_rank // self.num_kv_heads_per_rank
        self.q_size = self.num_heads_per_rank * self.head_dim
        self.kv_size = self.num_kv_heads_per_rank * self.head_dim
        self.o_size = self.q_size // self.q_replicas
        self.o_offset = (self.rank % self.q_replicas) * self.o_size
        self.q_proj_weight = nn.Parameter(torch.empty(self.hidden_size, 2 * self.q_size, dtype=self.dtype))
        self.k_proj_weight = nn.Parameter(torch.empty(self.hidden_size, self.kv_size, dtype=self.dtype))
        self.v_proj_weight = nn.Parameter(torch.empty(self.hidden_size, self.kv_size, dtype=self.dtype))
        self.o_proj_weight = nn.Parameter(torch.empty(self.o_size, self.hidden_size, dtype=self.dtype))
        self.q_norm = Qwen3_5RMSNorm(self.head_dim, self.rms_norm_eps, self.dtype)
        self.k_norm = Qwen3_5RMSNorm(self.head_dim, self.rms_norm_eps, self.dtype)
        self.kv_pages = None

    def _qkv(self, hidden_states, cos, sin):
        tokens = hidden_states.shape[0]
        hidden_states = hidden_states.to(self.dtype)
        qg = (hidden_states @ self.q_proj_weight).view(tokens, self.num_heads_per_rank, 2 * self.head_dim)
        q, gate = qg.chunk(2, dim=-1)
        gate = gate.reshape(tokens, self.q_size)
        q = self.q_norm(q).transpose(0, 1)
        k = self.k_norm((hidden_states @ self.k_proj_weight).view(tokens, self.num_kv_heads_per_rank,
                                                                  self.head_dim)).transpose(0, 1)
        v = (hidden_states @ self.v_proj_weight).view(tokens, self.num_kv_heads_per_rank, self.head_dim).transpose(0, 1)
        return apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin), v, gate

    def _write_kv(self, k, v, metadata):
        slot_mapping = metadata["slot_mapping"]
        block_size = metadata["block_size"]
        num_tokens = slot_mapping.shape[0]
        nkh = self.num_kv_heads_per_rank
        scratch = self.kv_pages.shape[0] - 1
        blocks = torch.where(slot_mapping > 0, slot_mapping // block_size, torch.full_like(slot_mapping, scratch))
        heads = torch.arange(nkh, dtype=torch.long).repeat_interleave(num_tokens)
        blocks = blocks.repeat(nkh)
        offsets = (slot_mapping % block_size).repeat(nkh)
        k_col = torch.zeros_like(blocks)
        self.kv_pages.index_put_((blocks, k_col, heads, offsets), k.reshape(-1, self.head_dim).to(self.kv_pages.dtype))
        self.kv_pages.index_put_((blocks, k_col + 1, heads, offsets),
                                 v.reshape(-1, self.head_dim).to(self.kv_pages.dtype))

    def _finish(self, attn_output, gate):
        attn_output = attn_output * torch.sigmoid(gate.float()).to(attn_output.dtype)
        if self.q_replicas > 1:
            attn_output = attn_output[:, self.o_offset:self.o_offset + self.o_size]
        return attn_output @ self.o_proj_weight

    def forward(self, hidden_states, positions, position_embeddings, attn_metadata):
        metadata = attn_metadata[self.layer_name]
        if metadata["max_query_len"] <= metadata["decode_token_threshold"]:
            return self.forward_decode(hidden_states, positions, position_embeddings, metadata)
        if self.world_size > 1 and SEQUENCE_PARALLEL:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        return self.forward_prefill(hidden_states, position_embeddings, metadata)

    def forward_prefill(self, hidden_states, position_embeddings, metadata):
        cos, sin = position_embeddings
        tokens = hidden_states.shape[0]
        q, k, v, gate = self._qkv(hidden_states, cos, sin)
        self._write_kv(k, v, metadata)
        k = k.repeat_interleave(self.num_kv_groups, dim=0)
        v = v.repeat_interleave(self.num_kv_groups, dim=0)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        causal = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1).to(v.dtype)
        attn_output = (attn @ v).transpose(0, 1).reshape(tokens, self.q_size)
        output = self._finish(attn_output, gate)
        if self.world_size > 1:
            if SEQUENCE_PARALLEL:
                output = self.tp_group.reduce_scatter(output, dim=0)
            else:
                self.tp_group.all_reduce(output)
        return output.contiguous()

    def forward_decode(self, hidden_states, positions, position_embeddings, metadata):
        """Attention of each request's new token over its pages (positions < its own) plus itself."""
        block_table = metadata["block_table_tensor"].to(torch.long)
        num_reqs = block_table.shape[0]
        cos, sin = position_embeddings
        q, k, v, gate = self._qkv(hidden_states, cos, sin)
        self._write_kv(k, v, metadata)
        outs = []
        for r in range(num_reqs):
            pages = self.kv_pages[block_table[r]]                          # [blocks, 2, nkh, block_size, D]
            kc = pages[:, 0].permute(1, 0, 2, 3).reshape(self.num_kv_heads_per_rank, -1, self.head_dim)
            vc = pages[:, 1].permute(1, 0, 2, 3).reshape(self.num_kv_heads_per_rank, -1, self.head_dim)
            n = int(positions[r]) + 1                                      # this token's K/V is now in its page
            kc = kc[:, :n].repeat_interleave(self.num_kv_groups, dim=0)
            vc = vc[:, :n].repeat_interleave(self.num_kv_groups, dim=0)
            scores = (q[:, r:r + 1].float() @ kc.float().transpose(-1, -2)) * self.scaling
            attn = torch.softmax(scores, dim=-1).to(vc.dtype)
            outs.append((attn @ vc).transpose(0, 1).reshape(1, self.q_size))
        output = self._finish(torch.cat(outs, 0), gate)
        if self.world_size > 1:
            self.tp_group.all_reduce(output)
        return output


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_linear_attention = config.layer_types[layer_idx] == LINEAR_ATTENTION
        self.input_layernorm = Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)
        self.post_attention_layernorm = Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)
        if self.is_linear_attention:
            self.linear_attn = Qwen3_5GatedDeltaNet(config, layer_idx)
            self.mixer_name = self.linear_attn.layer_name
        else:
            self.self_attn = Qwen3_5Attention(config, layer_idx)
            self.mixer_name = self.self_attn.layer_name
        self.is_moe = config.is_moe
        self.mlp = Qwen3_5SparseMoeBlock(config)

    def forward(self, hidden_states, positions, position_embeddings, attn_metadata, rank=None):
        metadata = attn_metadata[self.mixer_name]
        is_decode = metadata["max_query_len"] <= metadata["decode_token_threshold"]
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.is_linear_attention:
            hidden_states = self.linear_attn(hidden_states, positions, attn_metadata)
        else:
            hidden_states = self.self_attn(hidden_states, positions, position_embeddings, attn_metadata)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(hidden_states, is_prefill=not is_decode, norm=self.post_attention_layernorm,
                                 positions=positions, rank=rank)
        return residual + hidden_states


class Qwen3_5TextModel(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.torch_dtype)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3_5RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)
        self.rotary_emb = Qwen3_5RotaryEmbedding(config)

    def forward(self, input_ids, positions, rotary_position_ids, attn_metadata, rank=None):
        hidden_states = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(positions, dtype=self.config.torch_dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions, position_embeddings, attn_metadata, rank=rank)
        return self.norm(hidden_states)


class Qwen3_5ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.language_model = Qwen3_5TextModel(config)

    def forward(self, input_ids, positions, rotary_position_ids=None, attn_metadata=None, rank=None):
        return self.language_model(input_ids, positions, rotary_position_ids, attn_metadata, rank=rank)

