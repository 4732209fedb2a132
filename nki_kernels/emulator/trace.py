"""The instruction trace: every emulated instruction with its engine and operands.

The trace holds plain metadata (storage ids, shapes, byte counts), never tensors, so it does not keep
on-chip memory alive and costs little enough to stay on. The cost model reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Engines, named as in the NKI docs: TensorE, ScalarE (activation), VectorE, GpSimd, and DMA queues.
PE, ACT, DVE, POOL, DMA = "pe", "act", "dve", "pool", "dma"
ENGINES = (PE, ACT, DVE, POOL, DMA)


@dataclass(slots=True, frozen=True)
class Access:
    """One operand of an instruction."""
    sid: int            # storage id (unique per allocation within a run)
    buffer: str         # "sbuf", "psum" or "hbm"
    dtype: str
    shape: tuple
    partitions: int     # shape[0] for on-chip operands, 1 for HBM
    elems_pp: int       # elements per partition (all elements for HBM)
    nbytes: int         # bytes touched
    lo: int             # flat element span touched in the storage: [lo, hi)
    hi: int
    contig_bytes: int   # bytes in the innermost contiguous run
    dynamic: bool       # address depends on runtime values (scalar/vector offset)
    row: int = 0        # on-chip: elements per partition row of the storage (flat index = p * row + f); 0 for HBM


@dataclass(slots=True)
class Instr:
    idx: int
    name: str
    engine: str
    reads: tuple
    writes: tuple
    meta: dict = field(default_factory=dict)


class Trace(list):
    """Instructions of one program instance, in program order."""

    def __init__(self, pid: int = 0, target: str = "trn2"):
        super().__init__()
        self.pid = pid
        self.target = target
        # Allocation sites of on-chip tensors, for the cost model's buffer rotation:
        # alloc_sites {sid: (site index, k)} = the k-th allocation from that site;
        # site_free {(site index, k): bool} = the k-th tile was dropped before the (k+2)-th was allocated.
        self.alloc_sites: dict = {}
        self.site_free: dict = {}
        # Compiled loops (nl.fori_loop / nl.while_loop): {loop id: dict(kind, outer, dynamic, trips, start)};
        # `dynamic` loops have a register bound (trip count known only on the device), `start` is the trace
        # index where the loop began (a loop of 0 trips still has its place in the program).
        self.loops: dict = {}

    def by_engine(self) -> dict:
        out: dict = {}
        for ins in self:
            out.setdefault(ins.engine, []).append(ins)
        return out
