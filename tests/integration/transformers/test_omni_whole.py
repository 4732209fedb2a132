"""The whole Qwen3-Omni model (Qwen3OmniMoeForConditionalGeneration: thinker with vision and audio encoders,
talker, code predictor, code2wav) patched at once by `patch(model)`: the speech-generating `generate` path with
image and audio inputs yields the same thinker text tokens, talker codec codes and waveform as the stock model,
and every family's kernels ran (encoders, attention, MoE, code predictor) with no fallback.

Greedy decoding everywhere (thinker and talker; the talker's code predictor follows the talker's `do_sample`).
The thinker, talker and encoders run fp32 kernels; the code-predictor kernel runs in bf16 with fp32 accumulation,
so where the fp32 stock model's choice is a near-tie (top-2 score gap below bf16 resolution) the patched model may
legitimately pick the other code, and everything generated after it may differ. The test therefore records the
stock run's score gap of every greedy choice, in the order they are made (thinker tokens; then per codec frame
the talker's code 0 and the predictor's codes 1..G-1), and requires identical outputs up to the first near-tie:
the whole run (text, every code, the waveform) when there is none, as in the second case. Each case also checks
its own precondition (the thinker has no near-tie, at least 3 frames are compared), so a pass is not luck."""
import pytest
import torch

from integration.transformers import encoder_attention, patch, tiny

pytestmark = [pytest.mark.needs_torch, pytest.mark.needs_transformers]

# Top-2 score gaps below which a greedy choice counts as a near-tie. fp32 kernels (thinker, talker): their
# outputs differ from torch's by ~1e-6 relative on these models, 1e-3 is far above that. The bf16 code-predictor
# kernel: the bound of test_hf_talker.py (flips seen at gaps <= 0.006 on these tiny models, none at >= 0.01).
_FP32_MARGIN = 1e-3
_BF16_MARGIN = 0.02

_GENERATE = dict(thinker_max_new_tokens=5, thinker_eos_token_id=tiny.OMNI_TOKENS["im_end"], thinker_do_sample=False,
                 talker_max_new_tokens=7, talker_do_sample=False, speaker="Ethan")

_CASES = {   # name -> (model seed, prompts: omni_inputs kwargs each); the second has no near-tie (full equality)
    "image+audio": (2, [dict(seed=0)]),
    "two images, two clips": (1, [dict(seed=2, image_grids=((1, 4, 6), (1, 2, 4)), audio_frames=(250, 120))]),
    "batch of 2, left-padded": (2, [dict(seed=0), dict(seed=10, image_grids=((1, 2, 4),), audio_frames=(120,))]),
}


def _inputs(prompts):
    return tiny.omni_inputs(**prompts[0]) if len(prompts) == 1 else tiny.omni_batch(*prompts)


def _gaps(scores):
    """Top-2 gap of every step of a generate() `scores` tuple ([B, V] per step) -> [steps], the smallest over the
    batch (a near-tie in any row counts for every row: rows share their later frames' compare mask)."""
    top2 = torch.stack(scores, 1).float().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min(dim=0).values


def _spy(obj, name, wrapper):
    """Instance-level wrapper of obj.<name>; returns the undo."""
    setattr(obj, name, wrapper(getattr(obj, name)))
    return lambda: delattr(obj, name)


def _run(model, inputs, gaps=None):
    """model.generate(...) -> (text tokens [1, T], codec codes [1, G, frames], waveform). With `gaps` (a dict) also
    records the stock run's greedy score gaps: "thinker" [new tokens], "talker" [steps], "code_predictor" (one
    [G-1] tensor per frame)."""
    codes = []
    undo = [_spy(model.code2wav, "chunked_decode",
                 lambda stock: lambda c, **kw: (codes.append(c.clone()), stock(c, **kw))[1])]
    if gaps is not None:
        def scored(key):
            def wrap(stock):
                def run(*a, **kw):
                    res = stock(*a, **{**kw, "output_scores": True, "return_dict_in_generate": True})
                    gaps.setdefault(key, []).append(_gaps(res.scores))
                    return res
                return run
            return wrap
        undo += [_spy(model.thinker, "generate", scored("thinker")), _spy(model.talker, "generate", scored("talker")),
                 _spy(model.talker.code_predictor, "generate", scored("code_predictor"))]
    try:
        with torch.no_grad():
            text, wav = model.generate(**inputs, **_GENERATE)
    finally:
        for u in reversed(undo):
            u()
    assert len(codes) == 1
    return text, codes[0], (torch.cat(wav) if isinstance(wav, list) else wav)


def _safe_codes(gaps, frames):
    """[G, frames] bool: the codes chosen before the stock run's first near-tie (chronological order: frame by
    frame, code 0 by the talker then codes 1..G-1 by the predictor)."""
    per_frame = torch.stack([torch.cat([gaps["talker"][0][f:f + 1] > _FP32_MARGIN,
                                        gaps["code_predictor"][f] > _BF16_MARGIN]) for f in range(frames)])
    return per_frame.flatten().cumprod(0).bool().view(frames, -1).T


@pytest.fixture(scope="module", params=list(_CASES))
def stock_case(request):
    seed, prompts = _CASES[request.param]
    model = tiny.qwen3_omni_moe(seed=seed)
    inputs = _inputs(prompts)
    gaps = {}
    stock = _run(model, inputs, gaps)
    return model, inputs, stock, gaps


