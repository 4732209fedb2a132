"""Input validation for host wrappers: one error type, messages that name the argument and the limit.

Every public wrapper validates all of its inputs with these helpers before any emulator or torch work,
so a bad input ends in a `KernelInputError` (a ValueError and a TypeError) whose message reads
``"<kernel>: <arg> <rule>, got <what it got>"``. Use them like this::

    from ..validation import (FLOAT_DTYPES, check_array, check_bool, check_float, check_int, index_array,
                              kernel_check)

    def my_kernel(x, lengths=None, scale=None, top_k=50, causal=True, lnc=None):
        name = "my_kernel"
        x = check_array(name, "x", x, ndim=3, dtypes=FLOAT_DTYPES)          # B, T, H
        lengths = index_array(name, "lengths", lengths, shape=(x.shape[0],), lo=0, hi=x.shape[1])
        scale = check_float(name, "scale", scale, default=x.shape[-1] ** -0.5, positive=True)
        top_k = check_int(name, "top_k", top_k, lo=1)
        causal = check_bool(name, "causal", causal)

Project-wide rules these helpers implement (docs/inputs.md):

* arrays are NumPy arrays or torch tensors; lists, tuples and scalars are refused for tensor arguments
  (integer index arguments such as lengths and ids, built with `index_array`, also take lists);
* a zero-size dimension (B=0, T=0, ...) is refused: no kernel launches on empty inputs;
* dtypes are checked against the kernel's list; float64 (NumPy's default) is refused with a message that
  names the accepted dtypes, never cast silently;
* torch tensors must be CPU tensors on the emulator (meta / CUDA tensors are refused), and the kernels are
  forward-only: a tensor that requires grad while grad mode is on is refused (use torch.no_grad());
* numbers: NumPy scalars are accepted wherever a Python number is; strings, bools (for numbers) and
  non-finite values are refused; integer arguments given as floats (8.0, 7.9) are refused;
* integer indices must fit int32 (the kernels' index dtype) and are returned as int32 NumPy arrays.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


class KernelInputError(ValueError, TypeError):
    """Raised by a kernel's host wrapper for inputs it does not support (bad value or bad type)."""


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def kernel_check(cond, message: str):
    """Raise KernelInputError(message) unless cond. Message style: "<kernel>: <rule>, got x=<v>"."""
    if not cond:
        raise KernelInputError(message)


def _torch():
    try:
        import torch
        return torch
    except ImportError:  # pragma: no cover
        return None


def is_torch(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x) -> str:
    """'bfloat16', 'float32', 'int64', ... for NumPy arrays and torch tensors alike."""
    return str(x.dtype).replace("torch.", "")


INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def is_int_dtype(x) -> bool:
    """x (a NumPy array or a torch tensor, fake tensors included: only the dtype is read) holds integers."""
    return dtype_name(x) in INT_DTYPES


def describe(x) -> str:
    """A short description of a value for error messages (type, and shape/dtype for arrays)."""
    if isinstance(x, np.ndarray) or is_torch(x):
        kind = "torch tensor" if is_torch(x) else "NumPy array"
        return f"a {kind} of shape {tuple(int(s) for s in x.shape)} and dtype {dtype_name(x)}"
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_same_kind(kernel: str, arrays: dict):
    """The arrays ({argument name: array}; None entries skipped) are all NumPy arrays or all torch tensors: a mix
    has "different" dtypes that print alike (torch.float32 vs float32), which a dtype check would report
    confusingly, and which kind comes back would depend on the mix."""
    kinds = {arg: ("torch tensor" if is_torch(x) else "NumPy array") for arg, x in arrays.items() if x is not None}
    kernel_check(len(set(kinds.values())) <= 1,
                 f"{kernel}: {', '.join(kinds)} must be all NumPy arrays or all torch tensors, got "
                 + ", ".join(f"{arg} a {kind}" for arg, kind in kinds.items()))


