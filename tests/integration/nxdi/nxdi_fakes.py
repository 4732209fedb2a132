"""Stand-ins for the NxDI / NxD / contrib classes the adapters patch, written here from NxDI's documented
contracts (../shared/reference/nxdi.md), with plain-torch bodies so tests can tell whether the original or the
adapter ran. Each factory returns *fresh* classes so class-level patches never leak between tests.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F


def _repeat_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def make_attention_classes():
    """(NeuronAttentionBase, NeuronQwen35Attention, BadAttention) stand-ins."""

    class FlashAttentionStrategy(int):
        pass

    class NeuronAttentionBase(torch.nn.Module):
        calls = 0

        def __init__(self, num_heads, num_key_value_heads, head_dim, torch_dtype=torch.float32, lnc=1,
                     sliding_window=None):
            super().__init__()
            self.num_heads = num_heads
            self.num_key_value_heads = num_key_value_heads
            self.num_key_value_groups = num_heads // num_key_value_heads
            self.head_dim = head_dim
            self.softmax_scale = math.sqrt(head_dim)      # NxDI: a divisor
            self.torch_dtype = torch_dtype
            self.logical_nc_config = lnc
            self.sliding_window = sliding_window
            self.learned_sinks_size = None
            self.cp_degree = 1
            self.qkv_proj = torch.nn.Linear(4, 4)          # a parameter the adapters must leave alone

        def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):
            """NxDI's softmax (strategy NONE) path: repeat_kv, Q K^T / softmax_scale, masked, softmax fp32."""
            type(self).calls += 1
            k = _repeat_kv(K, self.num_key_value_groups)
            v = _repeat_kv(V, self.num_key_value_groups)
            scores = torch.matmul(Q, k.transpose(2, 3)) / self.softmax_scale
            if attention_mask is not None:
                scores = torch.where(attention_mask.to(torch.bool), scores, torch.finfo(scores.dtype).min)
            p = F.softmax(scores, dim=-1, dtype=torch.float32).to(Q.dtype)
            return torch.matmul(p, v), 0

        def context_encode_layout(self, attn_output, strategy):
            """attention_context_encode's layout step: BHDS + kernel strategy -> permute, NONE -> transpose."""
            if int(strategy) != 0:
                return attn_output.permute(0, 3, 1, 2)
            return attn_output.transpose(1, 2)

    class NeuronQwen35Attention(NeuronAttentionBase):
        calls = 0

        def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask=None):
            """The contrib's fallback: always causal, returns (BHSD, None)."""
            type(self).calls += 1
            mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()[None, None]
            out, _ = NeuronAttentionBase.perform_prefill(self, Q, K, V, q_len, bsz, mask)
            return out, None

    class BadAttention(NeuronAttentionBase):
        def perform_prefill(self, query, key, value, attention_mask):     # differs from NxDI's signature
            raise AssertionError("never called")

    return types.SimpleNamespace(NeuronAttentionBase=NeuronAttentionBase,
                                 NeuronQwen35Attention=NeuronQwen35Attention, BadAttention=BadAttention)


def _l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def make_deltanet_class(bad_signature=False):
    """NeuronGatedDeltaNet stand-in with the contrib's hook signatures and token-loop torch bodies."""

    class NeuronGatedDeltaNet(torch.nn.Module):
        calls = 0

        def __init__(self, max_bs=2, num_v_heads=4, head_k_dim=32, head_v_dim=32):
            super().__init__()
            self.recurrent_state_buffer = torch.nn.Parameter(
                torch.zeros(max_bs, num_v_heads, head_k_dim, head_v_dim), requires_grad=False)

        @staticmethod
        def _loop(query, key, value, g, beta, state):
            query = _l2norm(query) * query.shape[-1] ** -0.5
            key = _l2norm(key)
            outs = []
            for t in range(query.shape[2]):
                state = state * g[:, :, t].exp()[..., None, None]
                kv = (state * key[:, :, t, :, None]).sum(-2)
                delta = (value[:, :, t] - kv) * beta[:, :, t, None]
                state = state + key[:, :, t, :, None] * delta[..., None, :]
                outs.append((state * query[:, :, t, :, None]).sum(-2))
            return torch.stack(outs, 2), state

        def _fused_chunked_forward(self, query, key, value, g, beta, output_final_state=False, initial_state=None,
                                   _segment_disabled=False):
            type(self).calls += 1
            b, h, _, dk = query.shape
            state = torch.zeros(b, h, dk, value.shape[-1]) if initial_state is None else initial_state
            out, state = self._loop(query, key, value, g, beta, state)
            return out, (state if output_final_state else None)

        if bad_signature:
            def _recurrent_step(self, q, k, v, state):                          # noqa: E301
                raise AssertionError("never called")
        else:
            def _recurrent_step(self, query, key, value, g, beta, recurrent_state):  # noqa: E301
                type(self).calls += 1
                return self._loop(query[:, :, :1], key[:, :, :1], value[:, :, :1], g[:, :, :1], beta[:, :, :1],
                                  recurrent_state)

    return NeuronGatedDeltaNet


