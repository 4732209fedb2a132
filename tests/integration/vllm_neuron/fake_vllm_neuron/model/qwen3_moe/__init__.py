"""Stand-in for vllm_neuron/model/qwen3_moe/factory.py (vllm-project/vllm-neuron @b1873d6): Qwen3MoeForCausalLM, a
factory that builds the model of ``.model_bf16``. The plugin's package ``__init__`` imports ``model_bf16`` eagerly
(``from . import model_bf16``); this stand-in imports it only when the factory builds the model, the stricter case
for apply(), which must then import the modeling module itself. (The factory sits here because the test tree needs
unique file names and ``qwen3_5/factory.py`` has that one.)"""
from __future__ import annotations

import torch.nn as nn


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, hf_config, neuron_config=None):
        super().__init__()
        from .model_bf16 import Qwen3MoeForCausalLM as Model
        self._model = Model(hf_config)

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)


__all__ = ["Qwen3MoeForCausalLM"]
