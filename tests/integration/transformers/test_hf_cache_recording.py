"""Assisted decoding on the patched GDN models: transformers 5.25's recorded linear-attention caches.

transformers 5.25 made the GDN caches croppable (cache_utils.py: `LinearAttentionCacheLayerMixin.is_croppable`,
`activate_past_recording(recurrent_states_to_keep=N)`, `crop(-k)` restoring a kept recurrent state) and dropped the
`_is_stateful` flag that made 5.24's `generate()` refuse assisted decoding for Qwen3.5 / Qwen3-Next. While a cache
records, a GDN forward of T tokens runs its last min(N, T) tokens one `torch_recurrent_gated_delta_rule` step at a
time (keeping each state for a later crop) and only the tokens before them through `torch_chunk_gated_delta_rule`,
so that chunk call can have no tokens at all (modeling_qwen3_5.py / modeling_qwen3_next.py 5.25,
`Qwen3_5GatedDeltaNet.forward`). The patched model must equal the stock model there, and a crop followed by a step
must equal a fresh forward of the kept tokens (the independent reference).
"""
import importlib
import inspect

import pytest
import torch

from hf_kit import assert_kernels_ran, forward_out
from integration.transformers import deltanet as hf_deltanet
from integration.transformers import patch, tiny
from integration.transformers._common import Kernels, Stats
from nki_kernels.testing import assert_close

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]


def _records_recurrent_states() -> bool:
    """True on transformers >= 5.25: linear-attention cache layers can keep intermediate recurrent states."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin
    params = inspect.signature(LinearAttentionCacheLayerMixin.activate_past_recording).parameters
    return "recurrent_states_to_keep" in params


needs_recording = pytest.mark.skipif(
    not _records_recurrent_states(),
    reason="transformers < 5.25 cannot record GDN recurrent states (no assisted decoding for these models)")


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("final", [True, False])
def test_zero_token_chunk_passes_the_state_through(with_state, final):
    """The chunk call with T = 0 launches nothing and returns what transformers' torch function returns: an empty
    [B, 0, Hv, Dv] output in the query dtype and the initial state (zeros without one) as fp32, or None."""
    mod = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    stock_fn = mod.torch_chunk_gated_delta_rule
    assert not getattr(stock_fn, "_nki_kernels_dispatcher", False)
    gen = torch.Generator().manual_seed(0)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 32, 32
    q, k = (torch.randn(B, 0, Hk, Dk, generator=gen) for _ in range(2))
    v = torch.randn(B, 0, Hv, Dv, generator=gen)
    g, beta = -torch.rand(B, 0, Hv, generator=gen), torch.rand(B, 0, Hv, generator=gen)
    init = torch.randn(B, Hv, Dk, Dv, generator=gen) if with_state else None
    ref_o, ref_s = stock_fn(q, k, v, g=g, beta=beta, initial_state=init, output_final_state=final,
                            use_qk_l2norm_in_kernel=True)
    stats = Stats()
    hook = hf_deltanet.DeltaNetHook(Kernels("emulator"), stats)
    out = hook.guard("deltanet", hook.chunk, q, k, v, g, beta, 64, init, final, True, None, {})
    assert out is not None
    o, s = out
    assert o.shape == ref_o.shape == (B, 0, Hv, Dv) and o.dtype == ref_o.dtype
    if final:
        assert s.dtype == ref_s.dtype == torch.float32 and torch.equal(s, ref_s)
        assert init is None or s.data_ptr() != init.data_ptr()     # the cache copies it; never an alias
    else:
        assert s is None and ref_s is None
    assert not stats.calls and not stats.fallbacks


# (T new tokens in the recorded forward, N states kept, k tokens cropped after it, whether stock 5.25 restores the
# right state). T <= N: the chunk call has no tokens. T > N with k = N: stock 5.25 restores the recurrent state
# from before the forward instead of the one after its first T - N tokens (the recorded history starts with the
# pre-forward state: cache_utils.py `LinearAttentionLayer.update_recurrent_state` / `crop`), so only patched ==
# stock is checked there. generate() reaches that case when the prefill's candidates are all rejected.
_CASES = [(4, 3, 1, True), (4, 3, 2, True), (2, 3, 1, True), (3, 3, 3, True), (4, 3, 3, False)]
_PREFIX = 9


def _recorded_runs(model, ids):
    """Per case: prefill, record, T-token forward, crop(-k), one step. Returns the logits of the recorded forward and
    of the step, the GDN states after the step, and the step's logits recomputed without a cache."""
    from transformers import DynamicCache
    out = []
    for T, N, k, _ in _CASES:
        cache = DynamicCache(config=model.config)
        am = torch.ones_like(ids)
        _, o = forward_out(model, ids[:, :_PREFIX], am[:, :_PREFIX], cache=cache, use_cache=True)
        cache = o.cache
        cache.activate_past_recording(recurrent_states_to_keep=N)
        verify, o = forward_out(model, ids[:, _PREFIX:_PREFIX + T], am[:, :_PREFIX + T], cache=cache, use_cache=True)
        cache.crop(-k)
        kept = _PREFIX + T - k
        step, o = forward_out(model, ids[:, kept:kept + 1], am[:, :kept + 1], cache=o.cache, use_cache=True)
        lin = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
        states = [(o.cache.layers[i].recurrent_states[0].clone(), o.cache.layers[i].conv_states[0].clone())
                  for i in lin]
        with torch.no_grad():
            fresh = model(input_ids=ids[:, :kept + 1]).logits[:, -1]
        out.append((verify, step[:, -1], states, fresh))
    return out


