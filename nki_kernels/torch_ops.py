"""Every public kernel as a `torch.library` custom op, so `torch.compile` graphs trace through our kernels.

Call `register()` once (explicit, no import-time side effect: importing this module registers nothing). It
defines the ops ``torch.ops.nki_kernels.<name>`` (one per name in ``nki_kernels.__all__``), each with

* a schema: tensors, optional tensors, scalars; arguments a kernel writes are declared mutable
  (``Tensor(a!)``: ``gated_delta_rule_step``'s ``state_pool``, ``causal_conv1d_update``'s ``conv_state``), so
  functionalization (AOTAutograd, TorchNeuron's ``backend="neuron"``) knows about the in-place update;
* a real implementation (``CompositeExplicitAutograd``: any device) that calls the public host wrapper, i.e. the
  NKI kernel: on the emulator here, through ``nki.jit`` on a Trainium host;
* a fake (meta) implementation giving the output shapes and dtypes from the input shapes only (a kernel is
  traced once: its outputs never depend on tensor values). ``moe_block_mapping`` without ``num_blocks`` is the
  one data-dependent shape: its fake allocates an unbacked block count (pass ``num_blocks``, NxD's static
  worst case, to keep graphs static). Each fake first runs the public wrapper's own checks that read no tensor
  values (``check_<name>`` beside the wrapper, which the wrapper itself runs first: shapes, dtypes, options,
  on-chip fits), so a call the eager wrapper refuses for those (flash_attention at D = 257) fails at trace time
  with the same ``KernelInputError``, not when the compiled graph runs. The checks of values (lengths,
  cu_seqlens, ids, slots, mappings, uniforms) run when the op runs; a check on a data-dependent size (the
  unbacked block count above) is left to the run as well, and a dynamic size is checked at its traced value
  without a guard (the graph stays dynamic; the wrapper checks the other values when the op runs).

Why explicit registration rather than ``@torch.library.custom_op`` at module level: decorators register as a
side effect of importing, which the project's style rules out (STYLE.md, rule 9); `torch.library.Library`
objects made inside `register()` keep everything in one place and can be dropped again with `unregister()`.

The Python functions below (``flash_attention``, ``gated_delta_rule``, ...) take the public wrappers' argument
lists and call the ops, converting the structured arguments a schema cannot carry: ``shared=(gate_up, down,
gate)`` becomes three optional tensors, a ``CodePredictorWeights`` its thirteen tensors plus the head counts
and eps. Differences from the public wrappers (documented per function): ``gated_delta_rule`` always computes
the final state (``output_final_state=False`` drops it after the op) and has no ``checkpoint_every``
(``cu_seqlens`` is there, as in ``flash_attention_varlen`` and ``causal_conv1d``); ``code_predictor`` always
returns the codec sum (dropped unless ``return_sum``).

Gradients: no autograd formula is registered (the kernels are forward / inference kernels, see KERNELS.md);
calling an op on inputs that require grad raises torch's usual "does not require grad" error on backward.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

NAMESPACE = "nki_kernels"

_LIBS: list = []


@dataclass(frozen=True)
class OpSpec:
    name: str            # op name == public kernel name
    schema: str          # arguments and returns (without the name)
    impl: Callable       # real implementation (tensors in, fresh tensors out)
    fake: Callable       # shapes and dtypes only


def _public(name):
    import nki_kernels
    return getattr(nki_kernels, name)


def _with_lnc(fn, kwargs, lnc):
    """Pass lnc only when given and accepted (wrappers resolve None themselves)."""
    if lnc is not None and "lnc" in inspect.signature(fn).parameters:
        kwargs["lnc"] = lnc
    return kwargs


def _fresh(outs, inputs):
    """Custom ops must not return their inputs (or views of them): clone any output sharing storage with one."""
    import torch

    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}

    def one(t):
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() in ptrs:
            return t.clone()
        return t
    if isinstance(outs, tuple):
        return tuple(one(t) for t in outs)
    return one(outs)


def _validate(name, *args, **kwargs):
    """The public wrapper's value-free checks (`check_<name>` in the wrapper's module) on a fake's inputs."""
    import contextlib
    import importlib

    import torch
    import nki_kernels

    check = getattr(importlib.import_module(nki_kernels._EXPORTS[name]), "check_" + name)
    fake_mode = torch._guards.detect_fake_mode([a for a in list(args) + list(kwargs.values())
                                                if isinstance(a, torch.Tensor)])
    shape_env = getattr(fake_mode, "shape_env", None)
    # a dynamic size is checked at the traced example's value without a guard (the graph stays dynamic; other
    # values are checked by the wrapper when the op runs)
    with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
        try:
            check(*args, **kwargs)
        except torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode:
            pass    # a data-dependent size (moe_block_mapping without num_blocks): the wrapper checks it when run


