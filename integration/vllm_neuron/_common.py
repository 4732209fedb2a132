"""Shared plumbing of the vLLM Neuron adapters: the op namespace, the kill switch, warnings, contracts.

Nothing here imports vLLM or the plugin: the adapters (and their tests) run where neither is installed.
"""
from __future__ import annotations

import logging
import os

from .. import _patching

logger = logging.getLogger("nki_kernels.vllm_neuron")

# Environment kill switch, read at call time: every installed adapter defers to the method it replaced.
DISABLE_ENV = "NKI_KERNELS_VLLM_DISABLE"

# Attribute under which an installed replacement keeps the original.
ORIGINAL_ATTR = "__nki_kernels_original__"
MARK = "__nki_kernels_adapter__"


class VllmNeuronAdapterError(ValueError):
    """apply() could not find, or could not match, what it was asked to patch; the message lists everything."""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes")


def ops():
    """``torch.ops.nki_kernels``: our kernels as torch.library ops (one FX node each under torch.compile)."""
    from nki_kernels import torch_ops
    return torch_ops.register()


def warn_once(key: str, message: str):
    _patching.warn_once(logger, key, message)


# Every fallback of an installed replacement because a kernel refused the call: {(hook, reason): count}.
FALLBACKS = _patching.FallbackLog()


def refusals() -> tuple:
    """What a replacement catches and turns into a fallback: kernel refusals (validation, limits, on the emulator
    its hardware checks)."""
    return _patching.kernel_refusals()


def fall_back(hook: str, exc: BaseException):
    """Record why `hook` runs the plugin's own code (see `fallbacks()`) and warn once."""
    _patching.fall_back(FALLBACKS, logger, f"vllm_neuron {hook}", exc)


def fallbacks() -> dict:
    """{(hook, reason): count} of the calls that ran the plugin's own code because a kernel refused them."""
    return FALLBACKS.snapshot()


param_names = _patching.param_names


difference = _patching.signature_difference


def plugin_flag(obj, name, default=False):
    """A module-level flag of the plugin module that defines type(obj) (e.g. SEQUENCE_PARALLEL)."""
    import sys
    module = sys.modules.get(type(obj).__module__)
    return getattr(module, name, default)
