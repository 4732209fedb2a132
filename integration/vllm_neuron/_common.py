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


def missing_attrs(obj, attrs, group=()) -> list:
    """The attributes of `attrs` that `obj` lacks, plus those of `group` when `obj` has only some of them (a
    group is all or none: a contract that has it, or an older one without it)."""
    missing = [a for a in attrs if not hasattr(obj, a)]
    have = [a for a in group if hasattr(obj, a)]
    if have and len(have) != len(group):
        missing += [a for a in group if a not in have]
    return missing


def contract_fallback(hook: str, reason: str):
    """Record that `hook` runs the plugin's own code because the instance does not have the contract the adapter
    reads (an attribute the class-level install could not check), and warn once."""
    hook = f"vllm_neuron {hook}"
    FALLBACKS.record(hook, reason)
    warn_once(f"{hook}-{reason}", f"{hook}: {reason}; using the plugin's own code")


def instance_mismatch(hook: str, obj, attrs, group=()) -> bool:
    """True (and the fallback recorded) when `obj` lacks an attribute the replacement of `hook` reads.

    apply() checks the attributes of model *instances* it is given, but the usual install (the plugin registry,
    before the engine builds the model) patches classes, whose instances only exist later: so every
    replacement checks its instance when called, and an older or newer plugin that dropped or renamed an
    attribute runs its own code instead of failing mid-model with an AttributeError."""
    missing = missing_attrs(obj, attrs, group)
    if missing:
        contract_fallback(hook, f"{type(obj).__name__} instance has no attribute(s) {missing} that the adapter "
                                "reads")
    return bool(missing)


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
