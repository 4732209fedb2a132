"""`nki.language` emulated: tensor creation, dtypes, buffers, loops, SPMD ids and the tile-level `nl.*` API.

Tile functions (`nl.exp(x)`, `nl.add(x, y)`, `nl.matmul(...)`, ...) allocate a new SBUF (or PSUM) tile and
emit the same ISA instruction the compiler would, so they are checked and traced like `nisa.*` calls.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import dtypes as _dt
from . import isa as _isa
from .errors import fail
from .ops import ALL_OPS, Op
from .runtime import current
from .tensor import MemoryRegion, Tensor, hbm, private_hbm, psum, sbuf, shared_hbm  # noqa: F401

NkiTensor = Tensor

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
fp32 = SimpleNamespace(min=-3.4028235e38, max=3.4028235e38)

# ---------------------------------------------------------------- operators (callable and op=)
globals().update(ALL_OPS)
add = ALL_OPS["add"]; subtract = ALL_OPS["subtract"]; multiply = ALL_OPS["multiply"]  # noqa: E702
maximum = ALL_OPS["maximum"]; minimum = ALL_OPS["minimum"]; equal = ALL_OPS["equal"]  # noqa: E702
exp = ALL_OPS["exp"]; copy = ALL_OPS["copy"]; reciprocal = ALL_OPS["reciprocal"]  # noqa: E702

# ---------------------------------------------------------------- tile sizes (Python ints here)


class _TileSize:
    pmax = 128
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    psum_fmax = 512
    psum_num_banks = 8


tile_size = _TileSize()


# ---------------------------------------------------------------- creation


def ndarray(shape, dtype, buffer=sbuf, name="", address=None):
    return current().allocate(shape, dtype, buffer, name)


def empty_like(t, dtype=None, buffer=None, name=""):
    return ndarray(t.shape, dtype or t.dtype, buffer or t.buffer, name)


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


def zeros_like(t, dtype=None, buffer=None, name=""):
    return zeros(t.shape, dtype or t.dtype, buffer or t.buffer, name)


def ds(start, size):
    """A dynamic-slice helper: ``t[nl.ds(i * 128, 128)]`` is ``t[i*128 : i*128 + 128]``."""
    return slice(int(start), int(start) + int(size))


# ---------------------------------------------------------------- loops and SPMD


def affine_range(*args, **kwargs):
    return range(*args)


sequential_range = affine_range
static_range = affine_range


def program_id(axis=0):
    if axis != 0:
        fail("program_id", None, f"only axis 0 exists (LNC launch), got {axis}")
    return current().pid


def num_programs(axis=0):
    if axis != 0:
        fail("num_programs", None, f"only axis 0 exists (LNC launch), got {axis}")
    return current().launch.lnc


def program_ndim():
    return 1


def device_print(prefix, x):
    print(prefix, x._get() if isinstance(x, Tensor) else x)


# ---------------------------------------------------------------- data movement


def load(src, dtype=None, name=""):
    """A new SBUF tile holding src (HBM)."""
    if not isinstance(src, Tensor) or src.buffer.kind != "hbm":
        fail("load", "src", "must be a tensor in HBM")
    out = ndarray(src.shape, dtype or src.dtype, sbuf, name)
    _isa.dma_copy(out, src)
    return out


def store(dst, value):
    if not isinstance(dst, Tensor) or dst.buffer.kind != "hbm":
        fail("store", "dst", "must be a tensor in HBM")
    if isinstance(value, Tensor) and value.buffer.kind == "psum":
        fail("store", "value", "is in PSUM; nl.store does not accept PSUM tiles (copy to SBUF first)")
    _isa.dma_copy(dst, value)


def matmul(x, y, transpose_x=False):
    """PSUM fp32 tile of x.T @ y (x [K, M], y [K, N]); NKI 0.3-0.6 needs transpose_x=True."""
    if not transpose_x:
        fail("nl.matmul", "transpose_x", "nl.matmul without transpose_x=True fails in NKI 0.3-0.6 "
             "(known issue); pass x already transposed as [K, M] with transpose_x=True")
    out = ndarray((x.free_size, y.free_size), float32, psum)
    _isa.nc_matmul(out, x, y)
    return out


def transpose(x, dtype=None):
    """A PSUM tile holding the 2-D transpose of x (each dim <= 128)."""
    if len(x.shape) != 2:
        fail("nl.transpose", "x", f"must be 2-D, got {x.shape}")
    out = ndarray((x.shape[1], x.shape[0]), x.dtype, psum)
    _isa.nc_transpose(out, x)
    return out


# ---------------------------------------------------------------- element-wise and reductions


def _call_op(op: Op, *args, dtype=None, **kwargs):
    name = f"nl.{op.name}"
    if op.is_act and not op.is_alu and len(args) == 1:
        x = args[0]
        if not isinstance(x, Tensor):
            fail(name, "x", "must be a tile")
        out = ndarray(x.shape, dtype or x.dtype, sbuf)
        if op.name == "rsqrt" and x.buffer.kind == "psum":
            fail(name, "x", "is in PSUM; nl.rsqrt runs on GpSimd, which cannot access PSUM")
        _isa.activation(out, op, x)
        return out
    if op.is_alu and len(args) == 2:
        x, y = args
        xt, yt = isinstance(x, Tensor), isinstance(y, Tensor)
        if not xt and not yt:
            fail(name, "x", "at least one operand must be a tile")
        if xt and yt:
            if x.shape != y.shape:
                fail(name, "y", f"shape {y.shape} differs from x's {x.shape}; nl.* binary ops do not "
                     "broadcast (use nisa.tensor_scalar for a (P,1) operand)")
            out = ndarray(x.shape, dtype or x.dtype, sbuf)
            _isa.tensor_tensor(out, x, y, op)
            return out
        tile, scalar, rev = (x, y, False) if xt else (y, x, True)
        if op.name == "power":
            fail(name, "y" if xt else "x", "nl.power with a scalar operand is not supported by NKI; pass two "
                 "tiles of the same shape (e.g. an nl.full tile) or use nisa.activation / nisa.tensor_tensor")
        out = ndarray(tile.shape, dtype or tile.dtype, sbuf)
        _isa.tensor_scalar(out, tile, op, scalar, reverse0=rev)
        return out
    fail(name, None, f"called with {len(args)} positional argument(s)")


def where(condition, x, y, dtype=None):
    """condition ? x : y element-wise (condition a tile of 1.0/0.0; x, y tiles or numbers)."""
    for role, t in (("condition", condition), ("x", x), ("y", y)):
        if isinstance(t, Tensor) and t.shape != condition.shape:
            fail("nl.where", role, f"shape {t.shape} differs from condition's {condition.shape} (no broadcasting)")
    ref = x if isinstance(x, Tensor) else (y if isinstance(y, Tensor) else condition)
    out = ndarray(condition.shape, dtype or ref.dtype, sbuf)
    for role, t in (("condition", condition), ("x", x), ("y", y)):
        if isinstance(t, Tensor):
            _isa._onchip("nl.where", role, t)
    c = condition._get().astype(np.float32) != 0
    xv = x._get().astype(np.float32) if isinstance(x, Tensor) else np.float32(x)
    yv = y._get().astype(np.float32) if isinstance(y, Tensor) else np.float32(y)
    _isa._write(out, np.where(c, xv, yv))
    _isa._record("select", _isa.DVE, [t for t in (condition, x, y) if isinstance(t, Tensor)], [out])
    return out


def broadcast_to(x, shape):
    """A new SBUF tile with x's size-1 dims expanded to `shape` (partition broadcast runs on TensorE)."""
    shape = tuple(shape)
    if len(shape) != len(x.shape) or any(a != b and a != 1 for a, b in zip(x.shape, shape)):
        fail("nl.broadcast_to", "shape", f"cannot broadcast {x.shape} to {shape} (only size-1 dims expand)")
    _isa._onchip("nl.broadcast_to", "x", x)
    out = ndarray(shape, x.dtype, sbuf)
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
        fail(f"nl.{op_name}", "axis", "reducing over the partition axis (axis 0) is not supported; "
             "reduce free axes")
    out = ndarray(shape, dtype or x.dtype, sbuf)
    _isa.tensor_reduce(out, ALL_OPS[op_name], x, axes, keepdims=keepdims)
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
    _isa.tensor_scalar(out, s, ALL_OPS["multiply"], 1.0 / n)
    return out


