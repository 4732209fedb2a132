"""Qwen3-Omni code-predictor adapter: ``UnifiedNeuronCodePredictor.forward`` backed by `nki_kernels.code_predictor`.

Contract (NxDI PR #167, ``contrib/models/Qwen3-Omni-30B-A3B-Instruct/src/modeling_qwen3_omni_code_predictor.py``)::

    UnifiedNeuronCodePredictor(tp_degree, dtype).forward(past_hidden [B, 1, H], last_id_hidden [B, 1, H])
        -> (codes [B, 15] int32, mid_hiddens [B, 14, H])

Weights are read from the module as the contrib names them (parameter names and shapes unchanged):
``layers[l].{input_layernorm, post_attention_layernorm}.weight [H]``, ``layers[l].self_attn.{q,k,v,o}_proj.weight``
(``[out, in]``), ``self_attn.{q,k}_norm.weight [D]``, ``layers[l].mlp.{gate,up,down}_proj.weight``,
``norm.weight [H]``, ``codec_embedding_stacked [15, V, H]``, ``lm_head_stacked [15, V, H]`` and the RoPE
tables ``cos_cache`` / ``sin_cache`` ``[16, D]``.

Differences from the contrib's traced forward, all behind the same signature:

* one kernel launch with an on-chip KV cache (the contrib re-runs 5 layers over a 16-slot buffer 15 times);
* batch B >= 1 (the contrib is traced at B = 1);
* sampling (temperature / top-k / top-p from caller-supplied uniforms, see `set_code_predictor_sampling`);
  greedy (argmax, first index on ties) by default, as the contrib;
* ``mid_hiddens`` are the codec embeddings the talker sums next (``codec_embedding[s](code_s)``, s = 0..13,
  i.e. HF's ``mid_residual_hiddens``); PR #167's traced graph returns the post-norm transformer hidden at
  those slots instead, which is not what HF's talker sums (see docs/integration.md ("NxDI: usage and contracts")).

Tensor parallelism (``tp_degree > 1``): each rank's module holds its shard (q/k/v heads and gate/up columns,
the matching o_proj / down_proj rows; LM heads and embeddings replicated), which `rank_weights` packs in the layout
of `nki_kernels.codepredictor.weights.shard_weights`. The adapter then launches `code_predictor_rank` (one rank of
the TP kernel, o_proj / down_proj partial sums all-reduced in-kernel) with the talker's replica group, which the
caller provides once with `set_code_predictor_replica_group(module, replica_group, rank)` (an
``nki.collectives.ReplicaGroup`` of the talker's TP group). Without a replica group, or on the emulator (which
runs all ranks of a TP launch together: `code_predictor_tp`), the adapter defers to the original forward.
"""
from __future__ import annotations

import functools



from ._common import fall_back, refusals, ORIGINAL_PREFIX, AdapterInputError, disabled, kernel, warn_once

FAMILY = "code_predictor"
KERNEL_NAME = "code_predictor"
CLASS_NAMES = ("UnifiedNeuronCodePredictor",)
EXPECTED_PARAMS = ("past_hidden", "last_id_hidden")
SAMPLING_ATTR = "_nki_kernels_sampling"


def set_code_predictor_sampling(module, do_sample=True, temperature=1.0, top_k=50, top_p=0.8, generator=None,
                                uniforms=None):
    """Switch a code-predictor module between greedy (``do_sample=False``, the contrib's behaviour) and sampling.

    Defaults follow transformers' code-predictor call (top_k=50, top_p=0.8). A top_k above the vocabulary is clamped
    to it by the kernel (`code_predictor`), as transformers' TopKLogitsWarper does.
    generator: torch.Generator for the per-call uniforms [B, G1] (reproducible runs); uniforms: a fixed [B, G1]
    tensor of U(0, 1) numbers used on every call instead (tests).
    """
    if not do_sample:
        module.__dict__.pop(SAMPLING_ATTR, None)
        return
    if not temperature > 0:
        raise AdapterInputError(f"nxdi code_predictor: temperature must be > 0, got temperature={temperature}")
    from nki_kernels.codepredictor.unrolled import MIN_TEMPERATURE
    if temperature < MIN_TEMPERATURE:
        raise AdapterInputError(f"nxdi code_predictor: temperature must be >= {MIN_TEMPERATURE:g} (the kernel scales "
                                f"fp32 logits by 1 / temperature), got temperature={temperature}")
    if not 0 < top_p <= 1:
        raise AdapterInputError(f"nxdi code_predictor: top_p must be in (0, 1], got top_p={top_p}")
    if int(top_k) < 1:
        raise AdapterInputError(f"nxdi code_predictor: top_k must be >= 1, got top_k={top_k}")
    module.__dict__[SAMPLING_ATTR] = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                          generator=generator, uniforms=uniforms)


# The kernel's matmul dtype: its weights are bf16 (the emulator rejects fp32 weights, see the final report).
KERNEL_WEIGHT_DTYPE = "bfloat16"


