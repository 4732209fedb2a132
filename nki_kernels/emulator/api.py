"""The emulated `nki` namespace, as kernels see it through `nki_kernels.backend`: exactly the names of NKI
0.7's top-level `nki` package that the emulator provides (`jit`, `simulate`, `multi_rank_simulate`) and its
submodules `language`, `isa` and `collectives`. The emulator's own tools (`run`,
`record_launches`, targets, traces) live in `nki_kernels.emulator`, not here."""
from . import isa, language  # noqa: F401
from . import collectives  # noqa: F401
from .collectives import _multi_rank_simulate as multi_rank_simulate  # noqa: F401
from .runtime import jit, simulate  # noqa: F401

__version__ = "0.7.0-emulated"
