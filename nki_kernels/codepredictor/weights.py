"""Weight container of the Qwen3-Omni talker code predictor, in the per-rank layout the kernel reads.

Layout (one tensor-parallel rank; TP=1 is the whole model). L layers, H hidden, Hq / Hkv query / KV heads of
this rank, D head dim, I intermediate of this rank, G1 = num_code_groups - 1 residual groups, V codec vocab,
Vh LM-head rows of this rank (V, or V / tp when the LM heads are vocab-sharded), G = G1 + 1 positions.

    input_norm  [L, H]            fp32   RMSNorm weight before attention (x * w, Qwen3 style, not 1 + w)
    post_norm   [L, H]            fp32   RMSNorm weight before the MLP
    q_norm      [L, D]            fp32   per-head RMSNorm of q (after q_proj, before RoPE)
    k_norm      [L, D]            fp32   per-head RMSNorm of k
    final_norm  [H]               fp32   model.norm
    wqkv_t      [L, H, (Hq + 2 Hkv) D]   q_proj | k_proj | v_proj weights, transposed to [in, out]; head-major
    wo_t        [L, Hq D, H]             o_proj weight transposed ([in, out])
    wgu_t       [L, H, 2 I]              gate_proj | up_proj weights transposed
    wd_t        [L, I, H]                down_proj weight transposed
    lm_head_t   [G1, H, Vh]              lm_head[j].weight transposed (step j's head)
    codec_embed [G1, V, H]               model.codec_embedding[j].weight (row = code)
    rope_cos    [G, D]            fp32   cos(pos * inv_freq), halves duplicated as in transformers
    rope_sin    [G, D]            fp32

Matrices are in `dtype` (bf16 by default). Under TP=t, rank r holds q heads [r Hq, (r+1) Hq), KV heads
[r Hkv, (r+1) Hkv), intermediate columns [r I, (r+1) I) of gate/up and the matching rows of down, and the
matching rows of o_proj; its o_proj / down_proj outputs are partial sums, all-reduced across the ranks inside the
kernel (`code_predictor_tp`). Norms, embeddings and RoPE are replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

_DEFAULT_ROPE_THETA = 1_000_000.0      # Qwen3 code-predictor config default


def _as(x, dtype):
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if dtype in ("bfloat16", "bf16") else np.dtype(dtype)
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(dt))


@dataclass
class CodePredictorWeights:
    input_norm: np.ndarray
    post_norm: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    final_norm: np.ndarray
    wqkv_t: np.ndarray
    wo_t: np.ndarray
    wgu_t: np.ndarray
    wd_t: np.ndarray
    lm_head_t: np.ndarray
    codec_embed: np.ndarray
    rope_cos: np.ndarray
    rope_sin: np.ndarray
    n_q_heads: int
    n_kv_heads: int
    eps: float = 1e-6
    tp: int = 1                     # how many ranks share the attention/MLP weights (shard_weights)
    vocab_sharded: bool = False     # lm_head_t holds V / tp rows of each head
    rank: int = 0                   # which rank of the TP=tp split these are

    # ---- sizes read from the arrays
    @property
    def n_layers(self) -> int:
        return int(self.wqkv_t.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.wqkv_t.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.q_norm.shape[1])

    @property
    def intermediate(self) -> int:
        return int(self.wd_t.shape[1])

    @property
    def n_groups(self) -> int:
        """G1: residual code groups predicted per frame (num_code_groups - 1)."""
        return int(self.codec_embed.shape[0])

    @property
    def vocab(self) -> int:
        return int(self.codec_embed.shape[1])

    @property
    def head_vocab(self) -> int:
        return int(self.lm_head_t.shape[2])

    def nbytes(self) -> int:
        return int(sum(getattr(self, f).nbytes for f in _ARRAYS))


_ARRAYS = ("input_norm", "post_norm", "q_norm", "k_norm", "final_norm", "wqkv_t", "wo_t", "wgu_t", "wd_t",
           "lm_head_t", "codec_embed", "rope_cos", "rope_sin")


def rope_tables(n_pos: int, head_dim: int, theta: float):
    """cos/sin [n_pos, head_dim] of the default RoPE (inv_freq = theta^(-2i/D), halves duplicated)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    f = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    emb = np.concatenate([f, f], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def pack_weights(layers, final_norm, codec_embed, lm_head, *, n_q_heads, n_kv_heads, eps=1e-6,
                 rope_theta=_DEFAULT_ROPE_THETA, dtype="bfloat16") -> CodePredictorWeights:
    """Build the container from natural (transformers-shaped) arrays.

    layers: list of dicts with keys input_norm [H], post_norm [H], q_norm [D], k_norm [D], q [Hq D, H],
    k [Hkv D, H], v [Hkv D, H], o [H, Hq D], gate [I, H], up [I, H], down [H, I] (nn.Linear [out, in]).
    codec_embed: [G1, V, H]; lm_head: [G1, V, H] (nn.Linear [out=V, in=H] per step).
    """
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    D = int(np.asarray(layers[0]["q_norm"]).shape[0])
    G1 = int(np.asarray(codec_embed).shape[0])
    cos, sin = rope_tables(G1 + 1, D, rope_theta)
    return CodePredictorWeights(
        input_norm=f32([lw["input_norm"] for lw in layers]),
        post_norm=f32([lw["post_norm"] for lw in layers]),
        q_norm=f32([lw["q_norm"] for lw in layers]),
        k_norm=f32([lw["k_norm"] for lw in layers]),
        final_norm=f32(final_norm),
        wqkv_t=_as([np.concatenate([f32(lw["q"]), f32(lw["k"]), f32(lw["v"])], axis=0).T for lw in layers], dtype),
        wo_t=_as([f32(lw["o"]).T for lw in layers], dtype),
        wgu_t=_as([np.concatenate([f32(lw["gate"]), f32(lw["up"])], axis=0).T for lw in layers], dtype),
        wd_t=_as([f32(lw["down"]).T for lw in layers], dtype),
        lm_head_t=_as(np.transpose(f32(lm_head), (0, 2, 1)), dtype),
        codec_embed=_as(codec_embed, dtype),
        rope_cos=cos, rope_sin=sin, n_q_heads=int(n_q_heads), n_kv_heads=int(n_kv_heads), eps=float(eps))


def natural_layers(w: CodePredictorWeights):
    """Inverse of `pack_weights` for the layer matrices: list of dicts of float32 nn.Linear-shaped arrays."""
    Hq, Hkv, D = w.n_q_heads, w.n_kv_heads, w.head_dim
    out = []
    for l in range(w.n_layers):
        qkv = np.asarray(w.wqkv_t[l], dtype=np.float32).T
        gu = np.asarray(w.wgu_t[l], dtype=np.float32).T
        I = w.intermediate
        out.append(dict(input_norm=w.input_norm[l], post_norm=w.post_norm[l], q_norm=w.q_norm[l],
                        k_norm=w.k_norm[l], q=qkv[:Hq * D], k=qkv[Hq * D:(Hq + Hkv) * D],
                        v=qkv[(Hq + Hkv) * D:], o=np.asarray(w.wo_t[l], np.float32).T,
                        gate=gu[:I], up=gu[I:], down=np.asarray(w.wd_t[l], np.float32).T))
    return out


def _tensor_np(t):
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _predictor_prefix(keys, prefix):
    """The key prefix of the code predictor's entries: `prefix` when given, else found from the keys that only a
    code predictor has (`...lm_head.{j}.weight` and `...model.codec_embedding.{j}.weight`; a talker's own
    `model.codec_embedding.weight` has no index). Raises ValueError naming the candidates when ambiguous."""
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"weights_from_state_dict: prefix must be a str, got prefix={type(prefix).__name__}")
        return prefix
    found = set()
    for k in keys:
        m = re.match(r"^(.*?)(?:lm_head|model\.codec_embedding)\.\d+\.weight$", k)
        if m:
            found.add(m.group(1))
    if len(found) != 1:
        what = "no key of the form '<prefix>lm_head.<j>.weight'" if not found else f"several: {sorted(found)}"
        raise ValueError("weights_from_state_dict: expected the state dict of a Qwen3-Omni talker code predictor "
                         "(talker.code_predictor.state_dict(), or a talker / whole-model state dict holding one), "
                         f"but found {what}; pass prefix= (e.g. prefix='talker.code_predictor.')")
    return found.pop()


