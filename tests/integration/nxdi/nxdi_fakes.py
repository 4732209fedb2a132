"""Stand-ins for the NxDI / NxD / contrib classes the adapters patch, written here from NxDI's documented
contracts (../shared/reference/nxdi.md), with plain-torch bodies so tests can tell whether the original or the
adapter ran. Each factory returns *fresh* classes so class-level patches never leak between tests.
"""
from __future__ import annotations

import enum
import math
import types

import torch
import torch.nn.functional as F


def _repeat_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class FlashAttentionStrategy(enum.Enum):
    """NxDI's enum as defined in attention_base.py (NxDI main @4bcdc54): a plain Enum, members are not ints."""
    NONE = 0
    UNSHARDED_KERNEL = 1
    SHARDED_KERNEL = 2
    CONTEXT_PARALLEL_KERNEL = 3
    STRIDED_CONTEXT_PARALLEL_KERNEL = 4


def make_attention_classes():
    """(NeuronAttentionBase, NeuronQwen35Attention, BadAttention, NeuronQwen3VLVisionAttention) stand-ins."""

    class NeuronAttentionBase(torch.nn.Module):
        calls = 0

        def __init__(self, num_heads, num_key_value_heads, head_dim, torch_dtype=torch.float32, lnc=1,
                     sliding_window=None, attn_kernel_enabled=None):
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
            self.neuron_config = types.SimpleNamespace(attn_kernel_enabled=attn_kernel_enabled, is_prefill_stage=True)
            self.attn_kernel_enabled = self.neuron_config.attn_kernel_enabled     # as NxDI's __init__ copies it
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
            return torch.matmul(p, v), FlashAttentionStrategy.NONE

        def context_encode_layout(self, attn_output, strategy):
            """attention_context_encode's layout step: BHDS + kernel strategy -> permute, NONE -> transpose."""
            if strategy != FlashAttentionStrategy.NONE:
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

    class NeuronQwen3VLVisionAttention(NeuronAttentionBase):
        """NxDI's Qwen3-VL vision attention (modeling_qwen3_vl_vision.py @4bcdc54): inherits perform_prefill,
        MHA (kv heads = heads), and its config validation forces attn_kernel_enabled=False, because its mask is
        block-diagonal (one block per image, padding excluded), which only the softmax path honours."""
        calls = 0

        def __init__(self, num_heads, head_dim, torch_dtype=torch.float32):
            super().__init__(num_heads, num_heads, head_dim, torch_dtype=torch_dtype, attn_kernel_enabled=False)

        @staticmethod
        def create_vision_attention_mask_from_pos_ids(vision_position_ids):
            """[S] image id per token (-1 = padding) -> bool [S, S], True within one image."""
            mask = vision_position_ids.unsqueeze(1) == vision_position_ids.unsqueeze(0)
            valid = vision_position_ids != -1
            return mask & torch.outer(valid, valid)

    return types.SimpleNamespace(NeuronAttentionBase=NeuronAttentionBase,
                                 NeuronQwen35Attention=NeuronQwen35Attention, BadAttention=BadAttention,
                                 NeuronQwen3VLVisionAttention=NeuronQwen3VLVisionAttention,
                                 FlashAttentionStrategy=FlashAttentionStrategy)


