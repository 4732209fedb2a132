"""Every NxDI hook turns a kernel refusal into a fallback to NxDI's original method and records why (issue 16):
a wrapper's KernelInputError, the emulator's EmulatorCheckError (a shape the checks let through that fails a
hardware check: a compile failure on the device) and the adapter's own AdapterInputError; never an exception
mid-model. Each kernel is forced to refuse here; the original's result comes back unchanged."""
from __future__ import annotations

import pytest
import torch

from integration.nxdi import _common, apply, fallbacks
from integration.nxdi import attention as nxattn
from integration.nxdi import code_predictor as nxcp
from integration.nxdi import deltanet as nxgdn
from nki_kernels.backend import EmulatorCheckError
from nki_kernels.validation import KernelInputError

from nxdi_fakes import make_attention_classes, make_code_predictor_class, make_deltanet_class

ERRORS = {
    "emulator check": (lambda: EmulatorCheckError("nc_matmul", "moving", "SBUF capacity exceeded (forced)"),
                       "hardware checks"),
    "kernel refusal": (lambda: KernelInputError("flash_attention: a limit (forced)"), "kernel refused"),
    "adapter input": (lambda: _common.AdapterInputError("nxdi: outside the contract (forced)"), "kernel refused"),
}


def _refusing(error):
    def fn(*args, **kwargs):
        raise ERRORS[error][0]()
    return lambda name, family: fn


def _check_recorded(prefix, error):
    seen = {hook: reason for hook, reason in fallbacks()}
    assert prefix in seen, seen
    assert ERRORS[error][1] in seen[prefix] and "(forced)" in seen[prefix], seen


@pytest.fixture(autouse=True)
def _clear():
    _common.FALLBACKS.clear()
    yield
    _common.FALLBACKS.clear()


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_attention_refusal_runs_the_original(monkeypatch, error):
    monkeypatch.setattr(nxattn, "kernel", _refusing(error))
    base = make_attention_classes().NeuronAttentionBase
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 12, 64, generator=g) for h in (2, 1, 1))
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    want, _ = base(2, 1, 64).perform_prefill(q, k, v, 12, 1, mask)
    with apply([base], kernels="attention"):
        got, _ = base(2, 1, 64).perform_prefill(q, k, v, 12, 1, mask)
    assert base.calls == 2 and torch.equal(want, got)
    _check_recorded("nxdi attention: NeuronAttentionBase.perform_prefill", error)


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_deltanet_refusal_runs_the_original(monkeypatch, error):
    monkeypatch.setattr(nxgdn, "kernel", _refusing(error))
    cls = make_deltanet_class()
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 10, 32, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 10, 32, generator=g)
    gate, beta = -torch.rand(1, 2, 10, generator=g), torch.rand(1, 2, 10, generator=g)
    want = cls()._fused_chunked_forward(q, k, v, gate, beta, output_final_state=True)
    with apply([cls], kernels=["deltanet"]):
        got = cls()._fused_chunked_forward(q, k, v, gate, beta, output_final_state=True)
    assert cls.calls == 2
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    _check_recorded("nxdi deltanet: NeuronGatedDeltaNet._fused_chunked_forward", error)


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_code_predictor_refusal_runs_the_original(monkeypatch, error):
    monkeypatch.setattr(nxcp, "kernel", _refusing(error))
    cls = make_code_predictor_class()
    with apply([cls], kernels=["code_predictor"]):
        mod = cls(seed=1)
        h = mod.norm.weight.shape[0]
        past = torch.randn(1, 1, h).to(mod.dtype)
        assert mod(past, past.clone()) == "original" and cls.calls == 1
    _check_recorded("nxdi code_predictor: UnifiedNeuronCodePredictor.forward", error)