def _shared(gate_up, down, gate):
    if gate_up is None and down is None and gate is None:
        return None
    return (gate_up, down, gate)


# ------------------------------------------------------------------------------------------ implementations


def _tiled_matmul(lhsT, rhs, lnc=None):
    fn = _public("tiled_matmul")
    return _fresh(fn(lhsT, rhs, **_with_lnc(fn, {}, lnc)), (lhsT, rhs))


def _tiled_matmul_fake(lhsT, rhs, lnc=None):
    _validate("tiled_matmul", lhsT, rhs, lnc=lnc)
    return lhsT.new_empty((lhsT.shape[1], rhs.shape[1]))


def _softmax(x, lnc=None):
    fn = _public("softmax")
    return _fresh(fn(x, **_with_lnc(fn, {}, lnc)), (x,))


def _softmax_fake(x, lnc=None):
    _validate("softmax", x, lnc=lnc)
    return x.new_empty(x.shape)


def _rmsnorm(x, weight, eps=1e-6, lnc=None):
    fn = _public("rmsnorm")
    return _fresh(fn(x, weight, eps=eps, **_with_lnc(fn, {}, lnc)), (x, weight))


def _rmsnorm_fake(x, weight, eps=1e-6, lnc=None):
    _validate("rmsnorm", x, weight, eps=eps, lnc=lnc)
    return x.new_empty(x.shape)


def _flash_attention(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=None):
    fn = _public("flash_attention")
    out = fn(q, k, v, gate=gate, seq_lens=seq_lens, causal=causal, softmax_scale=softmax_scale,
             **_with_lnc(fn, {}, lnc))
    return _fresh(out, (q, k, v, gate, seq_lens))


def _flash_attention_fake(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=None):
    _validate("flash_attention", q, k, v, gate=gate, seq_lens=seq_lens, causal=causal, softmax_scale=softmax_scale,
              lnc=lnc)
    return q.new_empty(q.shape)


def _flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    fn = _public("flash_attention_decode")
    out = fn(q, k_cache, v_cache, cache_lens, causal=causal, softmax_scale=softmax_scale, **_with_lnc(fn, {}, lnc))
    return _fresh(out, (q, k_cache, v_cache, cache_lens))


def _flash_attention_decode_fake(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    _validate("flash_attention_decode", q, k_cache, v_cache, cache_lens, causal=causal, softmax_scale=softmax_scale,
              lnc=lnc)
    return q.new_empty(q.shape)


def _flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None,
                            lnc=None, max_seqlen_q=None, max_seqlen_k=None):
    fn = _public("flash_attention_varlen")
    out = fn(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale, gate=gate,
             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **_with_lnc(fn, {}, lnc))
    return _fresh(out, (q, k, v, cu_seqlens_q, cu_seqlens_k, gate))


