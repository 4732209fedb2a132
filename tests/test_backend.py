"""backend.call bridges NumPy and torch; the shim picks real NKI only when it is genuine and >= 0.3."""
from __future__ import annotations

import importlib
import sys
import types

import ml_dtypes
import numpy as np
import pytest

import nki_kernels.backend as backend
from nki_kernels.emulator import isa as emu_isa
from nki_kernels.emulator import language as emu_nl

torch = pytest.importorskip("torch")

nki, nl, nisa = backend.nki, backend.nl, backend.nisa


@pytest.fixture(autouse=True)
def _lnc1(monkeypatch):
    """The test kernels here are LNC=1 kernels (no program split): compile and launch them at LNC=1."""
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")


@nki.jit
def _affine_kernel(x, scale, shift):
    """out = x * scale + shift (fp32 compute), rows <= 128."""
    t = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=scale, op1=nl.add, operand1=shift)
    out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


@nki.jit
def _two_outputs_and_in_place(x, state):
    """Returns (x + 1, x * 2) and adds x into `state` in place."""
    t = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    a = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=a, data=t, op0=nl.add, operand0=1.0)
    b = nl.ndarray(x.shape, x.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=b, data=t, op0=nl.multiply, operand0=2.0)
    s = nl.ndarray(state.shape, state.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=s, src=state)
    nisa.tensor_tensor(dst=s, data1=s, data2=t, op=nl.add)
    nisa.dma_copy(dst=state, src=s)
    out_a = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
    out_b = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out_a, src=a)
    nisa.dma_copy(dst=out_b, src=b)
    return out_a, out_b


def test_the_emulator_is_active_here():
    if backend._real_nki() is not None:
        pytest.skip("real NKI is installed here")
    assert backend.ACTIVE == "emulator" and backend.is_emulated()
    assert backend.nl is emu_nl and backend.nisa is emu_isa


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_numpy_and_torch_give_identical_results(dtype, rng):
    x_np = (rng.standard_normal((20, 33)) * 3).astype(np.float32)
    x_t = torch.from_numpy(x_np.copy()).to(getattr(torch, dtype))
    x_np = x_np.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else x_np
    out_np = backend.call(_affine_kernel, x_np, 1.5, -0.25, lnc=1)
    out_t = backend.call(_affine_kernel, x_t, 1.5, -0.25, lnc=1)
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    assert out_t.dtype == getattr(torch, dtype) and str(out_np.dtype) == dtype
    np.testing.assert_array_equal(out_t.float().numpy(), out_np.astype(np.float32))
    ref = (x_np.astype(np.float32) * np.float32(1.5) + np.float32(-0.25)).astype(out_np.dtype)
    np.testing.assert_array_equal(out_np, ref)


@pytest.mark.parametrize("lnc", [1, 2])
def test_public_examples_accept_torch_and_return_torch(lnc, rng):
    from nki_kernels import rmsnorm, softmax
    x = torch.from_numpy(rng.standard_normal((130, 40)).astype(np.float32)).to(torch.bfloat16)
    w = torch.ones(40, dtype=torch.bfloat16)
    for out_t, out_np in ((softmax(x, lnc=lnc), softmax(_np(x), lnc=lnc)),
                          (rmsnorm(x, w, 1e-6, lnc=lnc), rmsnorm(_np(x), _np(w), 1e-6, lnc=lnc))):
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.bfloat16
        np.testing.assert_array_equal(out_t.float().numpy(), out_np.astype(np.float32))


def _np(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()


def test_tuple_outputs_and_in_place_updates_numpy(rng):
    x = rng.standard_normal((8, 6)).astype(np.float32)
    state = rng.standard_normal((8, 6)).astype(np.float32)
    before = state.copy()
    a, b = backend.call(_two_outputs_and_in_place, x, state, inplace=("state",), lnc=1)
    np.testing.assert_array_equal(a, x + 1)
    np.testing.assert_array_equal(b, x * 2)
    np.testing.assert_array_equal(state, before + x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuple_outputs_and_in_place_updates_torch(dtype, rng):
    tdt = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32)).to(tdt)
    state = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32)).to(tdt)
    before = state.clone()
    a, b = backend.call(_two_outputs_and_in_place, x, state, inplace=("state",), lnc=1)
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == tdt
    torch.testing.assert_close(a, (x.float() + 1).to(tdt), rtol=0, atol=0)
    torch.testing.assert_close(state, (before.float() + x.float()).to(tdt), rtol=0, atol=0)


def test_in_place_update_of_a_non_contiguous_torch_tensor(rng):
    x = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    state = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32)).t()      # (8, 6), strided
    before = state.clone()
    backend.call(_two_outputs_and_in_place, x.t().contiguous(), state, inplace="state", lnc=1)
    torch.testing.assert_close(state, before + x.t())


# ---------------------------------------------------------------- only declared in-place arguments are written


