"""Weight layout converters: transformers' MoE parameters -> the layout `moe_blockwise` / `moe_decode` take.

transformers (Qwen3-MoE, Qwen3.5-MoE, Qwen3-Next, Qwen3-Omni sparse blocks) keeps the routed experts as fused 3-D
parameters of `block.experts` and the shared expert as three Linear layers plus a Linear(H, 1) gate:

    experts.gate_up_proj [E, 2I, H]   gate rows then up rows, applied as x @ W[e].T
    experts.down_proj    [E, H, I]
    shared_expert.{gate_proj, up_proj}.weight [Is, H], shared_expert.down_proj.weight [H, Is]
    shared_expert_gate.weight [1, H]

The kernels take NxDI's per-rank layout (hidden rows on the partitions, one contiguous DMA run per partition):

    gate_up [E, H, 2, I], down [E, I, H], shared = (gate_up [H, 2, Is], down [Is, H], gate [H])

Each converter makes one contiguous copy of what it converts (the kernels need the new layout in memory); drop the
transformers tensors afterwards if the model is not needed any more, or keep them and pay the copy's memory (one
copy of the expert weights: 3 * E * H * I elements per layer). Torch tensors come back as torch tensors (detached,
same dtype unless `dtype` is given), NumPy arrays as NumPy arrays.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..validation import KernelInputError


class MoEWeights(NamedTuple):
    """Kernel-layout MoE weights: gate_up [E, H, 2, I], down [E, I, H], shared (gate_up [H, 2, Is], down [Is, H],
    gate [H]) or None. Pass as ``moe_decode(x, idx, w, w.gate_up, w.down, shared=w.shared)``."""
    gate_up: object
    down: object
    shared: tuple | None


def _is_torch(x) -> bool:
    try:
        import torch
        return isinstance(x, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def _shape(x):
    return tuple(int(s) for s in x.shape) if hasattr(x, "shape") else None


def _need(cond, message):
    if not cond:
        raise KernelInputError(message)


def _contiguous(x, dtype):
    if _is_torch(x):
        y = x.detach()
        if dtype is not None:
            y = y.to(_torch_dtype(dtype))
        return y.contiguous()
    y = np.ascontiguousarray(x)
    return y if dtype is None else y.astype(_np_dtype(dtype))


def _torch_dtype(dtype):
    import torch
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def _np_dtype(dtype):
    if str(dtype) == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _permute(x, axes):
    return x.permute(*axes) if _is_torch(x) else np.transpose(x, axes)


def experts_from_transformers(gate_up_proj, down_proj, dtype=None, *, contiguous: bool = True):
    """transformers' fused expert parameters -> (gate_up [E, H, 2, I], down [E, I, H]).

    Dimensions:
        E experts, H hidden, I expert intermediate.
    Args:
        gate_up_proj: [E, 2I, H] (gate rows 0 .. I-1, then up rows), torch tensor or NumPy array.
        down_proj: [E, H, I].
        dtype: optional dtype of the result (default: the input's).
        contiguous: True (default): contiguous copies. False: strided views of the inputs (detached), no copy;
            the integrations pass these straight to a kernel call, which stages them for the launch only.
    Returns:
        (gate_up [E, H, 2, I], down [E, I, H]).
    """
    gu_s, dn_s = _shape(gate_up_proj), _shape(down_proj)
    _need(gu_s is not None and len(gu_s) == 3 and gu_s[1] % 2 == 0,
          f"experts_from_transformers: gate_up_proj must be transformers' [E, 2I, H], got shape={gu_s}")
    n_exp, two_i, hidden = gu_s
    n_inter = two_i // 2
    _need(dn_s == (n_exp, hidden, n_inter),
          f"experts_from_transformers: down_proj must be [E={n_exp}, H={hidden}, I={n_inter}] (transformers' layout), "
          f"got shape={dn_s}")
    _need(contiguous or dtype is None, "experts_from_transformers: dtype casts need contiguous=True (a cast copies)")
    gu = _detached(gate_up_proj).reshape(n_exp, 2, n_inter, hidden)
    gate_up, down = _permute(gu, (0, 3, 1, 2)), _permute(_detached(down_proj), (0, 2, 1))
    if not contiguous:
        return gate_up, down
    return _contiguous(gate_up, dtype), _contiguous(down, dtype)


def _detached(x):
    return x.detach() if _is_torch(x) else np.asarray(x)


def shared_from_transformers(gate_proj, up_proj, down_proj, gate, dtype=None):
    """transformers' shared expert Linear weights -> (gate_up [H, 2, Is], down [Is, H], gate [H]).

    Args:
        gate_proj, up_proj: [Is, H] (`shared_expert.gate_proj.weight`, `.up_proj.weight`).
        down_proj: [H, Is] (`shared_expert.down_proj.weight`).
        gate: [1, H] or [H] (`shared_expert_gate.weight`).
        dtype: optional dtype of the result (default: the input's).
    """
    g_s, u_s, d_s, sg_s = _shape(gate_proj), _shape(up_proj), _shape(down_proj), _shape(gate)
    _need(g_s is not None and len(g_s) == 2 and u_s == g_s,
          f"shared_from_transformers: gate_proj and up_proj must both be [Is, H], got {g_s} and {u_s}")
    n_sh, hidden = g_s
    _need(d_s == (hidden, n_sh), f"shared_from_transformers: down_proj must be [H={hidden}, Is={n_sh}], got {d_s}")
    _need(sg_s in ((1, hidden), (hidden,)),
          f"shared_from_transformers: gate must be shared_expert_gate.weight [1, H={hidden}], got {sg_s}")
    if _is_torch(gate_proj):
        import torch
        gu = torch.stack([gate_proj.detach().t(), up_proj.detach().t()], dim=1)
    else:
        gu = np.stack([np.asarray(gate_proj).T, np.asarray(up_proj).T], axis=1)
    return (_contiguous(gu, dtype), _contiguous(_permute(down_proj, (1, 0)), dtype),
            _contiguous(gate.reshape(hidden), dtype))


def _shared_of(block, dtype):
    se, sg = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    if se is None:
        return None
    _need(sg is not None, f"weights_from_transformers: {type(block).__name__} has a shared_expert but no "
          "shared_expert_gate (the kernels fuse the sigmoid-gated shared expert only)")
    for name in ("gate_proj", "up_proj", "down_proj"):
        _need(getattr(getattr(se, name, None), "bias", None) is None,
              f"weights_from_transformers: shared_expert.{name} has a bias, which the kernels do not support")
    _need(getattr(sg, "bias", None) is None, "weights_from_transformers: shared_expert_gate has a bias, which the "
          "kernels do not support")
    return shared_from_transformers(se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, sg.weight, dtype)


def weights_from_transformers(module, dtype=None) -> MoEWeights:
    """Kernel-layout weights of a transformers sparse-MoE block (e.g. `Qwen3_5MoeSparseMoeBlock`, the
    `Qwen3NextSparseMoeBlock`, the Omni thinker / talker MoE blocks) or of its `experts` module alone.

    Args:
        module: the block (with `.experts` and optionally `.shared_expert` + `.shared_expert_gate`), or the experts
            module (with `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]).
        dtype: optional dtype of the result (default: the parameters').
    Returns:
        MoEWeights(gate_up [E, H, 2, I], down [E, I, H], shared or None).
    """
    experts = module if hasattr(module, "gate_up_proj") else getattr(module, "experts", None)
    _need(experts is not None and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"),
          "weights_from_transformers: expected a transformers sparse-MoE block (with .experts.gate_up_proj and "
          f".experts.down_proj) or its experts module, got {type(module).__name__}")
    for flag, why in (("is_transposed", "transposed expert weights"), ("has_bias", "expert biases")):
        _need(not getattr(experts, flag, False), f"weights_from_transformers: {why} are not supported")
    _need(getattr(experts, "is_concatenated", True), "weights_from_transformers: the interleaved gate/up layout is "
          "not supported (expected gate rows then up rows)")
    gate_up, down = experts_from_transformers(experts.gate_up_proj, experts.down_proj, dtype)
    shared = None if experts is module else _shared_of(module, dtype)
    return MoEWeights(gate_up, down, shared)


def weights_from_state_dict(state_dict, prefix: str = "", dtype=None) -> MoEWeights:
    """Kernel-layout weights from a sparse-MoE block's state dict (keys after `prefix`, e.g.
    "model.layers.3.mlp."): `experts.gate_up_proj`, `experts.down_proj` (fused, as transformers 5 stores them) or
    per-expert `experts.{e}.{gate,up,down}_proj.weight` (checkpoint layout), and optionally
    `shared_expert.{gate,up,down}_proj.weight` + `shared_expert_gate.weight`."""
    _need(hasattr(state_dict, "keys") and hasattr(state_dict, "__getitem__"),
          "weights_from_state_dict: expected a state dict (mapping of names to tensors), got "
          f"{type(state_dict).__name__}")
    _need(isinstance(prefix, str), f"weights_from_state_dict: prefix must be a str, got {type(prefix).__name__}")
    sd = state_dict
    fused = (prefix + "experts.gate_up_proj", prefix + "experts.down_proj")
    if all(k in sd for k in fused):
        gate_up, down = experts_from_transformers(sd[fused[0]], sd[fused[1]], dtype)
    else:
        n_exp = 0
        while prefix + f"experts.{n_exp}.gate_proj.weight" in sd:
            n_exp += 1
        _need(n_exp > 0, f"weights_from_state_dict: no MoE expert weights under prefix {prefix!r} (looked for "
              f"{fused[0]!r} or {prefix + 'experts.0.gate_proj.weight'!r})")
        keys = [[prefix + f"experts.{e}.{n}_proj.weight" for e in range(n_exp)] for n in ("gate", "up", "down")]
        for k in keys[1] + keys[2]:
            _need(k in sd, f"weights_from_state_dict: missing {k!r}")
        if _is_torch(sd[keys[0][0]]):
            import torch
            gu = torch.stack([torch.cat([sd[g].detach(), sd[u].detach()], 0) for g, u in zip(keys[0], keys[1])])
            dn = torch.stack([sd[d].detach() for d in keys[2]])
        else:
            gu = np.stack([np.concatenate([np.asarray(sd[g]), np.asarray(sd[u])], 0) for g, u in zip(keys[0], keys[1])])
            dn = np.stack([np.asarray(sd[d]) for d in keys[2]])
        gate_up, down = experts_from_transformers(gu, dn, dtype)
    sk = [prefix + f"shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")]
    sk.append(prefix + "shared_expert_gate.weight")
    present = [k in sd for k in sk]
    shared = None
    if any(present):
        _need(all(present), f"weights_from_state_dict: incomplete shared expert under prefix {prefix!r}: missing "
              f"{[k for k, p in zip(sk, present) if not p]}")
        shared = shared_from_transformers(*(sd[k] for k in sk), dtype=dtype)
    return MoEWeights(gate_up, down, shared)
