"""vLLM Neuron plugin adapters: the patched fake plugin model against the unpatched one (DeltaNet prefill + decode
on the page-major state cache, gated head_dim-256 attention, the Qwen3.5 MoE block with its shared expert, the
Qwen3-MoE experts), the plugin's TP sharding of [q | k | v] and EP placement, apply()'s refusals and restore()."""
from __future__ import annotations

import copy
import logging
import sys
import types

import pytest
import torch

from nki_kernels.testing import assert_close
from integration.vllm_neuron import VllmNeuronAdapterError, apply

from plugin_kit import (attn_metadata, fill, gdn_metadata, plugin, prefill_inputs, shard_deltanet, state_pages)


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():                # the plugin's model forward runs under torch.no_grad()
        yield
    plugin(world_size=1)                 # new layers of the next test see a single-rank TP group again


def _close(name, want, got, dtype="bfloat16"):
    assert want.shape == got.shape and want.dtype == got.dtype, (name, want.shape, got.shape, want.dtype, got.dtype)
    assert_close(name, want.double().numpy(), got.double().numpy(), dtype=dtype)


def _config(p, **over):
    cfg = p.config.Qwen3_5TextConfig()
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _gdn_session(layer, prompts, decode_steps, seed=0):
    """Prefill each prompt into its own page, then `decode_steps` batched decode steps over all requests plus one
    padded batch row; returns (outputs, final pages)."""
    pages = state_pages(layer)
    layer.bind_state_pages(pages)
    outs = []
    for r, (num_real, bucket) in enumerate(prompts):
        x, pos = prefill_inputs(num_real, bucket, layer.hidden_size, seed + r)
        outs.append(layer.forward_prefill(x, pos, gdn_metadata([r + 1], [True])))
    n = len(prompts)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(decode_steps):
        x = torch.randn(n + 1, layer.hidden_size, generator=gen).to(layer.dtype)
        outs.append(layer.forward_decode(x, gdn_metadata(list(range(1, n + 1)) + [5], [True] * n + [False])))
    return outs, pages


def test_deltanet_prefill_and_decode_match_the_unpatched_plugin():
    p = plugin()
    layer = fill(p.deltanet.Qwen3_5GatedDeltaNet(_config(p), 0), seed=1)
    prompts = [(50, 64), (64, 64)]                     # a right-padded bucket and a full one
    want, want_pages = _gdn_session(copy.deepcopy(layer), prompts, decode_steps=2)
    with apply(layer, "deltanet") as inst:
        assert sorted(inst.installed["deltanet"]) == ["Qwen3_5GatedDeltaNet._causal_conv",
                                                      "Qwen3_5GatedDeltaNet.forward_decode",
                                                      "fake_vllm_neuron.model.qwen3_5.deltanet.chunk_gated_delta_rule"]
        got, got_pages = _gdn_session(layer, prompts, decode_steps=2)
    for i, (w, g) in enumerate(zip(want, got)):
        rows = slice(0, prompts[i][0]) if i < len(prompts) else slice(0, len(prompts))   # real tokens / live rows
        _close(f"output {i}", w[rows], g[rows])
    live = slice(1, len(prompts) + 1)
    _close("state pages (conv window + recurrent state)", want_pages[live], got_pages[live])
    assert torch.all(got_pages[-2] == 0)               # the zero page padded rows read stays zero
    assert torch.equal(want_pages[0], got_pages[0])    # pages of no request untouched


def test_deltanet_kernels_really_ran(monkeypatch):
    """The replacements call our ops (not the plugin's torch), counted through the op namespace."""
    from nki_kernels import torch_ops
    seen = []
    for name in ("gated_delta_rule", "causal_conv1d", "causal_conv1d_update", "gated_delta_rule_step"):
        real = getattr(torch_ops.register(), name)
        monkeypatch.setattr(torch_ops.register(), name, (lambda n, f: lambda *a, **k: seen.append(n) or f(*a, **k))(
            name, real), raising=False)
    p = plugin()
    layer = fill(p.deltanet.Qwen3_5GatedDeltaNet(_config(p), 0), seed=2)
    with apply(layer, "deltanet"):
        _gdn_session(layer, [(64, 64)], decode_steps=1)
    assert seen == ["causal_conv1d", "gated_delta_rule", "causal_conv1d_update", "gated_delta_rule_step"]


