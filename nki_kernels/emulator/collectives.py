"""`nki.collectives` emulated: collectives between the ranks of one multi-rank run, on HBM and SBUF tensors.

Signatures are those of the NKI stubs (aws-neuron-sdk ``nki/api/nki/collectives/__init__.py``, NKI 0.6 / 0.7):
``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``, ``collective_permute``, ``rank_id`` and
``ReplicaGroup`` (a list of rank-lists, plus ``ReplicaGroup.from_partition_op``). A kernel calls them as on
hardware: ``from ..backend import nki`` and ``nki.collectives.all_reduce(srcs=[a], dsts=[b], replica_group=g,
op=nl.add)``.

How ranks run (the emulator's equivalent of one launch on several NeuronCores):
``multi_rank_simulate(kernel, world_size=N, per_rank_inputs=[(args, kwargs), ...])`` (the real
``nki.multi_rank_simulate`` signature) runs the N rank programs together, each in its own thread with its own
program stack, SBUF, PSUM and HBM tensors. Every collective is a rendezvous: each rank posts a copy of its
sources, all ranks of the world meet, each computes its destinations from the posted data of its own
rank-list, and all meet again before going on. A rank that reaches a collective the others never reach (or
a different collective, or different shapes) fails with an EmulatorCheckError naming both ranks.
``run_ranks(...)`` does the same and returns one RunResult whose traces are all ranks' program instances
(rank-major), so the cost model times the launch as its slowest rank.

Emulator conventions, where the docs are silent:
* Reductions accumulate in fp32 (int64 for integer tensors) in rank-list order and round once to dst's dtype.
* Under LNC=2 both program instances of a rank run the kernel (two threads taking turns, see runtime.py);
  program p of each rank exchanges with program p of the other ranks (so a kernel that splits a collective by
  ``nl.program_id`` moves each core's share).
* ``rank_id()`` returns the rank as a (1, 1) int32 SBUF tile (on hardware a register): use it as a DMA
  ``scalar_offset`` or in compute, never in Python control flow (a kernel is traced once for every rank).
* ``all_gather_v``, ``all_to_all_v`` and the ``collective_permute_implicit*`` family are not emulated (they
  fail with a message saying so).
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np

from . import dtypes as _dt
from . import ops as _ops
from . import runtime as _runtime
from .errors import EmulatorCheckError, fail
from .runtime import RunResult, _Bound, _plain_lnc, Kernel, _tls, current, launch, record_result
from .targets import get_target
from .tensor import Tensor
from .tensor import private_hbm as _private_hbm
from .trace import DMA, POOL

_F32 = np.float32
SYNC_TIMEOUT_S = 600.0          # a rank waiting this long for the others is a deadlock


# ============================================================================ replica groups


class rg_partition_op(enum.Enum):
    """How `ReplicaGroup.from_partition_op` maps a rank to its rank-list id."""
    bitwise_and = 0
    div = 1
    mod = 2


@dataclass
class ReplicaGroup:
    """The set of ranks a collective runs on, as a list of rank-lists (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``).

    The collective runs independently within each rank-list, all rank-lists in parallel; a rank is in at
    most one rank-list."""
    rank_lists: list

    def __post_init__(self):
        lists = self.rank_lists
        if not isinstance(lists, (list, tuple)) or not lists:
            fail("ReplicaGroup", "rank_lists", f"must be a non-empty list of rank-lists, got {lists!r}")
        seen = set()
        out = []
        for rl in lists:
            if not isinstance(rl, (list, tuple)) or not rl:
                fail("ReplicaGroup", "rank_lists", f"each rank-list must be a non-empty list of ranks, got {rl!r}")
            for r in rl:
                if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
                    fail("ReplicaGroup", "rank_lists", f"ranks are non-negative ints, got {r!r}")
                if int(r) in seen:
                    fail("ReplicaGroup", "rank_lists", f"rank {int(r)} appears in more than one place; each rank "
                         "participates in only one rank-list")
                seen.add(int(r))
            out.append([int(r) for r in rl])
        self.rank_lists = out

    @staticmethod
    def from_partition_op(world_size: int, op: rg_partition_op, operand: int) -> "ReplicaGroup":
        """Partition ranks [0, world_size): ranks with equal ``op(rank, operand)`` form one rank-list."""
        if not isinstance(op, rg_partition_op):
            fail("ReplicaGroup.from_partition_op", "op", f"must be an rg_partition_op member, got {op!r}")
        if op is not rg_partition_op.bitwise_and and operand <= 0:
            fail("ReplicaGroup.from_partition_op", "operand", f"must be positive for {op.name}, got {operand}")
        key = {rg_partition_op.bitwise_and: lambda r: r & operand, rg_partition_op.div: lambda r: r // operand,
               rg_partition_op.mod: lambda r: r % operand}[op]
        groups: dict = {}
        for r in range(int(world_size)):
            groups.setdefault(key(r), []).append(r)
        return ReplicaGroup([groups[k] for k in sorted(groups)])

    def rank_list_of(self, rank: int) -> list | None:
        for rl in self.rank_lists:
            if rank in rl:
                return rl
        return None


# ============================================================================ the multi-rank world


class _Aborted(Exception):
    """Raised in a rank whose partner rank failed first (the partner's error is the one reported)."""


class _World:
    """Rendezvous state shared by the rank threads of one multi-rank run."""

    def __init__(self, world_size: int, lnc: int, target):
        self.n = world_size
        self.lnc = lnc
        self.target = target
        self.cond = threading.Condition()
        self.arrived: dict = {}        # pid -> ranks arrived at the current rendezvous
        self.gen: dict = {}            # pid -> rendezvous generation
        self.posts: dict = {}          # (pid, k) -> {rank: post}
        self.where: dict = {}          # rank -> description of the collective it waits at
        self.done: set = set()
        self.failed = False

    def sync(self, pid: int, rank: int, what: str):
        with self.cond:
            g = self.gen.get(pid, 0)
            c = self.arrived.get(pid, 0) + 1
            if c == self.n:
                self.arrived[pid] = 0
                self.gen[pid] = g + 1
                self.cond.notify_all()
                return
            self.arrived[pid] = c
            self.where[rank] = what
            waited = 0.0
            while self.gen.get(pid, 0) == g:
                if self.failed:
                    raise _Aborted()
                if self.done:
                    other = min(self.done)
                    fail(what.split(" ")[0], None, f"rank {rank} waits at {what}, but rank {other} finished its "
                         "kernel without reaching it: every rank must issue the same collectives in the same order")
                if waited > SYNC_TIMEOUT_S:
                    fail(what.split(" ")[0], None, f"rank {rank} waited {SYNC_TIMEOUT_S:.0f} s at {what}: deadlock")
                self.cond.wait(0.5)
                waited += 0.5
            self.where.pop(rank, None)

    def finish(self, rank: int, ok: bool):
        with self.cond:
            if ok:
                self.done.add(rank)
            else:
                self.failed = True
            self.cond.notify_all()


class _RankContext(threading.local):
    def __init__(self):
        self.world: _World | None = None
        self.rank = 0
        self.calls: dict = {}          # pid -> collectives issued so far


_ctx = _RankContext()


def _inherit_rank_context():
    """The program threads of an LNC=2 launch run as the rank of the thread that launched them."""
    world, rank, calls = _ctx.world, _ctx.rank, _ctx.calls

    def apply():
        _ctx.world, _ctx.rank, _ctx.calls = world, rank, calls
    return apply


_runtime.thread_state_hooks.append(_inherit_rank_context)


def _world_and_rank(instr):
    w = _ctx.world
    if w is None:
        fail(instr, None, "collectives need several ranks: run the kernel with nki.multi_rank_simulate(kernel, "
             "world_size=N, per_rank_inputs=...) (or nki_kernels.emulator.collectives.run_ranks)")
    return w, _ctx.rank


def _normalize_inputs(world_size, per_rank_inputs):
    if isinstance(per_rank_inputs, dict):
        if sorted(per_rank_inputs) != list(range(world_size)):
            fail("multi_rank_simulate", "per_rank_inputs", f"a mapping needs one key per rank 0..{world_size - 1}, "
                 f"got keys {sorted(per_rank_inputs)}")
        pairs = [per_rank_inputs[r] for r in range(world_size)]
    else:
        pairs = list(per_rank_inputs)
        if len(pairs) != world_size:
            fail("multi_rank_simulate", "per_rank_inputs", f"needs {world_size} (args, kwargs) pairs, got {len(pairs)}")
    out = []
    for r, pr in enumerate(pairs):
        if not (isinstance(pr, (tuple, list)) and len(pr) == 2 and isinstance(pr[0], (tuple, list))
                and isinstance(pr[1], dict)):
            fail("multi_rank_simulate", "per_rank_inputs", f"rank {r}: each entry is an (args tuple, kwargs dict) "
                 f"pair, got {type(pr).__name__}")
        out.append((tuple(pr[0]), dict(pr[1])))
    # same parameters; arrays same shape/dtype; other arguments equal
    a0, k0 = out[0]
    for r, (a, k) in enumerate(out[1:], start=1):
        if len(a) != len(a0) or sorted(k) != sorted(k0):
            fail("multi_rank_simulate", "per_rank_inputs", f"rank {r} passes different parameters than rank 0")
        for name, x, y in [(str(i), x, y) for i, (x, y) in enumerate(zip(a0, a))] + [(n, k0[n], k[n]) for n in k0]:
            xa, ya = hasattr(x, "__array_interface__"), hasattr(y, "__array_interface__")
            if xa or ya:
                if not (xa and ya) or np.shape(x) != np.shape(y) or np.asarray(x).dtype != np.asarray(y).dtype:
                    fail("multi_rank_simulate", "per_rank_inputs", f"argument {name}: tensors must have the same "
                         f"shape and dtype on every rank (rank 0 {np.shape(x)}, rank {r} {np.shape(y)})")
            elif not _static_equal(x, y):
                fail("multi_rank_simulate", "per_rank_inputs", f"argument {name}: non-tensor arguments are static "
                     f"and must be equal on every rank, got {x!r} (rank 0) and {y!r} (rank {r})")
    return out


def _static_equal(x, y) -> bool:
    try:
        return bool(x == y)
    except Exception:
        return x is y


def _run_ranks(kernel, *, world_size: int, per_rank_inputs, lnc: int | None = None, target=None) -> RunResult:
    """Run `kernel` on `world_size` ranks together (collectives exchange data between them).

    kernel: an ``nki.jit`` kernel, ``kernel[lnc]`` or a plain function; per_rank_inputs: one (args, kwargs) pair
    per rank (a sequence in rank order or a {rank: pair} mapping). Returns one RunResult: ``outputs`` is the list
    of the ranks' outputs, ``traces`` all ranks' program instances (rank-major, ``lnc`` per rank),
    ``rank_results`` the per-rank RunResults. The launch is recorded once (``record_launches``)."""
    # LNC as for one launch (runtime.run): `lnc=` launches and compiles at that degree (NEURON_LOGICAL_NC_CONFIG=lnc);
    # else the kernel's own degree (kernel[n], or the variable, else 1) against the degree in force
    if isinstance(kernel, _Bound):
        fn, lnc_k = kernel.kernel.fn, kernel.lnc
    else:
        fn, lnc_k = (kernel.fn if isinstance(kernel, Kernel) else kernel), _plain_lnc()
    compile_lnc = lnc
    lnc = lnc_k if lnc is None else lnc
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        fail("multi_rank_simulate", "world_size", f"must be a positive int, got {world_size!r}")
    world_size = int(world_size)
    pairs = _normalize_inputs(world_size, per_rank_inputs)
    tgt = get_target(target)
    world = _World(world_size, lnc, tgt)
    results: list = [None] * world_size
    errors: list = [None] * world_size

    def body(rank):
        _ctx.world, _ctx.rank, _ctx.calls = world, rank, {}
        _tls.quiet = True
        ok = False
        try:
            args, kwargs = pairs[rank]
            results[rank] = launch(fn, lnc, args, kwargs, tgt, compile_lnc)
            ok = True
        except BaseException as e:      # noqa: BLE001 - reported by the caller's thread
            errors[rank] = e
        finally:
            world.finish(rank, ok)
            _ctx.world = None
            _tls.quiet = False

    threads = [threading.Thread(target=body, args=(r,), name=f"nki-rank-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
    if real:
        raise real[0]
    if any(e is not None for e in errors):
        raise EmulatorCheckError("multi_rank_simulate", None, "a rank stopped without an error report")
    traces = [tr for res in results for tr in res.traces]
    combined = RunResult([r.outputs for r in results], traces, tgt, lnc,
                         [p for r in results for p in r.sbuf_peak_bytes],
                         [b for r in results for b in r.psum_peak_banks])
    combined.ranks = world_size
    combined.rank_results = results
    record_result(combined)
    return combined


def _multi_rank_simulate(kernel, *, world_size: int, per_rank_inputs) -> list:
    """`nki.multi_rank_simulate`: run `kernel` on `world_size` ranks in one process; returns each rank's outputs
    (a list in rank order). Rank r runs ``kernel(*args, **kwargs)`` with its (args, kwargs) pair."""
    return _run_ranks(kernel, world_size=world_size, per_rank_inputs=per_rank_inputs).outputs


# ============================================================================ operand checks


def _tensor_list(instr, role, lst):
    if isinstance(lst, Tensor) or not isinstance(lst, (list, tuple)) or not lst:
        fail(instr, role, f"must be a non-empty list of tensors, got {type(lst).__name__}")
    for i, t in enumerate(lst):
        if not isinstance(t, Tensor):
            fail(instr, f"{role}[{i}]", f"must be an NKI tensor, got {type(t).__name__}")
        if t.dyn is not None:
            fail(instr, f"{role}[{i}]", "dynamic (.ap() with an offset) views are not collective operands")
    return list(lst)


def _memory(instr, srcs, dsts, hbm_only=False, single=False):
    """'hbm' or 'sbuf': all operands in one memory; SBUF operands 2-D with one free dim; coalescing only on HBM."""
    if len(srcs) != len(dsts):
        fail(instr, "dsts", f"{len(dsts)} destinations for {len(srcs)} sources; they pair up one to one")
    kinds = {t.buffer.kind for t in srcs + dsts}
    if "psum" in kinds:
        fail(instr, "srcs", "PSUM tensors are not collective operands (HBM or SBUF only)")
    if len(kinds) > 1:
        fail(instr, "dsts", "mixing HBM and SBUF is not supported: all tensors on HBM or all on SBUF")
    kind = kinds.pop()
    if hbm_only and kind != "hbm":
        fail(instr, "srcs", "tensors must reside on HBM (SBUF is not supported for this collective)")
    if single and len(srcs) != 1:
        fail(instr, "srcs", f"exactly one tensor per list (coalescing is not supported here), got {len(srcs)}")
    if kind == "sbuf":
        if len(srcs) > 1:
            fail(instr, "srcs", "coalesced collectives (several tensors) are only supported on HBM")
        for role, t in (("srcs[0]", srcs[0]), ("dsts[0]", dsts[0])):
            if len(t.shape) != 2:
                fail(instr, role, f"SBUF collectives take 2-D tensors with one free dim, got shape {t.shape}")
    return kind


def _check_srcs_private(instr, srcs, kind):
    """At LNC=1 the sources must be private_hbm (documented for NKI 0.7)."""
    if kind == "hbm" and current().launch.lnc == 1:
        for i, t in enumerate(srcs):
            if t.buffer is not _private_hbm:
                fail(instr, f"srcs[{i}]", f"at LNC=1 collective sources must be on nl.private_hbm, got "
                     f"{t.buffer.name} (copy the input into a private_hbm tensor first)")


def _reduce_op(instr, op):
    fn = _ops.get(op, instr, "op")
    if fn.name not in ("add", "minimum", "maximum"):
        fail(instr, "op", f"must be nl.add, nl.minimum or nl.maximum, got {fn!r}")
    return fn.name


def _group(instr, replica_group, rank):
    if not isinstance(replica_group, ReplicaGroup):
        fail(instr, "replica_group", f"must be a nki.collectives.ReplicaGroup, got {type(replica_group).__name__}")
    w = _ctx.world
    for rl in replica_group.rank_lists:
        for r in rl:
            if r >= w.n:
                fail(instr, "replica_group", f"rank {r} does not exist in a world of {w.n} ranks")
    rl = replica_group.rank_list_of(rank)
    if rl is None:
        fail(instr, "replica_group", f"rank {rank} is in no rank-list of {replica_group.rank_lists}")
    return rl


def _check_dim(instr, collective_dim, kind, allowed_hbm=(0,), allowed_sbuf=(0,)):
    allowed = allowed_hbm if kind == "hbm" else allowed_sbuf
    if isinstance(collective_dim, bool) or collective_dim not in allowed:
        fail(instr, "collective_dim", f"must be one of {list(allowed)} for {kind.upper()} tensors, got "
             f"{collective_dim!r}")
    return int(collective_dim)


def _check_priority(instr, priority):
    if priority is not None and current().target.nc_version < 4:
        fail(instr, "priority", "DMA priority exists only on NeuronCore-v4 (trn3)")


# ============================================================================ rendezvous


def _signature(t: Tensor):
    return (t.shape, _dt.name(t.dtype), t.buffer.kind)


def _exchange(instr, srcs, dsts, meta, compute):
    """Post copies of srcs, meet the other ranks, let `compute(posts_by_rank) -> [arrays for dsts]`, write, meet."""
    w, rank = _world_and_rank(instr)
    prog = current()
    pid = prog.pid
    k = _ctx.calls.get(pid, 0)
    _ctx.calls[pid] = k + 1
    sig = (instr, meta.get("sig"), tuple(_signature(t) for t in srcs), tuple(_signature(t) for t in dsts))
    post = (sig, [np.array(t._get()) for t in srcs])
    with w.cond:
        w.posts.setdefault((pid, k), {})[rank] = post
    what = f"{instr} (collective #{k} of program {pid})"
    w.sync(pid, rank, what)
    posts = w.posts[(pid, k)]
    for r, (s, _) in sorted(posts.items()):
        if s != sig:
            fail(instr, None, f"rank {rank} issued {sig[0]} with operands {sig[2]} -> {sig[3]} as its "
                 f"collective #{k}, but rank {r} issued {s[0]} with {s[2]} -> {s[3]}: every rank must issue the "
                 "same collectives with the same shapes")
    try:
        values = compute({r: p[1] for r, p in posts.items()})
    finally:
        w.sync(pid, rank, what + " (exit)")
    if rank == 0:
        with w.cond:
            w.posts.pop((pid, k), None)
    from .isa import _write
    for t, v in zip(dsts, values):
        if v is not None:
            _write(t, np.asarray(v).reshape(t.shape), who=instr)
    return rank


def _acc_dtype(t: Tensor):
    return np.int64 if _dt.is_int(t.dtype) else _F32


def _reduce(op, arrays, dtype):
    acc = np.asarray(arrays[0]).astype(dtype)
    for a in arrays[1:]:
        a = np.asarray(a).astype(dtype)
        acc = acc + a if op == "add" else (np.minimum(acc, a) if op == "minimum" else np.maximum(acc, a))
    return acc


def _record(instr, srcs, dsts, rank_list, nbytes, **meta):
    from .isa import _record as _isa_record
    w = _ctx.world
    ranks_per_chip = max(1, w.target.cores_per_chip // max(1, w.lnc))
    chips = {r // ranks_per_chip for r in rank_list}
    _isa_record(instr, DMA, srcs, dsts, bytes=int(nbytes), collective=instr, ranks=len(rank_list),
                chips=len(chips), memory=srcs[0].buffer.kind, **meta)


# ============================================================================ the collectives


def all_reduce(srcs, dsts, replica_group, op, priority=None, name=None):
    """dsts[i] = op over the ranks of this rank's rank-list of srcs[i] (op: nl.add, nl.minimum, nl.maximum).

    srcs/dsts: lists of equal-shaped tensors, all on HBM or all on SBUF (SBUF: one 2-D tensor)."""
    instr = "all_reduce"
    srcs = _tensor_list(instr, "srcs", srcs)
    dsts = _tensor_list(instr, "dsts", dsts)
    kind = _memory(instr, srcs, dsts)
    opn = _reduce_op(instr, op)
    _check_priority(instr, priority)
    _check_srcs_private(instr, srcs, kind)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        if s.shape != d.shape:
            fail(instr, f"dsts[{i}]", f"shape {d.shape} must equal srcs[{i}]'s {s.shape}")
    w, rank = _world_and_rank(instr)
    rl = _group(instr, replica_group, rank)

    def compute(posts):
        return [_reduce(opn, [posts[r][i] for r in rl], _acc_dtype(dsts[i])) for i in range(len(srcs))]

    _exchange(instr, srcs, dsts, {"sig": (opn, tuple(map(tuple, replica_group.rank_lists)))}, compute)
    _record(instr, srcs, dsts, rl, sum(t.size * t.dtype.itemsize for t in srcs), op=opn)


def all_gather(srcs, dsts, replica_group, collective_dim, priority=None, name=None):
    """dsts[i] = the concatenation along `collective_dim` of srcs[i] of every rank of the rank-list, in rank-list
    order. HBM: collective_dim 0. SBUF (2-D): 0 (partitions) or 1 (the free dim)."""
    instr = "all_gather"
    srcs = _tensor_list(instr, "srcs", srcs)
    dsts = _tensor_list(instr, "dsts", dsts)
    kind = _memory(instr, srcs, dsts)
    dim = _check_dim(instr, collective_dim, kind, (0,), (0, 1))
    _check_priority(instr, priority)
    _check_srcs_private(instr, srcs, kind)
    w, rank = _world_and_rank(instr)
    rl = _group(instr, replica_group, rank)
    n = len(rl)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        want = list(s.shape)
        want[dim] *= n
        if tuple(want) != d.shape:
            fail(instr, f"dsts[{i}]", f"shape {d.shape} must be {tuple(want)} ({n} ranks' srcs[{i}] {s.shape} "
                 f"concatenated along dim {dim})")
        if d.dtype != s.dtype:
            fail(instr, f"dsts[{i}]", f"dtype {_dt.name(d.dtype)} must equal srcs[{i}]'s {_dt.name(s.dtype)}")
        if kind == "sbuf" and d.shape[0] > current().target.pmax:
            fail(instr, f"dsts[{i}]", f"{d.shape[0]} partitions exceed {current().target.pmax}")

    def compute(posts):
        return [np.concatenate([posts[r][i] for r in rl], axis=dim) for i in range(len(srcs))]

    _exchange(instr, srcs, dsts, {"sig": (dim, tuple(map(tuple, replica_group.rank_lists)))}, compute)
    _record(instr, srcs, dsts, rl, sum(t.size * t.dtype.itemsize for t in dsts), collective_dim=dim)


def _check_splits(instr, srcs, n):
    """Each srcs[i] splits into n equal chunks along dim 0 (reduce_scatter, all_to_all)."""
    for i, s in enumerate(srcs):
        if s.shape[0] % n:
            fail(instr, f"srcs[{i}]", f"dim 0 of size {s.shape[0]} does not split into {n} equal chunks")


def reduce_scatter(srcs, dsts, replica_group, collective_dim, op, priority=None, name=None):
    """dsts[i] = this rank's chunk (its index in the rank-list) of op over the rank-list of srcs[i], srcs split
    into len(rank-list) equal chunks along `collective_dim` (0)."""
    instr = "reduce_scatter"
    srcs = _tensor_list(instr, "srcs", srcs)
    dsts = _tensor_list(instr, "dsts", dsts)
    kind = _memory(instr, srcs, dsts)
    dim = _check_dim(instr, collective_dim, kind, (0,), (0,))
    opn = _reduce_op(instr, op)
    _check_priority(instr, priority)
    _check_srcs_private(instr, srcs, kind)
    w, rank = _world_and_rank(instr)
    rl = _group(instr, replica_group, rank)
    n = len(rl)
    _check_splits(instr, srcs, n)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        want = (s.shape[0] // n,) + tuple(s.shape[1:])
        if d.shape != want:
            fail(instr, f"dsts[{i}]", f"shape {d.shape} must be {want} (srcs[{i}] {s.shape} split {n} ways on dim 0)")
    me = rl.index(rank)

    def compute(posts):
        out = []
        for i in range(len(srcs)):
            red = _reduce(opn, [posts[r][i] for r in rl], _acc_dtype(dsts[i]))
            c = red.shape[0] // n
            out.append(red[me * c:(me + 1) * c])
        return out

    _exchange(instr, srcs, dsts, {"sig": (dim, opn, tuple(map(tuple, replica_group.rank_lists)))}, compute)
    _record(instr, srcs, dsts, rl, sum(t.size * t.dtype.itemsize for t in srcs), op=opn)


def all_to_all(srcs, dsts, replica_group, collective_dim, priority=None, name=None):
    """Split srcs[i] into len(rank-list) chunks along dim 0; chunk j goes to the j-th rank of the rank-list;
    dsts[i] = the chunks this rank received, concatenated in rank-list order. HBM only."""
    instr = "all_to_all"
    srcs = _tensor_list(instr, "srcs", srcs)
    dsts = _tensor_list(instr, "dsts", dsts)
    kind = _memory(instr, srcs, dsts, hbm_only=True)
    dim = _check_dim(instr, collective_dim, kind, (0,), (0,))
    _check_priority(instr, priority)
    _check_srcs_private(instr, srcs, kind)
    w, rank = _world_and_rank(instr)
    rl = _group(instr, replica_group, rank)
    n = len(rl)
    _check_splits(instr, srcs, n)
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        if d.shape != s.shape or d.dtype != s.dtype:
            fail(instr, f"dsts[{i}]", f"must match srcs[{i}] ({s.shape} {_dt.name(s.dtype)}), got {d.shape} "
                 f"{_dt.name(d.dtype)}")
    me = rl.index(rank)

    def compute(posts):
        out = []
        for i in range(len(srcs)):
            c = srcs[i].shape[0] // n
            out.append(np.concatenate([posts[r][i][me * c:(me + 1) * c] for r in rl], axis=0))
        return out

    _exchange(instr, srcs, dsts, {"sig": (dim, tuple(map(tuple, replica_group.rank_lists)))}, compute)
    _record(instr, srcs, dsts, rl, sum(t.size * t.dtype.itemsize for t in srcs) * (n - 1) // max(1, n))


def collective_permute(srcs, dsts, source_target_pairs, priority=None, name=None):
    """For each (source, target) pair, the target rank's dsts[0] receives the source rank's srcs[0]; a rank that
    is no pair's target keeps its dsts[0]. HBM only, one tensor per list."""
    instr = "collective_permute"
    srcs = _tensor_list(instr, "srcs", srcs)
    dsts = _tensor_list(instr, "dsts", dsts)
    kind = _memory(instr, srcs, dsts, hbm_only=True, single=True)
    _check_priority(instr, priority)
    _check_srcs_private(instr, srcs, kind)
    w, rank = _world_and_rank(instr)
    pairs = []
    try:
        pairs = [(int(a), int(b)) for a, b in source_target_pairs]
    except (TypeError, ValueError):
        fail(instr, "source_target_pairs", f"must be a list of (source, target) rank pairs, got "
             f"{source_target_pairs!r}")
    targets = [b for _, b in pairs]
    if len(set(targets)) != len(targets):
        fail(instr, "source_target_pairs", f"a rank is the target of more than one pair: {pairs}")
    for a, b in pairs:
        if not (0 <= a < w.n and 0 <= b < w.n):
            fail(instr, "source_target_pairs", f"pair ({a}, {b}) names a rank outside the world of {w.n} ranks")
    if srcs[0].shape != dsts[0].shape or srcs[0].dtype != dsts[0].dtype:
        fail(instr, "dsts[0]", f"must match srcs[0] ({srcs[0].shape} {_dt.name(srcs[0].dtype)}), got "
             f"{dsts[0].shape} {_dt.name(dsts[0].dtype)}")
    source = next((a for a, b in pairs if b == rank), None)

    def compute(posts):
        return [None if source is None else posts[source][0]]

    _exchange(instr, srcs, dsts, {"sig": tuple(pairs)}, compute)
    sends = any(a == rank for a, _ in pairs)
    members = sorted({r for p in pairs for r in p}) or [rank]
    _record(instr, srcs, dsts, members, srcs[0].size * srcs[0].dtype.itemsize if sends else 0)


def rank_id(name=None):
    """This rank's id, as a (1, 1) int32 SBUF tile (a runtime value: use it as a DMA scalar_offset or in compute)."""
    instr = "rank_id"
    w, rank = _world_and_rank(instr)
    prog = current()
    t = prog.allocate((1, 1), _dt.int32, _sbuf(), name or "rank_id", who=instr)
    from .isa import _record as _isa_record
    from .isa import _write
    _write(t, np.full((1, 1), rank))
    _isa_record(instr, POOL, [], [t])
    return t


def _sbuf():
    from .tensor import sbuf
    return sbuf


def _not_emulated(instr):
    fail(instr, None, "is not emulated (nki_kernels.emulator.collectives covers all_reduce, all_gather, "
         "reduce_scatter, all_to_all, collective_permute and rank_id)")


def all_gather_v(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False,
                 priority=None, name=None):
    _not_emulated("all_gather_v")


def all_to_all_v(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False,
                 priority=None, name=None):
    _not_emulated("all_to_all_v")


def collective_permute_implicit(srcs_by_channel, dsts_by_channel, replica_group, channel_ids=[0],  # noqa: B006
                                priority=None, name=None):
    _not_emulated("collective_permute_implicit")


def collective_permute_implicit_reduce(srcs0_by_channel, srcs1_by_channel, dsts_by_channel, replica_group, op,
                                       channel_ids=[0], priority=None, name=None):  # noqa: B006
    _not_emulated("collective_permute_implicit_reduce")


def collective_permute_implicit_current_processing_rank_id(iteration_id, replica_group, channel_id=0, name=None):
    _not_emulated("collective_permute_implicit_current_processing_rank_id")


# The multi-rank harness (`nki_kernels.emulator.multi_rank_simulate` / `run_ranks`) is not part of nki.collectives.
__all__ = ["ReplicaGroup", "rg_partition_op", "all_reduce", "all_gather", "reduce_scatter", "all_to_all",
           "collective_permute", "rank_id", "all_gather_v", "all_to_all_v",
           "collective_permute_implicit", "collective_permute_implicit_reduce",
           "collective_permute_implicit_current_processing_rank_id"]
