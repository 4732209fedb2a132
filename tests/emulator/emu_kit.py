"""Helpers for the emulator tests: tiny kernels that load inputs to SBUF, apply one step, store outputs."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nki_kernels.emulator import EmulatorCheckError, jit, run
from nki_kernels.emulator import isa as nisa
from nki_kernels.emulator import language as nl

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_E4M3 = np.dtype(ml_dtypes.float8_e4m3)
FP8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)


def sb_load(t, dtype=None):
    """HBM tensor -> new SBUF tile of the same shape (inside a kernel)."""
    sb = nl.ndarray(tuple(t.shape), dtype or t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=sb, src=t)
    return sb


def hbm_out(tile):
    """SBUF or PSUM tile -> new shared-HBM output (PSUM goes through an SBUF copy first)."""
    if tile.buffer is nl.psum:
        sb = nl.ndarray(tile.shape, tile.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=sb, src=tile)
        tile = sb
    out = nl.ndarray(tile.shape, tile.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=tile)
    return out


def on_chip(step, *arrays, lnc=1, **consts):
    """Run `step(*sbuf_tiles, **consts)` inside a kernel; it returns a tile or a tuple of tiles, given back
    as NumPy arrays. Inputs arrive in SBUF in their own dtype."""
    @jit
    def kernel(*args):
        tiles = [sb_load(a) for a in args]
        res = step(*tiles, **consts)
        if isinstance(res, tuple):
            return tuple(hbm_out(r) for r in res)
        return hbm_out(res)
    return run(kernel, *arrays, lnc=lnc).outputs


def raises(*fragments):
    """pytest.raises(EmulatorCheckError) whose message contains every fragment (case-insensitive)."""
    return _Raises(fragments)


class _Raises:
    def __init__(self, fragments):
        self.fragments = fragments
        self._ctx = pytest.raises(EmulatorCheckError)

    def __enter__(self):
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._ctx.__exit__(*exc)
        msg = str(self.info.value).lower()
        for f in self.fragments:
            assert str(f).lower() in msg, f"{f!r} not in error message: {self.info.value}"
        return suppressed


def kernel_run(fn, *arrays, lnc=1, **consts):
    """Launch a plain function as a kernel; returns the RunResult."""
    return run(jit(fn), *arrays, lnc=lnc, **consts)


def f32(x):
    return np.asarray(x, dtype=np.float32)


def rnd(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


__all__ = ["BF16", "FP8_E4M3", "FP8_E5M2", "sb_load", "hbm_out", "on_chip", "raises", "kernel_run", "f32", "rnd",
           "nl", "nisa", "jit", "run", "EmulatorCheckError"]


# ---- hand-built cost-model traces (test_costmodel_v6 / _v9)
_TRACE_SID = [5000]


def trace_tile(f, dtype="float32", buffer="sbuf"):
    """A [128, f] Access of a fresh tensor (a new sid each call), for hand-built Trace instructions."""
    from nki_kernels.emulator.trace import Access
    _TRACE_SID[0] += 1
    item = 2 if dtype == "bfloat16" else 4
    return Access(_TRACE_SID[0], buffer, dtype, (128, f), 128, f, 128 * f * item, 0, 128 * f, 128 * f * item, False)


def cycles_us(cycles, ghz):
    """µs of `cycles` engine cycles at `ghz`."""
    return cycles / ghz * 1e-3
