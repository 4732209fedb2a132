"""nki-kernels: NKI kernels for the newest Qwen models on AWS Trainium.

Public entry points (host wrappers taking NumPy arrays or torch CPU tensors) are loaded lazily, so
importing the package stays cheap. Kernels run on real NKI when it is installed, else on the bundled
NumPy emulator (see `nki_kernels.backend`).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # examples proving the emulator
    "tiled_matmul": "nki_kernels.examples.matmul",
    "softmax": "nki_kernels.examples.softmax",
    "rmsnorm": "nki_kernels.examples.rmsnorm",
    # attention
    "flash_attention": "nki_kernels.attention.prefill",
    "flash_attention_decode": "nki_kernels.attention.decode",
    "flash_attention_varlen": "nki_kernels.attention.varlen",
    # gated DeltaNet
    "gated_delta_rule": "nki_kernels.deltanet.chunk",
    "gated_delta_rule_step": "nki_kernels.deltanet.recurrent",
    "causal_conv1d": "nki_kernels.deltanet.conv1d",
    "causal_conv1d_update": "nki_kernels.deltanet.conv1d",
    # MoE
    "moe_route": "nki_kernels.moe.routing",
    "moe_block_mapping": "nki_kernels.moe.routing",
    "moe_blockwise": "nki_kernels.moe.blockwise",
    "moe_decode": "nki_kernels.moe.decode",
    # code predictor
    "code_predictor": "nki_kernels.codepredictor.unrolled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nki_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
