"""patch() plumbing: restore puts everything back, patching twice is harmless, bad models and arguments are refused,
the process-wide GDN functions only act inside patched models, and the attention mask analysis is exact."""
import importlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_kit import forward_out, padded_batch
from integration.transformers import patch, tiny
from integration.transformers import attention as hf_attention
from integration.transformers import deltanet as hf_deltanet

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]


def _snapshot(model):
    """Everything patch() may touch: GDN module globals, configs' implementations, instance attributes."""
    mods = {}
    for name in hf_deltanet.gdn_modules():
        mod = importlib.import_module(name)
        mods[name] = {fn: getattr(mod, fn) for fn in hf_deltanet.FUNCTION_NAMES if hasattr(mod, fn)}
    cfgs = {}
    inst = {}
    for i, m in enumerate(model.modules()):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfgs[id(cfg)] = (cfg._attn_implementation, cfg._experts_implementation)
        inst[i] = {k: v for k, v in vars(m).items() if k in ("forward", "generate") or k.startswith("_nki")}
    return mods, cfgs, inst


def test_restore_gives_back_stock_functions():
    model = tiny.build("qwen3_5_moe", seed=1)
    before = _snapshot(model)
    handle = patch(model, backend="emulator")
    during = _snapshot(model)
    # something was actually changed ...
    qmod = importlib.import_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    assert getattr(qmod.torch_chunk_gated_delta_rule, "_nki_kernels_dispatcher", False)
    assert during[1] != before[1]
    assert model.config._attn_implementation == hf_attention.ATTN_KEY
    # ... and restore() puts back the very same objects
    handle.restore()
    after = _snapshot(model)
    for name, fns in before[0].items():
        for fn, obj in fns.items():
            assert after[0][name][fn] is obj, f"{name}.{fn} not restored"
    assert after[1] == before[1]
    assert after[2] == before[2]
    # the registry keys are gone again
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.moe import ExpertsInterface
    for iface in (AttentionInterface, AttentionMaskInterface, ExpertsInterface):
        assert "nki_kernels" not in iface._global_mapping, iface
    handle.restore()   # idempotent
    assert _snapshot(model)[1] == before[1]


def test_context_manager_restores_on_error():
    model = tiny.build("qwen3_5", seed=2)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with patch(model, backend="emulator"):
            raise RuntimeError("boom")
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(after[0][n][f] is o for n, fns in before[0].items() for f, o in fns.items())


def test_patching_twice_is_harmless():
    model = tiny.build("qwen3_next", seed=3)
    ids, am = padded_batch("left", seed=3)
    before = _snapshot(model)
    h1 = patch(model, backend="emulator")
    once, _ = forward_out(model, ids, am)
    h2 = patch(model, backend="emulator")
    assert h2 is h1
    twice, _ = forward_out(model, ids, am)
    assert torch.equal(once, twice)
    # a different request replaces the first patch instead of stacking on it
    h3 = patch(model, kernels=("attention",), backend="emulator")
    assert h3 is not h1 and not h1.active and h3.active
    qmod = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
    assert not getattr(qmod.torch_chunk_gated_delta_rule, "_nki_kernels_dispatcher", False)
    h3.restore()
    h1.restore()   # already restored: no-op
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]


def test_with_on_a_patched_model_keeps_the_earlier_patch():
    model = tiny.build("qwen3_5_moe", seed=4)
    before = _snapshot(model)
    outer = patch(model, backend="emulator")
    with patch(model, backend="emulator") as inner:
        assert inner is outer
    assert outer.active                          # leaving the inner block gave back only its own claim
    assert model.config._attn_implementation == hf_attention.ATTN_KEY
    outer.restore()
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]


def test_overlapping_patches_never_leave_the_model_half_patched():
    """patch(submodule) then patch(model) restores the submodule's patch first; patching a part of a patched
    model is refused. Before, restoring such nested handles out of order left configs pointing at an
    unregistered attention key (stock forwards then ignored the padding mask)."""
    model = tiny.build("qwen3_5_moe", seed=5)
    ids, am = padded_batch("left", seed=5)
    stock, _ = forward_out(model, ids, am)
    before = _snapshot(model)
    h1 = patch(model.model, backend="emulator")
    h2 = patch(model, backend="emulator")
    assert not h1.active and h2.active
    h1.restore()                                 # no-op: already superseded
    h2.restore()
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    again, _ = forward_out(model, ids, am)
    assert torch.equal(stock, again)
    h3 = patch(model, backend="emulator")
    with pytest.raises(ValueError, match="is part of a Qwen3_5MoeForCausalLM that is already patched"):
        patch(model.model, backend="emulator")
    assert h3.active
    h3.restore()


