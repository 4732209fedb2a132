"""NxDI attention prefill adapter: NxDI layouts (BHSD in; BHSD+NONE or BHDS+kernel strategy out), TP-sharded
per-rank heads with a replicated KV head, against the float64 reference and NxDI's own softmax path."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nki_kernels.testing import assert_close
from integration.nxdi import attention as nxattn
from integration.nxdi import apply, AdapterInputError

from nxdi_fakes import make_attention_classes

ref_mod = pytest.importorskip("nki_kernels.attention.reference")


def _qkv(b, hq, hkv, s, d, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g) * scale
    k = torch.randn(b, hkv, s, d, generator=g) * scale
    v = torch.randn(b, hkv, s, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _causal(b, s):
    return torch.ones(b, 1, s, s, dtype=torch.bool).tril()


def _ref(q, k, v, causal, d):
    return ref_mod.flash_attention_ref(q.float().numpy(), k.float().numpy(), v.float().numpy(), causal=causal,
                                       softmax_scale=d ** -0.5)


@pytest.mark.parametrize("layout", ["BHSD", "BHDS"])
def test_prefill_layout_and_strategy_conventions(layout):
    fakes = make_attention_classes()
    b, hq, hkv, s, d = 1, 4, 1, 40, 256                 # Qwen3.5-35B-A3B at TP=4: 4 q heads + 1 kv head
    mod = fakes.NeuronAttentionBase(hq, hkv, d)
    q, k, v = _qkv(b, hq, hkv, s, d)
    out, strategy = nxattn.perform_prefill(mod, q, k, v, s, b, _causal(b, s), layout=layout)
    if layout == "BHSD":
        assert strategy is fakes.FlashAttentionStrategy.NONE and tuple(out.shape) == (b, hq, s, d)
    else:
        assert strategy is fakes.FlashAttentionStrategy.UNSHARDED_KERNEL and tuple(out.shape) == (b, hq, d, s)
    # attention_context_encode turns either convention into the same BSHD tensor
    bshd = mod.context_encode_layout(out, strategy)
    ref = _ref(q, k, v, True, d)
    assert_close("bshd", ref.transpose(0, 2, 1, 3), bshd.numpy())
    # and NxDI's own softmax path (strategy NONE) agrees
    nxdi_out, _ = mod.perform_prefill(q, k, v, s, b, _causal(b, s))
    assert_close("vs nxdi softmax path", nxdi_out.numpy(), mod.context_encode_layout(out, strategy).transpose(1, 2)
                 .numpy())


def test_bhds_reports_sharded_kernel_under_lnc2():
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(2, 1, 64, lnc=2)
    q, k, v = _qkv(1, 2, 1, 20, 64)
    out, strategy = nxattn.perform_prefill(mod, q, k, v, 20, 1, _causal(1, 20), layout="BHDS")
    assert strategy is fakes.FlashAttentionStrategy.SHARDED_KERNEL
    assert_close("lnc2", _ref(q, k, v, True, 64).transpose(0, 1, 3, 2), out.numpy())


@pytest.mark.parametrize("tp", [4, 8])
def test_tp_sharded_heads_with_replicated_kv_head(tp):
    """16 q / 2 kv heads split over TP ranks (NxDI REPLICATE_TO_TP_DEGREE): rank r holds q heads
    [r*16/tp, (r+1)*16/tp) and the replicated kv head r*2//tp; stacking the ranks' outputs is the full layer."""
    b, hq, hkv, s, d = 1, 16, 2, 24, 256
    q, k, v = _qkv(b, hq, hkv, s, d, seed=3)
    full = _ref(q, k, v, True, d)
    fakes = make_attention_classes()
    per_rank = hq // tp
    outs = []
    for r in range(tp):
        mod = fakes.NeuronAttentionBase(per_rank, 1, d)
        kv = (r * per_rank) // (hq // hkv)
        qr = q[:, r * per_rank:(r + 1) * per_rank]
        out, strategy = nxattn.perform_prefill(mod, qr, k[:, kv:kv + 1], v[:, kv:kv + 1], s, b, _causal(b, s))
        assert strategy is fakes.FlashAttentionStrategy.NONE
        outs.append(out)
    assert_close("tp stacked", full, torch.cat(outs, dim=1).numpy())


