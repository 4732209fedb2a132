"""Converters from transformers' MoE layout to the kernels' layout, checked against an independent computation in
transformers' own layout (and the real transformers block), plus the error a raw transformers tensor gives."""
import numpy as np
import pytest
import torch

from nki_kernels import moe_block_mapping, moe_blockwise, moe_decode
from nki_kernels.moe import experts_from_transformers, weights_from_state_dict, weights_from_transformers
from nki_kernels.testing import assert_close
from nki_kernels.validation import KernelInputError


def _hf_layout_moe(x, idx, w, gate_up_proj, down_proj, shared=None):
    """float64 MoE computed in transformers' layout: F.linear(x, gate_up_proj[e]) then F.linear(h, down_proj[e])."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    n_inter = gate_up_proj.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = x[t] @ np.asarray(gate_up_proj[e], np.float64).T
            h = gu[:n_inter] / (1 + np.exp(-gu[:n_inter])) * gu[n_inter:]
            out[t] += float(w[t, j]) * (h @ np.asarray(down_proj[e], np.float64).T)
    if shared is not None:
        g, u, d, sg = (np.asarray(a, np.float64) for a in shared)
        a, b = x @ g.T, x @ u.T
        out += (1 / (1 + np.exp(-(x @ sg.T))))[:, :1] * ((a / (1 + np.exp(-a)) * b) @ d.T)
    return out


def test_experts_converter_matches_transformers_layout(rng):
    n_exp, hidden, n_inter, n_tok, k = 5, 256, 48, 6, 2
    gate_up_proj = (rng.standard_normal((n_exp, 2 * n_inter, hidden)) / 16).astype(np.float32)
    down_proj = (rng.standard_normal((n_exp, hidden, n_inter)) / 7).astype(np.float32)
    x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(n_exp)[:k] for _ in range(n_tok)]).astype(np.int32)
    w = rng.random((n_tok, k)).astype(np.float32)
    gu, dn = experts_from_transformers(gate_up_proj, down_proj)
    assert gu.shape == (n_exp, hidden, 2, n_inter) and dn.shape == (n_exp, n_inter, hidden)
    ref = _hf_layout_moe(x, idx, w, gate_up_proj, down_proj)
    assert_close("decode", ref, moe_decode(x, idx, w, gu, dn))
    tpos, b2e = moe_block_mapping(idx, n_exp, 8)
    assert_close("blockwise", ref, moe_blockwise(x, w, gu, dn, tpos, b2e, 8, top_k_index=idx))


def _block():
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock
    cfg = Qwen3_5MoeTextConfig(hidden_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                               num_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    block = Qwen3_5MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return block


def test_block_converter_matches_the_transformers_block():
    block = _block()
    x = torch.randn(5, 128)
    with torch.no_grad():
        ref = block(x[None])[0].double().numpy()
        _, w, idx = block.gate(x)
    mw = weights_from_transformers(block)
    assert mw.shared is not None and isinstance(mw.gate_up, torch.Tensor)
    out = moe_decode(x, idx, w, mw.gate_up, mw.down, shared=mw.shared)
    assert_close("decode vs transformers block", ref, out.numpy())
    sd = {f"model.layers.0.mlp.{k}": v for k, v in block.state_dict().items()}
    mw2 = weights_from_state_dict(sd, prefix="model.layers.0.mlp.")
    for a, b in zip((mw.gate_up, mw.down) + mw.shared, (mw2.gate_up, mw2.down) + mw2.shared):
        assert torch.equal(a, b)
    assert weights_from_transformers(block.experts).shared is None


def test_per_expert_state_dict_layout(rng):
    n_exp, hidden, n_inter = 3, 128, 16
    sd = {}
    for e in range(n_exp):
        sd[f"mlp.experts.{e}.gate_proj.weight"] = rng.standard_normal((n_inter, hidden)).astype(np.float32)
        sd[f"mlp.experts.{e}.up_proj.weight"] = rng.standard_normal((n_inter, hidden)).astype(np.float32)
        sd[f"mlp.experts.{e}.down_proj.weight"] = rng.standard_normal((hidden, n_inter)).astype(np.float32)
    mw = weights_from_state_dict(sd, prefix="mlp.")
    for e in range(n_exp):
        np.testing.assert_array_equal(mw.gate_up[e, :, 0, :], sd[f"mlp.experts.{e}.gate_proj.weight"].T)
        np.testing.assert_array_equal(mw.gate_up[e, :, 1, :], sd[f"mlp.experts.{e}.up_proj.weight"].T)
        np.testing.assert_array_equal(mw.down[e], sd[f"mlp.experts.{e}.down_proj.weight"].T)
    assert mw.shared is None


def test_converter_errors_name_what_they_expected(rng):
    with pytest.raises(KernelInputError, match="expected a transformers sparse-MoE block.*got Linear"):
        weights_from_transformers(torch.nn.Linear(4, 4))
    with pytest.raises(KernelInputError, match="no MoE expert weights under prefix 'x.'"):
        weights_from_state_dict({"y": np.zeros(1)}, prefix="x.")
    with pytest.raises(KernelInputError, match=r"down_proj must be \[E=2, H=128, I=8\]"):
        experts_from_transformers(np.zeros((2, 16, 128), np.float32), np.zeros((2, 8, 128), np.float32))
    with pytest.raises(KernelInputError, match="expected a state dict"):
        weights_from_state_dict([1, 2])


def test_raw_transformers_layout_in_a_kernel_names_the_converter(rng):
    x = rng.standard_normal((2, 128)).astype(np.float32)
    gate_up_proj = np.zeros((3, 32, 128), np.float32)
    down_proj = np.zeros((3, 128, 16), np.float32)
    idx = np.zeros((2, 1), np.int32)
    w = np.ones((2, 1), np.float32)
    with pytest.raises(KernelInputError, match="weights_from_transformers"):
        moe_decode(x, idx, w, gate_up_proj, down_proj)
    gu, _ = experts_from_transformers(gate_up_proj, down_proj)
    with pytest.raises(KernelInputError, match="weights_from_transformers"):
        moe_decode(x, idx, w, gu, down_proj)


def test_view_form_shares_memory_and_equals_the_copy():
    """contiguous=False (what the transformers integration uses per call): strided views, no copy, same values."""
    torch = pytest.importorskip("torch")
    from nki_kernels.moe import experts_from_transformers
    gu_p = torch.randn(3, 2 * 16, 128, requires_grad=True)
    dn_p = torch.randn(3, 128, 16, requires_grad=True)
    gu_v, dn_v = experts_from_transformers(gu_p, dn_p, contiguous=False)
    gu_c, dn_c = experts_from_transformers(gu_p, dn_p)
    assert gu_v.data_ptr() == gu_p.data_ptr() and dn_v.data_ptr() == dn_p.data_ptr()
    assert not gu_v.requires_grad and torch.equal(gu_v, gu_c) and torch.equal(dn_v, dn_c)
    with pytest.raises(ValueError, match="contiguous=True"):
        experts_from_transformers(gu_p, dn_p, dtype="bfloat16", contiguous=False)
