"""Tiny random-weight models of the supported families, built from configs (no download), for tests and the demo.

Sizes follow shared/reference/transformers.md section 7, scaled to the kernels' tiling: a few layers, hidden 128
(the MoE and code-predictor kernels tile H by 128), one full-attention layer with head_dim 256 and 4q/2kv heads
(as in the real Qwen3.5 / Qwen3-Next layers), GDN Hk=2 Hv=4 Dk=Dv=32, 8 experts top-2 with a shared expert.
`initializer_range` is 0.05 (2.5x the default) so random logits are spread out (greedy near-ties between patched
and stock would otherwise be likely) without making the bf16 models chaotic.
"""
from __future__ import annotations

import math

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


# Token ids of the whole Omni model (thinker vocab 96): chat markup, TTS markers and the multimodal placeholders
OMNI_TOKENS = dict(im_start=80, im_end=81, user=82, assistant=83, system=84, tts_pad=85, tts_bos=86, tts_eos=87,
                   audio=88, image=89, video=90, audio_start=91, audio_end=92, vision_start=93, vision_end=94,
                   newline=10)
# Talker codec vocabulary: generate() suppresses the top 1024 ids except codec EOS, so 64 ids stay speakable
# (code group 0); the codec specials sit in the suppressed range as in the real model.
_TALKER_VOCAB = 1024 + 64
OMNI_CODEC = dict(eos=1087, pad=1070, bos=1071, nothink=1072, think_bos=1073, think_eos=1074, speaker=1075)


