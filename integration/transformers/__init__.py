"""Drop-in use of nki-kernels from HuggingFace transformers (Qwen3.5-MoE, Qwen3.5, Qwen3-Next, Qwen3-Omni).

    from integration.transformers import patch
    handle = patch(model, backend="emulator")   # attention, gated DeltaNet, MoE, Omni code predictor
    ...; handle.restore()                        # or: with patch(model): ...

See docs/integration.md ("transformers") for what each hook replaces and its fallbacks.
"""
from .patch import KERNEL_FAMILIES, SUPPORTED_FAMILIES, PatchHandle, patch

__all__ = ["KERNEL_FAMILIES", "SUPPORTED_FAMILIES", "PatchHandle", "patch"]
