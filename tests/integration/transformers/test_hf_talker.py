"""Qwen3-Omni talker: greedy codes (code 0 from the talker, the residual codes from the code predictor) are
identical to stock over several frames with every hook on; the code-predictor hook is an instance attribute."""
import pytest
import torch

from integration.transformers import patch, tiny


def _talker_inputs(B=2, T=6, H=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, T, H, generator=g)
    trail = torch.randn(B, 3, H, generator=g)
    pad = torch.randn(1, 1, H, generator=g).expand(B, 1, H)
    am = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        am[1, :2] = 0                                      # left padding on the second prompt
    return dict(inputs_embeds=emb, attention_mask=am, trailing_text_hidden=trail, tts_pad_embed=pad)


def _codes(talker, frames, inputs):
    """talker.generate(max_new_tokens=frames + 1) gives `frames` frames of [B, G] codes (transformers.md s.6)."""
    with torch.no_grad():
        res = talker.generate(**inputs, max_new_tokens=frames + 1, do_sample=False, output_hidden_states=True,
                              return_dict_in_generate=True)
    codes = torch.stack([hid[-1] for hid in res.hidden_states if hid[-1] is not None], 1).transpose(1, 2)
    return res.sequences, codes


@pytest.fixture(scope="module")
def talker():
    return tiny.qwen3_omni_moe_talker(seed=0, num_code_groups=8)


def test_talker_greedy_codes_identical(talker):
    inputs = _talker_inputs()
    seq0, codes0 = _codes(talker, 3, inputs)
    stock_generate = talker.code_predictor.generate
    with patch(talker, backend="emulator") as handle:
        assert "generate" in vars(talker.code_predictor) or "code_predictor" in handle.not_available
        seq1, codes1 = _codes(talker, 3, inputs)
    assert codes0.shape == (2, 8, 3)
    assert torch.equal(seq0, seq1) and torch.equal(codes0, codes1), handle.report()
    calls = handle.calls()
    assert calls.get("flash_attention", 0) > 0 and calls.get("flash_attention_decode", 0) > 0, handle.report()
    if "code_predictor" not in handle.not_available:
        assert calls.get("code_predictor", 0) == 3, handle.report()     # one launch per decode step (frame)
    if "moe" not in handle.not_available:
        assert calls.get("moe_decode", 0) + calls.get("moe_blockwise", 0) > 0, handle.report()
    # restored: the bound stock method again, no instance attribute left
    assert "generate" not in vars(talker.code_predictor)
    assert talker.code_predictor.generate == stock_generate


def test_sampling_runs_the_stock_code_predictor(talker):
    """Sampling cannot reproduce torch's RNG stream in a kernel: the hook hands it to the stock generate()."""
    inputs = _talker_inputs(B=1, seed=1)
    with patch(talker, kernels=("code_predictor",), backend="emulator") as handle:
        if "code_predictor" in handle.not_available:
            pytest.skip(handle.not_available["code_predictor"])
        torch.manual_seed(0)
        with torch.no_grad():
            talker.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5, output_hidden_states=True,
                            return_dict_in_generate=True)
    assert handle.calls().get("code_predictor", 0) == 0
    assert handle.fallbacks().get(("code_predictor", "sampling (torch RNG stream)"), 0) == 2


@pytest.mark.slow
def test_talker_many_frames_identical():
    talker = tiny.qwen3_omni_moe_talker(seed=3, num_code_groups=16)
    inputs = _talker_inputs(seed=3)
    _, codes0 = _codes(talker, 8, inputs)
    with patch(talker, backend="emulator") as handle:
        _, codes1 = _codes(talker, 8, inputs)
    assert torch.equal(codes0, codes1), handle.report()