def test_gdn_kernels_survive_a_reset_of_the_layer_forward(tmp_path):
    """The GDN layers are activated by module hooks, not by an instance `forward`. transformers >= 5.25 loads models
    with `use_kernels=True` by default (modeling_utils.py `from_pretrained`) and `train()` / `eval()` re-run the
    `kernels` package's `kernelize` on a mode change, which deletes the instance `forward` of every hub-kernel
    layer (`Qwen3_5GatedDeltaNet`; kernels 0.19 `_replace_forward`). With an instance forward the GDN kernels
    silently stopped (no launch, no fallback). The test also deletes that attribute itself, so it checks the same
    on a transformers without `kernels`. restore() removes the hooks."""
    import importlib.util

    import transformers
    from hf_kit import assert_valid_close
    src = tiny.build("qwen3_5", seed=8)
    src.save_pretrained(tmp_path)
    model = type(src).from_pretrained(tmp_path).eval()
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version >= (5, 25) and importlib.util.find_spec("kernels") is not None:
        assert model.use_kernels            # the path this test is about: kernelize runs on train() / eval()
    ids, am = padded_batch("left", seed=8)
    ref, _ = forward_out(model, ids, am)
    layers = [m for m in model.modules() if type(m).__name__ == "Qwen3_5GatedDeltaNet"]
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers]
    with patch(model, backend="emulator") as handle:
        model.train()
        model.eval()
        for m in layers:                    # what kernelize does to a hub-kernel layer without a kernel
            m.__dict__.pop("forward", None)
        handle.reset_counts()
        got, _ = forward_out(model, ids, am)
        calls = handle.calls()
        assert calls.get("gated_delta_rule") == calls.get("causal_conv1d") == len(layers), handle.report()
        assert not handle.fallbacks(), handle.report()
    assert_valid_close("qwen3_5 after train()/eval()", ref, got, am)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers] == hooks_before


def test_deepcopy_of_a_patched_model_is_refused_with_a_reason():
    import copy
    model = tiny.build("qwen3_5_moe", seed=6)
    h = patch(model, backend="emulator")
    try:
        with pytest.raises(TypeError, match=r"restore\(\) the patch, copy the model"):
            copy.deepcopy(model)
    finally:
        h.restore()
    copy.deepcopy(model)


