"""`nki.isa` emulated: dst-first instructions with the hardware checks of ../shared/reference/nki-api.md.

Every instruction validates its operands (memory, partitions, shapes, dtypes, engine access rules),
computes in fp32 (PSUM accumulation in fp32), rounds to the destination dtype on write and appends one
entry to the running program's trace.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from . import dtypes as _dt
from . import ops as _ops
from .errors import fail
from .runtime import current
from .tensor import Tensor
from .tensor import shared_hbm as _shared_hbm
from .trace import ACT, DMA, DVE, PE, POOL, Access, Instr


class engine(enum.Enum):
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


tensor_engine, vector_engine, scalar_engine = engine.tensor, engine.vector, engine.scalar
gpsimd_engine, unknown_engine = engine.gpsimd, engine.unknown


class reduce_cmd(enum.Enum):
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class oob_mode(enum.Enum):
    error = 0
    skip = 1


class dge_mode(enum.Enum):
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class dma_engine(enum.Enum):
    dma = 1             # shared DMA with CoreBarrier synchronisation (default); triggered from any engine
    gpsimd_dma = 2      # GpSimd's internal DMA: low-latency SB-to-SB swaps in LNC=2; GpSimd triggers it


class matmul_perf_mode(enum.Enum):
    none = "none"
    double_row = "double_row"


_ENGINE_NAMES = {engine.tensor: PE, engine.scalar: ACT, engine.gpsimd: POOL, engine.vector: DVE}
_F32 = np.float32


# ============================================================================ operand checks


def _tensor(instr, role, t):
    if not isinstance(t, Tensor):
        fail(instr, role, f"must be an NKI tensor, got {type(t).__name__}")
    return t


def _onchip(instr, role, t, allow=("sbuf", "psum")):
    """An on-chip operand: in an allowed memory, <= pmax partitions, a legal partition pattern."""
    _tensor(instr, role, t)
    kind = t.buffer.kind
    if kind == "hbm":
        fail(instr, role, f"is in HBM ({t.buffer.name}); compute engines access only SBUF/PSUM "
             "(move it with nisa.dma_copy first)")
    if kind not in allow:
        allowed = " or ".join(a.upper() for a in allow)
        fail(instr, role, f"is in {kind.upper()}; this instruction's engine accesses only {allowed}")
    tgt = current().target
    p = t.shape[0]
    if p > tgt.pmax:
        fail(instr, role, f"partition dim {p} exceeds the limit of {tgt.pmax} partitions")
    row = t.storage.row_elems
    if p > 1 and t.strides[0] != row:
        fail(instr, role, "the partition dim must step one partition at a time (no partition striding)")
    free_start = t.offset % row
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.strides[1:]))
    if free_start + span >= row and len(t.shape) > 1 and span > 0:
        fail(instr, role, "the free access pattern crosses into another partition")
    if tgt.checks_start_partition:
        start = t._partition_start()
        ok = start == 0 if p > 64 else (start in (0, 64) if p > 32 else start in (0, 32, 64, 96))
        if not ok:
            fail(instr, role, f"{p} partitions may not start at partition {start} on {tgt.name} "
                 "(>64 start at 0; 33-64 at 0 or 64; <=32 at 0, 32, 64 or 96)")
    limit = tgt.psum_free_elems_max if kind == "psum" else tgt.sbuf_free_elems_max
    if t.free_size > limit:
        fail(instr, role, f"{t.free_size} elements per partition exceed the per-instruction limit of "
             f"{limit} for {kind.upper()}")
    if t.dyn is not None:
        fail(instr, role, "dynamic (.ap() with scalar/vector offset) views are only valid in DMA instructions")
    return t


def _same_layout(instr, a_role, a, b_role, b):
    if a.shape[0] != b.shape[0]:
        fail(instr, b_role, f"partition dim {b.shape[0]} does not match {a_role}'s {a.shape[0]}")
    if a.free_size != b.free_size:
        fail(instr, b_role, f"{b.free_size} elements per partition do not match {a_role}'s {a.free_size} "
             "(no broadcasting)")


def _scalar_operand(instr, role, v, p):
    """A scalar operand: a Python number, or a (P,1) on-chip tile broadcast along the free dim."""
    if isinstance(v, Tensor):
        _onchip(instr, role, v)
        if v.shape[0] != p or v.free_size != 1:
            fail(instr, role, f"a tensor scalar operand must be ({p}, 1), got {v.shape}")
        return v._get().reshape(p, 1).astype(_F32)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        fail(instr, role, f"must be a number or a (P,1) tile, got {type(v).__name__}")
    return v


def _f32_2d(t: Tensor) -> np.ndarray:
    return np.asarray(t._get(), dtype=_F32).reshape(t.shape[0], -1) if t.on_chip else \
        np.asarray(t._get(), dtype=_F32)


def _access(t: Tensor) -> Access:
    lo, hi = (0, t.storage.size) if t.dyn is not None else t._span()
    on_chip = t.on_chip
    return Access(t.storage.sid, t.buffer.kind, _dt.name(t.dtype), t.shape,
                  t.shape[0] if on_chip else 1, t.free_size, t.size * t.dtype.itemsize,
                  lo, hi, t._contig_bytes(), t.dyn is not None,
                  t.storage.row_elems if on_chip else 0)


def _record(name, eng, reads, writes, **meta):
    """Append one trace entry. The index tiles of dynamic (.ap offset) views count as reads: the DMA
    cannot start before the instruction that wrote its offsets has finished."""
    prog = current()
    reads = [t for t in reads if isinstance(t, Tensor)]
    index_tiles = []
    for t in reads + list(writes):
        if t.dyn is not None:
            index_tiles.extend(x for x in (t.dyn.scalar, t.dyn.vector) if isinstance(x, Tensor))
    # index tiles feed the descriptor generator, not the data stream: contig_bytes=0 keeps them out of the
    # cost model's contiguous-run (descriptor efficiency) estimate while they still order the DMA after
    # their producers
    index_acc = tuple(dataclasses.replace(_access(x), contig_bytes=0) for x in index_tiles)
    prog.trace.append(Instr(len(prog.trace), name, eng,
                            tuple(_access(t) for t in reads) + index_acc,
                            tuple(_access(t) for t in writes), meta))


def _write(dst: Tensor, values, oob_skip=False, who="write"):
    """Round to dst's dtype and store; a non-matmul write to PSUM ends any accumulation there."""
    dst._put(values, oob_skip=oob_skip, who=who)
    if dst.storage.mm_written is not None:
        dst._aux_set(dst.storage.mm_written, False)


def _is_int_tensor(t):
    return isinstance(t, Tensor) and _dt.is_int(t.dtype)


def _pick_engine(instr, requested, default, allowed):
    if requested is None or requested is engine.unknown:
        return default
    if not isinstance(requested, engine):
        fail(instr, "engine", f"must be a nisa.engine member, got {requested!r}")
    eng = _ENGINE_NAMES.get(requested)
    if eng not in allowed:
        fail(instr, "engine", f"{requested.name} engine cannot run this instruction "
             f"(allowed: {', '.join(allowed)})")
    return eng


def _check_engine_memory(instr, eng, *tensors):
    if eng == POOL:
        for role, t in tensors:
            if t.buffer.kind == "psum":
                fail(instr, role, "is in PSUM, which GpSimd cannot access; use the Vector or Scalar engine")


# ============================================================================ TensorE


def _matmul_tiling(instr, tgt, tile_position, tile_size, double_row):
    """(row_size, col_size, start_row, start_col) of the PE tile an nc_matmul uses; (128, 128, 0, 0) untiled.

    Row tiling splits the 128 PE rows (contraction K) into 2 x 64 (NeuronCore-v2+) or 4 x 32 (v3+) tiles,
    column tiling the 128 columns (stationary free size M) likewise; both tuples must be given to tile."""
    pos, size = tuple(tile_position or ()), tuple(tile_size or ())
    if not pos and not size:
        return tgt.pmax, tgt.gemm_stationary_fmax, 0, 0
    if not pos or not size:
        fail(instr, "tile_position" if not pos else "tile_size", "tile_position and tile_size must both be set to "
             f"enable tiling mode (got tile_position={pos}, tile_size={size})")
    for role, v in (("tile_position", pos), ("tile_size", size)):
        if len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in v):
            fail(instr, role, f"must be a 2-tuple of ints, got {v}")
    allowed = (32, 64, 128) if tgt.nc_version >= 3 else (64, 128)
    for what, n in zip(("row_size", "column_size"), size):
        if int(n) not in allowed:
            fail(instr, "tile_size", f"{what} {int(n)} is not a PE tile size on {tgt.name} (allowed: "
                 f"{', '.join(map(str, allowed))})")
    for what, st, n in zip(("start_row", "start_column"), pos, size):
        if int(st) % int(n) or not 0 <= int(st) < 128:
            fail(instr, "tile_position", f"{what} {int(st)} must be a multiple of the tile's {int(n)} below 128")
    if double_row and int(size[1]) != 128:
        fail(instr, "perf_mode", "double_row cannot be combined with column tiling (tile_size column_size < 128)")
    return int(size[0]), int(size[1]), int(pos[0]), int(pos[1])


