"""The one place kernels get `nki`, `nl` and `nisa` from: real NKI when present, else our emulator.

Kernel files do ``from nki_kernels.backend import nki, nl, nisa`` and nothing else NKI-related, so the
same source runs on a Trainium host (real `nki` >= 0.3 from AWS's Neuron pip repository) and here.

* ``ACTIVE`` is ``"nki"`` or ``"emulator"``.
* ``NKI_KERNELS_FORCE_EMULATOR=1`` forces the emulator even where real NKI is installed.
* ``call(kernel, *arrays, lnc=1)`` runs a kernel on NumPy arrays or torch CPU tensors (bf16 included)
  and returns the same kind.
"""
from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext

import numpy as np

FORCE_EMULATOR_ENV = "NKI_KERNELS_FORCE_EMULATOR"
MIN_NKI_VERSION = (0, 3)


def _version_tuple(v: str):
    parts = []
    for p in str(v).split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _real_nki():
    """Real NKI modules, or None. The PyPI placeholder `nki` raises ImportError on import."""
    if os.environ.get(FORCE_EMULATOR_ENV, "").lower() in ("1", "true", "yes"):
        return None
    try:
        import nki as real  # noqa: F401
        import nki.isa as real_isa
        import nki.language as real_nl
        try:
            import nki.collectives  # noqa: F401  (so that `nki.collectives.all_reduce(...)` resolves, as in the emulator)
        except Exception:       # an NKI without collectives
            pass
    except Exception:       # ImportError from the placeholder, or anything a broken install raises
        return None
    version = getattr(real, "__version__", "0")
    if _version_tuple(version) < MIN_NKI_VERSION or not hasattr(real, "jit") or not hasattr(real_isa, "nc_matmul"):
        return None
    return real, real_nl, real_isa


_real = _real_nki()
if _real is not None:
    nki, nl, nisa = _real
    ACTIVE = "nki"
else:
    from . import emulator as nki  # noqa: F401
    from .emulator import isa as nisa  # noqa: F401  (re-exported for kernel files)
    from .emulator import language as nl  # noqa: F401
    ACTIVE = "emulator"


def is_emulated() -> bool:
    return ACTIVE == "emulator"


def target_name() -> str:
    """The target kernels are compiled for: the emulator's (NEURON_PLATFORM_TARGET_OVERRIDE or
    `use_target`, trn2 by default), or on a Trainium host NEURON_PLATFORM_TARGET_OVERRIDE (trn2 when unset)."""
    if ACTIVE == "emulator":
        return nki.get_target().name
    return (os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "") or "trn2").lower()  # pragma: no cover


# ---------------------------------------------------------------- torch <-> numpy bridge


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _to_numpy(x, copies: list):
    """A NumPy view of a CPU torch tensor (bf16/fp8 through ml_dtypes); other values pass through.

    A non-contiguous tensor is converted through a contiguous copy; (tensor, copy) goes into `copies`
    so that in-place updates made by the kernel can be written back afterwards.
    """
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        import ml_dtypes
        t = x.detach()
        if t.device.type != "cpu":
            raise ValueError(f"backend.call takes CPU tensors on the emulator, got a tensor on {t.device}")
        if not t.is_contiguous():
            t = t.contiguous()
            copies.append((x, t))
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), True
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), True
        if t.dtype == torch.float8_e5m2:
            return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2), True
        return t.numpy(), True
    return x, False


def _to_torch(a):
    torch = _torch()
    import ml_dtypes
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_to_torch(v) for v in a)
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    if a.dtype == ml_dtypes.float8_e5m2:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e5m2)
    return torch.from_numpy(a.copy())


def call(kernel, *args, lnc: int = 1, **kwargs):
    """Run `kernel` (an `nki.jit` kernel) on arrays; torch CPU tensors in give torch tensors out.

    Non-array arguments pass through as trace-time constants. Inputs the kernel writes (e.g. an
    in-place state pool) are updated in the caller's arrays or tensors.
    """
    if ACTIVE != "emulator" and _on_device(args, kwargs):  # pragma: no cover - needs real NKI
        # device (XLA) tensors go straight to the compiled kernel, as NxDI calls NKI kernels
        return (kernel[lnc] if lnc != 1 else kernel)(*args, **kwargs)
    converted, any_torch, copies = [], False, []
    for a in args:
        v, was_torch = _to_numpy(a, copies)
        any_torch |= was_torch
        converted.append(v)
    kw = {}
    for k, a in kwargs.items():
        v, was_torch = _to_numpy(a, copies)
        any_torch |= was_torch
        kw[k] = v
    if ACTIVE == "emulator":
        out = nki.run(kernel, *converted, lnc=lnc, **kw).outputs
    else:  # pragma: no cover - needs real NKI
        launcher = kernel[lnc] if lnc != 1 else kernel
        if os.environ.get("NKI_SIMULATOR") == "1" or not _has_neuron_device():
            out = nki.simulate(launcher)(*converted, **kw)
        else:
            out = launcher(*converted, **kw)
    with _torch().no_grad() if copies else _nullcontext():
        for original, contiguous in copies:      # in-place updates of non-contiguous inputs
            original.copy_(contiguous)
    return _to_torch(out) if any_torch else out


def call_ranks(kernel, per_rank_args, *, lnc: int = 1, **kwargs):
    """Run `kernel` once per tensor-parallel rank, the ranks together (their `nki.collectives` calls meet):
    rank r gets ``per_rank_args[r]`` (arrays or torch CPU tensors) and the shared trace-time `kwargs`. Returns
    the list of the ranks' outputs (torch when any input was torch).

    On the emulator the ranks run in threads (`emulator.collectives.run_ranks`, recorded as one launch). On a
    Trainium host each rank is its own process that launches the kernel on its shard, so this helper is
    emulator-only there."""
    if ACTIVE != "emulator":  # pragma: no cover - needs real NKI
        raise NotImplementedError("call_ranks runs all ranks in one process (emulator only); on Trainium each rank's "
                                  "process launches the kernel on its own shard with the replica group")
    any_torch, per_rank = False, []
    for args in per_rank_args:
        conv = []
        for a in args:
            v, was_torch = _to_numpy(a, [])
            any_torch |= was_torch
            conv.append(v)
        per_rank.append((tuple(conv), dict(kwargs)))
    from .emulator.collectives import run_ranks
    outs = run_ranks(kernel[lnc] if lnc != 1 else kernel, world_size=len(per_rank), per_rank_inputs=per_rank).outputs
    return [_to_torch(o) for o in outs] if any_torch else list(outs)


def _on_device(args, kwargs) -> bool:
    torch = _torch()
    if torch is None:
        return False
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in list(args) + list(kwargs.values()))


def _has_neuron_device() -> bool:  # pragma: no cover - needs real hardware
    return os.path.exists("/dev/neuron0")
