"""The LNC (logical NeuronCore) degree rules of NKI 0.7 / neuronx-cc, shared by the emulator's launch
check and `nki_kernels.lnc` (the public wrappers' `lnc=None` resolution).

* The **degree in force** is the one neuronx-cc compiles the graph at: ``NEURON_LOGICAL_NC_CONFIG`` when
  set, else the target's default (2 on trn2 and trn3, 1 on trn1).
* A kernel's own degree: ``kernel[n](...)`` (the launch-grid bracket, being deprecated) says n; a plain
  ``kernel(...)`` takes ``NEURON_LOGICAL_NC_CONFIG`` when set, else 1.
* They must be equal, else neuronx-cc fails with NCC_EVRF066; a degree the target lacks fails with
  NCC_EARG001.

Pure functions over the environment and the target name; no import from the rest of nki_kernels.
"""
from __future__ import annotations

import os

LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"
ALLOWED_LNC = (1, 2)
# LNC degrees each target supports, and the one neuronx-cc uses when none is set.
TARGET_LNC = {"trn1": (1,), "trn2": (1, 2), "trn3": (1, 2)}
TARGET_DEFAULT_LNC = {"trn1": 1, "trn2": 2, "trn3": 2}


def env_lnc(error=ValueError) -> int | None:
    """The degree NEURON_LOGICAL_NC_CONFIG sets, or None when unset or empty.

    A value that is not the integer 1 or 2 raises ``error(message)``; the message names the variable,
    the allowed values and the value found."""
    raw = os.environ.get(LNC_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise error(f"{LNC_ENV} must be an integer LNC degree, one of {ALLOWED_LNC}, "
                    f"got {LNC_ENV}={raw!r}") from None
    if value not in ALLOWED_LNC:
        raise error(f"{LNC_ENV} must be one of {ALLOWED_LNC}, got {LNC_ENV}={raw!r}")
    return value


def target_default_lnc(target_name: str) -> int:
    """The degree neuronx-cc uses on `target_name` when NEURON_LOGICAL_NC_CONFIG is unset."""
    return TARGET_DEFAULT_LNC.get(target_name, 1)


def degree_in_force(target_name: str, error=ValueError) -> int:
    """The degree neuronx-cc compiles at: NEURON_LOGICAL_NC_CONFIG, else the target's default."""
    value = env_lnc(error)
    return target_default_lnc(target_name) if value is None else value


def plain_launch_lnc(error=ValueError) -> int:
    """The degree of a kernel called without brackets: NEURON_LOGICAL_NC_CONFIG, else 1."""
    value = env_lnc(error)
    return 1 if value is None else value


def lnc_problem(lnc, target_name: str, name: str = "lnc") -> str | None:
    """Why `lnc` is not a usable degree on `target_name` (a message naming `name` and the allowed
    values), or None when it is."""
    if isinstance(lnc, bool) or not isinstance(lnc, int) and not hasattr(lnc, "__index__"):
        return f"{name} must be one of {ALLOWED_LNC}, got {name}={lnc!r}"
    lnc = int(lnc)
    if lnc not in ALLOWED_LNC:
        return f"{name} must be one of {ALLOWED_LNC}, got {name}={lnc}"
    supported = TARGET_LNC.get(target_name, ALLOWED_LNC)
    if lnc not in supported:
        return f"{name}={lnc} is not available on {target_name}, which supports lnc in {supported} (NCC_EARG001)"
    return None


def mismatch_message(kernel_name: str, kernel_lnc: int, compiler_lnc: int) -> str:
    """NCC_EVRF066's wording, with what to do about it."""
    return (f"NCC_EVRF066: NKI kernel '{kernel_name}' is configured with LNC={kernel_lnc}, but neuronx-cc is "
            f"using LNC={compiler_lnc}. Set {LNC_ENV}={kernel_lnc} (or launch at lnc={compiler_lnc}); a kernel "
            "called without a degree uses LNC=1 unless the variable is set, while neuronx-cc defaults to "
            "LNC=2 on trn2 and later")
