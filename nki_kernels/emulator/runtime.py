"""Kernel launch, program instances (LNC), allocation and on-chip memory accounting.

A launch runs the kernel body once per program instance (each instance has its own SBUF, PSUM, accumulator
registers and trace, and they share HBM). Under LNC=2 the instances run in two threads taking turns: each
runs until it reaches a `nisa.core_barrier` or its end, so the instances run one after the other between
barriers (deterministic), and both reach each barrier before either goes on. NumPy arrays
passed in become shared-HBM tensors; tensors the kernel returns must be shared-HBM allocations and come
back as NumPy arrays. Inputs the kernel wrote are copied back into the caller's arrays.

SBUF/PSUM accounting follows NKI scoping: a tensor is live while Python holds it, except that a new
allocation from the very same call stack (the same statement in the next loop iteration) retires the
previous one, since NKI frees loop-body tensors when the iteration's scope ends.

LNC as in NKI 0.7 (see `lnc.py`): a launch's degree is the bracket's `kernel[n]`, else
NEURON_LOGICAL_NC_CONFIG, else 1; it must equal the degree in force (the compiler's: `compiler_lnc` /
`run(compile_lnc=)`, else NEURON_LOGICAL_NC_CONFIG, else the target's default, 2 on trn2), else the launch
fails as neuronx-cc does (NCC_EVRF066).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import dtypes as _dt
from . import lnc as _lnc
from .errors import EmulatorCheckError, fail
from .targets import Target, get_target
from .tensor import MemoryRegion, Storage, Tensor, shared_hbm
from .trace import Trace

class _ProgramStack(threading.local):
    """The running program instances of this thread. Per thread, so that the ranks of a multi-rank run
    (`collectives.multi_rank_simulate`) can each run their own kernel in a thread of their own."""

    def __init__(self):
        self.items: list["Program"] = []
        self.quiet = False          # a rank of a multi-rank run: its launch is recorded by the run, not here


_tls = _ProgramStack()
_EMULATOR_DIR = os.path.dirname(os.path.abspath(__file__))


def current() -> "Program":
    stack = _tls.items
    if not stack:
        raise EmulatorCheckError("nki", None, "NKI language/ISA calls are only valid inside a running kernel "
                                 "(call it through nki.jit / nki.simulate / backend.call)")
    return stack[-1]


class _Aborted(Exception):
    """Raised in a program instance whose partner instance failed first (the partner's error is reported)."""


class _Launch:
    """State shared by the program instances of one launch.

    Under LNC > 1 the instances run in threads of their own that take turns, one running at a time: program
    0 runs until it reaches a `nisa.core_barrier` (or its end), then program 1 runs to the same point, and
    so on. When every instance has reached the barrier they all go on (program 0 first). Execution is
    deterministic; a kernel without barriers runs exactly as the instances one after the other."""

    def __init__(self, lnc: int, target: Target):
        self.lnc = lnc
        self.target = target
        self.shared_allocs: list[Storage] = []
        self.logged: list[Storage] = []      # shared-HBM storages with an access log (inputs and allocations)
        self.cond = threading.Condition()
        self.turn = 0
        self.finished = [False] * lnc
        self.arrived: dict = {}              # pid -> (barrier number, data storage) at the current barrier
        self.barriers_passed = [0] * lnc     # synchronisation points (core_barrier, sendrecv) passed
        self.exchanged: dict = {}            # sync number -> {pid: payload} (sendrecv data), until all read it
        self.collected: dict = {}
        self.failed = False
        self.error = None                    # a deadlock found by the turn-taking itself

    # ----------------------------------------------------------------- turn-taking (LNC > 1)
    def wait_turn(self, pid: int):
        """Block (condition held) until it is program `pid`'s turn."""
        while self.turn != pid:
            if self.failed:
                raise _Aborted()
            self.cond.wait()
        if self.failed:
            raise _Aborted()

    def _pass_turn(self, pid: int):
        """Give the turn to the next program after `pid` that has not finished (condition held)."""
        for q in list(range(pid + 1, self.lnc)) + list(range(0, pid)):
            if not self.finished[q]:
                self.turn = q
                self.cond.notify_all()
                return
        self.turn = -1
        self.cond.notify_all()

    def barrier(self, pid: int, storage: Storage, who: str):
        """Program `pid` reached a core barrier on `storage`: wait until every program has reached it."""
        self.sync(pid, ("core_barrier", storage), None, who)

    def sync(self, pid: int, key: tuple, payload, who: str) -> dict:
        """Program `pid` reached a synchronisation point (a `core_barrier` or a `sendrecv`): wait until every
        program has reached its matching one, then return {pid: payload} of all programs.

        The programs' synchronisation points are paired in program order: the k-th of one core meets the
        k-th of the other, and both must be the same kind (a barrier on the same tensor, or sendrecvs on the
        same `pipe_id`). A mismatch is a deadlock or a cross-pairing on the device and fails here."""
        with self.cond:
            k = self.barriers_passed[pid]
            for q, (kq, kk, _) in self.arrived.items():
                if kk[0] != key[0] or kk[1] is not key[1] and kk[1] != key[1]:
                    self.failed = True
                    self.cond.notify_all()
                    same = key[0] == "core_barrier" and kk[0] == "core_barrier"
                    fail(who, _sync_role(key), f"program {pid} waits at {_sync_name(key, k)} but program {q} "
                         f"waits at {_sync_name(kk, kq)}: " + ("both cores must synchronise on the same shared-HBM "
                         "tensor" if same else "both cores must issue the same core_barrier / sendrecv calls "
                         "(same pipe_id) in the same order"))
            self.arrived[pid] = (k, key, payload)
            if len(self.arrived) == self.lnc:
                self.exchanged[k] = {q: pl for q, (_, _, pl) in self.arrived.items()}
                self.arrived = {}
                for q in range(self.lnc):
                    self.barriers_passed[q] += 1
                storage = key[1]
                if key[0] == "core_barrier" and storage.access_log is not None:
                    storage.access_log[:] = 0        # accesses before the barrier are ordered before those after
                self.turn = 0
                self.cond.notify_all()
            else:
                nxt = next((q for q in range(self.lnc) if q not in self.arrived), None)
                if self.finished[nxt]:
                    self.failed = True
                    self.cond.notify_all()
                    fail(who, None, f"program {pid} waits at {_sync_name(key, k)} but "
                         f"program {nxt} finished its kernel without reaching it (a deadlock on the device): both "
                         "cores must issue the same core_barrier / sendrecv calls")
                self.turn = nxt
                self.cond.notify_all()
            self.wait_turn(pid)
            got = self.exchanged[k]
            self.collected[k] = self.collected.get(k, 0) + 1
            if self.collected[k] == self.lnc:
                del self.exchanged[k], self.collected[k]
            return got

    def finish(self, pid: int, ok: bool):
        with self.cond:
            self.finished[pid] = True
            if not ok:
                self.failed = True
            elif self.arrived and not self.failed:
                q = min(self.arrived)
                self.failed = True
                kq, key, _ = self.arrived[q]
                self.error = EmulatorCheckError(
                    key[0], None, f"program {q} waits at {_sync_name(key, kq)} but program {pid} finished its "
                    "kernel without reaching it (a deadlock on the device): both cores must issue the same "
                    "core_barrier / sendrecv calls")
            self._pass_turn(pid)


def _sync_name(key: tuple, k: int) -> str:
    """'core barrier #k on 'ex'' / 'sendrecv #k (pipe_id=0)': the k-th synchronisation point of a core."""
    if key[0] == "core_barrier":
        return f"core barrier #{k} on '{key[1].name or 'tensor'}'"
    return f"sendrecv #{k} (pipe_id={key[1]})"


def _sync_role(key: tuple) -> str:
    return "data" if key[0] == "core_barrier" else "pipe_id"


class Program:
    """One program instance (one NeuronCore under LNC=2)."""

    def __init__(self, pid: int, launch: _Launch, entry_code):
        self.pid = pid
        self.launch = launch
        self.target = launch.target
        self.trace = Trace(pid, launch.target.name)
        self.entry_code = entry_code
        self.sbuf_live = 0
        self.sbuf_peak = 0
        self.psum_banks_live = 0
        self.psum_banks_peak = 0
        self._sizes: dict[int, tuple] = {}          # sid -> (kind, amount) still counted
        self._sites: dict[tuple, int] = {}           # call stack -> sid of its latest allocation
        self._site_index: dict[tuple, int] = {}      # call stack -> small site number (trace metadata)
        self._site_refs: dict[int, list] = {}        # site number -> weakrefs to its allocations, in order
        self._onchip: dict[int, tuple] = {}          # sid -> (kind, bytes per partition or banks, name)
        self.live_peak = {"sbuf": 0, "psum": 0}      # peak of first-to-last-use liveness (check_liveness)
        self.act_regs = np.zeros(launch.target.pmax, dtype=np.float32)
        self.n_loops = 0                             # compiled loops (nl.fori_loop / while_loop) so far
        self.loop_stack: list[tuple] = []            # (kind, loop id, iteration) of the loops being run
        self._shared_seen = 0

    # ----------------------------------------------------------------- accounting
    def _release(self, sid: int):
        rec = self._sizes.pop(sid, None)
        if rec is None:
            return
        kind, amount = rec
        if kind == "sbuf":
            self.sbuf_live -= amount
        else:
            self.psum_banks_live -= amount

    def _site(self):
        """The kernel-side call stack of an allocation (emulator frames skipped)."""
        key = []
        f = sys._getframe(1)
        while f is not None and f.f_code is not self.entry_code:
            if not f.f_code.co_filename.startswith(_EMULATOR_DIR):
                key.append((id(f.f_code), f.f_lasti))     # the call site, even two on one line
            f = f.f_back
        return tuple(key)

    def check_liveness(self):
        """After the body: the bytes per partition (PSUM banks) of on-chip tensors live at once, each from its
        first to its last use in the trace. Any allocator needs at least that much, so a peak above capacity
        cannot fit on the device even where the allocation-time count above (which retires a call site's
        previous tensor when the site allocates again) let it pass, e.g. a software pipeline that keeps
        several iterations' tiles of one site in use."""
        first, last = {}, {}
        onchip = self._onchip
        for i, ins in enumerate(self.trace):
            for a in ins.reads + ins.writes:
                if a.sid in onchip:
                    first.setdefault(a.sid, i)
                    last[a.sid] = i
        tgt = self.target
        caps = {"sbuf": tgt.sbuf_bytes_per_partition, "psum": tgt.psum_num_banks}
        for kind, cap in caps.items():
            events = []
            for sid, i0 in first.items():
                if onchip[sid][0] == kind:
                    events.append((i0, 1, sid))
                    events.append((last[sid] + 1, 0, sid))     # freed before the next instruction's tiles
            events.sort()
            live, peak, live_set = 0, 0, set()
            for i, is_alloc, sid in events:
                amount = onchip[sid][1]
                if not is_alloc:
                    live -= amount
                    live_set.discard(sid)
                    continue
                live += amount
                live_set.add(sid)
                if live > peak:
                    peak = live
                    if peak > cap:
                        self._overflow(kind, cap, peak, i, live_set)
            self.live_peak[kind] = peak

    def _overflow(self, kind, cap, peak, idx, live_set):
        ins = self.trace[idx]
        big = sorted(live_set, key=lambda s: -self._onchip[s][1])[:4]
        unit = "B per partition" if kind == "sbuf" else "PSUM banks"
        names = ", ".join(f"{self._onchip[s][2] or 'tensor'} {self._onchip[s][1]}" for s in big)
        fail(ins.name, None, f"{kind.upper()} overflow by liveness: {peak} {unit} are in use at once at "
             f"instruction {idx} (each tensor counted from its first to its last use), more than the {cap} "
             f"{unit} of {self.target.name}; largest live: {names}")

    def _note_site(self, site, st: Storage):
        """Record which allocation site an on-chip tensor came from (trace metadata for the cost model)."""
        idx = self._site_index.setdefault(site, len(self._site_index))
        refs = self._site_refs.setdefault(idx, [])
        k = len(refs)
        if k >= 2:
            # checked one allocation late: the loop variable still holds the previous tile meanwhile
            self.trace.site_free[(idx, k - 2)] = refs[k - 2]() is None
        refs.append(weakref.ref(st))
        self.trace.alloc_sites[st.sid] = (idx, k)

    def allocate(self, shape, dtype, buffer: MemoryRegion, name: str = "", who: str = "ndarray") -> Tensor:
        if not isinstance(buffer, MemoryRegion):
            fail(who, name or None, f"buffer must be one of nl.sbuf, nl.psum, nl.hbm, nl.private_hbm, "
                 f"nl.shared_hbm (objects, not strings), got {buffer!r}")
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not shape or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
            fail(who, name or None, f"shape must be a non-empty tuple of positive ints, got {shape}")
        dt = _dt.normalize(dtype)
        tgt = self.target
        if buffer.kind == "hbm" and buffer is shared_hbm and self.launch.lnc > 1:
            return self._shared(shape, dt, name, who)
        if buffer.on_chip:
            if shape[0] > tgt.pmax:
                fail(who, name or None, f"partition dim {shape[0]} exceeds the limit of {tgt.pmax} partitions")
            per_part = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize if len(shape) > 1 else dt.itemsize
            st = Storage(shape, dt, buffer, name, self.pid)
            site = self._site()
            old = self._sites.get(site)
            if old is not None:
                self._release(old)       # the previous iteration's tensor went out of scope
            if buffer.kind == "sbuf":
                if self.sbuf_live + per_part > tgt.sbuf_bytes_per_partition:
                    fail(who, name or None, f"SBUF allocation of {per_part} B per partition exceeds capacity: "
                         f"{self.sbuf_live} B live + {per_part} B > {tgt.sbuf_bytes_per_partition} B per "
                         f"partition on {tgt.name}")
                self.sbuf_live += per_part
                self.sbuf_peak = max(self.sbuf_peak, self.sbuf_live)
                self._sizes[st.sid] = ("sbuf", per_part)
            else:
                total = tgt.psum_bank_bytes * tgt.psum_num_banks
                if per_part > total:
                    fail(who, name or None, f"PSUM tensor of {per_part} B per partition exceeds PSUM's "
                         f"{total} B per partition ({tgt.psum_num_banks} banks x {tgt.psum_bank_bytes} B)")
                banks = math.ceil(per_part / tgt.psum_bank_bytes)
                if self.psum_banks_live + banks > tgt.psum_num_banks:
                    fail(who, name or None, f"PSUM allocation needs {banks} bank(s) but {self.psum_banks_live} "
                         f"of {tgt.psum_num_banks} banks ({tgt.psum_bank_bytes} B per partition each) are live")
                self.psum_banks_live += banks
                self.psum_banks_peak = max(self.psum_banks_peak, self.psum_banks_live)
                self._sizes[st.sid] = ("psum", banks)
            self._sites[site] = st.sid
            self._onchip[st.sid] = (buffer.kind, self._sizes[st.sid][1], name)
            self._note_site(site, st)
            weakref.finalize(st, self._release, st.sid)
            return Tensor.whole(st)
        st = Storage(shape, dt, buffer, name, self.pid)
        return Tensor.whole(st)

    def _shared(self, shape, dt, name, who):
        """Under LNC=2 the k-th shared-HBM allocation of every instance is the same tensor."""
        k = self._shared_seen
        self._shared_seen += 1
        allocs = self.launch.shared_allocs
        if k < len(allocs):
            st = allocs[k]
            if st.shape != tuple(shape) or st.dtype != dt:
                fail(who, name or None, f"program {self.pid} allocated shared_hbm {shape} {_dt.name(dt)} where "
                     f"program 0 allocated {st.shape} {_dt.name(st.dtype)}; control flow must be identical "
                     "on both cores")
            return Tensor.whole(st)
        st = Storage(shape, dt, shared_hbm, name, self.pid)
        st.access_log = np.zeros(st.size, dtype=np.uint8)
        allocs.append(st)
        self.launch.logged.append(st)
        return Tensor.whole(st)


# ----------------------------------------------------------------- compiled loops


@contextlib.contextmanager
def loop_iteration(kind: str, dynamic: bool = False):
    """For `nl.fori_loop` / `nl.while_loop`: yields `iterate`, a context manager around one iteration. The
    instructions an iteration emits get ``meta["loop"] = ((kind, loop id, iteration), ...)`` (outermost first,
    nested loops included), so a trace shows the compiled loop and the cost model charges its body once per
    iteration (the body runs, and is traced, once per iteration)."""
    prog = current()
    loop_id = prog.n_loops
    prog.n_loops += 1
    count = [0]
    # the program's compiled loops: id -> (kind, enclosing loop tags, register-bounded, trip count)
    loops = getattr(prog.trace, "loops", None)
    if loops is not None:
        loops[loop_id] = dict(kind=kind, outer=tuple(prog.loop_stack), dynamic=bool(dynamic), trips=0,
                              start=len(prog.trace))

    @contextlib.contextmanager
    def iterate():
        prog.loop_stack.append((kind, loop_id, count[0]))
        start = len(prog.trace)
        try:
            yield
        finally:
            tag = tuple(prog.loop_stack)
            for ins in prog.trace[start:]:
                ins.meta.setdefault("loop", tag)
            prog.loop_stack.pop()
            count[0] += 1
            if loops is not None:
                loops[loop_id]["trips"] = count[0]
    yield iterate


# ----------------------------------------------------------------- results


@dataclass
class RunResult:
    """What one emulated launch produced."""
    outputs: object                     # numpy array, tuple of arrays, or None
    traces: list                        # one Trace per program instance
    target: Target
    lnc: int
    # per program: the larger of the allocation-time count and the first-to-last-use liveness peak
    sbuf_peak_bytes: list = field(default_factory=list)    # bytes per partition
    psum_peak_banks: list = field(default_factory=list)
    ranks: int = 1                      # multi-rank runs (collectives.run_ranks): traces are rank-major
    rank_results: list = field(default_factory=list)

    @property
    def trace(self) -> Trace:
        return self.traces[0]


_last: list[RunResult] = []
_recorders: list[list] = []


@contextlib.contextmanager
def record_launches():
    """Collect the RunResult of every launch made inside the block (the microbench's hook)."""
    bucket: list = []
    _recorders.append(bucket)
    try:
        yield bucket
    finally:
        _recorders.remove(bucket)


def last_run() -> RunResult | None:
    """The RunResult of the most recent launch in this process."""
    return _last[-1] if _last else None


def _to_storage(name: str, arr: np.ndarray, lnc: int) -> Storage:
    a = np.ascontiguousarray(arr)
    dt = _dt.normalize(a.dtype)
    st = Storage(a.shape if a.shape else (1,), dt, shared_hbm, name, 0, data=a.reshape(-1).copy())
    if lnc > 1:
        st.access_log = np.zeros(st.size, dtype=np.uint8)
    return st


def _to_numpy(value, who: str):
    if isinstance(value, Tensor):
        if value.buffer is not shared_hbm:
            fail("return", value.name, f"kernel outputs must be allocated with buffer=nl.shared_hbm, "
                 f"got {value.buffer.name}")
        return np.array(value._get())
    if isinstance(value, (tuple, list)):
        return tuple(_to_numpy(v, who) for v in value)
    if value is None:
        return None
    fail("return", None, f"a kernel returns shared_hbm tensors (or a tuple of them), got {type(value).__name__}")


_compiler_degrees: list[int] = []


def _lnc_error(message: str) -> EmulatorCheckError:
    return EmulatorCheckError("launch", None, message)


@contextlib.contextmanager
def compiler_lnc(lnc: int):
    """Launches inside the block are compiled at degree `lnc` (as if neuronx-cc ran with ``--lnc lnc``),
    whatever NEURON_LOGICAL_NC_CONFIG and the target's default say."""
    problem = _lnc.lnc_problem(lnc, get_target().name)
    if problem:
        raise _lnc_error(problem)
    _compiler_degrees.append(int(lnc))
    try:
        yield int(lnc)
    finally:
        _compiler_degrees.pop()


def degree_in_force(target: Target | None = None) -> int:
    """The degree neuronx-cc would compile at: `compiler_lnc`'s, else NEURON_LOGICAL_NC_CONFIG, else the
    target's default (2 on trn2/trn3, 1 on trn1)."""
    if _compiler_degrees:
        return _compiler_degrees[-1]
    return _lnc.degree_in_force((target or get_target()).name, _lnc_error)


def launch(fn, lnc: int, args, kwargs, target: Target | None = None, compile_lnc: int | None = None) -> RunResult:
    """Run `fn` as a kernel of degree `lnc`, compiled at `compile_lnc` (None: the degree in force)."""
    tgt = target or get_target()
    problem = _lnc.lnc_problem(lnc, tgt.name)
    if problem:
        fail("launch", None, problem + "; kernel[lnc] takes exactly one number")
    lnc = int(lnc)
    if compile_lnc is None:
        compile_lnc = degree_in_force(tgt)
    else:
        problem = _lnc.lnc_problem(compile_lnc, tgt.name, "compile_lnc")
        if problem:
            fail("launch", None, problem)
    if int(compile_lnc) != lnc:
        fail("launch", None, _lnc.mismatch_message(getattr(fn, "__name__", "kernel"), lnc, int(compile_lnc)))
    # Arrays become shared-HBM tensors named after their parameters; other values pass through.
    import inspect
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    storages, call_args = [], []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) or (hasattr(a, "__array_interface__") and not np.isscalar(a)):
            nm = params[i] if i < len(params) else f"arg{i}"
            st = _to_storage(nm, np.asarray(a), lnc)
            storages.append((a, st))
            call_args.append(Tensor.whole(st))
        else:
            call_args.append(a)
    call_kwargs = {}
    for k, a in kwargs.items():
        if isinstance(a, np.ndarray):
            st = _to_storage(k, a, lnc)
            storages.append((a, st))
            call_kwargs[k] = Tensor.whole(st)
        else:
            call_kwargs[k] = a
    st_launch = _Launch(lnc, tgt)
    st_launch.logged.extend(st for _, st in storages if st.access_log is not None)
    progs = [Program(pid, st_launch, _run_body.__code__) for pid in range(lnc)]
    if lnc == 1:
        results = [_run_program(progs[0], fn, call_args, call_kwargs)]
    else:
        results = _run_programs_together(progs, fn, call_args, call_kwargs)
    returned = results[0]
    traces = [prog.trace for prog in progs]
    peaks = [max(prog.sbuf_peak, prog.live_peak["sbuf"]) for prog in progs]
    banks = [max(prog.psum_banks_peak, prog.live_peak["psum"]) for prog in progs]
    outputs = _to_numpy(returned, fn.__name__)    # after every instance has written its part
    for original, st in storages:
        if st.modified and isinstance(original, np.ndarray):
            if not original.flags.writeable:
                fail("launch", st.name, "the kernel wrote an input array that is read-only")
            original[...] = st.data.reshape(original.shape)
    res = RunResult(outputs, traces, tgt, lnc, peaks, banks)
    if not _tls.quiet:
        record_result(res)
    return res


