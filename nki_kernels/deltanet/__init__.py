"""Gated DeltaNet family: chunked prefill (also fused with its conv front end), decode step, causal conv1d (+ SiLU)."""
from .chunk import gated_delta_rule
from .conv1d import causal_conv1d, causal_conv1d_update
from .fused import gated_delta_rule_fused
from .recurrent import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_fused", "gated_delta_rule_step", "causal_conv1d",
           "causal_conv1d_update"]