@given(b=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), s=st.integers(1, 140),
       d=st.sampled_from([64, 128, 256]), causal=st.booleans())
def test_prefill_matches_reference_hypothesis(b, group, s, d, causal):
    hkv = 1
    hq = hkv * group
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(hq, hkv, d)
    q, k, v = _qkv(b, hq, hkv, s, d, seed=s)
    mask = _causal(b, s) if causal else None            # NxDI: causal iff a mask is given
    out, _ = nxattn.perform_prefill(mod, q, k, v, s, b, mask)
    assert_close("prefill", _ref(q, k, v, causal, d), out.numpy())


def test_bf16_and_huge_logits_stay_finite():
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(2, 1, 256, torch_dtype=torch.bfloat16)
    q, k, v = _qkv(1, 2, 1, 33, 256, seed=7, scale=30.0)          # logits ~ 30*30*16 = 1e4
    out, _ = nxattn.perform_prefill(mod, q, k, v, 33, 1, _causal(1, 33))
    # computed in torch_dtype (bf16) like NxDI's kernel call, returned in Q's dtype like its NONE path
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out_bf16, _ = nxattn.perform_prefill(mod, q.bfloat16(), k.bfloat16(), v.bfloat16(), 33, 1, _causal(1, 33))
    assert out_bf16.dtype == torch.bfloat16
    assert_close("bf16 in/out", out.numpy(), out_bf16.float().numpy(), dtype="bfloat16")
    ref = _ref(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), True, 256)
    assert_close("bf16 peaky", ref, out.float().numpy(), dtype="bfloat16")


def test_q_equals_k_peaky_softmax():
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(1, 1, 128)
    q, _, v = _qkv(1, 1, 1, 50, 128, seed=11, scale=8.0)
    out, _ = nxattn.perform_prefill(mod, q, q.clone(), v, 50, 1, _causal(1, 50))
    assert_close("q=k", _ref(q, q, v, True, 128), out.numpy())


def test_softmax_scale_divisor_is_honoured():
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(2, 2, 64)
    mod.softmax_scale = 2.0                                       # a custom divisor, not sqrt(D)
    q, k, v = _qkv(1, 2, 2, 17, 64, seed=5)
    out, _ = nxattn.perform_prefill(mod, q, k, v, 17, 1, _causal(1, 17))
    ref = ref_mod.flash_attention_ref(q.numpy(), k.numpy(), v.numpy(), causal=True, softmax_scale=0.5)
    assert_close("scale", ref, out.numpy())
    nxdi_out, _ = mod.perform_prefill(q, k, v, 17, 1, _causal(1, 17))
    assert_close("scale vs nxdi", nxdi_out.numpy(), out.numpy())


def test_bad_layout_and_shape_raise():
    fakes = make_attention_classes()
    mod = fakes.NeuronAttentionBase(2, 1, 64)
    q, k, v = _qkv(1, 2, 1, 8, 64)
    with pytest.raises(AdapterInputError, match="layout must be one of"):
        nxattn.perform_prefill(mod, q, k, v, 8, 1, None, layout="BSHD")
    with pytest.raises(AdapterInputError, match="q_len=9"):
        nxattn.perform_prefill(mod, q, k, v, 9, 1, None)