def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False,
              is_transpose=False, accumulate=None, tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none,
              name=None):
    """dst[M, N] (PSUM, fp32) = stationary[K, M].T @ moving[K, N]; K, M <= 128, N <= 512.

    perf_mode=double_row (fp8, NeuronCore-v3+): stationary [K, 2, M], moving [K, 2, N], contraction over both
    the partitions and the pair dim (K x 2 <= 256 products per output), at twice the fp8 rate.
    tile_position=(start_row, start_column), tile_size=(row_size, column_size): run on one PE tile (row tiles of
    32/64 for K, column tiles for M) so that matmuls on different tiles proceed in parallel."""
    instr = "nc_matmul"
    tgt = current().target
    for role, t in (("stationary", stationary), ("moving", moving)):
        _tensor(instr, role, t)
        if t.buffer.kind == "psum":
            fail(instr, role, "is in PSUM; TensorE reads only SBUF")
        _onchip(instr, role, t, allow=("sbuf",))
    _tensor(instr, "dst", dst)
    if dst.buffer.kind != "psum":
        fail(instr, "dst", f"is in {dst.buffer.kind.upper()}; TensorE writes its result only to PSUM")
    _onchip(instr, "dst", dst, allow=("psum",))
    if is_transpose:
        fail(instr, "is_transpose", "is not supported by the emulator; use nisa.nc_transpose")
    if perf_mode is None:
        perf_mode = matmul_perf_mode.none
    if not isinstance(perf_mode, matmul_perf_mode):
        fail(instr, "perf_mode", f"must be a nisa.matmul_perf_mode member, got {perf_mode!r}")
    double_row = perf_mode is matmul_perf_mode.double_row
    if double_row:
        if tgt.nc_version < 3:
            fail(instr, "perf_mode", f"double_row needs NeuronCore-v3 or newer; {tgt.name} has no FP8 double mode")
        fp8 = ("float8_e4m3", "float8_e5m2") + (("float8_e4m3fn",) if tgt.nc_version >= 4 else ())
        for role, t in (("stationary", stationary), ("moving", moving)):
            if _dt.name(t.dtype) not in fp8:
                fail(instr, role, f"dtype {_dt.name(t.dtype)}: double_row takes only {', '.join(fp8)}")
            if len(t.shape) != 3 or t.shape[1] != 2:
                fail(instr, role, f"double_row tiles are [K, 2, F] (the first free dim is 2), got {t.shape}")
    rows, cols, _, _ = _matmul_tiling(instr, tgt, tile_position, tile_size, double_row)
    k = stationary.shape[0]
    pairs = 2 if double_row else 1
    m, n = stationary.free_size // pairs, moving.free_size // pairs
    if moving.shape[0] != k:
        fail(instr, "moving", f"contraction (partition) dim {moving.shape[0]} does not match stationary's {k}")
    if k > rows:
        fail(instr, "stationary", f"partition dim K={k} exceeds the tile's row_size {rows}")
    mmax = min(tgt.gemm_stationary_fmax, cols)
    if m > mmax:
        fail(instr, "stationary", f"free size M={m} exceeds the limit {mmax} "
             f"({'column_size' if cols < tgt.gemm_stationary_fmax else 'gemm_stationary_fmax'} on {tgt.name})")
    nmax = tgt.gemm_moving_fmax_bf16 if dst.dtype == _dt.bfloat16 else tgt.gemm_moving_fmax_fp32
    if n > nmax:
        fail(instr, "moving", f"free size N={n} exceeds the limit {nmax} (gemm_moving_fmax on {tgt.name})")
    if dst.shape[0] != m or dst.free_size != n:
        fail(instr, "dst", f"shape {dst.shape} does not hold the [M={m}, N={n}] result")
    if _dt.name(dst.dtype) not in tgt.psum_result_dtypes:
        fail(instr, "dst", f"dtype {_dt.name(dst.dtype)} is not a matmul result dtype on {tgt.name} "
             f"(allowed: {', '.join(tgt.psum_result_dtypes)})")
    for role, t in (("stationary", stationary), ("moving", moving)):
        if not _dt.is_float(t.dtype):
            fail(instr, role, f"dtype {_dt.name(t.dtype)} is not a matmul input dtype (fp8/bf16/fp16/fp32)")
    fp32_in = (stationary.dtype == _dt.float32, moving.dtype == _dt.float32)
    if fp32_in[0] != fp32_in[1]:
        fail(instr, "moving", "fp32 inputs must be paired with fp32 (got "
             f"{_dt.name(stationary.dtype)} x {_dt.name(moving.dtype)})")
    row_bytes = dst.storage.row_elems * dst.dtype.itemsize
    start = (dst.offset % dst.storage.row_elems) * dst.dtype.itemsize
    span = sum((s - 1) * st for s, st in zip(dst.shape[1:], dst.strides[1:])) * dst.dtype.itemsize
    end = start + span + dst.dtype.itemsize - 1
    if start // tgt.psum_bank_bytes != end // tgt.psum_bank_bytes or row_bytes == 0:
        fail(instr, "dst", f"the result spans bytes [{start}, {end}] of the partition, crossing a "
             f"{tgt.psum_bank_bytes} B PSUM bank boundary; a matmul writes within one bank")
    # [K, pairs, M] x [K, pairs, N]: contract over partitions and pairs
    st_vals = stationary._get().reshape(k, pairs, m).astype(_F32).reshape(k * pairs, m)
    mv_vals = moving._get().reshape(k, pairs, n).astype(_F32).reshape(k * pairs, n)
    prod = (st_vals.T.astype(np.float64) @ mv_vals.astype(np.float64)).astype(_F32)
    written = dst._aux_get(dst.storage.mm_written).reshape(m, n)
    if accumulate is True:
        if not written.all():
            fail(instr, "dst", "accumulate=True onto PSUM that no matmul has written is undefined behaviour")
        result = dst._get().reshape(m, n).astype(_F32) + prod
    elif accumulate is None:
        cur = dst._get().reshape(m, n).astype(_F32)
        result = np.where(written, cur + prod, prod)
    elif accumulate is False:
        result = prod
    else:
        fail(instr, "accumulate", f"must be None, True or False, got {accumulate!r}")
    dst._put(result.reshape(dst.shape))
    dst._aux_set(dst.storage.mm_written, True)
    _record(instr, PE, [stationary, moving], [dst], K=k * pairs, M=m, N=n,
            in_dtype=_dt.name(moving.dtype), fp32=fp32_in[0], accumulate=accumulate,
            double_row=double_row, tile=(rows, cols))


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """dst[F, P] = data[P, F]. TensorE: SBUF -> PSUM, <= 128 x 128. VectorE: <= 32 x 32.

    On NeuronCore-v2 (trn1) a TensorE transpose is an identity matmul: NaN / Inf in data[k, j] turns the
    whole dst row j NaN except column k (see _identity_matmul_transpose); VectorE transposes stay exact."""
    instr = "nc_transpose"
    _tensor(instr, "data", data)
    _tensor(instr, "dst", dst)
    default = PE if (data.buffer.kind == "sbuf" and dst.buffer.kind == "psum") else DVE
    eng = _pick_engine(instr, engine, default, (PE, DVE))
    tgt = current().target
    if eng == PE:
        if data.buffer.kind != "sbuf":
            fail(instr, "data", f"is in {data.buffer.kind.upper()}; a TensorE transpose reads SBUF")
        if dst.buffer.kind != "psum":
            fail(instr, "dst", f"is in {dst.buffer.kind.upper()}; a TensorE transpose writes PSUM")
        limit = tgt.pmax
    else:
        limit = 32
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    p, f = data.shape[0], data.free_size
    if p > limit or f > limit:
        fail(instr, "data", f"shape ({p}, {f}) exceeds the {limit}x{limit} limit of a "
             f"{'TensorE' if eng == PE else 'VectorE'} transpose")
    if dst.shape[0] != f or dst.free_size != p:
        fail(instr, "dst", f"shape {dst.shape} must be ({f}, {p}) for a ({p}, {f}) input")
    if dst.dtype != data.dtype:
        fail(instr, "dst", f"dtype {_dt.name(dst.dtype)} must equal data's {_dt.name(data.dtype)}")
    vals = data._get().reshape(p, f)
    if eng == PE and tgt.nc_version < 3 and _dt.is_float(data.dtype):
        out = _identity_matmul_transpose(vals)
    else:
        out = vals.T
    _write(dst, out.reshape(dst.shape))
    _record(instr, eng, [data], [dst], P=p, F=f)


def _identity_matmul_transpose(vals):
    """[P, F] -> [F, P] as NeuronCore-v2's TensorE computes it: out[j, i] = sum_k vals[k, j] * I[k, i].

    The real nc_transpose docstring: the TensorE transpose is a matmul of the data (stationary) by an identity
    (moving) and "On NeuronCore-v2, Tensor Engine transpose is not bit-accurate if the input data contains
    NaN/Inf" (bit-accurate from NeuronCore-v3 on). Finite values come out exact (x * 1 plus zeros); a NaN / Inf
    at vals[k, j] makes out[j, i] NaN for every i != k (NaN * 0, Inf * 0), so one partition's non-finite value
    spreads over the whole output row j. VectorE and DMA transposes are exact on every target."""
    v = np.asarray(vals).astype(np.float64)
    if np.isfinite(v).all():
        return vals.T
    eye = np.eye(v.shape[0])
    with np.errstate(invalid="ignore"):
        return (v[:, :, None] * eye[:, None, :]).sum(axis=0)      # [K, F, 1] * [K, 1, P] summed over K -> [F, P]


