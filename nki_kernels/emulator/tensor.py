"""Emulated NKI tensors: storages in a memory region and strided views onto them.

A `Storage` is one allocation: a flat NumPy array in the tensor's dtype. A `Tensor` is a view:
(storage, element offset, shape, element strides), which is exactly an NKI access pattern
``[[stride, count], ...]`` plus offset. Slicing, `reshape`, `permute` and `.ap()` build new views that
share storage. `.ap()` may add a dynamic part (scalar_offset / vector_offset) read from on-chip memory
when an instruction uses the view, which is how gathers, scatters and data-dependent addresses work.
"""
from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import dtypes as _dt
from .errors import fail


class MemoryRegion(enum.Enum):
    """A memory buffer: sbuf, psum, private_hbm (alias nl.hbm) or shared_hbm (an enum, as in NKI)."""

    sbuf = "sbuf"
    psum = "psum"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"

    @property
    def kind(self) -> str:
        """"sbuf", "psum" or "hbm"."""
        return "hbm" if self.value.endswith("hbm") else self.value

    @property
    def on_chip(self) -> bool:
        return self.kind in ("sbuf", "psum")

    def __repr__(self):
        return f"nl.{self.name}"


sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
private_hbm = MemoryRegion.private_hbm
hbm = private_hbm
shared_hbm = MemoryRegion.shared_hbm

_sid_counter = itertools.count(1)


class Storage:
    """One allocation. `data` is flat; on-chip storages are row-major with dim 0 the partition."""

    __slots__ = ("sid", "data", "dtype", "buffer", "shape", "name", "pid", "row_elems",
                 "mm_written", "access_log", "modified", "__weakref__")

    def __init__(self, shape, dtype, buffer: MemoryRegion, name: str = "", pid: int = 0, data=None):
        self.sid = next(_sid_counter)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.buffer = buffer
        self.name = name
        self.pid = pid
        size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if data is None:
            self.data = np.full(size, _dt.fill_value(self.dtype), dtype=self.dtype)
        else:
            self.data = data
        self.row_elems = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        # PSUM: which elements hold a matmul result (for accumulate=None / True semantics)
        self.mm_written = np.zeros(size, dtype=bool) if buffer.kind == "psum" else None
        # shared HBM under LNC=2: bit 0/1 = read by program 0/1, bit 2/3 = written by program 0/1
        self.access_log = None
        self.modified = False

    @property
    def size(self) -> int:
        return self.data.size


@dataclass(frozen=True)
class _Dynamic:
    """The runtime part of an access pattern built by `.ap()`."""
    scalar: object          # Tensor (1,1) int or int, or None
    vector: object          # Tensor of indices, or None
    dim: int                # indirect_dim
    multiplier: int         # elements per unit of offset (product of base dims after `dim`)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_register(x) -> bool:
    from .registers import VirtualRegister
    return isinstance(x, VirtualRegister)


