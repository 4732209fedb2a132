"""MoE for token generation (decode, T * TOPK small): loads only the selected experts, each once.

The host turns the top-k ids into a slot table `slot_expert` (the distinct local experts the batch selected,
ascending); the kernel streams one expert per slot by dynamic DMA and runs it on every token of the batch with
the per-token weight sum_j w[t, j] * (idx[t, j] == expert) computed on device (0 for tokens that did not pick
it). With T <= 32 tokens everything is weight-stationary (the tokens are the matmul moving free size), and the
output accumulates transposed ([H, T]) in PSUM across the shared expert and all slots.

Latency plan (small experts are bound by fixed DMA latencies, not bandwidth): the slot-id load is the first DMA
and every expert DMA depends on it, so the shared expert's static weight DMAs fill the queues meanwhile; then
the weights of a whole wave of R slots are issued at once (R separate SBUF buffers, so their fixed latencies
overlap), every gate_up before any down, so the last bytes to land feed only the short down-projection step.
"""
from __future__ import annotations

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX, PSUM_BANK_BYTES, PSUM_FMAX_FP32
from ..validation import kernel_check
from ._tiles import intermediate_split, itemsize, load_down, load_gate_up
from .blockwise import _as_int32, _np, _shape, check_weights, moe_combine_kernel

