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
  those slots instead, which is not what HF's talker sums (see docs/kernels/nxdi.md).

Tensor parallelism: the kernel runs one NeuronCore; with ``tp_degree > 1`` the per-rank o_proj / down_proj
partial sums would need an all-reduce between layers, so the adapter defers to the original forward
(compile the predictor at tp_degree=1: its ~80 M parameters fit one core).
"""
from __future__ import annotations

import functools

from ._common import ORIGINAL_PREFIX, AdapterInputError, disabled, kernel, warn_once

FAMILY = "code_predictor"
KERNEL_NAME = "code_predictor"
CLASS_NAMES = ("UnifiedNeuronCodePredictor",)
EXPECTED_PARAMS = ("past_hidden", "last_id_hidden")
SAMPLING_ATTR = "_nki_kernels_sampling"


def set_code_predictor_sampling(module, temperature=1.0, top_k=None, top_p=None, generator=None, uniforms=None):
    """Switch a code-predictor module from greedy to sampling (None for every knob -> back to greedy).

    Args:
        temperature: > 0. top_k: int or None. top_p: in (0, 1] or None.
        generator: torch.Generator for the per-call uniforms [B, 15] (reproducible runs).
        uniforms: a fixed [B, 15] tensor of U(0, 1) numbers used on every call instead (tests).
    """
    if temperature is None and top_k is None and top_p is None and uniforms is None and generator is None:
        if hasattr(module, SAMPLING_ATTR):
            delattr(module, SAMPLING_ATTR)
        return
    if temperature is not None and not temperature > 0:
        raise AdapterInputError(f"nxdi code_predictor: temperature must be > 0, got temperature={temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise AdapterInputError(f"nxdi code_predictor: top_p must be in (0, 1], got top_p={top_p}")
    if top_k is not None and int(top_k) < 1:
        raise AdapterInputError(f"nxdi code_predictor: top_k must be >= 1, got top_k={top_k}")
    object.__setattr__(module, SAMPLING_ATTR, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                   generator=generator, uniforms=uniforms))


def extract_weights(module):
    """The contrib module's weights in one dict (torch tensors, original layouts; nothing copied)."""
    layers = list(module.layers)
    if not layers:
        raise AdapterInputError("nxdi code_predictor: module.layers is empty")

    def w(m):
        return m.weight

    out = {
        "input_layernorm": [w(l.input_layernorm) for l in layers],
        "q_proj": [w(l.self_attn.q_proj) for l in layers],
        "k_proj": [w(l.self_attn.k_proj) for l in layers],
        "v_proj": [w(l.self_attn.v_proj) for l in layers],
        "o_proj": [w(l.self_attn.o_proj) for l in layers],
        "q_norm": [w(l.self_attn.q_norm) for l in layers],
        "k_norm": [w(l.self_attn.k_norm) for l in layers],
        "post_attention_layernorm": [w(l.post_attention_layernorm) for l in layers],
        "gate_proj": [w(l.mlp.gate_proj) for l in layers],
        "up_proj": [w(l.mlp.up_proj) for l in layers],
        "down_proj": [w(l.mlp.down_proj) for l in layers],
        "norm": w(module.norm),
        "codec_embedding": module.codec_embedding_stacked,
        "lm_head": module.lm_head_stacked,
        "cos": getattr(module, "cos_cache", None),
        "sin": getattr(module, "sin_cache", None),
        "rms_eps": float(getattr(module.norm, "eps", 1e-6)),
        "head_dim": int(layers[0].self_attn.q_norm.weight.shape[0]),
    }
    out["num_heads"] = out["q_proj"][0].shape[0] // out["head_dim"]
    out["num_kv_heads"] = out["k_proj"][0].shape[0] // out["head_dim"]
    return out


def check_support(module, past_hidden, last_id_hidden):
    if (getattr(module, "tp_degree", 1) or 1) > 1:
        return False, (f"tp_degree={module.tp_degree}: the one-core kernel cannot all-reduce the per-rank "
                       "o_proj/down_proj partial sums; compile the code predictor with tp_degree=1")
    if past_hidden.dim() != 3 or past_hidden.shape[1] != 1 or tuple(last_id_hidden.shape) != tuple(past_hidden.shape):
        return False, (f"expected past_hidden and last_id_hidden [B, 1, H], got {tuple(past_hidden.shape)} and "
                       f"{tuple(last_id_hidden.shape)}")
    return True, ""


def _sampling_inputs(module, bsz, n_codes):
    import torch

    cfg = getattr(module, SAMPLING_ATTR, None)
    if cfg is None:
        return {}
    uniforms = cfg["uniforms"]
    if uniforms is None:
        uniforms = torch.rand(bsz, n_codes, generator=cfg["generator"], dtype=torch.float32)
    elif tuple(uniforms.shape) != (bsz, n_codes):
        raise AdapterInputError(f"nxdi code_predictor: uniforms must be [B, {n_codes}]={(bsz, n_codes)}, "
                                f"got {tuple(uniforms.shape)}")
    return dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"],
                uniforms=uniforms.to(torch.float32))


def code_predictor_forward(module, past_hidden, last_id_hidden):
    """(codes [B, G-1] int32, mid_hiddens [B, G-2, H]) for the contrib module's weights; see the module docstring."""
    import torch

    fn = kernel(KERNEL_NAME, FAMILY)
    weights = extract_weights(module)
    n_codes = weights["lm_head"].shape[0]
    bsz = past_hidden.shape[0]
    dtype = past_hidden.dtype
    sampling = _sampling_inputs(module, bsz, n_codes)
    codes, embeds = _call_kernel(fn, past_hidden[:, 0, :], last_id_hidden[:, 0, :], weights, sampling)
    codes = codes.to(torch.int32)
    mid = embeds[:, :n_codes - 1, :].to(dtype)
    return codes, mid


def _call_kernel(fn, past_hidden, code0_embed, weights, sampling):
    """Call the wrapper; the weight hand-over is adapted to the wrapper's signature."""
    raise NotImplementedError("nxdi code_predictor: the adapter for nki_kernels.code_predictor's weight format "
                              "is not wired yet")


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
        return code_predictor_forward(self, past_hidden, last_id_hidden)

    forward.__nki_kernels_adapter__ = FAMILY
    setattr(forward, ORIGINAL_PREFIX + "forward", original)
    return forward