def extract_weights(module):
    """The contrib module's weights packed for `nki_kernels.code_predictor` (a CodePredictorWeights of torch tensors).

    Packed with torch ops only (transpose, cat, stack, dtype casts) on the parameters' own device: no
    ``.cpu().numpy()``, so inside NxDI's traced graph the packing is graph ops, never a host read of weight values.
    Matrices are bf16 (the kernel's weight dtype; the contrib's module is bf16 too), norms fp32, in the layout
    of `nki_kernels.codepredictor.weights` (``[in, out]`` matrices, q|k|v and gate|up concatenated on out).
    The RoPE tables are the module's own ``cos_cache`` / ``sin_cache`` (theta 1e6 in the contrib), so positions
    are encoded exactly as in the replaced forward; a module without them gets the default-theta tables.
    """
    import torch

    from nki_kernels.codepredictor.weights import CodePredictorWeights, rope_tables

    layers = list(module.layers)
    if not layers:
        raise AdapterInputError("nxdi code_predictor: module.layers is empty")
    bf16, f32 = torch.bfloat16, torch.float32

    def stack(fn, dtype):
        return torch.stack([fn(layer).detach().to(dtype) for layer in layers]).contiguous()

    def attn(layer):
        return layer.self_attn

    def mlp(layer):
        return layer.mlp

    head_dim = int(attn(layers[0]).q_norm.weight.shape[0])
    n_q = int(attn(layers[0]).q_proj.weight.shape[0]) // head_dim
    n_kv = int(attn(layers[0]).k_proj.weight.shape[0]) // head_dim
    n_groups = int(module.codec_embedding_stacked.shape[0])
    cos, sin = getattr(module, "cos_cache", None), getattr(module, "sin_cache", None)
    n_pos = n_groups + 1
    if cos is None or sin is None:
        c, s = rope_tables(n_pos, head_dim, 1_000_000.0)
        device = module.norm.weight.device
        cos, sin = torch.from_numpy(c).to(device), torch.from_numpy(s).to(device)
    elif cos.shape[0] < n_pos or cos.shape[1] != head_dim:
        raise AdapterInputError(f"nxdi code_predictor: cos_cache must be [>= {n_pos}, {head_dim}], "
                                f"got {tuple(cos.shape)}")
    return CodePredictorWeights(
        input_norm=stack(lambda l: l.input_layernorm.weight, f32),
        post_norm=stack(lambda l: l.post_attention_layernorm.weight, f32),
        q_norm=stack(lambda l: attn(l).q_norm.weight, f32),
        k_norm=stack(lambda l: attn(l).k_norm.weight, f32),
        final_norm=module.norm.weight.detach().to(f32).contiguous(),
        wqkv_t=stack(lambda l: torch.cat([attn(l).q_proj.weight, attn(l).k_proj.weight, attn(l).v_proj.weight]).t(),
                     bf16),
        wo_t=stack(lambda l: attn(l).o_proj.weight.t(), bf16),
        wgu_t=stack(lambda l: torch.cat([mlp(l).gate_proj.weight, mlp(l).up_proj.weight]).t(), bf16),
        wd_t=stack(lambda l: mlp(l).down_proj.weight.t(), bf16),
        lm_head_t=module.lm_head_stacked.detach().transpose(1, 2).to(bf16).contiguous(),
        codec_embed=module.codec_embedding_stacked.detach().to(bf16).contiguous(),
        rope_cos=cos[:n_pos].detach().to(f32).contiguous(), rope_sin=sin[:n_pos].detach().to(f32).contiguous(),
        n_q_heads=n_q, n_kv_heads=n_kv, eps=float(getattr(module.norm, "eps", 1e-6)))


def packed_weights(module):
    """extract_weights(module), cached on the instance until a parameter changes (data pointer or version)."""
    key = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cached = module.__dict__.get("_nki_kernels_packed")
    if cached is None or cached[0] != key:
        cached = (key, extract_weights(module))
        module.__dict__["_nki_kernels_packed"] = cached
    return cached[1]


REPLICA_ATTR = "_nki_kernels_replica_group"


