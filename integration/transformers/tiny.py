"""Tiny random-weight models of the supported families, built from configs (no download), for tests and the demo.

Sizes follow shared/reference/transformers.md section 7, scaled to the kernels' tiling: a few layers, hidden 128
(the MoE and code-predictor kernels tile H by 128), one full-attention layer with head_dim 256 and 4q/2kv heads
(as in the real Qwen3.5 / Qwen3-Next layers), GDN Hk=2 Hv=4 Dk=Dv=32, 8 experts top-2 with a shared expert.
`initializer_range` is 0.05 (2.5x the default) so random logits are spread out (greedy near-ties between patched
and stock would otherwise be likely) without making the bf16 models chaotic.
"""
from __future__ import annotations

FAMILIES = ("qwen3_5_moe", "qwen3_5", "qwen3_next", "qwen3_omni_moe_thinker", "qwen3_omni_moe_talker")

_VOCAB = 96
_INIT_RANGE = 0.05


def _common(**over):
    cfg = dict(vocab_size=_VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
               initializer_range=_INIT_RANGE, rms_norm_eps=1e-6, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cfg.update(over)
    return cfg


def _gdn(**over):
    cfg = dict(num_hidden_layers=4,
               layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
               linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
               linear_num_key_heads=2, linear_num_value_heads=4)
    cfg.update(over)
    return cfg


def _moe(**over):
    cfg = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    cfg.update(over)
    return cfg


def _finish(model, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("dt_bias"):
                continue
            if p.dim() == 1:     # norms (zero-centred or not): small noise around their init
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(_INIT_RANGE * torch.randn(p.shape, generator=g))
    return model.eval()


def qwen3_5_moe(seed: int = 0, num_hidden_layers: int = 4):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig
    cfg = Qwen3_5MoeTextConfig(**_common(), **_gdn(num_hidden_layers=num_hidden_layers,
                                                   layer_types=_layer_types(num_hidden_layers)), **_moe())
    return _finish(Qwen3_5MoeForCausalLM(cfg), seed)


def qwen3_5_moe_vlm(seed: int = 0):
    """Qwen3_5MoeForConditionalGeneration (text + a 1-block vision tower); only the text tower is patched."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    cfg = Qwen3_5MoeConfig(text_config=dict(_common(), **_gdn(), **_moe()),
                           vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                                              temporal_patch_size=2))
    return _finish(Qwen3_5MoeForConditionalGeneration(cfg), seed)


def qwen3_5(seed: int = 0, num_hidden_layers: int = 4):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    cfg = Qwen3_5TextConfig(**_common(), **_gdn(num_hidden_layers=num_hidden_layers,
                                                layer_types=_layer_types(num_hidden_layers)), intermediate_size=96)
    return _finish(Qwen3_5ForCausalLM(cfg), seed)


def qwen3_next(seed: int = 0, num_hidden_layers: int = 4):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    cfg = Qwen3NextConfig(**_common(), **_gdn(num_hidden_layers=num_hidden_layers,
                                              layer_types=_layer_types(num_hidden_layers)),
                          **_moe(), intermediate_size=96, norm_topk_prob=True, decoder_sparse_step=1)
    return _finish(Qwen3NextForCausalLM(cfg), seed)


def _layer_types(n):
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


def qwen3_omni_moe_thinker(seed: int = 0, num_hidden_layers: int = 2):
    """The Omni thinker's text model (Qwen3OmniMoeThinkerTextModel): plain attention (head_dim 32 here) + MoE
    without a shared expert. It has no LM head; compare its last hidden state."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel
    cfg = Qwen3OmniMoeTextConfig(**_common(head_dim=32), num_hidden_layers=num_hidden_layers, num_experts=8,
                                 num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                                 norm_topk_prob=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 6, 6], "interleaved": True})
    return _finish(Qwen3OmniMoeThinkerTextModel(cfg), seed)


def qwen3_omni_moe_thinker_lm(seed: int = 0):
    """Qwen3OmniMoeThinkerForConditionalGeneration (text model + LM head, with 1-layer audio and vision towers
    that text-only inputs never touch), for generate()."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerForConditionalGeneration)
    text = qwen3_omni_moe_thinker(seed=seed).config.to_dict()
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                          output_dim=text["hidden_size"], n_window=4, n_window_infer=8, downsample_hidden_size=16),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, deepstack_visual_indexes=[]))
    cfg.vision_start_token_id = _VOCAB - 1          # read by get_rope_index, not declared
    return _finish(Qwen3OmniMoeThinkerForConditionalGeneration(cfg), seed)


def qwen3_omni_moe_talker(seed: int = 0, num_code_groups: int = 8):
    """The Omni talker (2 MoE layers with a shared expert) and its code predictor (2 layers, G code groups).
    Hidden 128 and intermediate 128: the code-predictor kernel tiles H and I by 128 (nki_kernels.code_predictor)."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerCodePredictorConfig, Qwen3OmniMoeTalkerConfig, Qwen3OmniMoeTalkerTextConfig)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerForConditionalGeneration)
    hidden = 128
    text = Qwen3OmniMoeTalkerTextConfig(**_common(head_dim=32, hidden_size=hidden), num_hidden_layers=2,
                                        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        intermediate_size=128, norm_topk_prob=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [4, 6, 6], "interleaved": True})
    cp = Qwen3OmniMoeTalkerCodePredictorConfig(**_common(head_dim=32, vocab_size=16, hidden_size=hidden),
                                               num_hidden_layers=2, intermediate_size=128,
                                               num_code_groups=num_code_groups, layer_types=["full_attention"] * 2)
    cfg = Qwen3OmniMoeTalkerConfig(text_config=text.to_dict(), code_predictor_config=cp.to_dict(),
                                   num_code_groups=num_code_groups, thinker_hidden_size=hidden)
    cfg.text_config.shared_expert_intermediate_size = 32   # read by the talker's MoE block, not declared (P8)
    cfg.spatial_merge_size = 2                              # read in __init__, not declared (P8)
    return _finish(Qwen3OmniMoeTalkerForConditionalGeneration(cfg), seed)


BUILDERS = {"qwen3_5_moe": qwen3_5_moe, "qwen3_5_moe_vlm": qwen3_5_moe_vlm, "qwen3_5": qwen3_5,
            "qwen3_next": qwen3_next, "qwen3_omni_moe_thinker": qwen3_omni_moe_thinker,
            "qwen3_omni_moe_thinker_lm": qwen3_omni_moe_thinker_lm,
            "qwen3_omni_moe_talker": qwen3_omni_moe_talker}


def build(family: str, seed: int = 0, **kw):
    return BUILDERS[family](seed=seed, **kw)
