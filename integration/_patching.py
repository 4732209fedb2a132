"""What the framework adapters (integration/nxdi, integration/vllm_neuron) share: the record of the attributes
apply() replaced (undone last change first), warn-once logging, and parameter-list inspection and comparison."""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

_WARNED: set = set()


def warn_once(logger, key: str, message: str):
    """Log `message` as a warning the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


def param_names(fn):
    """Parameter names of a function or method without a leading self / cls / ctx; None when not inspectable."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if names and names[0] in ("self", "cls", "ctx"):
        names = names[1:]
    return names


def signature_difference(names, expected, exact=False) -> str | None:
    """None when the parameter list `names` starts with exactly `expected` (and, with `exact`, has nothing
    more); else the first difference in words (differing position, missing or extra parameters)."""
    if names is None:
        return "its signature cannot be inspected"
    names, expected = tuple(names), tuple(expected)
    for i, want in enumerate(expected):
        if i >= len(names):
            return f"missing parameter(s) {expected[i:]} from position {i + 1}"
        if names[i] != want:
            return f"parameter {i + 1} is {names[i]!r}, expected {want!r}"
    if exact and len(names) > len(expected):
        return f"extra parameter(s) {names[len(expected):]}"
    return None


@dataclass
class PatchSet:
    """What apply() changed; `restore()` (or leaving the `with` block) undoes it, last change first."""
    patches: list = field(default_factory=list)      # (owner, attr, had_attr, old_value)
    installed: dict = field(default_factory=dict)    # family -> ["Class.method" / "module.function", ...]

    def _set(self, owner, attr, value):
        own_dict = isinstance(owner, (type, types.ModuleType))
        had = attr in vars(owner) if own_dict else hasattr(owner, attr)
        old = (vars(owner)[attr] if own_dict else getattr(owner, attr)) if had else None
        self.patches.append((owner, attr, had, old))
        setattr(owner, attr, value)

    def restore(self):
        while self.patches:
            owner, attr, had, old = self.patches.pop()
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)
        self.installed = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


# ----------------------------------------------------------------------------------------- kernel refusals


def kernel_refusals(*extra) -> tuple:
    """The exceptions an adapter's hook turns into a fallback to the code it replaced: a wrapper's
    `KernelInputError` (a validation rule or a documented limit), on the emulator its `EmulatorCheckError` (a
    shape the wrapper's checks let through that fails a hardware check: SBUF / PSUM capacity, an access rule; a
    compile failure on the device), plus the adapter's own `extra` validation errors. Anything else is a bug and
    propagates."""
    from nki_kernels import backend
    from nki_kernels.validation import KernelInputError
    found = (KernelInputError,) + tuple(extra)
    if backend.is_emulated():
        found += (backend.EmulatorCheckError,)
    return found


def refusal_reason(exc: BaseException) -> str:
    """The recorded reason for an exception in `kernel_refusals()`."""
    from nki_kernels import backend
    if backend.is_emulated() and isinstance(exc, backend.EmulatorCheckError):
        return f"kernel failed the emulator's hardware checks (on-chip capacity or an access rule): {exc}"
    return f"kernel refused: {exc}"


class FallbackLog:
    """Process-wide record of an adapter's fallbacks: (hook, reason) -> how many times the replaced code ran
    because a kernel refused the call. Thread-safe; `clear()` empties it."""

    def __init__(self):
        import collections
        import threading
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def record(self, hook: str, reason: str):
        with self._lock:
            self._counts[(hook, reason)] += 1

    def snapshot(self) -> dict:
        """{(hook, reason): count} at this moment."""
        with self._lock:
            return dict(self._counts)

    def clear(self):
        with self._lock:
            self._counts.clear()


def fall_back(log: FallbackLog, logger, hook: str, exc: BaseException):
    """Record a refusal of `hook` (e.g. "nxdi attention: NeuronAttentionBase.perform_prefill") and warn once per
    distinct message; the caller then runs the original code."""
    reason = refusal_reason(exc)
    log.record(hook, reason)
    warn_once(logger, f"{hook}-{reason}", f"{hook}: {reason}; using the original implementation")