def make_moe_classes():
    """(BlockwiseMatmulConfig, ExpertMLPsV2, module namespace) stand-ins for NxD's blockwise path."""

    class BlockwiseMatmulNKIFunc:                                   # NxD's stock class (never runs here)
        @classmethod
        def apply(cls, *args):
            raise RuntimeError("stock NxD kernel called")

    class BlockwiseMatmulConfig:
        def __init__(self, block_size, logical_nc_config, blockwise_nki_autograd_cls, use_torch_block_wise=False):
            self.block_size = block_size
            self.logical_nc_config = logical_nc_config
            self.blockwise_nki_autograd_cls = blockwise_nki_autograd_cls
            self.use_torch_block_wise = use_torch_block_wise

    def can_use_blockwise_matmul_nki(hidden_size, intermediate_size_tp, block_size, glu_mlp, glu_type,
                                     use_torch_block_wise, device, logical_nc_config, **kw):
        return False

    class ExpertMLPsV2(torch.nn.Module):
        def __init__(self, blockwise_matmul_config, gate_up, down):
            super().__init__()
            self.blockwise_matmul_config = blockwise_matmul_config
            self.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)    # [E, H, 2I]
            self.down_proj = torch.nn.Parameter(down, requires_grad=False)          # [E, I, H]

        def forward_blockwise(self, hidden, affinities_masked, token_position_to_id, block_to_expert):
            cls = self.blockwise_matmul_config.blockwise_nki_autograd_cls or BlockwiseMatmulNKIFunc
            return cls.apply(hidden, affinities_masked, self.gate_up_proj, self.down_proj, token_position_to_id,
                             block_to_expert, None, None, False, self.blockwise_matmul_config, True, 1, None, None,
                             None, None, None, None, None, None, 0)

    ns = types.ModuleType("fake_nxd_expert_mlps_v2")
    ns.can_use_blockwise_matmul_nki = can_use_blockwise_matmul_nki
    ExpertMLPsV2.__module__ = ns.__name__
    ns.ExpertMLPsV2 = ExpertMLPsV2
    return types.SimpleNamespace(BlockwiseMatmulConfig=BlockwiseMatmulConfig, ExpertMLPsV2=ExpertMLPsV2,
                                 BlockwiseMatmulNKIFunc=BlockwiseMatmulNKIFunc, module=ns)


def blockwise_mapping(top_k_index, num_experts, block_size):
    """NxD's mapping contract, built here independently: each expert's tokens (ascending) padded to whole
    blocks, blocks contiguous in expert order, -1 for padding; N = NxD's worst-case block count."""
    t, k = top_k_index.shape
    n_blocks = min(math.ceil((t * k - (num_experts - 1)) / block_size) + num_experts - 1, t * k)
    n_blocks = max(n_blocks, 1)
    slots, experts = [], []
    for e in range(num_experts):
        toks = [i for i in range(t) if e in top_k_index[i].tolist()]
        nb = math.ceil(len(toks) / block_size)
        for j in range(nb):
            chunk = toks[j * block_size:(j + 1) * block_size]
            slots += chunk + [-1] * (block_size - len(chunk))
            experts.append(e)
    if len(experts) > n_blocks:
        raise AssertionError("mapping needs more blocks than NxD's bound")
    while len(experts) < n_blocks:                  # trailing all-padding blocks (NxD keeps N fixed)
        slots += [-1] * block_size
        experts.append(num_experts - 1)
    return torch.tensor(slots, dtype=torch.int32), torch.tensor(experts, dtype=torch.int32)


