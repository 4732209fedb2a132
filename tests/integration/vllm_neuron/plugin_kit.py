"""Helpers for the vLLM Neuron adapter tests: deterministic weights, the plugin's per-rank sharding (written
here from the plugin's weight loaders), cache pages and attention metadata."""
from __future__ import annotations

import importlib
import types

import torch

from fake_vllm_neuron import parallel

PAGE_PAD = 8            # floats vLLM pads each state page with


def plugin(world_size=1, rank=0):
    """The fake plugin's modules, with the TP group new layers pick up set to (world_size, rank)."""
    parallel.set_tp_group(world_size, rank)
    names = ("model.qwen3_5.config", "model.qwen3_5.deltanet", "model.qwen3_5.moe", "model.qwen3_5.model",
             "model.qwen3_moe.model_bf16", "model.registry")
    mods = {n.split(".")[-1]: importlib.import_module("fake_vllm_neuron." + n) for n in names}
    return types.SimpleNamespace(**mods)


def fill(module, seed):
    """Deterministic weights: matrices ~ N(0, 1/fan_in), norms small around their neutral value, DeltaNet decay
    parameters in the checkpoint's range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("A_log",):
                v = torch.rand(p.shape, generator=gen) * 2 - 1
            elif leaf == "dt_bias":
                v = torch.randn(p.shape, generator=gen) * 0.5
            elif "norm" in name and p.dim() == 1:
                base = 0.0 if "qwen3_moe" not in type(module).__module__ else 1.0
                v = base + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                fan_in = p.shape[0] if p.dim() == 2 else p.shape[-2] if p.dim() >= 3 else p.shape[0]
                v = torch.randn(p.shape, generator=gen) * fan_in ** -0.5
            p.copy_(v.to(p.dtype))
    return module


def shard_qkv_segments(full, seg_sizes, world_size, rank, dim):
    """The plugin's _segment_shard_loader for [q | k | v] tensors: each segment cut into world_size pieces (no
    replication at these sizes), this rank's pieces re-concatenated; `dim` is the output-channel dim."""
    parts, off = [], 0
    for size in seg_sizes:
        per = size // world_size
        parts.append(full.narrow(dim, off + rank * per, per))
        off += size
    return torch.cat(parts, dim=dim)


def shard_deltanet(full, part, world_size, rank):
    """Copy the rank's share of a world_size-1 DeltaNet `full` into `part` (a world_size-sized layer)."""
    kd, vd = full.key_dim, full.value_dim
    per_v = full.num_v_heads // world_size
    with torch.no_grad():
        part.in_proj_qkv_weight.copy_(shard_qkv_segments(full.in_proj_qkv_weight, (kd, kd, vd), world_size, rank, 1))
        part.conv1d_weight.copy_(shard_qkv_segments(full.conv1d_weight, (kd, kd, vd), world_size, rank, 0))
        part.in_proj_z_weight.copy_(full.in_proj_z_weight[:, rank * part.value_dim:(rank + 1) * part.value_dim])
        ba = full.in_proj_ba_weight
        nv = full.num_v_heads
        part.in_proj_ba_weight.copy_(torch.cat([ba[:, rank * per_v:(rank + 1) * per_v],
                                                ba[:, nv + rank * per_v:nv + (rank + 1) * per_v]], dim=1))
        part.dt_bias.copy_(full.dt_bias[rank * per_v:(rank + 1) * per_v])
        part.A_log.copy_(full.A_log[rank * per_v:(rank + 1) * per_v])
        part.norm_weight.copy_(full.norm_weight)
        part.out_proj_weight.copy_(full.out_proj_weight[rank * part.value_dim:(rank + 1) * part.value_dim])


def state_pages(layer, num_pages=8):
    """A page-major float32 state view [num_pages + 2, page_floats] (the last two: zero page and write sink)."""
    return torch.zeros(num_pages + 2, layer.conv_numel + layer.rec_numel + PAGE_PAD, dtype=torch.float32)


def prefill_inputs(num_real, bucket, hidden, seed, dtype=torch.bfloat16):
    """A prompt padded to `bucket` as the plugin pads it (pads repeat the last real position)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(bucket, hidden, generator=gen)).to(dtype)
    positions = torch.arange(bucket, dtype=torch.int32)
    positions[num_real:] = num_real - 1
    return x, positions


def gdn_metadata(pages, slots_live):
    """Metadata of a batch: request r owns page pages[r]; slots_live[r] False marks a padded batch row."""
    bt = torch.tensor([[p] for p in pages], dtype=torch.int32)
    slot = torch.tensor([100 + i if live else 0 for i, live in enumerate(slots_live)], dtype=torch.int64)
    return {"block_table_tensor": bt, "slot_mapping": slot, "max_query_len": 1, "decode_token_threshold": 1}


def attn_metadata(num_tokens, block_size, first_block, max_query_len):
    slot = torch.arange(num_tokens, dtype=torch.int64) + first_block * block_size
    return {"slot_mapping": slot, "block_size": block_size, "max_query_len": max_query_len,
            "decode_token_threshold": 1}
