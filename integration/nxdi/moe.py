"""NxD blockwise-MoE adapter: an autograd class for `BlockwiseMatmulConfig.blockwise_nki_autograd_cls`.

NxD calls the configured class from ``ExpertMLPsV2.forward_blockwise`` (NxD 0.17 / SDK 2.28 and
0.18 / SDK 2.29, unchanged; read at aws-neuron/neuronx-distributed @fbac349 "Release 2.29",
``modules/moe/{expert_mlps_v2,blockwise,moe_configs}.py``) as ``cls.apply(...)`` with 21 positional arguments::

    hidden_states            [T, H]            token hidden states (not padded)
    expert_affinities_masked [T, E_l]          affinities of the local experts, 0 where not routed
                                               (top-k renormalised by NxD when configured)
    gate_up_proj_weight      [E_l, H, 2*I_tp]  per rank [gate | up] (stride-2 sharding)
    down_proj_weight         [E_l, I_tp, H]
    token_position_to_id     [N*B]             token id per block slot, -1 = padding
    block_to_expert          [N]               local expert of each block, experts contiguous, in order
    gate_up_proj_scale, down_proj_scale        quantisation scales (None for bf16 weights)
    is_training, blockwise_matmul_config, multi_expert_per_token (top_k > 1),
    expert_affinities_scaling_mode (POST_SCALE=1 / PRE_SCALE=2 / NO_SCALE=0), conditions,
    num_static_blocks, gate/up clamp limits (4), gate_up_proj_bias, down_proj_bias, kernel_act_fn_id

and expects the TP-partial output ``[T, H]`` (NxD all-reduces it afterwards). Our kernel
`nki_kernels.moe_blockwise` takes exactly NxD's per-rank weight layout (``gate_up`` viewed as
``[E, H, 2, I]``) and mapping (``token_position_to_id`` with -1 padding), so the adapter only reshapes.

Supported: inference, SiLU GLU (kernel_act_fn_id 0), POST_SCALE, no quantisation scales, no clamps, no
biases. Anything else defers to NxD's own ``BlockwiseMatmulNKIFunc`` when NxD is importable, and raises
otherwise. ``conditions`` / ``num_static_blocks`` are scheduling hints of NxD's dynamic-while kernels;
padded blocks (all -1) already cost nothing in our kernel, so they are ignored.
"""
from __future__ import annotations

import enum


from ._common import fall_back, refusals, DISABLE_ENV, AdapterInputError, accepted_kwargs, disabled, kernel, warn_once

FAMILY = "moe"
KERNEL_NAME = "moe_blockwise"

# NxD's ExpertAffinityScaleMode values (nkilib utils.common_types).
NO_SCALE, POST_SCALE, PRE_SCALE = 0, 1, 2
# ACTFunc.SILU.value: the kernel_act_fn_id NxD passes for GLU + silu (model_utils.get_kernel_activation_func_id).
SILU_ACT_FN_ID = 0

# Names of the 21 arguments of BlockwiseMatmulNKIFunc.forward (NxD 0.18), in order.
APPLY_ARGS = (
    "hidden_states", "expert_affinities_masked", "gate_up_proj_weight", "down_proj_weight",
    "token_position_to_id", "block_to_expert", "gate_up_proj_scale", "down_proj_scale", "is_training",
    "blockwise_matmul_config", "multi_expert_per_token", "expert_affinities_scaling_mode", "conditions",
    "num_static_blocks", "gate_clamp_upper_limit", "gate_clamp_lower_limit", "up_clamp_upper_limit",
    "up_clamp_lower_limit", "gate_up_proj_bias", "down_proj_bias", "kernel_act_fn_id",
)


def _enum_value(x):
    if isinstance(x, enum.Enum):
        return x.value
    return int(x)


def check_blockwise_support(hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,
                            gate_up_proj_scale=None, down_proj_scale=None, is_training=False,
                            expert_affinities_scaling_mode=POST_SCALE, gate_clamp_upper_limit=None,
                            gate_clamp_lower_limit=None, up_clamp_upper_limit=None, up_clamp_lower_limit=None,
                            gate_up_proj_bias=None, down_proj_bias=None, kernel_act_fn_id=SILU_ACT_FN_ID):
    """(ok, reason) for one blockwise call."""
    if is_training:
        return False, "training (backward) is not implemented by the nki-kernels adapter"
    if gate_up_proj_scale is not None or down_proj_scale is not None:
        return False, "quantised weights (gate_up_proj_scale/down_proj_scale) are not supported"
    if any(x is not None for x in (gate_clamp_upper_limit, gate_clamp_lower_limit, up_clamp_upper_limit,
                                   up_clamp_lower_limit)):
        return False, "gate/up clamp limits are not supported"
    if gate_up_proj_bias is not None or down_proj_bias is not None:
        return False, "expert biases are not supported"
    if _enum_value(expert_affinities_scaling_mode) != POST_SCALE:
        return False, (f"expert_affinities_scaling_mode={expert_affinities_scaling_mode} "
                       "(only POST_SCALE is supported)")
    if _enum_value(kernel_act_fn_id) != SILU_ACT_FN_ID:
        return False, f"kernel_act_fn_id={kernel_act_fn_id} (only SiLU GLU, id {SILU_ACT_FN_ID}, is supported)"
    if hidden_states.dim() != 2 or gate_up_proj_weight.dim() != 3 or down_proj_weight.dim() != 3:
        return False, (f"unexpected ranks: hidden {tuple(hidden_states.shape)}, gate_up "
                       f"{tuple(gate_up_proj_weight.shape)}, down {tuple(down_proj_weight.shape)}")
    return True, ""


