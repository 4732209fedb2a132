"""`nki.language` emulated: tensor creation, dtypes, buffers, loops, SPMD ids and the tile-level `nl.*` API.

Tile functions (`nl.exp(x)`, `nl.add(x, y)`, `nl.matmul(...)`, ...) allocate a new SBUF (or PSUM) tile and
emit the same ISA instruction the compiler would, so they are checked and traced like `nisa.*` calls.

Every public name has the signature of NKI 0.7's `nki.language` (tests/emulator/test_api_signatures.py).
"""
from __future__ import annotations

import warnings as _warnings

import numpy as np

from . import dtypes as _dt
from . import isa as _isa
from .errors import fail as _fail
from .ops import ALL_OPS as _ALL_OPS
from .ops import Op as _Op
from .runtime import current as _current
from .runtime import loop_iteration as _loop_iteration
from .tensor import MemoryRegion, hbm, private_hbm, psum, sbuf, shared_hbm  # noqa: F401
from .tensor import Tensor as _Tensor

NkiTensor = _Tensor

# ---------------------------------------------------------------- dtypes
bfloat16 = _dt.bfloat16
float16 = _dt.float16
float32 = _dt.float32
float8_e4m3 = _dt.float8_e4m3
float8_e4m3fn = _dt.float8_e4m3fn
float8_e5m2 = _dt.float8_e5m2
int8, int16, int32 = _dt.int8, _dt.int16, _dt.int32
uint8, uint16, uint32 = _dt.uint8, _dt.uint16, _dt.uint32
bool_ = _dt.bool_

# ---------------------------------------------------------------- operators (callable and op=)
# Every NKI operator the emulator implements ("identity" is internal: NKI has no nl.identity).
globals().update({k: v for k, v in _ALL_OPS.items() if k != "identity"})
add = _ALL_OPS["add"]; subtract = _ALL_OPS["subtract"]; multiply = _ALL_OPS["multiply"]  # noqa: E702
maximum = _ALL_OPS["maximum"]; minimum = _ALL_OPS["minimum"]; equal = _ALL_OPS["equal"]  # noqa: E702
exp = _ALL_OPS["exp"]; copy = _ALL_OPS["copy"]; reciprocal = _ALL_OPS["reciprocal"]  # noqa: E702

# ---------------------------------------------------------------- tile sizes (Python ints here)


class _TileSize:
    pmax = 128
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    psum_fmax = 512
    psum_num_banks = 8
    bn_stats_fmax = 512


tile_size = _TileSize()


# ---------------------------------------------------------------- creation


def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    return _current().allocate(shape, dtype, buffer, name)


