"""MoE hook: an `ExpertsInterface` function running our blockwise (prefill) and decode MoE kernels.

transformers' `@use_experts_implementation` experts modules dispatch on `config._experts_implementation` to
``fn(experts, hidden_states[N,H], top_k_index[N,K], top_k_weights[N,K]) -> [N,H]`` (the router is not
replaced). Their weights are fused 3D parameters: `gate_up_proj [E, 2I, H]` (gate rows then up rows, used as
`F.linear(x, W[e])`) and `down_proj [E, H, I]`. Our kernels take NxDI's per-rank layout `gate_up [E, H, 2, I]`
and `down [E, I, H]`; the conversion is the public converter `nki_kernels.moe.experts_from_transformers` in its
view form (`contiguous=False`), per call, staged for the launch and dropped afterwards
(no second copy of the weights is kept: docs/inputs.md, "Memory of patch()").

Few tokens (decode, T*K small) go to `moe_decode`, which loads only the selected experts; longer inputs go
through `moe_block_mapping` + `moe_blockwise`. The shared expert and its sigmoid gate sit in the sparse-MoE
block, outside this interface (P6); `shared_expert_block_forward` moves them into the kernel (`shared=`).
"""
from __future__ import annotations

from nki_kernels.moe.weights import experts_from_transformers, shared_from_transformers

from ._common import FORWARD_ONLY_REASON, kernel_input, kernel_refusals, needs_grad, refusal_reason, to_torch

EXPERTS_KEY = "nki_kernels"
# Tokens at or below which the decode kernel is used (issue 6: decode kernel for 1-32 tokens).
_DECODE_MAX_TOKENS = 32
# Block size of the blockwise kernel for the small token counts the integration sees here; the kernel accepts
# 32..512 (issue 6) and small blocks waste least padding when T*K/E is small.
_BLOCK_SIZE = 32


def _eager_experts(experts, hidden_states, top_k_index, top_k_weights):
    """transformers' own eager loop (the decorated class keeps the original forward under __wrapped__)."""
    fwd = type(experts).forward
    orig = getattr(fwd, "__wrapped__", None)
    if orig is None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden_states, top_k_index, top_k_weights)
    return orig(experts, hidden_states, top_k_index, top_k_weights)


class MoEHook:
    def __init__(self, kernels, stats):
        self.kernels = kernels
        self.stats = stats

    @staticmethod
    def layout(experts):
        """(gate_up [E,H,2,I], down [E,I,H]) in the experts' dtype: strided views of the module's own parameters.

        Nothing is cached: the hook keeps no second copy of the expert weights (issue 16). Each call hands the
        views to the wrapper, which stages them for the launch (`kernel_input` makes them contiguous; the
        emulator copies every input into its HBM model anyway), and the staged copy is freed when the call
        returns. Peak extra memory is one layer's experts during that layer's call; persistent extra: none."""
        return experts_from_transformers(experts.gate_up_proj, experts.down_proj, contiguous=False)

    def unsupported(self, experts, hidden_states=None):
        if needs_grad(hidden_states, experts.gate_up_proj):
            return FORWARD_ONLY_REASON
        if getattr(experts, "is_transposed", False):
            return "transposed expert weights"
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_bias", False):
            return "experts without gate or with bias"
        if not getattr(experts, "is_concatenated", True):
            return "interleaved gate/up layout"
        if getattr(experts, "has_post_expert_norm", False):
            return "post-expert norm"
        if getattr(experts, "_is_expert_parallel", False):
            return "expert parallel module"
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            return f"activation {act!r}"
        return None

    def run(self, experts, hidden_states, top_k_index, top_k_weights, shared=None):
        """Our kernels on [N,H] tokens; returns [N,H] in the hidden dtype, or None if a kernel is missing."""
        import torch
        N, H = hidden_states.shape
        E = experts.num_experts
        gate_up, down = self.layout(experts)
        be = self.kernels.backend
        idx = top_k_index.to(torch.int32)
        w = top_k_weights.to(hidden_states.dtype)
        dec = self.kernels.get("moe_decode")
        if N <= _DECODE_MAX_TOKENS and dec is not None:
            kw = {} if shared is None else {"shared": tuple(kernel_input(s, be) for s in shared)}
            out = dec(kernel_input(hidden_states, be), kernel_input(idx, be), kernel_input(w, be),
                      kernel_input(gate_up, be), kernel_input(down, be), **kw)
            self.stats.called("moe_decode")
            return to_torch(out, like=hidden_states)
        blk = self.kernels.get("moe_blockwise")
        mapping = self.kernels.get("moe_block_mapping")
        if blk is None or mapping is None:
            return None
        tpos, b2e = mapping(kernel_input(idx, be), E, _BLOCK_SIZE)
        kw = {} if shared is None else {"shared": tuple(kernel_input(s, be) for s in shared)}
        out = blk(kernel_input(hidden_states, be), kernel_input(w, be), kernel_input(gate_up, be),
                  kernel_input(down, be), tpos, b2e, _BLOCK_SIZE, top_k_index=kernel_input(idx, be), **kw)
        self.stats.called("moe_blockwise")
        return to_torch(out, like=hidden_states)

    def __call__(self, experts, hidden_states, top_k_index, top_k_weights):
        why = self.unsupported(experts, hidden_states)
        out = None
        if why is None:
            if self.kernels.get("moe_decode") is None and self.kernels.get("moe_blockwise") is None:
                why = "moe kernels not available"
            else:
                try:
                    out = self.run(experts, hidden_states, top_k_index, top_k_weights)
                except kernel_refusals() as exc:
                    out, why = None, refusal_reason(exc)
                if out is None and why is None:
                    why = "moe_blockwise not available"
        if out is None:
            self.stats.fell_back("moe", why)
            return _eager_experts(experts, hidden_states, top_k_index, top_k_weights)
        return out