def blockwise_forward(hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,
                      token_position_to_id, block_to_expert, block_size, lnc=1):
    """TP-partial MoE output [T, H] from NxD's blockwise inputs (see the module docstring for layouts)."""
    import torch

    fn = kernel(KERNEL_NAME, FAMILY)
    t, h = hidden_states.shape
    n_exp = gate_up_proj_weight.shape[0]
    if gate_up_proj_weight.shape[1] != h or gate_up_proj_weight.shape[2] % 2:
        raise AdapterInputError(
            f"nxdi moe: gate_up_proj_weight must be [E, H={h}, 2*I], got {tuple(gate_up_proj_weight.shape)}")
    i_tp = gate_up_proj_weight.shape[2] // 2
    if tuple(down_proj_weight.shape) != (n_exp, i_tp, h):
        raise AdapterInputError(f"nxdi moe: down_proj_weight must be [E={n_exp}, I={i_tp}, H={h}], "
                                f"got {tuple(down_proj_weight.shape)}")
    if tuple(expert_affinities_masked.shape) != (t, n_exp):
        raise AdapterInputError(f"nxdi moe: expert_affinities_masked must be [T={t}, E_local={n_exp}], "
                                f"got {tuple(expert_affinities_masked.shape)}")
    n_blocks = block_to_expert.reshape(-1).shape[0]
    if token_position_to_id.reshape(-1).shape[0] != n_blocks * block_size:
        raise AdapterInputError(
            f"nxdi moe: token_position_to_id must have N*B = {n_blocks}*{block_size} entries, "
            f"got {token_position_to_id.reshape(-1).shape[0]}")
    gate_up = gate_up_proj_weight.reshape(n_exp, h, 2, i_tp)            # NxD's own kernel view
    tok = token_position_to_id.reshape(-1).to(torch.int32)
    blk = block_to_expert.reshape(-1).to(torch.int32)
    aff = expert_affinities_masked.to(hidden_states.dtype)
    out = fn(hidden_states.contiguous(), aff.contiguous(), gate_up.contiguous(), down_proj_weight.contiguous(),
             tok.contiguous(), blk.contiguous(), int(block_size), **accepted_kwargs(fn, lnc=int(lnc)))
    if isinstance(out, tuple):
        out = out[0]
    return out.to(hidden_states.dtype)


def _stock_cls():
    try:
        from neuronx_distributed.modules.moe.blockwise import BlockwiseMatmulNKIFunc
        return BlockwiseMatmulNKIFunc
    except Exception:
        return None


def _torch_function_base():
    import torch
    return torch.autograd.Function