@pytest.mark.parametrize("backend", ["emulator", "reference"])
def test_whole_omni_generate_matches_stock(stock_case, backend):
    model, inputs, (text0, codes0, wav0), gaps = stock_case
    frames = codes0.shape[2]
    safe = _safe_codes(gaps, frames)
    # preconditions: a real run (new text, several frames), no near-tie in the thinker, >= 3 frames compared
    assert text0.shape[1] > inputs["input_ids"].shape[1] + 1 and codes0.shape[1] == 8 and frames >= 4
    assert bool((gaps["thinker"][0] > _FP32_MARGIN).all()), gaps["thinker"]
    assert bool(safe[:, :3].all()), safe
    encoder_cfgs = [model.config.thinker_config.vision_config, model.config.thinker_config.audio_config]
    impls = [c._attn_implementation for c in encoder_cfgs]

    with patch(model, backend=backend) as handle:
        assert [c._attn_implementation for c in encoder_cfgs] == [encoder_attention.ENCODER_ATTN_KEY] * 2
        text1, codes1, wav1 = _run(model, inputs)

    assert torch.equal(text1, text0), (text0, text1, handle.report())
    if safe.all():
        assert torch.equal(codes1, codes0) and torch.equal(wav1, wav0), (codes0, codes1)   # code2wav: stock
    else:
        n = min(frames, codes1.shape[2])
        for b in range(codes0.shape[0]):
            assert torch.equal(codes1[b, :, :n][safe[:, :n]], codes0[b, :, :n][safe[:, :n]]), (codes0, codes1, safe)
    fam = handle.family_calls()
    # one packed launch per encoder layer (2 vision blocks, 2 audio layers) whatever the number of images / clips
    assert fam.get("encoders") == {"flash_attention_varlen": 4}, handle.report()
    assert fam["code_predictor"] == {"code_predictor": codes1.shape[2]}, handle.report()   # one launch per frame
    attn, moe = fam["attention"], fam["moe"]
    # thinker (2 layers) and talker (2) prefill with flash_attention, every later step decodes (the predictor's
    # attention is inside its own kernel)
    assert attn.get("flash_attention", 0) == 4 and attn.get("flash_attention_decode", 0) > 0, handle.report()
    assert moe.get("moe_blockwise", 0) > 0 and moe.get("moe_decode", 0) > 0, handle.report()
    assert not handle.fallbacks(), handle.report()
    assert "fallbacks: none" in handle.report() and "encoders: flash_attention_varlen=4" in handle.report()
    # restored
    assert [c._attn_implementation for c in encoder_cfgs] == impls
    assert "generate" not in vars(model.talker.code_predictor)


def test_encoders_only_and_patch_encoders_agree(stock_case):
    """kernels=("encoders",) patches the encoders alone; the older `patch_encoders` still works beside it."""
    model, inputs, (text0, codes0, _), _ = stock_case
    with patch(model, kernels=("encoders",)) as handle:
        text1, codes1, _ = _run(model, inputs)
    assert handle.family_calls() == {"encoders": {"flash_attention_varlen": 4}}, handle.report()
    assert torch.equal(text1, text0) and torch.equal(codes1, codes0)
    encoder_attention.STATS.__init__()
    with encoder_attention.patch_encoders(model):
        text2, codes2, _ = _run(model, inputs)
    assert encoder_attention.STATS.calls == 4 and not encoder_attention.STATS.fallbacks
    assert torch.equal(text2, text0) and torch.equal(codes2, codes0)


def test_thinker_multimodal_prefill_close_to_stock(stock_case):
    """The thinker's logits over the whole multimodal prompt (encoders' output spliced into the text model):
    a sharper check than greedy tokens that the patched encoders, attention and MoE compute what stock does."""
    model, inputs, _, _ = stock_case
    with torch.no_grad():
        ref = model.thinker(**inputs).logits
        with patch(model) as handle:
            got = model.thinker(**inputs).logits
    assert set(handle.family_calls()) == {"encoders", "attention", "moe"}, handle.report()
    assert not handle.fallbacks(), handle.report()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bf16_whole_omni_no_less_accurate_than_stock():
    """bf16: the whole model's thinker prefill over the multimodal prompt (encoders included), against its fp32
    twin, is as accurate patched as stock (a bf16 random model is itself far from fp32, so the bound is relative,
    as in test_hf_families.py), and its speech generate() runs end to end with every family's kernels."""
    from nki_kernels.testing import rel_rms_error
    seed, prompts = _CASES["image+audio"]
    m32 = tiny.qwen3_omni_moe(seed=seed)
    model = tiny.qwen3_omni_moe(seed=seed).to(torch.bfloat16)
    inputs = _inputs(prompts)
    inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        truth = m32.thinker(**inputs).logits
        ref = model.thinker(**inputs16).logits.float()
        with patch(model) as handle:
            got = model.thinker(**inputs16).logits.float()
            text, codes, wav = _run(model, inputs16)
    err_stock, err_patched = rel_rms_error(truth.numpy(), ref.numpy()), rel_rms_error(truth.numpy(), got.numpy())
    print(f"bf16 thinker logits vs fp32: stock {err_stock:.3e}, patched {err_patched:.3e}")
    assert err_patched <= 1.25 * err_stock + 1e-3, (err_patched, err_stock)
    assert set(handle.family_calls()) == {"encoders", "attention", "moe", "code_predictor"}, handle.report()
    assert not handle.fallbacks(), handle.report()
    assert codes.shape[1] == 8 and codes.shape[2] >= 1 and torch.isfinite(wav).all()
