"""MoE for token generation (decode, T * TOPK small): loads only the selected experts, each once.

The kernel takes top_k_index on device and builds its slot table there: the distinct local experts of the batch,
in order of first appearance, padded to the static S = min(T * TOPK, E) slots (duplicates and other ranks' ids
resolved with compares and small matmuls, no host read of the ids), so its instruction sequence depends only on
shapes and it can sit in a compiled graph. Each slot streams its expert by dynamic DMA, with the id clamped to
[0, E - 1] so no value can read outside the weight tensors (padding slots load expert 0 and weigh 0), and runs
it on every token of the batch with the per-token weight sum_j w[t, j] * (idx[t, j] == expert) computed on device.
With T <= 32 tokens everything is weight-stationary (the tokens are the matmul moving free size), and the output
accumulates transposed ([H, T]) in PSUM across the shared expert and all slots; each token is one column, so a
non-finite value in one token never reaches another.

LNC=2: one launch; with T >= 2 the two cores split the tokens (each builds the slot table of its own tokens, so it
streams only the experts they chose, and writes their rows); with T = 1 they split the weights: core 0 runs the
first ceil(TOPK/2) slots, core 1 the rest, and each half of the shared expert's intermediate rows (all on core 1
when Is / 2 is not a whole number of equal row chunks, `_my_shared_rows`), so each core streams half of the
bytes; one SBUF-to-SBUF exchange (`nisa.sendrecv`) of the fp32 partial sums then lets each core write its
half of the hidden columns.

Latency plan (small experts are bound by fixed DMA latencies, not bandwidth): the routing-id load is the first
DMA and every expert DMA depends on it, so the shared expert's static weight DMAs fill the queues meanwhile; then
the weights of a whole wave of W slots are issued at once (W separate SBUF buffers, so their fixed latencies
overlap), every gate_up before any down, so the last bytes to land feed only the short down-projection step.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import DMA_FULL_RATE_ROW_BYTES, GEMM_MOVING_FMAX, P_MAX, PSUM_BANK_BYTES, PSUM_FMAX_FP32
from ..lnc import for_target, resolve_lnc
from ..transpose import mixing_pe_transpose
from ..validation import kernel_check
from ._tiles import intermediate_split, itemsize, load_gate_up
from .blockwise import (_as_int32, _shape, check_expert_offset, check_top_k, check_top_k_ids, check_weights,
                        sbuf_budget)

# ---- constraints
_MAX_TOKENS = 32            # decode batch: the [128, H/128, T] fp32 accumulator stays within 4 PSUM banks at H=8192
_MAX_ROUTES = 1024          # T * TOPK routing rows: the [128, R] fp32 key table and duplicate masks stay <= 4 KiB
_DIRECT_OUT_MAX_T = 2      # up to this many tokens the [H, T] result is written by one strided DMA (no transposes)
_RING_BYTES_PP = 120 * 1024   # SBUF bytes per partition for the expert weights in flight plus the shared expert's
_PRE_SLOT_BYTES = 640 * 1024  # static bytes the DMA queues stream while the slot-id load is in flight
                              # (one fixed DMA latency, ~2 us, at the ~360 GB/s of one trn2 core)
# ---- tiles
_H_TILE = P_MAX             # output hidden rows per down-projection matmul (stationary free size M)
_SWDGE_TAIL = 4              # one token per core: the last weight DMAs on the pipe use software DGE
_SPREAD_N = GEMM_MOVING_FMAX  # routing weights per K = 1 spreading matmul (moving free size N; one fp32 bank)


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@nki.jit
def moe_decode_kernel(hidden, top_k_index, top_k_weights, gate_up, down, shared_gate_up, shared_down, shared_gate,
                      expert_offset):
    """Selective-load MoE for a small batch, weight-stationary (hidden / intermediate rows on the partitions,
    the T tokens on the free axis), with the slot table built on device from top_k_index.

    Dimensions:
        T tokens (<= 32), H hidden, E local experts, I, Is intermediates, TOPK, R = T * TOPK routing rows,
        S = min(R, E) slots, C programs (LNC), Hc = the hidden columns of this program,
        W weight buffers (slots whose weights are in flight at once).
    Args:
        hidden: [T, H] @ HBM. top_k_index: [T, TOPK] int32 @ HBM (global ids, any values).
        top_k_weights: [T, TOPK] @ HBM. gate_up: [E, H, 2, I] @ HBM. down: [E, I, H] @ HBM.
        shared_gate_up / shared_down / shared_gate: [H, 2, Is] / [Is, H] / [H] @ HBM, or None.
        expert_offset: global id of local expert 0 (trace-time constant).
    Returns:
        out: [T, H] @ HBM, hidden's dtype. Program c writes its share (`_my_share`: LNC=2 with T >= 2 the first
        ceil(T/2) tokens on core 0, the rest on core 1; T = 1: the cores split the slots and the shared rows, swap
        partial sums, and core c writes the p-major columns p * n_hc + hc with hc in its half, `_exchange_store`),
        so one launch gives the whole result. Below, T and S are this program's tokens and slots.
    Constraints:
        T <= _MAX_TOKENS, R <= _MAX_ROUTES, H % 128 == 0, I = ic * ceil(I / 128).
    Pseudocode:
        key[r] = idx[r] - expert_offset if 0 <= that < E else -2            # rows r = t * TOPK + j
        first[r] = key[r] >= 0 and no r' < r has key[r'] == key[r]        # duplicates resolved on device
        pos[r] = sum_{r' < r} first[r']                                    # ones-triangle matmul
        slot[s] = key[r] for the first row r with pos[r] == s, else -1     # one-hot matmul; s < S
        e[s] = min(max(slot[s], 0), E - 1)                                 # every weight DMA stays in its tensor
        a[s, t] = sum_j w[t, j] * (key[t, j] == slot[s])                  # padding slots (-1) match no row
        xT[p, j, t] = x[t, p * n_h + j]
        shared: hsT = sigmoid(x . w_sg) * silu(Gs^T xT) * (Us^T xT); accT += Wsd[:, Hc]^T hsT
        for each wave of W slots s, buffer b:
            Wgu[b] = gate_up[e[s]], then Wd[b] = down[e[s]][:, Hc]                      # dynamic DMAs
            hT[b] = a[s] * silu(Wg[b]^T xT) * (Wu[b]^T xT)                                # [I, T]
            accT[h, t] += Wd[b][:, h]^T hT[b]                                             # PSUM
        out[:, Hc] = accT (T <= 2: p-major rows, one DMA) or transpose(accT)
        (T = 1 at LNC=2: accT += the other core's accT (sendrecv) on this core's half of the columns first)
    """
    n_all, h_total = hidden.shape
    n_local = gate_up.shape[0]
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    out = nl.ndarray((n_all, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)
    t0, n_tokens, h0, h_cols = _my_share(n_all, h_total, pid, n_prog)
    if h_cols == 0 or n_tokens == 0:
        return out
    top_k = top_k_index.shape[1]
    # one token: its TOPK routing rows are the slots (no table to build: the ids go straight to the DMAs, a
    # duplicate id is loaded twice, each with its own weight); else the distinct experts of the batch
    row_slots = n_tokens == 1
    n_slots = top_k if row_slots else min(n_tokens * top_k, n_local)
    # one token under LNC=2: the cores split the slots and the shared expert's intermediate rows, and sum their
    # partial outputs with one SBUF-to-SBUF exchange (each core streams half of the weights)
    split = n_prog > 1 and n_all == 1
    k0, k1 = _my_slots(n_slots, pid, n_prog) if split else (0, n_slots)
    my_slots = list(range(k0, k1))
    hc_order = _exchange_order(h_total // _H_TILE, pid) if split else None
    t_pad = _pow2_at_least(n_tokens)          # accumulator columns per hidden chunk: keeps matmuls bank-aligned
    n_hc = h_cols // _H_TILE
    # accumulator row p of chunk hc holds hidden column h0 + p * n_hc + hc when the result leaves by one DMA
    # (each partition then writes n_hc contiguous outputs), else h0 + hc * 128 + p (whole 128-column TensorE
    # transposes)
    p_major = n_tokens <= _DIRECT_OUT_MAX_T

    # the routing ids gate every expert weight DMA: their load goes first; then the small per-token inputs
    if row_slots:
        e_sb, w_all = _row_slots(top_k_index, top_k_weights, n_local, expert_offset, t0)
    else:
        key_all, routes = _routing_rows(top_k_index, top_k_weights, n_local, expert_offset, t0, n_tokens)
    # small-I experts: fold 2x more hidden rows into each partition so a gate_up row reaches a long DMA run
    fold = _gate_up_fold(gate_up)
    xT_sb, xTe_sb = _load_xT(hidden, fold, t0, n_tokens)
    sel_sb = _up_selector(gate_up) if fold > 1 else None
    ones_sb = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)     # stationary of the row sums
    nisa.memset(dst=ones_sb, value=1.0)
    if not row_slots:
        slot_sb, e_sb = _slot_table(key_all, routes, ones_sb, n_slots, n_local)
    if split and _h_exchange_fits(shared_gate_up, fold, down, top_k, itemsize(down.dtype)):
        _h_exchange_token(out, xT_sb, gate_up, down, e_sb, w_all, pid)
        return out
    acc_psum = nl.ndarray((P_MAX, n_hc, t_pad), dtype=nl.float32, buffer=nl.psum)

    # this program's rows [s_i0, s_i0 + s_n) of the shared expert's intermediate (all of them unless split)
    s_i0, s_n = (0, 0) if shared_gate_up is None else \
        _my_shared_rows(shared_down.shape[0], pid, n_prog) if split else (0, shared_down.shape[0])
    has_shared = s_n > 0
    s_rows = (s_i0, s_n)
    s_hT_sb = s_wd_sb = None
    fold_pp = _expert_bytes_pp(down, fold, h_cols)
    shared_pp = _rows_bytes_pp(s_n, h_total, h_cols, shared_down.dtype) if has_shared else 0
    other = decode_other_bytes(n_tokens, top_k_index.shape[1], n_slots, h_total, h_cols, down.shape[1],
                               itemsize(hidden.dtype))
    # SBUF: the shared expert streams beside the routed experts' ring when both fit, else it runs to completion
    # first (its tiles die in `_shared_first`, so the ring gets the whole budget)
    shared_first = has_shared and shared_pp + fold_pp + other > sbuf_budget()
    # a small shared expert streams entirely while the slot table is built; a big one's down goes after the
    # routed experts (a static DMA's shorter fixed latency then ends the queue)
    shared_early = has_shared and not shared_first and \
        3 * h_cols * s_n * itemsize(shared_down.dtype) <= _PRE_SLOT_BYTES
    if shared_first:
        _shared_first(n_tokens, xT_sb, shared_gate_up, shared_down, shared_gate, acc_psum, h0, h_cols, p_major,
                      s_rows)
    elif has_shared:
        s_wgu_sb = _load_shared_gate_up(shared_gate_up, s_rows)
        if shared_early:
            s_wd_sb = _load_down_cols(shared_down, None, h0, h_cols, rows=s_rows)
        g_sb = _sigmoid_gate_bcast(shared_gate, xT_sb, n_tokens)
        s_hT_sb = _alloc_hT_rows(s_n, 1, n_tokens, shared_down.dtype)
        _swiglu_T(xT_sb, s_wgu_sb, g_sb, s_hT_sb, 0, n_tokens)
        if shared_early:
            _down_T(s_hT_sb, 0, s_wd_sb, acc_psum, n_tokens, p_major)
    late_shared = has_shared and not shared_first and not shared_early
    ring_pp = _RING_BYTES_PP - (0 if shared_first else shared_pp)
    ring = _weight_ring(gate_up, down, len(my_slots), n_tokens, fold, h_cols, ring_pp) if my_slots else []
    n_buf = len(ring)
    for w0 in range(0, len(my_slots), max(1, n_buf)):
        wave = my_slots[w0:w0 + n_buf]
        # every gate_up of the wave before any down: the last bytes to land feed only the short down step
        for b, s in enumerate(wave):
            _load_expert(ring[b][0], gate_up, e_sb[0:1, s:s + 1])
        last_wave = w0 + n_buf >= len(my_slots)
        for b, s in enumerate(wave):
            # one token per core: the last down DMAs on the pipe by software DGE (GpSimd is idle; no hardware
            # DGE latency after their bytes)
            sw = row_slots and last_wave and b >= len(wave) - _SWDGE_TAIL
            _load_down_cols(down, e_sb[0:1, s:s + 1], h0, h_cols, dst_sb=ring[b][1],
                            dge=nisa.dge_mode.swdge if sw else nisa.dge_mode.unknown)
        if late_shared and w0 == 0:
            s_wd_sb = _load_down_cols(shared_down, None, h0, h_cols, rows=s_rows)
        if not row_slots:
            aff_psum = _wave_affinities(routes, slot_sb, ones_sb, wave, n_tokens)
        hT_sb = _alloc_hT(down, n_buf, n_tokens)
        for b in range(len(wave)):
            s = wave[b]
            aff_b = w_all[:, s:s + 1] if row_slots else aff_psum[:, b * n_tokens:(b + 1) * n_tokens]
            if fold == 1:
                _swiglu_T(xT_sb, ring[b][0], aff_b, hT_sb, b, n_tokens)
            else:
                _swiglu_folded_T(xTe_sb, ring[b][0], aff_b, hT_sb, b, n_tokens, sel_sb)
        for b in range(len(wave)):
            _down_T(hT_sb, b, ring[b][1], acc_psum, n_tokens, p_major, hc_order)
    if late_shared and not my_slots:
        s_wd_sb = _load_down_cols(shared_down, None, h0, h_cols, rows=s_rows)
    if late_shared:
        _down_T(s_hT_sb, 0, s_wd_sb, acc_psum, n_tokens, p_major, hc_order)
    if split:
        _exchange_store(out, acc_psum, pid, has_shared or bool(my_slots))
    else:
        _store_out(out, acc_psum, t0, n_tokens, h0, h_cols, p_major)
    return out


def _h_exchange_fits(shared_gate_up, fold, down, top_k, item):
    """One token at LNC=2 exchanges h instead of partial sums (`_h_exchange_token`) when there is no shared
    expert, gate_up is not folded, I is even and <= 128 (h of one slot on one set of partitions), H splits
    into two halves of whole 128-column chunks, and its plan (`h_exchange_bytes`: every slot's weights held at
    once, no ring) fits the SBUF of the target in force (`sbuf_budget`); else the partial-sum path, whose ring
    `check_decode_sbuf` budgets, runs."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    return (shared_gate_up is None and fold == 1 and n_inter % 2 == 0 and n_inter <= P_MAX
            and h_total % (2 * _H_TILE) == 0
            and h_exchange_bytes(top_k, h_total, n_inter, item) <= sbuf_budget())