# ============================================================================ ScalarE


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None,
               reduce_cmd=reduce_cmd.idle, name=None):
    """dst = op(data * scale + bias) on ScalarE, fp32 inside; optional free-axis sum into registers."""
    instr = "activation"
    fn = _ops.get(op, instr)
    if not fn.is_act:
        fail(instr, "op", f"{fn!r} is not an activation function")
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    _same_layout(instr, "data", data, "dst", dst)
    p = data.shape[0]
    prog = current()
    x = _f32_2d(data)
    s = _scalar_operand(instr, "scale", scale, p)
    x = x * (np.asarray(s, dtype=_F32) if not isinstance(s, np.ndarray) else s)
    reads = [data]
    if isinstance(scale, Tensor):
        reads.append(scale)
    if bias is not None:
        if not isinstance(bias, Tensor) and not prog.target.activation_scalar_bias:
            fail(instr, "bias", f"must be a (P,1) tile on {prog.target.name}; a float bias needs NeuronCore-v3+")
        b = _scalar_operand(instr, "bias", bias, p)
        x = x + (np.asarray(b, dtype=_F32) if not isinstance(b, np.ndarray) else b)
        if isinstance(bias, Tensor):
            reads.append(bias)
    y = fn.activate(x.astype(_F32))
    writes = [dst]
    cmd = reduce_cmd if reduce_cmd is not None else globals()["reduce_cmd"].idle
    if not isinstance(cmd, globals()["reduce_cmd"]):
        fail(instr, "reduce_cmd", f"must be a nisa.reduce_cmd member, got {reduce_cmd!r}")
    rc = globals()["reduce_cmd"]
    if cmd is not rc.idle or reduce_op is not None:
        if cmd is rc.idle:
            fail(instr, "reduce_cmd", "reduce_op/reduce_res need reduce_cmd=reset_reduce (or reduce)")
        if cmd is rc.load_reduce:
            fail(instr, "reduce_cmd", "load_reduce is not supported by the emulator")
        if cmd is not rc.reset and (reduce_op is None or _ops.get(reduce_op, instr, "reduce_op").name != "add"):
            fail(instr, "reduce_op", "must be nl.add (the ScalarE accumulators only sum)")
        regs = prog.act_regs
        if cmd in (rc.reset, rc.reset_reduce):
            regs[:] = 0.0
        if cmd in (rc.reduce, rc.reset_reduce):
            regs[:p] = (regs[:p] + y.astype(np.float64).sum(axis=1)).astype(_F32)
    if reduce_res is not None:
        if cmd is rc.idle:
            fail(instr, "reduce_res", "needs reduce_cmd=reset_reduce (or reduce) to hold a result")
        _onchip(instr, "reduce_res", reduce_res)
        if reduce_res.shape[0] != p or reduce_res.free_size != 1:
            fail(instr, "reduce_res", f"must be ({p}, 1), got {reduce_res.shape}")
        _write(reduce_res, prog.act_regs[:p].reshape(reduce_res.shape))
        writes.append(reduce_res)
    _write(dst, y.reshape(dst.shape))
    _record(instr, ACT, reads, writes, op=fn.name, reduce=cmd is not rc.idle)


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """`activation` with reduce_cmd=reset_reduce: reduce_res (P,1) = sum over free axes of the result."""
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=reduce_cmd.reset_reduce, name=name)