def test_deltanet_tp2_sharding_of_qkv_segments_sums_to_the_full_layer():
    """Two TP ranks built with the plugin's [q | k | v] segment sharding (and head-sharded z, b|a, dt_bias, A_log,
    out_proj rows): patched, their partial outputs sum to the unsharded unpatched layer's."""
    p = plugin(world_size=1)
    full = fill(p.deltanet.Qwen3_5GatedDeltaNet(_config(p), 0), seed=3)
    want, _ = _gdn_session(copy.deepcopy(full), [(40, 64)], decode_steps=1)
    parts = []
    for rank in range(2):
        p = plugin(world_size=2, rank=rank)
        part = p.deltanet.Qwen3_5GatedDeltaNet(_config(p), 0)
        shard_deltanet(full, part, 2, rank)
        assert part.num_v_heads == 2 and part.num_k_heads == 1 and part.conv_dim == full.conv_dim // 2
        with apply(part, "deltanet"):
            parts.append(_gdn_session(part, [(40, 64)], decode_steps=1)[0])
    plugin(world_size=1)
    _close("tp2 prefill", want[0][:40].float(), (parts[0][0] + parts[1][0])[:40].float())
    _close("tp2 decode", want[1][:1].float(), (parts[0][1] + parts[1][1])[:1].float())


def _attention_run(layer, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layer.hidden_size, generator=gen).to(layer.dtype)
    pos = torch.arange(tokens)
    cfg_rot = type("C", (), {"rotary_dim": 64, "rope_theta": 1e7})()
    rot = plugin().model.Qwen3_5RotaryEmbedding(cfg_rot)
    cos, sin = rot(pos)
    layer.kv_pages = torch.zeros(6, 2, layer.num_kv_heads_per_rank, 16, layer.head_dim, dtype=layer.dtype)
    out = layer.forward_prefill(x, (cos, sin), attn_metadata(tokens, 16, 1, tokens))
    return out, layer.kv_pages


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_gated_attention_head_dim_256_matches_the_unpatched_plugin(heads, kv_heads):
    p = plugin()
    layer = fill(p.model.Qwen3_5Attention(_config(p, num_attention_heads=heads, num_key_value_heads=kv_heads), 3),
                 seed=4)
    assert layer.head_dim == 256
    want, want_kv = _attention_run(copy.deepcopy(layer), 40, seed=5)
    with apply(layer, "attention") as inst:
        assert sorted(inst.installed["attention"]) == ["Qwen3_5Attention.forward_decode",
                                                       "Qwen3_5Attention.forward_prefill"]
        got, got_kv = _attention_run(layer, 40, seed=5)
    _close("attention", want, got)
    assert torch.equal(want_kv, got_kv)                # the paged cache is written exactly as before


