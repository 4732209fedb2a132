"""Stand-in for vllm_neuron/model/registry.py: get_models() -> [(HF architecture name, class)].

As the plugin registers these models: whn09/vllm-neuron @3de9ea3 registers the Qwen3.5 factory classes of
``qwen3_5/factory.py`` (``vllm-project/vllm-neuron`` @5528be7 registers no Qwen3.5 at all); the Qwen3-MoE entry is
the factory of ``qwen3_moe/factory.py`` (vllm-project @b1873d6; in the package ``__init__`` here). Neither module
defines or imports the layer classes apply() patches."""
from fake_vllm_neuron.model.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from fake_vllm_neuron.model.qwen3_moe import Qwen3MoeForCausalLM


def get_models():
    return [("Qwen3_5ForConditionalGeneration", Qwen3_5ForConditionalGeneration),
            ("Qwen3_5MoeForConditionalGeneration", Qwen3_5MoeForConditionalGeneration),
            ("Qwen3MoeForCausalLM", Qwen3MoeForCausalLM)]