def empty_like(x, dtype=None, buffer=None, name=""):
    return ndarray(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def full(shape, fill_value, dtype, buffer=sbuf, name=""):
    t = ndarray(shape, dtype, buffer, name)
    if t.on_chip:
        _isa.memset(t, fill_value)
    else:
        t._put(np.full(t.shape, fill_value))
    return t


def zeros(shape, dtype, buffer=sbuf, name=""):
    return full(shape, 0, dtype, buffer, name)


def ones(shape, dtype, buffer=sbuf, name=""):
    return full(shape, 1, dtype, buffer, name)


def zeros_like(x, dtype=None, buffer=None, name=""):
    return zeros(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def ds(start, size):
    """A dynamic-slice helper: ``t[nl.ds(i * 128, 128)]`` is ``t[i*128 : i*128 + 128]``."""
    return slice(int(start), int(start) + int(size))


# ---------------------------------------------------------------- loops and SPMD


_warned: set = set()


def _deprecated_range(name, start, stop, step):
    """What NKI 0.7 does with the deprecated range helpers: warn (once per helper) and return Python's range."""
    if name not in _warned:
        _warned.add(name)
        _warnings.warn(f"nl.{name} is deprecated in NKI 0.7 and is Python's range: write range(...) for a loop "
                       "unrolled at trace time, or nl.fori_loop for a loop compiled to run on the device",
                       DeprecationWarning, stacklevel=3)
    if stop is None:
        start, stop = 0, start
    return range(start, stop, step)


def affine_range(start, stop=None, step=1):
    """Deprecated in NKI 0.7: Python's ``range(start, stop, step)`` (``range(0, start, step)`` when stop is
    None)."""
    return _deprecated_range("affine_range", start, stop, step)


def sequential_range(start, stop=None, step=1):
    """Deprecated in NKI 0.7: Python's ``range(start, stop, step)`` (``range(0, start, step)`` when stop is
    None)."""
    return _deprecated_range("sequential_range", start, stop, step)


def static_range(start, stop=None, step=1):
    """Deprecated in NKI 0.7: Python's ``range(start, stop, step)`` (``range(0, start, step)`` when stop is
    None)."""
    return _deprecated_range("static_range", start, stop, step)


def fori_loop(lower, upper, body_fun, step=1):
    """A loop compiled to run on the device: ``body_fun(i)`` for i in range(lower, upper, step).

    `lower` / `upper` are ints or `VirtualRegister`s (`nisa.register_alloc` / `register_load`: a trip count read
    from data on the device); `step` must be a positive int (a compile-time constant in NKI). With a register
    bound the body receives `i` as a read-only VirtualRegister (use it as an `.ap(scalar_offset=i)`), else as an
    int. The emulator runs the body once per iteration; each iteration's instructions are recorded in the trace
    with the loop's id and the iteration number (``Instr.meta["loop"]``), so the cost model charges the body per
    iteration, and the trace's ``loops`` record says which loops had register bounds (their trip counts are
    data; their body is one compiled copy, the same instructions every iteration)."""
    from .registers import VirtualRegister
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step <= 0:
        _fail("fori_loop", "step", f"must be a compile-time positive integer, got step={step!r}")
    bounds = []
    for role, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, VirtualRegister):
            bounds.append(v._get())
        elif isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            _fail("fori_loop", role, f"must be an int or a VirtualRegister, got {role}={v!r}")
        else:
            bounds.append(int(v))
    if not callable(body_fun):
        _fail("fori_loop", "body_fun", f"must be a callable taking the iteration value, got {body_fun!r}")
    dynamic = isinstance(lower, VirtualRegister) or isinstance(upper, VirtualRegister)
    with _loop_iteration("fori_loop", dynamic=dynamic) as iterate:
        for i in range(bounds[0], bounds[1], int(step)):
            with iterate():
                body_fun(VirtualRegister(i, frozen=True) if dynamic else i)


def while_loop(init, body_fun):
    """A loop compiled to run on the device: ``r = init; while r != 0: r = body_fun(r)``.

    The condition is a `VirtualRegister` in NKI (the emulator also takes an int or a (1, 1) tensor); the body
    returns the next condition. Each iteration's instructions are recorded with the loop's id and iteration
    number, as for `fori_loop`."""
    from .registers import VirtualRegister
    if not callable(body_fun):
        _fail("while_loop", "body_fun", f"must be a callable returning the next condition, got {body_fun!r}")
    r = init
    with _loop_iteration("while_loop", dynamic=isinstance(init, VirtualRegister)) as iterate:
        while _condition(r):
            with iterate():
                r = body_fun(r)


def _condition(r) -> bool:
    from .registers import VirtualRegister
    if isinstance(r, VirtualRegister):
        return r._get() != 0
    if isinstance(r, _Tensor):
        if r.size != 1:
            _fail("while_loop", "condition", f"must be a single value, got a tensor of shape {r.shape}")
        return bool(np.asarray(r._get()).reshape(-1)[0] != 0)
    if isinstance(r, (bool, int, np.integer)):
        return int(r) != 0
    _fail("while_loop", "condition", f"must be a VirtualRegister, an int or a (1, 1) tensor, got {r!r}")


def program_id(axis=0):
    if axis != 0:
        _fail("program_id", None, f"only axis 0 exists (LNC launch), got {axis}")
    return _current().pid


def num_programs(axes=0):
    if axes != 0:
        _fail("num_programs", None, f"only axis 0 exists (LNC launch), got axes={axes}")
    return _current().launch.lnc


def program_ndim():
    return 1


def device_print(print_prefix, tensor):
    print(print_prefix, tensor._get() if isinstance(tensor, _Tensor) else tensor)


# ---------------------------------------------------------------- data movement


def load(src, dtype=None):
    """A new SBUF tile holding src (HBM)."""
    if not isinstance(src, _Tensor) or src.buffer.kind != "hbm":
        _fail("load", "src", "must be a tensor in HBM")
    out = ndarray(src.shape, dtype or src.dtype, sbuf)
    _isa.dma_copy(out, src)
    return out


def store(dst, value):
    if not isinstance(dst, _Tensor) or dst.buffer.kind != "hbm":
        _fail("store", "dst", "must be a tensor in HBM")
    if isinstance(value, _Tensor) and value.buffer.kind == "psum":
        _fail("store", "value", "is in PSUM; nl.store does not accept PSUM tiles (copy to SBUF first)")
    _isa.dma_copy(dst, value)


def matmul(x, y, transpose_x=False):
    """PSUM fp32 tile of x.T @ y (x [K, M], y [K, N]); NKI 0.3-0.6 needs transpose_x=True."""
    if not transpose_x:
        _fail("nl.matmul", "transpose_x", "nl.matmul without transpose_x=True fails in NKI 0.3-0.6 "
             "(known issue); pass x already transposed as [K, M] with transpose_x=True")
    out = ndarray((x.free_size, y.free_size), float32, psum)
    _isa.nc_matmul(out, x, y)
    return out


def transpose(x, dtype=None):
    """A PSUM tile holding the 2-D transpose of x (each dim <= 128)."""
    if len(x.shape) != 2:
        _fail("nl.transpose", "x", f"must be 2-D, got {x.shape}")
    out = ndarray((x.shape[1], x.shape[0]), x.dtype, psum)
    _isa.nc_transpose(out, x)
    return out


# ---------------------------------------------------------------- element-wise and reductions


def _call_op(op: _Op, *args, dtype=None):
    name = f"nl.{op.name}"
    if op.is_act and not op.is_alu and len(args) == 1:
        x = args[0]
        if not isinstance(x, _Tensor):
            _fail(name, "x", "must be a tile")
        out = ndarray(x.shape, dtype or x.dtype, sbuf)
        if op.name == "rsqrt" and x.buffer.kind == "psum":
            _fail(name, "x", "is in PSUM; nl.rsqrt runs on GpSimd, which cannot access PSUM")
        _isa.activation(out, op, x)
        return out
    if op.is_alu and len(args) == 2:
        x, y = args
        xt, yt = isinstance(x, _Tensor), isinstance(y, _Tensor)
        if not xt and not yt:
            _fail(name, "x", "at least one operand must be a tile")
        if xt and yt:
            if x.shape != y.shape:
                _fail(name, "y", f"shape {y.shape} differs from x's {x.shape}; nl.* binary ops do not "
                     "broadcast (use nisa.tensor_scalar for a (P,1) operand)")
            out = ndarray(x.shape, dtype or x.dtype, sbuf)
            _isa.tensor_tensor(out, x, y, op)
            return out
        tile, scalar, rev = (x, y, False) if xt else (y, x, True)
        if op.name == "power":
            _fail(name, "y" if xt else "x", "nl.power with a scalar operand is not supported by NKI; pass two "
                 "tiles of the same shape (e.g. an nl.full tile) or use nisa.activation / nisa.tensor_tensor")
        out = ndarray(tile.shape, dtype or tile.dtype, sbuf)
        _isa.tensor_scalar(out, tile, op, scalar, reverse0=rev)
        return out
    _fail(name, None, f"called with {len(args)} positional argument(s)")


def where(condition, x, y, dtype=None):
    """condition ? x : y element-wise (condition a tile of 1.0/0.0; x, y tiles or numbers)."""
    for role, t in (("condition", condition), ("x", x), ("y", y)):
        if isinstance(t, _Tensor) and t.shape != condition.shape:
            _fail("nl.where", role, f"shape {t.shape} differs from condition's {condition.shape} (no broadcasting)")
    ref = x if isinstance(x, _Tensor) else (y if isinstance(y, _Tensor) else condition)
    out = ndarray(condition.shape, dtype or ref.dtype, sbuf)
    for role, t in (("condition", condition), ("x", x), ("y", y)):
        if isinstance(t, _Tensor):
            _isa._onchip("nl.where", role, t)
    c = condition._get().astype(np.float32) != 0
    xv = x._get().astype(np.float32) if isinstance(x, _Tensor) else np.float32(x)
    yv = y._get().astype(np.float32) if isinstance(y, _Tensor) else np.float32(y)
    _isa._write(out, np.where(c, xv, yv))
    _isa._record("select", _isa.DVE, [t for t in (condition, x, y) if isinstance(t, _Tensor)], [out])
    return out


def broadcast_to(x, shape, dtype=None):
    """A new SBUF tile (of `dtype`, default x's) with x's size-1 dims expanded to `shape` (partition broadcast
    runs on TensorE)."""
    shape = tuple(shape)
    if len(shape) != len(x.shape) or any(a != b and a != 1 for a, b in zip(x.shape, shape)):
        _fail("nl.broadcast_to", "shape", f"cannot broadcast {x.shape} to {shape} (only size-1 dims expand)")
    _isa._onchip("nl.broadcast_to", "x", x)
    out = ndarray(shape, dtype or x.dtype, sbuf)
    _isa._write(out, np.broadcast_to(x._get(), shape))
    eng = _isa.PE if (x.shape[0] == 1 and shape[0] > 1) else _isa.DVE
    _isa._record("broadcast", eng, [x], [out])
    return out


def _reduce(op_name, x, axis, keepdims, dtype):
    nd = len(x.shape)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(a + nd if a < 0 else a for a in axes)
    shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape)) if keepdims else \
        tuple(n for i, n in enumerate(x.shape) if i not in axes)
    if not shape or (x.on_chip and 0 in axes):
        _fail(f"nl.{op_name}", "axis", "reducing over the partition axis (axis 0) is not supported; "
             "reduce free axes")
    out = ndarray(shape, dtype or x.dtype, sbuf)
    _isa.tensor_reduce(out, _ALL_OPS[op_name], x, axes, keepdims=keepdims)
    return out


