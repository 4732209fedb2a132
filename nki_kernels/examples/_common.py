"""Trace-time helpers shared by the example kernels (plain Python, no NKI calls)."""
from __future__ import annotations

# Bytes per element of the float dtypes the examples accept. Looked up by name because NKI releases expose
# tensor dtypes either as NumPy/ml_dtypes objects or as strings.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(dtype) -> int:
    """Bytes per element of `dtype` (a NumPy/ml_dtypes dtype, an NKI dtype or its name)."""
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "").replace("nl.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"examples: unsupported dtype {dtype!r}; supported: {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]