# ---- constraints
_MAX_TOKENS = 32            # decode batch: the [128, H/128, T] fp32 accumulator stays within 4 PSUM banks at H=8192
_DIRECT_OUT_MAX_T = 2      # up to this many tokens the [H, T] result is written by one strided DMA (no transposes)
_RING_BYTES_PP = 120 * 1024   # SBUF bytes per partition for the expert weights in flight plus the shared expert's
_MIN_ROW_BYTES = 4096         # DMA descriptor run (one partition row) at full bandwidth (KERNELS.md cost model)
_PRE_SLOT_BYTES = 640 * 1024  # static bytes the DMA queues stream while the slot-id load is in flight
                              # (one fixed DMA latency, ~2 us, at the ~360 GB/s of one trn2 core)
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
        T tokens (<= 32), H hidden, E local experts, I, Is intermediates, TOPK, S slots, C programs,
        R weight buffers (slots whose weights are in flight at once).
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
        e = slot_expert (first DMA: every expert DMA waits for it); xT[p, t, j] = x[t, p * n_h + j]
        routing rows r = (t, j) on the partitions: idx[r] - expert_offset, w[r]
        program 0: Wsgu (+ Wsd if small) = shared weights (static DMAs, stream while e is in flight)
                   hsT = sigmoid(x . w_sg) * silu(Gs^T xT) * (Us^T xT)
        for each wave of R slots s (s % C == c), buffer b:
            Wgu[b] = gate_up[e[s]] for every slot of the wave, then Wd[b] = down[e[s]]   # dynamic DMAs
            a[b, t] = sum_j w[t, j] * (idx[t, j] == e[s]) on every partition             # ones-matmul row sums
            hT[b] = a[b] * silu(Wg[b]^T xT) * (Wu[b]^T xT)                               # [I, T]
                    (small I: gate_up folded onto 64 partitions, gate|up in one matmul per row, see
                    _swiglu_folded_T)
            accT[h, t] += Wd[b][:, h]^T hT[b]                                            # PSUM, after all gate/ups
        program 0: accT += Wsd^T hsT (a big shared down is loaded after the first wave: it ends the queue)
        out[:, c] = accT (T <= 2: p-major rows, one DMA) or transpose(accT)
    """
    n_tokens, h_total = hidden.shape
    n_slots = slot_expert.shape[0]
    n_hc = h_total // _H_TILE
    t_pad = _pow2_at_least(n_tokens)          # accumulator columns per hidden chunk: keeps matmuls bank-aligned
    # accumulator row p of chunk hc holds hidden column p * n_hc + hc when the result leaves by one DMA (each
    # partition then writes n_hc contiguous outputs), else hc * 128 + p (whole 128-column TensorE transposes)
    p_major = n_tokens <= _DIRECT_OUT_MAX_T
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    out = nl.ndarray((n_tokens, n_prog, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)
    has_shared = shared_gate_up is not None and pid == 0
    my_slots = list(range(pid, n_slots, n_prog))

    # the slot ids gate every expert weight DMA: their load goes first; then the small per-token inputs
    e_sb = nl.ndarray((1, n_slots), dtype=nl.int32, buffer=nl.sbuf)             # DMA offsets: one partition
    nisa.dma_copy(dst=e_sb, src=slot_expert.ap(pattern=[[0, 1], [1, n_slots]], offset=0))
    xT_sb = _load_xT(hidden, 1)
    # small-I experts: fold 2x more hidden rows into each partition so a gate_up row reaches a long DMA run
    fold = _gate_up_fold(gate_up)
    xTe_sb = xT_sb if fold == 1 else _load_xT(hidden, fold)
    sel_sb = _up_selector(gate_up) if fold > 1 else None
    routes = _routing_rows(top_k_index, top_k_weights, slot_expert, expert_offset)
    ones_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)     # stationary of the row sums
    nisa.memset(dst=ones_sb, value=1.0)
    acc_psum = nl.ndarray((P_MAX, n_hc, t_pad), dtype=nl.float32, buffer=nl.psum)

    s_hT_sb = s_wd_sb = None
    # a small shared expert streams entirely while the slot ids are in flight; a big one's down goes after the
    # routed experts (a static DMA's shorter fixed latency then ends the queue)
    shared_early = has_shared and 3 * h_total * shared_down.shape[0] * itemsize(shared_down.dtype) <= _PRE_SLOT_BYTES
    if has_shared:
        s_wgu_sb = load_gate_up(shared_gate_up)
        if shared_early:
            s_wd_sb = load_down(shared_down)
        g_sb = _sigmoid_gate_bcast(shared_gate, xT_sb, n_tokens)
        s_hT_sb = _alloc_hT(shared_down, 1, n_tokens)
        _swiglu_T(xT_sb, s_wgu_sb, g_sb, s_hT_sb, 0, n_tokens)
        if shared_early:
            _down_T(s_hT_sb, 0, s_wd_sb, acc_psum, n_tokens, p_major)
    shared_pp = _expert_bytes_pp(shared_down, 1) if has_shared else 0
    ring = _weight_ring(gate_up, down, len(my_slots), n_tokens, fold, _RING_BYTES_PP - shared_pp)
    n_buf = max(1, len(ring))
    for w0 in range(0, len(my_slots), n_buf):
        wave = my_slots[w0:w0 + n_buf]
        # every gate_up of the wave before any down: the last bytes to land feed only the short down step
        for b, s in enumerate(wave):
            _load_expert(ring[b][0], gate_up, e_sb[0:1, s:s + 1])
        for b, s in enumerate(wave):
            _load_expert(ring[b][1], down, e_sb[0:1, s:s + 1])
        if has_shared and not shared_early and w0 == 0:
            s_wd_sb = load_down(shared_down)
        aff_psum = _wave_affinities(routes, ones_sb, wave, n_prog, n_tokens)
        hT_sb = _alloc_hT(down, n_buf, n_tokens)
        for b in range(len(wave)):
            aff_b = aff_psum[:, b * n_tokens:(b + 1) * n_tokens]
            if fold == 1:
                _swiglu_T(xT_sb, ring[b][0], aff_b, hT_sb, b, n_tokens)
            else:
                _swiglu_folded_T(xTe_sb, ring[b][0], aff_b, hT_sb, b, n_tokens, sel_sb)
        for b in range(len(wave)):
            _down_T(hT_sb, b, ring[b][1], acc_psum, n_tokens, p_major)
    if has_shared and not shared_early:
        _down_T(s_hT_sb, 0, s_wd_sb, acc_psum, n_tokens, p_major)
    if not my_slots and not has_shared:
        nisa.memset(dst=acc_psum, value=0.0)      # this core had no work: its partial is zero
    _store_out(out, acc_psum, pid, n_prog, p_major)
    return out


def _load_xT(hidden, fold):
    """hidden [T, H] @ HBM -> SBUF [128 / fold, T, fold * n_h] with xT[p, t, j] = x[t, p * fold * n_h + j]
    (one DMA)."""
    n_tokens, h_total = hidden.shape
    parts = P_MAX // fold
    rows = h_total // parts
    xT_sb = nl.ndarray((parts, n_tokens, rows), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xT_sb, src=hidden.ap(pattern=[[rows, parts], [h_total, n_tokens], [1, rows]], offset=0))
    return xT_sb


def _gate_up_fold(gate_up):
    """2 when one expert's gate_up rows on 128 partitions (n_h * 2I elements each) are shorter than a full DMA
    run and gate + up fit one stationary (2I <= 128): the rows then go on 64 partitions, 2 * n_h each, and one
    matmul per hidden row covers gate and up together (same matmul count, longer DMA runs); else 1."""
    _, h_total, _, n_inter = gate_up.shape
    row = h_total // P_MAX * 2 * n_inter * itemsize(gate_up.dtype)
    return 2 if row < _MIN_ROW_BYTES and 2 * n_inter <= P_MAX else 1


def _up_selector(gate_up):
    """[2I, I] 0/1 matrix in the weights' dtype, sel[I + i, i] = 1: as a stationary it moves the up rows
    (partitions I .. 2I - 1 of a fused gate|up result) onto partitions 0 .. I - 1."""
    n_inter = gate_up.shape[-1]
    v_sb = nl.ndarray((2 * n_inter, n_inter), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=v_sb, pattern=[[-1, n_inter]], offset=-n_inter, channel_multiplier=1)    # p - I - i
    sel_sb = nl.ndarray((2 * n_inter, n_inter), dtype=gate_up.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb, data=v_sb, op0=nl.equal, operand0=0)
    return sel_sb


def _routing_rows(top_k_index, top_k_weights, slot_expert, expert_offset):
    """The T * TOPK routing choices one per partition, rows r = t * TOPK + j in tiles of 128: a list of
    (e_sb [rows, S] slot ids, idx_sb [rows, 1] local expert id idx[t, j] - expert_offset, w_sb [rows, 1] fp32,
    wt_sb [rows, T] fp32 = w[t, j] in column t, 0 elsewhere)."""
    n_tokens, top_k = top_k_index.shape
    n_slots = slot_expert.shape[0]
    n_rows = n_tokens * top_k
    tiles = []
    for r0 in range(0, n_rows, P_MAX):
        rows = min(P_MAX, n_rows - r0)
        e_sb = nl.ndarray((rows, n_slots), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=e_sb, src=slot_expert.ap(pattern=[[0, rows], [1, n_slots]], offset=0))
        idx_sb = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx_sb, src=top_k_index.ap(pattern=[[1, rows], [1, 1]], offset=r0))
        nisa.tensor_scalar(dst=idx_sb, data=idx_sb, op0=nl.subtract, operand0=expert_offset)
        w_sb = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb, src=top_k_weights.ap(pattern=[[1, rows], [1, 1]], offset=r0))
        wt_sb = w_sb
        if n_tokens > 1:
            # v[r, t] = r - TOPK * t; row r belongs to token t iff 0 <= v < TOPK
            v_sb = nl.ndarray((rows, n_tokens), dtype=nl.int32, buffer=nl.sbuf)
            nisa.iota(dst=v_sb, pattern=[[-top_k, n_tokens]], offset=r0, channel_multiplier=1)
            lt_sb = nl.ndarray((rows, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=lt_sb, data=v_sb, op0=nl.less, operand0=top_k, op1=nl.multiply, operand1=w_sb)
            wt_sb = nl.ndarray((rows, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=wt_sb, data=v_sb, op0=nl.greater_equal, operand0=0, op1=nl.multiply,
                                      operand1=lt_sb)
        tiles.append((e_sb, idx_sb, w_sb, wt_sb))
    return tiles


def _wave_affinities(routes, ones_sb, wave, n_prog, n_tokens):
    """PSUM [128, R * T] fp32, the same on every partition: a[b * T + t] = sum_j w[t, j] * (idx[t, j] == e_b)
    for the slots b of one wave. Rows (t, j) on the partitions: m[(t, j), b, t'] = (idx == e_b) * wt[(t, j), t']
    (VectorE), then a ones-stationary matmul sums the rows onto all 128 partitions."""
    n_w = len(wave)
    cols = slice(wave[0], wave[-1] + 1, n_prog)
    aff_psum = nl.ndarray((P_MAX, n_w * n_tokens), dtype=nl.float32, buffer=nl.psum)
    for i_t, (e_sb, idx_sb, w_sb, wt_sb) in enumerate(routes):
        rows = idx_sb.shape[0]
        m_sb = nl.ndarray((P_MAX, n_w * n_tokens), dtype=nl.float32, buffer=nl.sbuf)
        if n_tokens == 1:
            nisa.tensor_scalar(dst=m_sb[0:rows, :], data=e_sb[:, cols], op0=nl.equal, operand0=idx_sb,
                               op1=nl.multiply, operand1=w_sb)
        else:
            eq_sb = nl.ndarray((P_MAX, n_w), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=eq_sb[0:rows, :], data=e_sb[:, cols], op0=nl.equal, operand0=idx_sb)
            for b in range(n_w):
                nisa.tensor_scalar(dst=m_sb[0:rows, b * n_tokens:(b + 1) * n_tokens], data=wt_sb, op0=nl.multiply,
                                   operand0=eq_sb[0:rows, b:b + 1])
        nisa.nc_matmul(aff_psum, ones_sb[0:rows, :], m_sb[0:rows, :], accumulate=(i_t > 0))
    return aff_psum


def _store_out(out, acc_psum, pid, n_prog, p_major):
    """accT [128, n_hc, T] (PSUM) -> out[:, pid] rows [T, H]: cast; p-major (few tokens): one DMA,
    out[t, p * n_hc + hc] = accT[p, hc, t]; else TensorE transposes of the 128-column chunks (out[t, hc * 128 + p])
    for row-contiguous writes."""
    n_tokens, _, h_total = out.shape
    n_hc = h_total // _H_TILE
    accT_sb = nl.ndarray(acc_psum.shape, dtype=out.dtype, buffer=nl.sbuf)
    if p_major:
        nisa.activation(dst=accT_sb[:, :, 0:n_tokens], op=nl.copy, data=acc_psum[:, :, 0:n_tokens])
        nisa.dma_copy(dst=out.ap(pattern=[[n_hc, P_MAX], [1, n_hc], [n_prog * h_total, n_tokens]],
                                 offset=pid * h_total),
                      src=accT_sb[:, :, 0:n_tokens])
        return
    nisa.tensor_copy(dst=accT_sb[:, :, 0:n_tokens], src=acc_psum[:, :, 0:n_tokens])
    y_sb = nl.ndarray((_MAX_TOKENS, h_total), dtype=out.dtype, buffer=nl.sbuf)
    group = PSUM_BANK_BYTES // (_H_TILE * itemsize(out.dtype))
    for g0 in range(0, n_hc, group):
        g_sz = min(group, n_hc - g0)
        o_psum = nl.ndarray((_MAX_TOKENS, group * _H_TILE), dtype=out.dtype, buffer=nl.psum)
        for gg in range(g_sz):
            nisa.nc_transpose(dst=o_psum[0:n_tokens, gg * _H_TILE:(gg + 1) * _H_TILE],
                              data=accT_sb[:, g0 + gg, 0:n_tokens])
        nisa.tensor_copy(dst=y_sb[0:n_tokens, g0 * _H_TILE:(g0 + g_sz) * _H_TILE],
                         src=o_psum[0:n_tokens, 0:g_sz * _H_TILE])
    nisa.dma_copy(dst=out[:, pid, :], src=y_sb[0:n_tokens, :])


def _expert_bytes_pp(down, fold):
    """SBUF bytes per partition of one expert's weights (down [.., I, H]): gate_up [128 / fold, fold n_h, 2I]
    plus down [ic, n_i, H]."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    n_i = intermediate_split(n_inter)[1]
    return (fold * (h_total // P_MAX) * 2 * n_inter + n_i * h_total) * itemsize(down.dtype)


def _weight_ring(gate_up, down, n_slots, n_tokens, fold, budget_pp):
    """R = min(S, budget_pp // one expert's bytes per partition, PSUM_FMAX_FP32 // T), at least 1 (gate_up
    [128, n_h, 2, I], or [64, 2 n_h, 2I] when fold == 2; down [ic, n_i, H]) SBUF tile pairs, each its own
    allocation, live for the whole kernel:
    the R experts of a wave stream in at once, and the next wave's DMA into a buffer waits only for that
    buffer's last reader. (R * T affinities fill at most one PSUM bank.)"""
    _, h_total, _, n_inter = gate_up.shape
    n_h = h_total // P_MAX
    ic, n_i = intermediate_split(n_inter)
    n_buf = min(n_slots, max(1, min(budget_pp // _expert_bytes_pp(down, fold), PSUM_FMAX_FP32 // n_tokens)))
    gu_shape = (P_MAX, n_h, 2, n_inter) if fold == 1 else (P_MAX // fold, fold * n_h, 2 * n_inter)
    return [(nl.ndarray(gu_shape, dtype=gate_up.dtype, buffer=nl.sbuf),
             nl.ndarray((ic, n_i, h_total), dtype=down.dtype, buffer=nl.sbuf)) for _ in range(n_buf)]


def _load_expert(dst_sb, weights, e_sb):
    """dst_sb <- weights[e] (e the (1, 1) int32 SBUF tile e_sb): one dynamic DMA of the expert's contiguous
    block, dst_sb's partition p taking the p-th run of (elements / partitions) elements."""
    row = 1
    for d in dst_sb.shape[1:]:
        row *= d
    src = weights.ap(pattern=[[row, dst_sb.shape[0]], [1, row]], offset=0, scalar_offset=e_sb, indirect_dim=0)
    nisa.dma_copy(dst=dst_sb, src=src)


def _alloc_hT(down, n_buf, n_tokens):
    """SBUF [128, n_buf, n_i, T] in the weights' dtype: hT[q, b, c, t] = h_b[t, q * n_i + c]."""
    _, n_i = intermediate_split(down.shape[-2])
    return nl.ndarray((P_MAX, n_buf, n_i, n_tokens), dtype=down.dtype, buffer=nl.sbuf)


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


def _swiglu_T(xT_sb, wgu_sb, scale, hT_sb, b, n_tokens):
    """hT_sb[i, b, :, t] = scale[t] * silu(G^T x)[i, t] * (U^T x)[i, t] (weights stationary, K = 128 hidden
    rows, M = the ic intermediate rows of chunk c, N = T tokens); scale [128, T] fp32 in SBUF or PSUM."""
    n_h, n_inter = wgu_sb.shape[1], wgu_sb.shape[3]
    ic, n_i = intermediate_split(n_inter)
    for c in range(n_i):
        gu_psum = nl.ndarray((P_MAX, 2, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
        for half in range(2):
            for j in range(n_h):
                nisa.nc_matmul(gu_psum[0:ic, half, 0:n_tokens], wgu_sb[:, j, half, c::n_i], xT_sb[:, :, j],
                               accumulate=(j > 0))
        act_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act_sb[0:ic, :], op=nl.silu, data=gu_psum[0:ic, 0, 0:n_tokens])
        nisa.tensor_tensor(dst=act_sb[0:ic, :], data1=act_sb[0:ic, :], data2=scale[0:ic, :], op=nl.multiply)
        nisa.tensor_tensor(dst=hT_sb[0:ic, b, c, :], data1=act_sb[0:ic, :], data2=gu_psum[0:ic, 1, 0:n_tokens],
                           op=nl.multiply)


def _swiglu_folded_T(xT_sb, wgu_sb, scale, hT_sb, b, n_tokens, sel_sb):
    """hT_sb[i, b, 0, t] = scale[t] * silu(G^T x)[i, t] * (U^T x)[i, t] for 2I <= 128 with gate_up folded
    ([64, 2 n_h, 2I]): one matmul per hidden row j (stationary = gate|up columns, M = 2I) puts gate on
    partitions 0 .. I - 1 and up on I .. 2I - 1; a 0/1 selector matmul moves up onto 0 .. I - 1."""
    rows, two_i = wgu_sb.shape[1], wgu_sb.shape[2]
    n_inter = two_i // 2
    gu_psum = nl.ndarray((P_MAX, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
    for j in range(rows):
        nisa.nc_matmul(gu_psum[0:two_i, 0:n_tokens], wgu_sb[:, j, :], xT_sb[:, :, j], accumulate=(j > 0))
    act_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=act_sb[0:n_inter, :], op=nl.silu, data=gu_psum[0:n_inter, 0:n_tokens])
    gu_sb = nl.ndarray((P_MAX, n_tokens), dtype=sel_sb.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=gu_sb[0:two_i, :], src=gu_psum[0:two_i, 0:n_tokens])
    up_psum = nl.ndarray((P_MAX, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(up_psum[0:n_inter, 0:n_tokens], sel_sb, gu_sb[0:two_i, :], accumulate=False)
    nisa.tensor_tensor(dst=act_sb[0:n_inter, :], data1=act_sb[0:n_inter, :], data2=scale[0:n_inter, :],
                       op=nl.multiply)
    nisa.tensor_tensor(dst=hT_sb[0:n_inter, b, 0, :], data1=act_sb[0:n_inter, :],
                       data2=up_psum[0:n_inter, 0:n_tokens], op=nl.multiply)


def _down_T(hT_sb, b, wd_sb, acc_psum, n_tokens, p_major):
    """acc_psum[p, hc, t] += sum_i D[i, h] * hT_sb[i, b, :, t] with h = p * n_hc + hc (p_major) or
    hc * 128 + p (weights stationary: M = 128 output rows, a strided column set when p_major)."""
    ic, n_i, h_total = wd_sb.shape
    n_hc = h_total // _H_TILE
    for c in range(n_i):
        for hc in range(n_hc):
            cols = slice(hc, h_total, n_hc) if p_major else slice(hc * _H_TILE, (hc + 1) * _H_TILE)
            nisa.nc_matmul(acc_psum[:, hc, 0:n_tokens], wd_sb[0:ic, c, cols],
                           hT_sb[0:ic, b, c, :], accumulate=None)


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