def weights_from_state_dict(state_dict, *, n_q_heads, n_kv_heads, rms_norm_eps=1e-6,
                            rope_theta=_DEFAULT_ROPE_THETA, dtype="bfloat16", prefix=None) -> CodePredictorWeights:
    """From a `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` state dict, or any state dict that
    holds one under a key prefix (a talker's: 'code_predictor.'; the whole model's: 'talker.code_predictor.').

    prefix: the code predictor's key prefix; found from the keys when None (those only a code predictor has:
    `lm_head.{j}.weight`, `model.codec_embedding.{j}.weight`), so a talker's own `model.*` keys are ignored.
    Keys (after the prefix): model.layers.{i}.{input_layernorm, post_attention_layernorm}.weight,
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.self_attn.{q,k}_norm.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.norm.weight, model.codec_embedding.{j}.weight,
    lm_head.{j}.weight. Attention biases are not supported (the config default attention_bias=False).
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"weights_from_state_dict: state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    prefix = _predictor_prefix(list(state_dict.keys()), prefix)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if any(k.endswith("_proj.bias") for k in sd):
        raise ValueError("code predictor: attention/MLP biases are not supported, got a *_proj.bias key")
    layer_ids = [k.split(".")[2] for k in sd if k.startswith("model.layers.")]
    emb_ids = [k.split(".")[2] for k in sd if k.startswith("model.codec_embedding.")]
    if not layer_ids or not emb_ids or not all(i.isdigit() for i in layer_ids + emb_ids):
        raise ValueError(f"weights_from_state_dict: the keys under prefix {prefix!r} are not a code predictor's "
                         "(need model.layers.<i>.*, model.codec_embedding.<j>.weight, lm_head.<j>.weight)")
    n_layers = 1 + max(int(i) for i in layer_ids)
    G1 = 1 + max(int(i) for i in emb_ids)

    def g(k):
        if k not in sd:
            raise ValueError(f"weights_from_state_dict: missing key {prefix + k!r}")
        return _tensor_np(sd[k])

    layers = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        layers.append(dict(input_norm=g(p + "input_layernorm.weight"),
                           post_norm=g(p + "post_attention_layernorm.weight"),
                           q_norm=g(p + "self_attn.q_norm.weight"), k_norm=g(p + "self_attn.k_norm.weight"),
                           q=g(p + "self_attn.q_proj.weight"), k=g(p + "self_attn.k_proj.weight"),
                           v=g(p + "self_attn.v_proj.weight"), o=g(p + "self_attn.o_proj.weight"),
                           gate=g(p + "mlp.gate_proj.weight"), up=g(p + "mlp.up_proj.weight"),
                           down=g(p + "mlp.down_proj.weight")))
    emb = np.stack([g(f"model.codec_embedding.{j}.weight") for j in range(G1)])
    heads = np.stack([g(f"lm_head.{j}.weight") for j in range(G1)])
    return pack_weights(layers, g("model.norm.weight"), emb, heads, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                        eps=rms_norm_eps, rope_theta=rope_theta, dtype=dtype)


def weights_from_transformers(module, dtype="bfloat16") -> CodePredictorWeights:
    """From a transformers code-predictor module (`talker.code_predictor`, a
    `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`): its state dict and config."""
    kind = type(module).__name__
    if hasattr(module, "code_predictor"):
        raise TypeError(f"weights_from_transformers: expected the talker's code predictor module, got the {kind} "
                        "that holds it; pass talker.code_predictor (model.talker.code_predictor for the whole "
                        "Qwen3-Omni model)")
    cfg = getattr(module, "config", None)
    needed = ("num_attention_heads", "num_key_value_heads", "rms_norm_eps")
    if cfg is None or not hasattr(module, "state_dict") or any(not hasattr(cfg, a) for a in needed):
        raise TypeError(f"weights_from_transformers: expected a Qwen3-Omni talker code predictor module "
                        f"(talker.code_predictor, with a config holding {', '.join(needed)}), got {kind}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", _DEFAULT_ROPE_THETA))
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"code predictor: only the default RoPE is supported, got rope_type={rope_type!r}")
    return weights_from_state_dict(module.state_dict(), n_q_heads=cfg.num_attention_heads,
                                   n_kv_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                                   rope_theta=theta, dtype=dtype, prefix="")


def shard_weights(w: CodePredictorWeights, tp: int, rank: int = 0, vocab_sharded: bool = False):
    """Rank `rank` of a TP=`tp` split (attention heads, MLP intermediate; LM heads by vocab if asked).

    Column-parallel q/k/v and gate/up (this rank's heads and intermediate columns), row-parallel o_proj and
    down_proj (the matching rows: their outputs are partial sums, all-reduced in-kernel by `code_predictor_tp`);
    norms, embeddings and RoPE replicated; LM heads replicated or, with vocab_sharded, rows
    [rank V / tp, (rank + 1) V / tp) of each head."""
    if w.tp != 1:
        raise ValueError(f"shard_weights: w is already rank {w.rank} of a TP={w.tp} split; shard the whole model")
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
        raise ValueError(f"shard_weights: tp must be a positive int, got tp={tp!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < tp:
        raise ValueError(f"shard_weights: rank must be an int in [0, tp={tp}), got rank={rank!r}")
    Hq, Hkv, I = w.n_q_heads, w.n_kv_heads, w.intermediate
    if Hq % tp or Hkv % tp or I % tp:
        raise ValueError(f"shard_weights: heads {Hq}/{Hkv} and intermediate {I} must divide by tp={tp}")
    if vocab_sharded and w.head_vocab % tp:
        raise ValueError(f"shard_weights: the LM-head vocab {w.head_vocab} must divide by tp={tp}")
    return replace(_split(w, tp, rank, vocab_sharded), tp=int(tp), vocab_sharded=bool(vocab_sharded),
                   rank=int(rank))


def _as_numpy(x):
    """A NumPy view of a weight array (torch CPU tensors included: bf16 through ml_dtypes), for slicing on the
    host; NumPy arrays pass through."""
    from ..validation import is_torch
    if is_torch(x):
        from ..backend import _torch_to_numpy
        return _torch_to_numpy(x)
    return x


def _split(w: CodePredictorWeights, n: int, i: int, vocab_sharded: bool) -> CodePredictorWeights:
    """Part i of n of w's heads, intermediate columns (and LM-head vocab rows when vocab_sharded), as
    `shard_weights` describes; w may itself be a rank's shard (the LNC core split of `core_split_weights`)."""
    tp, rank = n, i
    Hq, Hkv, D, I = w.n_q_heads, w.n_kv_heads, w.head_dim, w.intermediate
    w = replace(w, **{name: _as_numpy(getattr(w, name)) for name in CORE_SPLIT_NAMES})
    hq, hk, ii = Hq // tp, Hkv // tp, I // tp
    qs = slice(rank * hq * D, (rank + 1) * hq * D)
    ks = slice(Hq * D + rank * hk * D, Hq * D + (rank + 1) * hk * D)
    vs = slice((Hq + Hkv) * D + rank * hk * D, (Hq + Hkv) * D + (rank + 1) * hk * D)
    wqkv = np.concatenate([w.wqkv_t[:, :, qs], w.wqkv_t[:, :, ks], w.wqkv_t[:, :, vs]], axis=2)
    gs, us = slice(rank * ii, (rank + 1) * ii), slice(I + rank * ii, I + (rank + 1) * ii)
    wgu = np.concatenate([w.wgu_t[:, :, gs], w.wgu_t[:, :, us]], axis=2)
    lm = w.lm_head_t
    if vocab_sharded:
        vh = w.head_vocab // tp
        lm = lm[:, :, rank * vh:(rank + 1) * vh]
    return replace(w, wqkv_t=np.ascontiguousarray(wqkv), wo_t=np.ascontiguousarray(w.wo_t[:, qs, :]),
                   wgu_t=np.ascontiguousarray(wgu), wd_t=np.ascontiguousarray(w.wd_t[:, gs, :]),
                   lm_head_t=np.ascontiguousarray(lm), n_q_heads=hq, n_kv_heads=hk)


CORE_SPLIT_NAMES = ("wqkv_t", "wo_t", "wgu_t", "wd_t", "lm_head_t")
_CORE_LANES = 128                       # per-core intermediate columns and LM-head rows: whole 128-row chunks


def core_split_problem(w: CodePredictorWeights) -> str | None:
    """Why w (the whole model or one rank's shard) cannot be split between the two cores of an LNC=2 launch
    (halves of its q and KV heads, intermediate columns and LM-head rows), or None when it can."""
    if w.n_q_heads % 2 or w.n_kv_heads % 2:
        return f"the heads {w.n_q_heads}/{w.n_kv_heads} must be even (each core takes half of the KV heads)"
    if w.intermediate % (2 * _CORE_LANES):
        return f"the intermediate {w.intermediate} must be a multiple of {2 * _CORE_LANES}"
    if w.head_vocab % 2:
        return f"the LM-head vocab {w.head_vocab} must be even"
    return None


def core_split_weights(w: CodePredictorWeights):
    """The per-core weights of the LNC=2 intra-row split: core p holds half p of w's heads, intermediate columns
    and LM-head rows (`shard_weights` with 2 parts, applied to w, which may be a rank's shard). Returns
    (core 0's CodePredictorWeights, {name: [2, ...] array} for CORE_SPLIT_NAMES: the two cores' matrices stacked,
    which the kernel indexes with its program id). Weight preparation, done once per weights object."""
    problem = core_split_problem(w)
    if problem:
        raise ValueError(f"core_split_weights: {problem}")
    parts = [_split(w, 2, p, True) for p in range(2)]
    stacked = {n: np.ascontiguousarray(np.stack([getattr(q, n) for q in parts])) for n in CORE_SPLIT_NAMES}
    return parts[0], stacked


def random_weights(rng, *, hidden, n_q_heads, n_kv_heads, head_dim, intermediate, n_layers, n_groups, vocab,
                   rope_theta=_DEFAULT_ROPE_THETA, eps=1e-6, dtype="bfloat16", lm_scale=1.0):
    """Random weights with the real model's scales (1/sqrt(fan_in) projections, norms near 1)."""
    H, D, I = hidden, head_dim, intermediate
    n = lambda *s, sc=1.0: rng.standard_normal(s).astype(np.float32) * np.float32(sc)  # noqa: E731
    layers = []
    for _ in range(n_layers):
        layers.append(dict(input_norm=1.0 + n(H, sc=0.1), post_norm=1.0 + n(H, sc=0.1),
                           q_norm=1.0 + n(D, sc=0.1), k_norm=1.0 + n(D, sc=0.1),
                           q=n(n_q_heads * D, H, sc=H ** -0.5), k=n(n_kv_heads * D, H, sc=H ** -0.5),
                           v=n(n_kv_heads * D, H, sc=H ** -0.5), o=n(H, n_q_heads * D, sc=(n_q_heads * D) ** -0.5),
                           gate=n(I, H, sc=H ** -0.5), up=n(I, H, sc=H ** -0.5), down=n(H, I, sc=I ** -0.5)))
    emb = n(n_groups, vocab, H)
    heads = n(n_groups, vocab, H, sc=lm_scale * H ** -0.5)
    return pack_weights(layers, 1.0 + n(H, sc=0.1), emb, heads, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                        eps=eps, rope_theta=rope_theta, dtype=dtype)
