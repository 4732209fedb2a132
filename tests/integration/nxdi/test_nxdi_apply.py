"""apply(): class-level installation, discovery from models / modules / applications, clear errors, restore."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from integration.nxdi import FAMILIES, KernelNotAvailableError, NxDIAdapterError, apply, nxdi_available

from nxdi_fakes import make_attention_classes, make_deltanet_class

# the package re-exports the function `apply`, which shadows the submodule attribute of the same name
apply_mod = sys.modules["integration.nxdi.apply"]


def test_unknown_family_and_layout_raise():
    fakes = make_attention_classes()
    with pytest.raises(NxDIAdapterError, match=r"unknown kernel families \['flash'\]"):
        apply([fakes.NeuronAttentionBase], kernels=["flash"])
    with pytest.raises(NxDIAdapterError, match="layout must be one of"):
        apply([fakes.NeuronAttentionBase], layout="SBHD")


@pytest.mark.skipif(nxdi_available(), reason="checks the message given when NxDI is absent")
def test_default_targets_need_nxdi():
    with pytest.raises(NxDIAdapterError, match="neuronx_distributed_inference is not importable"):
        apply()


def test_rejects_things_it_cannot_patch():
    with pytest.raises(NxDIAdapterError, match="cannot take 'int'"):
        apply(3)


def test_all_problems_listed_and_nothing_installed():
    fakes = make_attention_classes()
    gdn = make_deltanet_class(bad_signature=True)
    before = fakes.NeuronAttentionBase.perform_prefill
    with pytest.raises(NxDIAdapterError) as err:
        apply([fakes.NeuronAttentionBase, fakes.BadAttention, gdn], kernels=["attention", "deltanet", "code_predictor"])
    msg = str(err.value)
    assert "BadAttention.perform_prefill('query', 'key', 'value', 'attention_mask') does not match" in msg
    assert "NeuronGatedDeltaNet._recurrent_step('q', 'k', 'v', 'state') does not match" in msg
    assert "code_predictor: no UnifiedNeuronCodePredictor" in msg
    assert "Supported versions:" in msg and "SDK 2.28" in msg
    assert fakes.NeuronAttentionBase.perform_prefill is before           # atomic: nothing was installed


def test_non_strict_installs_what_matched():
    fakes = make_attention_classes()
    with apply([fakes.NeuronAttentionBase, fakes.BadAttention], kernels=["attention"], strict=False) as inst:
        assert inst.installed["attention"] == ["NeuronAttentionBase.perform_prefill"]
        assert "BadAttention" in inst.skipped["attention"][0]
        assert getattr(fakes.NeuronAttentionBase.perform_prefill, "__nki_kernels_adapter__") == "attention"
    assert not hasattr(fakes.NeuronAttentionBase.perform_prefill, "__nki_kernels_adapter__")


def test_missing_kernel_is_named(monkeypatch):
    def missing(name, family):
        raise KernelNotAvailableError(f"nxdi {family} adapter: kernel wrapper nki_kernels.{name} is not available")
    monkeypatch.setattr(apply_mod, "kernel", missing)
    fakes = make_attention_classes()
    with pytest.raises(NxDIAdapterError, match="nki_kernels.flash_attention is not available"):
        apply([fakes.NeuronAttentionBase], kernels=["attention"])


def test_auto_mode_from_model_instance_and_idempotence():
    fakes = make_attention_classes()
    gdn = make_deltanet_class()
    model = torch.nn.ModuleDict({"attn": fakes.NeuronAttentionBase(2, 1, 64), "gdn": gdn()})
    names_before = [n for n, _ in model.named_parameters()]
    shapes_before = [tuple(p.shape) for p in model.parameters()]
    inst = apply(model)
    try:
        assert set(inst.installed) == {"attention", "deltanet"}
        assert set(inst.skipped) == {"moe", "code_predictor"}
        again = apply(model)                                      # already installed: a no-op, not an error
        assert again.installed == {}
        assert [n for n, _ in model.named_parameters()] == names_before
        assert [tuple(p.shape) for p in model.parameters()] == shapes_before
    finally:
        inst.restore()
    assert not hasattr(gdn._fused_chunked_forward, "__nki_kernels_adapter__")


def test_auto_mode_with_no_target_raises():
    with pytest.raises(NxDIAdapterError, match="no class with perform_prefill"):
        apply(torch.nn.Linear(2, 2))


def test_modeling_module_and_application_object():
    fakes = make_attention_classes()
    gdn = make_deltanet_class()
    mod = types.ModuleType("fake_contrib_modeling_qwen35")
    for c in (fakes.NeuronQwen35Attention, gdn):
        c.__module__ = mod.__name__
        setattr(mod, c.__name__, c)

    class NeuronQwen35Model(torch.nn.Module):
        pass
    NeuronQwen35Model.__module__ = mod.__name__
    mod.NeuronQwen35Model = NeuronQwen35Model
    sys.modules[mod.__name__] = mod
    try:
        with apply(mod, kernels=["attention", "deltanet"]) as inst:
            assert inst.installed["attention"] == ["NeuronQwen35Attention.perform_prefill"]

        class App(torch.nn.Module):                 # NeuronBaseForCausalLM is an nn.Module; compile() not called yet
            _model_cls = NeuronQwen35Model

            def __init__(self):
                super().__init__()
                self.traced_model = None
                self.is_loaded_to_neuron = False
        with apply(App(), kernels=["deltanet"]) as inst:
            assert "NeuronGatedDeltaNet._recurrent_step" in inst.installed["deltanet"]

        compiled = App()
        compiled.traced_model = object()
        with pytest.raises(NxDIAdapterError, match="before app.compile"):
            apply(compiled)
    finally:
        del sys.modules[mod.__name__]


def test_restore_undoes_in_reverse_order():
    fakes = make_attention_classes()
    original = fakes.NeuronQwen35Attention.__dict__["perform_prefill"]
    inst = apply([fakes.NeuronQwen35Attention], kernels="attention")
    assert fakes.NeuronQwen35Attention.__dict__["perform_prefill"] is not original
    assert getattr(fakes.NeuronQwen35Attention.perform_prefill, "_nki_kernels_original_perform_prefill") is original
    inst.restore()
    assert fakes.NeuronQwen35Attention.__dict__["perform_prefill"] is original
    assert "perform_prefill" not in vars(fakes.NeuronAttentionBase) or \
        not hasattr(fakes.NeuronAttentionBase.perform_prefill, "__nki_kernels_adapter__")


def test_families_constant():
    assert FAMILIES == ("attention", "moe", "deltanet", "code_predictor")
