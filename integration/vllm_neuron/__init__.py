"""nki-kernels inside the vLLM Neuron plugin (vllm-project/vllm-neuron): `apply()` / `restore()`.

Usage on a Trainium host with the plugin installed (see docs/integration.md)::

    from integration.vllm_neuron import apply
    inst = apply()                    # the plugin registry's Qwen3.5 / Qwen3-MoE classes, before the engine starts
    llm = vllm.LLM(model=..., ...)    # the plugin builds and torch.compiles the patched classes
    inst.restore()                    # everything back

Importing this package never imports vLLM or the plugin; ``NKI_KERNELS_VLLM_DISABLE=1`` turns every installed
replacement back into the plugin's own code at call time.
"""
from __future__ import annotations

from ._common import DISABLE_ENV, VllmNeuronAdapterError, fallbacks
from .apply import FAMILIES, PLUGIN_COMMITS, TARGETS, Installation, apply

__all__ = ["apply", "Installation", "VllmNeuronAdapterError", "FAMILIES", "TARGETS", "PLUGIN_COMMITS",
           "DISABLE_ENV", "fallbacks"]
