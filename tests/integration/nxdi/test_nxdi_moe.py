"""Blockwise-MoE autograd-class adapter: NxD's 21-argument apply, per-rank weights (I split over TP ranks, partial
outputs summing to the full layer), EP-local experts, -1 padded block slots; checked against a float64 oracle."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from nki_kernels.testing import assert_close
from integration.nxdi import AdapterInputError, NxDIAdapterError, apply
from integration.nxdi import moe as nxmoe

from nxdi_fakes import blockwise_mapping, make_moe_classes

pytest.importorskip("nki_kernels.moe.blockwise")
moe_ref = pytest.importorskip("nki_kernels.moe.reference")


def _family_ref(hidden, aff, gate_up, down, tok, blk, block):
    """The family's float64 reference, fed NxD's tensors with gate_up viewed [E, H, 2, I] as NxD's kernel call does."""
    e, h, two_i = gate_up.shape
    return moe_ref.moe_blockwise_reference(hidden.float().numpy(), aff.float().numpy(),
                                           gate_up.float().reshape(e, h, 2, two_i // 2).numpy(), down.float().numpy(),
                                           tok.numpy(), blk.numpy(), block)


def _oracle(hidden, aff, gate_up, down):
    """float64: out[t] = sum_e aff[t, e] * down_e(silu(x W_gate_e) * (x W_up_e)); gate_up [E, H, 2I] = [gate | up]."""
    x = hidden.double().numpy()
    a = aff.double().numpy()
    gu = gate_up.double().numpy()
    dn = down.double().numpy()
    n_i = gu.shape[2] // 2
    out = np.zeros_like(x)
    for e in range(gu.shape[0]):
        h1 = x @ gu[e]
        gate, up = h1[:, :n_i], h1[:, n_i:]
        y = (gate / (1.0 + np.exp(-gate)) * up) @ dn[e]
        out += a[:, e:e + 1] * y
    return out


def _routing(t, n_exp, top_k, seed, pad_tokens=()):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n_exp, generator=gen)
    probs = torch.softmax(logits.double(), -1)
    top_w, top_i = probs.topk(top_k, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)                          # normalize_top_k_affinities
    aff = torch.zeros(t, n_exp, dtype=torch.float64).scatter(1, top_i, top_w)
    for p in pad_tokens:                                                  # NxD masks padding tokens out
        aff[p] = 0
        top_i[p] = -1
    return aff.float(), top_i


def _weights(n_exp, h, n_i, seed, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_exp, h, 2 * n_i, generator=gen) * scale, torch.randn(n_exp, n_i, h, generator=gen) * scale)


def _args(hidden, aff, gate_up, down, tok, blk, cfg, **over):
    args = dict(zip(nxmoe.APPLY_ARGS, (hidden, aff, gate_up, down, tok, blk, None, None, False, cfg, True, 1, None,
                                       None, None, None, None, None, None, None, 0)))
    args.update(over)
    return tuple(args[k] for k in nxmoe.APPLY_ARGS)


class _Cfg:
    def __init__(self, block_size):
        self.block_size = block_size
        self.logical_nc_config = 1


@pytest.mark.parametrize("t,h,n_exp,top_k,n_i,block", [(20, 128, 4, 2, 48, 8), (37, 256, 8, 2, 96, 16)])
def test_apply_21_args_matches_oracle(t, h, n_exp, top_k, n_i, block):
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
    aff, top_i = _routing(t, n_exp, top_k, seed=t, pad_tokens=(t - 1,))
    gate_up, down = _weights(n_exp, h, n_i, seed=1)
    tok, blk = blockwise_mapping(top_i, n_exp, block)
    assert (tok == -1).any()                                     # padded slots present
    out = nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down, tok, blk, _Cfg(block)))
    assert tuple(out.shape) == (t, h) and out.dtype == hidden.dtype
    ref = _oracle(hidden, aff, gate_up, down)
    assert_close("moe", ref, out.numpy())
    assert_close("moe vs family reference", _family_ref(hidden, aff, gate_up, down, tok, blk, block), out.numpy())
    assert np.all(out[t - 1].numpy() == 0)                        # an all-padding token gets nothing