def _flash_attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None,
                                 lnc=None, max_seqlen_q=None, max_seqlen_k=None):
    _validate("flash_attention_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale,
              gate=gate, lnc=lnc, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return q.new_empty(q.shape)


def _gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, use_qk_l2norm_in_kernel=False,
                      valid_lengths=None, scale=None, lnc=None, cu_seqlens=None):
    fn = _public("gated_delta_rule")
    o, final = fn(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state, output_final_state=True,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, valid_lengths=valid_lengths, scale=scale,
                  cu_seqlens=cu_seqlens, **_with_lnc(fn, {}, lnc))[:2]
    return _fresh((o, final), (q, k, v, g, beta, initial_state, valid_lengths, cu_seqlens))


def _gated_delta_rule_fake(q, k, v, g, beta, chunk_size=64, initial_state=None, use_qk_l2norm_in_kernel=False,
                           valid_lengths=None, scale=None, lnc=None, cu_seqlens=None):
    import torch
    _validate("gated_delta_rule", q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state,
              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, valid_lengths=valid_lengths, scale=scale,
              cu_seqlens=cu_seqlens, lnc=lnc)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    n_states = b if cu_seqlens is None else cu_seqlens.shape[0] - 1       # one final state per packed sequence
    return q.new_empty((b, t, hv, dv)), q.new_empty((n_states, hv, dk, dv), dtype=torch.float32)


def _gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False, scale=None,
                           lnc=None):
    fn = _public("gated_delta_rule_step")
    out = fn(q, k, v, g, beta, state_pool, slot_ids, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, scale=scale,
             **_with_lnc(fn, {}, lnc))
    if isinstance(out, tuple):
        out = out[0]
    return _fresh(out, (q, k, v, g, beta, state_pool, slot_ids))


def _gated_delta_rule_step_fake(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False,
                                scale=None, lnc=None):
    _validate("gated_delta_rule_step", q, k, v, g, beta, state_pool, slot_ids,
              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, scale=scale, lnc=lnc)
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2], v.shape[3]))


def _causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None, cu_seqlens=None,
                   lnc=None):
    fn = _public("causal_conv1d")
    out = fn(x, weight, conv_state=conv_state, valid_lengths=valid_lengths, activation=activation, bias=bias,
             cu_seqlens=cu_seqlens, **_with_lnc(fn, {}, lnc))
    return _fresh(tuple(out), (x, weight, conv_state, valid_lengths, bias, cu_seqlens))


def _causal_conv1d_fake(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None,
                        cu_seqlens=None, lnc=None):
    _validate("causal_conv1d", x, weight, conv_state=conv_state, valid_lengths=valid_lengths, activation=activation,
              bias=bias, cu_seqlens=cu_seqlens, lnc=lnc)
    b, c, _ = x.shape
    n_states = b if cu_seqlens is None else cu_seqlens.shape[0] - 1       # one conv state per packed sequence
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    return x.new_empty(x.shape), x.new_empty((n_states, c, weight.shape[1]), dtype=state_dtype)


def _causal_conv1d_update(x, conv_state, weight, activation="silu", bias=None):
    fn = _public("causal_conv1d_update")
    return _fresh(fn(x, conv_state, weight, activation=activation, bias=bias), (x, conv_state, weight, bias))


def _causal_conv1d_update_fake(x, conv_state, weight, activation="silu", bias=None):
    _validate("causal_conv1d_update", x, conv_state, weight, activation=activation, bias=bias)
    return x.new_empty(x.shape)


def _moe_route(router_logits, top_k, normalize):
    return _fresh(tuple(_public("moe_route")(router_logits, top_k, normalize)), (router_logits,))


def _moe_route_fake(router_logits, top_k, normalize):
    import torch
    _validate("moe_route", router_logits, top_k, normalize)
    t = router_logits.shape[0]
    return (router_logits.new_empty((t, top_k), dtype=torch.float32),
            router_logits.new_empty((t, top_k), dtype=torch.int32))


