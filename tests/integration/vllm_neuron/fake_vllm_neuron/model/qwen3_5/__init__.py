"""Stand-in for vllm_neuron/model/qwen3_5/__init__.py (whn09/vllm-neuron @3de9ea3): exports the factory classes."""
from .factory import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

__all__ = ["Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"]
