"""vllm_neuron/model/registry.py: get_models() -> [(HF architecture name, class)]."""
from fake_vllm_neuron.model.qwen3_5.model import Qwen3_5ForCausalLM
from fake_vllm_neuron.model.qwen3_moe.model_bf16 import Qwen3MoeForCausalLM


def get_models():
    return [("Qwen3_5MoeForCausalLM", Qwen3_5ForCausalLM), ("Qwen3MoeForCausalLM", Qwen3MoeForCausalLM)]
