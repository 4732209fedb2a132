"""Virtual registers (`nisa.VirtualRegister`, `register_alloc / move / load / store`), as in NKI 0.7.

A register holds one 32-bit integer on the engine sequencers. Kernels use it as a bound of `nl.fori_loop`, the
condition of `nl.while_loop`, or the `scalar_offset` of an access pattern (`t.ap(..., scalar_offset=reg)`); the
induction value a register-bounded `fori_loop` passes its body is a register too.

Its value is known only on the device. As under the real tracer, Python cannot read it: `bool(reg)`, `int(reg)`,
`range(reg)` or `if reg:` raise TypeError, so a kernel's instruction stream cannot branch on a register's value
in Python; only a compiled loop's trip count or a DMA address depends on it. The emulator keeps the value to run
the kernel (loops iterate that many times, DMAs resolve the offset).

Trace and cost: `register_load` and `register_store` read / write a one-element SBUF or HBM tensor; they are
recorded as GpSimd instructions (a sequencer access to memory, ordered after the tile's producer), so a loop
whose bound comes from data waits for that data. `register_alloc` / `register_move` touch no memory and are not
traced.
"""
from __future__ import annotations

import numpy as np

from . import dtypes as _dt
from .errors import fail
from .tensor import Tensor

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class VirtualRegister:
    """A virtual register on the engine sequencers: one 32-bit integer known only on the device."""

    def __init__(self, state=None, frozen=False):
        self._value = None if state is None else _int32("VirtualRegister", "state", state)
        self._frozen = bool(frozen)

    def _get(self) -> int:
        if self._value is None:
            fail("VirtualRegister", None, "read before any value was written (register_alloc() without x, and no "
                 "register_move / register_load since)")
        return self._value

    def _set(self, value, who):
        if self._frozen:
            fail(who, "dst", "is a loop's induction register (read-only: writing it has no effect on the loop)")
        self._value = _int32(who, "src", value)

    def _opaque(self, *_):
        raise TypeError("a VirtualRegister's value is known only on the device: use it as an nl.fori_loop bound, "
                        "an nl.while_loop condition or an .ap(scalar_offset=...), not in Python control flow, "
                        "int() or range()")

    __bool__ = __int__ = __index__ = __float__ = __iter__ = _opaque
    __lt__ = __le__ = __gt__ = __ge__ = _opaque

    def __repr__(self):
        return "VirtualRegister(<device value>)"


def _int32(who, role, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        fail(who, role, f"must be an int, got {value!r}")
    v = int(value)
    if not _INT32_MIN <= v <= _INT32_MAX:
        fail(who, role, f"{v} does not fit a 32-bit register")
    return v


def _register(who, role, r) -> VirtualRegister:
    if not isinstance(r, VirtualRegister):
        fail(who, role, f"must be a VirtualRegister (from nisa.register_alloc), got {type(r).__name__}")
    return r


def _one_element(who, role, t) -> Tensor:
    if not isinstance(t, Tensor):
        fail(who, role, f"must be an NKI tensor with exactly one element, got {type(t).__name__}")
    if t.size != 1:
        fail(who, role, f"must have exactly one element (shape [1] or [1, 1]), got shape {t.shape}")
    if t.buffer.kind == "psum":
        fail(who, role, "is in PSUM; registers load from and store to SBUF or HBM")
    if not _dt.is_int(t.dtype):
        fail(who, role, f"must be an integer tensor (a register holds a 32-bit integer), got {_dt.name(t.dtype)}")
    return t


def register_alloc(x=None):
    """A new virtual register, uninitialised (x=None) or holding the integer x."""
    return VirtualRegister(x)


def register_move(dst, src):
    """dst := src (a compile-time int or another register). Touches no memory (not traced)."""
    _register("register_move", "dst", dst)
    value = _register("register_move", "src", src)._get() if isinstance(src, VirtualRegister) else src
    dst._set(value, "register_move")


def register_load(dst, src):
    """dst := the one integer element of `src` (SBUF or HBM). Traced as a GpSimd instruction reading `src`."""
    from .isa import POOL, _record
    _register("register_load", "dst", dst)
    _one_element("register_load", "src", src)
    dst._set(int(np.asarray(src._get(who="register_load")).reshape(-1)[0]), "register_load")
    _record("register_load", POOL, [src], [], register=True)


def register_store(dst, src):
    """dst (one integer element, SBUF or HBM) := the register's value. Traced as a GpSimd instruction."""
    from .isa import POOL, _record, _write
    _one_element("register_store", "dst", dst)
    value = _register("register_store", "src", src)._get()
    _write(dst, np.full(dst.shape, value), who="register_store")
    _record("register_store", POOL, [], [dst], register=True)
