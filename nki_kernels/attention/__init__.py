"""Flash attention for head_dim up to 256: `flash_attention` (prefill), `flash_attention_decode` (decode) and
`flash_attention_varlen` (packed sequences).

Submodules are imported on demand (``nki_kernels.attention.prefill`` / ``.decode``); see
KERNELS.md ("Attention").
"""
__all__ = ["flash_attention", "flash_attention_decode", "flash_attention_varlen"]


def __getattr__(name):
    if name == "flash_attention":
        from .prefill import flash_attention
        return flash_attention
    if name == "flash_attention_decode":
        from .decode import flash_attention_decode
        return flash_attention_decode
    if name == "flash_attention_varlen":
        from .varlen import flash_attention_varlen
        return flash_attention_varlen
    raise AttributeError(f"module 'nki_kernels.attention' has no attribute {name!r}")
