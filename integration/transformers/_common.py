"""Shared plumbing for the transformers hooks: backend selection, call counters, tensor conversion.

Every hook reaches a kernel through `Kernels.get(name)`, which returns the public wrapper from `nki_kernels`
(backend "emulator" or "nki") or the float64 NumPy reference from `nki_kernels/<family>/reference.py` (backend
"reference"). A family whose wrapper is not importable is reported "not available" and its hook leaves the
model's own code in place.
"""
from __future__ import annotations

import collections
import importlib
import threading
import warnings

import numpy as np

BACKENDS = ("emulator", "nki", "reference")

# public kernel name -> (module of the wrapper, module of the reference, candidate names of the reference function)
_KERNEL_SOURCES = {
    "flash_attention": ("nki_kernels.attention.prefill", "nki_kernels.attention.reference",
                        ("flash_attention_ref", "flash_attention_reference", "flash_attention", "attention_ref")),
    "flash_attention_decode": ("nki_kernels.attention.decode", "nki_kernels.attention.reference",
                               ("flash_attention_decode_ref", "flash_attention_decode_reference",
                                "flash_attention_decode", "attention_decode_ref")),
    "flash_attention_varlen": ("nki_kernels.attention.varlen", "nki_kernels.attention.reference",
                               ("flash_attention_varlen_ref",)),
    "gated_delta_rule": ("nki_kernels.deltanet.chunk", "nki_kernels.deltanet.reference",
                         ("gated_delta_rule_ref", "gated_delta_rule_reference", "gated_delta_rule")),
    "gated_delta_rule_step": ("nki_kernels.deltanet.recurrent", "nki_kernels.deltanet.reference",
                              ("gated_delta_rule_step_ref", "gated_delta_rule_step_reference",
                               "gated_delta_rule_step")),
    "causal_conv1d": ("nki_kernels.deltanet.conv1d", "nki_kernels.deltanet.reference",
                      ("causal_conv1d_ref", "causal_conv1d_reference", "causal_conv1d")),
    "causal_conv1d_update": ("nki_kernels.deltanet.conv1d", "nki_kernels.deltanet.reference",
                             ("causal_conv1d_update_ref", "causal_conv1d_update_reference", "causal_conv1d_update")),
    "moe_route": ("nki_kernels.moe.routing", "nki_kernels.moe.routing", ("moe_route",)),
    "moe_block_mapping": ("nki_kernels.moe.routing", "nki_kernels.moe.routing", ("moe_block_mapping",)),
    "moe_blockwise": ("nki_kernels.moe.blockwise", "nki_kernels.moe.reference",
                      ("moe_blockwise_reference", "moe_blockwise_ref", "moe_blockwise")),
    "moe_decode": ("nki_kernels.moe.decode", "nki_kernels.moe.reference",
                   ("moe_decode_reference", "moe_decode_ref", "moe_decode")),
    "code_predictor": ("nki_kernels.codepredictor.unrolled", "nki_kernels.codepredictor.reference",
                       ("code_predictor_reference", "code_predictor_ref", "code_predictor")),
}


DEEPCOPY_REFUSED = ("copy.deepcopy of a model patched by nki-kernels: the copy would keep forwards bound to the "
                    "original's layers. restore() the patch, copy the model, then patch each model")


FORWARD_ONLY_REASON = "autograd (the kernels are forward-only)"
TRAINING_REASONS = (FORWARD_ONLY_REASON, "attention dropout in training")
FORWARD_ONLY_WARNING = ("nki-kernels: the patched model runs with grad enabled or in training mode, so its hooks fall "
                        "back to the stock code ({reason}); the kernels are forward-only: run inference under "
                        "torch.no_grad() or torch.inference_mode() and model.eval() to use them")


def kernel_refusals() -> tuple:
    """The exceptions a hook turns into a fallback: a wrapper's KernelInputError, and on the emulator its
    EmulatorCheckError (a shape the checks let through that does not fit SBUF/PSUM: a compile failure on the
    device). The model then runs its own code and the reason goes to `fallbacks()`; it never raises mid-model."""
    from nki_kernels.validation import KernelInputError
    from nki_kernels import backend
    if backend.is_emulated():
        return (KernelInputError, backend.EmulatorCheckError)
    return (KernelInputError,)  # pragma: no cover - needs real NKI


def refusal_reason(exc: BaseException) -> str:
    """The `fallbacks()` reason for an exception in `kernel_refusals()`."""
    from nki_kernels.validation import KernelInputError
    if isinstance(exc, KernelInputError):
        return f"kernel refused: {exc}"
    return f"kernel failed the emulator's hardware checks (on-chip capacity): {exc}"


# kernel -> the patch family whose hook launches it (the encoders' hook names itself: it shares
# flash_attention_varlen with the text attention's packed path)
KERNEL_FAMILY = {"flash_attention": "attention", "flash_attention_decode": "attention",
                 "flash_attention_varlen": "attention", "gated_delta_rule": "deltanet",
                 "gated_delta_rule_step": "deltanet", "causal_conv1d": "deltanet", "causal_conv1d_update": "deltanet",
                 "moe_decode": "moe", "moe_blockwise": "moe", "code_predictor": "code_predictor"}