def h_exchange_bytes(top_k, h_total, n_inter, item):
    """Upper bound of the SBUF bytes per partition of `_h_exchange_token`'s plan (core 0, which has the more
    slots): the gate_up of its ceil(TOPK/2) slots [128, n_h, 2, I], the down halves of all TOPK slots
    [I/2, 2, H/2] (H per partition each), the selector, h tiles and output tiles, plus everything else of the
    launch as `check_decode_sbuf` counts it (`decode_other_bytes` at T = 1, S = TOPK, Hc = H/2)."""
    per = -(-top_k // 2)
    n_h, i_half = h_total // P_MAX, n_inter // 2
    weights = (per * n_h * 2 * n_inter + top_k * h_total) * item
    small = i_half * (4 + item) + 5 * per * item + (h_total // (2 * _H_TILE) + P_MAX) * item + P_MAX * 4
    return weights + small + decode_other_bytes(1, top_k, top_k, h_total, h_total // 2, n_inter, item)


def _h_exchange_token(out, xT_sb, gate_up, down, e_sb, w_all, pid):
    """One token, LNC=2, no shared expert: core c computes h = a * silu(G^T x) * (U^T x) of its slots
    (`_my_slots`), sends it to the other core (`nisa.sendrecv`, [I/2, 2, ceil(TOPK/2)] in the weights' dtype,
    while the down weights stream), and runs the down projection of every slot on its half of the columns,
    which it writes: h0 + p * n_hc + hc (h0 = c * H/2, p-major, n_hc = H/256). Nothing is exchanged after the
    last weight lands.

    Each down half [I, H/2] is loaded folded as [I/2, 2, H/2] (partition q holds rows q and I/2 + q: 2 runs of
    H/2 elements, a 4 KiB packet at H = 2048 where one row would be 2 KiB); h [I, 1] (one M = I matmul group
    per slot) is kept as [I/2, 2] on partitions 0 .. I/2 - 1 (a 0/1 selector matmul brings rows I/2 .. I - 1
    down), and each 128-column chunk takes two K = I/2 matmuls.
    xT_sb [128, n_h, 1]; e_sb [1, TOPK] int32 clamped ids; w_all [128, TOPK] fp32 routing weights."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    i_half, h_cols = n_inter // 2, h_total // 2
    n_hc = h_cols // _H_TILE
    h0 = pid * h_cols
    top_k = e_sb.shape[1]
    k0, k1 = _my_slots(top_k, pid, 2)
    o0, o1 = _my_slots(top_k, 1 - pid, 2)
    own, other = list(range(k0, k1)), list(range(o0, o1))
    per = -(-top_k // 2)
    gu_sb = [nl.ndarray((P_MAX, xT_sb.shape[1], 2, n_inter), dtype=gate_up.dtype, buffer=nl.sbuf) for _ in own]
    for b, s in enumerate(own):
        _load_expert(gu_sb[b], gate_up, e_sb[0:1, s:s + 1])
    # own slots' down halves land first: the other core's h arrives while the last ones stream
    wd_sb = {}
    order = own + other
    for n, s in enumerate(order):
        wd_sb[s] = nl.ndarray((i_half, 2, h_cols), dtype=down.dtype, buffer=nl.sbuf)
        src = down.ap(pattern=[[h_total, i_half], [i_half * h_total, 2], [1, h_cols]], offset=h0,
                      scalar_offset=e_sb[0:1, s:s + 1], indirect_dim=0)
        # the last DMAs on the pipe: software DGE (GpSimd, idle then, writes the descriptors while the pipe is
        # still busy) has no hardware DGE's extra latency at the end of the transfer
        mode = nisa.dge_mode.swdge if n >= len(order) - _SWDGE_TAIL else nisa.dge_mode.unknown
        nisa.dma_copy(dst=wd_sb[s], src=src, dge_mode=mode)
    v_sb = nl.ndarray((n_inter, i_half), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=v_sb, pattern=[[-1, i_half]], offset=-i_half, channel_multiplier=1)     # k - I/2 - m
    sel_sb = nl.ndarray((n_inter, i_half), dtype=down.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb, data=v_sb, op0=nl.equal, operand0=0)
    h_own = nl.ndarray((i_half, 2, per), dtype=down.dtype, buffer=nl.sbuf)
    if len(own) < per:
        nisa.memset(dst=h_own, value=0.0)
    h_full = _alloc_hT(down, max(1, len(own)), 1)                                # [128, S_own, 1, 1]
    for b, s in enumerate(own):
        _swiglu_T(xT_sb, gu_sb[b], w_all[:, s:s + 1], h_full, b, 1)
        nisa.tensor_copy(dst=h_own[:, 0, b:b + 1], src=h_full[0:i_half, b, 0, :])
        lo_psum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(lo_psum[0:i_half, :], sel_sb, h_full[0:n_inter, b, 0, :], accumulate=False)
        nisa.tensor_copy(dst=h_own[:, 1, b:b + 1], src=lo_psum[0:i_half, :])
    h_other = nl.ndarray((i_half, 2, per), dtype=down.dtype, buffer=nl.sbuf)
    nisa.sendrecv(src=h_own, dst=h_other, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0,
                  dma_engine=nisa.dma_engine.gpsimd_dma)
    acc_psum = nl.ndarray((P_MAX, n_hc, 1), dtype=nl.float32, buffer=nl.psum)
    for h_sb, slots in ((h_own, own), (h_other, other)):
        for b, s in enumerate(slots):
            for hc in range(n_hc):
                for r in range(2):
                    nisa.nc_matmul(acc_psum[:, hc, :], wd_sb[s][:, r, hc:h_cols:n_hc], h_sb[:, r, b:b + 1],
                                   accumulate=None)
    y_sb = nl.ndarray((P_MAX, n_hc), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=y_sb, src=acc_psum[:, :, 0])
    yT_psum = nl.ndarray((n_hc, P_MAX), dtype=out.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=yT_psum, data=y_sb)
    yT_sb = nl.ndarray((n_hc, P_MAX), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=yT_sb, src=yT_psum)
    # yT[r, p] = out[0, h0 + p * n_hc + r]
    nisa.dma_copy(dst=out.ap(pattern=[[1, n_hc], [n_hc, P_MAX]], offset=h0), src=yT_sb)


def _my_share(n_tokens, h_total, pid, n_prog):
    """(t0, Tc, h0, Hc): the tokens and hidden columns program pid computes (and, for T >= 2, writes). LNC=1:
    everything. LNC=2 with T >= 2: the tokens split (first ceil(T/2) on core 0), all columns: each core streams
    only the experts its own tokens chose. T = 1: the one token and all columns on both cores, which split the
    slots (`_my_slots`) and the shared expert's rows (`_my_shared_rows`) and exchange partial sums
    (`_exchange_store`)."""
    if n_prog == 1 or n_tokens < n_prog:
        return 0, n_tokens, 0, h_total
    per = -(-n_tokens // n_prog)
    t0 = min(n_tokens, pid * per)
    return t0, min(n_tokens, t0 + per) - t0, 0, h_total


def _my_slots(n_slots, pid, n_prog):
    """[k0, k1): the slots program pid streams when one token's slots are split (first ceil(S/2) on core 0)."""
    per = -(-n_slots // n_prog)
    k0 = min(n_slots, pid * per)
    return k0, min(n_slots, k0 + per)


def _my_shared_rows(n_sh, pid, n_prog):
    """(i0, n): the shared expert's intermediate rows program pid runs when one token's work is split: halves
    when Is / C is a whole number that tiles into equal chunks of <= 128 rows (`intermediate_split`; each core
    then streams half of the shared weights), else all on the last core (which has the fewer slots when TOPK is
    odd). Is itself passes `intermediate_split` (the wrapper checks it) but Is / 2 need not (Is = 258: 129)."""
    if n_sh % n_prog == 0 and intermediate_split(n_sh // n_prog)[0] is not None:
        per = n_sh // n_prog
        return pid * per, per
    return (0, n_sh) if pid == n_prog - 1 else (0, 0)


def _shared_first(n_tokens, xT_sb, shared_gate_up, shared_down, shared_gate, acc_psum, h0, h_cols, p_major,
                  s_rows):
    """The shared expert's rows s_rows = (i0, n) into accT before any routed expert (its SBUF tiles end with
    this call)."""
    s_wgu_sb = _load_shared_gate_up(shared_gate_up, s_rows)
    s_wd_sb = _load_down_cols(shared_down, None, h0, h_cols, rows=s_rows)
    g_sb = _sigmoid_gate_bcast(shared_gate, xT_sb, n_tokens)
    s_hT_sb = _alloc_hT_rows(s_rows[1], 1, n_tokens, shared_down.dtype)
    _swiglu_T(xT_sb, s_wgu_sb, g_sb, s_hT_sb, 0, n_tokens)
    _down_T(s_hT_sb, 0, s_wd_sb, acc_psum, n_tokens, p_major)


def decode_other_bytes(n_tokens, top_k, n_slots, h_total, h_cols, n_inter, item):
    """Upper bound of the SBUF bytes per partition of everything but the expert weights: routing tables (key,
    ids, duplicate masks: 16 R), slot tables (16 S), xT (twice when folded), the shared gate's broadcast
    stationary, hT, the output tiles, and 4 KiB of small tiles."""
    n_rows = n_tokens * top_k
    n_h, n_i = h_total // P_MAX, -(-n_inter // P_MAX)
    x_t = 2 * n_tokens * n_h * item
    gate = h_total * item + P_MAX * item
    out_tiles = (h_cols // P_MAX) * _pow2_at_least(n_tokens) * item + h_cols * item
    ht = PSUM_FMAX_FP32 // n_tokens * n_i * n_tokens * item
    return 16 * n_rows + 16 * n_slots + x_t + gate + out_tiles + ht + 4096


def check_decode_sbuf(kname, hidden, gate_up, down, shared, top_k, lnc):
    """Refuse shapes whose plan cannot fit SBUF: the larger of one routed expert and the shared expert, plus
    everything else (`decode_other_bytes`)."""
    n_tokens, h_total = hidden.shape[0], hidden.shape[1]
    n_local, _, _, n_inter = (int(s) for s in gate_up.shape)
    item = 4 if str(hidden.dtype).replace("torch.", "") == "float32" else 2
    _, n_tok, _, h_cols = _my_share(n_tokens, h_total, 0, lnc)
    fold = _fold_for(h_total, n_inter, item)
    n_i = intermediate_split(n_inter)[1]
    weights = (fold * (h_total // P_MAX) * 2 * n_inter + n_i * h_cols) * item
    if shared is not None:
        n_sh = int(shared[1].shape[0])
        weights = max(weights, ((h_total // P_MAX) * 2 * n_sh + intermediate_split(n_sh)[1] * h_cols) * item)
    n_slots = top_k if n_tok == 1 else min(n_tok * top_k, n_local)
    need = weights + decode_other_bytes(n_tok, top_k, n_slots, h_total, h_cols, n_inter, item)
    budget = sbuf_budget()
    kernel_check(need <= budget, f"{kname}: the plan needs {need} B of SBUF per partition (T={n_tokens}, TOPK={top_k}, "
                 f"H={h_total}, I={n_inter}, {item}-byte dtype, lnc={lnc}), above the {budget} B available; use fewer "
                 f"tokens per call or shard I further")


def _load_xT(hidden, fold, t0, n_tokens):
    """hidden[t0:t0 + Tc] ([T, H] @ HBM) -> (xT [128, n_h, Tc], xTe [128 / fold, fold * n_h, Tc] or xT itself
    when fold == 1) with xT[p, j, t] = x[t0 + t, p * n_h + j]: one DMA of the Tc rows (Tc long packets instead
    of 128 short ones; the row tile dies here), then `_rows_to_columns`. With Tc >= 2 on a target whose TensorE
    transpose mixes NaN across its rows (`hw.NAN_MIXING_PE_TRANSPOSE_TARGETS`: the tokens are those rows) the columns
    come straight from HBM instead (`_dma_columns`), so one token's NaN / Inf never reaches another's."""
    h_total = hidden.shape[1]
    if n_tokens > 1 and mixing_pe_transpose():
        xT_sb = _dma_columns(hidden, 1, t0, n_tokens)
        return xT_sb, (xT_sb if fold == 1 else _dma_columns(hidden, fold, t0, n_tokens))
    x_sb = nl.ndarray((n_tokens, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb, src=hidden[t0:t0 + n_tokens, :])
    xT_sb = _rows_to_columns(x_sb, 1)
    return xT_sb, (xT_sb if fold == 1 else _rows_to_columns(x_sb, fold))


def _dma_columns(hidden, fold, t0, n_tokens):
    """hidden[t0:t0 + Tc] ([T, H] @ HBM) -> SBUF [128 / fold, fold * n_h, Tc] with xT[p, j, t] =
    x[t0 + t, p * fold * n_h + j]: one element-strided DMA (no TensorE)."""
    h_total = hidden.shape[1]
    parts = P_MAX // fold
    per = h_total // parts
    xT_sb = nl.ndarray((parts, per, n_tokens), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xT_sb, src=hidden.ap(pattern=[[per, parts], [1, per], [h_total, n_tokens]],
                                           offset=t0 * h_total))
    return xT_sb


def _rows_to_columns(rows_sb, fold, out_dtype=None):
    """rows_sb [n, H] (SBUF) -> SBUF [128 / fold, fold * n_h, n] with out[p, j, t] = rows[t, p * fold * n_h + j]:
    TensorE transposes of the strided [n, 128 / fold] column sets, grouped per PSUM bank, one copy per group."""
    n_rows, h_total = rows_sb.shape
    parts = P_MAX // fold
    per = h_total // parts
    out_sb = nl.ndarray((parts, per, n_rows), dtype=out_dtype or rows_sb.dtype, buffer=nl.sbuf)
    group = max(1, PSUM_BANK_BYTES // (n_rows * itemsize(rows_sb.dtype)))
    for g0 in range(0, per, group):
        g_sz = min(group, per - g0)
        t_psum = nl.ndarray((parts, group, n_rows), dtype=rows_sb.dtype, buffer=nl.psum)
        for jj in range(g_sz):
            nisa.nc_transpose(dst=t_psum[:, jj, :], data=rows_sb[0:n_rows, g0 + jj::per])
        nisa.tensor_copy(dst=out_sb[:, g0:g0 + g_sz, :], src=t_psum[:, 0:g_sz, :])
    return out_sb


def _gate_up_fold(gate_up):
    """`_fold_for` one expert's [H, 2, I] gate_up weights."""
    _, h_total, _, n_inter = gate_up.shape
    return _fold_for(h_total, n_inter, itemsize(gate_up.dtype))


def _fold_for(h_total, n_inter, item):
    """2 when one expert's gate_up rows on 128 partitions (n_h * 2I elements each) are shorter than the target's
    DMA packet knee (`hw.DMA_FULL_RATE_ROW_BYTES`: such rows move at less than the engines' rate) and gate + up fit
    one stationary (2I <= 128): the rows then go on 64 partitions, 2 * n_h each, and one matmul per hidden row
    covers gate and up together (same matmul count, longer DMA runs); else 1 (shapes and target only). Rows at or
    past the knee gain nothing from the fold (the talker's 1.5 KiB rows on trn2: docs/moe.md, "Round 35")."""
    row = h_total // P_MAX * 2 * n_inter * item
    return 2 if row < for_target(DMA_FULL_RATE_ROW_BYTES) and 2 * n_inter <= P_MAX else 1


def _up_selector(gate_up):
    """[2I, I] 0/1 matrix in the weights' dtype, sel[I + i, i] = 1: as a stationary it moves the up rows
    (partitions I .. 2I - 1 of a fused gate|up result) onto partitions 0 .. I - 1."""
    n_inter = gate_up.shape[-1]
    v_sb = nl.ndarray((2 * n_inter, n_inter), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(dst=v_sb, pattern=[[-1, n_inter]], offset=-n_inter, channel_multiplier=1)    # p - I - i
    sel_sb = nl.ndarray((2 * n_inter, n_inter), dtype=gate_up.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb, data=v_sb, op0=nl.equal, operand0=0)
    return sel_sb


def _local_key(idx_sb, n_local, expert_offset):
    """(key, valid) fp32 tiles shaped like idx_sb (int32 global ids): key = id - expert_offset when that is a
    local expert (0 <= key < E), else -2; valid = 1.0 / 0.0. Any int32 id gives a defined key."""
    shape = idx_sb.shape
    loc_sb = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=loc_sb, data=idx_sb, op0=nl.subtract, operand0=int(expert_offset))
    valid_sb = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=valid_sb, data=loc_sb, op0=nl.greater_equal, operand0=0.0)
    nisa.scalar_tensor_tensor(dst=valid_sb, data=loc_sb, op0=nl.less, operand0=float(n_local), op1=nl.multiply,
                              operand1=valid_sb)
    key_sb = nl.ndarray(shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=key_sb, data=loc_sb, op0=nl.add, operand0=2.0, op1=nl.multiply, operand1=valid_sb)
    nisa.tensor_scalar(dst=key_sb, data=key_sb, op0=nl.subtract, operand0=2.0)
    return key_sb, valid_sb


def _routing_rows(top_k_index, top_k_weights, n_local, expert_offset, t0, n_tokens):
    """The T * TOPK routing choices: key_all [128, R] fp32, every row's local key on every partition, and per
    tile of 128 rows r = t * TOPK + j (one per partition) a tuple (r0, key_sb [rows, 1] local key or -2,
    valid_sb [rows, 1], w_sb [rows, 1] fp32 weight (0 where the id is not local), wt_sb [rows, T] fp32 = w in
    column t of its token, exactly 0 elsewhere (selects, not products, so a NaN weight stays in its column)).
    Tokens t0 .. t0 + Tc - 1 of the batch (this program's), rows counted from t0."""
    top_k = top_k_index.shape[1]
    n_rows = n_tokens * top_k
    base = t0 * top_k
    idx_all = nl.ndarray((P_MAX, n_rows), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx_all, src=top_k_index.ap(pattern=[[0, P_MAX], [1, n_rows]], offset=base))
    key_all, _ = _local_key(idx_all, n_local, expert_offset)
    tiles = []
    for r0 in range(0, n_rows, P_MAX):
        rows = min(P_MAX, n_rows - r0)
        idx_sb = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx_sb, src=top_k_index.ap(pattern=[[1, rows], [1, 1]], offset=base + r0))
        key_sb, valid_sb = _local_key(idx_sb, n_local, expert_offset)
        w_in = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_in, src=top_k_weights.ap(pattern=[[1, rows], [1, 1]], offset=base + r0))
        w_sb = nl.where(valid_sb, w_in, 0.0)         # another rank's expert: its weight (even NaN) plays no part
        wt_sb = w_sb
        if n_tokens > 1:
            wb_sb = nl.ndarray((rows, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=wb_sb, value=1.0)
            nisa.tensor_scalar(dst=wb_sb, data=wb_sb, op0=nl.multiply, operand0=w_sb)
            # row r (partition p, r = r0 + p) belongs to token t iff 0 <= r - TOPK * t <= TOPK - 1
            lo_sb = nl.ndarray((rows, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
            nisa.affine_select(dst=lo_sb, pattern=[[-top_k, n_tokens]], channel_multiplier=1, on_true_tile=wb_sb,
                               on_false_value=0.0, cmp_op=nl.greater_equal, offset=r0)
            wt_sb = nl.ndarray((rows, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
            nisa.affine_select(dst=wt_sb, pattern=[[top_k, n_tokens]], channel_multiplier=-1, on_true_tile=lo_sb,
                               on_false_value=0.0, cmp_op=nl.greater_equal, offset=top_k - 1 - r0)
        tiles.append((r0, key_sb, valid_sb, w_sb, wt_sb))
    return key_all, tiles


def _row_slots(top_k_index, top_k_weights, n_local, expert_offset, t0):
    """One token t0: e_sb [1, TOPK] int32 = its ids made local and clamped to [0, E - 1] (the DMA offsets, one
    or two VectorE ops after the first DMA), and w_all [128, TOPK] fp32 = its weights on every partition, 0 (a select)
    where the id is not a local expert."""
    top_k = top_k_index.shape[1]
    idx_sb = nl.ndarray((1, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx_sb, src=top_k_index.ap(pattern=[[top_k, 1], [1, top_k]], offset=t0 * top_k))
    e_sb = nl.ndarray((1, top_k), dtype=nl.int32, buffer=nl.sbuf)
    if expert_offset == 0:      # one op on the critical path (ids -> offsets -> weight DMAs)
        # GpSimd: 0.19 µs to the result against VectorE's 0.23 (shorter fixed latency at a faster clock)
        nisa.tensor_scalar(dst=e_sb, data=idx_sb, op0=nl.maximum, operand0=0, op1=nl.minimum, operand1=n_local - 1,
                           engine=nisa.engine.gpsimd)
    else:
        nisa.tensor_scalar(dst=e_sb, data=idx_sb, op0=nl.subtract, operand0=int(expert_offset), op1=nl.maximum,
                           operand1=0)
        nisa.tensor_scalar(dst=e_sb, data=e_sb, op0=nl.minimum, operand0=n_local - 1)
    _, valid_sb = _local_key(idx_sb, n_local, expert_offset)
    w_in = nl.ndarray((1, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_in, src=top_k_weights.ap(pattern=[[top_k, 1], [1, top_k]], offset=t0 * top_k))
    w_row = nl.where(valid_sb, w_in, 0.0)
    # onto every partition by K = 1 matmuls of <= 512 columns (one-row loads: 2 packets instead of 256 short ones)
    ones_row = nl.ndarray((1, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_row, value=1.0)
    w_psum = nl.ndarray((P_MAX, top_k), dtype=nl.float32, buffer=nl.psum)
    for n0 in range(0, top_k, _SPREAD_N):
        nn = min(_SPREAD_N, top_k - n0)
        nisa.nc_matmul(w_psum[:, n0:n0 + nn], ones_row, w_row[:, n0:n0 + nn])
    w_all = nl.ndarray((P_MAX, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=w_all, src=w_psum)
    return e_sb, w_all


def _slot_table(key_all, routes, ones_sb, n_slots, n_local):
    """The distinct local experts of the batch in order of first appearance, computed on device:
    slot_sb [128, S] fp32 (every partition; -1 for the slots past the last distinct expert) and e_sb [1, S]
    int32 = slot clamped to [0, E - 1] (the DMA offsets: every weight DMA stays inside its tensor; a padding slot
    loads expert 0 and gets affinity 0).

    first[r] = valid[r] and no earlier row has the same key (VectorE compare against key_all, max-reduce);
    pos[r] = sum_{r' < r} first[r'] (strict-triangle stationary); slot[s] = sum_r (key[r] + 1) * first[r] *
    (pos[r] == s) - 1 (one-hot moving, the key column replicated over 128 stationary columns so the table lands
    on every partition). All values are small integers, exact in fp32."""
    n_rows = key_all.shape[1]
    firsts = []
    for r0, key_sb, valid_sb, _, _ in routes:
        rows = key_sb.shape[0]
        eq_sb = nl.ndarray((rows, n_rows), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=eq_sb, data=key_all[0:rows, :], op0=nl.equal, operand0=key_sb)
        v_sb = nl.ndarray((rows, n_rows), dtype=nl.int32, buffer=nl.sbuf)   # r' - r
        nisa.iota(dst=v_sb, pattern=[[1, n_rows]], offset=-r0, channel_multiplier=-1)
        nisa.scalar_tensor_tensor(dst=eq_sb, data=v_sb, op0=nl.less, operand0=0, op1=nl.multiply, operand1=eq_sb)
        dup_sb = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=dup_sb, op=nl.maximum, data=eq_sb, axis=1)
        first_sb = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=first_sb, data=dup_sb, op0=nl.equal, operand0=0.0, op1=nl.multiply,
                                  operand1=valid_sb)
        firsts.append(first_sb)
    slot_psum = nl.ndarray((P_MAX, n_slots), dtype=nl.float32, buffer=nl.psum)
    for i, (r0, key_sb, _, _, _) in enumerate(routes):
        rows = key_sb.shape[0]
        pos_psum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.psum)
        for i2 in range(i + 1):
            r2, rows2 = routes[i2][0], routes[i2][1].shape[0]
            d_sb = nl.ndarray((rows2, rows), dtype=nl.int32, buffer=nl.sbuf)    # r' - r
            nisa.iota(dst=d_sb, pattern=[[-1, rows]], offset=r2 - r0, channel_multiplier=1)
            tri_sb = nl.ndarray((rows2, rows), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=tri_sb, data=d_sb, op0=nl.less, operand0=0)
            nisa.nc_matmul(pos_psum[0:rows, :], tri_sb, firsts[i2], accumulate=(i2 > 0))
        pos_sb = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=pos_sb, src=pos_psum[0:rows, :])
        kf_sb = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(dst=kf_sb, data=key_sb, op0=nl.add, operand0=1.0, op1=nl.multiply,
                                  operand1=firsts[i])
        stat_sb = nl.ndarray((rows, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=stat_sb, data=ones_sb[0:rows, :], op0=nl.multiply, operand0=kf_sb)
        s_sb = nl.ndarray((rows, n_slots), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(dst=s_sb, pattern=[[1, n_slots]], offset=0, channel_multiplier=0)
        hot_sb = nl.ndarray((rows, n_slots), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=hot_sb, data=s_sb, op0=nl.equal, operand0=pos_sb)
        for n0 in range(0, n_slots, PSUM_FMAX_FP32):
            nn = min(PSUM_FMAX_FP32, n_slots - n0)
            nisa.nc_matmul(slot_psum[:, n0:n0 + nn], stat_sb, hot_sb[:, n0:n0 + nn], accumulate=(i > 0))
    slot_sb = nl.ndarray((P_MAX, n_slots), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=slot_sb, data=slot_psum, op0=nl.subtract, operand0=1.0)
    e_sb = nl.ndarray((1, n_slots), dtype=nl.int32, buffer=nl.sbuf)       # DMA offsets: one partition
    nisa.tensor_scalar(dst=e_sb, data=slot_sb[0:1, :], op0=nl.maximum, operand0=0.0, op1=nl.minimum,
                       operand1=float(n_local - 1))
    return slot_sb, e_sb


def _wave_affinities(routes, slot_sb, ones_sb, wave, n_tokens):
    """PSUM [128, W * T] fp32, the same on every partition: a[b * T + t] = sum_j w[t, j] * (key[t, j] ==
    slot[s_b]) for the slots s_b of one wave. Rows (t, j) on the partitions: m[(t, j), b, t'] = (key ==
    slot[s_b]) * wt[(t, j), t'] (VectorE), then a ones-stationary matmul sums the rows onto all 128 partitions."""
    n_w = len(wave)
    cols = slice(wave[0], wave[-1] + 1)
    aff_psum = nl.ndarray((P_MAX, n_w * n_tokens), dtype=nl.float32, buffer=nl.psum)
    for i_t, (_, key_sb, _, w_sb, wt_sb) in enumerate(routes):
        rows = key_sb.shape[0]
        m_sb = nl.ndarray((P_MAX, n_w * n_tokens), dtype=nl.float32, buffer=nl.sbuf)
        if n_tokens == 1:
            nisa.tensor_scalar(dst=m_sb[0:rows, :], data=slot_sb[0:rows, cols], op0=nl.equal, operand0=key_sb,
                               op1=nl.multiply, operand1=w_sb)
        else:
            eq_sb = nl.ndarray((P_MAX, n_w), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=eq_sb[0:rows, :], data=slot_sb[0:rows, cols], op0=nl.equal, operand0=key_sb)
            for b in range(n_w):
                nisa.tensor_scalar(dst=m_sb[0:rows, b * n_tokens:(b + 1) * n_tokens], data=wt_sb, op0=nl.multiply,
                                   operand0=eq_sb[0:rows, b:b + 1])
        nisa.nc_matmul(aff_psum, ones_sb[0:rows, :], m_sb[0:rows, :], accumulate=(i_t > 0))
    return aff_psum


def _store_out(out, acc_psum, t0, n_tokens, h0, h_cols, p_major):
    """accT [128, n_hc, Tc] (PSUM) -> out[t0:t0 + Tc, h0:h0 + Hc]: cast; p-major (few tokens): one DMA,
    out[t0 + t, h0 + p * n_hc + hc] = accT[p, hc, t]; else TensorE transposes of the 128-column chunks
    (out[t0 + t, h0 + hc * 128 + p]) for row-contiguous writes."""
    h_total = out.shape[1]
    n_hc = h_cols // _H_TILE
    accT_sb = nl.ndarray(acc_psum.shape, dtype=out.dtype, buffer=nl.sbuf)
    if p_major:
        nisa.activation(dst=accT_sb[:, :, 0:n_tokens], op=nl.copy, data=acc_psum[:, :, 0:n_tokens])
        nisa.dma_copy(dst=out.ap(pattern=[[n_hc, P_MAX], [1, n_hc], [h_total, n_tokens]], offset=t0 * h_total + h0),
                      src=accT_sb[:, :, 0:n_tokens])
        return
    nisa.tensor_copy(dst=accT_sb[:, :, 0:n_tokens], src=acc_psum[:, :, 0:n_tokens])
    y_sb = nl.ndarray((_MAX_TOKENS, h_cols), dtype=out.dtype, buffer=nl.sbuf)
    group = PSUM_BANK_BYTES // (_H_TILE * itemsize(out.dtype))
    for g0 in range(0, n_hc, group):
        g_sz = min(group, n_hc - g0)
        o_psum = nl.ndarray((_MAX_TOKENS, group * _H_TILE), dtype=out.dtype, buffer=nl.psum)
        for gg in range(g_sz):
            nisa.nc_transpose(dst=o_psum[0:n_tokens, gg * _H_TILE:(gg + 1) * _H_TILE],
                              data=accT_sb[:, g0 + gg, 0:n_tokens])
        nisa.tensor_copy(dst=y_sb[0:n_tokens, g0 * _H_TILE:(g0 + g_sz) * _H_TILE],
                         src=o_psum[0:n_tokens, 0:g_sz * _H_TILE])
    nisa.dma_copy(dst=out[t0:t0 + n_tokens, h0:h0 + h_cols], src=y_sb[0:n_tokens, :])


def _rows_bytes_pp(n_inter, h_total, h_cols, dtype):
    """SBUF bytes per partition of n_inter intermediate rows of an expert (gate_up [128, n_h, 2, n] plus
    down [ic, n_i, Hc])."""
    n_i = intermediate_split(n_inter)[1]
    return ((h_total // P_MAX) * 2 * n_inter + n_i * h_cols) * itemsize(dtype)


def _load_shared_gate_up(shared_gate_up, s_rows):
    """Columns [i0, i0 + n) of the shared gate_up [H, 2, Is] -> SBUF [128, n_h, 2, n] with row h = p * n_h + j
    (one static DMA; the whole matrix is one contiguous run per partition)."""
    i0, n = s_rows
    h_total, n_sh = shared_gate_up.shape[0], shared_gate_up.shape[2]
    if (i0, n) == (0, n_sh):
        return load_gate_up(shared_gate_up)
    n_h = h_total // P_MAX
    wgu_sb = nl.ndarray((P_MAX, n_h, 2, n), dtype=shared_gate_up.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=wgu_sb, src=shared_gate_up.ap(pattern=[[n_h * 2 * n_sh, P_MAX], [n_sh, 2 * n_h], [1, n]],
                                                    offset=i0))
    return wgu_sb


def _alloc_hT_rows(n_inter, n_buf, n_tokens, dtype):
    """SBUF [128, n_buf, n_i, T] for n_inter intermediate rows (`_alloc_hT`)."""
    _, n_i = intermediate_split(n_inter)
    return nl.ndarray((P_MAX, n_buf, n_i, n_tokens), dtype=dtype, buffer=nl.sbuf)


def _split_halves(n_hc, pid):
    """(c0, n_own, half, o0, n_other): one token split over two cores, core c owns the p-major column chunks
    [c * half, c * half + n_own) of half = ceil(n_hc / 2); the other core's chunks are [o0, o0 + n_other)."""
    half = -(-n_hc // 2)
    c0, o0 = pid * half, (1 - pid) * half
    return c0, min(n_hc, c0 + half) - c0, half, o0, min(n_hc, o0 + half) - o0


def _exchange_order(n_hc, pid):
    """Down-projection chunk order on core pid when one token is split: the other core's chunks first, so their
    copy and exchange overlap the last matmuls into this core's own chunks."""
    c0, n_own, _, o0, n_other = _split_halves(n_hc, pid)
    return list(range(o0, o0 + n_other)) + list(range(c0, c0 + n_own))


def _exchange_store(out, acc_psum, pid, has_work):
    """One token split over the two cores: acc_psum [128, n_hc, 1] holds this core's fp32 partial sum (p-major:
    column h = p * n_hc + hc). Core c owns the chunks of `_split_halves`; each core sends the other its partial
    of the other's chunks (`nisa.sendrecv`, GpSimd DMA, fp32, zero-padded to ceil(n_hc / 2) chunks), adds what
    it receives to its own (read from PSUM) and writes its columns: the [128, n] result is transposed (TensorE)
    to n partitions of 128 columns and leaves by one DMA of n packets (not 128 short ones). A core with no work
    sends zeros and writes what it receives."""
    n_hc = acc_psum.shape[1]
    c0, n_own, half, o0, n_other = _split_halves(n_hc, pid)
    send_sb = nl.ndarray((P_MAX, half), dtype=nl.float32, buffer=nl.sbuf)
    if not has_work or n_other < half:
        nisa.memset(dst=send_sb, value=0.0)
    if has_work and n_other > 0:
        nisa.tensor_copy(dst=send_sb[:, 0:n_other], src=acc_psum[:, o0:o0 + n_other, 0])
    recv_sb = nl.ndarray((P_MAX, half), dtype=nl.float32, buffer=nl.sbuf)
    nisa.sendrecv(src=send_sb, dst=recv_sb, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0,
                  dma_engine=nisa.dma_engine.gpsimd_dma)
    if n_own <= 0:
        return
    y_sb = nl.ndarray((P_MAX, half), dtype=out.dtype, buffer=nl.sbuf)
    if has_work:
        nisa.tensor_tensor(dst=y_sb[:, 0:n_own], data1=acc_psum[:, c0:c0 + n_own, 0], data2=recv_sb[:, 0:n_own],
                           op=nl.add)
    else:
        nisa.tensor_copy(dst=y_sb[:, 0:n_own], src=recv_sb[:, 0:n_own])
    yT_psum = nl.ndarray((half, P_MAX), dtype=out.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=yT_psum[0:n_own, :], data=y_sb[:, 0:n_own])
    yT_sb = nl.ndarray((half, P_MAX), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=yT_sb[0:n_own, :], src=yT_psum[0:n_own, :])
    # yT[r, p] = out[0, p * n_hc + c0 + r]
    nisa.dma_copy(dst=out.ap(pattern=[[1, n_own], [n_hc, P_MAX]], offset=c0), src=yT_sb[0:n_own, :])


def _expert_bytes_pp(down, fold, h_cols):
    """SBUF bytes per partition of one expert's weights (down [.., I, H]): gate_up [128 / fold, fold n_h, 2I]
    plus this program's down columns [ic, n_i, Hc]."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    n_i = intermediate_split(n_inter)[1]
    return (fold * (h_total // P_MAX) * 2 * n_inter + n_i * h_cols) * itemsize(down.dtype)


def _weight_ring(gate_up, down, n_slots, n_tokens, fold, h_cols, budget_pp):
    """W = min(S, budget_pp // one expert's bytes per partition, PSUM_FMAX_FP32 // T), at least 1 (gate_up
    [128, n_h, 2, I], or [64, 2 n_h, 2I] when fold == 2; down [ic, n_i, Hc]) SBUF tile pairs, each its own
    allocation, live for the whole kernel:
    the W experts of a wave stream in at once, and the next wave's DMA into a buffer waits only for that
    buffer's last reader. (W * T affinities fill at most one PSUM bank.)"""
    _, h_total, _, n_inter = gate_up.shape
    n_h = h_total // P_MAX
    ic, n_i = intermediate_split(n_inter)
    n_buf = min(n_slots, max(1, min(budget_pp // _expert_bytes_pp(down, fold, h_cols), PSUM_FMAX_FP32 // n_tokens)))
    gu_shape = (P_MAX, n_h, 2, n_inter) if fold == 1 else (P_MAX // fold, fold * n_h, 2 * n_inter)
    return [(nl.ndarray(gu_shape, dtype=gate_up.dtype, buffer=nl.sbuf),
             nl.ndarray((ic, n_i, h_cols), dtype=down.dtype, buffer=nl.sbuf)) for _ in range(n_buf)]


def _load_down_cols(down, e_sb, h0, h_cols, dst_sb=None, rows=None, dge=None):
    """down[e][:, h0:h0 + Hc] -> SBUF [ic, n_i, Hc] with row i = q * n_i + c (one DMA; down [E, I, H] with the
    expert picked by the (1, 1) int32 tile e_sb, or one [I, H] matrix when e_sb is None, of which `rows` = (i0,
    n) picks rows i0 .. i0 + n - 1). All columns: one contiguous run of n_i * H elements per partition."""
    n_inter, h_total = down.shape[-2], down.shape[-1]
    r0 = 0
    if rows is not None:
        r0, n_inter = rows
    ic, n_i = intermediate_split(n_inter)
    if dst_sb is None:
        dst_sb = nl.ndarray((ic, n_i, h_cols), dtype=down.dtype, buffer=nl.sbuf)
    if h_cols == h_total:
        pattern = [[n_i * h_total, ic], [1, n_i * h_total]]
    else:
        pattern = [[n_i * h_total, ic], [h_total, n_i], [1, h_cols]]
    if e_sb is None:
        src = down.ap(pattern=pattern, offset=r0 * h_total + h0)
    else:
        src = down.ap(pattern=pattern, offset=h0, scalar_offset=e_sb, indirect_dim=0)
    nisa.dma_copy(dst=dst_sb, src=src, dge_mode=nisa.dge_mode.unknown if dge is None else dge)
    return dst_sb


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
    """[128, T] fp32 sigmoid(x_t . w_sg) on every partition: the products x[h] * w_sg[h] on the hidden-row
    partitions (one VectorE op at T = 1, one per 128-row chunk otherwise), summed onto all 128 partitions by a
    ones-stationary matmul per chunk."""
    h_total = shared_gate.shape[0]
    n_h = h_total // P_MAX
    row_sb = nl.ndarray((1, h_total), dtype=shared_gate.dtype, buffer=nl.sbuf)     # one packet, not 128
    nisa.dma_copy(dst=row_sb, src=shared_gate.ap(pattern=[[h_total, 1], [1, h_total]], offset=0))
    wsg_sb = _rows_to_columns(row_sb, 1, nl.float32)                                   # [128, n_h, 1]
    ones_sb = nl.ndarray((P_MAX, P_MAX), dtype=xT_sb.dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones_sb, value=1.0)
    xw_sb = nl.ndarray((P_MAX, n_h, n_tokens), dtype=xT_sb.dtype, buffer=nl.sbuf)  # xw[k, j, t] = x[t, h] w_sg[h]
    if n_tokens == 1:
        nisa.tensor_tensor(dst=xw_sb, data1=xT_sb, data2=wsg_sb, op=nl.multiply)
    else:
        for j in range(n_h):
            nisa.tensor_scalar(dst=xw_sb[:, j, :], data=xT_sb[:, j, :], op0=nl.multiply, operand0=wsg_sb[:, j, :])
    g_psum = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.psum)
    for j in range(n_h):
        nisa.nc_matmul(g_psum, ones_sb, xw_sb[:, j, :], accumulate=(j > 0))
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
                nisa.nc_matmul(gu_psum[0:ic, half, 0:n_tokens], wgu_sb[:, j, half, c::n_i], xT_sb[:, j, :],
                               accumulate=(j > 0))
        act_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act_sb[0:ic, :], op=nl.silu, data=gu_psum[0:ic, 0, 0:n_tokens])
        _scale_mul(hT_sb[0:ic, b, c, :], act_sb[0:ic, :], scale[0:ic, :], gu_psum[0:ic, 1, 0:n_tokens], n_tokens)


def _scale_mul(dst, act, scale, up, n_tokens):
    """dst = (act * scale) * up on [rows, T] tiles (VectorE): one op when T = 1 (scale is then a per-partition
    scalar in SBUF: the routing weights or the shared gate), else two."""
    if n_tokens == 1:
        nisa.scalar_tensor_tensor(dst=dst, data=act, op0=nl.multiply, operand0=scale, op1=nl.multiply, operand1=up)
        return
    nisa.tensor_tensor(dst=act, data1=act, data2=scale, op=nl.multiply)
    nisa.tensor_tensor(dst=dst, data1=act, data2=up, op=nl.multiply)


def _swiglu_folded_T(xT_sb, wgu_sb, scale, hT_sb, b, n_tokens, sel_sb):
    """hT_sb[i, b, 0, t] = scale[t] * silu(G^T x)[i, t] * (U^T x)[i, t] for 2I <= 128 with gate_up folded
    ([64, 2 n_h, 2I]): one matmul per hidden row j (stationary = gate|up columns, M = 2I) puts gate on
    partitions 0 .. I - 1 and up on I .. 2I - 1; a 0/1 selector matmul moves up onto 0 .. I - 1."""
    rows, two_i = wgu_sb.shape[1], wgu_sb.shape[2]
    n_inter = two_i // 2
    gu_psum = nl.ndarray((P_MAX, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
    for j in range(rows):
        nisa.nc_matmul(gu_psum[0:two_i, 0:n_tokens], wgu_sb[:, j, :], xT_sb[:, j, :], accumulate=(j > 0))
    act_sb = nl.ndarray((P_MAX, n_tokens), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=act_sb[0:n_inter, :], op=nl.silu, data=gu_psum[0:n_inter, 0:n_tokens])
    gu_sb = nl.ndarray((P_MAX, n_tokens), dtype=sel_sb.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=gu_sb[0:two_i, :], src=gu_psum[0:two_i, 0:n_tokens])
    up_psum = nl.ndarray((P_MAX, _MAX_TOKENS), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(up_psum[0:n_inter, 0:n_tokens], sel_sb, gu_sb[0:two_i, :], accumulate=False)
    _scale_mul(hT_sb[0:n_inter, b, 0, :], act_sb[0:n_inter, :], scale[0:n_inter, :], up_psum[0:n_inter, 0:n_tokens],
               n_tokens)


def _down_T(hT_sb, b, wd_sb, acc_psum, n_tokens, p_major, hc_order=None):
    """acc_psum[p, hc, t] += sum_i D[i, h] * hT_sb[i, b, :, t] with h = p * n_hc + hc (p_major) or
    hc * 128 + p (weights stationary: M = 128 output rows, a strided column set when p_major); the chunks hc
    in `hc_order` (default ascending)."""
    ic, n_i, h_total = wd_sb.shape
    n_hc = h_total // _H_TILE
    for c in range(n_i):
        for hc in (range(n_hc) if hc_order is None else hc_order):
            cols = slice(hc, h_total, n_hc) if p_major else slice(hc * _H_TILE, (hc + 1) * _H_TILE)
            nisa.nc_matmul(acc_psum[:, hc, 0:n_tokens], wd_sb[0:ic, c, cols],
                           hT_sb[0:ic, b, c, :], accumulate=None)


def moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset: int = 0,
               lnc=None):
    """MoE for a small batch (decode): streams the distinct selected experts, each once, plus the shared
    expert, in one launch; traced once per shape (the slot table is built on device from top_k_index).

    Dimensions:
        T tokens (T * TOPK small, typically 1-32), H hidden, E local experts, I, Is intermediates, TOPK.
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        top_k_index: [T, TOPK] int32 or int64 global expert ids. Ids outside expert_offset .. expert_offset + E - 1
            (other ranks' experts, negative ids, anything else) are ignored; their weight plays no part. int64 ids
            beyond the int32 range are refused (checked on the host for NumPy / CPU tensors).
        top_k_weights: [T, TOPK] routing weights (a NaN weight of a local expert makes only its token NaN).
        gate_up: [E, H, 2, I] @ HBM; down: [E, I, H] @ HBM (`nki_kernels.moe.weights_from_transformers` converts
            transformers' layout).
        shared: optional (gate_up [H, 2, Is], down [Is, H], gate vector [H]).
        expert_offset: global id of local expert 0 (expert parallelism), 0 <= expert_offset < 2^24 - E.
        lnc: None (NEURON_LOGICAL_NC_CONFIG, else the target's default: 2 on trn2), 1 or 2. At LNC=2 (one launch)
            the cores split the tokens (T >= 2: each streams the experts of its own tokens) or, at T = 1, the slots
            and the shared expert's rows (each streams half of the weights; the partial sums are exchanged once).
    Returns:
        [T, H] in hidden's dtype.
    Constraints:
        T <= 32; T * TOPK <= 1024. The kernel runs min(T * TOPK, E) slots whatever the routing values.
    Pseudocode:
        see moe_decode_kernel.
    """
    lnc = check_moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared, expert_offset, lnc)
    check_top_k_ids("moe_decode", top_k_index)
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    return call(moe_decode_kernel, hidden, _as_int32(top_k_index), top_k_weights, gate_up, down, s_gu, s_dn, s_g,
                int(expert_offset), lnc=lnc)


def check_moe_decode(hidden, top_k_index, top_k_weights, gate_up, down, shared=None, expert_offset=0, lnc=None):
    """`moe_decode`'s checks that read no tensor values (shapes, dtypes, options, the SBUF plan), so that
    torch_ops' fake runs them at trace time; the ids' int32 range is checked by the wrapper. Returns lnc."""
    kname = "moe_decode"
    check_weights(kname, hidden, gate_up, down, shared)
    n_tokens = _shape(hidden)[0]
    n_local = _shape(gate_up)[0]
    kernel_check(n_tokens <= _MAX_TOKENS, f"{kname}: T must be <= {_MAX_TOKENS} (use moe_blockwise), got T={n_tokens}")
    check_top_k(kname, top_k_index, top_k_weights, n_tokens, hidden, read_values=False)
    top_k = _shape(top_k_index)[1]
    kernel_check(n_tokens * top_k <= _MAX_ROUTES,
                 f"{kname}: T * TOPK must be <= {_MAX_ROUTES}, got T * TOPK = {n_tokens} * {top_k}")
    check_expert_offset(kname, expert_offset, n_local)
    lnc = resolve_lnc(lnc, kname)
    check_decode_sbuf(kname, hidden, gate_up, down, shared, top_k, lnc)
    return lnc