def sum(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("add", x, axis, keepdims, dtype)


def max(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("maximum", x, axis, keepdims, dtype)


def min(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("minimum", x, axis, keepdims, dtype)


def mean(x, axis, dtype=None, keepdims=False):
    s = _reduce("add", x, axis, keepdims, float32)
    n = x.size // s.size
    out = ndarray(s.shape, dtype or x.dtype, sbuf)
    _isa.tensor_scalar(out, s, _ALL_OPS["multiply"], 1.0 / n)
    return out


def softmax(x, axis=-1, dtype=None):
    """Softmax over the free axis of a 2-D tile: exp(x - max) / sum, fp32 statistics."""
    if len(x.shape) != 2 or axis not in (1, -1):
        _fail("nl.softmax", "axis", "supported for 2-D tiles along the free axis (axis=1)")
    p = x.shape[0]
    neg_max = ndarray((p, 1), float32, sbuf)
    _isa.tensor_reduce(neg_max, _ALL_OPS["maximum"], x, 1, negate=True)
    e = ndarray(x.shape, float32, sbuf)
    total = ndarray((p, 1), float32, sbuf)
    _isa.activation_reduce(e, _ALL_OPS["exp"], x, _ALL_OPS["add"], total, bias=neg_max)
    inv = ndarray((p, 1), float32, sbuf)
    _isa.reciprocal(inv, total)
    out = ndarray(x.shape, dtype or x.dtype, sbuf)
    _isa.tensor_scalar(out, e, _ALL_OPS["multiply"], inv)
    return out


def rms_norm(x, w, axis, n, epsilon=1e-06, dtype=None, compute_dtype=None):
    """x * rsqrt(mean(x^2 over the free axis) + epsilon) * w, for a 2-D tile x and w of x's shape or (1, F);
    `n` is the element count of the mean (None: x's free size); statistics in fp32 (`compute_dtype` float32
    or None)."""
    if compute_dtype is not None and _dt.normalize(compute_dtype) != _dt.float32:
        _fail("nl.rms_norm", "compute_dtype", "only float32 statistics are emulated")
    if len(x.shape) != 2 or axis not in (1, -1):
        _fail("nl.rms_norm", "axis", "supported for 2-D tiles along the free axis (axis=1)")
    p, f = x.shape
    n = f if n is None else int(n)
    sq = ndarray(x.shape, float32, sbuf)
    ss = ndarray((p, 1), float32, sbuf)
    _isa.activation_reduce(sq, _ALL_OPS["square"], x, _ALL_OPS["add"], ss)
    rstd = ndarray((p, 1), float32, sbuf)
    _isa.tensor_scalar(rstd, ss, _ALL_OPS["multiply"], 1.0 / n, op1=_ALL_OPS["add"], operand1=float(epsilon))
    _isa.activation(rstd, _ALL_OPS["rsqrt"], rstd)
    wt = w if w.shape == x.shape else broadcast_to(w, x.shape)
    out = ndarray(x.shape, dtype or x.dtype, sbuf)
    _isa.scalar_tensor_tensor(out, x, _ALL_OPS["multiply"], rstd, _ALL_OPS["multiply"], wt)
    return out
