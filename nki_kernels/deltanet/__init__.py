"""Gated DeltaNet family: chunked prefill, batched decode step, causal depthwise conv1d (+ SiLU)."""
from .chunk import gated_delta_rule
from .conv1d import causal_conv1d, causal_conv1d_update
from .recurrent import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "causal_conv1d", "causal_conv1d_update"]
