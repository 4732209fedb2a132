"""Qwen3-Omni vision / audio encoders patched onto flash_attention_varlen (integration/transformers/encoder_attention)
against the stock encoders (transformers' own per-window attention) on tiny random-weight configs."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeVisionEncoderConfig)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder)

from integration.transformers import encoder_attention as enc  # noqa: E402


def _vision(seed, hidden=144, heads=2):
    """head_dim = hidden / heads: 72 like the real vision encoder (1152 / 16)."""
    torch.manual_seed(seed)
    cfg = Qwen3OmniMoeVisionEncoderConfig(depth=2, hidden_size=hidden, intermediate_size=64, num_heads=heads,
                                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                          out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3OmniMoeVisionEncoder(cfg).eval()


def _audio(seed):
    """head_dim 64 like the real audio encoder (1280 / 20); the real 104-token windows (n_window 50, infer 800)."""
    torch.manual_seed(seed)
    cfg = Qwen3OmniMoeAudioEncoderConfig(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2,
                                         encoder_ffn_dim=64, d_model=128, output_dim=32, downsample_hidden_size=8)
    return Qwen3OmniMoeAudioEncoder(cfg).eval()


@pytest.fixture(autouse=True)
def _fresh_stats():
    enc.STATS.__init__()


@pytest.mark.parametrize("grid", [[[1, 4, 6], [2, 4, 4]], [[3, 2, 2]], [[1, 8, 8], [1, 2, 2], [1, 4, 2]]])
def test_vision_encoder_matches_stock(grid):
    model = _vision(0)
    grid = torch.tensor(grid)
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    x = torch.randn(n, 3 * 2 * 4 * 4)
    with torch.no_grad():
        stock = model(x, grid)
        with enc.patch_encoders(model):
            ours = model(x, grid)
    assert enc.STATS.calls == 2 and not enc.STATS.fallbacks       # one packed call per layer
    for a, b in zip((stock.last_hidden_state, stock.pooler_output), (ours.last_hidden_state, ours.pooler_output)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation != enc.ENCODER_ATTN_KEY          # restored


@pytest.mark.parametrize("lens", [[900, 350], [100], [1000, 30, 460]])
def test_audio_encoder_matches_stock(lens):
    model = _audio(1)
    feature_lens = torch.tensor(lens)
    x = torch.randn(16, int(feature_lens.sum()))
    with torch.no_grad():
        stock = model(x, feature_lens=feature_lens).last_hidden_state
        with enc.patch_encoders(model):
            ours = model(x, feature_lens=feature_lens).last_hidden_state
    assert enc.STATS.calls == 2 and not enc.STATS.fallbacks
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_bf16_vision_encoder_close_to_stock():
    model = _vision(2).to(torch.bfloat16)
    grid = torch.tensor([[2, 4, 4]])
    x = torch.randn(32, 3 * 2 * 4 * 4).to(torch.bfloat16)
    with torch.no_grad():
        stock = model(x, grid).last_hidden_state.float()
        with enc.patch_encoders(model):
            ours = model(x, grid).last_hidden_state.float()
    rel = (ours - stock).norm() / stock.norm()
    assert rel < 2e-2


def test_grad_falls_back_to_per_window_sdpa():
    model = _vision(3)
    grid = torch.tensor([[1, 4, 4], [1, 2, 2]])
    x = torch.randn(20, 3 * 2 * 4 * 4, requires_grad=True)
    stock = model(x, grid).last_hidden_state
    with enc.patch_encoders(model):
        ours = model(x, grid).last_hidden_state
    assert enc.STATS.calls == 0 and sum(enc.STATS.fallbacks.values()) == 2
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    ours.sum().backward()                      # the fallback keeps autograd working
    assert x.grad is not None


def test_patch_refuses_a_model_without_encoders():
    with pytest.raises(TypeError, match="no Qwen3-Omni encoder attention"):
        enc.patch_encoders(torch.nn.Linear(2, 2))


def test_patch_covers_a_bare_encoder_and_reports_it():
    """`patch()` (family "encoders") on an encoder alone: its own counters, the same output as stock."""
    from integration.transformers import patch
    model = _vision(4)
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    x = torch.randn(32, 3 * 2 * 4 * 4)
    with torch.no_grad():
        stock = model(x, grid).last_hidden_state
        with patch(model) as handle:
            ours = model(x, grid).last_hidden_state
    assert handle.family_calls() == {"encoders": {"flash_attention_varlen": 2}}, handle.report()
    assert not handle.fallbacks() and enc.STATS.calls == 0           # counted on the handle, not module-wide
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation != enc.ENCODER_ATTN_KEY


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_stays_in_its_image(bad):
    """A NaN / Inf in one image's pixels never reaches another image of the same packed call (stock keeps them
    apart too: per-window attention, per-token MLP, per-image merger)."""
    from integration.transformers import patch
    model = _vision(5)
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    x = torch.randn(40, 3 * 2 * 4 * 4)
    x[20, 7] = bad                                              # a patch of the second image
    with torch.no_grad():
        stock = model(x, grid).last_hidden_state
        with patch(model, kernels=("encoders",)) as handle:
            ours = model(x, grid).last_hidden_state
    assert handle.calls() == {"flash_attention_varlen": 2} and not handle.fallbacks(), handle.report()
    first = 16 // 4                                             # merged tokens of the first image
    assert torch.isfinite(ours[:first]).all()
    torch.testing.assert_close(ours[:first], stock[:first], rtol=1e-4, atol=1e-5)
    assert not torch.isfinite(stock[first:]).all() and not torch.isfinite(ours[first:]).all()


def test_refused_launch_is_recorded_and_runs_stock_per_window(monkeypatch):
    """A KernelInputError from the wrapper: counted under hook "encoders" with the kernel's message, and the
    encoder computes what stock computes (sdpa per window); nothing raises mid-model."""
    import nki_kernels.attention.varlen as varlen
    from integration.transformers import patch
    from nki_kernels.validation import KernelInputError

    def refuse(q, *a, **kw):
        raise KernelInputError(f"flash_attention_varlen: refused by the test, got q={tuple(q.shape)}")
    monkeypatch.setattr(varlen, "flash_attention_varlen", refuse)
    model = _vision(6)
    grid = torch.tensor([[1, 4, 4], [1, 2, 2]])
    x = torch.randn(20, 3 * 2 * 4 * 4)
    with torch.no_grad():
        stock = model(x, grid).last_hidden_state
        with patch(model) as handle:
            ours = model(x, grid).last_hidden_state
    assert handle.calls() == {}
    falls = handle.fallbacks()
    assert sum(falls.values()) == 2 and all(h == "encoders" and "kernel refused: flash_attention_varlen: refused"
                                            in why for h, why in falls), falls
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def _real_width_vision():
    """Qwen3-Omni's vision encoder config as released (hidden 1152, 16 heads of head_dim 72, patch 16), one block
    with a small MLP."""
    torch.manual_seed(7)
    return Qwen3OmniMoeVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(
        depth=1, intermediate_size=64, out_hidden_size=32, deepstack_visual_indexes=[])).eval()


def _real_width_audio():
    """The released audio encoder widths (d_model 1280, 20 heads of head_dim 64, 128 mel bins, 104-token windows),
    one layer with a small FFN."""
    torch.manual_seed(8)
    return Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(
        num_mel_bins=128, encoder_layers=1, encoder_ffn_dim=64, output_dim=32, downsample_hidden_size=8)).eval()


def _patched_vs_stock(model, *args, **kw):
    from integration.transformers import patch
    with torch.no_grad():
        stock = model(*args, **kw).last_hidden_state
        with patch(model) as handle:
            ours = model(*args, **kw).last_hidden_state
    assert handle.family_calls() == {"encoders": {"flash_attention_varlen": 1}}, handle.report()
    assert not handle.fallbacks(), handle.report()
    return stock, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_width_encoders_through_patch(dtype):
    """The released encoders' widths and head counts (vision 16 x 72, audio 20 x 64) on a few windows."""
    vision, audio = _real_width_vision().to(dtype), _real_width_audio().to(dtype)
    grid = torch.tensor([[1, 8, 8], [2, 4, 4]])
    outs = [_patched_vs_stock(vision, torch.randn(96, 3 * 2 * 16 * 16).to(dtype), grid),
            _patched_vs_stock(audio, torch.randn(128, 1030).to(dtype), feature_lens=torch.tensor([900, 130]))]
    for stock, ours in outs:
        if dtype == torch.float32:
            torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
        else:
            assert float((ours.float() - stock.float()).norm() / stock.float().norm()) < 2e-2


