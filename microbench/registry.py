"""Where kernels register their microbenchmark cases.

A family adds cases in ``microbench/cases/<family>.py`` by calling `register(BenchCase(...))` at import
time. The runner (``python -m microbench``) makes the inputs, runs the kernel on the emulator while
recording its launches, checks the output against the NumPy reference, and models the time of the
recorded launches with the cost model (and the same for the baseline, when one is given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class BenchCase:
    kernel: str                                   # public kernel name, e.g. "flash_attention"
    shape: str                                    # shape label, e.g. "qwen3.5-35b tp4 Sq=Skv=2048 causal"
    make_inputs: Callable[[np.random.Generator], dict]   # inputs, as a dict of named arrays/values
    run: Callable[[dict], object]                 # runs our kernel(s) through the public API; returns outputs
    reference: Callable[[dict], object]           # NumPy reference on the same inputs; same structure as run
    flops: int = 0                                # useful FLOPs (for TensorE utilisation / TFLOP/s)
    min_hbm_bytes: int = 0                        # bytes that must cross HBM at least once (roofline)
    dtype: str = "bfloat16"                       # tolerance class for the output check
    quick: bool = False                           # part of `python -m microbench --quick`
    baseline_name: str | None = None              # e.g. "host permute + expanded KV"
    baseline_run: Callable[[dict], object] | None = None   # runs the baseline kernel(s); output checked too
    check: Callable[[object, object], None] | None = None  # custom comparison (default: assert_close on each output)
    lnc: int = 1                                  # informational only: the runner sets the degree through
                                                  # NEURON_LOGICAL_NC_CONFIG and reads the launched LNC from the trace
    tags: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kernel} [{self.shape}]"


_CASES: list[BenchCase] = []


def register(case: BenchCase) -> BenchCase:
    if any(c.key == case.key for c in _CASES):
        raise ValueError(f"duplicate microbench case {case.key}")
    _CASES.append(case)
    return case


def cases() -> list[BenchCase]:
    from . import cases as _families  # noqa: F401  (importing registers every family's cases)
    return list(_CASES)