def test_installed_class_method_and_fallbacks():
    fakes = make_attention_classes()
    base, contrib = fakes.NeuronAttentionBase, fakes.NeuronQwen35Attention
    with apply([base, contrib], kernels=["attention"]) as inst:
        assert set(inst.installed["attention"]) == {"NeuronAttentionBase.perform_prefill",
                                                    "NeuronQwen35Attention.perform_prefill"}
        q, k, v = _qkv(1, 2, 1, 30, 256, seed=2)
        mod = base(2, 1, 256)
        out, strategy = mod.perform_prefill(q, k, v, 30, 1, _causal(1, 30))
        assert base.calls == 0 and strategy is fakes.FlashAttentionStrategy.NONE     # the caller's own enum
        assert_close("installed", _ref(q, k, v, True, 256), out.numpy())
        # the contrib class: always causal, BHSD (its forward ignores the strategy), even without a mask
        cmod = contrib(2, 1, 256)
        out, _ = cmod.perform_prefill(q, k, v, 30, 1)
        assert contrib.calls == 0
        assert_close("contrib causal", _ref(q, k, v, True, 256), out.numpy())
        # unsupported: sliding window -> the original runs
        sw = base(2, 1, 256, sliding_window=8)
        sw.perform_prefill(q, k, v, 30, 1, _causal(1, 30))
        assert base.calls == 1
        # a concrete mask that is not plain causal (left padding) -> the original runs, same result as before
        mask = _causal(1, 30).clone()
        mask[..., :3] = False
        got, _ = mod.perform_prefill(q, k, v, 30, 1, mask)
        assert base.calls == 2
        # parameters untouched
        assert [n for n, _ in mod.named_parameters()] == ["qkv_proj.weight", "qkv_proj.bias"]
    # restored
    mod.perform_prefill(q, k, v, 30, 1, _causal(1, 30))
    assert base.calls == 3


def test_kill_switch_defers_to_original(monkeypatch):
    fakes = make_attention_classes()
    base = fakes.NeuronAttentionBase
    with apply([base], kernels="attention"):
        monkeypatch.setenv("NKI_KERNELS_NXDI_DISABLE", "1")
        q, k, v = _qkv(1, 1, 1, 6, 64)
        base(1, 1, 64).perform_prefill(q, k, v, 6, 1, _causal(1, 6))
        assert base.calls == 1


def test_right_padding_valid_rows_independent_of_padding():
    """NxDI's CTE mask carries no padding with right padding: valid query rows only see earlier (valid) keys, so
    each sequence's valid rows equal that sequence run alone, whatever the pad positions hold."""
    fakes = make_attention_classes()
    b, hq, hkv, s, d = 2, 4, 1, 48, 256
    lengths = [48, 29]
    mod = fakes.NeuronAttentionBase(hq, hkv, d)
    q, k, v = _qkv(b, hq, hkv, s, d, seed=17)
    q[1, :, 29:], k[1, :, 29:], v[1, :, 29:] = 1e3, -1e3, 7.0          # garbage in the padding
    out, _ = nxattn.perform_prefill(mod, q, k, v, s, b, _causal(b, s))
    assert torch.isfinite(out).all()
    for i, n in enumerate(lengths):
        alone = _ref(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n], True, d)
        assert_close(f"seq {i}", alone, out[i:i + 1, :, :n].numpy())


def test_kernel_limit_falls_back_to_original(monkeypatch):
    """A KernelInputError from the wrapper (e.g. one KV head's K^T + V exceeding SBUF at a 32K bucket) hands the
    call back to NxDI's implementation instead of failing the trace."""
    from nki_kernels.validation import KernelInputError

    def limited(*a, **k):
        raise KernelInputError("flash_attention: one KV head must fit SBUF, got Skv=32768")
    monkeypatch.setattr(nxattn, "kernel", lambda name, family: limited)
    fakes = make_attention_classes()
    base = fakes.NeuronAttentionBase
    with apply([base], kernels="attention"):
        q, k, v = _qkv(1, 2, 1, 12, 64)
        out, strategy = base(2, 1, 64).perform_prefill(q, k, v, 12, 1, _causal(1, 12))
    assert base.calls == 1 and strategy is fakes.FlashAttentionStrategy.NONE
    assert_close("fallback", _ref(q, k, v, True, 64), out.numpy())