def _moe_block_mapping(top_k_index, num_experts, block_size, expert_offset=0, num_blocks=None):
    out = _public("moe_block_mapping")(top_k_index, num_experts, block_size, expert_offset=expert_offset,
                                        num_blocks=num_blocks)
    return _fresh(tuple(out), (top_k_index,))


def _moe_block_mapping_fake(top_k_index, num_experts, block_size, expert_offset=0, num_blocks=None):
    import torch
    _validate("moe_block_mapping", top_k_index, num_experts, block_size, expert_offset=expert_offset,
              num_blocks=num_blocks)
    if num_blocks is None:                   # the block count depends on the routing: an unbacked size
        num_blocks = torch.library.get_ctx().new_dynamic_size(min=1)
    return (top_k_index.new_empty((num_blocks * block_size,), dtype=torch.int32),
            top_k_index.new_empty((num_blocks,), dtype=torch.int32))


def _moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                   shared_gate_up=None, shared_down=None, shared_gate=None, top_k_index=None, expert_offset=0,
                   lnc=None):
    fn = _public("moe_blockwise")
    out = fn(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
             shared=_shared(shared_gate_up, shared_down, shared_gate), top_k_index=top_k_index,
             expert_offset=expert_offset, **_with_lnc(fn, {}, lnc))
    return _fresh(out, (hidden, expert_affinities, gate_up, down))


def _moe_blockwise_fake(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                        shared_gate_up=None, shared_down=None, shared_gate=None, top_k_index=None, expert_offset=0,
                        lnc=None):
    _validate("moe_blockwise", hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
              block_size, shared=_shared(shared_gate_up, shared_down, shared_gate), top_k_index=top_k_index,
              expert_offset=expert_offset, lnc=lnc)
    return hidden.new_empty(hidden.shape)


def _moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared_gate_up=None, shared_down=None,
                shared_gate=None, expert_offset=0, lnc=None):
    fn = _public("moe_decode")
    out = fn(hidden, top_k_index, top_k_weights, gate_up, down, shared=_shared(shared_gate_up, shared_down,
                                                                                shared_gate),
             expert_offset=expert_offset, **_with_lnc(fn, {}, lnc))
    return _fresh(out, (hidden, gate_up, down))


def _moe_decode_fake(hidden, top_k_index, top_k_weights, gate_up, down, shared_gate_up=None, shared_down=None,
                     shared_gate=None, expert_offset=0, lnc=None):
    _validate("moe_decode", hidden, top_k_index, top_k_weights, gate_up, down,
              shared=_shared(shared_gate_up, shared_down, shared_gate), expert_offset=expert_offset, lnc=lnc)
    return hidden.new_empty(hidden.shape)


# CodePredictorWeights fields, in the op's argument order
_CP_FIELDS = ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm", "wqkv_t", "wo_t", "wgu_t", "wd_t",
              "lm_head_t", "codec_embed", "rope_cos", "rope_sin")


def _cp_weights(arrays, n_q_heads, n_kv_heads, eps):
    from nki_kernels.codepredictor.weights import CodePredictorWeights
    return CodePredictorWeights(**dict(zip(_CP_FIELDS, arrays)), n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, eps=eps)


def _code_predictor(past_hidden, code0_embed, input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t,
                    wd_t, lm_head_t, codec_embed, rope_cos, rope_sin, n_q_heads, n_kv_heads, eps, uniforms=None,
                    do_sample=False, temperature=1.0, top_k=50, top_p=1.0, resident=None, lnc=None):
    arrays = (input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t, wd_t, lm_head_t, codec_embed,
              rope_cos, rope_sin)
    w = _cp_weights(arrays, n_q_heads, n_kv_heads, eps)
    fn = _public("code_predictor")
    out = fn(past_hidden, code0_embed, w, uniforms=uniforms, do_sample=do_sample, temperature=temperature,
             top_k=top_k, top_p=top_p, return_sum=True, resident=resident, **_with_lnc(fn, {}, lnc))
    return _fresh(tuple(out)[:3], (past_hidden, code0_embed) + arrays)


