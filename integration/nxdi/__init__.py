"""nki-kernels inside NeuronX Distributed Inference (NxDI): drop-in adapters and `apply()`.

Usage on a Trainium host (see docs/integration.md ("NxDI: usage and contracts"))::

    from integration.nxdi import apply
    apply()                                   # NxDI's own classes (attention prefill, NxD blockwise MoE)
    apply(modeling_qwen35, kernels=["attention", "deltanet", "moe"])   # a contrib's modeling module
    app = NeuronQwen35ForCausalLM(model_path, config); app.compile(out_dir)

Each adapter keeps NxDI's exact method name, argument order, layouts, dtypes and return convention and
defers to the method it replaced for inputs outside the kernel's limits. Importing this package never
imports NxDI; ``NKI_KERNELS_NXDI_DISABLE=1`` turns every installed adapter back into the original.
"""
from __future__ import annotations

from ._common import DISABLE_ENV, AdapterInputError, KernelNotAvailableError, fallbacks
from .apply import FAMILIES, Installation, NxDIAdapterError, apply
from .attention import FlashAttentionStrategy, perform_prefill
from .code_predictor import code_predictor_forward, set_code_predictor_replica_group, set_code_predictor_sampling
from .deltanet import chunked_forward as deltanet_chunked_forward
from .deltanet import recurrent_step as deltanet_recurrent_step
from .moe import BLOCKWISE_AUTOGRAD_CLS_SPEC, BlockwiseMatmulNKIKernelsFunc, blockwise_matmul_config_kwargs


def nxdi_available() -> bool:
    """True when the real neuronx_distributed_inference package is importable (not the PyPI placeholder)."""
    try:
        import neuronx_distributed_inference.modules.attention.attention_base  # noqa: F401
        return True
    except Exception:
        return False


__all__ = [
    "apply", "Installation", "NxDIAdapterError", "FAMILIES", "DISABLE_ENV", "AdapterInputError",
    "KernelNotAvailableError", "FlashAttentionStrategy", "perform_prefill", "deltanet_chunked_forward",
    "deltanet_recurrent_step", "BlockwiseMatmulNKIKernelsFunc", "BLOCKWISE_AUTOGRAD_CLS_SPEC",
    "blockwise_matmul_config_kwargs", "code_predictor_forward", "set_code_predictor_sampling",
    "set_code_predictor_replica_group", "nxdi_available", "fallbacks",
]