def make_code_predictor_class():
    """UnifiedNeuronCodePredictor stand-in: the contrib's submodule / parameter names and shapes, sizes from
    arguments (the contrib hard-codes H=1024, 5 layers, 16/8 heads, D=128, I=3072, V=2048, 15 groups)."""

    class RMSNorm(torch.nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(dim))
            self.eps = eps

    class CPAttention(torch.nn.Module):
        def __init__(self, hidden, n_q, n_kv, d):
            super().__init__()
            self.q_proj = torch.nn.Linear(hidden, n_q * d, bias=False)
            self.k_proj = torch.nn.Linear(hidden, n_kv * d, bias=False)
            self.v_proj = torch.nn.Linear(hidden, n_kv * d, bias=False)
            self.o_proj = torch.nn.Linear(n_q * d, hidden, bias=False)
            self.q_norm = RMSNorm(d)
            self.k_norm = RMSNorm(d)

    class CPMLP(torch.nn.Module):
        def __init__(self, hidden, inter):
            super().__init__()
            self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    class CPLayer(torch.nn.Module):
        def __init__(self, hidden, n_q, n_kv, d, inter):
            super().__init__()
            self.input_layernorm = RMSNorm(hidden)
            self.self_attn = CPAttention(hidden, n_q, n_kv, d)
            self.post_attention_layernorm = RMSNorm(hidden)
            self.mlp = CPMLP(hidden, inter)

    class UnifiedNeuronCodePredictor(torch.nn.Module):
        calls = 0

        def __init__(self, tp_degree=1, dtype=torch.float32, hidden=128, n_layers=2, n_q=4, n_kv=2, d=32, inter=128,
                     vocab=16, n_groups=4, theta=1_000_000.0, seed=0):
            super().__init__()
            self.tp_degree = tp_degree
            self.dtype = dtype
            self.layers = torch.nn.ModuleList([CPLayer(hidden, n_q, n_kv, d, inter) for _ in range(n_layers)])
            self.norm = RMSNorm(hidden)
            inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            f = torch.outer(torch.arange(n_groups + 1, dtype=torch.float32), inv)
            emb = torch.cat([f, f], -1)
            self.register_buffer("cos_cache", emb.cos().to(dtype), persistent=False)
            self.register_buffer("sin_cache", emb.sin().to(dtype), persistent=False)
            gen = torch.Generator().manual_seed(seed)
            self.codec_embedding_stacked = torch.nn.Parameter(
                torch.randn(n_groups, vocab, hidden, generator=gen).to(dtype), requires_grad=False)
            self.lm_head_stacked = torch.nn.Parameter(
                (torch.randn(n_groups, vocab, hidden, generator=gen) * hidden ** -0.5).to(dtype), requires_grad=False)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                    elif "stacked" not in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            self.to(dtype)

        def forward(self, past_hidden, last_id_hidden):
            type(self).calls += 1
            return "original"

    return UnifiedNeuronCodePredictor


def code_predictor_reference_weights(mod):
    """Independent packing of a fake code predictor's parameters for the NumPy reference: natural arrays straight
    from the parameters (float64), head counts from the projection shapes, RoPE from theta."""
    from nki_kernels.codepredictor.weights import pack_weights
    f = lambda t: t.detach().double().numpy()                                        # noqa: E731
    layers = [dict(input_norm=f(l.input_layernorm.weight), post_norm=f(l.post_attention_layernorm.weight),
                   q_norm=f(l.self_attn.q_norm.weight), k_norm=f(l.self_attn.k_norm.weight),
                   q=f(l.self_attn.q_proj.weight), k=f(l.self_attn.k_proj.weight), v=f(l.self_attn.v_proj.weight),
                   o=f(l.self_attn.o_proj.weight), gate=f(l.mlp.gate_proj.weight), up=f(l.mlp.up_proj.weight),
                   down=f(l.mlp.down_proj.weight)) for l in mod.layers]
    head_dim = mod.layers[0].self_attn.q_norm.weight.shape[0]
    n_q = mod.layers[0].self_attn.q_proj.weight.shape[0] // head_dim
    n_kv = mod.layers[0].self_attn.k_proj.weight.shape[0] // head_dim
    return pack_weights(layers, f(mod.norm.weight), f(mod.codec_embedding_stacked), f(mod.lm_head_stacked),
                        n_q_heads=n_q, n_kv_heads=n_kv, dtype="bfloat16", rope_theta=1_000_000.0)