def _snapshot(t):
    return t.detach().clone(), None if t.is_inference() else t._version


def _assert_untouched(t, snap):
    before, version = snap
    assert version is None or t._version == version
    assert torch.equal(t.detach(), before)


def test_an_undeclared_write_is_an_emulator_error_and_leaves_the_input_alone(rng):
    x = rng.standard_normal((8, 6)).astype(np.float32)
    state = rng.standard_normal((8, 6)).astype(np.float32)
    before = state.copy()
    with pytest.raises(backend.EmulatorCheckError, match="wrote its input 'state'.*not declare in place"):
        backend.call(_two_outputs_and_in_place, x, state)
    np.testing.assert_array_equal(state, before)
    assert state.flags.writeable                       # the caller's array keeps its flags
    st_t = torch.from_numpy(state.copy())
    snap = _snapshot(st_t)
    with pytest.raises(backend.EmulatorCheckError):
        backend.call(_two_outputs_and_in_place, torch.from_numpy(x), st_t)
    _assert_untouched(st_t, snap)


def test_unknown_in_place_names_are_a_type_error(rng):
    x = rng.standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(TypeError, match="stat"):
        backend.call(_two_outputs_and_in_place, x, x.copy(), inplace=("stat",))


@pytest.mark.parametrize("make", ["expand", "transpose", "slice_step", "inference", "inference_view"])
def test_read_only_inputs_of_any_layout_stay_bit_identical(make, rng):
    base = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32))
    if make == "expand":
        x = base[:1].expand(8, 6)
    elif make == "transpose":
        x = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32)).t()
    elif make == "slice_step":
        x = torch.from_numpy(rng.standard_normal((16, 12)).astype(np.float32))[::2, ::2]
    else:
        with torch.inference_mode():
            x = base.clone() if make == "inference" else base.clone().t().contiguous().t()
    assert make in ("inference",) or not x.is_contiguous()
    snap = _snapshot(x)
    state = torch.zeros(8, 6)
    a, b = backend.call(_two_outputs_and_in_place, x, state, inplace=("state",))
    _assert_untouched(x, snap)
    ref = x.detach().clone()
    torch.testing.assert_close(a, ref + 1, rtol=0, atol=0)
    torch.testing.assert_close(b, ref * 2, rtol=0, atol=0)
    torch.testing.assert_close(state, ref, rtol=0, atol=0)


def test_a_transposed_activation_keeps_its_autograd_history_intact(rng):
    w = torch.randn(6, 8, requires_grad=True)
    act = (w * 2).t()                                   # non-contiguous, part of a graph
    with torch.no_grad():
        backend.call(_affine_kernel, act, 2.0, 0.0)
    act.sum().backward()                                 # "modified by an inplace operation" if it was written
    torch.testing.assert_close(w.grad, torch.full_like(w, 2.0))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "inference", "inference_transposed"])
def test_declared_in_place_arguments_are_updated_whatever_their_strides(layout, rng):
    x = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32))
    raw = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    if layout.startswith("inference"):
        with torch.inference_mode():
            state = raw.clone().t() if layout.endswith("transposed") else raw.clone().t().contiguous()
    else:
        state = raw.clone().t() if layout == "transposed" else raw.clone().t().contiguous()
    before, version = _snapshot(state)
    backend.call(_two_outputs_and_in_place, x, state, inplace=("state",))
    torch.testing.assert_close(state, before + x, rtol=0, atol=0)
    if version is not None:
        assert state._version > version                  # autograd sees the update


def test_in_place_numpy_arrays_of_any_strides(rng):
    x = rng.standard_normal((8, 6)).astype(np.float32)
    pool = rng.standard_normal((6, 8)).astype(np.float32)
    state = pool.T                                       # a view into pool
    before = state.copy()
    backend.call(_two_outputs_and_in_place, x, state, inplace=("state",))
    np.testing.assert_array_equal(pool.T, before + x)


def test_overlapping_or_read_only_in_place_arguments_are_refused(rng):
    from nki_kernels.validation import KernelInputError
    x = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32))
    state = torch.zeros(1, 6).expand(8, 6)
    with pytest.raises(KernelInputError, match="state is updated in place.*must not share memory"):
        backend.call(_two_outputs_and_in_place, x, state, inplace=("state",))
    with pytest.raises(KernelInputError, match="must not share memory"):
        row = np.zeros(6, np.float32)
        backend.call(_two_outputs_and_in_place, x.numpy(), np.lib.stride_tricks.as_strided(row, (8, 6), (0, 4)),
                     inplace=("state",))
    ro = np.zeros((8, 6), np.float32)
    ro.flags.writeable = False
    with pytest.raises(KernelInputError, match="read-only"):
        backend.call(_two_outputs_and_in_place, x.numpy(), ro, inplace=("state",))