class Stats:
    """Counts kernel calls (per kernel and per patch family) and fallbacks (with their reason) for one patch
    handle. Thread-safe.

    The first fallback caused by grad mode or training mode warns once (UserWarning) per handle."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = collections.Counter()       # kernel name -> number of launches
        self.family_calls = collections.Counter()   # (patch family, kernel name) -> number of launches
        self.fallbacks = collections.Counter()   # (hook, reason) -> number of times the model's own code ran
        self.warned_training = False

    def __deepcopy__(self, memo):
        # reached through every hook a patched model holds (attention, GDN, MoE modules)
        raise TypeError(DEEPCOPY_REFUSED)

    def called(self, kernel: str, n: int = 1, family: str | None = None):
        with self._lock:
            self.calls[kernel] += n
            self.family_calls[(family or KERNEL_FAMILY.get(kernel, "other"), kernel)] += n

    def fell_back(self, hook: str, reason: str):
        with self._lock:
            self.fallbacks[(hook, reason)] += 1
            warn = reason in TRAINING_REASONS and not self.warned_training
            self.warned_training |= warn
        if warn:
            warnings.warn(FORWARD_ONLY_WARNING.format(reason=reason), UserWarning, stacklevel=3)

    def reset(self):
        with self._lock:
            self.calls.clear()
            self.family_calls.clear()
            self.fallbacks.clear()


class Kernels:
    """Resolves kernel callables for one backend; `get(name)` returns None when the kernel is not available."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"patch: backend must be one of {BACKENDS}, got backend={backend!r}")
        if backend in ("emulator", "nki"):
            from nki_kernels import backend as nkb
            if backend == "nki" and nkb.ACTIVE != "nki":
                raise RuntimeError("patch: backend='nki' needs the real NKI runtime (the `nki` package from AWS's "
                                   "Neuron pip repository); it is not importable here, use backend='emulator'")
            if backend == "emulator" and nkb.ACTIVE != "emulator":
                raise RuntimeError("patch: backend='emulator' but real NKI is installed and active; set "
                                   f"{nkb.FORCE_EMULATOR_ENV}=1 before importing nki_kernels to use the emulator")
        self.backend = backend
        self._cache: dict[str, object] = {}
        self.missing: dict[str, str] = {}
        self.record: dict | None = None       # kernel name -> [RunResult] while recording (emulator only)

    def get(self, name: str):
        if name in self._cache:
            return self._cache[name]
        wrapper_mod, ref_mod, ref_names = _KERNEL_SOURCES[name]
        fn = None
        try:
            if self.backend == "reference":
                mod = importlib.import_module(ref_mod)
                for cand in ref_names:
                    fn = getattr(mod, cand, None)
                    if callable(fn):
                        break
                    fn = None
                if fn is None:
                    self.missing[name] = f"no reference function {'/'.join(ref_names)} in {ref_mod}"
            else:
                mod = importlib.import_module(wrapper_mod)
                fn = getattr(mod, name, None)
                if fn is None:
                    self.missing[name] = f"{wrapper_mod} has no {name}"
        except ImportError as exc:
            self.missing[name] = f"{wrapper_mod if self.backend != 'reference' else ref_mod} not importable ({exc})"
            fn = None
        if fn is not None and self.backend == "emulator":
            fn = self._recording(name, fn)
        self._cache[name] = fn
        return fn

    def _recording(self, name, fn):
        """Wrap an emulator wrapper so that, while `self.record` is a dict, its launches (RunResults) are kept
        under the kernel name for the cost model (`PatchHandle.modeled()`)."""
        import functools

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if self.record is None:
                return fn(*args, **kwargs)
            from nki_kernels.emulator import record_launches
            with record_launches() as runs:
                out = fn(*args, **kwargs)
            self.record.setdefault(name, []).extend(runs)
            return out
        return run

    def available(self, *names: str) -> bool:
        return all(self.get(n) is not None for n in names)


def needs_grad(*tensors) -> bool:
    """True when autograd would track these tensors: the kernels are forward-only, so the hooks fall back."""
    import torch
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ------------------------------------------------------------------ torch <-> numpy


def to_numpy(t, dtype=None):
    """torch tensor (any dtype, CPU) -> NumPy array; bf16 goes through fp32 unless dtype is given."""
    import torch
    if isinstance(t, np.ndarray):
        return t if dtype is None else t.astype(dtype)
    t = t.detach()
    if t.dtype == torch.bfloat16 and dtype is None:
        import ml_dtypes
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    if t.dtype in (torch.bfloat16, torch.float16) and dtype is not None:
        t = t.float()
    a = t.contiguous().numpy()
    return a if dtype is None else a.astype(dtype)


def to_torch(a, like=None, dtype=None):
    """NumPy array or torch tensor -> torch tensor with the dtype of `like` (or `dtype`)."""
    import torch
    if isinstance(a, torch.Tensor):
        out = a
    else:
        a = np.ascontiguousarray(a)
        try:
            import ml_dtypes
            if a.dtype == ml_dtypes.bfloat16:
                out = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
            else:
                out = torch.from_numpy(a.copy())
        except ImportError:  # pragma: no cover
            out = torch.from_numpy(a.copy())
    target = dtype if dtype is not None else (like.dtype if like is not None else None)
    if target is not None and out.dtype != target:
        out = out.to(target)
    return out


def kernel_input(t, backend: str):
    """What a kernel receives: torch tensors for the wrappers (backend.call converts them), float64 NumPy for
    the references (they compute in float64 and have no torch bridge)."""
    if backend == "reference":
        import torch
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point:
                return to_numpy(t, np.float64)
            return to_numpy(t)
        return t
    return t.detach().contiguous() if hasattr(t, "detach") else t
