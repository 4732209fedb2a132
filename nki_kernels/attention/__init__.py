"""Flash attention for head_dim up to 256: `flash_attention` (prefill) and `flash_attention_decode` (decode).

Submodules are imported on demand (``nki_kernels.attention.prefill`` / ``.decode``); see
KERNELS.md ("Attention").
"""
__all__ = ["flash_attention", "flash_attention_decode"]


def __getattr__(name):
    if name == "flash_attention":
        from .prefill import flash_attention
        return flash_attention
    if name == "flash_attention_decode":
        from .decode import flash_attention_decode
        return flash_attention_decode
    raise AttributeError(f"module 'nki_kernels.attention' has no attribute {name!r}")
