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
