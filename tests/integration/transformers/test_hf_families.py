"""Patched vs stock on tiny random-weight models of every supported family (emulator backend).

For each family: logits (or the last hidden state for the Omni thinker text model) of a left-padded and of a
right-padded batch match the stock model at every non-padding position; cached decode steps (prefill + single
tokens, the path generate() takes) match too, and the GDN states stay in transformers' cache objects.
"""
import pytest
import torch

from hf_kit import assert_kernels_ran, assert_valid_close, forward_out, padded_batch
from integration.transformers import patch, tiny

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]

# kernels each family's prefill must launch (those whose wrappers exist; the others are reported "not available")
_PREFILL = {   # 2 x 20 tokens: more than moe_decode's 32, so the MoE prefill runs moe_blockwise
    "qwen3_5_moe": ("flash_attention", "gated_delta_rule", "causal_conv1d", "moe_blockwise"),
    "qwen3_5": ("flash_attention", "gated_delta_rule", "causal_conv1d"),
    "qwen3_next": ("flash_attention", "gated_delta_rule", "causal_conv1d", "moe_blockwise"),
    "qwen3_omni_moe_thinker": ("flash_attention", "moe_blockwise"),
}
_PREFILL_T = 20
_DECODE = {
    "qwen3_5_moe": ("flash_attention_decode", "gated_delta_rule_step", "causal_conv1d_update", "moe_decode"),
    "qwen3_5": ("flash_attention_decode", "gated_delta_rule_step", "causal_conv1d_update"),
    "qwen3_next": ("flash_attention_decode", "gated_delta_rule_step", "causal_conv1d_update", "moe_decode"),
}


def _expected(handle, names):
    """Kernel names expected to have run: "moe" means either MoE kernel; families reported not available drop."""
    out = []
    for n in names:
        fam = "moe" if n.startswith("moe") else ("deltanet" if ("delta" in n or "conv" in n) else "attention")
        if fam in handle.not_available:
            continue
        out.append(n)
    return out


def _check_ran(handle, names):
    calls = handle.calls()
    for n in _expected(handle, names):
        if n == "moe":
            assert calls.get("moe_blockwise", 0) + calls.get("moe_decode", 0) > 0, handle.report()
        else:
            assert_kernels_ran(handle, n)


@pytest.fixture(scope="module")
def models():
    return {fam: tiny.build(fam, seed=i) for i, fam in enumerate(_PREFILL)}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(_PREFILL))
def test_prefill_matches_stock(models, family, padding):
    model = models[family]
    ids, am = padded_batch(padding, T=_PREFILL_T, n_pad=7, seed=3)
    ref, _ = forward_out(model, ids, am)
    with patch(model, backend="emulator") as handle:
        got, _ = forward_out(model, ids, am)
    assert_valid_close(f"{family} {padding}-padded", ref, got, am)
    _check_ran(handle, _PREFILL[family])
    assert not handle.fallbacks(), handle.report()
    # left or right padding: one attention launch per layer for the whole batch
    assert handle.calls()["flash_attention"] == handle.patched["attention modules"], handle.report()


