"""On-chip-combine path of `moe_blockwise`: the routed slot outputs are summed per token in SBUF (no slot-output
scratch written to HBM and gathered back); x reaches the blocks by the on-chip x gather when it fits, else by
the only routed DMA pass.

Loop nest (one launch; LNC=2: see `moe_blockwise_onchip_kernel`):

    phase A, for each block b (program c: a contiguous range of blocks):
        x.T = x.T_all[:, ids of b] (nc_n_gather on a resident x.T; or a DMA row gather + transposes),
        h = a * silu(x Wg[e]) * (x Wu[e])                                      as the DMA-combine path
        hT_all[:, :, slots of b] = h.T                                         (SBUF, [ic, n_i, N * B])
    phase B, for each group of GT hidden tiles of 128 rows (program c: a contiguous range of tiles):
        for each block b:  Y[:, j, slots of b] = Wd[e][:, tile j].T @ hT_all[:, :, slots of b]   # H on partitions
        for each chunk of 128 tokens, each tile j of the group:
            (index mode "u16": the chunk's resident uint16 slot indices widened to uint32; "stream": loaded
             from HBM, replicated on the 128 partitions, by one DMA)
            G = nc_n_gather(Y[:, j, :], slot index of (t, k))                  # free-axis gather, GpSimd
            outT[:, t] = sum_k G[:, t, k] (+ shared expert, H-major)          # VectorE, fp32
            out[t, tile j] = outT.T                                            # TensorE transpose, one store

Every token's sum reads only its own slot columns (a gather, then an add over its own k entries); the padding
slots and a missing expert point at an all-zero column of Y, so a non-finite value stays in its token.
"""
from __future__ import annotations

from ..backend import nisa, nki, nl
from ..hw import P_MAX, PSUM_BANK_BYTES, PSUM_FMAX_FP32
from ..transpose import mixing_pe_transpose
from ._tiles import (TOK_TILE, evict, exact_rows_to_columns, intermediate_split, itemsize, load_down, load_gate_up,
                     load_gate_vector, sigmoid_gate, swiglu, transpose_tokens)

# ---- tiles
H_TILE = P_MAX                  # hidden rows of one combine tile: the partitions of Y / outT
_IDX_ITEM = 4                   # nc_n_gather indices are uint32
INDEX_MODES = ("u32", "u16", "stream")   # phase B's slot indices: resident uint32 / resident uint16 / streamed
U16_SLOTS = 1 << 16             # "u16" holds slot indices < 2^16: N * B + 1 columns of Y at most
_TILE_BUFFERS = 3               # buffers a tile allocated in a loop body rotates through (planned as all live)
DOWN_RING = 16                  # down slices in flight in phase B: one per DMA queue (16 per trn2 core) ...
DOWN_RINGS = (48, 32, DOWN_RING)   # ... or more buffers when the plan fits them: the slices of the next group then
                                # load while this group's gathers run (Y, which they do not touch, is reused)
# phase B's down-slice DMAs of a slice under _SWDGE_SLICE_BYTES: 3 of every 8 take software DGE descriptors so both
# descriptor generators work in parallel (such a slice moves in under 0.18 µs of pipe, less than the ~0.3 µs per
# DMA that the two hardware-DGE instances need, ~0.6 µs each: nki-dge.rst); larger slices take hardware DGE alone
# (software DGE would only add GpSimd work; docs/moe.md, round 32)
_SWDGE_SLICE_BYTES = 64 * 1024
_SWDGE_OF_8 = (False, True, False, False, True, False, True, False)


def swdge_slice(n_inter, n_cols, item, i_b) -> bool:
    """Whether block i_b's phase-B down slice (n_inter rows x n_cols hidden columns of `item` bytes) takes software
    DGE descriptors: 3 of every 8 slices under _SWDGE_SLICE_BYTES, none of a larger slice."""
    return n_inter * n_cols * item < _SWDGE_SLICE_BYTES and _SWDGE_OF_8[i_b % len(_SWDGE_OF_8)]