def test_refused_shared_block_counts_once_per_hook():
    """hidden 192 (not a multiple of 128): the fused shared-expert block and then the experts it falls back to
    are each refused once per layer call, under their own hook names (before, both counted under "moe")."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig
    cfg = Qwen3_5MoeTextConfig(**tiny._common(hidden_size=192), **tiny._gdn(), **tiny._moe())
    model = tiny._finish(Qwen3_5MoeForCausalLM(cfg), 10)
    ids, am = padded_batch("none", seed=10)
    n_blocks = sum(type(m).__name__ == "Qwen3_5MoeSparseMoeBlock" for m in model.modules())
    with patch(model, backend="emulator") as h:
        forward_out(model, ids, am)
    by_hook = {}
    for (hook, why), n in h.fallbacks().items():
        assert why.startswith("kernel refused"), why
        by_hook[hook] = by_hook.get(hook, 0) + n
    assert by_hook == {"moe shared block": n_blocks, "moe": n_blocks}


def test_unsupported_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"unsupported model LlamaForCausalLM \(model_type='llama'"):
        patch(llama)
    with pytest.raises(ValueError, match="expected a transformers model"):
        patch(object())


def test_bad_arguments_are_refused():
    model = tiny.build("qwen3_5", seed=4)
    with pytest.raises(ValueError, match=r"unknown kernels \['flash'\]"):
        patch(model, kernels=("flash",))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(model, backend="cuda")
    from nki_kernels import backend as nkb
    if nkb.ACTIVE != "nki":
        with pytest.raises(RuntimeError, match="real NKI runtime"):
            patch(model, backend="nki")
    assert not hasattr(model, "_nki_kernels_patch")


def test_gdn_functions_only_act_inside_patched_models():
    """The module globals are process-wide; a stock model of the same family keeps running the original code."""
    patched_model = tiny.build("qwen3_5", seed=5)
    stock_model = tiny.build("qwen3_5", seed=6)
    ids, am = padded_batch("right", seed=5)
    stock_before, _ = forward_out(stock_model, ids, am)
    with patch(patched_model, backend="emulator") as handle:
        forward_out(patched_model, ids, am)
        n = dict(handle.calls())
        stock_during, _ = forward_out(stock_model, ids, am)
        assert handle.calls() == n           # nothing launched for the unpatched model
    assert torch.equal(stock_before, stock_during)


def test_two_patched_models_nest():
    a, b = tiny.build("qwen3_5", seed=7), tiny.build("qwen3_5_moe", seed=8)
    ids, am = padded_batch("none", seed=7)
    ha = patch(a, kernels=("deltanet",))
    hb = patch(b, kernels=("deltanet",))
    ha.restore()
    forward_out(b, ids, am)              # b's patch survives a's restore
    assert hb.calls().get("gated_delta_rule", 0) > 0
    hb.restore()
    qmod = importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    assert not getattr(qmod.torch_chunk_gated_delta_rule, "_nki_kernels_dispatcher", False)


def test_missing_family_is_reported_and_falls_back(monkeypatch):
    """A kernel family whose wrapper cannot be imported keeps the model's own code and says so."""
    from integration.transformers import _common
    real_get = _common.Kernels.get

    def get(self, name):
        if name.startswith("gated_delta") or name.startswith("causal_conv1d"):
            self.missing[name] = f"{name} removed for this test"
            return None
        return real_get(self, name)
    monkeypatch.setattr(_common.Kernels, "get", get)
    model = tiny.build("qwen3_5", seed=9)
    ids, am = padded_batch("left", seed=9)
    ref, _ = forward_out(model, ids, am)
    with patch(model) as handle:
        got, _ = forward_out(model, ids, am)
    assert "deltanet" in handle.not_available
    assert "not available (gated_delta_rule removed for this test" in handle.report()
    assert handle.calls().get("gated_delta_rule", 0) == 0 and handle.calls().get("flash_attention", 0) > 0
    valid = am.bool()
    np.testing.assert_allclose(got[valid].numpy(), ref[valid].numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ attention mask analysis


def _sdpa_bool_mask(am, q_len, kv_len):
    """The mask transformers hands to our function: causal + padding from a 2D attention mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    m = sdpa_mask(batch_size=am.shape[0], q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                  mask_function=causal_mask_function, attention_mask=am.bool(), allow_is_causal_skip=False)
    return m[:, 0].numpy()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("n_pad", [0, 1, 5])
@pytest.mark.parametrize("q_len", [1, 3, 9])
def test_window_recovers_padding(side, n_pad, q_len):
    kv_len = 9
    am = torch.ones(1, kv_len, dtype=torch.long)
    if n_pad:
        if side == "left":
            am[0, :n_pad] = 0
        else:
            am[0, kv_len - n_pad:] = 0
    mask = _sdpa_bool_mask(am, q_len, kv_len)[0]
    win = hf_attention._window(mask, q_len, kv_len)
    assert win is not None
    qs, qe, ks, ke = win
    off = kv_len - q_len
    valid_keys = am[0].bool().numpy()
    # every valid query row (own token not padding) is inside [qs, qe); keys are exactly the valid ones it sees
    for i in range(q_len):
        if valid_keys[off + i]:
            assert qs <= i < qe
            assert np.array_equal(np.nonzero(mask[i])[0], np.nonzero(valid_keys[: off + i + 1])[0])
        else:
            assert not (qs <= i < qe)
    assert ks == int(np.argmax(valid_keys)) if valid_keys.any() else True


def test_window_rejects_non_causal_patterns():
    full = np.ones((4, 4), dtype=bool)
    assert hf_attention._window(full, 4, 4) is None            # bidirectional
    sliding = np.tril(np.ones((6, 6), dtype=bool)) & np.triu(np.ones((6, 6), dtype=bool), -2)
    assert hf_attention._window(sliding, 6, 6) is None         # sliding window
    holes = np.tril(np.ones((5, 5), dtype=bool))
    holes[4, 2] = False                                         # a hole in the middle of the keys
    assert hf_attention._window(holes, 5, 5) is None


def test_unexpressible_mask_falls_back_to_sdpa():
    from integration.transformers._common import Kernels, Stats
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    stats = Stats()
    hook = hf_attention.AttentionHook(Kernels("emulator"), stats)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 32, generator=g) for h in (4, 2, 2))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)          # bidirectional: not causal + padding
    out, _ = hook(module, q, k, v, mask, dropout=0.0, scaling=32 ** -0.5)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=32 ** -0.5)
    assert torch.allclose(out, ref)
    assert stats.fallbacks == {("attention", "mask is not causal + padding"): 1}
    out, _ = hook(module, q, k, v, None, dropout=0.0, scaling=32 ** -0.5, sliding_window=3)
    assert stats.fallbacks[("attention", "sliding window")] == 1


def test_recorded_launches_feed_the_cost_model():
    model = tiny.build("qwen3_5", seed=10)
    ids, am = padded_batch("none", seed=10)
    with patch(model, backend="emulator") as handle:
        handle.record_launches()
        forward_out(model, ids, am)
        modeled = handle.modeled()
    assert set(modeled) == {"flash_attention", "gated_delta_rule", "causal_conv1d"}
    for name, rep in modeled.items():
        assert rep.n_launches == handle.calls()[name] and rep.device_us > 0, (name, rep)
    with patch(model, backend="reference") as handle:
        with pytest.raises(RuntimeError, match="needs backend='emulator'"):
            handle.record_launches()


@given(data=st.data())
def test_attention_hook_matches_sdpa_on_padded_masks(data):
    """Property: for any batch of left- or right-padded sequences (prefill or a few new tokens after a cache),
    the hook's output equals transformers' sdpa on every valid query row, and padded rows are zero."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from integration.transformers._common import Kernels, Stats
    B = data.draw(st.integers(1, 3), label="B")
    kv_len = data.draw(st.integers(2, 24), label="kv_len")
    q_len = data.draw(st.sampled_from([kv_len, 1, min(3, kv_len)]), label="q_len")
    side = data.draw(st.sampled_from(["left", "right"]), label="side")
    if q_len < kv_len:
        side = "left"                      # generate() only continues left-padded batches
    pads = [data.draw(st.integers(0, kv_len - q_len if q_len < kv_len else kv_len - 1), label=f"pad{b}")
            for b in range(B)]
    D = data.draw(st.sampled_from([32, 64]), label="D")
    am = torch.ones(B, kv_len, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if side == "left":
                am[b, :p] = 0
            else:
                am[b, kv_len - p:] = 0
    mask = torch.from_numpy(_sdpa_bool_mask(am, q_len, kv_len))[:, None]
    g = torch.Generator().manual_seed(B * 1000 + kv_len * 10 + q_len)
    q = torch.randn(B, 4, q_len, D, generator=g) * 3.0          # peaky softmax
    k = torch.randn(B, 2, kv_len, D, generator=g)
    v = torch.randn(B, 2, kv_len, D, generator=g)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    stats = Stats()
    hook = hf_attention.AttentionHook(Kernels("emulator"), stats)
    out, _ = hook(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5)
    assert not stats.fallbacks, stats.fallbacks
    valid_q = am[:, kv_len - q_len:].bool()                     # [B, Sq]: the query's own token is not padding
    from nki_kernels.testing import assert_close
    assert_close("attention hook", ref[valid_q].numpy(), out[valid_q].numpy(), dtype="float32")
    assert torch.all(out[~valid_q] == 0)


def test_autograd_falls_back_to_the_model():
    """The kernels are forward-only: with autograd on, every hook runs the model's code so gradients flow."""
    model = tiny.build("qwen3_5_moe", seed=12)
    ids, am = padded_batch("left", seed=12)
    ref = model(input_ids=ids, attention_mask=am).logits
    with patch(model, backend="emulator") as handle:
        out = model(input_ids=ids, attention_mask=am).logits
        out[am.bool()].sum().backward()
    assert torch.equal(out, ref)
    assert model.lm_head.weight.grad is not None
    assert handle.calls() == {}, handle.report()
    hooks = {hook for hook, why in handle.fallbacks() if why.startswith("autograd")}
    assert hooks == {"attention", "deltanet", "conv1d", "moe"}, handle.fallbacks()
