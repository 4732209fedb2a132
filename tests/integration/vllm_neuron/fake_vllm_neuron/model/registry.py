"""Stand-in for vllm_neuron/model/registry.py: get_models() -> [(HF architecture name, class)].

whn09/vllm-neuron @3de9ea3 registers the Qwen3.5 factory classes of ``qwen3_5/factory.py`` (``vllm-project/
vllm-neuron`` @5528be7 registers no Qwen3.5 at all). The Qwen3-MoE entry is hypothetical: no stored upstream registry
(vllm-project @5528be7, whn09 @3de9ea3) registers ``qwen3_moe/factory.py``'s Qwen3MoeForCausalLM (vllm-project
@b1873d6); it is here so that apply() meets a factory of that package too. Neither module defines or imports the
layer classes apply() patches."""
from fake_vllm_neuron.model.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from fake_vllm_neuron.model.qwen3_moe import Qwen3MoeForCausalLM


def get_models():
    return [("Qwen3_5ForConditionalGeneration", Qwen3_5ForConditionalGeneration),
            ("Qwen3_5MoeForConditionalGeneration", Qwen3_5MoeForConditionalGeneration),
            ("Qwen3MoeForCausalLM", Qwen3MoeForCausalLM)]
