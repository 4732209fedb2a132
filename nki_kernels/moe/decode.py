"""MoE for token generation (decode, T * TOPK small): loads only the selected experts, each once.

The host turns the top-k ids into a slot table `slot_expert` (the distinct local experts the batch selected,
ascending); the kernel streams one expert per slot by dynamic DMA and runs it on every token of the batch with
the per-token weight sum_j w[t, j] * (idx[t, j] == expert) computed on device (0 for tokens that did not pick
it), accumulating in SBUF; the fused shared expert initialises the accumulator.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..validation import kernel_check
from ._tiles import (TOK_TILE, down_proj, down_proj_accumulate, load_down, load_gate_up, load_gate_vector,
                     sigmoid_gate, swiglu, transpose_tokens)
from .blockwise import _as_int32, _np, _shape, check_weights, moe_combine_kernel

# ---- constraints
_MAX_TOKENS = TOK_TILE       # every token of the batch sits on one partition tile


@nki.jit
def moe_decode_kernel(hidden, top_k_index, top_k_weights, gate_up, down, slot_expert, shared_gate_up, shared_down,
                      shared_gate, expert_offset):
    """Selective-load MoE for a small batch; returns per-core partial outputs.

    Dimensions:
        T tokens (<= 128), H hidden, E local experts, I, Is intermediates, TOPK, S slots, C programs.
    Args:
        hidden: [T, H] @ HBM. top_k_index: [T, TOPK] int32 @ HBM (global ids). top_k_weights: [T, TOPK] @ HBM.
        gate_up: [E, H, 2, I] @ HBM. down: [E, I, H] @ HBM.
        slot_expert: [S] int32 @ HBM, local expert id of each slot (distinct).
        shared_gate_up / shared_down / shared_gate: [H, 2, Is] / [Is, H] / [H] @ HBM, or None.
        expert_offset: global id of local expert 0 (trace-time constant).
    Returns:
        out: [T, C, H] @ HBM, hidden's dtype; the result is the sum over c.
    Constraints:
        T <= 128, H % 128 == 0, I = ic * ceil(I / 128).
    Pseudocode:
        xT = transpose(hidden); acc = shared(x) on program 0 else 0             # fp32 SBUF [T, H]
        for each slot s with s % C == c:
            e = slot_expert[s]; Wgu = gate_up[e]; Wd = down[e]                  # dynamic DMAs
            a[t] = sum_j w[t, j] * (idx[t, j] == e + expert_offset)
            acc += (a * silu(x Wg) * (x Wu)) Wd
        out[:, c] = acc
    """
    n_tokens, h_total = hidden.shape
    n_slots = slot_expert.shape[0]
    top_k = top_k_index.shape[1]
    n_h = h_total // P_MAX
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    out = nl.ndarray((n_tokens, n_prog, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)

    x_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb[0:n_tokens, :], src=hidden)
    idx_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx_sb[0:n_tokens, :], src=top_k_index)
    w_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb[0:n_tokens, :], src=top_k_weights)
    xT_sb = transpose_tokens(x_sb, n_tokens, n_h)

    if shared_gate_up is not None and pid == 0:
        s_wgu_sb = load_gate_up(shared_gate_up)
        s_wd_sb = load_down(shared_down)
        s_wsg_sb = load_gate_vector(shared_gate)
        g_sb = sigmoid_gate(xT_sb, n_tokens, s_wsg_sb)
        sh_sb = swiglu(xT_sb, n_tokens, s_wgu_sb, g_sb)
        acc_sb = down_proj(sh_sb, n_tokens, s_wd_sb, nl.float32)
    else:
        acc_sb = nl.ndarray((TOK_TILE, h_total), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=acc_sb[0:n_tokens, :], value=0.0)

    for i_s in range(pid, n_slots, n_prog):
        _one_slot(gate_up, down, slot_expert, i_s, expert_offset, xT_sb, idx_sb, w_sb, acc_sb, n_tokens, top_k)

    y_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=y_sb[0:n_tokens, :], src=acc_sb[0:n_tokens, :])
    nisa.dma_copy(dst=out[:, pid, :], src=y_sb[0:n_tokens, :])
    return out


def _one_slot(gate_up, down, slot_expert, i_s, expert_offset, xT_sb, idx_sb, w_sb, acc_sb, n_tokens, top_k):
    e_sb = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=e_sb, src=slot_expert.ap(pattern=[[0, P_MAX], [1, 1]], offset=i_s))
    wgu_sb = load_gate_up(gate_up, e_sb[0:1, 0:1])
    wd_sb = load_down(down, e_sb[0:1, 0:1])
    eg_sb = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=eg_sb[0:n_tokens, :], data=e_sb[0:n_tokens, :], op0=nl.add, operand0=expert_offset)
    sel_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb[0:n_tokens, :], data=idx_sb[0:n_tokens, :], op0=nl.equal,
                       operand0=eg_sb[0:n_tokens, :])
    nisa.tensor_tensor(dst=sel_sb[0:n_tokens, :], data1=sel_sb[0:n_tokens, :], data2=w_sb[0:n_tokens, :],
                       op=nl.multiply)
    aff_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=aff_sb[0:n_tokens, :], op=nl.add, data=sel_sb[0:n_tokens, :], axis=1)
    h_sb = swiglu(xT_sb, n_tokens, wgu_sb, aff_sb)
    down_proj_accumulate(h_sb, n_tokens, wd_sb, acc_sb)


def decode_slots(top_k_index, num_experts: int, expert_offset: int = 0) -> np.ndarray:
    """Slot table: the distinct local expert ids selected by the batch, ascending, int32 (at least one slot;
    a batch with no local expert gets slot [0], whose per-token weights are all 0)."""
    idx = _np(top_k_index).astype(np.int64).reshape(-1) - int(expert_offset)
    ids = np.unique(idx[(idx >= 0) & (idx < num_experts)])
    return (ids if ids.size else np.zeros(1, dtype=np.int64)).astype(np.int32)


def moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset: int = 0,
               lnc: int = 1):
    """MoE for a small batch (decode): streams only the distinct selected experts, each once, plus the shared
    expert, in one launch.

    Dimensions:
        T tokens (T * TOPK small, typically 1-32), H hidden, E local experts, I, Is intermediates, TOPK.
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        top_k_index: [T, TOPK] int global expert ids (ids outside expert_offset .. expert_offset + E - 1 are
            other ranks' experts and are ignored).
        top_k_weights: [T, TOPK] routing weights.
        gate_up: [E, H, 2, I] @ HBM; down: [E, I, H] @ HBM.
        shared: optional (gate_up [H, 2, Is], down [Is, H], gate vector [H]).
        expert_offset: global id of local expert 0 (expert parallelism).
        lnc: 1, or 2 (slots alternate between the two cores; partial outputs added by a second launch).
    Returns:
        [T, H] in hidden's dtype.
    Constraints:
        T <= 128; the slot table (distinct selected experts) is computed on the host from top_k_index, so the
        kernel is traced for that slot count S (S <= min(T * TOPK, E)).
    Pseudocode:
        see moe_decode_kernel.
    """
    kname = "moe_decode"
    check_weights(kname, hidden, gate_up, down, shared)
    n_tokens = _shape(hidden)[0]
    n_local = _shape(gate_up)[0]
    kernel_check(n_tokens <= _MAX_TOKENS, f"{kname}: T must be <= {_MAX_TOKENS} (use moe_blockwise), got T={n_tokens}")
    kernel_check(getattr(top_k_index, "ndim", 0) == 2 and _shape(top_k_index)[0] == n_tokens,
                 f"{kname}: top_k_index must be [T={n_tokens}, TOPK], got shape={_shape(top_k_index)}")
    kernel_check(np.issubdtype(_np(top_k_index).dtype, np.integer),
                 f"{kname}: top_k_index must be integer, got dtype={top_k_index.dtype}")
    kernel_check(_shape(top_k_weights) == _shape(top_k_index),
                 f"{kname}: top_k_weights must be [T, TOPK]={_shape(top_k_index)}, got shape={_shape(top_k_weights)}")
    kernel_check(lnc in (1, 2), f"{kname}: lnc must be 1 or 2, got lnc={lnc}")
    kernel_check(isinstance(expert_offset, (int, np.integer)) and expert_offset >= 0,
                 f"{kname}: expert_offset must be a non-negative int, got expert_offset={expert_offset!r}")
    slots = decode_slots(top_k_index, n_local, expert_offset)
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    partials = call(moe_decode_kernel, hidden, _as_int32(top_k_index), top_k_weights, gate_up, down, slots,
                    s_gu, s_dn, s_g, int(expert_offset), lnc=lnc)
    if lnc == 1:
        return partials[:, 0]
    return call(moe_combine_kernel, partials, lnc=lnc)
