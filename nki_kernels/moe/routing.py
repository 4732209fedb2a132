"""Host-side MoE routing and NxDI's blockwise token-to-block mapping (NumPy or torch CPU in, same kind out).

`moe_route` is the transformers router tail (softmax in fp32 over all experts, top-k, optional renormalisation).
`moe_block_mapping` builds NxDI's blockwise contract (`token_position_to_id`, `block_to_expert`) that
`moe_blockwise` consumes. Both run on the host: they are data-dependent bookkeeping, not NeuronCore work.
"""
from __future__ import annotations

import numpy as np

from ..validation import (INT32_MAX, INT32_MIN, check_array, check_bool, check_host_values, dtype_name, is_int_dtype,
                          kernel_check)


def _to_numpy(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.numpy(), True
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x), False


def _back(a, was_torch):
    if not was_torch:
        return a
    import torch
    return torch.from_numpy(np.ascontiguousarray(a))


def moe_route(router_logits, top_k: int, normalize: bool):
    """Router tail: softmax in fp32 over all E experts, top-k, optional renormalisation to sum 1.

    Dimensions:
        T tokens, E experts, TOPK experts per token.
    Args:
        router_logits: [T, E] (NumPy or torch; any float dtype; computed in fp32).
        top_k: TOPK, 1 <= TOPK <= E.
        normalize: divide the top-k weights by their sum (Qwen3.5-MoE, Qwen3-Next, Omni thinker: True).
    Returns:
        (top_k_weights [T, TOPK] float32, top_k_index [T, TOPK] int32), experts by descending probability
        (ties: lower expert id first); torch tensors for torch input.
    """
    normalize = check_moe_route(router_logits, top_k, normalize)
    logits, was_torch = _to_numpy(router_logits)
    z = logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p = p / p.sum(axis=-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k].astype(np.int32)
    w = np.take_along_axis(p, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return _back(w.astype(np.float32), was_torch), _back(idx, was_torch)


def check_moe_route(router_logits, top_k: int, normalize: bool) -> bool:
    """`moe_route`'s checks (shapes and options; no values, so torch_ops' fake runs them too); returns normalize."""
    check_array("moe_route", "router_logits", router_logits, dtypes=None)   # arrays only, no meta / grad / empty
    shape = tuple(int(s) for s in router_logits.shape)
    kernel_check(len(shape) == 2, f"moe_route: router_logits must be [T, E], got shape={shape}")
    kernel_check(isinstance(top_k, (int, np.integer)) and 1 <= top_k <= shape[1],
                 f"moe_route: top_k must be an int in [1, E={shape[1]}], got top_k={top_k!r}")
    return check_bool("moe_route", "normalize", normalize)


def moe_block_mapping(top_k_index, num_experts: int, block_size: int, expert_offset: int = 0,
                      num_blocks: int | None = None):
    """NxDI's blockwise mapping: tokens sorted by local expert, each expert's tokens padded to whole blocks.

    Dimensions:
        T tokens, TOPK experts per token, E local experts, B = block_size, N blocks.
    Args:
        top_k_index: [T, TOPK] int, global expert ids (negative ids are ignored, e.g. dropped slots).
        num_experts: E, the number of local experts (the rank's weights hold experts
            expert_offset .. expert_offset + E - 1, local id = global id - expert_offset).
        block_size: B tokens per block (1 <= B <= 512).
        expert_offset: first global expert id held locally (expert parallelism); tokens routed to other
            experts are ignored.
        num_blocks: pad the mapping to exactly this many blocks (a static block count, as NxDI's worst-case
            N = min(ceil((T*TOPK - (E-1)) / B) + E - 1, T*TOPK)); padded blocks have only -1 ids and repeat the
            last expert. Default: exactly sum_e ceil(count_e / B) blocks (at least 1).
    Returns:
        token_position_to_id: [N * B] int32, the token id of each block slot, -1 for padding.
        block_to_expert: [N] int32, the local expert of each block; blocks of one expert are contiguous and in
            ascending expert order; within an expert tokens are in ascending token order.
        NumPy arrays, or torch tensors for a torch top_k_index.
    """
    check_moe_block_mapping(top_k_index, num_experts, block_size, expert_offset, num_blocks)
    idx, was_torch = _to_numpy(top_k_index)
    kernel_check(INT32_MIN <= int(idx.min()) and int(idx.max()) <= INT32_MAX,
                 f"moe_block_mapping: top_k_index must fit int32 (the kernels' id dtype), got ids in "
                 f"[{int(idx.min())}, {int(idx.max())}]")
    idx = idx.astype(np.int64)
    n_tokens = idx.shape[0]
    local = idx - int(expert_offset)
    ok = (idx >= 0) & (local >= 0) & (local < num_experts)
    tok = np.broadcast_to(np.arange(n_tokens)[:, None], idx.shape)[ok]
    exp = local[ok]
    order = np.lexsort((tok, exp))
    tok, exp = tok[order], exp[order]
    positions, experts = [], []
    for e in range(num_experts):
        toks = tok[exp == e]
        if toks.size == 0:
            continue
        n_b = -(-toks.size // block_size)
        slot = np.full(n_b * block_size, -1, dtype=np.int64)
        slot[:toks.size] = toks
        positions.append(slot)
        experts.extend([e] * n_b)
    if not experts:
        positions, experts = [np.full(block_size, -1, dtype=np.int64)], [0]
    if num_blocks is not None:
        kernel_check(num_blocks >= len(experts),
                     f"moe_block_mapping: num_blocks={num_blocks} is below the {len(experts)} blocks this routing "
                     f"needs at block_size={block_size}")
        extra = num_blocks - len(experts)
        positions.append(np.full(extra * block_size, -1, dtype=np.int64))
        experts.extend([experts[-1]] * extra)
    tpos = np.concatenate(positions).astype(np.int32)
    b2e = np.asarray(experts, dtype=np.int32)
    return _back(tpos, was_torch), _back(b2e, was_torch)


def check_moe_block_mapping(top_k_index, num_experts: int, block_size: int, expert_offset: int = 0,
                            num_blocks: int | None = None):
    """`moe_block_mapping`'s checks that read no values (top_k_index's shape and dtype, the options), which
    torch_ops' fake runs too; the ids' int32 range and num_blocks against the routing are checked by the
    wrapper."""
    check_host_values("moe_block_mapping", "top_k_index", top_k_index)
    idx = top_k_index if hasattr(top_k_index, "shape") and hasattr(top_k_index, "dtype") else np.asarray(top_k_index)
    shape = tuple(int(s) for s in idx.shape)
    kernel_check(len(shape) == 2, f"moe_block_mapping: top_k_index must be [T, TOPK], got shape={shape}")
    kernel_check(is_int_dtype(idx), f"moe_block_mapping: top_k_index must be integer, got dtype={dtype_name(idx)}")
    kernel_check(0 not in shape, f"moe_block_mapping: top_k_index must not be empty (every dimension >= 1), got "
                 f"shape={shape}")
    kernel_check(isinstance(num_experts, (int, np.integer)) and num_experts >= 1,
                 f"moe_block_mapping: num_experts must be a positive int, got num_experts={num_experts!r}")
    kernel_check(isinstance(block_size, (int, np.integer)) and 1 <= block_size <= 512,
                 f"moe_block_mapping: block_size must be an int in [1, 512], got block_size={block_size!r}")
    from .blockwise import check_expert_offset
    check_expert_offset("moe_block_mapping", expert_offset, int(num_experts))   # the kernels' own rule


def static_num_blocks(n_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """NxDI's worst-case block count N = min(ceil((T*TOPK - (E-1)) / B) + E - 1, T*TOPK) (at least 1)."""
    tk = n_tokens * top_k
    return max(1, min(-(-(tk - (num_experts - 1)) // block_size) + num_experts - 1, tk))