def test_tp_split_intermediate_partials_sum_to_full():
    """NxD shards I over TP ranks with stride 2 ([gate_r | up_r] per rank) and down rows; each rank's output is
    TP-partial and the all-reduce (a sum) gives the full layer."""
    t, h, n_exp, top_k, n_i, tp, block = 24, 128, 4, 2, 96, 2, 8
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(5))
    aff, top_i = _routing(t, n_exp, top_k, seed=5)
    gate_up, down = _weights(n_exp, h, n_i, seed=2)
    tok, blk = blockwise_mapping(top_i, n_exp, block)
    i_tp = n_i // tp
    partial = []
    for r in range(tp):
        gu_r = torch.cat([gate_up[:, :, r * i_tp:(r + 1) * i_tp], gate_up[:, :, n_i + r * i_tp:n_i + (r + 1) * i_tp]],
                         dim=2)
        dn_r = down[:, r * i_tp:(r + 1) * i_tp]
        partial.append(nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(
            *_args(hidden, aff, gu_r.contiguous(), dn_r.contiguous(), tok, blk, _Cfg(block))))
    assert_close("tp sum", _oracle(hidden, aff, gate_up, down), (partial[0] + partial[1]).numpy())
    assert_close("tp sum vs family reference", _family_ref(hidden, aff, gate_up, down, tok, blk, block),
                 (partial[0] + partial[1]).numpy())
    assert_close("rank 0 partial", _oracle(hidden, aff, gate_up[:, :, list(range(i_tp)) +
                                                                  list(range(n_i, n_i + i_tp))],
                                           down[:, :i_tp]), partial[0].numpy())


def test_expert_parallel_local_subset():
    """EP: the rank holds experts [2, 4); affinities, weights and mapping are local; tokens routed elsewhere
    contribute nothing on this rank."""
    t, h, n_exp, top_k, n_i, block = 18, 128, 4, 2, 32, 8
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(8))
    aff, top_i = _routing(t, n_exp, top_k, seed=8)
    gate_up, down = _weights(n_exp, h, n_i, seed=3)
    local = slice(2, 4)
    local_idx = torch.where(top_i >= 2, top_i - 2, torch.full_like(top_i, -1))
    tok, blk = blockwise_mapping(local_idx, 2, block)
    out = nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(
        *_args(hidden, aff[:, local].contiguous(), gate_up[local].contiguous(), down[local].contiguous(), tok, blk,
               _Cfg(block)))
    assert_close("ep", _oracle(hidden, aff[:, local], gate_up[local], down[local]), out.numpy())


def test_bf16_weights():
    t, h, n_exp, top_k, n_i, block = 16, 128, 4, 2, 48, 8
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    aff, top_i = _routing(t, n_exp, top_k, seed=9)
    gate_up, down = (w.to(torch.bfloat16) for w in _weights(n_exp, h, n_i, seed=4))
    tok, blk = blockwise_mapping(top_i, n_exp, block)
    out = nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff.to(torch.bfloat16), gate_up, down, tok, blk,
                                                           _Cfg(block)))
    assert out.dtype == torch.bfloat16
    assert_close("bf16", _oracle(hidden, aff.to(torch.bfloat16), gate_up, down), out.float().numpy(),
                 dtype="bfloat16")


@pytest.mark.parametrize("over,match", [
    ({"expert_affinities_scaling_mode": 2}, "POST_SCALE"),
    ({"is_training": True}, "training"),
    ({"gate_up_proj_bias": torch.zeros(1)}, "biases"),
    ({"kernel_act_fn_id": 3}, "SiLU"),
    ({"gate_clamp_upper_limit": 7.0}, "clamp"),
])
def test_unsupported_options_without_nxd_raise(over, match):
    hidden = torch.randn(4, 128)
    aff, top_i = _routing(4, 2, 1, seed=0)
    gate_up, down = _weights(2, 128, 16, seed=0)
    tok, blk = blockwise_mapping(top_i, 2, 4)
    with pytest.raises(NotImplementedError, match=match):
        nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down, tok, blk, _Cfg(4), **over))


