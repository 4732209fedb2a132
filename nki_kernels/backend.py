"""The one place kernels get `nki`, `nl` and `nisa` from: real NKI when present, else our emulator.

Kernel files do ``from nki_kernels.backend import nki, nl, nisa`` and nothing else NKI-related, so the
same source runs on a Trainium host (real `nki` >= 0.7, Neuron SDK 2.33, from AWS's Neuron pip repository) and
here.

* ``ACTIVE`` is ``"nki"`` or ``"emulator"``.
* ``NKI_KERNELS_FORCE_EMULATOR=1`` forces the emulator even where real NKI is installed.
* ``call(kernel, *arrays, lnc=None, inplace=())`` runs a kernel on NumPy arrays or torch CPU tensors (bf16
  included) and returns the same kind; only the arguments named in ``inplace`` are ever written. It runs at
  degree `lnc` (None: ``nki_kernels.lnc.resolve_lnc``: NEURON_LOGICAL_NC_CONFIG, else the target's default,
  2 on trn2), launched and compiled at it as NEURON_LOGICAL_NC_CONFIG=lnc does.
"""
from __future__ import annotations

import os
import numpy as np

from .emulator import lnc as lnc_rules  # noqa: F401  (the LNC rules, pure; shared with nki_kernels.lnc)
from .emulator.errors import EmulatorCheckError  # noqa: F401  (what the emulator's checks raise)

FORCE_EMULATOR_ENV = "NKI_KERNELS_FORCE_EMULATOR"
MIN_NKI_VERSION = (0, 7)          # NKI 0.7 = Neuron SDK 2.33: Python-tracing specialization, LNC check (NCC_EVRF066)


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
    if not hasattr(real, "jit") or not hasattr(real_isa, "nc_matmul"):
        return None
    if _version_tuple(version) < MIN_NKI_VERSION:  # pragma: no cover - needs a real, older NKI
        import warnings
        warnings.warn(f"nki_kernels needs NKI >= {'.'.join(map(str, MIN_NKI_VERSION))} (Neuron SDK 2.33); found nki "
                      f"{version}, so kernels run on the NumPy emulator. Upgrade the Neuron SDK to use the device.",
                      RuntimeWarning, stacklevel=2)
        return None
    return real, real_nl, real_isa


_real = _real_nki()
if _real is not None:
    nki, nl, nisa = _real
    ACTIVE = "nki"
else:
    from . import emulator as _emulator
    from .emulator import api as nki  # noqa: F401  (the emulated `nki` namespace: jit, simulate, ...)
    from .emulator import isa as nisa  # noqa: F401  (re-exported for kernel files)
    from .emulator import language as nl  # noqa: F401
    ACTIVE = "emulator"


def is_emulated() -> bool:
    return ACTIVE == "emulator"


def target_name() -> str:
    """The target kernels are compiled for: the emulator's (NEURON_PLATFORM_TARGET_OVERRIDE or
    `use_target`, trn2 by default), or on a Trainium host NEURON_PLATFORM_TARGET_OVERRIDE (trn2 when unset)."""
    if ACTIVE == "emulator":
        return _emulator.get_target().name
    return (os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "") or "trn2").lower()  # pragma: no cover


# ---------------------------------------------------------------- torch <-> numpy bridge


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _input_error(message: str):
    from .validation import KernelInputError
    return KernelInputError(message)


def _may_overlap(shape, strides, itemsize: int) -> bool:
    """True unless the strided layout provably maps distinct indices to distinct memory.

    Sufficient test: with the dims of size > 1 sorted by |stride|, each stride must step over everything
    the smaller dims span. Expanded (stride 0) and other self-overlapping views fail it."""
    if 0 in tuple(shape):
        return False                            # no elements, nothing to overlap
    dims = sorted((abs(st), n) for n, st in zip(shape, strides) if n > 1)
    span = itemsize
    for st, n in dims:
        if st < span:
            return True
        span = st * (n - 1) + span
    return False


def _torch_to_numpy(t):
    """A NumPy view of a CPU torch tensor, any strides (bf16/fp8 through ml_dtypes); no copy, no version bump."""
    torch = _torch()
    import ml_dtypes
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if t.dtype in special:
        bits, np_dtype = special[t.dtype]
        return t.view(bits).numpy().view(np_dtype)
    return t.numpy()


