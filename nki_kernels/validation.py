"""Input validation for host wrappers: one error type, messages that name the argument and the limit."""
from __future__ import annotations


class KernelInputError(ValueError):
    """Raised by a kernel's host wrapper for inputs it does not support."""


def kernel_check(cond, message: str):
    """Raise KernelInputError(message) unless cond. Message style: "<kernel>: <rule>, got x=<v>"."""
    if not cond:
        raise KernelInputError(message)
