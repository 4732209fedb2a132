"""weights_from_transformers on a tiny real transformers code predictor: the float64 reference reproduces
transformers' own greedy `generate` (codes and per-step input embeddings), and the kernel runs on the result."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _tiny_model(seed):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerCodePredictorConfig)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration)
    torch.manual_seed(seed)
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(vocab_size=128, hidden_size=128, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=32, num_code_groups=6, rope_parameters={
                                                    "rope_type": "default", "rope_theta": 10000.0})
    model = Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5) * (4.0 if "lm_head" in name else 1.0))
            if "codec_embedding" in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_reproduces_transformers_generate(seed):
    from nki_kernels.codepredictor import code_predictor, weights_from_transformers
    from nki_kernels.codepredictor.reference import code_predictor_reference
    model = _tiny_model(seed)
    B, H = 3, 128
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, 2, H, generator=g)
    G1 = model.config.num_code_groups - 1
    with torch.no_grad():
        res = model.generate(inputs_embeds=embeds, max_new_tokens=G1, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
    hf_codes = res.sequences[:, -G1:].numpy()
    w32 = weights_from_transformers(model, dtype="float32")
    codes, emb = code_predictor_reference(embeds[:, 0].numpy(), embeds[:, 1].numpy(), w32)
    np.testing.assert_array_equal(codes, hf_codes)
    # transformers' hidden_states[s][0] (s >= 1) is the input embedding of step s = codec_embedding[s-1](code s)
    for s in range(1, G1):
        np.testing.assert_allclose(res.hidden_states[s][0][:, 0].numpy(), emb[:, s - 1], rtol=1e-6, atol=1e-6)
    # the kernel on the bf16 container: codes agree with the float64 reference up to bf16 near-ties
    wbf = weights_from_transformers(model)
    kc, _ = code_predictor(embeds[:, 0].numpy(), embeds[:, 1].numpy(), wbf)
    assert np.mean(np.asarray(kc) == hf_codes) >= 0.8