def _code_predictor_fake(past_hidden, code0_embed, input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t,
                         wgu_t, wd_t, lm_head_t, codec_embed, rope_cos, rope_sin, n_q_heads, n_kv_heads, eps,
                         uniforms=None, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, resident=None,
                         lnc=None):
    import torch
    _validate("code_predictor", past_hidden, code0_embed,
              _cp_weights((input_norm, post_norm, q_norm, k_norm, final_norm, wqkv_t, wo_t, wgu_t, wd_t, lm_head_t,
                           codec_embed, rope_cos, rope_sin), n_q_heads, n_kv_heads, eps),
              uniforms=uniforms, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
              return_sum=True, resident=resident, lnc=lnc)
    b, h = past_hidden.shape
    g1 = codec_embed.shape[0]
    return (past_hidden.new_empty((b, g1), dtype=torch.int32), past_hidden.new_empty((b, g1, h)),
            past_hidden.new_empty((b, h)))


_CP_WEIGHTS_SCHEMA = ", ".join(f"Tensor {f}" for f in _CP_FIELDS)

OPS = (
    OpSpec("tiled_matmul", "(Tensor lhsT, Tensor rhs, int? lnc=None) -> Tensor", _tiled_matmul, _tiled_matmul_fake),
    OpSpec("softmax", "(Tensor x, int? lnc=None) -> Tensor", _softmax, _softmax_fake),
    OpSpec("rmsnorm", "(Tensor x, Tensor weight, float eps=1e-06, int? lnc=None) -> Tensor", _rmsnorm,
           _rmsnorm_fake),
    OpSpec("flash_attention", "(Tensor q, Tensor k, Tensor v, Tensor? gate=None, Tensor? seq_lens=None, "
           "bool causal=True, float? softmax_scale=None, int? lnc=None) -> Tensor", _flash_attention,
           _flash_attention_fake),
    OpSpec("flash_attention_decode", "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
           "bool causal=True, float? softmax_scale=None, int? lnc=None) -> Tensor", _flash_attention_decode,
           _flash_attention_decode_fake),
    OpSpec("flash_attention_varlen", "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
           "bool causal=True, float? softmax_scale=None, Tensor? gate=None, int? lnc=None, int? max_seqlen_q=None, "
           "int? max_seqlen_k=None) -> Tensor", _flash_attention_varlen, _flash_attention_varlen_fake),
    OpSpec("gated_delta_rule", "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, int chunk_size=64, "
           "Tensor? initial_state=None, bool use_qk_l2norm_in_kernel=False, Tensor? valid_lengths=None, "
           "float? scale=None, int? lnc=None, Tensor? cu_seqlens=None) -> (Tensor, Tensor)", _gated_delta_rule,
           _gated_delta_rule_fake),
    OpSpec("gated_delta_rule_step", "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state_pool, "
           "Tensor? slot_ids=None, bool use_qk_l2norm_in_kernel=False, float? scale=None, int? lnc=None) -> Tensor",
           _gated_delta_rule_step, _gated_delta_rule_step_fake),
    OpSpec("causal_conv1d", "(Tensor x, Tensor weight, Tensor? conv_state=None, Tensor? valid_lengths=None, "
           "str? activation=\"silu\", Tensor? bias=None, Tensor? cu_seqlens=None, int? lnc=None) -> (Tensor, Tensor)",
           _causal_conv1d, _causal_conv1d_fake),
    OpSpec("causal_conv1d_update", "(Tensor x, Tensor(a!) conv_state, Tensor weight, str? activation=\"silu\", "
           "Tensor? bias=None) -> Tensor", _causal_conv1d_update, _causal_conv1d_update_fake),
    OpSpec("moe_route", "(Tensor router_logits, int top_k, bool normalize) -> (Tensor, Tensor)", _moe_route,
           _moe_route_fake),
    OpSpec("moe_block_mapping", "(Tensor top_k_index, int num_experts, int block_size, int expert_offset=0, "
           "int? num_blocks=None) -> (Tensor, Tensor)", _moe_block_mapping, _moe_block_mapping_fake),
    OpSpec("moe_blockwise", "(Tensor hidden, Tensor expert_affinities, Tensor gate_up, Tensor down, "
           "Tensor token_position_to_id, Tensor block_to_expert, int block_size, Tensor? shared_gate_up=None, "
           "Tensor? shared_down=None, Tensor? shared_gate=None, Tensor? top_k_index=None, int expert_offset=0, "
           "int? lnc=None) -> Tensor", _moe_blockwise, _moe_blockwise_fake),
    OpSpec("moe_decode", "(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up, Tensor down, "
           "Tensor? shared_gate_up=None, Tensor? shared_down=None, Tensor? shared_gate=None, int expert_offset=0, "
           "int? lnc=None) -> Tensor", _moe_decode, _moe_decode_fake),
    OpSpec("code_predictor", f"(Tensor past_hidden, Tensor code0_embed, {_CP_WEIGHTS_SCHEMA}, int n_q_heads, "
           "int n_kv_heads, float eps, Tensor? uniforms=None, bool do_sample=False, float temperature=1.0, "
           "int top_k=50, float top_p=1.0, bool? resident=None, int? lnc=None) -> (Tensor, Tensor, Tensor)",
           _code_predictor, _code_predictor_fake),
)


