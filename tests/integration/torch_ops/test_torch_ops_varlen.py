"""Packed sequences (`cu_seqlens`) through the torch ops: flash_attention_varlen, gated_delta_rule and
causal_conv1d, in fp32 and bf16 under torch.no_grad(). Each is checked against an independent float64 NumPy
reference run one sequence at a time (lengths 0 and 1 included), equals the eager public wrapper exactly, traces
into one torch.compile graph (aot_eager, fullgraph) with the same outputs, and has fake shapes with one state per
sequence; torch.library.opcheck covers the schema with cu_seqlens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nki_kernels
from nki_kernels import torch_ops
from nki_kernels.attention.reference import flash_attention_varlen_ref
from nki_kernels.deltanet import reference as gdn_ref
from nki_kernels.testing import assert_close

LENS = (5, 0, 1, 14)                      # an empty and a one-token sequence among them
CU = torch.tensor(np.concatenate([[0], np.cumsum(LENS)]), dtype=torch.int32)
T = int(CU[-1])
N = len(LENS)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def ops():
    yield torch_ops.register()


def _r(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _case(name, dtype):
    """(args, kwargs) of the public wrapper for one packed call."""
    gen = torch.Generator().manual_seed(len(name))
    if name == "flash_attention_varlen":
        q, k, v = _r(gen, T, 4, 64), _r(gen, T, 2, 64), _r(gen, T, 2, 64)
        return tuple(t.to(dtype) for t in (q, k, v)) + (CU, CU.clone()), {"causal": True}
    if name == "gated_delta_rule":
        q, k, v = _r(gen, 1, T, 2, 32), _r(gen, 1, T, 2, 32), _r(gen, 1, T, 4, 32)
        g = -torch.rand(1, T, 4, generator=gen)
        beta = torch.rand(1, T, 4, generator=gen)
        args = tuple(t.to(dtype) for t in (q, k, v)) + (g, beta.to(dtype))
        return args, {"cu_seqlens": CU, "initial_state": 0.1 * _r(gen, N, 4, 32, 32),
                      "use_qk_l2norm_in_kernel": True}
    if name == "causal_conv1d":
        return (_r(gen, 1, 64, T).to(dtype), _r(gen, 64, 4).to(dtype)), {
            "cu_seqlens": CU, "conv_state": _r(gen, N, 64, 4).to(dtype)}
    raise KeyError(name)


def _f64(t):
    return t.double().numpy() if isinstance(t, torch.Tensor) else t


def _reference(name, args, kwargs):
    """Float64 NumPy, each sequence on its own (the references know nothing about packing)."""
    a = [_f64(t) for t in args]
    if name == "flash_attention_varlen":
        out = np.zeros(a[0].shape)
        for s in range(N):
            lo, hi = int(CU[s]), int(CU[s + 1])
            one = torch.tensor([0, hi - lo], dtype=torch.int32)
            if hi > lo:
                out[lo:hi] = flash_attention_varlen_ref(a[0][lo:hi], a[1][lo:hi], a[2][lo:hi], one, one, causal=True)
        return (out,)
    init = _f64(kwargs.get("initial_state", kwargs.get("conv_state")))
    outs, states = np.zeros(a[0].shape if name == "causal_conv1d" else a[2].shape), []
    for s in range(N):
        lo, hi = int(CU[s]), int(CU[s + 1])
        if name == "gated_delta_rule":
            o, final = gdn_ref.gated_delta_rule(*(t[:, lo:hi] for t in a), initial_state=init[s:s + 1],
                                                use_qk_l2norm_in_kernel=True)
            outs[:, lo:hi] = o
        else:
            y, final = gdn_ref.causal_conv1d(a[0][:, :, lo:hi], a[1], conv_state=init[s:s + 1])
            outs[:, :, lo:hi] = y
        states.append(final)
    return outs, np.concatenate(states)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", ["flash_attention_varlen", "gated_delta_rule", "causal_conv1d"])
def test_packed_op_matches_per_sequence_reference_and_wrapper(name, dtype):
    args, kwargs = _case(name, dtype)
    with torch.no_grad():
        got = getattr(torch_ops, name)(*args, **kwargs)
        want = getattr(nki_kernels, name)(*args, **kwargs)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    ref = _reference(name, args, kwargs)
    key = "bfloat16" if dtype == torch.bfloat16 else "float32"
    for i, (r, o) in enumerate(zip(ref, got)):
        assert o.shape == r.shape, (name, i, o.shape, r.shape)
        assert_close(f"{name}[{i}] {key}", r, o.float().numpy(), dtype=key if i == 0 or name != "gated_delta_rule"
                     else "float32")
    if name != "flash_attention_varlen":
        assert got[1].shape[0] == N                      # one state per packed sequence
        empty = LENS.index(0)                             # an empty sequence hands back its initial state
        init = kwargs.get("initial_state", kwargs.get("conv_state"))
        torch.testing.assert_close(got[1][empty].float(), init[empty].float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gated_delta_rule", "causal_conv1d"])
def test_packed_op_compiles_and_fakes_one_state_per_sequence(name):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _case(name, torch.float32)
    fn = getattr(torch_ops, name)
    with torch.no_grad():
        want = fn(*args, **kwargs)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        got = torch.compile(lambda *a: fn(*a, **kwargs), backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = fn(*(mode.from_tensor(a) for a in args),
                  **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    for a, b in zip(want, fake):
        assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    assert fake[1].shape[0] == N


@pytest.mark.parametrize("name", ["gated_delta_rule", "causal_conv1d"])
def test_opcheck_with_cu_seqlens(name, ops):
    args, kwargs = _case(name, torch.float32)
    torch.library.opcheck(getattr(ops, name).default, args, kwargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_packed_op_refuses_batch_above_one():
    """The wrapper's validation reaches the caller through the op, naming the argument."""
    from nki_kernels.validation import KernelInputError
    args, kwargs = _case("causal_conv1d", torch.float32)
    x = torch.cat([args[0], args[0]])
    with torch.no_grad(), pytest.raises(KernelInputError, match="B must be 1"):
        torch_ops.causal_conv1d(x, args[1], cu_seqlens=CU)