@pytest.mark.slow
def test_real_size_inputs_through_patch():
    """A 448 x 448 image plus a 384 x 256 one (976 patches) and 30 s + 4.7 s of audio (3000 + 470 mel frames, 451
    tokens): one launch per layer each, equal to stock (about 45 s on the emulator)."""
    grid = torch.tensor([[1, 28, 28], [1, 24, 16]])
    n = int(grid.prod(-1).sum())
    stock, ours = _patched_vs_stock(_real_width_vision(), torch.randn(n, 3 * 2 * 16 * 16), grid)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    stock, ours = _patched_vs_stock(_real_width_audio(), torch.randn(128, 3470), feature_lens=torch.tensor([3000, 470]))
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_missing_varlen_kernel_leaves_the_encoders_alone(monkeypatch):
    """flash_attention_varlen not importable: "encoders" is reported not available and the configs keep their
    implementation (the stock per-window path runs)."""
    from integration.transformers import _common, patch
    real_get = _common.Kernels.get

    def get(self, name):
        if name == "flash_attention_varlen":
            self.missing[name] = "flash_attention_varlen removed for this test"
            return None
        return real_get(self, name)
    monkeypatch.setattr(_common.Kernels, "get", get)
    model = _vision(9)
    grid = torch.tensor([[1, 4, 4]])
    x = torch.randn(16, 3 * 2 * 4 * 4)
    impl = model.config._attn_implementation
    with torch.no_grad():
        stock = model(x, grid).last_hidden_state
        with patch(model) as handle:
            assert model.config._attn_implementation == impl
            ours = model(x, grid).last_hidden_state
    assert handle.not_available == {"encoders": "flash_attention_varlen removed for this test"}
    assert "encoders: not available (flash_attention_varlen removed" in handle.report()
    assert handle.calls() == {} and torch.equal(ours, stock)
