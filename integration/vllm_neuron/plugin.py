"""vLLM general-plugin entry point: installs our kernels in every vLLM process, opt-in by environment.

vLLM calls every ``vllm.general_plugins`` entry point in each process it creates (engine core, workers), before
models are built, possibly more than once per process (``vllm.plugins.load_general_plugins``). This package
registers ``load_plugin`` there (pyproject.toml), and it does nothing unless ``NKI_KERNELS_VLLM=1``: installing
nki-kernels next to vLLM never changes a model by itself.

vLLM calls these hooks without catching their exceptions (``vllm/plugins/__init__.py``, vllm-project/vllm
@0142555: ``for func in plugins.values(): func()``), so a refusal of apply() (a contract difference, or no hookable
layer: the served model is not one we adapt, or the plugin does not register Qwen3.5) is logged as a warning and
installs nothing: the plugin's own code runs and the engine starts.
"""
from __future__ import annotations

import logging
import os

ENABLE_ENV = "NKI_KERNELS_VLLM"

_INSTALLATION = []         # [Installation] once applied, [None] once refused, in this process

logger = logging.getLogger("nki_kernels.vllm_neuron")


def load_plugin():
    """Apply our kernels to the plugin's registry models once per process when NKI_KERNELS_VLLM=1; None when not
    enabled or when apply() refused (logged, nothing installed)."""
    if _INSTALLATION:
        return _INSTALLATION[0]
    if os.environ.get(ENABLE_ENV, "").lower() not in ("1", "true", "yes"):
        return None
    from ._common import VllmNeuronAdapterError
    from .apply import apply
    families = os.environ.get("NKI_KERNELS_VLLM_FAMILIES") or None
    try:
        _INSTALLATION.append(apply(None, families.split(",") if families else None))
    except VllmNeuronAdapterError as exc:
        logger.warning("nki-kernels: %s=1 but nothing was installed; the plugin's own code runs. %s", ENABLE_ENV, exc)
        _INSTALLATION.append(None)
    except Exception:                    # noqa: BLE001 - vLLM calls general plugins without catching: an
        # unexpected failure (not a contract refusal) is logged with its traceback and the plugin's own code runs
        logger.warning("nki-kernels: %s=1 but installing failed unexpectedly; nothing was installed and the "
                       "plugin's own code runs", ENABLE_ENV, exc_info=True)
        _INSTALLATION.append(None)
    return _INSTALLATION[0]