class BlockwiseMatmulNKIKernelsFunc(_torch_function_base()):
    """Drop-in for NxD's ``BlockwiseMatmulNKIFunc`` running `nki_kernels.moe_blockwise`.

    Set it with ``blockwise_matmul_config={"blockwise_nki_autograd_cls": BLOCKWISE_AUTOGRAD_CLS_SPEC}``
    in ``MoENeuronConfig`` (the dict form survives config serialisation), or let ``apply()`` install it.
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        bound = dict(zip(APPLY_ARGS, args))
        bound.update(kwargs)
        unknown = sorted(set(bound) - set(APPLY_ARGS))
        if unknown or len(args) > len(APPLY_ARGS):
            raise AdapterInputError(f"nxdi moe: unexpected arguments {unknown or len(args)}; "
                                    f"expected NxD's 21 arguments {APPLY_ARGS}")
        check_kwargs = {k: bound[k] for k in (
            "gate_up_proj_scale", "down_proj_scale", "is_training", "expert_affinities_scaling_mode",
            "gate_clamp_upper_limit", "gate_clamp_lower_limit", "up_clamp_upper_limit", "up_clamp_lower_limit",
            "gate_up_proj_bias", "down_proj_bias", "kernel_act_fn_id") if k in bound}
        ok, reason = (False, f"{DISABLE_ENV} is set") if disabled() else check_blockwise_support(
            bound["hidden_states"], bound["expert_affinities_masked"], bound["gate_up_proj_weight"],
            bound["down_proj_weight"], **check_kwargs)
        if not ok:
            stock = _stock_cls()
            if stock is None:
                raise NotImplementedError(f"nxdi moe: {reason}, and NxD's BlockwiseMatmulNKIFunc is not "
                                          "importable to fall back to")
            warn_once(f"moe-{reason}", f"nxdi moe: {reason}; using NxD's BlockwiseMatmulNKIFunc")
            return stock.apply(*args, **kwargs)
        try:
            return super().apply(*args, **kwargs)
        except refusals() as exc:        # a kernel limit (H % 128, one expert's weights in SBUF, ...), a check
            stock = _stock_cls()
            if stock is None:
                raise
            fall_back("moe: BlockwiseMatmulNKIKernelsFunc.apply", exc)
            return stock.apply(*args, **kwargs)

    @staticmethod
    def forward(ctx, hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,
                token_position_to_id, block_to_expert, gate_up_proj_scale, down_proj_scale, is_training,
                blockwise_matmul_config, multi_expert_per_token=True, expert_affinities_scaling_mode=POST_SCALE,
                conditions=None, num_static_blocks=None, gate_clamp_upper_limit=None, gate_clamp_lower_limit=None,
                up_clamp_upper_limit=None, up_clamp_lower_limit=None, gate_up_proj_bias=None, down_proj_bias=None,
                kernel_act_fn_id=1):
        block_size = getattr(blockwise_matmul_config, "block_size", None)
        n_blocks = block_to_expert.reshape(-1).shape[0]
        if block_size is None:
            block_size = token_position_to_id.reshape(-1).shape[0] // max(n_blocks, 1)
        lnc = int(getattr(blockwise_matmul_config, "logical_nc_config", 1) or 1)
        return blockwise_forward(hidden_states, expert_affinities_masked, gate_up_proj_weight, down_proj_weight,
                                 token_position_to_id, block_to_expert, int(block_size), lnc=lnc)

    @staticmethod
    def backward(ctx, grad_output):
        raise NotImplementedError("nxdi moe: BlockwiseMatmulNKIKernelsFunc is inference-only (no backward)")


# The serialisable form NxD's BlockwiseMatmulConfig.from_kwargs resolves with importlib.
BLOCKWISE_AUTOGRAD_CLS_SPEC = {"__name__": BlockwiseMatmulNKIKernelsFunc.__name__, "__module__": __name__}


def blockwise_matmul_config_kwargs(block_size=None, **extra):
    """`blockwise_matmul_config` entries for MoENeuronConfig that route NxD's blockwise path to our kernel."""
    cfg = {"blockwise_nki_autograd_cls": dict(BLOCKWISE_AUTOGRAD_CLS_SPEC)}
    if block_size is not None:
        cfg["block_size"] = int(block_size)
    cfg.update(extra)
    return cfg


def can_use_blockwise_matmul_nki(hidden_size, intermediate_size_tp, block_size, glu_mlp, glu_type,
                                 use_torch_block_wise, device, logical_nc_config, use_block_parallel=False,
                                 use_shard_on_intermediate=False, use_shard_on_block_dynamic_while=False,
                                 use_bias=False, scaling_factor=1.0, act_fn="silu", gate_clamp_upper_limit=None,
                                 gate_clamp_lower_limit=None, up_clamp_upper_limit=None,
                                 up_clamp_lower_limit=None):
    """NxD's gate with the limits of *our* kernel (same signature as NxD 0.18's function).

    NxD's own gate demands LNC=2, block_size in {128..1024}, H % 512 == 0 and I_tp % 16 == 0 (the stock
    kernels' limits); `nki_kernels.moe_blockwise` takes any I (48, 64, 96...), block sizes 32-512 and
    either LNC, so `apply(..., relax_moe_gate=True)` installs this in `expert_mlps_v2`.
    """
    if use_torch_block_wise or not glu_mlp or use_bias or use_block_parallel:
        return False
    if any(x is not None for x in (gate_clamp_upper_limit, gate_clamp_lower_limit, up_clamp_upper_limit,
                                   up_clamp_lower_limit)):
        return False
    glu_name = getattr(glu_type, "name", str(glu_type)).upper()
    act_name = getattr(act_fn, "name_str", getattr(act_fn, "value", act_fn))
    if glu_name.endswith("SWIGLU") or str(act_name).lower() != "silu":
        return False
    if getattr(device, "type", str(device)) == "cpu":
        return False          # NxD's CPU path (torch_blockwise_matmul_inference) stays in charge on CPU
    return block_size >= 1 and intermediate_size_tp >= 1 and hidden_size >= 1


__all__ = ["BlockwiseMatmulNKIKernelsFunc", "BLOCKWISE_AUTOGRAD_CLS_SPEC", "blockwise_matmul_config_kwargs",
           "blockwise_forward", "check_blockwise_support", "can_use_blockwise_matmul_nki"]