def register():
    """Define every op under ``torch.ops.nki_kernels`` (idempotent); returns that namespace."""
    import torch

    if not _LIBS:
        lib = torch.library.Library(NAMESPACE, "DEF")
        try:
            for spec in OPS:
                lib.define(spec.name + spec.schema)
                lib.impl(spec.name, spec.impl, "CompositeExplicitAutograd")
                torch.library.register_fake(f"{NAMESPACE}::{spec.name}", spec.fake, lib=lib)
        except Exception:
            lib._destroy()
            raise
        _LIBS.append(lib)
    return getattr(torch.ops, NAMESPACE)


def unregister():
    """Drop the registrations made by `register()` (tests; a process normally keeps them)."""
    while _LIBS:
        _LIBS.pop()._destroy()


def registered() -> bool:
    return bool(_LIBS)


def _ops():
    return register()


# ------------------------------------------------------------------------------------- Python entry points
# Same argument lists as the public wrappers (see each kernel's docstring in KERNELS.md), through the ops.


def tiled_matmul(lhsT, rhs, lnc=None):
    return _ops().tiled_matmul(lhsT, rhs, lnc=lnc)


def softmax(x, lnc=None):
    return _ops().softmax(x, lnc=lnc)


def rmsnorm(x, weight, eps=1e-6, lnc=None):
    return _ops().rmsnorm(x, weight, eps=float(eps), lnc=lnc)


def flash_attention(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=None):
    return _ops().flash_attention(q, k, v, gate=gate, seq_lens=seq_lens, causal=causal,
                                  softmax_scale=None if softmax_scale is None else float(softmax_scale), lnc=lnc)


def flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    return _ops().flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=causal,
                                         softmax_scale=None if softmax_scale is None else float(softmax_scale),
                                         lnc=lnc)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None, lnc=None,
                           max_seqlen_q=None, max_seqlen_k=None):
    return _ops().flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
        softmax_scale=None if softmax_scale is None else float(softmax_scale), gate=gate, lnc=lnc,
        max_seqlen_q=None if max_seqlen_q is None else int(max_seqlen_q),
        max_seqlen_k=None if max_seqlen_k is None else int(max_seqlen_k))


def gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=None, output_final_state=True,
                     use_qk_l2norm_in_kernel=False, valid_lengths=None, scale=None, cu_seqlens=None, lnc=None):
    """As `nki_kernels.gated_delta_rule` (no checkpoint_every); returns (o, final_state or None). With
    ``cu_seqlens`` [N+1] (B = 1, sequences packed along T) initial_state and the final state are [N, Hv, Dk, Dv]."""
    o, final = _ops().gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state,
                                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, valid_lengths=valid_lengths,
                                       scale=None if scale is None else float(scale), lnc=lnc, cu_seqlens=cu_seqlens)
    return o, (final if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids=None, use_qk_l2norm_in_kernel=False, scale=None,
                          lnc=None):
    """As `nki_kernels.gated_delta_rule_step`: returns o; ``state_pool`` is updated in place (declared mutable);
    ``slot_ids=None`` is the static-rows mode (sequence b updates row b)."""
    return _ops().gated_delta_rule_step(q, k, v, g, beta, state_pool, slot_ids,
                                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                        scale=None if scale is None else float(scale), lnc=lnc)


def causal_conv1d(x, weight, conv_state=None, valid_lengths=None, activation="silu", bias=None, cu_seqlens=None,
                  lnc=None):
    """As `nki_kernels.causal_conv1d`. With ``cu_seqlens`` [N+1] (B = 1, sequences packed along T) conv_state and
    the new state are [N, C, K]."""
    return _ops().causal_conv1d(x, weight, conv_state=conv_state, valid_lengths=valid_lengths,
                                activation=activation, bias=bias, cu_seqlens=cu_seqlens, lnc=lnc)


def causal_conv1d_update(x, conv_state, weight, activation="silu", bias=None):
    """``conv_state`` is updated in place (declared mutable)."""
    return _ops().causal_conv1d_update(x, conv_state, weight, activation=activation, bias=bias)


def moe_route(router_logits, top_k, normalize):
    return _ops().moe_route(router_logits, int(top_k), bool(normalize))


def moe_block_mapping(top_k_index, num_experts, block_size, expert_offset=0, num_blocks=None):
    return _ops().moe_block_mapping(top_k_index, int(num_experts), int(block_size), expert_offset=int(expert_offset),
                                    num_blocks=None if num_blocks is None else int(num_blocks))


def _split_shared(shared):
    if shared is None:
        return None, None, None
    return tuple(shared)


def moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                  shared=None, top_k_index=None, expert_offset=0, lnc=None):
    s_gu, s_dn, s_g = _split_shared(shared)
    return _ops().moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
                                int(block_size), shared_gate_up=s_gu, shared_down=s_dn, shared_gate=s_g,
                                top_k_index=top_k_index, expert_offset=int(expert_offset), lnc=lnc)


def moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset=0, lnc=None):
    s_gu, s_dn, s_g = _split_shared(shared)
    return _ops().moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared_gate_up=s_gu,
                             shared_down=s_dn, shared_gate=s_g, expert_offset=int(expert_offset), lnc=lnc)


def code_predictor(past_hidden, code0_embed, weights, *, uniforms=None, do_sample=False, temperature=1.0, top_k=50,
                   top_p=1.0, return_sum=False, resident=None, lnc=None):
    """As `nki_kernels.code_predictor`; ``weights`` is a CodePredictorWeights of torch tensors."""
    arrays = [getattr(weights, f) for f in _CP_FIELDS]
    codes, embeds, csum = _ops().code_predictor(
        past_hidden, code0_embed, *arrays, n_q_heads=int(weights.n_q_heads), n_kv_heads=int(weights.n_kv_heads),
        eps=float(weights.eps), uniforms=uniforms, do_sample=bool(do_sample), temperature=float(temperature),
        top_k=int(top_k), top_p=float(top_p), resident=resident, lnc=lnc)
    return (codes, embeds, csum) if return_sum else (codes, embeds)


__all__ = ["register", "unregister", "registered", "OPS", "NAMESPACE"] + [spec.name for spec in OPS]
