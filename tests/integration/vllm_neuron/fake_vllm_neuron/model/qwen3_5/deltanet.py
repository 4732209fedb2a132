"""Stand-in for vllm_neuron/model/qwen3_5/deltanet.py (@b3a5a71): same functional ops, class, methods, parameter
layouts ([in, out]; conv1d_weight [conv_dim, K]), page-major state cache and call sites; torch bodies."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fake_vllm_neuron.parallel import get_tp_group

from .config import Qwen3_5TextConfig
from .flags import SEQUENCE_PARALLEL


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(query, key, value, g, beta, initial_state, chunk_size=64):
    """[B, H, T, Dk] normalised q / k (scale applied here), v [B, H, T, Dv], g / beta [B, H, T] ->
    (output [B, H, T, Dv], final_state [B, H, Dk, Dv]); evaluated token by token."""
    b, h, t, dk = query.shape
    if t % chunk_size:
        raise ValueError(f"sequence length {t} must be a multiple of {chunk_size}")
    state = initial_state.to(query.dtype)
    outs = []
    for i in range(t):
        out, state = recurrent_gated_delta_rule_step(query[:, :, i], key[:, :, i], value[:, :, i], g[:, :, i],
                                                     beta[:, :, i], state)
        outs.append(out)
    return torch.stack(outs, dim=2), state


def recurrent_gated_delta_rule_step(query, key, value, g, beta, state):
    """q / k [B, H, Dk] normalised, v [B, H, Dv], g / beta [B, H], state [B, H, Dk, Dv] -> (out, new_state)."""
    query = query * query.shape[-1] ** -0.5
    state = state * g.exp()[..., None, None]
    kv = (state * key.unsqueeze(-1)).sum(dim=-2)
    delta = (value - kv) * beta.unsqueeze(-1)
    state = state + key.unsqueeze(-1) * delta.unsqueeze(-2)
    return (state * query.unsqueeze(-1)).sum(dim=-2), state


class Qwen3_5GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_name = f"layers.{layer_idx}.linear_attn"
        self.dtype = config.torch_dtype
        self.state_dtype = config.ssm_dtype
        self.rms_norm_eps = config.rms_norm_eps
        self.hidden_size = config.hidden_size
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.tp_group = get_tp_group()
        self.world_size = self.tp_group.world_size
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.k_replicas = max(1, self.world_size // config.linear_num_key_heads)
        self.num_k_heads = max(1, config.linear_num_key_heads // self.world_size)
        self.num_v_heads = config.linear_num_value_heads // self.world_size
        self.num_v_groups = self.num_v_heads // self.num_k_heads
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv_weight = nn.Parameter(torch.empty(self.hidden_size, self.conv_dim, dtype=self.dtype))
        self.in_proj_z_weight = nn.Parameter(torch.empty(self.hidden_size, self.value_dim, dtype=self.dtype))
        self.in_proj_ba_weight = nn.Parameter(torch.empty(self.hidden_size, 2 * self.num_v_heads, dtype=self.dtype))
        self.conv1d_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel_size, dtype=self.dtype))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.norm_weight = nn.Parameter(torch.empty(self.head_v_dim, dtype=self.dtype))
        self.out_proj_weight = nn.Parameter(torch.empty(self.value_dim, self.hidden_size, dtype=self.dtype))
        self.state_pages = None
        self.conv_numel = (self.conv_kernel_size - 1) * self.conv_dim
        self.rec_numel = self.num_v_heads * self.head_k_dim * self.head_v_dim

    def bind_state_pages(self, pages):
        if pages.dim() != 2 or pages.shape[1] < self.conv_numel + self.rec_numel:
            raise ValueError(f"{self.layer_name}: state page view {tuple(pages.shape)} too small")
        self.state_pages = pages

    def _read_states(self, indices):
        rows = self.state_pages.index_select(0, indices)
        n = rows.shape[0]
        conv = rows[:, :self.conv_numel].reshape(n, self.conv_kernel_size - 1, self.conv_dim)
        rec = rows[:, self.conv_numel:self.conv_numel + self.rec_numel].reshape(
            n, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        return conv, rec

    def _write_states(self, indices, conv, rec):
        n = indices.shape[0]
        parts = [conv.reshape(n, -1).float(), rec.reshape(n, -1).float()]
        pad = self.state_pages.shape[1] - self.conv_numel - self.rec_numel
        if pad:
            parts.append(torch.zeros(n, pad, dtype=self.state_pages.dtype, device=indices.device))
        self.state_pages.index_copy_(0, indices, torch.cat(parts, dim=1))

    def state_indices(self, metadata, num_reqs):
        indices = metadata["block_table_tensor"][:num_reqs, 0].to(torch.long)
        slot_mapping = metadata["slot_mapping"].view(num_reqs, -1)[:, 0]
        sink = self.state_pages.shape[0] - 1
        zero_page = sink - 1
        live = (slot_mapping > 0) & (indices > 0) & (indices < zero_page)
        return (torch.where(live, indices, torch.full_like(indices, zero_page)),
                torch.where(live, indices, torch.full_like(indices, sink)))

    def _project(self, hidden_states):
        hidden_states = hidden_states.to(self.dtype)
        qkv = hidden_states @ self.in_proj_qkv_weight
        z = hidden_states @ self.in_proj_z_weight
        ba = hidden_states @ self.in_proj_ba_weight
        b, a = ba[..., :self.num_v_heads], ba[..., self.num_v_heads:]
        beta = b.float().sigmoid()
        g = -self.A_log.exp() * F.softplus(a.float() + self.dt_bias)
        return qkv, z, beta, g

    def _causal_conv(self, qkv, num_tokens):
        padded = F.pad(qkv, (0, 0, self.conv_kernel_size - 1, 0))
        out = padded[:num_tokens] * self.conv1d_weight[:, 0]
        for tap in range(1, self.conv_kernel_size):
            out = out + padded[tap:tap + num_tokens] * self.conv1d_weight[:, tap]
        return out

    @staticmethod
    def _tail_rows(rows_in, is_real, count):
        real = is_real.to(rows_in.dtype)
        onehot_last = real - F.pad(real[1:], (0, 1))
        selector = torch.stack([F.pad(onehot_last[count - 1 - j:], (0, count - 1 - j)) if count - 1 - j
                                else onehot_last for j in range(count)])
        return selector @ rows_in

    def _split_heads(self, mixed, leading):
        q = mixed[..., :self.key_dim].reshape(*leading, self.num_k_heads, self.head_k_dim)
        k = mixed[..., self.key_dim:2 * self.key_dim].reshape(*leading, self.num_k_heads, self.head_k_dim)
        v = mixed[..., 2 * self.key_dim:2 * self.key_dim + self.value_dim].reshape(
            *leading, self.num_v_heads, self.head_v_dim)
        if self.num_v_groups > 1:
            expanded = (*leading, self.num_k_heads, self.num_v_groups, self.head_k_dim)
            folded = (*leading, self.num_v_heads, self.head_k_dim)
            q = q.unsqueeze(-2).expand(expanded).reshape(folded)
            k = k.unsqueeze(-2).expand(expanded).reshape(folded)
        return q, k, v

    def _output(self, core, z, num_tokens):
        core = core.float()
        core = core * torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps)
        core = self.norm_weight * core.to(self.dtype)
        core = core * F.silu(z.reshape_as(core).float())
        return core.to(self.dtype).reshape(num_tokens, self.value_dim) @ self.out_proj_weight

    def forward(self, hidden_states, positions, attn_metadata):
        metadata = attn_metadata[self.layer_name]
        if metadata["max_query_len"] <= metadata["decode_token_threshold"]:
            return self.forward_decode(hidden_states, metadata)
        if self.world_size > 1 and SEQUENCE_PARALLEL:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        return self.forward_prefill(hidden_states, positions, metadata)

    def forward_prefill(self, hidden_states, positions, metadata):
        num_tokens = hidden_states.shape[0]
        offsets = torch.arange(num_tokens, device=hidden_states.device, dtype=positions.dtype)
        is_real = (positions - positions[0]) == offsets
        real_f32 = is_real.to(torch.float32).unsqueeze(-1)
        qkv, z, beta, g = self._project(hidden_states)
        qkv = qkv * real_f32.to(qkv.dtype)
        mixed = F.silu(self._causal_conv(qkv, num_tokens))
        q, k, v = self._split_heads(mixed, (num_tokens,))
        beta = beta * real_f32
        g = g * real_f32

        def to_bht(x):
            return x.unsqueeze(0).transpose(1, 2).float()

        initial_state = torch.zeros(1, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=torch.float32)
        core, final_state = chunk_gated_delta_rule(l2norm(to_bht(q)), l2norm(to_bht(k)), to_bht(v),
                                                   g.unsqueeze(0).transpose(1, 2), beta.unsqueeze(0).transpose(1, 2),
                                                   initial_state)
        core = core.squeeze(0).transpose(0, 1)
        new_conv_state = self._tail_rows(qkv, is_real, self.conv_kernel_size - 1)
        _, write_idx = self.state_indices(metadata, 1)
        self._write_states(write_idx, new_conv_state.unsqueeze(0), final_state)
        output = self._output(core, z, num_tokens)
        if self.world_size > 1:
            self.tp_group.all_reduce(output)
        return output.contiguous()

    def forward_decode(self, hidden_states, metadata):
        num_reqs = metadata["block_table_tensor"].shape[0]
        num_tokens = hidden_states.shape[0]
        if num_tokens != num_reqs:
            raise NotImplementedError(f"DeltaNet decode expects one token per request, got {num_tokens} tokens for "
                                      f"{num_reqs} requests")
        qkv, z, beta, g = self._project(hidden_states)
        read_idx, write_idx = self.state_indices(metadata, num_reqs)
        conv_prev, state = self._read_states(read_idx)
        conv_prev = conv_prev.to(qkv.dtype)
        w = self.conv1d_weight
        last = self.conv_kernel_size - 1
        mixed = conv_prev[:, 0] * w[:, 0]
        for tap in range(1, last):
            mixed = mixed + conv_prev[:, tap] * w[:, tap]
        mixed = F.silu(mixed + qkv * w[:, last])
        q, k, v = self._split_heads(mixed, (num_reqs,))
        core, new_state = recurrent_gated_delta_rule_step(l2norm(q.float()), l2norm(k.float()), v.float(), g, beta,
                                                          state)
        self._write_states(write_idx, torch.cat([conv_prev[:, 1:], qkv.unsqueeze(1)], dim=1), new_state)
        output = self._output(core, z, num_reqs)
        if self.world_size > 1:
            self.tp_group.all_reduce(output)
        return output
