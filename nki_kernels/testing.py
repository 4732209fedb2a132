"""Comparing kernel outputs with references: relative RMS error with an absolute floor, per dtype.

Used by the tests and the microbench alike, so "matches its reference" means one thing everywhere.
"""
from __future__ import annotations

import numpy as np

# dtype name -> (max relative RMS error, absolute floor on the RMS error, max elementwise abs error scale)
TOLERANCE = {
    "float32": (1e-4, 1e-6),
    "bfloat16": (2e-2, 1e-3),
    "float16": (5e-3, 1e-4),
    "float8_e4m3": (1.5e-1, 1e-2),
    "float8_e5m2": (2.5e-1, 1e-2),
}


def to_float64(x):
    """x (NumPy array, bf16/fp8 array, torch tensor or number) as a float64 NumPy array; None stays None.

    The one conversion the NumPy references share; it holds no kernel logic."""
    if x is None:
        return None
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64)


def rel_rms_error(ref, out) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    denom = np.sqrt(np.mean(ref ** 2)) if ref.size else 0.0
    err = np.sqrt(np.mean((out - ref) ** 2)) if ref.size else 0.0
    return float(err / denom) if denom > 0 else float(err)


def assert_close(name: str, ref, out, dtype="float32", ratio: float | None = None, atol: float | None = None):
    """Fail unless out matches ref: no NaN/Inf where ref is finite, same shape, RMS error within tolerance."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {out.shape} != reference {ref.shape}")
    finite = np.isfinite(ref)
    if not np.all(np.isfinite(out[finite])):
        bad = int(np.sum(~np.isfinite(out[finite])))
        raise AssertionError(f"{name}: {bad} non-finite values where the reference is finite")
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    r_tol, a_tol = TOLERANCE.get(key, TOLERANCE["float32"])
    r_tol = ratio if ratio is not None else r_tol
    a_tol = atol if atol is not None else a_tol
    diff = out[finite] - ref[finite]
    rms_err = float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0
    rms_ref = float(np.sqrt(np.mean(ref[finite] ** 2))) if diff.size else 0.0
    if rms_err > max(r_tol * rms_ref, a_tol):
        worst = float(np.max(np.abs(diff))) if diff.size else 0.0
        raise AssertionError(f"{name}: relative RMS error {rms_err / max(rms_ref, 1e-300):.3e} exceeds "
                             f"{r_tol:.1e} ({key}); max abs error {worst:.3e}, rms ref {rms_ref:.3e}")


# ---------------------------------------------------------------- the compiled program of a launch


class _NotRun:
    """The body of a register-bounded loop that ran no iteration: its instructions were never emitted, so it
    matches any body (the compiled program holds one copy of it either way)."""

    def __eq__(self, other):
        return True

    def __repr__(self):
        return "<loop body not run>"


def _fold_loops(trace, items) -> list:
    """The compiled program of one trace: instructions outside register-bounded loops as they are, and each such
    loop (nl.fori_loop / nl.while_loop with a VirtualRegister bound: its trip count is data) as one entry holding
    its body, which must be the same instructions in every iteration (the device runs one copy of it). Storages
    are numbered by first use; a tile allocated inside an iteration is numbered within that iteration."""
    loops = getattr(trace, "loops", {}) or {}
    dynamic = {lid for lid, rec in loops.items() if rec.get("dynamic")}
    starts: dict = {}
    for lid in dynamic:
        if not any(tag[1] in dynamic for tag in loops[lid]["outer"]):        # outermost register-bounded loops
            starts.setdefault(loops[lid]["start"], []).append(lid)
    ids: dict = {}                      # storage id -> number, outside register-bounded loops

    def number(item, local=None):
        def acc(a):
            if local is None or a[0] in ids:
                key = ("g", ids.setdefault(a[0], len(ids)))
            else:
                key = ("l", local.setdefault(a[0], len(local)))
            return (key,) + a[1:]
        name, eng, reads, writes, meta = item
        return (name, eng, tuple(acc(a) for a in reads), tuple(acc(a) for a in writes), meta)

    program, bodies, order = [], {}, []
    for ins, item in zip(trace, items):
        for lid in starts.pop(ins.idx, []):
            order.append(lid)
            program.append(lid)
        outer = next((t for t in ins.meta.get("loop", ()) if t[1] in dynamic), None)
        if outer is None:
            program.append(number(item))
            continue
        it = bodies.setdefault(outer[1], {}).setdefault(outer[2], ([], {}))
        it[0].append(number(item, it[1]))
    for lids in starts.values():        # loops that started after the last instruction
        program.extend(lids)
    for i, entry in enumerate(program):
        if isinstance(entry, int):      # a loop id
            iters = bodies.get(entry, {})
            first = iters[0][0] if 0 in iters else None
            for n, (body, _) in iters.items():
                if body != first:
                    raise AssertionError(f"compiled loop {entry}: iteration {n} runs other instructions than "
                                         "iteration 0 (the device runs one copy of a loop body)")
            program[i] = ("compiled loop", loops[entry]["kind"], _NotRun() if first is None else first)
    return program


def program_signature(runs) -> list:
    """What a kernel's values must not change (tests/test_value_independence.py): per recorded launch its LNC and,
    per program instance, every instruction of the compiled program (name, engine, every operand's memory, dtype,
    shape, partitions, bytes, access span and contiguity, dynamic flag, which operands share a storage, the
    metadata) with each register-bounded loop counted once, with its body (`_fold_loops`)."""
    out = []
    for res in runs:
        progs = []
        for trace in res.traces:
            def acc(a):
                return (a.sid, a.buffer, a.dtype, tuple(a.shape), a.partitions, a.elems_pp, a.nbytes, a.lo, a.hi,
                        a.contig_bytes, a.dynamic, a.row)

            def meta(ins):
                m = dict(ins.meta)
                m["loop"] = tuple((kind, lid) for kind, lid, _ in m.get("loop", ()))   # iteration numbers: data
                return repr(sorted(m.items()))
            items = [(ins.name, ins.engine, tuple(acc(a) for a in ins.reads), tuple(acc(a) for a in ins.writes),
                      meta(ins)) for ins in trace]
            progs.append(_fold_loops(trace, items))
        out.append((res.lnc, progs))
    return out
