"""A NumPy emulator of the NKI 0.7 API subset our kernels use (see docs/platform.md, "How kernels are written here").

Import it as the `nki` stand-in: ``from nki_kernels.emulator import language as nl, isa as nisa`` and
``nki_kernels.emulator.jit`` / ``simulate``. Kernels should not import this package directly; they take
`nki`, `nl` and `nisa` from `nki_kernels.backend`, which picks the real NKI when it is installed.
"""
from . import collectives, isa, language
from .collectives import _multi_rank_simulate as multi_rank_simulate
from .collectives import _run_ranks as run_ranks
from .errors import EmulatorCheckError
from .runtime import (Kernel, RunResult, compiler_lnc, degree_in_force, jit, last_run, record_launches, run,
                      simulate)
from .targets import TARGETS, Target, get_target, use_target
from .trace import Access, Instr, Trace

__version__ = "0.7.0-emulated"

__all__ = ["collectives", "multi_rank_simulate", "run_ranks", "isa", "language", "EmulatorCheckError", "Kernel",
           "RunResult", "compiler_lnc", "degree_in_force", "jit", "last_run", "record_launches", "run", "simulate",
           "TARGETS", "Target", "get_target", "use_target", "Access", "Instr", "Trace"]
