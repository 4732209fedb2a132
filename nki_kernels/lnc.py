"""Which LNC (logical NeuronCore degree) a kernel launch uses, resolved the way neuronx-cc does.

NKI 0.7 (Neuron SDK 2.33) rejects a kernel whose LNC differs from the compiler's (NCC_EVRF066), and
neuronx-cc defaults to LNC=2 on trn2 and later. So every public wrapper takes ``lnc=None`` and resolves it
here:

* an explicit ``lnc=`` (1 or 2) wins;
* else ``NEURON_LOGICAL_NC_CONFIG`` when set (it must be the integer 1 or 2);
* else the target's default: 2 on trn2 and trn3, 1 on trn1.

The target is the emulator's (``NEURON_PLATFORM_TARGET_OVERRIDE`` or ``use_target``; trn2 by default), or on
a Trainium host the one named by ``NEURON_PLATFORM_TARGET_OVERRIDE`` (trn2 when unset).
"""
from __future__ import annotations

import numpy as np

from .backend import lnc_rules as _rules
from .validation import KernelInputError

# the rules live beside the emulator's launch check (nki_kernels/emulator/lnc.py), which enforces the same ones
LNC_ENV = _rules.LNC_ENV
ALLOWED_LNC = _rules.ALLOWED_LNC
TARGET_LNC = _rules.TARGET_LNC                  # LNC degrees each target supports
TARGET_DEFAULT_LNC = _rules.TARGET_DEFAULT_LNC  # the one neuronx-cc uses when none is set


def current_target_name() -> str:
    """The target kernels are compiled (or emulated) for."""
    from . import backend
    return backend.target_name()


def for_target(table: dict, target: str | None = None):
    """table's entry for the target (default: the current one); trn2's for a target the table does not name (the
    per-target constants of nki_kernels.hw)."""
    return table.get(target or current_target_name(), table["trn2"])


def env_lnc(who: str = "nki_kernels") -> int | None:
    """The degree set by NEURON_LOGICAL_NC_CONFIG, or None when unset. A non-integer value is an error."""
    return _rules.env_lnc(lambda message: KernelInputError(f"{who}: {message}"))


def default_lnc(who: str = "nki_kernels") -> int:
    """The degree in force when a kernel names none: NEURON_LOGICAL_NC_CONFIG, else the target's default."""
    value = env_lnc(who)
    if value is not None:
        return value
    return _rules.target_default_lnc(current_target_name())


def resolve_lnc(lnc, who: str) -> int:
    """The LNC a public wrapper launches with: `lnc` when given, else `default_lnc()`; checked against the
    allowed values and the target. `who` is the kernel name used in error messages."""
    if lnc is None:
        lnc = default_lnc(who)
    if isinstance(lnc, bool) or not isinstance(lnc, (int, np.integer)):
        raise KernelInputError(f"{who}: lnc must be one of {ALLOWED_LNC} or None, got lnc={lnc!r}")
    lnc = int(lnc)
    if lnc not in ALLOWED_LNC:
        raise KernelInputError(f"{who}: lnc must be one of {ALLOWED_LNC} or None, got lnc={lnc}")
    target = current_target_name()
    supported = TARGET_LNC.get(target, ALLOWED_LNC)
    if lnc not in supported:
        raise KernelInputError(f"{who}: lnc={lnc} is not available on {target}, which supports lnc in {supported}")
    return lnc