def _block_diagonal(image_ids):
    ids = torch.tensor(image_ids)
    return (ids[:, None] == ids[None, :]) & torch.outer(ids != -1, ids != -1)


def _ref_masked(q, k, v, mask, d):
    """float64 softmax attention under a boolean [S, S] mask (rows with no key give 0), independent of the adapter."""
    qd, kd, vd = (t.double() for t in (q, k, v))
    reps = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(reps, 1), vd.repeat_interleave(reps, 1)
    scores = qd @ kd.transpose(2, 3) * d ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ vd).numpy()


@pytest.mark.parametrize("mask_rank", [4, 2])
def test_vision_encoder_block_diagonal_mask_falls_back(mask_rank):
    """Qwen3-VL / Pixtral vision attention subclasses NeuronAttentionBase, sets attn_kernel_enabled=False and
    passes a block-diagonal mask (patches attend within their image): the adapter must hand back to the original
    perform_prefill, and the result must equal the unpatched class (not causal attention)."""
    fakes = make_attention_classes()
    vis = fakes.NeuronQwen3VLVisionAttention
    s, h, d = 24, 2, 64
    ids = [0] * 10 + [1] * 8 + [2] * 4 + [-1] * 2                  # three images and two padding patches
    mask2d = vis.create_vision_attention_mask_from_pos_ids(torch.tensor(ids))
    mask = mask2d[None, None] if mask_rank == 4 else mask2d
    q, k, v = _qkv(1, h, h, s, d, seed=5)
    unpatched, strat0 = vis(h, d).perform_prefill(q, k, v, s, 1, mask)
    with apply([fakes.NeuronAttentionBase, vis], kernels="attention") as inst:
        assert inst.installed["attention"] == ["NeuronAttentionBase.perform_prefill"]   # inherited, patched once
        patched, strat1 = vis(h, d).perform_prefill(q, k, v, s, 1, mask)
    assert vis.calls == 2 and strat1 is strat0 is fakes.FlashAttentionStrategy.NONE
    assert torch.equal(patched, unpatched)
    valid = torch.tensor(ids) != -1
    ref = _ref_masked(q, k, v, _block_diagonal(ids), d)
    assert_close("vision block-diagonal", ref[:, :, valid.numpy()], patched[:, :, valid].numpy())
    causal = _ref(q, k, v, True, d)
    assert not torch.allclose(torch.from_numpy(causal).float()[:, :, valid], patched[:, :, valid], atol=1e-2)


def test_block_diagonal_mask_with_kernel_enabled_falls_back_on_host():
    """A subclass that leaves attn_kernel_enabled at None but passes a block-diagonal host mask: the values are
    readable (CPU, not traced) and not causal, so the original runs."""
    fakes = make_attention_classes()
    base = fakes.NeuronAttentionBase
    s, d = 16, 64
    mask = _block_diagonal([0] * 8 + [1] * 8)[None, None]
    q, k, v = _qkv(1, 2, 2, s, d, seed=6)
    unpatched, _ = base(2, 2, d).perform_prefill(q, k, v, s, 1, mask)
    with apply([base], kernels="attention"):
        patched, _ = base(2, 2, d).perform_prefill(q, k, v, s, 1, mask)
    assert base.calls == 2 and torch.equal(patched, unpatched)


@pytest.mark.parametrize("where", ["module", "neuron_config"])
def test_attn_kernel_disabled_falls_back(where):
    fakes = make_attention_classes()
    base = fakes.NeuronAttentionBase
    mod = base(2, 1, 64)
    if where == "module":
        mod.attn_kernel_enabled = False
    else:
        mod.attn_kernel_enabled = None
        mod.neuron_config.attn_kernel_enabled = False
    q, k, v = _qkv(1, 2, 1, 12, 64)
    with apply([base], kernels="attention"):
        mod.perform_prefill(q, k, v, 12, 1, _causal(1, 12))
    assert base.calls == 1