@nki.jit
def moe_blockwise_onchip_kernel(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
                                slot_index, shared_gate_up, shared_down, shared_gate, top_k_index, block_size,
                                expert_offset, group_tiles, index_mode="u32", x_gather="dma", down_ring=DOWN_RING):
    """Blockwise expert MLPs + fused shared expert with the on-chip combine, one launch at LNC 1 or 2.

    Dimensions and Args as `moe_blockwise_kernel` (blockwise.py), except:
        slot_index: [T, KMAX] uint32 (uint16 in index mode "u16") @ HBM, the slots holding each token (N * B, the
            all-zero column, where the token has fewer local experts).
        group_tiles: GT, hidden tiles of 128 rows whose slot outputs are held in SBUF at once (trace-time).
        index_mode: where phase B keeps the slot indices, replicated on the 128 partitions (trace-time):
            "u32": every token's, resident (T * KMAX uint32 per partition);
            "u16": every token's, resident as uint16 (T * KMAX * 2 bytes; N * B < 2^16), each 128-token chunk
                widened to uint32 per group by one copy (VectorE / ScalarE alternating);
            "stream" (token-chunked): one 128-token chunk's at a time, loaded from HBM per group.
        x_gather: how phase A permutes x (trace-time): "onchip", a resident x.T of every token and one nc_n_gather
            per block chunk (a core's first blocks by DMA while it is built); "dma", a row gather per chunk.
        down_ring: down slices (separate buffers) phase B keeps in flight (trace-time, one of `DOWN_RINGS`).
    Returns:
        out: [T, H] @ HBM in hidden's dtype.
    LNC=2: program c runs phase A on a contiguous share of the blocks and writes their h.T columns to a shared
    HBM buffer; after `nisa.core_barrier` on it, each reads the other's columns and runs phase B on a contiguous
    share of the hidden tiles, writing only those columns of out. Phase B's preamble (slot indices, the shared
    expert's h.T) does not touch the buffer, so it overlaps the other core's phase A tail.
    """
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    n_blocks = block_to_expert.shape[0]
    n_slots = n_blocks * block_size
    out = nl.ndarray(hidden.shape, dtype=hidden.dtype, buffer=nl.shared_hbm)
    hT_all = _alloc_hidden_slots(down, n_slots)
    b_lo, b_hi = share(n_blocks, pid, n_prog)
    _hidden_phase(hidden, expert_affinities, gate_up, token_position_to_id, block_to_expert, top_k_index,
                  block_size, expert_offset, hT_all, b_lo, b_hi, x_gather)
    exchange = None
    if n_prog > 1:
        def exchange():
            _exchange_hidden_slots(hT_all, n_blocks, block_size, pid, n_prog, (b_lo, b_hi))
    j_lo, j_hi = share(hidden.shape[1] // H_TILE, pid, n_prog)
    _combine_phase(hidden, hT_all, down, block_to_expert, slot_index, shared_gate_up, shared_down, shared_gate,
                   out, block_size, (group_tiles, index_mode, down_ring), j_lo, j_hi, exchange)
    return out


def _exchange_hidden_slots(hT_all, n_blocks, block_size, pid, n_prog, mine):
    """LNC=2: write this program's h.T columns to shared HBM, meet the other core at a barrier on that buffer,
    read the other programs' columns back (each DMA a contiguous run of slots per row)."""
    ic, n_i, n_slots = hT_all.shape
    hT_hbm = nl.ndarray((ic, n_i, n_slots), dtype=hT_all.dtype, buffer=nl.shared_hbm)
    b_lo, b_hi = mine
    if b_hi > b_lo:
        nisa.dma_copy(dst=hT_hbm[:, :, b_lo * block_size:b_hi * block_size],
                      src=hT_all[:, :, b_lo * block_size:b_hi * block_size])
    nisa.core_barrier(data=hT_hbm, cores=(0, 1), engine=nisa.engine.scalar)
    for other in range(n_prog):
        o_lo, o_hi = share(n_blocks, other, n_prog)
        if other != pid and o_hi > o_lo:
            nisa.dma_copy(dst=hT_all[:, :, o_lo * block_size:o_hi * block_size],
                          src=hT_hbm[:, :, o_lo * block_size:o_hi * block_size])


def share(n: int, pid: int, n_prog: int):
    """[lo, hi) of program pid's contiguous share of n items (the first programs take the larger shares)."""
    per = -(-n // n_prog)
    lo = min(n, pid * per)
    return lo, min(n, lo + per)


def _alloc_hidden_slots(down, n_slots):
    ic, n_i = intermediate_split(down.shape[1])
    return nl.ndarray((ic, n_i, n_slots), dtype=down.dtype, buffer=nl.sbuf)


# ---------------------------------------------------------------------------------------------- phase A


def _hidden_phase(hidden, expert_affinities, gate_up, token_position_to_id, block_to_expert, top_k_index,
                  block_size, expert_offset, hT_all, b_lo, b_hi, x_gather="dma"):
    """Blocks [b_lo, b_hi): h = a * silu(x Wg) * (x Wu) of every slot, transposed into hT_all[:, :, slot].
    x_gather (trace-time): "dma", each slot chunk's token rows gathered by an indirect DMA and transposed on
    TensorE; "onchip", x.T of every token resident and each chunk's x.T collected by one nc_n_gather
    (`blockwise._gather_xT`, docs/moe.md "On-chip x gather"), the core's first blocks by DMA while it is built."""
    from .blockwise import (_EARLY_BLOCKS, _TABLE_BLOCKS, _gather_token_tile, _gather_xT, _load_block_tables,
                            _replicated_ids, _resident_xT, rep_blocks, slot_affinity)
    h_total = hidden.shape[1]
    n_local = gate_up.shape[0]
    n_h = h_total // P_MAX
    xT_all = _resident_xT(hidden, n_h) if x_gather == "onchip" and b_hi > b_lo else None
    n_early = min(_EARLY_BLOCKS, (b_hi - b_lo) // _EARLY_BLOCKS)
    n_rep = rep_blocks(block_size)
    rep_sb = None
    for g0 in range(b_lo, b_hi, _TABLE_BLOCKS):
        n_b = min(_TABLE_BLOCKS, b_hi - g0)
        e_all_sb, eg_all_sb, ids_all = _load_block_tables(block_to_expert, token_position_to_id, block_size,
                                                          expert_offset, g0, n_b, top_k_index is not None)
        for i_b in range(g0, g0 + n_b):
            col = i_b - g0
            k = i_b - b_lo
            e_sb = e_all_sb[:, col:col + 1]
            wgu_sb = load_gate_up(gate_up, e_sb[0:1, :])
            if xT_all is not None and k % n_rep == 0:
                rep_sb = _replicated_ids(token_position_to_id, P_MAX, list(range(i_b, min(b_hi, i_b + n_rep))), 1,
                                         block_size, n_rep)
            for i_c, s0 in enumerate(range(0, block_size, TOK_TILE)):
                n_tok = min(TOK_TILE, block_size - s0)
                ids_sb, eg_sb = ids_all[i_c][:, col:col + 1], eg_all_sb[:, col:col + 1]
                if xT_all is None or k < n_early:
                    x_sb, aff_sb = _gather_token_tile(hidden, expert_affinities, top_k_index, ids_sb, e_sb, eg_sb,
                                                      n_tok, n_local)
                    xT_sb = transpose_tokens(x_sb, n_tok, n_h, evict_phase=i_b + i_c)
                else:
                    xT_sb = _gather_xT(xT_all, rep_sb[:, k % n_rep, :], s0, n_tok, n_h)
                    aff_sb = slot_affinity(expert_affinities, top_k_index, ids_sb, e_sb, eg_sb, n_tok, n_local)
                h_sb = swiglu(xT_sb, n_tok, wgu_sb, aff_sb)
                transpose_into(hT_all, i_b * block_size + s0, h_sb, n_tok)


def transpose_into(hT_all, s0, h_sb, n_tok):
    """hT_all[q, c, s0 + t] = h[t, q * n_i + c] for t < n_tok (TensorE transposes, one PSUM -> SBUF copy; VectorE
    transposes where TensorE's would mix tokens)."""
    ic, n_i, _ = hT_all.shape
    if mixing_pe_transpose():   # trn1: VectorE transposes (a TensorE one would mix the tokens' NaN / Inf)
        exact_rows_to_columns(h_sb, n_tok, n_i, hT_all, s0)
        return
    t_psum = nl.ndarray((P_MAX, n_i, TOK_TILE), dtype=h_sb.dtype, buffer=nl.psum)
    for c in range(n_i):
        nisa.nc_transpose(dst=t_psum[0:ic, c, 0:n_tok], data=h_sb[0:n_tok, c::n_i])
    nisa.tensor_copy(dst=hT_all[0:ic, :, s0:s0 + n_tok], src=t_psum[0:ic, :, 0:n_tok])


# ---------------------------------------------------------------------------------------------- phase B


def _combine_phase(hidden, hT_all, down, block_to_expert, slot_index, shared_gate_up, shared_down, shared_gate,
                   out, block_size, grouping, j_lo, j_hi, exchange=None):
    """Hidden tiles [j_lo, j_hi) of out, GT tiles at a time (grouping = (GT, index_mode, ring)): every slot's down
    projection for the group's tiles (H on the partitions), then per token the sum of its slot columns
    (nc_n_gather + VectorE) plus the shared expert, transposed back to token rows. `exchange` (LNC=2) runs after
    the preamble, before the first group."""
    group_tiles, index_mode, down_ring = grouping
    n_tokens = hidden.shape[0]
    kmax = slot_index.shape[1]
    n_slots = hT_all.shape[2]
    idx_sb = None   # "stream": `_chunk_index` loads each 128-token chunk's indices per group
    if index_mode != "stream":
        idx_sb = nl.ndarray((P_MAX, n_tokens * kmax), dtype=slot_index.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx_sb, src=slot_index.ap(pattern=[[0, P_MAX], [1, n_tokens * kmax]], offset=0))
    shared = None
    if shared_gate_up is not None:
        shared = (_shared_hidden(hidden, shared_gate_up, shared_gate), load_down(shared_down))
    n_blocks = block_to_expert.shape[0]
    e_row_sb = nl.ndarray((1, n_blocks), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=e_row_sb, src=block_to_expert.ap(pattern=[[n_blocks, 1], [1, n_blocks]], offset=0))
    if exchange is not None:
        exchange()
    ic, n_i = intermediate_split(down.shape[1])
    # Y and the ring of down slices are allocated once and reused by every group: the plan (`onchip_plan_bytes`)
    # has room for one of each, so group g + 1's down projections wait for group g's gathers (its slice loads,
    # which do not touch Y, need not). Allocated per group, the cost model would rotate them through several
    # buffers whatever their size and overlap the groups (docs/moe.md, round 32)
    y_all = nl.ndarray((P_MAX, group_tiles, n_slots + 1), dtype=hidden.dtype, buffer=nl.sbuf)
    for jj in range(group_tiles):   # the all-zero column (one memset per tile: each a whole-partition-row access,
        nisa.memset(dst=y_all[:, jj, n_slots:n_slots + 1], value=0.0)   # which gives the scheduler Y's row pitch)
    # a ring of down_ring down slices, each its own buffer, loaded in waves of down_ring dynamic DMAs (their fixed
    # latencies overlap); a DMA into a buffer waits only for its last reader, so with more buffers than a group's
    # last wave needs, the next group's first slices load while this group's gathers run
    ring = [nl.ndarray((P_MAX, n_i, group_tiles * H_TILE), dtype=down.dtype, buffer=nl.sbuf)
            for _ in range(min(down_ring, n_blocks))]
    for g0 in range(j_lo, j_hi, group_tiles):
        n_t = min(group_tiles, j_hi - g0)
        y_sb = y_all[:, 0:n_t, :]
        for w0 in range(0, n_blocks, len(ring)):
            wave = range(w0, min(n_blocks, w0 + len(ring)))
            for b, i_b in enumerate(wave):
                sw = swdge_slice(down.shape[1], n_t * H_TILE, itemsize(down.dtype), i_b)
                _load_down_slice(ring[b][:, :, 0:n_t * H_TILE], down, e_row_sb[0:1, i_b:i_b + 1], g0 * H_TILE,
                                 nisa.dge_mode.swdge if sw else nisa.dge_mode.unknown)
            for b, i_b in enumerate(wave):
                _down_block_hmajor(y_sb, hT_all, ring[b][:, :, 0:n_t * H_TILE], i_b * block_size, block_size, i_b)
        for t0 in range(0, n_tokens, TOK_TILE):
            n_tok = min(TOK_TILE, n_tokens - t0)
            _combine_rows(y_sb, _chunk_index(idx_sb, slot_index, t0, n_tok), shared, out, t0, n_tok, g0)


def _chunk_index(idx_sb, slot_index, t0, n_tok):
    """[128, n_tok * KMAX] uint32: the slot indices of tokens t0 .. t0 + n_tok - 1 on every partition: a view of
    the resident uint32 table idx_sb, a uint32 copy of the chunk of the resident uint16 table (exact), or
    (idx_sb None, token-chunked combine) loaded by one DMA whose source rows repeat (partition stride 0)."""
    kmax = slot_index.shape[1]
    if idx_sb is not None and idx_sb.dtype == nl.uint32:
        return idx_sb[:, t0 * kmax:(t0 + n_tok) * kmax]
    ix_sb = nl.ndarray((P_MAX, TOK_TILE * kmax), dtype=nl.uint32, buffer=nl.sbuf)
    if idx_sb is not None:
        eng = nisa.engine.vector if (t0 // TOK_TILE) % 2 == 0 else nisa.engine.scalar
        nisa.tensor_copy(dst=ix_sb[:, 0:n_tok * kmax], src=idx_sb[:, t0 * kmax:(t0 + n_tok) * kmax], engine=eng)
    else:
        nisa.dma_copy(dst=ix_sb[:, 0:n_tok * kmax],
                      src=slot_index.ap(pattern=[[0, P_MAX], [1, n_tok * kmax]], offset=t0 * kmax))
    return ix_sb[:, 0:n_tok * kmax]


def _load_down_slice(wd_sb, down, e_sb, h0, dge):
    """wd_sb[q, c, :] = down[e][q * n_i + c, h0 : h0 + Hg] (one dynamic DMA, e the (1, 1) int32 tile e_sb,
    descriptors from the DGE `dge`)."""
    h_total = down.shape[2]
    ic, n_i = intermediate_split(down.shape[1])
    hg = wd_sb.shape[2]
    nisa.dma_copy(dst=wd_sb[0:ic, :, :],
                  src=down.ap(pattern=[[n_i * h_total, ic], [h_total, n_i], [1, hg]], offset=h0,
                              scalar_offset=e_sb, indirect_dim=0), dge_mode=dge)


def _down_block_hmajor(y_sb, hT_all, wd_sb, s0, block_size, i_b):
    """y_sb[:, j, s0:s0+B] = Wd[:, 128 j : 128 (j + 1)].T @ h.T of the block's slots (wd_sb the block's down
    slice): stationary = 128 weight columns (K = ic rows, M = 128), moving = the B slot columns; tiles share a
    PSUM bank."""
    ic, n_i, _ = hT_all.shape
    n_t = y_sb.shape[1]
    per_bank = max(1, PSUM_FMAX_FP32 // block_size)
    for jb in range(0, n_t, per_bank):
        nb = min(per_bank, n_t - jb)
        y_psum = nl.ndarray((P_MAX, per_bank, block_size), dtype=nl.float32, buffer=nl.psum)
        for jj in range(nb):
            c0 = (jb + jj) * H_TILE
            for c in range(n_i):
                nisa.nc_matmul(y_psum[:, jj, :], wd_sb[0:ic, c, c0:c0 + H_TILE], hT_all[0:ic, c, s0:s0 + block_size],
                               accumulate=(c > 0))
        evict(y_sb[:, jb:jb + nb, s0:s0 + block_size], y_psum[:, 0:nb, :], i_b + jb)


def _shared_hidden(hidden, shared_gate_up, shared_gate):
    """hsT [isc, n_is, T] = (sigmoid(x . w_sg) * silu(x Gs) * (x Us)).T for every token (token chunks of 128)."""
    n_tokens, h_total = hidden.shape
    n_h = h_total // P_MAX
    s_wgu_sb = load_gate_up(shared_gate_up)
    s_wsg_sb = load_gate_vector(shared_gate)
    ic, n_i = intermediate_split(shared_gate_up.shape[2])
    hsT_sb = nl.ndarray((ic, n_i, n_tokens), dtype=hidden.dtype, buffer=nl.sbuf)
    for i_r, t0 in enumerate(range(0, n_tokens, TOK_TILE)):
        n_tok = min(TOK_TILE, n_tokens - t0)
        x_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_sb[0:n_tok, :], src=hidden[t0:t0 + n_tok, :])
        xT_sb = transpose_tokens(x_sb, n_tok, n_h, evict_phase=i_r)
        gate_sb = sigmoid_gate(xT_sb, n_tok, s_wsg_sb)
        hs_sb = swiglu(xT_sb, n_tok, s_wgu_sb, gate_sb)
        transpose_into(hsT_sb, t0, hs_sb, n_tok)
    return hsT_sb


def _combine_rows(y_sb, ix_sb, shared, out, t0, n_tok, g0):
    """out[t0:t0+n_tok, group columns]: per tile, gather each token's KMAX slot columns (ix_sb [128, n_tok * KMAX],
    from `_chunk_index`), add them (fp32) and the shared expert's tile, transpose to token rows; one store for the
    group."""
    n_t = y_sb.shape[1]
    kmax = ix_sb.shape[1] // n_tok
    dt = y_sb.dtype
    o_sb = nl.ndarray((TOK_TILE, n_t * H_TILE), dtype=out.dtype, buffer=nl.sbuf)
    per_bank = max(1, PSUM_BANK_BYTES // (H_TILE * itemsize(dt)))
    for jb in range(0, n_t, per_bank):
        nb = min(per_bank, n_t - jb)
        o_psum = nl.ndarray((TOK_TILE, per_bank, H_TILE), dtype=dt, buffer=nl.psum)
        for jj in range(jb, jb + nb):
            g_sb = nl.ndarray((P_MAX, TOK_TILE, kmax), dtype=dt, buffer=nl.sbuf)
            nisa.nc_n_gather(dst=g_sb[:, 0:n_tok, :], data=y_sb[:, jj, :], indices=ix_sb)
            oT_sb = nl.ndarray((P_MAX, TOK_TILE), dtype=dt, buffer=nl.sbuf)
            if shared is None:
                nisa.tensor_reduce(dst=oT_sb[:, 0:n_tok], op=nl.add, data=g_sb[:, 0:n_tok, :], axis=2)
            else:
                acc_sb = nl.ndarray((P_MAX, TOK_TILE), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_reduce(dst=acc_sb[:, 0:n_tok], op=nl.add, data=g_sb[:, 0:n_tok, :], axis=2)
                s_psum = _shared_tile(shared, t0, n_tok, (g0 + jj) * H_TILE)
                nisa.tensor_tensor(dst=oT_sb[:, 0:n_tok], data1=acc_sb[:, 0:n_tok], data2=s_psum[:, 0:n_tok],
                                   op=nl.add)
            nisa.nc_transpose(dst=o_psum[0:n_tok, jj - jb, :], data=oT_sb[:, 0:n_tok])
        evict(o_sb[0:n_tok, jb * H_TILE:(jb + nb) * H_TILE], o_psum[0:n_tok, 0:nb, :], jb)
    h0 = g0 * H_TILE
    nisa.dma_copy(dst=out[t0:t0 + n_tok, h0:h0 + n_t * H_TILE], src=o_sb[0:n_tok, :])


def _shared_tile(shared, t0, n_tok, c0):
    """[128, n_tok] fp32 PSUM: the shared expert's down projection of hidden rows c0 .. c0 + 127 (H-major)."""
    hsT_sb, s_wd_sb = shared
    ic, n_i, _ = s_wd_sb.shape
    s_psum = nl.ndarray((P_MAX, TOK_TILE), dtype=nl.float32, buffer=nl.psum)
    for c in range(n_i):
        nisa.nc_matmul(s_psum[:, 0:n_tok], s_wd_sb[0:ic, c, c0:c0 + H_TILE], hsT_sb[0:ic, c, t0:t0 + n_tok],
                       accumulate=(c > 0))
    return s_psum


# ---------------------------------------------------------------------------------------------- SBUF plan


def onchip_plan_bytes(n_tokens, h_total, n_inter, s_inter, n_blocks, block_size, kmax, group_tiles, item,
                      index_mode="u32", x_gather="dma", down_ring=DOWN_RING):
    """Upper bound of the SBUF bytes per partition of the on-chip path with GT = group_tiles: every slot's h.T
    (live throughout) plus the larger of phase A (block tables, two experts' gate/up, the gathered rows, xT, h,
    affinity tiles) and phase B (slot indices - all T * KMAX resident as uint32 or uint16, plus for "u16" and
    "stream" the rotating uint32 buffers of one 128-token chunk's -, block-to-expert row, the shared expert's
    weights and h.T, then the larger of its per-chunk tiles and a group's tiles: Y for GT tiles + zero column,
    the down-slice ring, gathered columns, outT, output rows). x_gather "onchip" adds the resident x.T and its
    tiles to phase A (`blockwise.resident_xT_bytes`; infinite when that x.T is above the free-size limit)."""
    from .blockwise import _TABLE_BLOCKS, rep_blocks, resident_xT_bytes
    n_h = h_total // P_MAX
    _, n_i = intermediate_split(n_inter)
    n_slots = n_blocks * block_size
    n_c = -(-block_size // TOK_TILE)
    hT = n_i * n_slots * item
    tables = (2 + n_c) * 4 * _TABLE_BLOCKS + 8 * block_size
    chunk = 3 * h_total * item + 2 * n_inter * item + 4 * 256 + n_i * TOK_TILE * item + n_c * (12 * kmax + 16)
    phase_a = tables + 2 * n_h * 2 * n_inter * item + chunk
    if x_gather == "onchip":
        extra = resident_xT_bytes(n_tokens, h_total, n_h, block_size, item, rep_blocks(block_size))
        phase_a += float("inf") if extra is None else extra
    hg = group_tiles * H_TILE
    group = group_tiles * (n_slots + 1) * item + down_ring * n_i * hg * item + 2 * TOK_TILE * kmax * item \
        + 2 * TOK_TILE * (item + 4) + 2 * hg * item
    if index_mode != "u32":   # the chunk tiles rotate through _TILE_BUFFERS buffers (an allocation site in a loop)
        group += _TILE_BUFFERS * TOK_TILE * kmax * _IDX_ITEM
    resident = {"u32": _IDX_ITEM, "u16": 2, "stream": 0}[index_mode]
    persistent = n_tokens * kmax * resident + 4 * n_blocks
    transient = 0
    if s_inter:
        _, n_is = intermediate_split(s_inter)
        persistent += (n_h * 2 * s_inter + n_is * h_total) * item + 4 * n_h + n_is * n_tokens * item
        transient = chunk
    return hT + max(phase_a, persistent + max(group, transient))