def _attention_session(layer, lengths, block_size=16, seed=30):
    """Prefill each request into its own blocks, then two decode steps for all requests together."""
    rot = plugin().model.Qwen3_5RotaryEmbedding(type("C", (), {"rotary_dim": 64, "rope_theta": 1e7})())
    gen = torch.Generator().manual_seed(seed)
    n_blocks = 4                                                    # per request, in its block table
    layer.kv_pages = torch.zeros(2 + n_blocks * len(lengths) + 2, 2, layer.num_kv_heads_per_rank, block_size,
                                 layer.head_dim, dtype=layer.dtype)
    tables = [[1 + n_blocks * r + j for j in range(n_blocks)] for r in range(len(lengths))]
    outs = []
    for r, n in enumerate(lengths):
        x = torch.randn(n, layer.hidden_size, generator=gen).to(layer.dtype)
        slot = torch.tensor([tables[r][t // block_size] * block_size + t % block_size for t in range(n)])
        outs.append(layer.forward_prefill(x, rot(torch.arange(n)), {"slot_mapping": slot, "block_size": block_size,
                                                                    "max_query_len": n, "decode_token_threshold": 1}))
    pos = torch.tensor(lengths)
    for _ in range(2):
        x = torch.randn(len(lengths), layer.hidden_size, generator=gen).to(layer.dtype)
        slot = torch.tensor([tables[r][int(p) // block_size] * block_size + int(p) % block_size
                             for r, p in enumerate(pos)])
        meta = {"slot_mapping": slot, "block_size": block_size, "block_table_tensor": torch.tensor(tables),
                "max_query_len": 1, "decode_token_threshold": 1}
        outs.append(layer.forward_decode(x, pos, rot(pos), meta))
        pos = pos + 1
    return outs, layer.kv_pages


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_gated_attention_decode_over_the_paged_cache_matches_the_unpatched_plugin(heads, kv_heads):
    """Two requests of different lengths (one crossing a block boundary) prefilled into their own blocks, then two
    decode steps: forward_decode on flash_attention_decode (per-KV-head gather, own token placed at its position)
    equals the plugin's paged torch attention, and the cache is written identically."""
    p = plugin()
    layer = fill(p.model.Qwen3_5Attention(_config(p, num_attention_heads=heads, num_key_value_heads=kv_heads), 3),
                 seed=31)
    want, want_kv = _attention_session(copy.deepcopy(layer), [21, 9])
    with apply(layer, "attention"):
        got, got_kv = _attention_session(layer, [21, 9])
    for i, (w, g) in enumerate(zip(want, got)):
        _close(f"step {i}", w, g)
    assert torch.equal(want_kv, got_kv)


def _moe_block_run(block, norm, tokens, seed, prefill=True, num_real=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, block.hidden_size, generator=gen).to(block.dtype)
    positions = torch.arange(tokens)
    if num_real is not None:                                       # a padded bucket: pads repeat the last position
        positions[num_real:] = num_real - 1
    return block.forward(x, is_prefill=prefill, norm=norm, positions=positions)


@pytest.mark.parametrize("prefill,num_real", [(True, None), (True, 17), (False, None)])
def test_qwen35_moe_with_shared_expert_matches_the_unpatched_plugin(prefill, num_real):
    """Routed + sigmoid-gated shared expert; in a padded prefill bucket the pads get the shared expert only (the
    plugin's padding mask keeps them out of every block), on all rows."""
    p = plugin()
    cfg = _config(p)
    block = fill(p.moe.Qwen3_5SparseMoeBlock(cfg), seed=6)
    norm = fill(p.model.Qwen3_5RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype), seed=7)
    tokens = 24 if prefill else 3
    want = _moe_block_run(copy.deepcopy(block), norm, tokens, 8, prefill, num_real)
    with apply(block, "moe") as inst:
        assert sorted(inst.installed["moe"]) == ["Qwen3_5SparseMoeBlock.forward_decode",
                                                 "Qwen3_5SparseMoeBlock.forward_prefill"]
        got = _moe_block_run(block, norm, tokens, 8, prefill, num_real)
    _close("qwen3.5 moe", want, got)


def test_qwen35_moe_expert_parallel_ranks_sum_to_the_full_block():
    """EP=2: rank r holds experts [4r, 4r + 4) and half of the shared expert's columns; patched, the ranks'
    partial outputs sum to the unpatched single-rank block."""
    p = plugin()
    cfg = _config(p)
    full = fill(p.moe.Qwen3_5SparseMoeBlock(cfg), seed=9)
    norm = fill(p.model.Qwen3_5RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype), seed=10)
    want = _moe_block_run(copy.deepcopy(full), norm, 20, 11)
    total = 0
    for rank in range(2):
        p = plugin(world_size=2, rank=rank)
        part = p.moe.Qwen3_5SparseMoeBlock(cfg, ep_degree=2, ep_rank=rank)
        s = part.shared_per_rank
        with torch.no_grad():
            part.experts_gate_up_weight.copy_(full.experts_gate_up_weight[4 * rank:4 * rank + 4])
            part.experts_down_weight.copy_(full.experts_down_weight[4 * rank:4 * rank + 4])
            part.router_weight.copy_(full.router_weight)
            part.shared_gate_proj_weight.copy_(full.shared_gate_proj_weight[:, rank * s:(rank + 1) * s])
            part.shared_up_proj_weight.copy_(full.shared_up_proj_weight[:, rank * s:(rank + 1) * s])
            part.shared_down_proj_weight.copy_(full.shared_down_proj_weight[rank * s:(rank + 1) * s])
            part.shared_expert_gate_weight.copy_(full.shared_expert_gate_weight)
        with apply(part, "moe"):
            total = total + _moe_block_run(part, norm, 20, 11).float()
    plugin()
    _close("ep2 sum", want.float(), total)


@pytest.mark.parametrize("decode", [False, True])
def test_qwen3_moe_experts_match_the_unpatched_plugin(decode):
    """Prefill runs on a padded bucket (the last 6 tokens repeat the last real position): pads get no output."""
    import types
    p = plugin()
    cfg = types.SimpleNamespace(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, hidden_size=128,
                                moe_intermediate_size=64, rms_norm_eps=1e-6, torch_dtype=torch.bfloat16)
    experts = fill(p.model_bf16.Qwen3MoeExperts(cfg), seed=12)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2 if decode else 30, 128, generator=gen).to(torch.bfloat16)
    positions = torch.arange(x.shape[0])
    if not decode:
        positions[24:] = 23
    want = copy.deepcopy(experts)(x, positions=positions, is_decode=decode, rank=None)
    with apply(experts, "moe") as inst:
        assert sorted(inst.installed["moe"]) == ["Qwen3MoeExperts.forward_decode", "Qwen3MoeExperts.forward_prefill"]
        got = experts(x, positions=positions, is_decode=decode, rank=None)
    if not decode:
        assert torch.all(want[24:] == 0) and torch.all(got[24:] == 0)
    _close("qwen3 moe", want, got)


def _model_session(model, cfg, prompt_len, bucket):
    """Prefill one sequence through the whole hybrid model, then one decode step."""
    for layer in model.language_model.layers:
        if layer.is_linear_attention:
            layer.linear_attn.bind_state_pages(state_pages(layer.linear_attn))
        else:
            attn = layer.self_attn
            attn.kv_pages = torch.zeros(8, 2, attn.num_kv_heads_per_rank, 64, attn.head_dim, dtype=attn.dtype)
    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(0, cfg.vocab_size, (bucket,), generator=gen)
    pos = torch.arange(bucket, dtype=torch.int32)
    pos[prompt_len:] = prompt_len - 1
    meta = {}
    for layer in model.language_model.layers:
        m = gdn_metadata([1], [True]) if layer.is_linear_attention else attn_metadata(bucket, 64, 1, bucket)
        m.update(max_query_len=bucket, decode_token_threshold=1)
        meta[layer.mixer_name] = m
    out_prefill = model(ids, pos, attn_metadata=meta)
    new_id = torch.randint(0, cfg.vocab_size, (1,), generator=gen)
    new_pos = torch.tensor([prompt_len], dtype=torch.int32)
    meta = {}
    for layer in model.language_model.layers:
        if layer.is_linear_attention:
            meta[layer.mixer_name] = gdn_metadata([1], [True])
        else:
            meta[layer.mixer_name] = {"slot_mapping": torch.tensor([64 + prompt_len]), "block_size": 64,
                                      "block_table_tensor": torch.tensor([[1]]), "max_query_len": 1,
                                      "decode_token_threshold": 1}
    out_decode = model(new_id, new_pos, attn_metadata=meta)
    return out_prefill[:prompt_len], out_decode


@pytest.mark.slow
def test_whole_hybrid_model_prefill_and_decode_match():
    """A two-layer Qwen3.5-MoE (DeltaNet + gated attention, MoE with shared expert in both) through the plugin's
    registry: apply(registry) then prefill (64-token bucket, 45 real) and one decode step equal the unpatched."""
    p = plugin()
    cfg = _config(p)
    model = fill(p.model.Qwen3_5ForCausalLM(cfg), seed=15)
    want = _model_session(copy.deepcopy(model), cfg, 45, 64)
    with apply(p.registry) as inst:
        assert set(inst.installed) == {"deltanet", "attention", "moe"}
        got = _model_session(model, cfg, 45, 64)
    _close("model prefill", want[0], got[0])
    _close("model decode", want[1], got[1])


def test_apply_from_the_registry_and_restore():
    p = plugin()
    gdn, attn, blk, exp = (p.deltanet.Qwen3_5GatedDeltaNet, p.model.Qwen3_5Attention, p.moe.Qwen3_5SparseMoeBlock,
                           p.model_bf16.Qwen3MoeExperts)
    before = (gdn.__dict__["forward_decode"], gdn.__dict__["_causal_conv"], attn.__dict__["forward_prefill"],
              blk.__dict__["forward_prefill"], exp.__dict__["forward_decode"], p.deltanet.chunk_gated_delta_rule)
    # As the plugin registers them (whn09/vllm-neuron @3de9ea3, vllm-project @b1873d6): factory classes whose
    # modules neither define nor import the layers; apply() imports the packages' modeling modules itself.
    factories = {cls.__module__ for _, cls in p.registry.get_models()}
    assert factories == {"fake_vllm_neuron.model.qwen3_5.factory", "fake_vllm_neuron.model.qwen3_moe"}
    assert not any(hasattr(sys.modules[m], name) for m in factories
                   for name in ("Qwen3_5Attention", "Qwen3_5GatedDeltaNet", "Qwen3_5SparseMoeBlock", "Qwen3MoeExperts"))
    inst = apply(p.registry)
    assert sum(len(v) for v in inst.installed.values()) == 9
    again = apply(p.registry)                       # already installed: nothing more
    assert again.installed == {}
    inst.restore()
    after = (gdn.__dict__["forward_decode"], gdn.__dict__["_causal_conv"], attn.__dict__["forward_prefill"],
             blk.__dict__["forward_prefill"], exp.__dict__["forward_decode"], p.deltanet.chunk_gated_delta_rule)
    assert all(a is b for a, b in zip(before, after))


def test_contract_drift_is_refused_naming_class_method_and_difference():
    p = plugin()

    class DriftedDeltaNet(p.deltanet.Qwen3_5GatedDeltaNet):
        def forward_decode(self, hidden_states, metadata, spec_tokens=None):      # a newer plugin, say
            raise AssertionError("never called")

    class DriftedAttention(p.model.Qwen3_5Attention):
        def _qkv(self, hidden_states, position_embeddings):
            raise AssertionError("never called")

    with pytest.raises(VllmNeuronAdapterError) as err:
        apply([DriftedDeltaNet, DriftedAttention])
    msg = str(err.value)
    assert "DriftedDeltaNet.forward_decode('hidden_states', 'metadata', 'spec_tokens') differs" in msg
    assert "extra parameter(s) ('spec_tokens',)" in msg
    assert "DriftedAttention._qkv('hidden_states', 'position_embeddings') differs" in msg
    assert "parameter 2 is 'position_embeddings', expected 'cos'" in msg
    assert not hasattr(vars(p.deltanet.Qwen3_5GatedDeltaNet)["forward_decode"], "__nki_kernels_adapter__")
    assert not hasattr(p.deltanet.chunk_gated_delta_rule, "__nki_kernels_adapter__")      # nothing installed


def test_module_function_drift_and_missing_instance_attribute(monkeypatch):
    p = plugin()

    def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64):               # no initial_state
        raise AssertionError("never called")
    monkeypatch.setattr(p.deltanet, "chunk_gated_delta_rule", chunk_gated_delta_rule)
    with pytest.raises(VllmNeuronAdapterError, match=r"chunk_gated_delta_rule\(.*\) differs .*parameter 6 is "
                                                     r"'chunk_size', expected 'initial_state'"):
        apply(p.deltanet.Qwen3_5GatedDeltaNet, "deltanet")
    monkeypatch.undo()
    layer = p.model.Qwen3_5Attention(_config(p), 0)
    del layer.o_offset
    with pytest.raises(VllmNeuronAdapterError, match=r"Qwen3_5Attention instance has no attribute\(s\) "
                                                     r"\['o_offset'\]"):
        apply(layer, "attention")