def test_the_overlap_test_matches_a_brute_force_count(rng):
    for _ in range(300):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 4, ndim))
        strides = tuple(int(s) for s in rng.integers(-6, 7, ndim))
        offsets = {sum(i * s for i, s in zip(idx, strides)) for idx in np.ndindex(*shape)}
        overlaps = len(offsets) < int(np.prod(shape))
        if overlaps:                                     # sufficient test: never claims "no overlap" wrongly
            assert backend._may_overlap(shape, strides, 1), (shape, strides)
    assert not backend._may_overlap((4, 3), (12, 4), 4)    # C order fp32
    assert not backend._may_overlap((4, 3), (4, 16), 4)    # Fortran order fp32
    assert backend._may_overlap((4, 3), (0, 4), 4)         # broadcast rows


def test_requires_grad_with_grad_enabled_is_refused_forward_only():
    from nki_kernels.validation import KernelInputError
    x = torch.randn(8, 6, requires_grad=True)
    with pytest.raises(KernelInputError, match="forward-only.*x requires grad.*no_grad"):
        backend.call(_affine_kernel, x, 1.0, 0.0)
    with torch.no_grad():
        out = backend.call(_affine_kernel, x, 1.0, 0.0)
    assert not out.requires_grad
    with torch.inference_mode():
        backend.call(_affine_kernel, x, 1.0, 0.0)
    backend.call(_affine_kernel, x.detach(), 1.0, 0.0)


def test_issue_16_expanded_kv_into_flash_attention():
    import nki_kernels
    torch.manual_seed(0)
    q = torch.randn(2, 2, 16, 64)
    kv = torch.randn(1, 1, 16, 64).expand(2, 1, 16, 64)
    snaps = [_snapshot(t) for t in (q, kv)]
    out = nki_kernels.flash_attention(q, kv, kv, causal=False)
    for t, s in zip((q, kv), snaps):
        _assert_untouched(t, s)
    k = kv.contiguous().repeat_interleave(2, dim=1).double()
    scores = (q.double() @ k.transpose(-1, -2)) / 8.0
    ref = torch.softmax(scores, -1) @ k
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- shim selection


def _fake_nki(version="0.6.0", genuine=True):
    """A stand-in for the real `nki` package: nki, nki.isa, nki.language modules."""
    mod = types.ModuleType("nki")
    mod.__version__ = version
    mod.jit = lambda f=None, **kw: f
    isa = types.ModuleType("nki.isa")
    if genuine:
        isa.nc_matmul = lambda *a, **k: None
    lang = types.ModuleType("nki.language")
    mod.isa, mod.language = isa, lang
    return {"nki": mod, "nki.isa": isa, "nki.language": lang}


@pytest.fixture
def shim(monkeypatch):
    """Reload the backend under a patched environment, restoring the real state afterwards."""
    def load(modules=None, force=None):
        for name in ("nki", "nki.isa", "nki.language"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        if modules is not None:
            for name, m in modules.items():
                monkeypatch.setitem(sys.modules, name, m)
        if force is None:
            monkeypatch.delenv(backend.FORCE_EMULATOR_ENV, raising=False)
        else:
            monkeypatch.setenv(backend.FORCE_EMULATOR_ENV, force)
        return importlib.reload(backend)
    active = backend.ACTIVE
    yield load
    monkeypatch.undo()
    importlib.reload(backend)
    assert backend.ACTIVE == active


@pytest.mark.parametrize("version,genuine,expected", [
    ("0.7.0", True, "nki"), ("0.8.1", True, "nki"), ("1.2", True, "nki"),
    ("0.6.0", True, "emulator"), ("0.3.0", True, "emulator"), ("0.0.1", True, "emulator"), ("0.7.0", False, "emulator"),
])
def test_shim_picks_real_nki_only_when_genuine_and_recent(shim, version, genuine, expected):
    """NKI 0.7 (Neuron SDK 2.33) is the minimum; an older genuine nki is ignored with a warning."""
    fake = _fake_nki(version, genuine)
    if genuine and expected == "emulator":
        with pytest.warns(RuntimeWarning, match="needs NKI >= 0.7"):
            b = shim(fake)
    else:
        b = shim(fake)
    assert b.ACTIVE == expected
    if expected == "nki":
        assert b.nki is fake["nki"] and b.nl is fake["nki.language"] and b.nisa is fake["nki.isa"]
        assert not b.is_emulated()
    else:
        assert b.nl is emu_nl and b.nisa is emu_isa


def test_shim_falls_back_when_the_import_fails(shim):
    # the PyPI placeholder raises ImportError on import; None in sys.modules does the same
    b = shim({"nki": None})
    assert b.ACTIVE == "emulator"


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_env_var_forces_the_emulator(shim, value):
    b = shim(_fake_nki("0.7.0"), force=value)
    assert b.ACTIVE == "emulator" and b.nl is emu_nl
    b = shim(_fake_nki("0.7.0"), force="0")
    assert b.ACTIVE == "nki"