def test_malformed_inputs_raise():
    hidden = torch.randn(4, 128)
    aff, top_i = _routing(4, 2, 1, seed=0)
    gate_up, down = _weights(2, 128, 16, seed=0)
    tok, blk = blockwise_mapping(top_i, 2, 4)
    with pytest.raises(AdapterInputError, match="down_proj_weight"):
        nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down[:, :8], tok, blk, _Cfg(4)))
    with pytest.raises(AdapterInputError, match="N\\*B"):
        nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down, tok[:-1], blk, _Cfg(4)))
    with pytest.raises(AdapterInputError, match="21 arguments"):
        nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down, tok, blk, _Cfg(4)), None)


def test_config_spec_resolves_like_nxd_from_kwargs():
    spec = nxmoe.blockwise_matmul_config_kwargs(block_size=128)["blockwise_nki_autograd_cls"]
    cls = getattr(importlib.import_module(spec["__module__"]), spec["__name__"])   # what NxD's from_kwargs does
    assert cls is nxmoe.BlockwiseMatmulNKIKernelsFunc


def test_apply_installs_on_config_class_instances_and_gate(monkeypatch):
    fakes = make_moe_classes()
    monkeypatch.setitem(sys.modules, fakes.module.__name__, fakes.module)      # like neuronx_distributed...v2
    t, h, n_exp, n_i, block = 12, 128, 4, 32, 8
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(2))
    aff, top_i = _routing(t, n_exp, 2, seed=2)
    gate_up, down = _weights(n_exp, h, n_i, seed=6)
    tok, blk = blockwise_mapping(top_i, n_exp, block)
    cfg = fakes.BlockwiseMatmulConfig.from_kwargs
    preexisting = fakes.ExpertMLPsV2(cfg(block_size=block), gate_up, down)
    model = torch.nn.ModuleDict({"mlp": preexisting})
    for flags in ({}, {"use_shard_on_block_dynamic_while": True}, {"use_shard_on_intermediate_dynamic_while": True},
                  {"num_static_blocks": 3}):
        with pytest.raises(RuntimeError, match="stock NxD kernel called"):     # the stock class without apply()
            fakes.ExpertMLPsV2(cfg(block_size=block, **flags), gate_up, down).forward_blockwise(hidden, aff, tok, blk)
    with apply([model, fakes.BlockwiseMatmulConfig, fakes.ExpertMLPsV2], kernels=["moe"],
               relax_moe_gate=True) as inst:
        # class-level: configs built after apply() default to our class, with every NxD call form
        # (conditions a tensor under the dynamic-while kernels, num_static_blocks an int)
        for flags in ({}, {"use_shard_on_block_dynamic_while": True}, {"use_shard_on_intermediate_dynamic_while": True},
                      {"num_static_blocks": 3}):
            fresh = fakes.ExpertMLPsV2(cfg(block_size=block, **flags), gate_up, down)
            assert fresh.blockwise_matmul_config.blockwise_nki_autograd_cls is nxmoe.BlockwiseMatmulNKIKernelsFunc
            out = fresh.forward_blockwise(hidden, aff, tok, blk)
            assert_close(f"installed moe {flags}", _oracle(hidden, aff, gate_up, down), out.numpy())
        # instance-level: the model's existing config was switched too
        assert preexisting.blockwise_matmul_config.blockwise_nki_autograd_cls is nxmoe.BlockwiseMatmulNKIKernelsFunc
        assert fakes.module.can_use_blockwise_matmul_nki is nxmoe.can_use_blockwise_matmul_nki
        assert any("can_use_blockwise_matmul_nki" in s for s in inst.installed["moe"])
        # a user's explicit choice is kept
        custom = cfg(block_size=block, blockwise_nki_autograd_cls=fakes.BlockwiseMatmulNKIFunc)
        assert custom.blockwise_nki_autograd_cls is fakes.BlockwiseMatmulNKIFunc
    assert cfg(block_size=block).blockwise_nki_autograd_cls is None
    assert preexisting.blockwise_matmul_config.blockwise_nki_autograd_cls is None
    assert fakes.module.can_use_blockwise_matmul_nki is not nxmoe.can_use_blockwise_matmul_nki