def _check_writable_in_place(who: str, name: str, x):
    """Refuse an in-place argument whose memory cannot take the kernel's update element by element."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        shape, strides, itemsize = tuple(x.shape), tuple(x.stride()), 1
    else:
        shape, strides, itemsize = x.shape, x.strides, x.itemsize
        if not x.flags.writeable:
            raise _input_error(f"{who}: {name} is updated in place, so it must be a writable array, got a "
                               f"read-only array")
    if _may_overlap(shape, strides, itemsize):
        raise _input_error(f"{who}: {name} is updated in place, so its elements must not share memory (an "
                           f"expand()ed or broadcast view cannot take the update), got shape {tuple(shape)} "
                           f"with strides {tuple(strides)}; pass a .clone() / np.copy and read the result from it")


def _to_numpy(who: str, name: str, x, in_place: bool, read_only: bool):
    """(array for the kernel, was_torch, write-back or None) for one argument; non-arrays pass through.

    Inputs the kernel only reads are handed over as read-only views (no copy; the emulator raises if the
    kernel writes one). An in-place argument goes in as a contiguous copy for torch (written back with
    `copy_` afterwards, so any strides work and the version counter records the update) and as itself for
    NumPy (the emulator writes the update into it)."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise _input_error(f"{who}: {name} must be a CPU tensor on the emulator (no real NKI here), got a "
                               f"tensor on {x.device}")
        if in_place:
            _check_writable_in_place(who, name, x)
            return np.array(_torch_to_numpy(x)), True, ("torch", x)
        a = _torch_to_numpy(x)
    elif isinstance(x, np.ndarray):
        if in_place:
            _check_writable_in_place(who, name, x)
            return x, False, None
        a = x
    else:
        if in_place:
            raise TypeError(f"{who}: {name} is declared in place, so it must be a NumPy array or torch tensor, "
                            f"got {type(x).__name__}")
        return x, False, None
    if read_only:
        a = a.view()
        a.flags.writeable = False
    return a, torch is not None and isinstance(x, torch.Tensor), None


def _write_back(original, updated):
    """Copy a kernel's in-place update into a torch tensor of any strides (inference tensors included)."""
    torch = _torch()
    src = _to_torch(updated)
    ctx = torch.inference_mode() if original.is_inference() else torch.no_grad()
    with ctx:
        original.copy_(src)


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


def _kernel_params(kernel) -> list:
    """Parameter names of an `nki.jit` kernel (a jit kernel or kernel[lnc]; signature follows __wrapped__)."""
    import inspect
    fn = getattr(kernel, "kernel", kernel)
    try:
        return list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    except (TypeError, ValueError):
        return []


def _kernel_name(kernel) -> str:
    """The name error messages give the call: the kernel function's, without its `_kernel` suffix (the public
    wrapper's name, e.g. gated_delta_rule_step for gated_delta_rule_step_kernel)."""
    fn = getattr(kernel, "kernel", kernel)
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
    return name[:-len("_kernel")] if name.endswith("_kernel") and name != "_kernel" else name


def _grad_check(who: str, named_args):
    from .validation import check_forward_only
    for name, x in named_args:
        check_forward_only(who, name, x)