def _run_program(prog: Program, fn, args, kwargs):
    """Run one program instance in this thread; returns what the kernel returned."""
    _tls.items.append(prog)
    try:
        with np.errstate(all="ignore"):       # the device computes inf/NaN silently
            result = _run_body(fn, args, kwargs)
        _to_numpy(result, fn.__name__)          # validates what the kernel returns
        prog.check_liveness()
    finally:
        _tls.items.pop()
    return result


# Callables run in the launching thread; each returns a callable that the program threads run first to take
# over the launching thread's thread-local state (collectives.py registers the multi-rank context).
thread_state_hooks: list = []


def _run_programs_together(progs: list, fn, args, kwargs) -> list:
    """Run the program instances of an LNC > 1 launch in threads that take turns (see `_Launch`)."""
    launch_state = progs[0].launch
    quiet = _tls.quiet
    appliers = [hook() for hook in thread_state_hooks]
    results = [None] * len(progs)
    errors = [None] * len(progs)

    def body(prog):
        _tls.quiet = quiet
        for apply in appliers:
            apply()
        ok = False
        try:
            with launch_state.cond:
                launch_state.wait_turn(prog.pid)
            results[prog.pid] = _run_program(prog, fn, args, kwargs)
            ok = True
        except BaseException as e:      # noqa: BLE001 - reported by the launching thread
            errors[prog.pid] = e
        finally:
            launch_state.finish(prog.pid, ok)

    threads = [threading.Thread(target=body, args=(prog,), name=f"nki-core-{prog.pid}", daemon=True)
               for prog in progs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
    if real:
        raise real[0]
    if launch_state.error is not None:
        raise launch_state.error
    if any(e is not None for e in errors):
        raise EmulatorCheckError("launch", None, "a program instance stopped without an error report")
    return results


def record_result(res: RunResult):
    """Make `res` the last run and hand it to every `record_launches` block."""
    _last[:] = [res]
    for bucket in _recorders:
        bucket.append(res)


def _run_body(fn, args, kwargs):
    return fn(*args, **kwargs)


# ----------------------------------------------------------------- jit / simulate


def _plain_lnc() -> int:
    """The degree of a launch without brackets: NEURON_LOGICAL_NC_CONFIG, else 1 (as in NKI 0.7)."""
    return _lnc.plain_launch_lnc(_lnc_error)


class Kernel:
    """What `nki.jit` returns: call it (LNC from NEURON_LOGICAL_NC_CONFIG, else 1), or launch it with the
    deprecated bracket `kernel[lnc](...)`."""

    def __init__(self, fn, **options):
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __getitem__(self, lnc):
        if isinstance(lnc, tuple):
            fail("launch", None, f"kernel[lnc] takes exactly one number (1 or 2); multi-dimensional grids "
                 f"{lnc} are not supported")
        return _Bound(self, lnc)

    def __call__(self, *args, **kwargs):
        return launch(self.fn, _plain_lnc(), args, kwargs).outputs


class _Bound:
    def __init__(self, kernel: Kernel, lnc):
        self.kernel = kernel
        self.lnc = lnc

    def __call__(self, *args, **kwargs):
        return launch(self.kernel.fn, self.lnc, args, kwargs).outputs


def jit(fn=None, **kwargs):
    """`@nki.jit` (with or without options): the kernel runs on the emulator when called."""
    if fn is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(fn, **kwargs)


def simulate(kernel):
    """`nki.simulate(kernel)` or `nki.simulate(kernel[2])`: a callable that runs it on NumPy arrays, with the
    LNC rules of a device launch."""
    if isinstance(kernel, _Bound):
        return lambda *a, **k: launch(kernel.kernel.fn, kernel.lnc, a, k).outputs
    fn = kernel.fn if isinstance(kernel, Kernel) else kernel
    return lambda *a, **k: launch(fn, _plain_lnc(), a, k).outputs


def run(kernel, *args, lnc: int | None = None, compile_lnc: int | None = None, target: str | None = None,
        **kwargs) -> RunResult:
    """Run a kernel and return its RunResult (outputs, per-instance traces, memory peaks).

    `lnc=n` models the NKI 0.7 way of choosing a degree, NEURON_LOGICAL_NC_CONFIG=n: the kernel is launched
    and compiled at n. Without it the kernel launches as called (`kernel[n]`: n; plain: the variable, else 1)
    and is compiled at the degree in force. `compile_lnc` overrides the compiler's degree for this launch
    (a differing kernel degree then fails with NCC_EVRF066)."""
    tgt = get_target(target) if target else None
    if isinstance(kernel, _Bound):
        fn, own = kernel.kernel.fn, kernel.lnc
    else:
        fn, own = (kernel.fn if isinstance(kernel, Kernel) else kernel), None
    if lnc is None:
        lnc = own if own is not None else _plain_lnc()
    elif compile_lnc is None:
        compile_lnc = lnc
    return launch(fn, lnc, args, kwargs, tgt, compile_lnc)
