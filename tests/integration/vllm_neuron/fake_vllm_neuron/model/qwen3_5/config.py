"""Qwen3_5TextConfig fields the layers read (sizes set by the tests)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MoeConfig:
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    norm_topk_prob: bool = True


@dataclass
class Qwen3_5TextConfig:
    hidden_size: int = 128
    rms_norm_eps: float = 1e-6
    torch_dtype: torch.dtype = torch.bfloat16
    ssm_dtype: torch.dtype = torch.float32
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    head_dim: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rotary_dim: int = 64
    rope_theta: float = 10_000_000.0
    layer_types: list = field(default_factory=lambda: ["linear_attention", "full_attention"])
    is_moe: bool = True
    moe: MoeConfig = field(default_factory=MoeConfig)
    vocab_size: int = 64

    @property
    def num_hidden_layers(self):
        return len(self.layer_types)