def call(kernel, *args, lnc: int | None = None, inplace=(), **kwargs):
    """Run `kernel` (an `nki.jit` kernel) on arrays; torch CPU tensors in give torch tensors out.

    Non-array arguments pass through as trace-time constants. `inplace` names the kernel parameters the
    kernel writes (e.g. ``inplace=("state_pool",)``): only those are updated in the caller's arrays or
    tensors, whatever their strides (an overlapping view such as an ``expand()``ed tensor is refused with
    KernelInputError). Every other input is left bit-identical (torch ``_version`` unchanged); on the
    emulator a kernel that writes an undeclared input fails with EmulatorCheckError (a kernel bug).
    A torch input that requires grad while grad mode is on is refused: the kernels are forward-only.
    """
    from .lnc import resolve_lnc
    lnc = resolve_lnc(lnc, _kernel_name(kernel))
    if ACTIVE != "emulator" and _on_device(args, kwargs):  # pragma: no cover - needs real NKI
        # device (XLA) tensors go straight to the compiled kernel, as NxDI calls NKI kernels
        return _launcher(kernel, lnc)(*args, **kwargs)
    who, params = _kernel_name(kernel), _kernel_params(kernel)
    named = [(params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    inplace = (inplace,) if isinstance(inplace, str) else tuple(inplace)
    unknown = set(inplace) - {n for n, _ in named}
    if unknown:
        raise TypeError(f"{who}: inplace names {sorted(unknown)} are not arguments of this call "
                        f"(arguments: {[n for n, _ in named]})")
    _grad_check(who, named)
    read_only = ACTIVE == "emulator"
    converted, any_torch, write_backs = [], False, []
    for name, a in named:
        v, was_torch, wb = _to_numpy(who, name, a, name in inplace, read_only)
        any_torch |= was_torch
        converted.append(v)
        if wb is not None:
            write_backs.append((wb[1], v))
    pos, kw = converted[:len(args)], dict(zip(kwargs, converted[len(args):]))
    if ACTIVE == "emulator":
        try:
            out = _emulator.run(kernel, *pos, lnc=lnc, **kw).outputs
        except _emulator.EmulatorCheckError as e:
            if e.instruction == "launch" and e.operand in {n for n, _ in named} and "read-only" in str(e):
                raise _emulator.EmulatorCheckError(
                    "launch", e.operand, f"{who} wrote its input '{e.operand}', which its wrapper does not "
                    f"declare in place (call(..., inplace=...)): a kernel bug; inputs are never modified "
                    f"unless documented") from None
            raise
    else:  # pragma: no cover - needs real NKI
        launcher = _launcher(kernel, lnc)
        if os.environ.get("NKI_SIMULATOR") == "1" or not _has_neuron_device():
            out = nki.simulate(launcher)(*pos, **kw)
        else:
            out = launcher(*pos, **kw)
    for original, updated in write_backs:       # in-place arguments, after the whole launch succeeded
        _write_back(original, updated)
    return _to_torch(out) if any_torch else out


def call_ranks(kernel, per_rank_args, *, lnc: int = 1, inplace=(), **kwargs):
    """Run `kernel` once per tensor-parallel rank, the ranks together (their `nki.collectives` calls meet):
    rank r gets ``per_rank_args[r]`` (arrays or torch CPU tensors) and the shared trace-time `kwargs`. Returns
    the list of the ranks' outputs (torch when any input was torch). `inplace` names the kernel parameters the
    kernel updates (NumPy arrays, updated in each rank's own array, as in `call`).

    On the emulator the ranks run in threads (`emulator.run_ranks`, recorded as one launch). On a
    Trainium host each rank is its own process that launches the kernel on its shard, so this helper is
    emulator-only there."""
    if ACTIVE != "emulator":  # pragma: no cover - needs real NKI
        raise NotImplementedError("call_ranks runs all ranks in one process (emulator only); on Trainium each rank's "
                                  "process launches the kernel on its own shard with the replica group")
    who, params = _kernel_name(kernel), _kernel_params(kernel)
    inplace = (inplace,) if isinstance(inplace, str) else tuple(inplace)
    any_torch, per_rank = False, []
    for args in per_rank_args:
        named = [(params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(args)]
        _grad_check(who, named)
        conv = []
        for name, a in named:                       # read-only views, as in call(), except declared in-place ones
            if name in inplace and not isinstance(a, np.ndarray):
                raise TypeError(f"{who}: {name} is declared in place, so call_ranks needs a NumPy array, got "
                                f"{type(a).__name__}")
            v, was_torch, _ = _to_numpy(who, name, a, name in inplace, name not in inplace)
            any_torch |= was_torch
            conv.append(v)
        per_rank.append((tuple(conv), dict(kwargs)))
    # launched and compiled at `lnc`, as NEURON_LOGICAL_NC_CONFIG=lnc does
    outs = _emulator.run_ranks(kernel, world_size=len(per_rank), per_rank_inputs=per_rank, lnc=lnc).outputs
    return [_to_torch(o) for o in outs] if any_torch else list(outs)


def _launcher(kernel, lnc: int):  # pragma: no cover - needs real NKI
    """How NKI 0.7 launches at degree `lnc`: a plain ``kernel(...)`` takes NEURON_LOGICAL_NC_CONFIG (else 1),
    so it is used when that already gives `lnc`; otherwise the launch-grid bracket ``kernel[lnc]``, which
    the 0.7 docs deprecate but still require to launch at a degree the variable does not name."""
    from .lnc import env_lnc
    plain = env_lnc() or 1
    return kernel if plain == lnc else kernel[lnc]


def _on_device(args, kwargs) -> bool:
    torch = _torch()
    if torch is None:
        return False
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in list(args) + list(kwargs.values()))


def _has_neuron_device() -> bool:  # pragma: no cover - needs real hardware
    return os.path.exists("/dev/neuron0")
