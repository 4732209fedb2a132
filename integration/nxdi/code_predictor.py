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
  those slots instead, which is not what HF's talker sums (see KERNELS.md ("Using nki-kernels from NxDI")).

Tensor parallelism: the kernel runs one NeuronCore; with ``tp_degree > 1`` the per-rank o_proj / down_proj
partial sums would need an all-reduce between layers, so the adapter defers to the original forward
(compile the predictor at tp_degree=1: its ~80 M parameters fit one core).
"""
from __future__ import annotations

import functools

import numpy as np

from nki_kernels.validation import KernelInputError

from ._common import ORIGINAL_PREFIX, AdapterInputError, disabled, kernel, warn_once

FAMILY = "code_predictor"
KERNEL_NAME = "code_predictor"
CLASS_NAMES = ("UnifiedNeuronCodePredictor",)
EXPECTED_PARAMS = ("past_hidden", "last_id_hidden")
SAMPLING_ATTR = "_nki_kernels_sampling"


def set_code_predictor_sampling(module, do_sample=True, temperature=1.0, top_k=50, top_p=0.8, generator=None,
                                uniforms=None):
    """Switch a code-predictor module between greedy (``do_sample=False``, the contrib's behaviour) and sampling.

    Defaults follow transformers' code-predictor call (top_k=50, top_p=0.8). top_k is clipped to the vocabulary.
    generator: torch.Generator for the per-call uniforms [B, G1] (reproducible runs); uniforms: a fixed [B, G1]
    tensor of U(0, 1) numbers used on every call instead (tests).
    """
    if not do_sample:
        module.__dict__.pop(SAMPLING_ATTR, None)
        return
    if not temperature > 0:
        raise AdapterInputError(f"nxdi code_predictor: temperature must be > 0, got temperature={temperature}")
    if not 0 < top_p <= 1:
        raise AdapterInputError(f"nxdi code_predictor: top_p must be in (0, 1], got top_p={top_p}")
    if int(top_k) < 1:
        raise AdapterInputError(f"nxdi code_predictor: top_k must be >= 1, got top_k={top_k}")
    module.__dict__[SAMPLING_ATTR] = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                          generator=generator, uniforms=uniforms)


def _np32(t):
    return t.detach().float().cpu().numpy()


# The kernel's matmul dtype: its weights are bf16 (the emulator rejects fp32 weights, see the final report).
KERNEL_WEIGHT_DTYPE = "bfloat16"


def extract_weights(module):
    """The contrib module's weights packed for `nki_kernels.code_predictor` (a CodePredictorWeights).

    Matrices are packed in bf16 (the kernel's weight dtype; the contrib's module is bf16 too); the RoPE
    tables are the module's own ``cos_cache`` / ``sin_cache`` (theta 1e6 in the contrib), so positions are
    encoded exactly as in the replaced forward.
    """
    from dataclasses import replace

    from nki_kernels.codepredictor.weights import pack_weights

    layers = list(module.layers)
    if not layers:
        raise AdapterInputError("nxdi code_predictor: module.layers is empty")
    nat = []
    for l in layers:
        a, m = l.self_attn, l.mlp
        nat.append(dict(input_norm=_np32(l.input_layernorm.weight), post_norm=_np32(l.post_attention_layernorm.weight),
                        q_norm=_np32(a.q_norm.weight), k_norm=_np32(a.k_norm.weight), q=_np32(a.q_proj.weight),
                        k=_np32(a.k_proj.weight), v=_np32(a.v_proj.weight), o=_np32(a.o_proj.weight),
                        gate=_np32(m.gate_proj.weight), up=_np32(m.up_proj.weight), down=_np32(m.down_proj.weight)))
    head_dim = int(layers[0].self_attn.q_norm.weight.shape[0])
    n_q = int(layers[0].self_attn.q_proj.weight.shape[0]) // head_dim
    n_kv = int(layers[0].self_attn.k_proj.weight.shape[0]) // head_dim
    eps = float(getattr(module.norm, "eps", 1e-6))
    w = pack_weights(nat, _np32(module.norm.weight), _np32(module.codec_embedding_stacked),
                     _np32(module.lm_head_stacked), n_q_heads=n_q, n_kv_heads=n_kv, eps=eps,
                     dtype=KERNEL_WEIGHT_DTYPE)
    cos, sin = getattr(module, "cos_cache", None), getattr(module, "sin_cache", None)
    if cos is not None and sin is not None:
        n_pos = w.n_groups + 1
        if cos.shape[0] < n_pos or cos.shape[1] != head_dim:
            raise AdapterInputError(f"nxdi code_predictor: cos_cache must be [>= {n_pos}, {head_dim}], "
                                    f"got {tuple(cos.shape)}")
        w = replace(w, rope_cos=_np32(cos)[:n_pos].copy(), rope_sin=_np32(sin)[:n_pos].copy())
    return w


def packed_weights(module):
    """extract_weights(module), cached on the instance until a parameter changes (data pointer or version)."""
    key = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cached = module.__dict__.get("_nki_kernels_packed")
    if cached is None or cached[0] != key:
        cached = (key, extract_weights(module))
        module.__dict__["_nki_kernels_packed"] = cached
    return cached[1]


def check_support(module, past_hidden, last_id_hidden):
    if (getattr(module, "tp_degree", 1) or 1) > 1:
        return False, (f"tp_degree={module.tp_degree}: the one-core kernel cannot all-reduce the per-rank "
                       "o_proj/down_proj partial sums; compile the code predictor with tp_degree=1")
    if past_hidden.dim() != 3 or past_hidden.shape[1] != 1 or tuple(last_id_hidden.shape) != tuple(past_hidden.shape):
        return False, (f"expected past_hidden and last_id_hidden [B, 1, H], got {tuple(past_hidden.shape)} and "
                       f"{tuple(last_id_hidden.shape)}")
    return True, ""


def _sampling_inputs(module, bsz, n_codes, vocab):
    import torch

    cfg = module.__dict__.get(SAMPLING_ATTR)
    if cfg is None:
        return {}
    uniforms = cfg["uniforms"]
    if uniforms is None:
        uniforms = torch.rand(bsz, n_codes, generator=cfg["generator"], dtype=torch.float32)
    elif tuple(uniforms.shape) != (bsz, n_codes):
        raise AdapterInputError(f"nxdi code_predictor: uniforms must be [B, {n_codes}]={(bsz, n_codes)}, "
                                f"got {tuple(uniforms.shape)}")
    return dict(do_sample=True, uniforms=uniforms.to(torch.float32), temperature=cfg["temperature"],
                top_k=min(cfg["top_k"], vocab), top_p=cfg["top_p"])


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
    wdtype = torch.float32 if weights.wqkv_t.dtype == np.float32 else torch.bfloat16
    sampling = _sampling_inputs(module, bsz, n_codes, weights.head_vocab)
    x0 = past_hidden[:, 0, :].to(wdtype).contiguous()
    x1 = last_id_hidden[:, 0, :].to(wdtype).contiguous()
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
        except KernelInputError as exc:          # a kernel limit (e.g. B > 128, H not a multiple of 128)
            warn_once(f"cp-kernel-{exc}", f"nxdi code_predictor: {exc}; using the original forward")
            return original(self, past_hidden, last_id_hidden)

    forward.__nki_kernels_adapter__ = FAMILY
    setattr(forward, ORIGINAL_PREFIX + "forward", original)
    return forward