class _Dispatcher:
    """The function registered under EXPERTS_KEY; routes to the hook stored on the experts module."""

    def __call__(self, experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        hook = getattr(experts, "_nki_moe_hook", None)
        if hook is None or args or kwargs:
            stock = getattr(type(experts).forward, "__wrapped__", None)
            return stock(experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return hook(experts, hidden_states, top_k_index, top_k_weights)


DISPATCH = _Dispatcher()


_REFS = [0]
_SAVED = {}


def register():
    """Register EXPERTS_KEY in ExpertsInterface (reference counted; `unregister()` undoes it)."""
    from transformers.integrations.moe import ExpertsInterface
    if _REFS[0] == 0:
        _SAVED["old"] = ExpertsInterface._global_mapping.get(EXPERTS_KEY)
    _REFS[0] += 1
    ExpertsInterface.register(EXPERTS_KEY, DISPATCH)


def unregister():
    from transformers.integrations.moe import ExpertsInterface
    if _REFS[0] == 0:
        return
    _REFS[0] -= 1
    if _REFS[0] == 0:
        old = _SAVED.pop("old", None)
        if old is None:
            ExpertsInterface._global_mapping.pop(EXPERTS_KEY, None)
        else:
            ExpertsInterface._global_mapping[EXPERTS_KEY] = old


def shared_layout(block):
    """(gate_up [H, 2, Is], down [Is, H], gate vector [H]) of a block's shared expert, or None if it is not the
    SwiGLU + Linear(H, 1) sigmoid gate the kernel fuses."""
    se, sg = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    if se is None or sg is None or getattr(sg, "bias", None) is not None or sg.weight.shape[0] != 1:
        return None
    if any(getattr(getattr(se, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = getattr(getattr(se, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return None
    return shared_from_transformers(se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, sg.weight)


def shared_expert_block_forward(self, hidden_states):
    """Sparse-MoE block forward with the shared expert and its sigmoid gate fused into the MoE kernel launch.
    Same routing as the stock block (its own router module); anything unsupported runs the stock forward."""
    hook = getattr(self, "_nki_moe_hook", None)
    experts = self.experts
    if hook is None or getattr(experts.config, "_experts_implementation", None) != EXPERTS_KEY \
            or hook.unsupported(experts, hidden_states) is not None:
        return self._nki_stock_forward(hidden_states)
    shared = shared_layout(self)
    # fallbacks of the fused block count under their own hook name: the stock forward then calls the experts,
    # whose own hook counts (under "moe") whatever it does with them
    if shared is None:
        hook.stats.fell_back("moe shared block", "shared expert is not SwiGLU + sigmoid gate")
        return self._nki_stock_forward(hidden_states)
    B, S, H = hidden_states.shape
    x = hidden_states.reshape(-1, H)
    _, routing_weights, selected_experts = self.gate(x)
    try:
        out = hook.run(experts, x, selected_experts, routing_weights, shared=shared)
        why = "moe_blockwise not available"
    except kernel_refusals() as exc:
        out, why = None, refusal_reason(exc)
    if out is None:
        hook.stats.fell_back("moe shared block", why)
        return self._nki_stock_forward(hidden_states)
    return out.reshape(B, S, H)