def _l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def make_deltanet_class(bad_signature=False, drifted_optional=False, dtype=torch.bfloat16):
    """NeuronGatedDeltaNet stand-in with the contrib's hook signatures (NxDI main @4bcdc54,
    contrib/models/Qwen3.5-35B-A3B/src/modeling_qwen35.py) and token-loop torch bodies: _fused_chunked_forward,
    _chunk_forward, _sequential_forward (CTE), _recurrent_step, _nki_recurrent_step (TKG). The state buffer is
    ``[max_bs, Hv, Dk, Dv]`` in the model dtype (``config.neuron_config.torch_dtype``), as the contrib allocates it;
    ``_recurrent_step`` is called with ``state.float()``, ``_nki_recurrent_step`` with the buffer's dtype."""

    class NeuronGatedDeltaNet(torch.nn.Module):
        calls = 0

        def __init__(self, max_bs=2, num_v_heads=4, head_k_dim=32, head_v_dim=32):
            super().__init__()
            self.recurrent_state_buffer = torch.nn.Parameter(
                torch.zeros(max_bs, num_v_heads, head_k_dim, head_v_dim, dtype=dtype), requires_grad=False)

        @staticmethod
        def _loop(query, key, value, g, beta, state):
            query = _l2norm(query) * query.shape[-1] ** -0.5
            key = _l2norm(key)
            state = state.float()
            outs = []
            for t in range(query.shape[2]):
                state = state * g[:, :, t].exp()[..., None, None]
                kv = (state * key[:, :, t, :, None]).sum(-2)
                delta = (value[:, :, t] - kv) * beta[:, :, t, None]
                state = state + key[:, :, t, :, None] * delta[..., None, :]
                outs.append((state * query[:, :, t, :, None]).sum(-2))
            return torch.stack(outs, 2), state

        def _zero_state(self, query, value):
            return query.new_zeros(query.shape[0], query.shape[1], query.shape[-1], value.shape[-1])

        def _fused_chunked_forward(self, query, key, value, g, beta, output_final_state=False, initial_state=None,
                                   _segment_disabled=False):
            type(self).calls += 1
            state = self._zero_state(query, value) if initial_state is None else initial_state
            out, state = self._loop(query, key, value, g, beta, state)
            return out, (state if output_final_state else None)

        def _chunk_forward(self, query, key, value, g, beta, output_final_state=False, initial_state=None):
            type(self).calls += 1
            state = self._zero_state(query, value) if initial_state is None else initial_state
            out, state = self._loop(query, key, value, g, beta, state)
            return out, (state if output_final_state else None)

        if drifted_optional:
            def _sequential_forward(self, query, key, value, g, beta, initial_state, output_final_state=False):  # noqa: E301
                raise AssertionError("never called")
        else:
            def _sequential_forward(self, query, key, value, g, beta, output_final_state=False):  # noqa: E301
                type(self).calls += 1
                out, state = self._loop(query, key, value, g, beta, self._zero_state(query, value))
                return out, (state if output_final_state else None)

        if bad_signature:
            def _recurrent_step(self, q, k, v, state):                          # noqa: E301
                raise AssertionError("never called")
        else:
            def _recurrent_step(self, query, key, value, g, beta, recurrent_state):  # noqa: E301
                type(self).calls += 1
                return self._loop(query[:, :, :1], key[:, :, :1], value[:, :, :1], g[:, :, :1], beta[:, :, :1],
                                  recurrent_state)

        def _nki_recurrent_step(self, query, key, value, g, beta, recurrent_state):
            """The contrib's stateful NKI decode step (S = 1), here in torch; state in the buffer dtype."""
            type(self).calls += 1
            out, state = self._loop(query[:, :, :1], key[:, :, :1], value[:, :, :1], g[:, :, :1], beta[:, :, :1],
                                    recurrent_state)
            return out, state.to(recurrent_state.dtype)

    return NeuronGatedDeltaNet


class ExpertAffinityScaleMode(enum.Enum):
    """nkilib's enum NxD passes as expert_affinities_scaling_mode."""
    NO_SCALE = 0
    POST_SCALE = 1
    PRE_SCALE = 2


class BlockShardStrategy(enum.Enum):
    HI_LO = 0
    PING_PONG = 1


