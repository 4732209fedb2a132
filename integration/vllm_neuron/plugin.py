"""vLLM general-plugin entry point: installs our kernels in every vLLM process, opt-in by environment.

vLLM calls every ``vllm.general_plugins`` entry point in each process it creates (engine core, workers), before
models are built, possibly more than once per process (``vllm.plugins.load_general_plugins``). This package
registers ``load_plugin`` there (pyproject.toml), and it does nothing unless ``NKI_KERNELS_VLLM=1``: installing
nki-kernels next to vLLM never changes a model by itself.
"""
from __future__ import annotations

import os

ENABLE_ENV = "NKI_KERNELS_VLLM"

_INSTALLATION = []


def load_plugin():
    """Apply our kernels to the plugin's registry models once per process when NKI_KERNELS_VLLM=1."""
    if _INSTALLATION:
        return _INSTALLATION[0]
    if os.environ.get(ENABLE_ENV, "").lower() not in ("1", "true", "yes"):
        return None
    from .apply import apply
    families = os.environ.get("NKI_KERNELS_VLLM_FAMILIES") or None
    _INSTALLATION.append(apply(None, families.split(",") if families else None))
    return _INSTALLATION[0]
