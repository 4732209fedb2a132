"""MoE for token generation (decode, T * TOPK small): loads only the selected experts, each once.

The host turns the top-k ids into a slot table `slot_expert` (the distinct local experts the batch selected,
ascending); the kernel streams one expert per slot by dynamic DMA and runs it on every token of the batch with
the per-token weight sum_j w[t, j] * (idx[t, j] == expert) computed on device (0 for tokens that did not pick
it). With T <= 32 tokens everything is weight-stationary (the tokens are the matmul moving free size), and the
output accumulates transposed ([H, T]) in PSUM across the shared expert and all slots.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX, PSUM_BANK_BYTES
from ..validation import kernel_check
from ._tiles import itemsize, load_down, load_gate_up
from .blockwise import _as_int32, _np, _shape, check_weights, moe_combine_kernel

# ---- constraints
_MAX_TOKENS = 32            # decode batch: the [128, H/128, T] fp32 accumulator stays within 4 PSUM banks at H=8192
_DIRECT_OUT_MAX_T = 2      # up to this many tokens the [H, T] result is written by one strided DMA (no transposes)
# ---- tiles
_H_TILE = P_MAX             # output hidden rows per down-projection matmul (stationary free size M)


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@nki.jit
def moe_decode_kernel(hidden, top_k_index, top_k_weights, gate_up, down, slot_expert, shared_gate_up, shared_down,
                      shared_gate, expert_offset):
    """Selective-load MoE for a small batch, weight-stationary (hidden / intermediate rows on the partitions,
    the T tokens on the free axis); returns per-core partial outputs.

    Dimensions:
        T tokens (<= 32), H hidden, E local experts, I, Is intermediates, TOPK, S slots, C programs.
    Args:
        hidden: [T, H] @ HBM. top_k_index: [T, TOPK] int32 @ HBM (global ids). top_k_weights: [T, TOPK] @ HBM.
        gate_up: [E, H, 2, I] @ HBM. down: [E, I, H] @ HBM.
        slot_expert: [S] int32 @ HBM, local expert id of each slot (distinct).
        shared_gate_up / shared_down / shared_gate: [H, 2, Is] / [Is, H] / [H] @ HBM, or None.
        expert_offset: global id of local expert 0 (trace-time constant).
    Returns:
        out: [T, C, H] @ HBM, hidden's dtype; the result is the sum over c.
    Constraints:
        T <= _MAX_TOKENS, H % 128 == 0, I = ic * ceil(I / 128).
    Pseudocode:
        xT[p, t, j] = x[t, p * n_h + j]                                     # one DMA
        idx, w broadcast to all partitions [128, T, TOPK]                   # stride-0 DMAs
        accT = 0 (PSUM [128, H/128, T] fp32)
        program 0: accT += (sigmoid(x . w_sg) * silu(Gs^T xT) * (Us^T xT)) ^T-down Ds
        for each slot s with s % C == c:
            e = slot_expert[s]; Wgu = gate_up[e]; Wd = down[e]                  # dynamic DMAs
            a[t] = sum_j w[t, j] * (idx[t, j] == e + expert_offset)           # on every partition
            hT = a * silu(Wg^T xT) * (Wu^T xT)                                # [I, T], weights stationary
            accT[h, t] += Wd[:, h]^T hT                                       # PSUM accumulation over slots
        out[:, c] = transpose(accT)
    """
    n_tokens, h_total = hidden.shape
    n_slots = slot_expert.shape[0]
    top_k = top_k_index.shape[1]
    n_h = h_total // P_MAX
    n_hc = h_total // _H_TILE
    t_pad = _pow2_at_least(n_tokens)          # accumulator columns per hidden chunk: keeps matmuls bank-aligned
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    out = nl.ndarray((n_tokens, n_prog, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)

    xT_sb = nl.ndarray((P_MAX, n_tokens, n_h), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xT_sb, src=hidden.ap(pattern=[[n_h, P_MAX], [h_total, n_tokens], [1, n_h]], offset=0))
    idx_sb = nl.ndarray((P_MAX, n_tokens, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx_sb, src=top_k_index.ap(pattern=[[0, P_MAX], [top_k, n_tokens], [1, top_k]], offset=0))
    w_sb = nl.ndarray((P_MAX, n_tokens, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb, src=top_k_weights.ap(pattern=[[0, P_MAX], [top_k, n_tokens], [1, top_k]], offset=0))
    acc_psum = nl.ndarray((P_MAX, n_hc, t_pad), dtype=nl.float32, buffer=nl.psum)

    if shared_gate_up is not None and pid == 0:
        s_wgu_sb = load_gate_up(shared_gate_up)
        s_wd_sb = load_down(shared_down)
        g_sb = _sigmoid_gate_bcast(shared_gate, xT_sb, n_tokens)
        _expert_T(xT_sb, s_wgu_sb, s_wd_sb, g_sb, acc_psum, n_tokens)
    e_all_sb = nl.ndarray((P_MAX, n_slots), dtype=nl.int32, buffer=nl.sbuf)   # every slot's id, all partitions
    nisa.dma_copy(dst=e_all_sb, src=slot_expert.ap(pattern=[[0, P_MAX], [1, n_slots]], offset=0))
    for i_s in range(pid, n_slots, n_prog):
        e_sb = e_all_sb[:, i_s:i_s + 1]
        wgu_sb = load_gate_up(gate_up, e_sb[0:1, 0:1])
        wd_sb = load_down(down, e_sb[0:1, 0:1])
        aff_sb = _slot_affinity(e_sb, idx_sb, w_sb, expert_offset, n_tokens, top_k)
        _expert_T(xT_sb, wgu_sb, wd_sb, aff_sb, acc_psum, n_tokens)
    if n_slots <= pid and (shared_gate_up is None or pid != 0):
        nisa.memset(dst=acc_psum, value=0.0)      # this core had no work: its partial is zero

    # accT [128, n_hc, T] -> out rows [T, H]: cast; a few tokens go straight out by one element-strided DMA
    # (out[t, hc * 128 + p] = accT[p, hc, t]); more tokens are transposed on TensorE for row-contiguous writes
    accT_sb = nl.ndarray((P_MAX, n_hc, t_pad), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=accT_sb[:, :, 0:n_tokens], src=acc_psum[:, :, 0:n_tokens])
    if n_tokens <= _DIRECT_OUT_MAX_T:
        nisa.dma_copy(dst=out.ap(pattern=[[1, P_MAX], [_H_TILE, n_hc], [n_prog * h_total, n_tokens]],
                                 offset=pid * h_total),
                      src=accT_sb[:, :, 0:n_tokens])
        return out
    y_sb = nl.ndarray((_MAX_TOKENS, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    group = PSUM_BANK_BYTES // (_H_TILE * itemsize(hidden.dtype))
    for g0 in range(0, n_hc, group):
        g_sz = min(group, n_hc - g0)
        o_psum = nl.ndarray((_MAX_TOKENS, group * _H_TILE), dtype=hidden.dtype, buffer=nl.psum)
        for gg in range(g_sz):
            nisa.nc_transpose(dst=o_psum[0:n_tokens, gg * _H_TILE:(gg + 1) * _H_TILE],
                              data=accT_sb[:, g0 + gg, 0:n_tokens])
        nisa.tensor_copy(dst=y_sb[0:n_tokens, g0 * _H_TILE:(g0 + g_sz) * _H_TILE],
                         src=o_psum[0:n_tokens, 0:g_sz * _H_TILE])
    nisa.dma_copy(dst=out[:, pid, :], src=y_sb[0:n_tokens, :])
    return out


def _slot_affinity(e_sb, idx_sb, w_sb, expert_offset, n_tokens, top_k):
    """[128, T] fp32, the same on every partition: a[t] = sum_j w[t, j] * (idx[t, j] == e + expert_offset)."""
    eg_sb = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=eg_sb, data=e_sb, op0=nl.add, operand0=expert_offset)
    sel_sb = nl.ndarray((P_MAX, n_tokens, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb, data=idx_sb, op0=nl.equal, operand0=eg_sb)
    nisa.tensor_tensor(dst=sel_sb, data1=sel_sb, data2=w_sb, op=nl.multiply)
    aff_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=aff_sb, op=nl.add, data=sel_sb, axis=2)
    return aff_sb


def _sigmoid_gate_bcast(shared_gate, xT_sb, n_tokens):
    """[128, T] fp32 sigmoid(x_t . w_sg) on every partition: the gate vector replicated over 128 stationary
    columns (VectorE), so the matmul result lands on all partitions."""
    h_total = shared_gate.shape[0]
    n_h = h_total // P_MAX
    wsg_sb = nl.ndarray((P_MAX, n_h, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=wsg_sb, src=shared_gate.ap(pattern=[[n_h, P_MAX], [1, n_h]], offset=0))
    ones_sb = nl.ndarray((P_MAX, P_MAX), dtype=xT_sb.dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    wsg_bc = nl.ndarray((P_MAX, n_h, P_MAX), dtype=xT_sb.dtype, buffer=nl.sbuf)
    for j in range(n_h):
        nisa.tensor_scalar(dst=wsg_bc[:, j, :], data=ones_sb, op0=nl.multiply, operand0=wsg_sb[:, j, :])
    g_psum = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.psum)
    for j in range(n_h):
        nisa.nc_matmul(g_psum, wsg_bc[:, j, :], xT_sb[:, :, j], accumulate=(j > 0))
    g_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=g_sb, op=nl.sigmoid, data=g_psum)
    return g_sb


def _expert_T(xT_sb, wgu_sb, wd_sb, scale_sb, acc_psum, n_tokens):
    """acc_psum[h, t] += sum_i D[i, h] * scale[t] * silu(G^T x)[i, t] * (U^T x)[i, t] (weights stationary)."""
    n_h = wgu_sb.shape[1]
    ic, n_i, h_total = wd_sb.shape
    n_hc = h_total // _H_TILE
    for c in range(n_i):
        gu_psum = nl.ndarray((P_MAX, 2, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
        for half in range(2):
            for j in range(n_h):
                nisa.nc_matmul(gu_psum[0:ic, half, 0:n_tokens], wgu_sb[:, j, half, c::n_i], xT_sb[:, :, j],
                               accumulate=(j > 0))
        act_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act_sb[0:ic, :], op=nl.silu, data=gu_psum[0:ic, 0, 0:n_tokens])
        nisa.tensor_tensor(dst=act_sb[0:ic, :], data1=act_sb[0:ic, :], data2=scale_sb[0:ic, :], op=nl.multiply)
        h_sb = nl.ndarray((P_MAX, n_tokens), dtype=wd_sb.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=h_sb[0:ic, :], data1=act_sb[0:ic, :], data2=gu_psum[0:ic, 1, 0:n_tokens],
                           op=nl.multiply)
        for hc in range(n_hc):
            nisa.nc_matmul(acc_psum[:, hc, 0:n_tokens], wd_sb[0:ic, c, hc * _H_TILE:(hc + 1) * _H_TILE],
                           h_sb[0:ic, :], accumulate=None)


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
        T <= 32; the slot table (distinct selected experts) is computed on the host from top_k_index, so the
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