def make_moe_classes(gate_drift=False, stock_forward_drift=False):
    """(BlockwiseMatmulConfig, ExpertMLPsV2, BlockwiseMatmulNKIFunc, can_use_blockwise_matmul_nki, module) stand-ins
    for NxD's blockwise path, with the signatures of NxD @fbac349 (Release 2.29): moe_configs.py's 15-parameter
    ``BlockwiseMatmulConfig.__init__`` and ``from_kwargs`` defaults, blockwise.py's 21-argument
    ``BlockwiseMatmulNKIFunc.forward`` and 18-parameter ``can_use_blockwise_matmul_nki``, and expert_mlps_v2.py's
    call (``num_static_blocks`` an int, ``conditions`` an int32 tensor under the dynamic-while kernels, else None).
    The drift flags build a version whose contract differs, for the refusal tests."""

    class BlockwiseMatmulNKIFunc(torch.autograd.Function):          # NxD's stock class (never runs here)
        if stock_forward_drift:
            @staticmethod
            def forward(ctx, hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,  # noqa
                        token_position_to_id, block_to_expert, gate_up_proj_scale, down_proj_scale, is_training,
                        blockwise_matmul_config, multi_expert_per_token=True, expert_affinities_scaling_mode=None,
                        num_static_blocks=None, conditions=None, gate_clamp_upper_limit=None,
                        gate_clamp_lower_limit=None, up_clamp_upper_limit=None, up_clamp_lower_limit=None,
                        gate_up_proj_bias=None, down_proj_bias=None, kernel_act_fn_id=1):
                raise RuntimeError("stock NxD kernel called")
        else:
            @staticmethod
            def forward(ctx, hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,  # noqa
                        token_position_to_id, block_to_expert, gate_up_proj_scale, down_proj_scale, is_training,
                        blockwise_matmul_config, multi_expert_per_token=True,
                        expert_affinities_scaling_mode=ExpertAffinityScaleMode.POST_SCALE, conditions=None,
                        num_static_blocks=None, gate_clamp_upper_limit=None, gate_clamp_lower_limit=None,
                        up_clamp_upper_limit=None, up_clamp_lower_limit=None, gate_up_proj_bias=None,
                        down_proj_bias=None, kernel_act_fn_id=1):
                raise RuntimeError("stock NxD kernel called")

    class BlockwiseMatmulConfig:
        def __init__(self, block_size, use_block_parallel, block_sharding_strategy, skip_dma_token, skip_dma_weight,
                     logical_nc_config, blockwise_nki_autograd_cls, use_torch_block_wise,
                     parallelize_token_to_block_mapping, optimized_block_to_token_mapping,
                     always_augment_inputs_for_blockwise_matmul, use_shard_on_intermediate_dynamic_while,
                     use_shard_on_block_dynamic_while, num_static_blocks, pad_num_blocks_to_even=False):
            self.block_size = block_size
            self.logical_nc_config = logical_nc_config
            self.use_block_parallel = use_block_parallel
            self.block_sharding_strategy = block_sharding_strategy
            self.use_torch_block_wise = use_torch_block_wise
            self.skip_dma_token = skip_dma_token
            self.skip_dma_weight = skip_dma_weight
            self.optimized_block_to_token_mapping = optimized_block_to_token_mapping
            self.blockwise_nki_autograd_cls = blockwise_nki_autograd_cls
            self.parallelize_token_to_block_mapping = parallelize_token_to_block_mapping
            self.always_augment_inputs_for_blockwise_matmul = always_augment_inputs_for_blockwise_matmul
            self.use_shard_on_intermediate_dynamic_while = use_shard_on_intermediate_dynamic_while
            self.use_shard_on_block_dynamic_while = use_shard_on_block_dynamic_while
            self.num_static_blocks = num_static_blocks
            self.pad_num_blocks_to_even = pad_num_blocks_to_even

        @staticmethod
        def from_kwargs(**kwargs):
            cls = kwargs.pop("blockwise_nki_autograd_cls", None)
            if isinstance(cls, dict):
                import importlib
                cls = getattr(importlib.import_module(cls["__module__"]), cls["__name__"])
            return BlockwiseMatmulConfig(
                block_size=kwargs.pop("block_size", 512), use_block_parallel=kwargs.pop("use_block_parallel", False),
                block_sharding_strategy=kwargs.pop("block_sharding_strategy", BlockShardStrategy.HI_LO),
                skip_dma_token=kwargs.pop("skip_dma_token", False),
                skip_dma_weight=kwargs.pop("skip_dma_weight", False),
                logical_nc_config=kwargs.pop("logical_nc_config", 2), blockwise_nki_autograd_cls=cls,
                use_torch_block_wise=kwargs.pop("use_torch_block_wise", False),
                parallelize_token_to_block_mapping=kwargs.pop("parallelize_token_to_block_mapping", True),
                optimized_block_to_token_mapping=kwargs.pop("optimized_block_to_token_mapping", True),
                always_augment_inputs_for_blockwise_matmul=kwargs.pop("always_augment_inputs_for_blockwise_matmul",
                                                                      False),
                use_shard_on_intermediate_dynamic_while=kwargs.pop("use_shard_on_intermediate_dynamic_while", False),
                use_shard_on_block_dynamic_while=kwargs.pop("use_shard_on_block_dynamic_while", False),
                num_static_blocks=kwargs.pop("num_static_blocks", None),
                pad_num_blocks_to_even=kwargs.pop("pad_num_blocks_to_even", False))

    if gate_drift:
        def can_use_blockwise_matmul_nki(hidden_size, intermediate_size_tp, block_size, glu_mlp, glu_type,
                                         use_torch_block_wise, device, logical_nc_config, use_block_parallel=False,
                                         use_shard_on_intermediate=False, use_bias=False):
            return False
    else:
        def can_use_blockwise_matmul_nki(hidden_size, intermediate_size_tp, block_size, glu_mlp, glu_type,
                                         use_torch_block_wise, device, logical_nc_config, use_block_parallel=False,
                                         use_shard_on_intermediate=False, use_shard_on_block_dynamic_while=False,
                                         use_bias=False, scaling_factor=1.0, act_fn="silu",
                                         gate_clamp_upper_limit=None, gate_clamp_lower_limit=None,
                                         up_clamp_upper_limit=None, up_clamp_lower_limit=None):
            return False

    class ExpertMLPsV2(torch.nn.Module):
        def __init__(self, blockwise_matmul_config, gate_up, down, top_k=2, ep_degree=1):
            super().__init__()
            self.blockwise_matmul_config = blockwise_matmul_config
            self.top_k = top_k
            self.ep_degree = ep_degree
            self.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)    # [E, H, 2I]
            self.down_proj = torch.nn.Parameter(down, requires_grad=False)          # [E, I, H]
            self.eval()                              # NxDI's initialize_moe_module returns the MoE in eval mode

        @staticmethod
        def get_block_conditions(block_size, num_blocks, token_position_to_id):
            blocks = token_position_to_id.view(num_blocks, block_size)
            return torch.any(blocks != -1, dim=1).to(torch.int32)

        def forward_blockwise(self, hidden, affinities_masked, token_position_to_id, block_to_expert):
            cfg = self.blockwise_matmul_config
            t = hidden.shape[0]
            num_blocks = block_to_expert.shape[0]
            if cfg.num_static_blocks is not None:
                num_static_blocks = cfg.num_static_blocks
            else:                                    # NxD: T * top_k / (EP * B), a perfectly balanced load
                num_static_blocks = math.ceil(math.ceil(t * self.top_k / self.ep_degree) / cfg.block_size)
            if cfg.use_shard_on_block_dynamic_while:
                conditions = self.get_block_conditions(cfg.block_size, num_blocks, token_position_to_id)[::2]
            elif cfg.use_shard_on_intermediate_dynamic_while:
                conditions = self.get_block_conditions(cfg.block_size, num_blocks, token_position_to_id)
            else:
                conditions = None
            cls = cfg.blockwise_nki_autograd_cls if cfg.blockwise_nki_autograd_cls else BlockwiseMatmulNKIFunc
            return cls.apply(hidden, affinities_masked, self.gate_up_proj, self.down_proj, token_position_to_id,
                             block_to_expert, None, None, self.training, cfg, self.top_k > 1,
                             ExpertAffinityScaleMode.POST_SCALE, conditions, num_static_blocks, None, None, None, None,
                             None, None, 0)

    ns = types.ModuleType("fake_nxd_expert_mlps_v2")
    ns.can_use_blockwise_matmul_nki = can_use_blockwise_matmul_nki
    ns.BlockwiseMatmulNKIFunc = BlockwiseMatmulNKIFunc          # expert_mlps_v2 imports both from blockwise.py
    for c in (ExpertMLPsV2, BlockwiseMatmulNKIFunc):
        c.__module__ = ns.__name__
    ns.ExpertMLPsV2 = ExpertMLPsV2
    return types.SimpleNamespace(BlockwiseMatmulConfig=BlockwiseMatmulConfig, ExpertMLPsV2=ExpertMLPsV2,
                                 BlockwiseMatmulNKIFunc=BlockwiseMatmulNKIFunc, module=ns,
                                 can_use_blockwise_matmul_nki=can_use_blockwise_matmul_nki)


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
