"""The emulated `nki` namespace, as kernels see it through `nki_kernels.backend`: exactly the names of NKI
0.7's top-level `nki` package that the emulator provides (`jit`, `simulate`) and its submodules
`language`, `isa` and `collectives` (when the emulator has it). The emulator's own tools (`run`,
`record_launches`, targets, traces) live in `nki_kernels.emulator`, not here."""
from . import isa, language  # noqa: F401
from .runtime import jit, simulate  # noqa: F401

try:
    from . import collectives  # noqa: F401
except ImportError:  # pragma: no cover - until the emulator has nki.collectives
    pass

__version__ = "0.7.0-emulated"