# ============================================================================ VectorE / GpSimd


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = data1 op data2, element-wise, same partitions and elements per partition, no broadcasting."""
    instr = "tensor_tensor"
    fn = _ops.get(op, instr)
    if not fn.is_alu:
        fail(instr, "op", f"{fn!r} is not a binary ALU operator")
    for role, t in (("data1", data1), ("data2", data2), ("dst", dst)):
        _onchip(instr, role, t)
    _same_layout(instr, "data1", data1, "data2", data2)
    _same_layout(instr, "data1", data1, "dst", dst)
    if data1.buffer.kind == "psum" and data2.buffer.kind == "psum":
        fail(instr, "data2", "both inputs are in PSUM; at most one input may be in PSUM")
    integer = _is_int_tensor(data1) and _is_int_tensor(data2)
    any_psum = "psum" in (data1.buffer.kind, data2.buffer.kind, dst.buffer.kind)
    if fn.name == "power" and any_psum:
        fail(instr, "data1", "nl.power runs on GpSimd, which cannot access PSUM")
    default = POOL if ((fn.name == "power" or integer) and not any_psum) else DVE
    eng = _pick_engine(instr, engine, default, (DVE, POOL))
    _check_engine_memory(instr, eng, ("data1", data1), ("data2", data2), ("dst", dst))
    a = data1._get().reshape(data1.shape[0], -1)
    b = data2._get().reshape(data2.shape[0], -1)
    out = fn.apply(a, b, integer=integer)
    _write(dst, out.reshape(dst.shape))
    _record(instr, eng, [data1, data2], [dst], op=fn.name)


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data op0 operand0) op1 operand1; operands are numbers or (P,1) tiles."""
    instr = "tensor_scalar"
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    _same_layout(instr, "data", data, "dst", dst)
    eng = _pick_engine(instr, engine, DVE, (DVE, ACT, POOL))
    _check_engine_memory(instr, eng, ("data", data), ("dst", dst))
    p = data.shape[0]
    integer = _is_int_tensor(data)
    x = data._get().reshape(p, -1)
    x = x.astype(np.int64) if integer else x.astype(_F32)
    reads = [data]
    for opx, operand, rev, role in ((op0, operand0, reverse0, "operand0"), (op1, operand1, reverse1, "operand1")):
        if opx is None:
            if role == "operand0":
                fail(instr, "op0", "is required")
            continue
        fn = _ops.get(opx, instr, "op0" if role == "operand0" else "op1")
        if not fn.is_alu:
            fail(instr, role, f"{fn!r} is not a binary ALU operator")
        if operand is None:
            fail(instr, role, "is required when its op is given")
        s = _scalar_operand(instr, role, operand, p)
        if isinstance(operand, Tensor):
            reads.append(operand)
        use_int = integer and not isinstance(s, np.ndarray) and isinstance(s, (int, np.integer))
        x = fn.apply(s, x, integer=use_int) if rev else fn.apply(x, s, integer=use_int)
        integer = use_int
    _write(dst, x.reshape(dst.shape))
    _record(instr, eng, reads, [dst], op=getattr(op0, "name", str(op0)))


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """dst = (data op0 operand0) op1 operand1, with operand0 a number or (P,1) tile and operand1 a tile."""
    instr = "scalar_tensor_tensor"
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    _onchip(instr, "operand1", _tensor(instr, "operand1", operand1))
    _same_layout(instr, "data", data, "dst", dst)
    _same_layout(instr, "data", data, "operand1", operand1)
    if data.buffer.kind == "psum" and operand1.buffer.kind == "psum":
        fail(instr, "operand1", "both tensor inputs are in PSUM; at most one may be")
    p = data.shape[0]
    f0 = _ops.get(op0, instr, "op0")
    f1 = _ops.get(op1, instr, "op1")
    s = _scalar_operand(instr, "operand0", operand0, p)
    x = data._get().reshape(p, -1).astype(_F32)
    x = f0.apply(s, x) if reverse0 else f0.apply(x, s)
    y = operand1._get().reshape(p, -1).astype(_F32)
    x = f1.apply(y, x) if reverse1 else f1.apply(x, y)
    _write(dst, x.reshape(dst.shape))
    reads = [data, operand1] + ([operand0] if isinstance(operand0, Tensor) else [])
    _record(instr, DVE, reads, [dst], op=f0.name + "," + f1.name)


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Reduce trailing free axes of data with an nl.* op (never the partition axis); negate gives -result."""
    instr = "tensor_reduce"
    fn = _ops.get(op, instr)
    if fn.name not in ("add", "maximum", "minimum", "multiply", "abs_max", "bitwise_and", "bitwise_or",
                       "logical_and", "logical_or"):
        fail(instr, "op", f"{fn!r} is not a reduction operator")
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    nd = len(data.shape)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(int(a) + nd if int(a) < 0 else int(a) for a in axes)
    if 0 in axes:
        fail(instr, "axis", "reducing over the partition axis (axis 0) is not possible on VectorE; "
             "use a matmul with ones or a transpose")
    if sorted(axes) != list(range(nd - len(axes), nd)):
        fail(instr, "axis", f"must be trailing free axes of a {nd}-D tensor, got {axes}")
    x = data._get().astype(np.float64 if fn.name == "add" else _F32)
    npfn = {"add": np.sum, "maximum": np.max, "minimum": np.min, "multiply": np.prod}.get(fn.name)
    if npfn is not None:
        r = npfn(x, axis=axes)
    else:
        r = x
        for a in sorted(axes, reverse=True):
            r = np.moveaxis(r, a, 0)
            acc = r[0]
            for i in range(1, r.shape[0]):
                acc = fn.apply(acc, r[i])
            r = acc
    r = np.asarray(r, dtype=_F32)
    if negate:
        r = -r
    if dst.shape[0] != data.shape[0] or dst.size != r.size:
        fail(instr, "dst", f"shape {dst.shape} does not hold the reduced result of {r.size} elements "
             f"over {data.shape[0]} partitions")
    _write(dst, r.reshape(dst.shape))
    _record(instr, DVE, [data], [dst], op=fn.name)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """Per partition along the free dim: r[i] = op1(op0(data0[i], r[i-1]), data1[i]), r[-1] = initial."""
    instr = "tensor_tensor_scan"
    for role, t in (("data0", data0), ("data1", data1), ("dst", dst)):
        _onchip(instr, role, t)
    _same_layout(instr, "data0", data0, "data1", data1)
    _same_layout(instr, "data0", data0, "dst", dst)
    f0 = _ops.get(op0, instr, "op0")
    f1 = _ops.get(op1, instr, "op1")
    p = data0.shape[0]
    init = _scalar_operand(instr, "initial", initial, p)
    d0 = data0._get().reshape(p, -1).astype(_F32)
    d1 = data1._get().reshape(p, -1).astype(_F32)
    prev = (init.reshape(p) if isinstance(init, np.ndarray) else np.full(p, init, dtype=_F32)).astype(_F32)
    out = np.empty_like(d0)
    for i in range(d0.shape[1]):
        a = f0.apply(prev, d0[:, i]) if reverse0 else f0.apply(d0[:, i], prev)
        prev = f1.apply(d1[:, i], a) if reverse1 else f1.apply(a, d1[:, i])
        out[:, i] = prev
    _write(dst, out.reshape(dst.shape))
    reads = [data0, data1] + ([initial] if isinstance(initial, Tensor) else [])
    _record(instr, DVE, reads, [dst], op=f0.name + "," + f1.name)


def reciprocal(dst, data, name=None):
    """dst = 1 / data on VectorE (fp32)."""
    instr = "reciprocal"
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    _same_layout(instr, "data", data, "dst", dst)
    with np.errstate(all="ignore"):
        out = (np.float32(1.0) / data._get().astype(_F32))
    _write(dst, out.reshape(dst.shape))
    _record(instr, DVE, [data], [dst])


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """dst = src (SBUF/PSUM to SBUF/PSUM); bit-exact when dtypes match, else through fp32."""
    instr = "tensor_copy"
    _onchip(instr, "src", src)
    _onchip(instr, "dst", dst)
    _same_layout(instr, "src", src, "dst", dst)
    tgt = current().target
    eng = _pick_engine(instr, engine, DVE, (DVE, ACT, POOL))
    if eng == ACT and tgt.nc_version == 2:
        fail(instr, "engine", "tensor_copy is not supported on the Scalar engine of NeuronCore-v2; "
             "use nisa.activation(op=nl.copy)")
    _check_engine_memory(instr, eng, ("src", src), ("dst", dst))
    vals = src._get()
    if src.dtype != dst.dtype:
        vals = vals.astype(np.float64) if _dt.is_int(src.dtype) else vals.astype(_F32)
    _write(dst, np.asarray(vals).reshape(dst.shape))
    _record(instr, eng, [src], [dst])


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):
    """dst = src where predicate (uint8/16/32) is nonzero (zero with reverse_pred); elsewhere dst keeps its
    values (VectorE). src is a tile of dst's dtype or a number."""
    instr = "tensor_copy_predicated"
    _onchip(instr, "dst", dst)
    _onchip(instr, "predicate", _tensor(instr, "predicate", predicate))
    _same_layout(instr, "dst", dst, "predicate", predicate)
    if predicate.dtype not in (_dt.normalize("uint8"), _dt.normalize("uint16"), _dt.normalize("uint32")):
        fail(instr, "predicate", f"must be uint8, uint16 or uint32, got {_dt.name(predicate.dtype)}")
    reads = [predicate]
    if isinstance(src, Tensor):
        _onchip(instr, "src", src)
        _same_layout(instr, "dst", dst, "src", src)
        if src.dtype != dst.dtype:
            fail(instr, "src", f"dtype {_dt.name(src.dtype)} differs from dst's {_dt.name(dst.dtype)}")
        if src.buffer.kind == "psum" and predicate.buffer.kind == "psum":
            fail(instr, "src", "src and predicate are both in PSUM; at most one may be")
        vals = np.asarray(src._get()).reshape(dst.shape)
        reads.append(src)
    else:
        vals = np.full(dst.shape, _scalar_operand(instr, "src", src, dst.shape[0]))
    take = np.asarray(predicate._get()).reshape(dst.shape) != 0
    if reverse_pred:
        take = ~take
    _write(dst, np.where(take, vals, np.asarray(dst._get()).reshape(dst.shape)))
    _record(instr, DVE, reads + [dst], [dst])


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill dst (SBUF/PSUM) with a constant of dst's dtype."""
    instr = "memset"
    _onchip(instr, "dst", dst)
    if isinstance(value, Tensor) or not isinstance(value, (int, float, bool, np.number, np.bool_)):
        fail(instr, "value", f"must be a number, got {type(value).__name__}")
    if _dt.is_int(dst.dtype) and float(value) != int(value):
        fail(instr, "value", f"{value!r} does not match the destination dtype {_dt.name(dst.dtype)}")
    eng = _pick_engine(instr, engine, DVE, (DVE, POOL, ACT))
    _check_engine_memory(instr, eng, ("dst", dst))
    _write(dst, np.full(dst.shape, value))
    _record(instr, eng, [], [dst])


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """dst[p, i...] = offset + p * channel_multiplier + sum(step_j * i_j) on GpSimd (SBUF only)."""
    instr = "iota"
    _onchip(instr, "dst", dst, allow=("sbuf",))
    p = dst.shape[0]
    vals = _affine(instr, pattern, offset, channel_multiplier, p, dst.free_size)
    _write(dst, vals.reshape(dst.shape))
    _record(instr, POOL, [], [dst])


def _affine(instr, pattern, offset, channel_multiplier, p, free):
    pat = [tuple(int(v) for v in q) for q in pattern]
    if not pat or len(pat) > 4 or any(len(q) != 2 or q[1] <= 0 for q in pat):
        fail(instr, "pattern", f"must be 1 to 4 [step, count] pairs with count > 0, got {pattern}")
    counts = [q[1] for q in pat]
    if int(np.prod(counts)) != free:
        fail(instr, "pattern", f"covers {int(np.prod(counts))} elements per partition but dst has {free}")
    vals = np.full((p,) + tuple(counts), int(offset), dtype=np.int64)
    vals += (np.arange(p, dtype=np.int64) * int(channel_multiplier)).reshape((p,) + (1,) * len(counts))
    for j, (step, cnt) in enumerate(pat):
        shp = [1] * (len(counts) + 1)
        shp[j + 1] = cnt
        vals += (np.arange(cnt, dtype=np.int64) * step).reshape(shp)
    return vals.reshape(p, free)


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=_ops.ALL_OPS["equal"],
                  offset=0, name=None):
    """dst = cmp_op(offset + p*channel_multiplier + sum(step*i), 0) ? on_true_tile : on_false_value."""
    instr = "affine_select"
    fn = _ops.get(cmp_op, instr, "cmp_op")
    _onchip(instr, "dst", dst, allow=("sbuf",))
    _onchip(instr, "on_true_tile", _tensor(instr, "on_true_tile", on_true_tile), allow=("sbuf",))
    _same_layout(instr, "on_true_tile", on_true_tile, "dst", dst)
    if isinstance(on_false_value, Tensor):
        fail(instr, "on_false_value", "must be a number (fp32)")
    p = dst.shape[0]
    aff = _affine(instr, pattern, offset, channel_multiplier, p, dst.free_size)
    cond = fn.apply(aff, 0, integer=True).astype(bool)
    vals = np.where(cond, on_true_tile._get().reshape(p, -1).astype(_F32), np.float32(on_false_value))
    _write(dst, vals.reshape(dst.shape))
    _record(instr, POOL, [on_true_tile], [dst])


GPSIMD_CORES = 8                 # GpSimd cores, each wired to 16 contiguous SBUF partitions
GPSIMD_PARTITIONS_PER_CORE = 16
LOCAL_GATHER_MAX_INDICES = 4096  # indices one GpSimd core gathers per instruction (local_gather limit)


