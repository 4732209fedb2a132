"""Stand-in for vllm_neuron/model/qwen3_moe/model_bf16.py (@5f54272): Qwen3MoeExperts with the plugin's
parameter names and layouts (gate_up_proj_weight [E_local, H, 2 I_r] = [gate | up], down_proj_weight
[E_local, I_r, H], router [E, H] replicated, its own post_attention_layernorm), forward / forward_prefill /
forward_decode signatures and collectives; torch bodies in place of the vendored kernels."""
from __future__ import annotations

import torch
from torch import nn

from fake_vllm_neuron.model.qwen3_5.moe import padding_mask_of, routed_experts
from fake_vllm_neuron.parallel import get_tp_group


class Qwen3MoeRMSNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=config.torch_dtype))
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(input_dtype)


class Qwen3MoeExperts(nn.Module):
    def __init__(self, config, ep_degree=1, ep_rank=0):
        super().__init__()
        self.tp_group = get_tp_group()
        self.moe_group = self.tp_group
        self.ep_degree, self.ep_rank = ep_degree, ep_rank
        self.ep_enabled = ep_degree > 1
        self.tp_degree = self.tp_group.world_size // ep_degree
        self.dp_size = 1
        self.cross_dp_ep = False
        self.total_num_experts = config.num_experts
        self.num_local_experts = config.num_experts // ep_degree
        self.num_experts_per_token = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.moe_intermediate_size
        self.rms_norm_eps = config.rms_norm_eps
        self.intermediate_size_per_rank = self.intermediate_size // self.tp_degree
        self.block_size = 256
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config)
        self.router_weight = nn.Parameter(torch.empty(self.total_num_experts, self.hidden_size, dtype=torch.bfloat16))
        self.gate_up_proj_weight = nn.Parameter(torch.empty(self.num_local_experts, self.hidden_size,
                                                            self.intermediate_size_per_rank * 2,
                                                            dtype=config.torch_dtype))
        self.down_proj_weight = nn.Parameter(torch.empty(self.num_local_experts, self.intermediate_size_per_rank,
                                                         self.hidden_size, dtype=config.torch_dtype))

    def forward(self, hidden_states, positions, is_decode, rank):
        if is_decode:
            return self.forward_decode(hidden_states, rank)
        return self.forward_prefill(hidden_states, positions, rank)

    def _experts(self, normed, padding_mask=None):
        gate_up = self.gate_up_proj_weight.reshape(self.num_local_experts, self.hidden_size, 2,
                                                   self.intermediate_size_per_rank)
        return routed_experts(normed, self.router_weight, gate_up, self.down_proj_weight, self.num_experts_per_token,
                              self.ep_rank * self.num_local_experts, padding_mask)

    def forward_decode(self, hidden_states, rank):
        output = self._experts(self.post_attention_layernorm(hidden_states))
        if self.moe_group.world_size > 1:
            output = self.moe_group.all_reduce(output)
        return output

    def forward_prefill(self, hidden_states, positions, rank):
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.tp_group.world_size > 1:
            hidden_states = self.tp_group.all_gather(hidden_states, dim=0)
        output = self._experts(hidden_states, padding_mask_of(positions, hidden_states.shape[0]))
        if self.moe_group.world_size > 1:
            output = self.moe_group.reduce_scatter(output, dim=0)
        return output


class Qwen3MoeMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = Qwen3MoeExperts(config)
        self.dtype = config.torch_dtype

    def forward(self, hidden_states, positions, is_decode, rank):
        return self.experts(hidden_states.to(self.dtype), positions=positions, is_decode=is_decode, rank=rank)


class Qwen3MoeForCausalLM(nn.Module):
    """Only the MLP stack (enough for the registry and apply() discovery)."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([Qwen3MoeMLP(config)])
