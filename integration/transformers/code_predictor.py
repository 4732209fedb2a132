"""Qwen3-Omni talker hook: `talker.code_predictor.generate` replaced by one unrolled code-predictor launch.

Once per talker frame, `Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation` calls
``code_predictor.generate(inputs_embeds=[B,2,H], max_new_tokens=G-1, output_hidden_states=True,
return_dict_in_generate=True, do_sample=..., [top_k=50, top_p=0.8])`` and reads back ``.sequences [B,G-1]`` and
``.hidden_states[s][0]`` (s = 1..G-2, the input embedding of step s); see shared/reference/transformers.md
section 6. The hook is an instance attribute, so restoring is deleting it.

Greedy decoding runs our kernel (`nki_kernels.code_predictor`): the 2-position prompt (talker hidden, code-0
embedding) and the predictor weights in, the G-1 codes and their per-step input embeddings out. Sampling
(the talker's default) and any call that is not this exact per-frame call run the stock `generate`, because
torch's sampling RNG stream cannot be reproduced by a kernel that takes its own uniforms.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

from ._common import kernel_input, kernel_refusals, refusal_reason, to_torch

# names under which the code-predictor family exposes its transformers weight builder
_WEIGHT_BUILDERS = ("weights_from_transformers", "code_predictor_weights_from_transformers",
                    "build_weights_from_transformers", "weights_from_hf", "from_transformers")
_BUILDER_MODULES = ("nki_kernels.codepredictor.weights", "nki_kernels.codepredictor.unrolled",
                    "nki_kernels.codepredictor", "nki_kernels.codepredictor.reference")


def find_weight_builder():
    for modname in _BUILDER_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in _WEIGHT_BUILDERS:
            fn = getattr(mod, name, None)
            if callable(fn):
                return fn
    return None


class CodePredictorHook:
    """Callable stored as `code_predictor.generate`; the stock bound method is kept in `self.stock`."""

    def __init__(self, kernels, stats, code_predictor):
        self.kernels = kernels
        self.stats = stats
        self.module = code_predictor
        self.stock = code_predictor.generate     # the bound GenerationMixin.generate (before patching)
        self._weights = None
        self._weights_key = None

    def weights(self):
        params = tuple((p.data_ptr(), p._version) for p in self.module.parameters())
        if self._weights is None or self._weights_key != params:
            builder = find_weight_builder()
            # the kernel runs the predictor network in bf16 with fp32 accumulation (its documented precision)
            self._weights = builder(self.module)
            self._weights_key = params
        return self._weights

    def unsupported(self, args, kwargs):
        if args:
            return "positional arguments"
        embeds = kwargs.get("inputs_embeds")
        G = self.module.config.num_code_groups
        if embeds is None or embeds.dim() != 3 or embeds.shape[1] != 2:
            return "not the 2-position per-frame prompt"
        if kwargs.get("max_new_tokens") != G - 1:
            return "max_new_tokens != num_code_groups - 1"
        if kwargs.get("do_sample", self.module.generation_config.do_sample):
            return "sampling (torch RNG stream)"
        extra = set(kwargs) - {"inputs_embeds", "max_new_tokens", "output_hidden_states", "return_dict_in_generate",
                               "do_sample", "top_k", "top_p", "attention_mask"}
        if extra:
            return f"generate kwargs {sorted(extra)}"
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            return "padded prompt"
        if find_weight_builder() is None:
            return "no weight builder in nki_kernels.codepredictor"
        return None

    def __call__(self, *args, **kwargs):
        why = self.unsupported(args, kwargs)
        if why is not None:
            self.stats.fell_back("code_predictor", why)
            return self.stock(*args, **kwargs)
        import torch
        embeds = kwargs["inputs_embeds"]
        be = self.kernels.backend
        fn = self.kernels.get("code_predictor")
        past_hidden, code0_embed = embeds[:, 0], embeds[:, 1]
        try:
            codes, codec_embeds = fn(kernel_input(past_hidden, be), kernel_input(code0_embed, be), self.weights())
        except kernel_refusals() as exc:
            self.stats.fell_back("code_predictor", refusal_reason(exc))
            return self.stock(*args, **kwargs)
        except ValueError as exc:     # a weight layout the builder does not support
            self.stats.fell_back("code_predictor", f"kernel refused: {exc}")
            return self.stock(*args, **kwargs)
        self.stats.called("code_predictor")
        codes = to_torch(codes).to(torch.long)
        codec_embeds = to_torch(codec_embeds)                    # [B, G-1, H]: table[j](code_{j+1})
        if codec_embeds.dtype != embeds.dtype:
            # the kernel returns the tables' rows in its weight dtype; the same rows in the model's dtype are a
            # lookup of the model's own tables (exact, so the talker's next input is what stock computes)
            tables = self.module.get_input_embeddings()
            codec_embeds = torch.stack([tables[j](codes[:, j]) for j in range(codes.shape[1])], dim=1)
        G1 = codes.shape[1]
        # hidden_states[0] is the prefill (the prompt embeddings); hidden_states[s][0], s >= 1, is step s's input
        hidden = [(embeds,)] + [(codec_embeds[:, s - 1:s],) for s in range(1, G1)]
        if not kwargs.get("return_dict_in_generate", False):
            return codes
        return SimpleNamespace(sequences=codes, hidden_states=tuple(hidden) if kwargs.get("output_hidden_states")
                               else None, scores=None, logits=None)