def test_apply_sets_dict_config_of_neuron_config(monkeypatch):
    fakes = make_moe_classes()
    monkeypatch.setitem(sys.modules, fakes.module.__name__, fakes.module)
    cfg = {"block_size": 128}
    holder = torch.nn.Module()
    holder.blockwise_matmul_config = cfg
    with pytest.raises(NxDIAdapterError, match="cannot verify the 21-argument contract"):
        apply(holder, kernels="moe")                       # NxD absent and not passed: nothing to verify against
    assert "blockwise_nki_autograd_cls" not in cfg
    with apply([holder, fakes.ExpertMLPsV2], kernels="moe") as inst:
        assert cfg["blockwise_nki_autograd_cls"] == nxmoe.BLOCKWISE_AUTOGRAD_CLS_SPEC
        assert inst.installed["moe"]
    assert "blockwise_nki_autograd_cls" not in cfg


def test_relaxed_gate_accepts_what_our_kernel_supports():
    gate = nxmoe.can_use_blockwise_matmul_nki
    dev = torch.device("meta")
    common = dict(glu_mlp=True, glu_type="GLU", use_torch_block_wise=False, device=dev, logical_nc_config=1)
    assert gate(hidden_size=2048, intermediate_size_tp=48, block_size=32, **common)   # stock gate: I%16 ok, B=32 no
    assert not gate(hidden_size=2048, intermediate_size_tp=48, block_size=32, **dict(common, use_torch_block_wise=True))
    assert not gate(hidden_size=2048, intermediate_size_tp=48, block_size=32, use_bias=True, **common)
    assert not gate(hidden_size=2048, intermediate_size_tp=48, block_size=32, act_fn="gelu", **common)
    assert not gate(hidden_size=2048, intermediate_size_tp=48, block_size=32, **dict(common, device="cpu"))


def test_lnc2_from_blockwise_matmul_config():
    """blockwise_matmul_config.logical_nc_config=2 (trn2 default) runs the kernel on two cores: same result."""
    t, h, n_exp, top_k, n_i, block = 20, 128, 4, 2, 48, 8
    hidden = torch.randn(t, h, generator=torch.Generator().manual_seed(21))
    aff, top_i = _routing(t, n_exp, top_k, seed=21)
    gate_up, down = _weights(n_exp, h, n_i, seed=21)
    tok, blk = blockwise_mapping(top_i, n_exp, block)
    cfg = _Cfg(block)
    cfg.logical_nc_config = 2
    out = nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(*_args(hidden, aff, gate_up, down, tok, blk, cfg))
    assert_close("lnc2", _family_ref(hidden, aff, gate_up, down, tok, blk, block), out.numpy())


@pytest.mark.parametrize("drift", ["stock_forward_drift", "gate_drift"])
def test_contract_drift_is_refused_naming_class_method_and_difference(monkeypatch, drift):
    fakes = make_moe_classes(**{drift: True})
    monkeypatch.setitem(sys.modules, fakes.module.__name__, fakes.module)
    with pytest.raises(NxDIAdapterError) as err:
        apply([fakes.BlockwiseMatmulConfig, fakes.ExpertMLPsV2], kernels="moe", relax_moe_gate=True)
    msg = str(err.value)
    if drift == "stock_forward_drift":
        assert "BlockwiseMatmulNKIFunc.forward(" in msg
        assert "parameter 13 is 'num_static_blocks', expected 'conditions'" in msg
    else:
        assert "fake_nxd_expert_mlps_v2.can_use_blockwise_matmul_nki(" in msg
        assert "parameter 11 is 'use_bias', expected 'use_shard_on_block_dynamic_while'" in msg
    assert fakes.BlockwiseMatmulConfig.from_kwargs().blockwise_nki_autograd_cls is None     # nothing installed
