"""Stand-in for vllm_neuron/model/qwen3_5/factory.py (whn09/vllm-neuron @3de9ea3): the classes the registry holds
for the checkpoints' architecture names. They import the modeling module (``.model``) only when the engine builds
the model, so the registry itself never reaches the layer classes."""
from __future__ import annotations

import torch.nn as nn


class Qwen3_5ForConditionalGeneration(nn.Module):
    """Builds the text decoder (the plugin also has a vision-language variant, not faked here)."""

    def __init__(self, hf_config, text_neuron_config=None, vision_neuron_config=None):
        super().__init__()
        self._model = self._select_implementation(hf_config, text_neuron_config, vision_neuron_config)

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    @classmethod
    def _select_implementation(cls, hf_config, text_neuron_config, vision_neuron_config):
        from .model import Qwen3_5ForCausalLM               # imported here, as the plugin does
        return Qwen3_5ForCausalLM(hf_config)


class Qwen3_5MoeForConditionalGeneration(Qwen3_5ForConditionalGeneration):
    """The sparse checkpoints' architecture name; same decoder (the MoE block is chosen from the config)."""