def _row_major(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


class Tensor:
    """An NKI tensor view. Kernels see `.shape`, `.dtype`, `.buffer`, slicing, `.reshape`, `.permute`, `.ap`."""

    __slots__ = ("storage", "shape", "dtype", "offset", "strides", "dyn")

    def __init__(self, shape, dtype, storage, buffer=sbuf, name=""):
        """NKI's constructor signature; kernels create tensors with nl.ndarray, which the emulator backs with a
        Storage. Here `storage` must be a Storage of that shape, dtype and buffer: the tensor is all of it."""
        if not isinstance(storage, Storage) or storage.shape != tuple(shape) or storage.buffer is not buffer \
                or storage.dtype != _dt.normalize(dtype):
            fail("NkiTensor", name or None, "create tensors with nl.ndarray (the emulator allocates their storage)")
        self._set(storage, 0, storage.shape, _row_major(storage.shape))

    def _set(self, storage: Storage, offset: int, shape, strides, dyn: _Dynamic | None = None):
        self.storage = storage
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.offset = int(offset)
        self.dtype = storage.dtype
        self.dyn = dyn
        return self

    @classmethod
    def _view(cls, storage: Storage, offset: int, shape, strides, dyn: _Dynamic | None = None) -> "Tensor":
        """A view of `storage`: element offset, shape and element strides (the emulator's constructor)."""
        return cls.__new__(cls)._set(storage, offset, shape, strides, dyn)

    @classmethod
    def whole(cls, storage: Storage) -> "Tensor":
        return cls._view(storage, 0, storage.shape, _row_major(storage.shape))

    # ----------------------------------------------------------------- attributes
    @property
    def buffer(self) -> MemoryRegion:
        return self.storage.buffer

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        return self.storage.name

    @property
    def on_chip(self) -> bool:
        return self.storage.buffer.on_chip

    @property
    def partitions(self) -> int:
        return self.shape[0] if (self.on_chip and self.shape) else 1

    @property
    def free_size(self) -> int:
        """Elements per partition."""
        if not self.storage.buffer.on_chip:
            return math.prod(self.shape)
        return math.prod(self.shape[1:])

    def get_pattern(self):
        return [[st, n] for st, n in zip(self.strides, self.shape)]

    def __repr__(self):
        return (f"Tensor({self.storage.name or 'tensor'}#{self.storage.sid}, shape={self.shape}, "
                f"dtype={_dt.name(self.dtype)}, buffer={self.buffer.name})")

    def __len__(self):
        return self.shape[0]

    def __bool__(self):
        fail("tensor", self.name, "a tensor has no truth value at trace time")

    def __setitem__(self, key, value):
        fail("tensor", self.name, "item assignment is not an NKI instruction; write with "
             "nisa.tensor_copy / nisa.dma_copy / nl.store into a view")

    def __iter__(self):
        fail("tensor", self.name, "tensors are not iterable; index them explicitly")

    # ----------------------------------------------------------------- views
    def __getitem__(self, key) -> "Tensor":
        if self.dyn is not None:
            fail("index", self.name, "cannot index a view that has a dynamic .ap() offset; "
                 "index first, then call .ap()")
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = len(self.shape) - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > len(self.shape):
            fail("index", self.name, f"too many indices ({len(key)}) for a {len(self.shape)}-D tensor "
                 f"of shape {self.shape}")
        key = key + (slice(None),) * (len(self.shape) - len(key))
        offset, shape, strides = self.offset, [], []
        for d, (k, n, st) in enumerate(zip(key, self.shape, self.strides)):
            if _is_int(k):
                i = int(k)
                if i < 0:
                    i += n
                if not 0 <= i < n:
                    fail("index", self.name, f"index {int(k)} is out of bounds for dim {d} of size {n} "
                         f"(tensor shape {self.shape})")
                offset += i * st
                if d == 0 and self.on_chip:      # on-chip: an integer on the partition dim keeps it
                    shape.append(1)
                    strides.append(st)
            elif isinstance(k, slice):
                step = 1 if k.step is None else int(k.step)
                if step <= 0:
                    fail("index", self.name, f"slice step must be positive, got {step} on dim {d}")
                start = 0 if k.start is None else int(k.start)
                stop = n if k.stop is None else int(k.stop)
                if start < 0:
                    start += n
                if stop < 0:
                    stop += n
                if not (0 <= start <= n and start <= stop <= n):
                    fail("index", self.name, f"slice [{k.start}:{k.stop}] is out of bounds for dim {d} "
                         f"of size {n} (tensor shape {self.shape})")
                count = max(0, -(-(stop - start) // step))
                if count == 0:
                    fail("index", self.name, f"empty slice [{k.start}:{k.stop}] on dim {d}")
                offset += start * st
                shape.append(count)
                strides.append(st * step)
            else:
                fail("index", self.name, f"unsupported index {k!r} on dim {d}; use ints, slices or nl.ds")
        return Tensor._view(self.storage, offset, shape, strides)

    def reshape(self, shape) -> "Tensor":
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            fail("reshape", self.name, f"cannot reshape {self.shape} into {shape}: element counts differ")
        if self.on_chip and shape[0] != self.shape[0]:
            fail("reshape", self.name, f"on-chip reshape must keep the partition dim {self.shape[0]}, "
                 f"got {shape}")
        if self.dyn is not None:
            fail("reshape", self.name, "cannot reshape a view with a dynamic .ap() offset")
        probe = as_strided(np.zeros(1, np.int8), self.shape, self.strides)
        try:
            moved = probe.view()
            moved.shape = shape
        except AttributeError:
            fail("reshape", self.name, f"the view {self.get_pattern()} cannot be reshaped to {shape} "
                 "without a copy")
        return Tensor._view(self.storage, self.offset, shape, moved.strides)

    def permute(self, dims) -> "Tensor":
        dims = tuple(int(d) for d in dims)
        if sorted(dims) != list(range(len(self.shape))):
            fail("permute", self.name, f"{dims} is not a permutation of {len(self.shape)} dims")
        if self.on_chip and dims[0] != 0:
            fail("permute", self.name, "on-chip tensors cannot move the partition dim (dims[0] must be 0)")
        return Tensor._view(self.storage, self.offset, [self.shape[d] for d in dims],
                      [self.strides[d] for d in dims], self.dyn)

    def ap(self, pattern, offset=None, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None):
        """Access-pattern view: ``pattern=[[stride, count], ...]`` in elements, from this view's offset.

        `scalar_offset` (an int or an int (1,1) on-chip tensor) adds value * prod(base dims after
        `indirect_dim`). `vector_offset` (an int tensor with one index per element of pattern dim
        `indirect_dim`) replaces that dim's static stride with index * the same multiplier (gather/scatter).
        """
        if dtype is not None:
            fail("ap", self.name, "reinterpreting the dtype through .ap() is not supported by the emulator")
        if self.dyn is not None:
            fail("ap", self.name, "the view already has a dynamic offset")
        pat = [tuple(int(v) for v in p) for p in pattern]
        if not pat or any(len(p) != 2 or p[1] <= 0 for p in pat):
            fail("ap", self.name, f"pattern must be a list of [stride, count] pairs with count > 0, got {pattern}")
        shape = [p[1] for p in pat]
        strides = [p[0] for p in pat]
        dyn = None
        if scalar_offset is not None or vector_offset is not None:
            base = self.storage.shape
            if not 0 <= indirect_dim < max(1, len(base)):
                fail("ap", self.name, f"indirect_dim={indirect_dim} is not a dim of the base shape {base}")
            mult = int(np.prod(base[indirect_dim + 1:], dtype=np.int64)) if len(base) > indirect_dim + 1 else 1
            if vector_offset is not None:
                if not isinstance(vector_offset, Tensor) or not _dt.is_int(vector_offset.dtype):
                    fail("ap", "vector_offset", "must be an integer tensor")
                if indirect_dim >= len(shape) or vector_offset.size != shape[indirect_dim]:
                    fail("ap", "vector_offset", f"needs one index per element of pattern dim "
                         f"{indirect_dim}; got {vector_offset.size} indices for pattern {pat}")
                if not vector_offset.on_chip:
                    fail("ap", "vector_offset", "indices must be in SBUF")
            if scalar_offset is not None and not _is_int(scalar_offset) and not _is_register(scalar_offset):
                if not isinstance(scalar_offset, Tensor) or scalar_offset.size != 1 \
                        or not _dt.is_int(scalar_offset.dtype) or not scalar_offset.on_chip:
                    fail("ap", "scalar_offset", "must be an int, a VirtualRegister or a single-element integer "
                         "tensor in SBUF")
            dyn = _Dynamic(scalar_offset, vector_offset, int(indirect_dim), mult)
        view = Tensor._view(self.storage, self.offset + int(offset or 0), shape, strides, dyn)
        if dyn is None:
            view._check_static_bounds("ap")
        return view

    # ----------------------------------------------------------------- element access (emulator-internal)
    def _check_static_bounds(self, who: str):
        lo, hi = self._span()
        if lo < 0 or hi > self.storage.size:
            fail(who, self.name, f"access pattern {self.get_pattern()} at offset {self.offset} reaches "
                 f"elements [{lo}, {hi}) outside the tensor's {self.storage.size} elements")

    def _span(self):
        lo = hi = self.offset
        for n, st in zip(self.shape, self.strides):
            if st >= 0:
                hi += (n - 1) * st
            else:
                lo += (n - 1) * st
        return lo, hi + 1

    def _flat_index(self, oob_skip=False, who="access"):
        """Flat element indices of every element of the view (resolving dynamic offsets now)."""
        idx = np.full((), self.offset, dtype=np.int64)
        d = self.dyn
        for axis, (n, st) in enumerate(zip(self.shape, self.strides)):
            shp = [1] * len(self.shape)
            shp[axis] = n
            if d is not None and d.vector is not None and axis == d.dim:
                v = d.vector._get().reshape(-1).astype(np.int64)
                idx = idx + (v * d.multiplier).reshape(shp)
            else:
                idx = idx + (np.arange(n, dtype=np.int64) * st).reshape(shp)
        if d is not None and d.scalar is not None:
            if _is_int(d.scalar):
                s = d.scalar
            elif _is_register(d.scalar):
                s = d.scalar._get()
            else:
                s = int(d.scalar._get().reshape(-1)[0])
            idx = idx + s * d.multiplier
        idx = np.broadcast_to(idx, self.shape)
        valid = (idx >= 0) & (idx < self.storage.size)
        if not valid.all() and not oob_skip:
            bad = idx[~valid].reshape(-1)[0]
            fail(who, self.name, f"dynamic access reaches element {bad} outside the tensor's "
                 f"{self.storage.size} elements (shape {self.storage.shape})")
        return idx, valid

    def _np_view(self, arr: np.ndarray) -> np.ndarray:
        """The static view applied to any flat array shaped like the storage."""
        item = arr.itemsize
        return np.ndarray(self.shape, arr.dtype, buffer=arr, offset=self.offset * item,
                          strides=tuple(s * item for s in self.strides))

    def _get(self, who: str = "access") -> np.ndarray:
        if self.dyn is None:
            return self._np_view(self.storage.data)
        idx, _ = self._flat_index(who=who)
        return self.storage.data[idx]

    def _put(self, values, oob_skip=False, who="write"):
        vals = _dt.cast(np.broadcast_to(np.asarray(values), self.shape) if np.ndim(values) == 0
                        else np.asarray(values).reshape(self.shape), self.dtype)
        st = self.storage
        st.modified = True
        if self.dyn is None:
            self._np_view(st.data)[...] = vals
        else:
            idx, valid = self._flat_index(oob_skip=oob_skip, who=who)
            st.data[idx[valid]] = vals[valid]

    def _aux_get(self, arr):
        if self.dyn is None:
            return self._np_view(arr)
        idx, valid = self._flat_index(oob_skip=True)
        return arr[idx[valid]]

    def _aux_set(self, arr, value):
        if self.dyn is None:
            self._np_view(arr)[...] = value
        else:
            idx, valid = self._flat_index(oob_skip=True)
            arr[idx[valid]] = value

    def _aux_or(self, arr, bits):
        if self.dyn is None:
            v = self._np_view(arr)
            v |= bits
        else:
            idx, valid = self._flat_index(oob_skip=True)
            arr[idx[valid]] |= bits

    # partition geometry of an on-chip view
    def _partition_start(self) -> int:
        return self.offset // self.storage.row_elems

    def _contig_bytes(self) -> int:
        run = 1
        expect = 1
        for n, st in zip(reversed(self.shape), reversed(self.strides)):
            if n == 1:
                continue
            if st != expect:
                break
            run *= n
            expect *= n
        return run * self.dtype.itemsize