@needs_recording
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "qwen3_5_moe"])
def test_recorded_forward_crop_and_step_match_stock(family):
    model = tiny.build(family, seed=31)
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(31))
    ref = _recorded_runs(model, ids)
    with patch(model, backend="emulator") as handle:
        got = _recorded_runs(model, ids)
    for (T, N, k, stock_right), (rv, rs, rst, fresh), (gv, gs, gst, _) in zip(_CASES, ref, got):
        case = f"{family} T={T} N={N} k={k}"
        assert_close(f"{case} recorded forward", rv.numpy(), gv.numpy(), dtype="float32")
        assert_close(f"{case} step after crop", rs.numpy(), gs.numpy(), dtype="float32")
        if stock_right:
            assert_close(f"{case} step after crop vs no-cache forward", fresh.numpy(), gs.numpy(), dtype="float32")
        for i, ((r_rec, r_conv), (g_rec, g_conv)) in enumerate(zip(rst, gst)):
            assert g_rec.dtype == torch.float32
            assert_close(f"{case} GDN layer {i} recurrent state", r_rec.numpy(), g_rec.numpy())
            assert_close(f"{case} GDN layer {i} conv state", r_conv.numpy(), g_conv.numpy())
    # (a recording cache sends even one-token forwards through the conv over the kept inputs: causal_conv1d)
    assert_kernels_ran(handle, "gated_delta_rule", "gated_delta_rule_step", "causal_conv1d")
    assert not handle.fallbacks(), handle.report()


def _lookup_prompt():
    base = torch.randint(2, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    return torch.cat([base, base, base[:, :3]], 1)      # repeated n-grams: prompt lookup finds candidates


@pytest.mark.parametrize("family", ["qwen3_5", pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_prompt_lookup_decoding(family):
    """transformers >= 5.25: prompt-lookup (assisted) decoding of the patched model gives the stock tokens, with every
    GDN kernel and no fallback. (Stock's tokens are not always the greedy ones: see `_CASES`.) transformers 5.24
    refuses it for these models, patched or not, with the same error."""
    model = tiny.build(family, seed=21)
    ids = _lookup_prompt()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if not _records_recurrent_states():
            with pytest.raises(ValueError) as stock_err:
                model.generate(ids, prompt_lookup_num_tokens=3, **kw)
            with patch(model, backend="emulator"):
                with pytest.raises(ValueError) as patched_err:
                    model.generate(ids, prompt_lookup_num_tokens=3, **kw)
            assert str(patched_err.value) == str(stock_err.value)
            return
        stock = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
        with patch(model, backend="emulator") as handle:
            got = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(got, stock), (got, stock, handle.report())
    assert_kernels_ran(handle, "gated_delta_rule", "gated_delta_rule_step", "causal_conv1d",
                       "flash_attention_decode")
    assert not handle.fallbacks(), handle.report()