def test_model_with_no_hookable_layer_says_so():
    with pytest.raises(VllmNeuronAdapterError, match="no hookable layer found"):
        apply(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    p = plugin()
    with pytest.raises(VllmNeuronAdapterError, match=r"no hookable layer for \['moe'\]"):
        apply(p.deltanet.Qwen3_5GatedDeltaNet, ["deltanet", "moe"])


def test_kill_switch_defers_to_the_plugin(monkeypatch):
    from nki_kernels import torch_ops
    p = plugin()
    layer = fill(p.deltanet.Qwen3_5GatedDeltaNet(_config(p), 0), seed=16)
    calls = []
    monkeypatch.setattr(torch_ops.register(), "gated_delta_rule", lambda *a, **k: calls.append(1), raising=False)
    monkeypatch.setenv("NKI_KERNELS_VLLM_DISABLE", "1")
    with apply(layer, "deltanet"):
        want, _ = _gdn_session(copy.deepcopy(layer), [(64, 64)], decode_steps=0)
        got, _ = _gdn_session(layer, [(64, 64)], decode_steps=0)
    assert calls == [] and torch.equal(want[0], got[0])


def _compiled(fn, *args, **kwargs):
    """torch.compile(backend="aot_eager", fullgraph=True): (outputs, frame count, our ops in the graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(fn, backend=counter, fullgraph=True)(*args, **kwargs)
    ours = sorted({str(n.target).split(".")[1] for g in counter.graphs for n in g.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("nki_kernels.")})
    return out, counter.frame_count, ours


def test_patched_layers_trace_into_one_graph_with_our_ops():
    """The plugin compiles its model with torch.compile: each patched path is one graph (no break) holding our
    kernels as ops, and gives exactly the eager patched result (state pages included)."""
    p = plugin()
    cfg = _config(p)
    layer = fill(p.deltanet.Qwen3_5GatedDeltaNet(cfg, 0), seed=17)
    pages = state_pages(layer)
    layer.bind_state_pages(pages)
    x, pos = prefill_inputs(50, 64, cfg.hidden_size, 18)
    xd = torch.randn(2, cfg.hidden_size, generator=torch.Generator().manual_seed(19)).to(cfg.torch_dtype)
    with apply(p.registry):
        want = layer.forward_prefill(x, pos, gdn_metadata([1], [True]))
        want_pages = pages.clone()
        pages.zero_()
        got, frames, ours = _compiled(layer.forward_prefill, x, pos, gdn_metadata([1], [True]))
        assert frames == 1 and ours == ["causal_conv1d", "gated_delta_rule"]
        assert torch.equal(want, got) and torch.equal(want_pages, pages)
        prefill_state = pages.clone()
        want = layer.forward_decode(xd, gdn_metadata([1, 2], [True, True]))           # eager, updates the pages
        want_pages = pages.clone()
        pages.copy_(prefill_state)                                                     # replay the same step
        got, frames, ours = _compiled(layer.forward_decode, xd, gdn_metadata([1, 2], [True, True]))
        assert frames == 1 and ours == ["causal_conv1d_update", "gated_delta_rule_step"]
        assert torch.equal(want, got) and torch.equal(want_pages, pages)

        attn = fill(p.model.Qwen3_5Attention(cfg, 1), seed=20)
        attn.kv_pages = torch.zeros(6, 2, attn.num_kv_heads_per_rank, 16, attn.head_dim, dtype=attn.dtype)
        cos, sin = p.model.Qwen3_5RotaryEmbedding(cfg)(torch.arange(24))
        xa = torch.randn(24, cfg.hidden_size, generator=torch.Generator().manual_seed(21)).to(cfg.torch_dtype)
        want = attn.forward_prefill(xa, (cos, sin), attn_metadata(24, 16, 1, 24))
        got, frames, ours = _compiled(attn.forward_prefill, xa, (cos, sin), attn_metadata(24, 16, 1, 24))
        assert frames == 1 and ours == ["flash_attention"] and torch.equal(want, got)
        pos = torch.tensor([24])
        meta = {"slot_mapping": torch.tensor([16 + 24]), "block_size": 16, "block_table_tensor": torch.tensor([[1, 2]]),
                "max_query_len": 1, "decode_token_threshold": 1}
        xd1 = xa[:1].contiguous()
        kv_before = attn.kv_pages.clone()
        want = attn.forward_decode(xd1, pos, p.model.Qwen3_5RotaryEmbedding(cfg)(pos), meta)
        attn.kv_pages.copy_(kv_before)
        got, frames, ours = _compiled(attn.forward_decode, xd1, pos, p.model.Qwen3_5RotaryEmbedding(cfg)(pos), meta)
        assert frames == 1 and ours == ["flash_attention_decode"] and torch.equal(want, got)

        block = fill(p.moe.Qwen3_5SparseMoeBlock(cfg), seed=22)
        norm = fill(p.model.Qwen3_5RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype), seed=23)
        xm = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(24)).to(cfg.torch_dtype)
        for prefill, kernels in ((True, ["moe_block_mapping", "moe_blockwise", "moe_route"]),
                                 (False, ["moe_decode", "moe_route"])):
            want = block.forward(xm, is_prefill=prefill, norm=norm)
            got, frames, ours = _compiled(block.forward, xm, is_prefill=prefill, norm=norm)
            assert frames == 1 and ours == kernels and torch.equal(want, got)


def test_general_plugin_entry_point_is_opt_in(monkeypatch):
    """vLLM's general-plugin hook: nothing without NKI_KERNELS_VLLM=1; with it, the registry's models once."""
    import sys
    from integration.vllm_neuron import plugin as entry
    p = plugin()
    monkeypatch.setattr(entry, "_INSTALLATION", [])
    monkeypatch.delenv("NKI_KERNELS_VLLM", raising=False)
    assert entry.load_plugin() is None
    monkeypatch.setenv("NKI_KERNELS_VLLM", "1")
    monkeypatch.setenv("NKI_KERNELS_VLLM_FAMILIES", "deltanet")
    apply_mod = sys.modules["integration.vllm_neuron.apply"]
    monkeypatch.setattr(apply_mod, "_plugin_default", lambda: p.registry)
    inst = entry.load_plugin()
    try:
        assert list(inst.installed) == ["deltanet"]
        assert entry.load_plugin() is inst                      # loaded again in the same process: no-op
    finally:
        inst.restore()


def test_entry_point_logs_a_refusal_and_installs_nothing(monkeypatch, caplog):
    """vLLM calls general plugins without catching (vllm/plugins/__init__.py @0142555): a registry with no
    hookable layer (vllm-project @5528be7 registers no Qwen3.5) or a drifted contract must not stop the engine."""
    from integration.vllm_neuron import plugin as entry
    apply_mod = sys.modules["integration.vllm_neuron.apply"]
    registry = types.ModuleType("registry")
    registry.get_models = lambda: [("LlamaForCausalLM", torch.nn.Linear)]
    monkeypatch.setattr(apply_mod, "_plugin_default", lambda: registry)
    monkeypatch.setattr(entry, "_INSTALLATION", [])
    monkeypatch.setenv("NKI_KERNELS_VLLM", "1")
    monkeypatch.delenv("NKI_KERNELS_VLLM_FAMILIES", raising=False)
    with caplog.at_level(logging.WARNING, logger="nki_kernels.vllm_neuron"):
        assert entry.load_plugin() is None
        assert entry.load_plugin() is None                      # refused once per process, not retried
    assert entry._INSTALLATION == [None]
    assert [r.getMessage() for r in caplog.records if "no hookable layer found" in r.getMessage()], caplog.text


def test_entry_point_survives_a_plugin_module_that_fails_to_import(monkeypatch, caplog, tmp_path):
    """A registry factory whose modeling module raises at import (whn09's qwen3_5/moe.py imports nki / nkilib at
    import time), and an unexpected error inside apply(): logged, nothing installed, vLLM not stopped."""
    from integration.vllm_neuron import plugin as entry
    apply_mod = sys.modules["integration.vllm_neuron.apply"]
    pkg = tmp_path / "broken_plugin" / "qwen3_5"
    pkg.mkdir(parents=True)
    (tmp_path / "broken_plugin" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("class Qwen3_5ForConditionalGeneration:\n    pass\n")
    (pkg / "model.py").write_text("raise RuntimeError('no Neuron device in this process')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from broken_plugin.qwen3_5 import Qwen3_5ForConditionalGeneration as factory
    registry = types.ModuleType("registry")
    registry.get_models = lambda: [("Qwen3_5ForConditionalGeneration", factory)]
    monkeypatch.setattr(apply_mod, "_plugin_default", lambda: registry)
    monkeypatch.setenv("NKI_KERNELS_VLLM", "1")
    monkeypatch.delenv("NKI_KERNELS_VLLM_FAMILIES", raising=False)
    monkeypatch.setattr(entry, "_INSTALLATION", [])
    with caplog.at_level(logging.WARNING, logger="nki_kernels.vllm_neuron"):
        assert entry.load_plugin() is None
    assert "broken_plugin.qwen3_5.model could not be imported (RuntimeError" in caplog.text
    assert "no hookable layer found" in caplog.text
    caplog.clear()

    def boom(*_a, **_k):
        raise OSError("unexpected")
    monkeypatch.setattr(apply_mod, "apply", boom)
    monkeypatch.setattr(entry, "_INSTALLATION", [])
    with caplog.at_level(logging.WARNING, logger="nki_kernels.vllm_neuron"):
        assert entry.load_plugin() is None
    assert "installing failed unexpectedly" in caplog.text and "OSError: unexpected" in caplog.text


def test_apply_installs_all_or_nothing(monkeypatch):
    """An error while installing (after the checks passed) undoes the replacements already made."""
    from integration import _patching
    p = plugin()
    cls = p.deltanet.Qwen3_5GatedDeltaNet
    before = (dict(vars(cls)), dict(vars(p.deltanet)))
    calls = []
    real = _patching.PatchSet._set

    def failing_set(self, owner, attr, value):
        calls.append(attr)
        if len(calls) == 2:
            raise RuntimeError("install failed")
        real(self, owner, attr, value)
    monkeypatch.setattr(_patching.PatchSet, "_set", failing_set)
    with pytest.raises(RuntimeError, match="install failed"):
        apply(p.registry, ["deltanet"])
    assert len(calls) == 2 and (dict(vars(cls)), dict(vars(p.deltanet))) == before


def _no_replication_attention(p):
    """Qwen3_5Attention as whn09/vllm-neuron @3de9ea3 has it: no query-head replication (no q_replicas /
    o_offset / o_size), o_proj_weight [q_size, hidden], a _finish that gates and projects without narrowing."""
    class Qwen3_5Attention(p.model.Qwen3_5Attention):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            del self.q_replicas, self.o_offset, self.o_size

        def _finish(self, attn_output, gate):
            return (attn_output * torch.sigmoid(gate.float()).to(attn_output.dtype)) @ self.o_proj_weight
    return Qwen3_5Attention


def test_attention_without_query_head_replication_matches_the_unpatched_plugin():
    """The other attention contract (whn09 @3de9ea3, the Qwen3.5-MoE branch): prefill and decode patched at
    class level (as from the registry, instance attributes unknown at install) equal the unpatched layer, with
    no fallback."""
    from integration.vllm_neuron import _common
    p = plugin()
    cls = _no_replication_attention(p)
    layer = fill(cls(_config(p, num_attention_heads=4, num_key_value_heads=2), 3), seed=32)
    assert not hasattr(layer, "q_replicas")
    want_pre, want_kv = _attention_run(copy.deepcopy(layer), 40, seed=5)
    want, want_pages = _attention_session(copy.deepcopy(layer), [21, 9])
    _common.FALLBACKS.clear()
    with apply(cls, "attention"):
        got_pre, got_kv = _attention_run(layer, 40, seed=5)
        got, got_pages = _attention_session(layer, [21, 9])
    assert _common.fallbacks() == {}
    _close("prefill", want_pre, got_pre)
    assert torch.equal(want_kv, got_kv)
    for i, (w, g) in enumerate(zip(want, got)):
        _close(f"step {i}", w, g)
    assert torch.equal(want_pages, got_pages)


def test_class_level_install_checks_each_instance_when_called():
    """Installed on the class (before any instance exists), an instance that lacks part of the contract runs the
    plugin's own code, with the reason recorded, instead of raising mid-model; and o_proj rows that do not
    match the contract are refused the same way."""
    from integration.vllm_neuron import _common
    from integration.vllm_neuron.attention import o_proj_mismatch
    p = plugin()
    layer = fill(p.model.Qwen3_5Attention(_config(p), 3), seed=33)
    del layer.o_offset                                  # half of the replication attributes: neither contract
    want, _ = _attention_run(copy.deepcopy(layer), 24, seed=6)
    _common.FALLBACKS.clear()
    with apply(p.model.Qwen3_5Attention, "attention"):
        got, _ = _attention_run(layer, 24, seed=6)
    assert torch.equal(want, got)
    assert _common.fallbacks() == {("vllm_neuron attention: Qwen3_5Attention.forward_prefill",
                                    "Qwen3_5Attention instance has no attribute(s) ['o_offset'] that the adapter "
                                    "reads"): 1}
    old = _no_replication_attention(p)(_config(p), 3)
    assert o_proj_mismatch(old) is None and o_proj_mismatch(layer) is None
    old.o_proj_weight = torch.nn.Parameter(old.o_proj_weight[: old.q_size // 2])
    assert f"o_proj_weight has {old.q_size // 2} rows, expected {old.q_size}" in o_proj_mismatch(old)


@pytest.mark.parametrize("world_size", [2, 4])
def test_attention_tp_ranks_sum_to_the_full_layer(world_size):
    """The plugin's attention sharding: q_proj by whole heads ([query | gate] per head), K/V heads replicated when
    the world is wider than the KV heads (rank r holds KV head r // replicas), o_proj rows; patched, the ranks'
    partial outputs sum to the unsharded unpatched layer (2 KV heads, 4 query heads, D = 256)."""
    p = plugin()
    cfg = _config(p)
    full = fill(p.model.Qwen3_5Attention(cfg, 3), seed=40)
    want, _ = _attention_run(copy.deepcopy(full), 20, seed=41)
    total = 0
    for rank in range(world_size):
        p = plugin(world_size=world_size, rank=rank)
        part = p.model.Qwen3_5Attention(cfg, 3)
        qs, kvs, kv_shard = part.q_size, part.kv_size, rank // part.num_kv_replicas
        with torch.no_grad():
            part.q_proj_weight.copy_(full.q_proj_weight[:, rank * 2 * qs:(rank + 1) * 2 * qs])
            part.k_proj_weight.copy_(full.k_proj_weight[:, kv_shard * kvs:(kv_shard + 1) * kvs])
            part.v_proj_weight.copy_(full.v_proj_weight[:, kv_shard * kvs:(kv_shard + 1) * kvs])
            part.o_proj_weight.copy_(full.o_proj_weight[rank * part.o_size:(rank + 1) * part.o_size])
            part.q_norm.weight.copy_(full.q_norm.weight)
            part.k_norm.weight.copy_(full.k_norm.weight)
        with apply(part, "attention"):
            total = total + _attention_run(part, 20, seed=41)[0].float()
    _close(f"attention tp{world_size}", want.float(), total)


@pytest.mark.parametrize("error", ["emulator check", "kernel refusal"])
def test_every_kernel_refusal_falls_back_and_is_recorded(monkeypatch, error):
    """Every replacement of the whole hybrid model, with each of our ops forced to refuse (the emulator's
    hardware-check EmulatorCheckError, or a wrapper's KernelInputError): the model runs the plugin's own code
    everywhere, equals the unpatched model exactly, never raises, and `fallbacks()` names each hook and reason."""
    from nki_kernels import torch_ops
    from nki_kernels.backend import EmulatorCheckError
    from nki_kernels.validation import KernelInputError
    from integration.vllm_neuron import _common

    def refuse(name):
        def op(*args, **kwargs):
            if error == "emulator check":
                raise EmulatorCheckError("dma_copy", "dst", f"{name}: SBUF allocation exceeds capacity (forced)")
            raise KernelInputError(f"{name}: a limit (forced)")
        return op
    ns = torch_ops.register()
    for name in ("flash_attention", "flash_attention_decode", "gated_delta_rule", "causal_conv1d",
                 "causal_conv1d_update", "gated_delta_rule_step", "moe_blockwise", "moe_decode", "moe_route",
                 "moe_block_mapping"):
        monkeypatch.setattr(ns, name, refuse(name), raising=False)
    _common.FALLBACKS.clear()
    p = plugin()
    cfg = _config(p)
    model = fill(p.model.Qwen3_5ForCausalLM(cfg), seed=15)
    want = _model_session(copy.deepcopy(model), cfg, 45, 64)
    with apply(p.registry):
        got = _model_session(model, cfg, 45, 64)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    seen = _common.fallbacks()
    hooks = {hook for hook, _ in seen}
    assert {"vllm_neuron attention: Qwen3_5Attention.forward_prefill",
            "vllm_neuron attention: Qwen3_5Attention.forward_decode",
            "vllm_neuron deltanet: Qwen3_5GatedDeltaNet._causal_conv",
            "vllm_neuron deltanet: Qwen3_5GatedDeltaNet.forward_decode"} <= hooks, hooks
    assert any(h.startswith("vllm_neuron moe: ") for h in hooks), hooks
    word = "hardware checks" if error == "emulator check" else "kernel refused"
    assert all(word in reason and "(forced)" in reason for _, reason in seen), seen
