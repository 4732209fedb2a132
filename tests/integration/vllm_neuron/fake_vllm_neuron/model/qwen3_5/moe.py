"""Stand-in for vllm_neuron/model/qwen3_5/moe.py (whn09/vllm-neuron @3de9ea3): Qwen3_5SparseMoeBlock with the
plugin's parameter names and per-rank layouts (routed experts [E_local, H, 2, I_r] / [E_local, I_r, H], router
[E, H], shared expert [H, S_r] / [S_r, H] and its gate [1, H]), signatures and _combine; torch bodies in place of
the vendored moe_cte / moe_block_tkg kernels (same math: softmax over all experts, top-k, L1 renormalise,
POST_SCALE, SiLU GLU, shared expert scaled by sigmoid(x @ gate^T))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fake_vllm_neuron.parallel import get_tp_group

from .config import Qwen3_5TextConfig
from .flags import SEQUENCE_PARALLEL

BLOCK_SIZE = 128


def padding_mask_of(positions, num_tokens):
    """True = real token: the plugin pads a prefill bucket by repeating the last real position."""
    if positions is None or positions.dim() != 1 or positions.shape[0] != num_tokens:
        return None
    return torch.arange(num_tokens) <= torch.argmax(positions)


def routed_experts(x, router_weight, gate_up, down, top_k, expert_offset, padding_mask=None):
    """Routed-expert output of this rank's experts (global ids expert_offset .. + E_local - 1), fp32 accumulate;
    padding tokens (padding_mask False) are in no block, so they get no routed output."""
    probs = torch.softmax(x.float() @ router_weight.float().T, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    if padding_mask is not None:
        top_i = torch.where(padding_mask[:, None], top_i, torch.full_like(top_i, -1))
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for e in range(gate_up.shape[0]):
        hit = top_i == e + expert_offset
        rows = hit.any(-1)
        if not rows.any():
            continue
        w = (top_w * hit).sum(-1)[rows]
        h = x[rows].float()
        gate = h @ gate_up[e, :, 0].float()
        up = h @ gate_up[e, :, 1].float()
        out[rows] += w[:, None] * ((F.silu(gate) * up).to(x.dtype).float() @ down[e].float())
    return out.to(x.dtype)


class Qwen3_5SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig, ep_degree=1, ep_rank=0):
        super().__init__()
        moe = config.moe
        self.dtype = config.torch_dtype
        self.eps = config.rms_norm_eps
        self.tp_group = get_tp_group()
        self.world_size = self.tp_group.world_size
        self.hidden_size = config.hidden_size
        self.num_experts = moe.num_experts
        self.top_k = moe.num_experts_per_tok
        self.intermediate_size = moe.moe_intermediate_size
        self.ep_degree, self.ep_rank = ep_degree, ep_rank
        self.ep_tp_group = self.tp_group
        self.tp_degree = self.world_size // ep_degree
        self.num_local_experts = self.num_experts // ep_degree
        self.inter_per_rank = self.intermediate_size // self.tp_degree
        self.shared_per_rank = moe.shared_expert_intermediate_size // self.world_size
        h, i_r, s_r = self.hidden_size, self.inter_per_rank, self.shared_per_rank
        self.experts_gate_up_weight = nn.Parameter(torch.empty(self.num_local_experts, h, 2, i_r, dtype=self.dtype))
        self.experts_down_weight = nn.Parameter(torch.empty(self.num_local_experts, i_r, h, dtype=self.dtype))
        self.router_weight = nn.Parameter(torch.empty(self.num_experts, h, dtype=self.dtype))
        self.shared_gate_proj_weight = nn.Parameter(torch.empty(h, s_r, dtype=self.dtype))
        self.shared_up_proj_weight = nn.Parameter(torch.empty(h, s_r, dtype=self.dtype))
        self.shared_down_proj_weight = nn.Parameter(torch.empty(s_r, h, dtype=self.dtype))
        self.shared_expert_gate_weight = nn.Parameter(torch.empty(1, h, dtype=self.dtype))

    def _shared_expert(self, normed):
        out = (F.silu(normed @ self.shared_gate_proj_weight) * (normed @ self.shared_up_proj_weight)) \
            @ self.shared_down_proj_weight
        gate = normed @ self.shared_expert_gate_weight.transpose(0, 1)
        return out * torch.sigmoid(gate.float()).to(out.dtype)

    def _combine(self, out, is_prefill):
        if self.world_size == 1:
            return out
        if is_prefill and SEQUENCE_PARALLEL:
            return self.tp_group.reduce_scatter(out, dim=0).contiguous()
        return self.tp_group.all_reduce(out)

    def forward(self, hidden_states, is_prefill, norm, positions=None, rank=None):
        hidden_states = hidden_states.to(self.dtype)
        if is_prefill:
            return self.forward_prefill(hidden_states, norm, positions, rank)
        gamma = (1.0 + norm.weight.float()).unsqueeze(0)
        return self.forward_decode(hidden_states, norm, gamma, rank)

    def forward_prefill(self, hidden_states, norm, positions, rank):
        normed = norm(hidden_states)
        out = routed_experts(normed, self.router_weight, self.experts_gate_up_weight, self.experts_down_weight,
                             self.top_k, self.ep_rank * self.num_local_experts,
                             padding_mask_of(positions, normed.shape[0]))
        out = out + self._shared_expert(normed)
        return self._combine(out, is_prefill=True)

    def forward_decode(self, hidden_states, norm, gamma, rank):
        # the vendored kernel fuses the norm with gamma = 1 + weight: the same normalisation as norm()
        x = hidden_states.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gamma).to(hidden_states.dtype)
        out = routed_experts(normed, self.router_weight, self.experts_gate_up_weight, self.experts_down_weight,
                             self.top_k, self.ep_rank * self.num_local_experts)
        out = out + self._shared_expert(norm(hidden_states))
        return self._combine(out, is_prefill=False)
