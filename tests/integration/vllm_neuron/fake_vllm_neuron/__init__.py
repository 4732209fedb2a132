"""A stand-in for the vLLM Neuron plugin (vllm-project/vllm-neuron), written for the adapter tests.

It reproduces the *contracts* the adapters rely on (module layout, class and method names, signatures, parameter
names, shapes and ``[in, out]`` layouts, TP sharding of the ``[q | k | v]`` segments, the page-major state cache,
the call sites of the functional ops), read from the plugin source cited in integration/vllm_neuron/apply.py
(PLUGIN_COMMITS). The bodies are plain torch written here (the plugin's vendored NKI kernels, vLLM's collectives
and weight loaders are not available): they compute what the plugin's torch paths compute.
"""
