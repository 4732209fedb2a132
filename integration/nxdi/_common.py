"""Shared plumbing for the NxDI adapters: kernel lookup, tensor-kind dispatch, warnings, kill switch.

Nothing here imports NxDI, NxD or torch-xla at module import time: the adapters must import (and their
tests must run) on machines where NxDI is absent.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os

from .. import _patching

logger = logging.getLogger("nki_kernels.nxdi")

# Environment kill switch: when set, every installed adapter defers to the method it replaced.
DISABLE_ENV = "NKI_KERNELS_NXDI_DISABLE"

# Attribute under which an installed adapter keeps the original (NxDI's) implementation on the class.
ORIGINAL_PREFIX = "_nki_kernels_original_"


class KernelNotAvailableError(NotImplementedError):
    """The nki-kernels wrapper an adapter needs is not importable (not written yet, or broken)."""


class AdapterInputError(ValueError):
    """An adapter got inputs outside NxDI's contract (shapes, layouts); the message names the fix."""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes")


def kernel(name: str, family: str):
    """The public wrapper `nki_kernels.<name>`, or KernelNotAvailableError naming what is missing."""
    import nki_kernels

    module_name = getattr(nki_kernels, "_EXPORTS", {}).get(name, "nki_kernels")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise KernelNotAvailableError(
            f"nxdi {family} adapter: kernel wrapper nki_kernels.{name} ({module_name}) is not available: "
            f"{type(exc).__name__}: {exc}. Install an nki-kernels build that ships it, or remove "
            f"'{family}' from apply(kernels=...).") from exc
    return fn


def kernel_available(name: str, family: str) -> bool:
    try:
        kernel(name, family)
        return True
    except KernelNotAvailableError:
        return False


def accepted_kwargs(fn, **kwargs):
    """The subset of kwargs that `fn` declares (so optional features degrade to the wrapper's defaults)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def has_param(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def is_cpu_tensor(*tensors) -> bool:
    """True when every given tensor lives on the CPU (the emulator / nki.simulate path)."""
    import torch

    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in tensors)


def warn_once(key: str, message: str):
    _patching.warn_once(logger, key, message)


# Every fallback of an installed hook because a kernel refused the call: {(hook, reason): count}.
FALLBACKS = _patching.FallbackLog()


def refusals() -> tuple:
    """What a hook catches and turns into a fallback: kernel refusals (validation, limits, on the emulator its
    hardware checks) and this adapter's own input errors (`AdapterInputError`)."""
    return _patching.kernel_refusals(AdapterInputError)


def fall_back(hook: str, exc: BaseException):
    """Record why `hook` runs NxDI's original code (see `fallbacks()`) and warn once."""
    _patching.fall_back(FALLBACKS, logger, f"nxdi {hook}", exc)


def fallbacks() -> dict:
    """{(hook, reason): count} of the calls that ran NxDI's original code because a kernel refused them."""
    return FALLBACKS.snapshot()


param_names = _patching.param_names
