"""NKI operator objects: `nl.exp`, `nl.add`, ... are both callable tile functions and `op=` values.

Every function computes in fp32 as the Vector/Scalar engines do (integer ALU ops on integer inputs run
in int64 and are cast back, as GpSimd does). Activation functions outside their documented valid
input range return NaN, standing in for the device's undefined output there.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import fail

_F32 = np.float32


def _erf(x):
    # Abramowitz & Stegun 7.1.26 refined: |error| < 1.5e-7, enough for fp32 activations.
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


def _sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _in_range(lo, hi, fn, symmetric=False):
    """Wrap fn so inputs outside [lo, hi] (or ±[lo, hi]) give NaN, as the device gives garbage."""
    def wrapped(x):
        x = np.asarray(x, dtype=np.float64)
        mag = np.abs(x) if symmetric else x
        ok = (mag >= lo) & (mag <= hi)
        with np.errstate(all="ignore"):
            y = fn(x)
        return np.where(ok, y, np.nan)
    return wrapped


_ACT = {
    "copy": lambda x: x,
    "identity": lambda x: x,
    "exp": np.exp,
    "log": _in_range(2.0 ** -64, 2.0 ** 64, np.log),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "silu": lambda x: np.asarray(x, np.float64) * _sigmoid(x),
    "gelu": lambda x: 0.5 * np.asarray(x, np.float64) * (1.0 + _erf(np.asarray(x, np.float64) / math.sqrt(2.0))),
    "gelu_apprx_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "square": np.square,
    "sqrt": _in_range(2.0 ** -116, 2.0 ** 118, np.sqrt),
    "rsqrt": _in_range(2.0 ** -87, 2.0 ** 97, lambda x: 1.0 / np.sqrt(x)),
    "reciprocal": _in_range(2.0 ** -42, 2.0 ** 42, lambda x: 1.0 / x, symmetric=True),
    "sin": _in_range(-math.pi, math.pi, np.sin),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "erf": _erf,
    "abs": np.abs,
    "negative": np.negative,
    "sign": np.sign,
}

# name -> (float function, integer function or None)
_ALU = {
    "add": (np.add, np.add),
    "subtract": (np.subtract, np.subtract),
    "multiply": (np.multiply, np.multiply),
    "maximum": (np.maximum, np.maximum),
    "minimum": (np.minimum, np.minimum),
    "power": (np.power, None),
    "equal": (np.equal, np.equal),
    "not_equal": (np.not_equal, np.not_equal),
    "greater": (np.greater, np.greater),
    "greater_equal": (np.greater_equal, np.greater_equal),
    "less": (np.less, np.less),
    "less_equal": (np.less_equal, np.less_equal),
    "logical_and": (lambda a, b: np.logical_and(a != 0, b != 0), lambda a, b: np.logical_and(a != 0, b != 0)),
    "logical_or": (lambda a, b: np.logical_or(a != 0, b != 0), lambda a, b: np.logical_or(a != 0, b != 0)),
    "logical_xor": (lambda a, b: np.logical_xor(a != 0, b != 0), lambda a, b: np.logical_xor(a != 0, b != 0)),
    "bitwise_and": (None, np.bitwise_and),
    "bitwise_or": (None, np.bitwise_or),
    "bitwise_xor": (None, np.bitwise_xor),
    "left_shift": (None, np.left_shift),
    "right_shift": (None, np.right_shift),
    "abs_max": (lambda a, b: np.maximum(np.abs(a), np.abs(b)), lambda a, b: np.maximum(np.abs(a), np.abs(b))),
}

_UNSUPPORTED = {
    "divide": "nl.divide is not supported by NKI; use nl.multiply(x, nl.reciprocal(y))",
    "mod": "nl.mod is simulation-only in NKI and not available on the device",
    "fmod": "nl.fmod is simulation-only in NKI and not available on the device",
}


class Op:
    """An NKI operator. `is_act`: valid as `nisa.activation(op=)`; `is_alu`: valid as a binary ALU op."""

    def __init__(self, name: str):
        self.name = name
        self.act_fn = _ACT.get(name)
        self.alu = _ALU.get(name)
        self.unsupported = _UNSUPPORTED.get(name)

    @property
    def is_act(self) -> bool:
        return self.act_fn is not None

    @property
    def is_alu(self) -> bool:
        return self.alu is not None

    def __repr__(self):
        return f"nl.{self.name}"

    def _tile_call(self, *args, dtype=None):
        if self.unsupported:
            fail(f"nl.{self.name}", None, self.unsupported)
        from . import language
        return language._call_op(self, *args, dtype=dtype)

    # -- numerics used by the ISA implementations
    def activate(self, x32: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(self.act_fn(x32), dtype=np.float64).astype(_F32)

    def apply(self, a, b, integer: bool = False):
        """Binary op. Float path in fp32 (comparisons give 1.0/0.0); integer path in int64."""
        if self.unsupported:
            fail(f"nl.{self.name}", None, self.unsupported)
        fn_f, fn_i = self.alu
        if integer and fn_i is not None:
            out = fn_i(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
            return out.astype(np.int64)
        if fn_f is None:
            fail(f"nl.{self.name}", None, "bitwise/shift ops need integer operands")
        with np.errstate(all="ignore"):
            out = fn_f(np.asarray(a, dtype=_F32), np.asarray(b, dtype=_F32))
        return np.asarray(out, dtype=_F32)


class UnaryOp(Op):
    """`nl.exp(x, dtype=None)` and the other one-operand tile functions (also `op=` values)."""

    def __call__(self, x, dtype=None):
        return self._tile_call(x, dtype=dtype)


class BinaryOp(Op):
    """`nl.add(x, y, dtype=None)` and the other two-operand tile functions (also `op=` values)."""

    def __call__(self, x, y, dtype=None):
        return self._tile_call(x, y, dtype=dtype)


ALL_OPS = {n: (UnaryOp(n) if n in _ACT else BinaryOp(n)) for n in list(_ACT) + list(_ALU) + list(_UNSUPPORTED)}


def get(op, instr: str, role: str = "op") -> Op:
    """Resolve an `op=` argument; NumPy functions are rejected as in NKI 0.6."""
    if isinstance(op, Op):
        if op.unsupported:
            fail(instr, role, op.unsupported)
        return op
    fail(instr, role, f"must be an nl.* operator (e.g. nl.add, nl.maximum, nl.exp), got {op!r}")
