"""Which path ran: a call counter shared by the attention tests that assert a dispatch rule's choice."""
from unittest import mock


def counting(module, name):
    """(patch, calls): a `mock.patch.object` of module.name that appends one entry to `calls` per call and runs the
    real function (the kernels call their bodies through the module, so the patch sees every dispatch)."""
    real = getattr(module, name)
    calls = []

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    return mock.patch.object(module, name, spy), calls
