"""Transposes shared by the kernel families. Runs inside kernels: real NKI API only (`nisa` from the backend)."""
from __future__ import annotations

from .backend import nisa
from .hw import DVE_TRANSPOSE_MAX, NAN_MIXING_PE_TRANSPOSE_TARGETS
from .lnc import current_target_name


def mixing_pe_transpose(target=None) -> bool:
    """Trace-time: the target's (default: the current one's) TensorE transpose spreads NaN / Inf across the rows it
    transposes (trn1: an identity matmul, `hw.NAN_MIXING_PE_TRANSPOSE_TARGETS`)."""
    return (target or current_target_name()) in NAN_MIXING_PE_TRANSPOSE_TARGETS


def vector_transpose(dst, src):
    """dst[F, P] = src[P, F] by VectorE transposes of DVE_TRANSPOSE_MAX-square blocks: exact with NaN / Inf on every
    target (on trn1 a TensorE transpose is an identity matmul: one row's NaN reaches every column)."""
    p, f = src.shape
    for p0 in range(0, p, DVE_TRANSPOSE_MAX):
        pn = min(DVE_TRANSPOSE_MAX, p - p0)
        for f0 in range(0, f, DVE_TRANSPOSE_MAX):
            fn = min(DVE_TRANSPOSE_MAX, f - f0)
            nisa.nc_transpose(dst=dst[f0:f0 + fn, p0:p0 + pn], data=src[p0:p0 + pn, f0:f0 + fn],
                              engine=nisa.vector_engine)