def check_forward_only(kernel: str, arg: str, x):
    """Refuse a torch tensor that requires grad while grad mode is on: the kernels have no backward."""
    torch = _torch()
    if is_torch(x) and x.requires_grad and torch.is_grad_enabled():
        raise KernelInputError(f"{kernel}: the kernels are forward-only (no backward), but {arg} requires grad "
                               f"while grad mode is enabled; call under torch.no_grad() or "
                               f"torch.inference_mode(), or pass {arg}.detach()")


def check_array(kernel: str, arg: str, x, *, ndim: int | None = None, dtypes=FLOAT_DTYPES,
                shape: tuple | None = None, allow_empty: bool = False):
    """Check a tensor argument and return it unchanged.

    x must be a NumPy array or a CPU torch tensor (not a list, not a meta / device tensor, not requiring
    grad under grad mode) with `ndim` dims, dtype name in `dtypes` (None: any), the given `shape` (entries
    None match anything) and, unless allow_empty, no zero-size dimension."""
    if not (isinstance(x, np.ndarray) or is_torch(x)):
        raise KernelInputError(f"{kernel}: {arg} must be a NumPy array or a torch CPU tensor, got {describe(x)}")
    if is_torch(x):
        if x.device.type != "cpu":
            from . import backend
            if backend.is_emulated() or x.device.type == "meta":
                raise KernelInputError(f"{kernel}: {arg} must be a CPU tensor (kernels run on the NumPy emulator "
                                       f"here; meta tensors hold no data), got a tensor on {x.device}")
        check_forward_only(kernel, arg, x)
    elif x.dtype.kind in "OUS":                   # object or string arrays (ml_dtypes bf16 is kind "V")
        raise KernelInputError(f"{kernel}: {arg} must hold numbers, got a NumPy array of dtype {x.dtype}")
    got_shape = tuple(int(s) for s in x.shape)
    if ndim is not None and len(got_shape) != ndim:
        raise KernelInputError(f"{kernel}: {arg} must be {ndim}-D, got {arg}.shape={got_shape}")
    if shape is not None:
        want = tuple(shape)
        if len(want) != len(got_shape) or any(w is not None and w != g for w, g in zip(want, got_shape)):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
            raise KernelInputError(f"{kernel}: {arg} must have shape {shown}, got {arg}.shape={got_shape}")
    if not allow_empty and 0 in got_shape:
        raise KernelInputError(f"{kernel}: {arg} must not be empty (every dimension >= 1; no kernel launches on "
                               f"empty inputs), got {arg}.shape={got_shape}")
    if dtypes is not None and dtype_name(x) not in tuple(dtypes):
        hint = " (NumPy's default float64: convert with .astype(np.float32))" if dtype_name(x) == "float64" else ""
        raise KernelInputError(f"{kernel}: {arg} dtype must be one of {tuple(dtypes)}{hint}, got "
                               f"{arg}.dtype={dtype_name(x)}")
    return x


