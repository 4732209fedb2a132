"""Tests against the real NxDI / NxD packages. They need a Neuron SDK environment (NxDI 0.8-0.10 with torch-neuronx);
PyPI's neuronx-distributed-inference is an empty placeholder, so here they skip with the reason."""
from __future__ import annotations

import inspect

import pytest

from integration.nxdi import nxdi_available

pytestmark = pytest.mark.skipif(
    not nxdi_available(),
    reason="neuronx_distributed_inference is not importable (needs the Neuron SDK 2.28-2.31 venv; the PyPI "
           "package is an empty placeholder)")


def test_signatures_of_the_patched_nxdi_methods():
    from neuronx_distributed_inference.modules.attention.attention_base import NeuronAttentionBase
    from neuronx_distributed.modules.moe.blockwise import BlockwiseMatmulNKIFunc
    from neuronx_distributed.modules.moe.moe_configs import BlockwiseMatmulConfig

    from integration.nxdi import attention, moe

    params = list(inspect.signature(NeuronAttentionBase.perform_prefill).parameters)[1:7]
    assert tuple(params) == attention.EXPECTED_PARAMS
    assert tuple(list(inspect.signature(BlockwiseMatmulNKIFunc.forward).parameters)[1:]) == moe.APPLY_ARGS
    assert "blockwise_nki_autograd_cls" in inspect.signature(BlockwiseMatmulConfig.__init__).parameters


def test_apply_default_targets_and_restore():
    from neuronx_distributed_inference.modules.attention.attention_base import (FlashAttentionStrategy,
                                                                                 NeuronAttentionBase)

    from integration.nxdi import FlashAttentionStrategy as Ours
    from integration.nxdi import apply

    assert Ours is FlashAttentionStrategy
    before = NeuronAttentionBase.perform_prefill
    with apply(kernels=["attention", "moe"]) as inst:
        assert "NeuronAttentionBase.perform_prefill" in inst.installed["attention"]
        assert NeuronAttentionBase.perform_prefill is not before
    assert NeuronAttentionBase.perform_prefill is before


def test_blockwise_config_from_kwargs_resolves_our_class():
    from neuronx_distributed.modules.moe.moe_configs import BlockwiseMatmulConfig

    from integration.nxdi import moe

    cfg = BlockwiseMatmulConfig.from_kwargs(**moe.blockwise_matmul_config_kwargs(block_size=128))
    assert cfg.blockwise_nki_autograd_cls is moe.BlockwiseMatmulNKIKernelsFunc


def test_install_time_contract_checks_pass_on_the_real_stack():
    """The checks apply() makes before installing (21-argument forward, the relaxed gate's parameters) hold on the
    installed NxD, and the relaxed gate installs."""
    from neuronx_distributed.modules.moe import expert_mlps_v2

    from integration.nxdi import apply, moe

    gate_params = tuple(inspect.signature(expert_mlps_v2.can_use_blockwise_matmul_nki).parameters)
    assert gate_params == tuple(inspect.signature(moe.can_use_blockwise_matmul_nki).parameters)
    with apply(kernels=["moe"], relax_moe_gate=True) as inst:
        assert any("can_use_blockwise_matmul_nki" in s for s in inst.installed["moe"])