def qwen3_omni_moe(seed: int = 0, num_code_groups: int = 8):
    """The whole Qwen3OmniMoeForConditionalGeneration: thinker (2-layer MoE text model, head_dim 32, with a 2-block
    vision encoder of head_dim 72 and a 2-layer audio encoder of head_dim 64, the real encoders' head dims),
    talker (2 MoE layers with a shared expert, codec vocabulary 1088), code predictor (2 layers, G code groups)
    and a 1-layer code2wav, with the chat / TTS / multimodal token ids of OMNI_TOKENS and OMNI_CODEC. fp32."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration
    t, c = OMNI_TOKENS, OMNI_CODEC
    mm_ids = dict(audio_token_id=t["audio"], image_token_id=t["image"], video_token_id=t["video"],
                  audio_start_token_id=t["audio_start"], vision_start_token_id=t["vision_start"])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6], "interleaved": True}
    text = _common(head_dim=32, eos_token_id=t["im_end"])
    text.update(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                intermediate_size=96, norm_topk_prob=True, rope_parameters=rope)
    thinker = dict(text_config=text, **mm_ids, user_token_id=t["user"], initializer_range=_INIT_RANGE,
                   audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2,
                                     encoder_ffn_dim=64, d_model=128, output_dim=128, downsample_hidden_size=8,
                                     n_window=50, n_window_infer=100),
                   vision_config=dict(depth=2, hidden_size=144, intermediate_size=64, num_heads=2, patch_size=4,
                                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                                      num_position_embeddings=64, deepstack_visual_indexes=[0]))
    talker_text = _common(head_dim=32, vocab_size=_TALKER_VOCAB, pad_token_id=c["pad"], bos_token_id=c["bos"],
                          eos_token_id=c["eos"])
    talker_text.update(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       intermediate_size=128, norm_topk_prob=False, rope_parameters=rope)
    cp = _common(head_dim=32, vocab_size=16)
    cp.update(num_hidden_layers=2, intermediate_size=128, num_code_groups=num_code_groups,
              layer_types=["full_attention"] * 2)
    talker = dict(text_config=talker_text, code_predictor_config=cp, num_code_groups=num_code_groups,
                  thinker_hidden_size=128, accept_hidden_layer=1, codec_eos_token_id=c["eos"],
                  codec_nothink_id=c["nothink"], codec_think_bos_id=c["think_bos"], codec_think_eos_id=c["think_eos"],
                  codec_pad_id=c["pad"], codec_bos_id=c["bos"], speaker_id={"ethan": c["speaker"]},
                  position_id_per_seconds=25, **mm_ids, initializer_range=_INIT_RANGE)
    code2wav = dict(codebook_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64, num_hidden_layers=1, num_quantizers=num_code_groups, sliding_window=8,
                    upsample_rates=[2, 2], upsampling_ratios=[2], decoder_dim=32, max_position_embeddings=256)
    cfg = Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                             im_start_token_id=t["im_start"], im_end_token_id=t["im_end"],
                             tts_pad_token_id=t["tts_pad"], tts_bos_token_id=t["tts_bos"],
                             tts_eos_token_id=t["tts_eos"], system_token_id=t["system"], user_token_id=t["user"],
                             assistant_token_id=t["assistant"])
    cfg.thinker_config.text_config.shared_expert_intermediate_size = 32    # not declared, never read (thinker)
    cfg.talker_config.text_config.shared_expert_intermediate_size = 32     # read by the talker's MoE block (P8)
    cfg.talker_config.spatial_merge_size = 2                                # read in __init__, not declared (P8)
    # the talker's get_rope_index (shared with the thinker) reads config.audio_config.n_window when the prompt
    # holds audio; the talker config declares no audio_config (P8): hand it the thinker's
    cfg.talker_config.audio_config = cfg.thinker_config.audio_config
    return _finish(Qwen3OmniMoeForConditionalGeneration(cfg), seed)


def omni_inputs(seed: int = 0, image_grids=((1, 4, 6),), audio_frames=(250,), text_len=3):
    """generate() kwargs for `qwen3_omni_moe`: one user turn with audio clips (`audio_frames` mel frames each),
    images (`image_grids`, [t, h, w] patches each) and a few text tokens, then the assistant header. Returns a
    dict: input_ids [1, T], attention_mask, pixel_values [patches, 96], image_grid_thw [images, 3],
    input_features [clips, 16, max frames], feature_attention_mask [clips, max frames]."""
    import torch
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
    t = OMNI_TOKENS
    g = torch.Generator().manual_seed(seed)
    ids = [t["im_start"], t["user"], t["newline"]]
    for n in audio_frames:
        n_audio = int(_get_feat_extract_output_lengths(torch.tensor(n), 50))     # audio n_window 50
        ids += [t["audio_start"]] + [t["audio"]] * n_audio + [t["audio_end"]]
    for grid in image_grids:
        ids += [t["vision_start"]] + [t["image"]] * (math.prod(grid) // 4) + [t["vision_end"]]   # merge 2x2
    ids += torch.randint(2, 64, (text_len,), generator=g).tolist()
    ids += [t["im_end"], t["newline"], t["im_start"], t["assistant"], t["newline"]]
    input_ids = torch.tensor([ids])
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if image_grids:
        n_patches = sum(math.prod(grid) for grid in image_grids)
        out.update(pixel_values=torch.randn(n_patches, 3 * 2 * 4 * 4, generator=g),
                   image_grid_thw=torch.tensor([list(grid) for grid in image_grids]))
    if audio_frames:
        mask = torch.zeros(len(audio_frames), max(audio_frames), dtype=torch.long)
        for i, n in enumerate(audio_frames):
            mask[i, :n] = 1
        out.update(input_features=torch.randn(len(audio_frames), 16, max(audio_frames), generator=g) * mask[:, None],
                   feature_attention_mask=mask)
    return out



def omni_batch(*prompts):
    """Several `omni_inputs(**kw)` prompts as one left-padded batch (how generate() batches chat prompts): input_ids
    and attention_mask [B, Tmax], the images' patches and grids concatenated in prompt order, the audio clips'
    mel features padded to the longest clip with their feature_attention_mask."""
    import torch
    parts = [omni_inputs(**kw) for kw in prompts]
    t_max = max(p["input_ids"].shape[1] for p in parts)
    ids = torch.zeros(len(parts), t_max, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(parts):
        n = p["input_ids"].shape[1]
        ids[b, t_max - n:] = p["input_ids"][0]
        mask[b, t_max - n:] = 1
    out = dict(input_ids=ids, attention_mask=mask)
    with_images = [p for p in parts if "pixel_values" in p]
    if with_images:
        out.update(pixel_values=torch.cat([p["pixel_values"] for p in with_images]),
                   image_grid_thw=torch.cat([p["image_grid_thw"] for p in with_images]))
    clips = [(p["input_features"][i], p["feature_attention_mask"][i]) for p in parts if "input_features" in p
             for i in range(p["input_features"].shape[0])]
    if clips:
        f_max = max(m.shape[0] for _, m in clips)
        feats = torch.zeros(len(clips), clips[0][0].shape[0], f_max)
        fmask = torch.zeros(len(clips), f_max, dtype=torch.long)
        for i, (f, m) in enumerate(clips):
            feats[i, :, :f.shape[1]] = f
            fmask[i, :m.shape[0]] = m
        out.update(input_features=feats, feature_attention_mask=fmask)
    return out


BUILDERS = {"qwen3_5_moe": qwen3_5_moe, "qwen3_5_moe_vlm": qwen3_5_moe_vlm, "qwen3_5": qwen3_5,
            "qwen3_next": qwen3_next, "qwen3_omni_moe_thinker": qwen3_omni_moe_thinker,
            "qwen3_omni_moe_thinker_lm": qwen3_omni_moe_thinker_lm,
            "qwen3_omni_moe_talker": qwen3_omni_moe_talker, "qwen3_omni_moe": qwen3_omni_moe}


def build(family: str, seed: int = 0, **kw):
    return BUILDERS[family](seed=seed, **kw)
