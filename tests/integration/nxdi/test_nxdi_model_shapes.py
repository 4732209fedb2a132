"""The adapters at real per-rank model shapes (slow on the emulator): Qwen3.5-35B-A3B at TP=4 (attention 4 q heads +
1 kv head, D=256; GDN Hk=4 expanded to Hv=8, Dk=Dv=128; MoE H=2048, I_tp=128, an EP=16 slice of 16 of the 256
experts) and the Qwen3-Omni code predictor at full size (H=1024, 5 layers, 16/8 heads, D=128, I=3072, V=2048)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nki_kernels.testing import assert_close
from integration.nxdi import apply
from integration.nxdi import code_predictor as nxcp
from integration.nxdi import deltanet as nxgdn
from integration.nxdi import moe as nxmoe

from nxdi_fakes import (blockwise_mapping, code_predictor_reference_weights, make_attention_classes,
                        make_code_predictor_class)

pytestmark = pytest.mark.slow


def test_qwen35_attention_rank_tp4_bf16():
    attn_ref = pytest.importorskip("nki_kernels.attention.reference")
    fakes = make_attention_classes()
    cls = fakes.NeuronQwen35Attention
    gen = torch.Generator().manual_seed(0)
    s = 512
    q, k, v = (torch.randn(1, h, s, 256, generator=gen).bfloat16() for h in (4, 1, 1))
    with apply([cls], kernels="attention"):
        out, strategy = cls(4, 1, 256, torch_dtype=torch.bfloat16).perform_prefill(q, k, v, s, 1, None)
    assert cls.calls == 0 and strategy is fakes.FlashAttentionStrategy.NONE and out.dtype == torch.bfloat16
    ref = attn_ref.flash_attention_ref(q.float().numpy(), k.float().numpy(), v.float().numpy(), causal=True)
    assert_close("qwen35 attn", ref, out.float().numpy(), dtype="bfloat16")


def test_qwen35_gdn_rank_tp4():
    gdn_ref = pytest.importorskip("nki_kernels.deltanet.reference")
    gen = torch.Generator().manual_seed(1)
    b, s, hk, hv, d = 1, 160, 4, 8, 128
    q, k = torch.randn(b, s, hk, d, generator=gen), torch.randn(b, s, hk, d, generator=gen)
    v = torch.randn(b, s, hv, d, generator=gen)
    g, beta = -torch.rand(b, s, hv, generator=gen) * 0.5, torch.rand(b, s, hv, generator=gen)
    ex = lambda x: x.repeat_interleave(hv // hk, dim=2).transpose(1, 2).contiguous()     # noqa: E731
    out, state = nxgdn.chunked_forward(ex(q), ex(k), v.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous(),
                                       beta.transpose(1, 2).contiguous(), output_final_state=True)
    ro, rs = gdn_ref.gated_delta_rule(q.numpy(), k.numpy(), v.numpy(), g.numpy(), beta.numpy(),
                                      use_qk_l2norm_in_kernel=True)
    assert_close("gdn o", ro.transpose(0, 2, 1, 3), out.numpy())
    assert_close("gdn state", rs, state.numpy())


def test_qwen35_moe_ep_slice_bf16():
    moe_ref = pytest.importorskip("nki_kernels.moe.reference")
    gen = torch.Generator().manual_seed(2)
    t, h, e_all, e_loc, top_k, n_i, block = 64, 2048, 256, 16, 8, 128, 32
    hidden = torch.randn(t, h, generator=gen).bfloat16()
    p = torch.softmax(torch.randn(t, e_all, generator=gen), -1)
    w, idx = p.topk(top_k, -1)
    aff = torch.zeros(t, e_all).scatter(1, idx, w / w.sum(-1, keepdim=True))[:, :e_loc].contiguous().bfloat16()
    local_idx = torch.where(idx < e_loc, idx, torch.full_like(idx, -1))
    gate_up = (torch.randn(e_loc, h, 2 * n_i, generator=gen) * h ** -0.5).bfloat16()
    down = (torch.randn(e_loc, n_i, h, generator=gen) * n_i ** -0.5).bfloat16()
    tok, blk = blockwise_mapping(local_idx, e_loc, block)

    class Cfg:
        block_size = block
        logical_nc_config = 2
    out = nxmoe.BlockwiseMatmulNKIKernelsFunc.apply(hidden, aff, gate_up, down, tok, blk, None, None, False, Cfg(),
                                                    True, 1, None, None, None, None, None, None, None, None, 0)
    ref = moe_ref.moe_blockwise_reference(hidden.float().numpy(), aff.float().numpy(),
                                          gate_up.float().reshape(e_loc, h, 2, n_i).numpy(), down.float().numpy(),
                                          tok.numpy(), blk.numpy(), block)
    assert_close("moe ep slice", ref, out.float().numpy(), dtype="bfloat16")


def test_omni_code_predictor_full_size():
    cp_ref = pytest.importorskip("nki_kernels.codepredictor.reference")
    cls = make_code_predictor_class()
    mod = cls(dtype=torch.bfloat16, hidden=1024, n_layers=5, n_q=16, n_kv=8, d=128, inter=3072, vocab=2048,
              n_groups=15, seed=3)
    gen = torch.Generator().manual_seed(4)
    past, last = (torch.randn(1, 1, 1024, generator=gen).bfloat16() for _ in range(2))
    codes, mid = nxcp.code_predictor_forward(mod, past, last)
    assert tuple(codes.shape) == (1, 15) and tuple(mid.shape) == (1, 14, 1024)
    w = code_predictor_reference_weights(mod)
    # teacher-forced on the adapter's codes, so one bf16 near-tie cannot cascade; every code must be the
    # reference's choice or within bf16 noise of the reference's best logit
    rcodes, _, logits = cp_ref.code_predictor_reference(past[:, 0].float().numpy(), last[:, 0].float().numpy(), w,
                                                        forced_codes=codes.numpy(), return_logits=True)
    chosen = np.take_along_axis(logits, codes.numpy()[..., None].astype(np.int64), -1)[..., 0]
    gap = logits.max(-1) - chosen
    assert np.all((codes.numpy() == rcodes) | (gap <= 2e-2 * np.abs(logits).max(-1))), (codes, rcodes, gap)
    assert np.mean(codes.numpy() == rcodes) >= 0.8