def index_array(kernel: str, arg: str, x, *, shape: tuple | None = None, lo: int | None = None,
                hi: int | None = None, allow_none: bool = True):
    """Integer indices (lengths, ids, slots) as an int32 NumPy array, or None when x is None and allow_none.

    Takes a list / tuple / NumPy array / torch tensor of integers of any integer dtype. Floats (even 8.0),
    bools and values outside [lo, hi] (inclusive; default: the int32 range) are refused."""
    if x is None:
        kernel_check(allow_none, f"{kernel}: {arg} is required, got None")
        return None
    if is_torch(x):
        kernel_check(x.device.type != "meta", f"{kernel}: {arg} must hold values (host-checked indices), got a "
                     f"meta tensor")
        arr = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple, np.ndarray, numbers.Integral)):
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError):
            raise KernelInputError(f"{kernel}: {arg} must be integers, got {describe(x)}") from None
    else:
        raise KernelInputError(f"{kernel}: {arg} must be integers (list, NumPy array or torch tensor), got "
                               f"{describe(x)}")
    if arr.dtype.kind not in "iu":
        raise KernelInputError(f"{kernel}: {arg} must be integers (floats such as 7.9 or 8.0 are refused, not "
                               f"truncated), got dtype {arr.dtype}: {_head(arr)}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise KernelInputError(f"{kernel}: {arg} must have shape {tuple(shape)}, got shape {tuple(arr.shape)}")
    lo_ = INT32_MIN if lo is None else lo
    hi_ = INT32_MAX if hi is None else hi
    if arr.size and (int(arr.min()) < lo_ or int(arr.max()) > hi_):
        raise KernelInputError(f"{kernel}: {arg} must be in [{lo_}, {hi_}], got {_head(arr)}")
    return arr.astype(np.int32)


def check_host_values(kernel: str, arg: str, x):
    """For arguments whose values the wrapper reads on the host (ids, lengths, mappings): refuse a meta tensor
    (it holds no values) and a torch tensor on another device than the CPU on the emulator. Returns x."""
    if is_torch(x) and x.device.type != "cpu":
        from . import backend
        if backend.is_emulated() or x.device.type == "meta":
            raise KernelInputError(f"{kernel}: {arg} is read on the host, so it must be a CPU tensor or array with "
                                   f"values, got a tensor on {x.device}")
    return x


def _head(arr, n: int = 8) -> str:
    flat = np.asarray(arr).reshape(-1)
    text = str(flat[:n].tolist())
    return text[:-1] + ", ...]" if flat.size > n else text


def _is_real_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_float(kernel: str, arg: str, v, *, default=None, lo: float | None = None, hi: float | None = None,
                positive: bool = False) -> float:
    """A float argument as a Python float: int, float, NumPy scalar or 0-d array; None gives `default`.

    Strings, bools, NaN and infinities are refused; lo / hi are inclusive bounds, positive means > 0."""
    if v is None and default is not None:
        return float(default)
    if isinstance(v, np.ndarray) and v.ndim == 0 or is_torch(v) and v.ndim == 0:
        v = v.item()
    if not _is_real_number(v):
        raise KernelInputError(f"{kernel}: {arg} must be a real number (Python or NumPy scalar), got {describe(v)}")
    f = float(v)
    kernel_check(math.isfinite(f), f"{kernel}: {arg} must be finite, got {arg}={f}")
    kernel_check(not positive or f > 0, f"{kernel}: {arg} must be > 0, got {arg}={f}")
    kernel_check(lo is None or f >= lo, f"{kernel}: {arg} must be >= {lo}, got {arg}={f}")
    kernel_check(hi is None or f <= hi, f"{kernel}: {arg} must be <= {hi}, got {arg}={f}")
    return f


def check_int(kernel: str, arg: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument as a Python int: int or NumPy integer (floats, even 8.0, bools and strings refused)."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)):
        raise KernelInputError(f"{kernel}: {arg} must be an integer, got {describe(v)}")
    i = int(v)
    kernel_check(lo is None or i >= lo, f"{kernel}: {arg} must be >= {lo}, got {arg}={i}")
    kernel_check(hi is None or i <= hi, f"{kernel}: {arg} must be <= {hi}, got {arg}={i}")
    return i


def check_bool(kernel: str, arg: str, v) -> bool:
    """A flag: Python bool or NumPy bool (0/1 and strings refused: a typo'd flag must not pass silently)."""
    if not isinstance(v, (bool, np.bool_)):
        raise KernelInputError(f"{kernel}: {arg} must be True or False, got {describe(v)}")
    return bool(v)


def check_choice(kernel: str, arg: str, v, choices):
    """v must be one of `choices` (compared with ==; strings, None, ...)."""
    choices = tuple(choices)
    if not any(v is c or (type(v) is type(c) and v == c) for c in choices):
        raise KernelInputError(f"{kernel}: {arg} must be one of {choices}, got {describe(v)}")
    return v
