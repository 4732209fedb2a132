"""patch() never raises mid-model, warns once about grad / training mode, and keeps no second copy of weights."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from integration.transformers import patch, tiny
from integration.transformers._common import _KERNEL_SOURCES
from nki_kernels.emulator import EmulatorCheckError
from nki_kernels.validation import KernelInputError

from hf_kit import padded_batch


def _refusing(exc):
    def kernel(*args, **kwargs):
        raise exc
    return kernel


@pytest.mark.parametrize("exc", [KernelInputError("fake_kernel: x must be small, got x=big"),
                                 EmulatorCheckError("ndarray", "w_sb", "SBUF allocation of 32768 B per partition "
                                                    "exceeds capacity")])
def test_every_hook_falls_back_when_its_kernel_refuses(exc):
    model = tiny.build("qwen3_5_moe", seed=3)
    ids, am = padded_batch("none", seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    with patch(model, backend="emulator") as handle:
        for name in _KERNEL_SOURCES:                 # every kernel the hooks can reach refuses its inputs
            handle.kernels._cache[name] = _refusing(exc)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=am).logits
        fallbacks = handle.fallbacks()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert handle.calls() == {}
    prefix = "kernel refused: " if isinstance(exc, KernelInputError) else "kernel failed the emulator's hardware"
    hooks = {hook for hook, why in fallbacks if why.startswith(prefix) and str(exc) in why}
    assert {"attention", "deltanet", "conv1d", "moe shared block", "moe"} <= hooks, fallbacks


def test_grad_mode_fallback_warns_once_and_names_no_grad():
    model = tiny.build("qwen3_5_moe", seed=4)
    ids, am = padded_batch("none", seed=4)
    with patch(model, backend="emulator") as handle, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, attention_mask=am)
        model(input_ids=ids, attention_mask=am)
    ours = [w for w in caught if "nki-kernels" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(ours[0].category, UserWarning)
    assert "torch.no_grad()" in str(ours[0].message) and "forward-only" in str(ours[0].message)
    assert handle.calls() == {}


def test_no_warning_under_no_grad():
    model = tiny.build("qwen3_5_moe", seed=5)
    ids, am = padded_batch("none", seed=5)
    with patch(model, backend="emulator") as handle, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am)
    assert not [w for w in caught if "nki-kernels" in str(w.message)]
    assert handle.calls()


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects (parameters included)."""
    gc.collect()
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # isinstance() on deprecated torch objects warns
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu" and not obj.is_meta:
            try:                                   # fake / functional tensors (torch.compile tests) have no data
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
    return sum(seen.values())


def test_patch_keeps_no_second_copy_of_the_expert_weights():
    """Storage accounting on a tiny Qwen3.5-MoE: after patch() and patched forwards (prefill through
    moe_blockwise, decode through moe_decode), the live tensor bytes grow by far less than the expert weights."""
    model = tiny.build("qwen3_5_moe", seed=6)
    ids, am = padded_batch("none", T=40, seed=6)      # 80 tokens: the blockwise path
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"))
    assert expert_bytes > 0
    before = _live_tensor_bytes()
    handle = patch(model, backend="emulator")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
        model(input_ids=ids[:1, :4], attention_mask=am[:1, :4])       # 4 tokens: the decode path
    calls = handle.calls()
    extra = _live_tensor_bytes() - before
    handle.restore()
    assert calls.get("moe_blockwise", 0) > 0 and calls.get("moe_decode", 0) > 0, calls
    assert extra < expert_bytes // 20, (extra, expert_bytes)


@pytest.mark.slow
def test_issue_16_item_5_moe_block_that_does_not_fit_falls_back():
    """Qwen3.5-35B-A3B widths, 8 experts top-2, fp32 [1, 33, 2048] with the shared expert (it overflowed SBUF
    inside the kernel and the model call raised): now the kernel either runs or the hook falls back with the
    reason (wrapper refusal or the emulator's SBUF check); never an exception, and the stock result either way."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock
    torch.manual_seed(0)
    block = Qwen3_5MoeSparseMoeBlock(Qwen3_5MoeTextConfig(num_experts=8, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
        x = torch.randn(1, 33, 2048)
        ref = block(x)
        with patch(block, backend="emulator") as handle:
            out = block(x)
            fallbacks, calls = handle.fallbacks(), handle.calls()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    reasons = [why for hook, why in fallbacks if hook.startswith("moe")]
    assert all(why.startswith("kernel") for why in reasons), fallbacks
    fused_ran = calls.get("moe_blockwise", 0) > 0 and not [h for h, _ in fallbacks if h == "moe shared block"]
    assert fused_ran or reasons, (calls, fallbacks)
