"""Every public function leaves its inputs bit-identical (torch `_version` unchanged), except the documented
in-place arguments, which must equal the reference update (issue 16).

Each function of `nki_kernels.__all__` runs on four layouts of the same values: NumPy contiguous, NumPy strided
views (every array a view with step 2 into a larger buffer), torch contiguous, torch strided views.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import nki_kernels
from _public_cases import case
from nki_kernels.testing import assert_close

torch = pytest.importorskip("torch")


def _strided_np(a):
    """The same values as a non-contiguous view (step 2 along every axis of a twice-as-large buffer)."""
    buf = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    view = buf[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _to_torch(a, strided):
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a).copy())
    if strided:
        big = torch.zeros(tuple(2 * n for n in t.shape), dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        t = view
    return t


def _layout(a, layout):
    if not isinstance(a, np.ndarray):
        return a
    if layout == "numpy":
        return a.copy()
    if layout == "numpy_strided":
        return _strided_np(a)
    return _to_torch(a, strided=layout == "torch_strided")


def _f64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


def _bits(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone(), x._version
    return x.copy(), None


def _same_bits(x, snap):
    before, version = snap
    if isinstance(x, torch.Tensor):
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        as_bits = lambda t: t.detach().view(ints[t.element_size()])  # noqa: E731  (same-size view: any strides)
        return x._version == version and torch.equal(as_bits(x), as_bits(before))
    return x.tobytes() == before.tobytes() and x.flags.writeable == before.flags.writeable


def test_every_public_function_has_a_case():
    rng = np.random.default_rng(0)
    for name in nki_kernels.__all__:
        case(name, rng)


@pytest.mark.parametrize("layout", ["numpy", "numpy_strided", "torch", "torch_strided"])
@pytest.mark.parametrize("name", nki_kernels.__all__)
def test_inputs_are_untouched_except_documented_in_place(name, layout):
    rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
    pos, consts, in_place = case(name, rng)
    inputs = {n: _layout(a, layout) for n, a in pos}
    kw = {n: _layout(a, layout) if n in ("initial_state", "top_k_index") else a for n, a in consts.items()}
    everything = {**inputs, **{n: a for n, a in kw.items() if isinstance(a, (np.ndarray, torch.Tensor))}}
    snaps = {n: _bits(a) for n, a in everything.items()}
    weights = consts.get("weights")
    weight_snaps = {f: np.asarray(getattr(weights, f)).copy() for f in vars(weights)
                    if isinstance(getattr(weights, f), np.ndarray)} if weights is not None else {}
    expected = {n: fn({k: _f64(v) for k, v in inputs.items()}) for n, fn in in_place.items()}
    with torch.no_grad():
        getattr(nki_kernels, name)(*inputs.values(), **kw)
    for n, a in everything.items():
        if n in in_place:
            assert_close(f"{name}: in-place {n} ({layout})", expected[n], _f64(a), dtype="float32")
            if isinstance(a, torch.Tensor):
                assert a._version > snaps[n][1], f"{name}: {n} updated without a version bump"
        else:
            assert _same_bits(a, snaps[n]), f"{name}: input {n} ({layout}) was modified"
    for f, before in weight_snaps.items():
        assert np.asarray(getattr(weights, f)).tobytes() == before.tobytes(), f"{name}: weights.{f} was modified"