def softmax(x, axis=-1, dtype=None):
    """Softmax over the free axis of a 2-D tile: exp(x - max) / sum, fp32 statistics."""
    if len(x.shape) != 2 or axis not in (1, -1):
        fail("nl.softmax", "axis", "supported for 2-D tiles along the free axis (axis=1)")
    p = x.shape[0]
    neg_max = ndarray((p, 1), float32, sbuf)
    _isa.tensor_reduce(neg_max, ALL_OPS["maximum"], x, 1, negate=True)
    e = ndarray(x.shape, float32, sbuf)
    total = ndarray((p, 1), float32, sbuf)
    _isa.activation_reduce(e, ALL_OPS["exp"], x, ALL_OPS["add"], total, bias=neg_max)
    inv = ndarray((p, 1), float32, sbuf)
    _isa.reciprocal(inv, total)
    out = ndarray(x.shape, dtype or x.dtype, sbuf)
    _isa.tensor_scalar(out, e, ALL_OPS["multiply"], inv)
    return out


def rms_norm(x, w, axis=-1, n=None, epsilon=1e-6, dtype=None):
    """x * rsqrt(mean(x^2 over the free axis) + epsilon) * w, for a 2-D tile x and w of x's shape or (1, F)."""
    if len(x.shape) != 2 or axis not in (1, -1):
        fail("nl.rms_norm", "axis", "supported for 2-D tiles along the free axis (axis=1)")
    p, f = x.shape
    n = f if n is None else int(n)
    sq = ndarray(x.shape, float32, sbuf)
    ss = ndarray((p, 1), float32, sbuf)
    _isa.activation_reduce(sq, ALL_OPS["square"], x, ALL_OPS["add"], ss)
    rstd = ndarray((p, 1), float32, sbuf)
    _isa.tensor_scalar(rstd, ss, ALL_OPS["multiply"], 1.0 / n, op1=ALL_OPS["add"], operand1=float(epsilon))
    _isa.activation(rstd, ALL_OPS["rsqrt"], rstd)
    wt = w if w.shape == x.shape else broadcast_to(w, x.shape)
    out = ndarray(x.shape, dtype or x.dtype, sbuf)
    _isa.scalar_tensor_tensor(out, x, ALL_OPS["multiply"], rstd, ALL_OPS["multiply"], wt)
    return out