def _prefill_then_steps(model, ids, am, n_steps=2):
    """Prefill with a cache, then n_steps single-token forwards fed with the greedy token: the generate() path."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    logits, out = forward_out(model, ids, am, cache=cache, use_cache=True)
    outs = [logits[:, -1]]
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_steps):
        am = torch.cat([am, torch.ones_like(tok)], dim=1)
        logits, out = forward_out(model, tok, am, cache=out.cache, use_cache=True)
        outs.append(logits[:, -1])
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(outs, 1), out.cache


@pytest.mark.parametrize("family", list(_DECODE))
def test_cached_decode_steps_match_stock(models, family):
    model = models[family]
    ids, am = padded_batch("left", T=10, seed=5)
    ref, ref_cache = _prefill_then_steps(model, ids, am)
    with patch(model, backend="emulator") as handle:
        got, cache = _prefill_then_steps(model, ids, am)
    from nki_kernels.testing import assert_close
    assert_close(f"{family} decode logits", ref.numpy(), got.numpy(), dtype="float32")
    _check_ran(handle, _DECODE[family])
    # the GDN states live in transformers' cache objects, with transformers' layouts and dtypes
    cfg = model.config
    lin = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    for i in lin:
        rec, conv = cache.layers[i].recurrent_states[0], cache.layers[i].conv_states[0]
        assert rec.dtype == torch.float32 and tuple(rec.shape) == (
            2, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        assert tuple(conv.shape) == (2, conv_dim, cfg.linear_conv_kernel_dim)
        assert_close(f"layer {i} recurrent state", ref_cache.layers[i].recurrent_states[0].numpy(), rec.numpy())
        assert_close(f"layer {i} conv state", ref_cache.layers[i].conv_states[0].numpy(), conv.numpy())


@pytest.mark.parametrize("second", [8, 9])
def test_chunked_prefill_continues_from_cache(models, second):
    """A second multi-token chunk after a cached prefill (prefix caching): GDN starts from the cached state, the
    conv from the cached inputs, attention is causal bottom-right over the cache (decode kernel for <= 8 new
    tokens, prefill kernel with Skv > Sq above)."""
    from transformers import DynamicCache
    model = models["qwen3_5_moe"]
    ids, am = padded_batch("left", T=10 + second, seed=17)

    def run():
        cache = DynamicCache(config=model.config)
        l1, out = forward_out(model, ids[:, :10], am[:, :10], cache=cache, use_cache=True)
        l2, _ = forward_out(model, ids[:, 10:], am, cache=out.cache, use_cache=True)
        return torch.cat([l1, l2], 1)
    ref = run()
    with patch(model, backend="emulator") as handle:
        got = run()
    assert_valid_close(f"chunked prefill 10+{second}", ref, got, am)
    assert handle.calls().get("gated_delta_rule", 0) == 6 and not handle.fallbacks(), handle.report()


def test_vlm_patches_the_text_tower_only():
    model = tiny.build("qwen3_5_moe_vlm", seed=13)
    ids, am = padded_batch("left", T=_PREFILL_T, seed=13)
    ref, _ = forward_out(model, ids, am)
    with patch(model, backend="emulator") as handle:
        assert model.config.text_config._attn_implementation == "nki_kernels"
        assert model.config.vision_config._attn_implementation == "sdpa"
        got, _ = forward_out(model, ids, am)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert_valid_close("qwen3_5_moe VLM text", ref, got, am)
    _check_ran(handle, _PREFILL["qwen3_5_moe"])


def test_reference_backend_matches_stock(models):
    model = models["qwen3_5_moe"]
    ids, am = padded_batch("left", T=_PREFILL_T, seed=7)
    ref, _ = forward_out(model, ids, am)
    with patch(model, backend="reference") as handle:
        got, _ = forward_out(model, ids, am)
    assert_valid_close("qwen3_5_moe reference backend", ref, got, am)
    _check_ran(handle, _PREFILL["qwen3_5_moe"])


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_5"])
def test_bf16_model_no_less_accurate_than_stock(family):
    """A bf16 tiny model is itself far from its fp32 twin (random weights amplify rounding), so the criterion is
    relative: against the fp32 model, the patched bf16 model is as accurate as the stock bf16 model."""
    from nki_kernels.testing import rel_rms_error
    m32 = tiny.build(family, seed=11)
    model = tiny.build(family, seed=11).to(torch.bfloat16)
    ids, am = padded_batch("right", T=_PREFILL_T, seed=11)
    truth, _ = forward_out(m32, ids, am)
    ref, _ = forward_out(model, ids, am)
    with patch(model, backend="emulator") as handle:
        got, _ = forward_out(model, ids, am)
    valid = am.bool()
    err_stock = rel_rms_error(truth[valid].numpy(), ref.float()[valid].numpy())
    err_patched = rel_rms_error(truth[valid].numpy(), got.float()[valid].numpy())
    assert err_patched <= 1.25 * err_stock + 1e-3, (err_patched, err_stock, handle.report())
    _check_ran(handle, _PREFILL[family])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_5", "qwen3_next", "qwen3_omni_moe_thinker_lm"])
def test_greedy_generate_identical(family):
    model = tiny.build(family, seed=21)
    ids, am = padded_batch("left", T=10, seed=21)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with patch(model, backend="emulator") as handle:
            got = model.generate(ids, **kw)
    assert torch.equal(ref, got), f"{ref}\n{got}\n{handle.report()}"
    _check_ran(handle, _DECODE.get(family, ("flash_attention_decode", "moe_decode")))
