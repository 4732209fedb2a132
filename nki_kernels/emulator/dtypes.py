"""NKI dtypes as NumPy dtypes (bfloat16 and float8 through ml_dtypes) and device-like casting."""
from __future__ import annotations

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
int8, int16, int32 = np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)
uint8, uint16, uint32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)
bool_ = np.dtype(np.bool_)

ALL = {
    "bfloat16": bfloat16, "float16": float16, "float32": float32,
    "float8_e4m3": float8_e4m3, "float8_e4m3fn": float8_e4m3fn, "float8_e5m2": float8_e5m2,
    "int8": int8, "int16": int16, "int32": int32, "uint8": uint8, "uint16": uint16,
    "uint32": uint32, "bool_": bool_, "bool": bool_,
}
_NAMES = {v: k for k, v in ALL.items() if k != "bool"}


def normalize(dtype) -> np.dtype:
    """Accept NKI dtype objects, NumPy/ml_dtypes dtypes, or their names."""
    if isinstance(dtype, str):
        if dtype not in ALL:
            raise TypeError(f"unsupported dtype {dtype!r}; supported: {sorted(ALL)}")
        return ALL[dtype]
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise TypeError(f"unsupported dtype {dt}; supported: {sorted(ALL)}")
    return dt


def name(dtype) -> str:
    return _NAMES[np.dtype(dtype)]


def is_float(dtype) -> bool:
    return np.dtype(dtype) in (bfloat16, float16, float32, float8_e4m3, float8_e4m3fn, float8_e5m2)


def is_int(dtype) -> bool:
    return np.dtype(dtype).kind in "iu"


def fill_value(dtype):
    """What freshly allocated memory holds: NaN for floats, a sentinel for integers, True for bool.

    The integer sentinel (the dtype's most negative value, or all-ones when unsigned) makes reads of
    unwritten integer memory stand out just as NaN does for floats.
    """
    dt = np.dtype(dtype)
    if is_float(dt):
        return np.nan
    if dt == bool_:
        return True
    info = np.iinfo(dt)
    return info.min if dt.kind == "i" else info.max


def cast(values, dtype) -> np.ndarray:
    """Round `values` to `dtype` the way the device writes them.

    Floats round to nearest even (ml_dtypes for bf16/fp8). Float to integer rounds to nearest even and
    saturates, NaN becomes 0 (simulator 0.6 behaviour); bool stores nonzero as True.
    """
    dt = np.dtype(dtype)
    arr = np.asarray(values)
    if arr.dtype == dt:
        return arr
    if is_float(dt):
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float64)
        return arr.astype(dt)
    if dt == bool_:
        return arr.astype(np.float64) != 0
    info = np.iinfo(dt)
    if arr.dtype.kind in "iu":
        return np.clip(arr.astype(np.int64), info.min, info.max).astype(dt)
    f = np.asarray(arr, dtype=np.float64)
    f = np.where(np.isnan(f), 0.0, np.rint(f))
    return np.clip(f, info.min, info.max).astype(dt)