def nc_n_gather(dst, data, indices, name=None):
    """dst[p, j] = data[p].flatten()[indices[p].flatten()[j]] on GpSimd, independently per partition.

    All in SBUF; dst has data's dtype and indices' elements per partition; indices are uint32 in
    [0, data elements per partition). One nc_n_gather is ceil(elements per partition / 512) ISA instructions."""
    instr = "nc_n_gather"
    for role, t in (("data", data), ("indices", indices), ("dst", dst)):
        _onchip(instr, role, _tensor(instr, role, t), allow=("sbuf",))
    p = data.shape[0]
    for role, t in (("indices", indices), ("dst", dst)):
        if t.shape[0] != p:
            fail(instr, role, f"partition dim {t.shape[0]} must equal data's {p}")
    if dst.dtype != data.dtype:
        fail(instr, "dst", f"dtype {_dt.name(dst.dtype)} must equal data's {_dt.name(data.dtype)}")
    if indices.dtype != _dt.uint32:
        fail(instr, "indices", f"dtype must be uint32, got {_dt.name(indices.dtype)}")
    if dst.free_size != indices.free_size:
        fail(instr, "dst", f"{dst.free_size} elements per partition must equal indices' {indices.free_size}")
    f = data.free_size
    idx = indices._get().reshape(p, -1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= f):
        fail(instr, "indices", f"value {int(idx.max() if idx.max() >= f else idx.min())} is outside [0, {f}) "
             "(data elements per partition)")
    vals = np.take_along_axis(data._get().reshape(p, f), idx, axis=1)
    _write(dst, vals.reshape(dst.shape))
    _record(instr, POOL, [data, indices], [dst], groups=-(-dst.free_size // 512))


def local_gather(dst, src_buffer, index, num_elem_per_idx=1, num_valid_indices=None, name=None):
    """GpSimd gather within each 16-partition group (one GpSimd core each), as the NKI test's NumPy semantics:

    for core c (partitions 16c..16c+15): ids = index[16c:16c+16].flatten(order='F')[:num_valid_indices] (uint16,
    element offsets into each partition's flattened src_buffer); dst[p, j*E:(j+1)*E] = src[p, ids[j]:ids[j]+E]
    for every p of the core, E = num_elem_per_idx in {1, 2, 4, 8, 16, 32}. src_buffer and index have the same
    partition count, a multiple of 16; dst holds num_valid_indices * E elements per partition, src's dtype."""
    instr = "local_gather"
    for role, t in (("src_buffer", src_buffer), ("index", index), ("dst", dst)):
        _onchip(instr, role, _tensor(instr, role, t), allow=("sbuf",))
    p = src_buffer.shape[0]
    if index.shape[0] != p or p % GPSIMD_PARTITIONS_PER_CORE:
        fail(instr, "index", f"partition dims must match and be a multiple of {GPSIMD_PARTITIONS_PER_CORE}: "
             f"src_buffer {p}, index {index.shape[0]}")
    if dst.shape[0] != p:
        fail(instr, "dst", f"partition dim {dst.shape[0]} must equal src_buffer's {p}")
    if index.dtype != _dt.uint16:
        fail(instr, "index", f"dtype must be uint16, got {_dt.name(index.dtype)}")
    if dst.dtype != src_buffer.dtype:
        fail(instr, "dst", f"dtype {_dt.name(dst.dtype)} must equal src_buffer's {_dt.name(src_buffer.dtype)} "
             "(no casting)")
    e = num_elem_per_idx
    if isinstance(e, bool) or e not in (1, 2, 4, 8, 16, 32):
        fail(instr, "num_elem_per_idx", f"must be one of 1, 2, 4, 8, 16, 32, got {e!r}")
    per_core = GPSIMD_PARTITIONS_PER_CORE * index.free_size
    nv = per_core if num_valid_indices is None else num_valid_indices
    if isinstance(nv, bool) or not isinstance(nv, (int, np.integer)) or not 0 < nv <= per_core:
        fail(instr, "num_valid_indices", f"must be an int in [1, {per_core}] (indices per core), got {nv!r}")
    if nv > LOCAL_GATHER_MAX_INDICES:
        fail(instr, "num_valid_indices", f"{nv} indices per core exceed the limit of {LOCAL_GATHER_MAX_INDICES}")
    if dst.free_size != nv * e:
        fail(instr, "dst", f"{dst.free_size} elements per partition must equal num_valid_indices x "
             f"num_elem_per_idx = {nv} x {e}")
    f = src_buffer.free_size
    src = src_buffer._get().reshape(p, f)
    ids_all = index._get().reshape(p, -1).astype(np.int64)
    out = np.empty((p, nv * e), dtype=src.dtype)
    g = GPSIMD_PARTITIONS_PER_CORE
    for c in range(p // g):
        ids = ids_all[c * g:(c + 1) * g].flatten(order="F")[:nv]
        if ids.min() < 0 or ids.max() + e > f:
            fail(instr, "index", f"GpSimd core {c}: offset {int(ids.max())} + {e} elements reaches past the "
                 f"{f} elements per partition of src_buffer (out-of-bound gathers are undefined)")
        cols = (ids[:, None] + np.arange(e)[None, :]).reshape(-1)
        out[c * g:(c + 1) * g] = src[c * g:(c + 1) * g][:, cols]
    _write(dst, out.reshape(dst.shape))
    _record(instr, POOL, [src_buffer, index], [dst], indices=int(nv), elem_per_idx=int(e))


def max8(dst, src, name=None):
    """dst (P, 8) = the 8 largest values of each partition of src, descending (8..16384 per partition)."""
    instr = "max8"
    _onchip(instr, "src", src)
    _onchip(instr, "dst", dst)
    p, f = src.shape[0], src.free_size
    if not 8 <= f <= 16384:
        fail(instr, "src", f"{f} elements per partition; max8 needs 8 to 16384")
    if dst.shape[0] != p or dst.free_size != 8:
        fail(instr, "dst", f"must be ({p}, 8), got {dst.shape}")
    x = src._get().reshape(p, f).astype(_F32)
    top = -np.sort(-x, axis=1, kind="stable")[:, :8]
    _write(dst, top.reshape(dst.shape))
    _record(instr, DVE, [src], [dst])


FP32_MIN = -3.4028235e38      # range_select's only fill value ("this must be FP32_MIN", the range_select docstring)
_RANGE_CMP_OPS = ("equal", "less", "less_equal", "greater", "greater_equal")


def range_select(dst, on_true_tile, comp_op0, comp_op1, bound0, bound1, reduce_cmd=reduce_cmd.reset_reduce,
                 reduce_res=None, reduce_op=_ops.ALL_OPS["maximum"], range_start=0, on_false_value=FP32_MIN,
                 name=None):
    """VectorE, NeuronCore-v3+: dst[p, j] = on_true_tile[p, j] where comp_op0(range_start + j, bound0[p]) and
    comp_op1(range_start + j, bound1[p]) (j the flattened free index, compared in fp32), else FP32_MIN (then cast
    to dst's dtype: -inf in a 2-byte dst); reduce_res[p] = the max of the selected row (fp32, before the cast).

    The emulator supports reduce_cmd=reset_reduce only (the accumulator registers it shares with other VectorE
    reductions are not modelled), and reduce_op=nl.maximum (the only one the docstring allows)."""
    instr = "range_select"
    tgt = current().target
    if tgt.nc_version < 3:
        fail(instr, "target", f"range_select is available on NeuronCore-v3 and newer, not on {tgt.name}")
    _onchip(instr, "on_true_tile", _tensor(instr, "on_true_tile", on_true_tile))
    _onchip(instr, "dst", dst)
    _same_layout(instr, "on_true_tile", on_true_tile, "dst", dst)
    if not _dt.is_float(on_true_tile.dtype):
        fail(instr, "on_true_tile", f"must be a float dtype, got {_dt.name(on_true_tile.dtype)}")
    ops = []
    for role, op in (("comp_op0", comp_op0), ("comp_op1", comp_op1)):
        fn = _ops.get(op, instr, role)
        if fn.name not in _RANGE_CMP_OPS:
            fail(instr, role, f"must be one of nl.{', nl.'.join(_RANGE_CMP_OPS)}, got {fn!r}")
        ops.append(fn)
    p = on_true_tile.shape[0]
    bounds = []
    for role, b in (("bound0", bound0), ("bound1", bound1)):
        _onchip(instr, role, _tensor(instr, role, b))
        if b.shape[0] != p or b.free_size != 1:
            fail(instr, role, f"must have one element per partition, ({p}, 1), got {b.shape}")
        if b.dtype != _dt.normalize("float32"):
            fail(instr, role, f"must be float32, got {_dt.name(b.dtype)}")
        bounds.append(b._get().reshape(p, 1).astype(_F32))
    if _ops.get(reduce_op, instr, "reduce_op").name != "maximum":
        fail(instr, "reduce_op", f"only nl.maximum is supported, got {reduce_op!r}")
    if reduce_cmd is not globals()["reduce_cmd"].reset_reduce:
        fail(instr, "reduce_cmd", "the emulator supports reduce_cmd=reset_reduce only")
    if isinstance(range_start, (bool, np.bool_)) or not isinstance(range_start, (int, np.integer)):
        fail(instr, "range_start", f"must be a compile-time integer, got {range_start!r}")
    if isinstance(on_false_value, Tensor) or _F32(on_false_value) != _F32(FP32_MIN):
        fail(instr, "on_false_value", f"must be FP32_MIN ({FP32_MIN}), got {on_false_value!r}")
    f = on_true_tile.free_size
    idx = (int(range_start) + np.arange(f, dtype=np.float64)).astype(_F32)[None, :]
    keep = ops[0].apply(idx, bounds[0]).astype(bool) & ops[1].apply(idx, bounds[1]).astype(bool)
    sel = np.where(keep, on_true_tile._get().reshape(p, f).astype(_F32), _F32(FP32_MIN))
    writes = [dst]
    if reduce_res is not None:
        _onchip(instr, "reduce_res", _tensor(instr, "reduce_res", reduce_res))
        if reduce_res.shape[0] != p or reduce_res.free_size != 1:
            fail(instr, "reduce_res", f"must be ({p}, 1), got {reduce_res.shape}")
        if not _dt.is_float(reduce_res.dtype):
            fail(instr, "reduce_res", f"must be a float dtype, got {_dt.name(reduce_res.dtype)}")
        _write(reduce_res, sel.max(axis=1).reshape(reduce_res.shape))
        writes.append(reduce_res)
    _write(dst, sel.reshape(dst.shape))
    _record(instr, DVE, [on_true_tile, bound0, bound1], writes)


_BN_STATS_FMAX = 512      # nl.tile_size.bn_stats_fmax: elements per partition one bn_stats instruction reads


def bn_stats(dst, data, name=None):
    """dst (P, 6) = per partition (count, mean, variance x count) of the even-indexed and then of the odd-indexed
    elements of data (P, F <= 512), computed in fp32 on VectorE (nki.isa.bn_stats)."""
    instr = "bn_stats"
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    p, f = data.shape[0], data.free_size
    if not 1 <= f <= _BN_STATS_FMAX:
        fail(instr, "data", f"{f} elements per partition; bn_stats reads at most {_BN_STATS_FMAX}")
    if dst.shape[0] != p or dst.free_size != 6:
        fail(instr, "dst", f"must be ({p}, 6), got {dst.shape}")
    x = data._get().reshape(p, f).astype(np.float64)
    cols = []
    for part in (x[:, 0::2], x[:, 1::2]):
        c = part.shape[1]
        mean = part.mean(axis=1) if c else np.zeros(p)
        m2 = ((part - mean[:, None]) ** 2).sum(axis=1) if c else np.zeros(p)
        cols += [np.full(p, float(c)), mean, m2]
    _write(dst, np.stack(cols, axis=1).astype(_F32).reshape(dst.shape))
    _record(instr, DVE, [data], [dst])


def bn_aggr(dst, data, name=None):
    """dst (P, 2) = (mean, variance) per partition from the (count, mean, variance x count) triples of one or
    more bn_stats outputs laid side by side in data (P, 3k), in fp32 on VectorE (nki.isa.bn_aggr)."""
    instr = "bn_aggr"
    _onchip(instr, "data", data)
    _onchip(instr, "dst", dst)
    p, f = data.shape[0], data.free_size
    if f % 3:
        fail(instr, "data", f"{f} elements per partition; bn_aggr reads (count, mean, variance x count) triples")
    if dst.shape[0] != p or dst.free_size != 2:
        fail(instr, "dst", f"must be ({p}, 2), got {dst.shape}")
    t = data._get().reshape(p, f // 3, 3).astype(np.float64)
    cnt, mean, m2 = t[..., 0], t[..., 1], t[..., 2]
    total = cnt.sum(axis=1)
    with np.errstate(all="ignore"):
        mu = (cnt * mean).sum(axis=1) / total
        var = (m2.sum(axis=1) + (cnt * (mean - mu[:, None]) ** 2).sum(axis=1)) / total
    _write(dst, np.stack([mu, var], axis=1).astype(_F32).reshape(dst.shape))
    _record(instr, DVE, [data], [dst])


def nc_find_index8(dst, data, vals, name=None):
    """dst[p, j] = index of vals[p, j] in data[p] (first match; repeats advance); a miss gives all-ones."""
    instr = "nc_find_index8"
    _onchip(instr, "data", data)
    _onchip(instr, "vals", vals)
    _onchip(instr, "dst", dst)
    p, f = data.shape[0], data.free_size
    if vals.shape[0] != p or vals.free_size != 8:
        fail(instr, "vals", f"must be ({p}, 8), got {vals.shape}")
    if dst.shape[0] != p or dst.free_size != 8:
        fail(instr, "dst", f"must be ({p}, 8), got {dst.shape}")
    if dst.dtype not in (_dt.uint16, _dt.uint32):
        fail(instr, "dst", f"dtype must be uint16 or uint32, got {_dt.name(dst.dtype)}")
    x = data._get().reshape(p, f).astype(_F32)
    v = vals._get().reshape(p, 8).astype(_F32)
    miss = np.iinfo(dst.dtype).max
    out = np.full((p, 8), miss, dtype=np.int64)
    for r in range(p):
        used: dict = {}
        for j in range(8):
            hits = np.flatnonzero(x[r] == v[r, j])
            k = used.get(float(v[r, j]), 0)
            if k < hits.size:
                out[r, j] = hits[k]
                used[float(v[r, j])] = k + 1
    _write(dst, out.reshape(dst.shape))
    _record(instr, DVE, [data, vals], [dst])


# ============================================================================ DMA


def _hbm_race_check(instr, role, t: Tensor, write: bool):
    """Under LNC=2, flag shared-HBM elements one core writes and the other reads or writes."""
    log = t.storage.access_log
    prog = current()
    if log is None or prog.launch.lnc < 2:
        return
    pid, other = prog.pid, 1 - prog.pid
    seen = t._aux_get(log)
    conflict = (seen & ((1 << other) | (4 << other))) if write else (seen & (4 << other))
    if np.any(conflict):
        what = "writes" if write else "reads"
        fail(instr, role, f"program {pid} {what} shared-HBM elements of '{t.name or 'output'}' that program {other} "
             "also accesses (written by one core, used by the other) with no synchronisation")
    t._aux_or(log, np.uint8((4 << pid) if write else (1 << pid)))


def _lnc2_pair_program(instr: str, verb: str):
    """The current program, after checking that `instr` (an instruction between the two NeuronCores of an LNC=2
    pair) can run here: NeuronCore-v3 or newer, and a launch at LNC=2."""
    prog = current()
    tgt = prog.target
    if tgt.nc_version < 3:
        fail(instr, None, f"is available only on NeuronCore-v3 or newer (trn2, trn3); {tgt.name} is "
             f"NeuronCore-v{tgt.nc_version}")
    if prog.launch.lnc != 2:
        fail(instr, None, f"{verb} the two NeuronCores of an LNC=2 launch; this launch runs at "
             f"LNC={prog.launch.lnc}")
    return prog


def core_barrier(data, cores, engine=engine.gpsimd, name=None):
    """Both NeuronCores of an LNC=2 launch reach this point before either goes on (NeuronCore-v3+, LNC=2 only).

    `data`: the shared-HBM tensor the cores exchange through; writes to it before the barrier by one core are
    visible to the other after it (the emulator's race check on `data` starts afresh). `cores`: (0, 1), the only
    set the docs allow. `engine`: the engine that runs the barrier (GpSimd by default); on the device only that
    engine blocks, and instructions that touch `data` after the barrier wait for it. The emulator runs the two
    program instances in turn between barriers (runtime.py)."""
    instr = "core_barrier"
    _tensor(instr, "data", data)
    prog = _lnc2_pair_program(instr, "synchronises")
    if not isinstance(cores, (tuple, list)) or tuple(cores) != (0, 1) or \
            any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cores):
        fail(instr, "cores", f"must be (0, 1), the only set supported under LNC=2, got {cores!r}")
    if data.buffer is not _shared_hbm:
        fail(instr, "data", f"must be a tensor in nl.shared_hbm (the data both cores exchange), got "
             f"{data.buffer.name}")
    eng = _pick_engine(instr, engine, POOL, (PE, ACT, DVE, POOL))
    _record(instr, eng, [data], [data], barrier=True)
    prog.launch.barrier(prog.pid, data.storage, instr)


# sendrecv with dma_engine.gpsimd_dma: at most this many bytes per partition for 8-, 16- and 32-bit types
# (isa stub docstring: 256 / 512 / 1024 bytes, i.e. 256 elements per partition)
_SENDRECV_GPSIMD_MAX_BYTES = {1: 256, 2: 512, 4: 1024}


def sendrecv(src, dst, send_to_rank, recv_from_rank, pipe_id, dma_engine=dma_engine.dma, name=None):
    """Exchange SBUF tiles between the two NeuronCores of an LNC=2 launch (NeuronCore-v3+): this core's `src`
    lands in `dst` of core `send_to_rank` while `dst` here receives core `recv_from_rank`'s `src`.

    Constraints (isa stub docstring): `src` and `dst` in SBUF, same dtype, same shape (partitions and elements
    per partition); ranks 0 or 1 (the emulator models the exchange between the two cores, so each core names
    the other); `pipe_id` groups sendrecvs that complete together; `dma_engine.gpsimd_dma` runs on GpSimd's
    internal DMA and allows at most 256 / 512 / 1024 bytes per partition for 8- / 16- / 32-bit types.

    Emulation: the cores' sendrecv and core_barrier calls are paired in program order (runtime.py `sync`);
    both cores must reach the matching sendrecv (same `pipe_id`, same shape and dtype) before either goes on,
    then each core's `dst` holds the other's `src` as it was when that core issued the call. The cost model
    releases both cores together (costmodel.py, `sendrecv_*` constants)."""
    instr = "sendrecv"
    prog = _lnc2_pair_program(instr, "exchanges data between")
    for role, t in (("src", src), ("dst", dst)):
        _tensor(instr, role, t)
        if t.buffer.kind != "sbuf":
            fail(instr, role, f"must be in SBUF, got {t.buffer.name}")
        _onchip(instr, role, t, allow=("sbuf",))
    if src.dtype != dst.dtype:
        fail(instr, "dst", f"dtype {_dt.name(dst.dtype)} differs from src's {_dt.name(src.dtype)}")
    if tuple(src.shape) != tuple(dst.shape):
        fail(instr, "dst", f"shape {tuple(dst.shape)} differs from src's {tuple(src.shape)}")
    other = 1 - prog.pid
    for role, r in (("send_to_rank", send_to_rank), ("recv_from_rank", recv_from_rank)):
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or int(r) not in (0, 1):
            fail(instr, role, f"must be 0 or 1 (the two NeuronCores of the LNC=2 pair), got {r!r}")
        if int(r) != other:
            fail(instr, role, f"must name the other core of the pair ({other}) on program {prog.pid}, got {r!r}")
    if isinstance(pipe_id, (bool, np.bool_)) or not isinstance(pipe_id, (int, np.integer)) or pipe_id < 0:
        fail(instr, "pipe_id", f"must be a non-negative integer, got {pipe_id!r}")
    mode = globals()["dma_engine"]
    if not isinstance(dma_engine, mode):
        fail(instr, "dma_engine", f"must be nisa.dma_engine.dma or nisa.dma_engine.gpsimd_dma, got {dma_engine!r}")
    per_partition = src.free_size * src.dtype.itemsize
    if dma_engine is mode.gpsimd_dma:
        limit = _SENDRECV_GPSIMD_MAX_BYTES.get(src.dtype.itemsize)
        if limit is None or per_partition > limit:
            fail(instr, "src", f"{per_partition} bytes per partition ({_dt.name(src.dtype)}) exceed the "
                 f"dma_engine.gpsimd_dma limit of {limit} bytes per partition (1024 for 32-bit, 512 for 16-bit, "
                 "256 for 8-bit types); use dma_engine.dma or split the tile")
    payload = (np.array(src._get(), copy=True), tuple(src.shape), _dt.name(src.dtype))
    eng = POOL
    _record(instr, eng, [src], [dst], barrier=True, sendrecv=dma_engine.name, pipe_id=int(pipe_id),
            bytes=src.size * src.dtype.itemsize, bytes_per_partition=per_partition)
    got = prog.launch.sync(prog.pid, ("sendrecv", int(pipe_id)), payload, instr)
    values, shape, dtype = got[other]
    if shape != tuple(dst.shape) or dtype != _dt.name(dst.dtype):
        fail(instr, "dst", f"program {prog.pid} receives a {dtype} tile of shape {shape} from program {other} "
             f"into a {_dt.name(dst.dtype)} tile of shape {tuple(dst.shape)}: both cores' tiles must match")
    _write(dst, values.reshape(dst.shape))


def _dma_operand(instr, role, t):
    _tensor(instr, role, t)
    if t.buffer.kind == "psum":
        fail(instr, role, "is in PSUM; DMA cannot read or write PSUM (evict it with nisa.tensor_copy)")
    if t.on_chip and t.shape[0] > current().target.pmax:
        fail(instr, role, f"partition dim {t.shape[0]} exceeds {current().target.pmax}")
    return t


def dma_copy(dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
             name=None):
    """Copy src to dst (HBM<->SBUF, SBUF->SBUF, HBM->HBM); equal element counts; casts through fp32.

    Parameter order as in NKI 0.6 (`priority` third): pass everything after `src` by keyword."""
    instr = "dma_copy"
    _dma_operand(instr, "src", src)
    _dma_operand(instr, "dst", dst)
    if src.size != dst.size:
        fail(instr, "dst", f"{dst.size} elements do not match src's {src.size} (shapes {dst.shape} <- {src.shape})")
    mode = globals()["dge_mode"]
    if dge_mode is mode.hwdge and src.dtype != dst.dtype:
        fail(instr, "dst", "hardware DGE cannot cast; dtypes must be equal")
    if priority is not None and current().target.nc_version < 4:
        fail(instr, "priority", "DMA priority exists only on NeuronCore-v4 (trn3)")
    oob = globals()["oob_mode"]
    if not isinstance(oob_mode, oob):
        fail(instr, "oob_mode", f"must be a nisa.oob_mode member (enum arguments take members, not ints), "
             f"got {oob_mode!r}")
    if not isinstance(dge_mode, mode):
        fail(instr, "dge_mode", f"must be a nisa.dge_mode member, got {dge_mode!r}")
    _check_dge_mode(instr, [src], [dst], dge_mode, engine)
    skip = oob_mode is oob.skip
    if src.on_chip is False:
        _hbm_race_check(instr, "src", src, write=False)
    if skip and src.dyn is not None:
        # skipped source elements leave the destination untouched
        idx, valid = src._flat_index(oob_skip=True)
        vals = np.array(dst._get()).reshape(src.shape).astype(src.dtype)
        vals[valid] = src.storage.data[idx[valid]]
    else:
        vals = src._get(who=instr)
    if src.dtype != dst.dtype:
        vals = vals.astype(np.float64) if _dt.is_int(src.dtype) else vals.astype(_F32)
    if not dst.on_chip:
        _hbm_race_check(instr, "dst", dst, write=True)
    _write(dst, np.asarray(vals).reshape(dst.shape), oob_skip=skip, who=instr)
    _record(instr, DMA, [src], [dst], bytes=dst.size * dst.dtype.itemsize,
            dynamic=src.dyn is not None or dst.dyn is not None, **_dge_meta([src], [dst], dge_mode))


def _check_dge_mode(instr, srcs, dsts, mode, engine=None, transpose=False):
    """The documented combinations of an explicit dge_mode with a DMA's access: the `dma_copy` / `dma_transpose`
    docstrings of the NKI 0.7 API (authoritative where the DGE deep dive, nki-dge.rst, differs: its summary table
    also lists `none` for static transposes and "any mode" for scalar_offset copies). Hardware DGE exists on
    NeuronCore-v3+; a dynamic address needs swdge or hwdge (not none), an indirect (vector_offset) one swdge (or
    unknown); a direct transpose takes unknown or hwdge, an indirect one unknown or swdge; `engine` (sync or scalar)
    is only valid with hwdge; a hardware-DGE transpose needs a 2-byte source with shape[-1] <= 128 and shape[0] == 16
    (2-D) or shape[0] in {1, 2, 4, 8, 16} with shape[0] * shape[-2] % 16 == 0 (3-D / 4-D)."""
    m = globals()["dge_mode"]
    views = [t for t in list(srcs) + list(dsts) if isinstance(t, Tensor)]
    indirect = any(t.dyn is not None and t.dyn.vector is not None for t in views)
    dynamic = any(t.dyn is not None for t in views)
    if mode is m.hwdge and current().target.nc_version < 3:
        fail(instr, "dge_mode", "hardware DGE exists only on NeuronCore-v3 and newer (the dge_mode docstring)")
    if indirect and mode not in (m.unknown, m.swdge):
        fail(instr, "dge_mode", f"an indirect (vector_offset) access takes dge_mode unknown or swdge, got "
             f"{mode.name}")
    if dynamic and mode is m.none:
        fail(instr, "dge_mode", "dge_mode none uses descriptors the runtime builds before execution: a dynamic "
             "(scalar_offset / vector_offset) address needs swdge or hwdge")
    if transpose and not indirect and mode not in (m.unknown, m.hwdge):
        fail(instr, "dge_mode", f"a direct DMA transpose takes dge_mode unknown or hwdge, got {mode.name}")
    eng = globals()["engine"]
    if engine is not None and engine is not eng.unknown:
        if engine not in (eng.scalar, eng.sync):
            fail(instr, "engine", f"the DGE trigger is nisa.engine.sync or nisa.engine.scalar, got {engine!r}")
        if mode is not m.hwdge:
            fail(instr, "engine", f"engine is only valid with dge_mode=hwdge, got dge_mode {mode.name}")
    if transpose and mode is m.hwdge:
        src = srcs[0]
        shape = src.shape
        ok = src.dtype.itemsize == 2 and shape[-1] <= 128 and (
            shape[0] == 16 if len(shape) == 2 else shape[0] in (1, 2, 4, 8, 16) and shape[0] * shape[-2] % 16 == 0)
        if not ok:
            fail(instr, "dge_mode", f"a hardware-DGE transpose needs a 2-byte src with shape[-1] <= 128 and "
                 f"shape[0] == 16 (2-D) or shape[0] in {{1, 2, 4, 8, 16}}, shape[0] * shape[-2] % 16 == 0 "
                 f"(3-D / 4-D); got {shape}")


def _dge_meta(srcs, dsts, mode) -> dict:
    """Trace metadata for the cost model: the descriptor generator a DMA uses (dge: none | hwdge | swdge).

    An explicit dge_mode is kept. Otherwise (unknown, the compiler's choice) static DMAs use host-built
    descriptors (none); indirect ones (vector_offset) need software DGE on GpSimd (nki-dge.rst); other dynamic
    ones (scalar_offset) use the hardware DGE on NeuronCore-v3+ and software DGE on v2 (no hardware DGE)."""
    views = [t for t in list(srcs) + list(dsts) if isinstance(t, Tensor)]
    indirect = any(t.dyn is not None and t.dyn.vector is not None for t in views)
    dynamic = any(t.dyn is not None for t in views)
    m = globals()["dge_mode"]
    if mode is m.hwdge:
        dge = "hwdge"
    elif mode is m.swdge:
        dge = "swdge"
    elif mode is m.none and not dynamic:
        dge = "none"
    elif indirect:
        dge = "swdge"
    elif dynamic:
        dge = "hwdge" if current().target.nc_version >= 3 else "swdge"
    else:
        dge = "none"
    return {"dge": dge, "indirect": indirect}


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, name=None):
    """dst = src with its axes permuted (default: reversed), by DMA; 2-byte dtypes only."""
    instr = "dma_transpose"
    if priority is not None and current().target.nc_version < 4:
        fail(instr, "priority", "DMA priority exists only on NeuronCore-v4 (trn3)")
    if not isinstance(oob_mode, globals()["oob_mode"]):
        fail(instr, "oob_mode", f"must be a nisa.oob_mode member, got {oob_mode!r}")
    if oob_mode is not globals()["oob_mode"].error:
        fail(instr, "oob_mode", "oob_mode=skip is not emulated for dma_transpose")
    if not isinstance(dge_mode, globals()["dge_mode"]):
        fail(instr, "dge_mode", f"must be a nisa.dge_mode member, got {dge_mode!r}")
    _dma_operand(instr, "src", src)
    _dma_operand(instr, "dst", dst)
    _check_dge_mode(instr, [src], [dst], dge_mode, transpose=True)
    if src.dtype.itemsize != 2:
        fail(instr, "src", f"dtype {_dt.name(src.dtype)} is not a 2-byte dtype; DMA transpose needs bf16/fp16")
    if dst.dtype != src.dtype:
        fail(instr, "dst", "dtype must equal src's")
    nd = len(src.shape)
    if not 2 <= nd <= 4:
        fail(instr, "src", f"must be 2-D to 4-D, got {nd}-D")
    default_axes = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}[nd]
    axes = default_axes if axes is None else tuple(int(a) for a in axes)
    if axes != default_axes:
        fail(instr, "axes", f"{axes} is not supported for a {nd}-D source; DMA transpose supports only "
             "(1, 0), (2, 1, 0) and (3, 1, 2, 0)")
    want = tuple(src.shape[a] for a in axes)
    if dst.shape != want:
        fail(instr, "dst", f"shape {dst.shape} must be {want} (src {src.shape} permuted by {axes})")
    if not src.on_chip:
        _hbm_race_check(instr, "src", src, write=False)
    if not dst.on_chip:
        _hbm_race_check(instr, "dst", dst, write=True)
    _write(dst, np.transpose(src._get(who=instr), axes))
    _record(instr, DMA, [src], [dst], bytes=dst.size * dst.dtype.itemsize, transpose=True,
            dynamic=src.dyn is not None or dst.dyn is not None, **_dge_meta([src], [dst], dge_mode))


_DMA_COMPUTE_MAX_SRCS = 16   # "The max number of source tensors in srcs is 16" (nisa.dma_compute docstring)


def _indirect(t):
    return t.dyn is not None and t.dyn.vector is not None


def _check_dma_compute_rmw(instr, dst, srcs, unique_indices):
    """The documented read-modify-write forms of `dma_compute` with a vector_offset (the nisa.dma_compute docstring,
    NKI 0.6 stubs): Scatter RMW, dst(HBM)[indices] = dst(HBM)[indices] + src(SB), and Gather RMW,
    dst(SB) = dst(SB) + src(HBM)[indices]; "Both modes require: Exactly 2 source tensors ... unique_indices must be
    True (non-unique indices not yet supported)". Any other use of an indirect operand is refused."""
    if not (_indirect(dst) or any(_indirect(s) for s in srcs)):
        return
    if len(srcs) != 2:
        fail(instr, "srcs", f"with a vector_offset operand dma_compute is a read-modify-write of exactly 2 source "
             f"tensors (scatter: dst(HBM)[idx] += src(SBUF); gather: dst(SBUF) += src(HBM)[idx]), got {len(srcs)}")
    if not unique_indices:
        fail(instr, "unique_indices", "must be True with a vector_offset (non-unique indices are not supported)")
    same = [i for i, s in enumerate(srcs) if s.storage is dst.storage and s.offset == dst.offset
            and tuple(s.shape) == tuple(dst.shape)]
    if not same:
        fail(instr, "srcs", "with a vector_offset one source must be dst itself (a read-modify-write)")
    other = srcs[1 - same[0]]
    if dst.on_chip:
        if _indirect(dst) or other.on_chip or not _indirect(other):
            fail(instr, "srcs", "gather read-modify-write: dst in SBUF, the other source in HBM with the vector_offset")
    elif not _indirect(dst) or not other.on_chip or _indirect(other):
        fail(instr, "dst", "scatter read-modify-write: dst in HBM with the vector_offset, the other source in SBUF")


def dma_compute(dst, srcs, reduce_op, scales=None, unique_indices=True, oob_mode=oob_mode.error, name=None):
    """Accumulating DMA: dst = reduce_op over srcs[i] * scales[i] (fp32 inside), e.g. scatter-add.

    As documented for NKI 0.5/0.6: reduce_op must be nl.add and every scale 1.0. With a dynamic (vector_offset)
    dst, `unique_indices=True` promises the indices are distinct; duplicates are rejected here because the
    device would lose updates. Pass arguments by keyword (the positional order differs between releases).
    """
    instr = "dma_compute"
    _dma_operand(instr, "dst", dst)
    fn = _ops.get(reduce_op, instr, "reduce_op")
    if fn.name != "add":
        fail(instr, "reduce_op", f"only nl.add is supported by the DMA compute engines, got {fn!r}")
    if scales is not None and any(float(x) != 1.0 for x in scales):
        fail(instr, "scales", f"every scale must be 1.0 (documented restriction), got {list(scales)}")
    if dst.dyn is not None and dst.dyn.vector is not None and unique_indices:
        idx = dst.dyn.vector._get().reshape(-1)
        if oob_mode is globals()["oob_mode"].skip:
            idx = idx[(idx >= 0)]
        if np.unique(idx).size != idx.size:
            fail(instr, "dst", "vector_offset indices repeat while unique_indices=True; duplicate scatter-add "
                 "targets lose updates on the device (pass unique_indices=False or deduplicate)")
    if not isinstance(srcs, (list, tuple)) or not srcs:
        fail(instr, "srcs", "must be a non-empty tuple of tensors")
    if len(srcs) > _DMA_COMPUTE_MAX_SRCS:
        fail(instr, "srcs", f"at most {_DMA_COMPUTE_MAX_SRCS} source tensors (documented), got {len(srcs)}")
    _check_dma_compute_rmw(instr, dst, srcs, unique_indices)
    if scales is not None and len(scales) != len(srcs):
        fail(instr, "scales", f"needs one scale per src ({len(srcs)}), got {len(scales)}")
    acc = None
    for i, s in enumerate(srcs):
        _dma_operand(instr, f"srcs[{i}]", s)
        if s.size != dst.size:
            fail(instr, f"srcs[{i}]", f"{s.size} elements do not match dst's {dst.size}")
        if not s.on_chip:
            _hbm_race_check(instr, f"srcs[{i}]", s, write=False)
        if s.dyn is not None and oob_mode is globals()["oob_mode"].skip:
            idx, valid = s._flat_index(oob_skip=True)
            v = np.zeros(s.shape, dtype=_F32)
            v[valid] = s.storage.data[idx[valid]].astype(_F32)
            v = v.reshape(dst.shape)
        else:
            v = s._get(who=instr).astype(_F32).reshape(dst.shape)
        if scales is not None:
            v = v * np.float32(scales[i])
        acc = v if acc is None else fn.apply(acc, v)
    if not dst.on_chip:
        t = dst
        log = t.storage.access_log
        if log is not None and current().launch.lnc > 1:
            # the dst is read-modify-written; reading it back is part of the same DMA
            t._aux_set(log, t._aux_get(log) & ~np.uint8(1 << current().pid))
        _hbm_race_check(instr, "dst", dst, write=True)
    _write(dst, acc, oob_skip=oob_mode is globals()["oob_mode"].skip, who=instr)
    _record(instr, DMA, list(srcs), [dst], bytes=dst.size * dst.dtype.itemsize * (1 + len(srcs)),
            dynamic=any(s.dyn is not None for s in srcs) or dst.dyn is not None, compute=fn.name,
            **_dge_meta(list(srcs), [dst], globals()["dge_mode"].unknown))


# virtual registers (loop bounds, while conditions, DMA scalar offsets): registers.py
from .registers import (VirtualRegister, register_alloc, register_load, register_move,  # noqa: E402,F401
                        register_store)