def set_code_predictor_replica_group(module, replica_group, rank):
    """Give a tp_degree > 1 code-predictor module its talker TP group (an ``nki.collectives.ReplicaGroup``) and
    this process's rank in it, so the adapter launches the TP kernel (`code_predictor_rank`) on the module's shard."""
    tp = int(getattr(module, "tp_degree", 1) or 1)
    if tp < 2:
        raise AdapterInputError(f"nxdi code_predictor: a replica group is for tp_degree > 1, got tp_degree={tp}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp:
        raise AdapterInputError(f"nxdi code_predictor: rank must be an int in [0, tp_degree={tp}), got rank={rank!r}")
    module.__dict__[REPLICA_ATTR] = (replica_group, rank)


def _tp_launch_available():
    from nki_kernels import backend
    return not backend.is_emulated()


def check_support(module, past_hidden, last_id_hidden):
    tp = int(getattr(module, "tp_degree", 1) or 1)
    if tp > 1 and module.__dict__.get(REPLICA_ATTR) is None:
        return False, (f"tp_degree={tp}: the TP kernel needs the talker's replica group; call "
                       "set_code_predictor_replica_group(module, replica_group, rank) first")
    if tp > 1 and not _tp_launch_available():
        return False, (f"tp_degree={tp}: one rank's TP launch needs real NKI (the emulator runs all ranks of a TP "
                       "launch together, nki_kernels.codepredictor.unrolled.code_predictor_tp)")
    if past_hidden.dim() != 3 or past_hidden.shape[1] != 1 or tuple(last_id_hidden.shape) != tuple(past_hidden.shape):
        return False, (f"expected past_hidden and last_id_hidden [B, 1, H], got {tuple(past_hidden.shape)} and "
                       f"{tuple(last_id_hidden.shape)}")
    return True, ""


def _sampling_inputs(module, bsz, n_codes, device=None):
    """The sampling kwargs; uniforms drawn on `device` (the activations'): a host-drawn tensor would be a constant
    inside a traced graph. A user generator draws on its own device and the draw is moved."""
    import torch

    cfg = module.__dict__.get(SAMPLING_ATTR)
    if cfg is None:
        return {}
    uniforms = cfg["uniforms"]
    if uniforms is None:
        gen = cfg["generator"]
        draw_on = gen.device if gen is not None else device
        uniforms = torch.rand(bsz, n_codes, generator=gen, dtype=torch.float32, device=draw_on)
    elif tuple(uniforms.shape) != (bsz, n_codes):
        raise AdapterInputError(f"nxdi code_predictor: uniforms must be [B, {n_codes}]={(bsz, n_codes)}, "
                                f"got {tuple(uniforms.shape)}")
    return dict(do_sample=True, uniforms=uniforms.to(device=device, dtype=torch.float32),
                temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"])


def rank_weights(module):
    """This rank's shard of a tp_degree > 1 module, packed like ``shard_weights(w, tp, rank)`` (tp and rank set)."""
    from dataclasses import replace

    tp = int(getattr(module, "tp_degree", 1) or 1)
    group = module.__dict__.get(REPLICA_ATTR)
    rank = group[1] if group is not None else 0
    return replace(packed_weights(module), tp=tp, rank=rank, vocab_sharded=False)


def _launch_rank(x0, x1, shard, replica_group, sampling):
    from nki_kernels.codepredictor.unrolled import code_predictor_rank
    return code_predictor_rank(x0, x1, shard, replica_group=replica_group, **sampling)


def code_predictor_forward(module, past_hidden, last_id_hidden):
    """(codes [B, G1] int32, mid_hiddens [B, G1 - 1, H]) for the contrib module's weights (G1 = 15 in Qwen3-Omni).

    codes[:, j] is residual code j + 1; mid_hiddens[:, j] = codec_embedding_stacked[j][codes[:, j]], the input
    embedding of step j + 1 (HF's mid_residual_hiddens). See the module docstring.
    """
    import torch

    fn = kernel(KERNEL_NAME, FAMILY)
    weights = packed_weights(module)
    n_codes = weights.n_groups
    bsz = past_hidden.shape[0]
    dtype = past_hidden.dtype
    wdtype = weights.wqkv_t.dtype
    sampling = _sampling_inputs(module, bsz, n_codes, device=past_hidden.device)
    x0 = past_hidden[:, 0, :].to(wdtype).contiguous()
    x1 = last_id_hidden[:, 0, :].to(wdtype).contiguous()
    if int(getattr(module, "tp_degree", 1) or 1) > 1:
        replica_group, _rank = module.__dict__[REPLICA_ATTR]
        codes, embeds = _launch_rank(x0, x1, rank_weights(module), replica_group, sampling)[:2]
    else:
        codes, embeds = fn(x0, x1, weights, **sampling)[:2]
    return codes.to(torch.int32), embeds[:, :n_codes - 1, :].to(dtype)


def make_forward(original):
    """Class-level replacement for ``UnifiedNeuronCodePredictor.forward``."""

    @functools.wraps(original)
    def forward(self, past_hidden, last_id_hidden):
        if disabled():
            return original(self, past_hidden, last_id_hidden)
        ok, reason = check_support(self, past_hidden, last_id_hidden)
        if not ok:
            warn_once(f"cp-{reason}", f"nxdi code_predictor: {reason}; using the original forward")
            return original(self, past_hidden, last_id_hidden)
        try:
            return code_predictor_forward(self, past_hidden, last_id_hidden)
        except refusals() as exc:        # a kernel limit (e.g. B > 128, H not a multiple of 128), a check
            fall_back(f"code_predictor: {type(self).__name__}.forward", exc)
            return original(self, past_hidden, last_id_hidden)

    forward.__nki_kernels_adapter__ = FAMILY
    setattr(forward, ORIGINAL_PREFIX + "forward", original)
    return forward
