"""Blockwise MoE (prefill / context encoding) for many small experts, with the fused sigmoid-gated shared expert.

Consumes NxDI's blockwise contract (`moe_block_mapping`): block b holds up to B token ids of one local expert
`block_to_expert[b]`; every block loads its expert's weights once by dynamic DMA, gathers its tokens, runs
gate/up + SiLU + down, scales by the routing weight and scatter-adds into the token's output row.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import call, nki, nisa, nl
from ..hw import (DMA_FULL_RATE_ROW_BYTES, DVE_ELEMS_PER_CYCLE, P_MAX, PSUM_FMAX_FP32, SBUF_BYTES_PER_PARTITION,
                  SOFTWARE_DGE_ONLY_TARGETS)
from ..lnc import current_target_name, for_target, resolve_lnc
from ..validation import check_host_values, is_int_dtype, kernel_check
from ..validation import dtype_name as _dtype_name
from ..transpose import mixing_pe_transpose
from ._tiles import (_Y_TILE, TOK_TILE, down_piece, evict, intermediate_split, itemsize, load_down,
                     load_gate_up, load_gate_vector, sigmoid_gate, swiglu, transpose_h, transpose_tokens)

# ---- constraints
_MAX_BLOCK = 512            # tokens per block (NxDI's largest tested block is 1024; 512 keeps SBUF small)
_MIN_H, _MAX_H = P_MAX, 8192   # H must be a multiple of 128 (hidden rows split over the partitions)
_MAX_EXPERTS = 1024         # local experts (ids are int32; 512 is the largest model: Qwen3-Next)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# SBUF budget of one expert's weights (bytes per partition): gate_up n_h * 2I + down n_i * H elements, kept under
# half the trn2 partition so the next block's weights can stream in while this one computes.
_MAX_WEIGHT_BYTES_PP = 96 * 1024
# ---- tiles
_GATHER_BYTES_PP = 64 * 1024   # SBUF per partition for one group of gathered slot rows in the output pass (at most)
_TABLE_BLOCKS = 256            # blocks whose expert / token-id tables are loaded at once (SBUF independent of N)
_REP_BLOCKS = 32               # a core's blocks whose slot ids load replicated at once (on-chip x gather), at most:
                               # as many as fit in the DMA combine (`x_gather_plan`), and in the on-chip combine's
_REP_BYTES_PP = 16 * 1024      # phase A within this many bytes per partition (`rep_blocks`)
_EARLY_BLOCKS = 8              # with the on-chip x gather, a core's first min(8, its blocks / 8) blocks gather x by DMA
_XT_LOAD_CHUNKS = 4            # 128-token chunks of x loaded by one DMA to build the resident x.T
_SBUF_FREE_ELEMS_MAX = 65536   # elements per partition of one instruction's SBUF operand (the per-instruction
                               # free-size limit): bounds the resident x.T one nc_n_gather reads, n_h * T
_TABLE_CHUNKS = 8              # 128-token chunks whose output-pass tables (slot ids, routing rows) load at once,
_TABLE_BYTES_PP = 1024         # at most this many bytes per partition of them (fewer chunks for a wide dense KMAX)
_ACC_PSUM_BANKS = 4            # PSUM banks of VectorE's fp32 output-pass accumulator (one more for the shared
                               # expert's down projection pieces; its h tiles are done before the accumulator)
_CORE_HBM_BYTES_PER_US = 362.5e3   # one trn2 core's HBM rate (bytes per µs)
_GPSIMD_GHZ = 1.2
_SWDGE_MIN_CYCLES = 600        # GpSimd cycles to write one software-DGE DMA's descriptors: max(600, elements per
                               # partition) (the NC-v2 cost table's dynamic-address copies; costmodel swdge_min_cycles)
_DVE_GHZ = 0.96
_GATHER_EXPOSED = 1.0          # share of the on-chip combine's nc_n_gather time not hidden by other engines: all of
                               # it since phase B reuses one Y (a group's gathers hold up the next group's matmuls);
                               # 0.6 until round 32, fitted under cost model v3 when groups overlapped
_MIN_GROUP_TILES = 2           # "auto" takes the on-chip combine only with at least this many 128-row tiles per group
_ONCHIP_MARGIN = 0.1           # ... and only when its estimate beats the DMA combine's by this share of the latter (the
                               # estimate's error: fitted on the six registered T = 128 / 1024 pairs, docs/moe.md)
_MAX_GATHER_INDICES = 65536    # T * KMAX slot indices per partition (one SBUF tile: the free-size limit)
_SBUF_MARGIN = 2 * 1024        # bytes per partition left for the few small tiles the plan below does not list
# the smallest per-partition budget of any target: a trace-time layout choice that must fit wherever it runs
_SMALLEST_SBUF_BUDGET = min(SBUF_BYTES_PER_PARTITION.values()) - _SBUF_MARGIN

@nki.jit
def moe_blockwise_kernel(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert,
                         token_to_position, shared_gate_up, shared_down, shared_gate, top_k_index, block_size,
                         expert_offset):
    """Blockwise expert MLPs + fused shared expert with the DMA combine, one launch (LNC 1 or 2: blocks
    b % C == c on program c, which writes their slot rows of a shared-HBM scratch; after `nisa.core_barrier` on
    it, 128-token row chunks r % C == c, each program writing its rows of out).

    Dimensions:
        T tokens, H hidden (multiple of 128), E local experts, I expert intermediate, Is shared intermediate,
        TOPK experts per token, B = block_size, N blocks, KMAX = most local experts of one token (<= TOPK).
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        expert_affinities: [T * E, 1] @ HBM (dense affinities, row-major [T, E]) when top_k_index is None,
            else None.
        gate_up: [E, H, 2, I] @ HBM (gate columns then up columns), hidden's dtype.
        down: [E, I, H] @ HBM.
        token_position_to_id: [N * B] int32 @ HBM, token id per block slot, -1 for padding.
        block_to_expert: [N] int32 @ HBM, local expert of each block.
        token_to_position: [T, KMAX] int32 @ HBM, the slots holding each token (N * B = an all-zero row where
            the token has fewer local experts) - the inverse of token_position_to_id, built on the host; in the
            top-k form column j is the slot of the token's j-th choice (`token_slots_topk`).
        shared_gate_up: [H, 2, Is] @ HBM or None; shared_down: [Is, H] @ HBM; shared_gate: [H] @ HBM.
        top_k_index: the routing table [T, 2 * TOPK] float32 @ HBM (`routing_table`: global expert ids as fp32,
            then the top-k weights) or None (dense form).
        block_size: B (trace-time constant). expert_offset: global id of local expert 0 (constant).
    Returns:
        out: [T, H] @ HBM in hidden's dtype.
    Constraints:
        H % 128 == 0; I = ic * ceil(I / 128) (ic <= 128); B <= _MAX_BLOCK.
    Pseudocode:
        phase 1, for each block b:
            e = block_to_expert[b]                                       # runtime value, SBUF int32
            Wgu = gate_up[e], Wd = down[e]                               # 2 dynamic DMAs (scalar_offset)
            for each chunk of <= 128 slots: ids = token_position_to_id[slots]
                x = hidden[ids]                                          # gather, -1 skipped
                a = affinity(ids, e) (dense form; 1 in the top-k form)   # gather from the dense rows
                xT = x transposed (TensorE; VectorE on trn1); h = a * silu(xT.T Wg) * (xT.T Wu); y = h Wd
                scratch[slots] = y                                       # contiguous store, no read-modify-write
        phase 2, for each row chunk r (128 tokens):
            w = top-k weights of rows r (0 where the choice is not local; top-k form only, else 1)
            out[r] = shared(x[r]) + sum_j w[:, j] * scratch[token_to_position[r, j]]  # summed in fp32
        Every step keeps a token's values in its own row (gathers, row-wise matmuls, exact transposes, element-wise
        adds): no one-hot or identity matmul mixes rows, so a non-finite value in one token reaches no other.
    """
    n_tokens, h_total = hidden.shape
    n_slots = token_position_to_id.shape[0]
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    out = nl.ndarray((n_tokens, h_total), dtype=hidden.dtype, buffer=nl.shared_hbm)
    scratch = nl.ndarray((n_slots + 1, h_total), dtype=hidden.dtype,
                         buffer=nl.shared_hbm if n_prog > 1 else nl.hbm)
    _blocks_phase(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, top_k_index,
                  scratch, block_size, expert_offset, pid, n_prog)
    if n_prog > 1:   # the other core's slot rows are in scratch once both have passed the barrier
        nisa.core_barrier(data=scratch, cores=(0, 1), engine=nisa.engine.scalar)
    _finalize_phase(hidden, scratch, token_to_position, shared_gate_up, shared_down, shared_gate, top_k_index, out,
                    pid, n_prog)
    return out


def _shared_h_rows(hidden, i_r, s_wgu_sb, s_wsg_sb):
    """Shared expert of row chunk i_r up to h = sigmoid(x . w_sg) * silu(x Gs) * (x Us): (n_tok, h_sb
    [n_tok, Is])."""
    n_tokens, h_total = hidden.shape
    t0 = i_r * TOK_TILE
    n_tok = min(TOK_TILE, n_tokens - t0)
    x_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb[0:n_tok, :], src=hidden[t0:t0 + n_tok, :])
    xT_sb = transpose_tokens(x_sb, n_tok, h_total // P_MAX, evict_phase=i_r)
    gate_sb = sigmoid_gate(xT_sb, n_tok, s_wsg_sb)
    return n_tok, swiglu(xT_sb, n_tok, s_wgu_sb, gate_sb)


def _load_block_tables(block_to_expert, token_position_to_id, block_size, expert_offset, b0, n_b, global_ids):
    """Blocks b0 .. b0 + n_b - 1 (column b - b0): each block's expert id on every partition (e_all_sb [128, n_b],
    and eg_all_sb = global ids for the top-k affinity compare when `global_ids`, else e_all_sb: the DMA combine
    never computes a top-k affinity in the blocks phase) and every slot's token id (slot chunk c of block b in
    ids_all[c][p, b - b0]): 2 + ceil(B / 128) DMAs per group of _TABLE_BLOCKS blocks instead of several per block;
    SBUF independent of N."""
    e_all_sb = nl.ndarray((P_MAX, n_b), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=e_all_sb, src=block_to_expert.ap(pattern=[[0, P_MAX], [1, n_b]], offset=b0))
    if global_ids and expert_offset != 0:
        eg_all_sb = nl.ndarray((P_MAX, n_b), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=eg_all_sb, data=e_all_sb, op0=nl.add, operand0=expert_offset)
    else:
        eg_all_sb = e_all_sb
    ids_all = [nl.ndarray((TOK_TILE, n_b), dtype=nl.int32, buffer=nl.sbuf) for _ in range(0, block_size, TOK_TILE)]
    # the slot ids land block-major (one contiguous run of B ids per partition: a slot-major load would move 4-byte
    # runs) and are turned slot-major by exact fp32 TensorE transposes (ids < 2^24)
    for r0 in range(0, n_b, P_MAX):
        n_r = min(P_MAX, n_b - r0)
        rows_sb = nl.ndarray((P_MAX, block_size), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows_sb[0:n_r, :], src=token_position_to_id.ap(
            pattern=[[block_size, n_r], [1, block_size]], offset=(b0 + r0) * block_size))
        rows_f = nl.ndarray((P_MAX, block_size), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=rows_f[0:n_r, :], src=rows_sb[0:n_r, :])
        for i_c, s0 in enumerate(range(0, block_size, TOK_TILE)):
            n_tok = min(TOK_TILE, block_size - s0)
            t_psum = nl.ndarray((TOK_TILE, P_MAX), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_transpose(dst=t_psum[0:n_tok, 0:n_r], data=rows_f[0:n_r, s0:s0 + n_tok])
            nisa.tensor_copy(dst=ids_all[i_c][0:n_tok, r0:r0 + n_r], src=t_psum[0:n_tok, 0:n_r])
    return e_all_sb, eg_all_sb, ids_all


def _blocks_phase(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, top_k_index,
                  scratch, block_size, expert_offset, pid, n_prog):
    h_total = hidden.shape[1]
    n_local = gate_up.shape[0]
    n_blocks = block_to_expert.shape[0]
    n_slots = token_position_to_id.shape[0]
    top_k = top_k_index.shape[1] // 2 if top_k_index is not None else 1     # the [T, 2 TOPK] routing table
    n_h = h_total // gate_up_parts(h_total, gate_up.shape[3], itemsize(hidden.dtype), block_size, top_k)
    if pid == 0:   # the all-zero row that token_to_position points at for missing experts
        zero_sb = nl.ndarray((1, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
        nisa.memset(dst=zero_sb, value=0.0)
        nisa.dma_copy(dst=scratch[n_slots:n_slots + 1, :], src=zero_sb)
    consts = (block_size, n_local, n_h)
    # software pipeline over the blocks, interleaved per chunk of <= 128 slots: the PE program order is
    # hT(b - 1, c), xT(b, c), down(b - 1, c), gate/up(b, c), ... so TensorE has independent work queued while
    # the transposes are evicted and while SiLU runs
    pending = None
    n_tokens = hidden.shape[0]
    xT_all = None
    n_rep = x_gather_plan(n_tokens, h_total, gate_up.shape[3], block_size, top_k, itemsize(hidden.dtype))
    if n_rep is not None:
        xT_all = _resident_xT(hidden, n_h)
    for g0 in range(0, n_blocks, _TABLE_BLOCKS):
        n_b = min(_TABLE_BLOCKS, n_blocks - g0)
        tables = _load_block_tables(block_to_expert, token_position_to_id, block_size, expert_offset, g0, n_b,
                                    global_ids=False)
        args = (hidden, expert_affinities, gate_up, down, top_k_index) + tables
        first = g0 + (pid - g0) % n_prog
        mine = list(range(first, g0 + n_b, n_prog))
        rep_sb = None
        for k, i_b in enumerate(mine):
            if xT_all is not None and k % n_rep == 0:
                rep_sb = _replicated_ids(token_position_to_id, xT_all.shape[0], mine[k:k + n_rep], n_prog,
                                         block_size, n_rep)
            # a core's first _EARLY_BLOCKS blocks gather x by DMA: they need no resident x.T, so they run while it
            # is built (its x loads, transposes and evictions take ~20 µs before the first nc_n_gather can start)
            early = g0 == 0 and k < min(_EARLY_BLOCKS, len(mine) // _EARLY_BLOCKS)
            xg = None if xT_all is None or early else (xT_all, rep_sb[:, k % n_rep, :])
            pending = _block_step(*args, i_b, i_b - g0, *consts, scratch, pending, xg=xg)
    if pending is not None:
        for i_c in range(len(pending[1])):
            _down_store_chunk(scratch, hidden.dtype, pending, i_c, _h_transpose_chunk(pending, i_c))


def onchip_x_gather(n_tokens: int, h_total: int, n_inter: int, block_size: int, top_k: int, item: int,
                    target=None) -> bool:
    """Trace-time choice (shapes and target only) of the blocks phase's x permutation: on chip (x.T of every
    token resident in SBUF, each block chunk's x.T columns collected by one `nc_n_gather` on GpSimd) when that
    plan fits the target's SBUF and the resident x.T (n_h * T elements per partition, the data operand of that
    one nc_n_gather) is within the per-instruction SBUF free-size limit, else the row gather by indirect DMA
    (`x_gather_plan`). The on-chip form moves x once per core instead of once per slot (padding included), in
    long rows, and needs no x transposes per block (T transposed tokens instead of N * B slots: on trn1, where they
    are VectorE 32x32 transposes, `_tiles.exact_rows_to_columns`, that is most of what it saves); it costs GpSimd
    one element per gathered value and VectorE / ScalarE the index arithmetic (docs/moe.md, "On-chip x gather")."""
    return x_gather_plan(n_tokens, h_total, n_inter, block_size, top_k, item, target) is not None


def x_gather_plan(n_tokens: int, h_total: int, n_inter: int, block_size: int, top_k: int, item: int,
                  target=None):
    """The DMA-combine blocks phase's on-chip x gather plan (shapes and target only): how many blocks' slot ids
    one replicated load brings (`_replicated_ids`), the most up to _REP_BLOCKS that fit the SBUF beside the
    blocks phase and the resident x.T (each reload sits on the path of the block that needs it), or None when
    the on-chip x gather is not taken (the resident x.T above the free-size limit, or no room for one block's)."""
    parts = gate_up_parts(h_total, n_inter, item, block_size, top_k, target)
    room = sbuf_budget(target) - blocks_phase_bytes(h_total, n_inter, block_size, top_k, item, target)
    for rep in range(_REP_BLOCKS, 0, -1):
        extra = resident_xT_bytes(n_tokens, h_total, h_total // parts, block_size, item, rep)
        if extra is None:
            return None
        if extra <= room:
            return rep
    return None


def rep_blocks(block_size: int) -> int:
    """Blocks whose slot ids one `_replicated_ids` load brings in the on-chip combine's phase A (shapes only): up
    to _REP_BLOCKS, within _REP_BYTES_PP bytes per partition (int32 ids), at least 1."""
    return max(1, min(_REP_BLOCKS, _REP_BYTES_PP // (4 * block_size)))


def resident_xT_bytes(n_tokens: int, h_total: int, n_h: int, block_size: int, item: int, rep: int):
    """SBUF bytes per partition the on-chip x gather adds to a blocks phase (shapes only): the resident x.T
    [H / n_h, n_h, T] (live throughout), plus the larger of what it needs while it is built (the x rows of
    _XT_LOAD_CHUNKS token chunks, before any block's tiles) and what the blocks then add: the replicated slot ids of
    `rep` blocks, one chunk's clamped ids and gather indices (uint32 [parts, n_h, 128]: each chunk's die at its
    gather) and, where a chunk's gathered x.T [parts, n_h, 128] is larger than the x rows [128, H] the blocks-phase
    bound already counts for it (gate/up on fewer than 128 partitions), the difference for each of the block's
    chunks (all gathered before the first is used). None when the resident x.T (the data operand of one
    nc_n_gather) exceeds the per-instruction SBUF free-size limit. A test checks this bound against the
    emulator's liveness peak at the largest T the path takes."""
    if n_h * n_tokens > _SBUF_FREE_ELEMS_MAX:
        return None
    n_c = -(-block_size // TOK_TILE)
    per_block = rep * block_size * 4 + TOK_TILE * 4 * (1 + n_h) + n_c * max(0, n_h * TOK_TILE - h_total) * item
    return n_h * n_tokens * item + max(_XT_LOAD_CHUNKS * h_total * item, per_block)


def _resident_xT(hidden, n_h):
    """x.T of every token: [parts, n_h, T] with xT[p, j, t] = x[t, p * n_h + j]: the rows of up to _XT_LOAD_CHUNKS
    128-token chunks at a time (`_chunk_rows`: token c * 128 + p on partition p, long per-partition runs), TensorE
    transposes with evictions alternating VectorE / ScalarE (VectorE 32x32 transposes where TensorE's mix tokens:
    `transpose_tokens`). No zero column: a padding slot gathers token 0 (`_gather_xT`)."""
    n_tokens, h_total = hidden.shape
    xT_all = nl.ndarray((h_total // n_h, n_h, n_tokens), dtype=hidden.dtype, buffer=nl.sbuf)
    n_chunks = (n_tokens + TOK_TILE - 1) // TOK_TILE
    for c0 in range(0, n_chunks, _XT_LOAD_CHUNKS):
        rows = list(range(c0, min(n_chunks, c0 + _XT_LOAD_CHUNKS)))
        x_sb = _chunk_rows(hidden, hidden.dtype, rows, 1)
        for c, i_r in enumerate(rows):
            t0 = i_r * TOK_TILE
            transpose_tokens(x_sb[:, c, :], min(TOK_TILE, n_tokens - t0), n_h, evict_phase=i_r, dst=(xT_all, t0))
    return xT_all


def _replicated_ids(token_position_to_id, parts, blocks, n_prog, block_size, n_rep):
    """The slot token ids of `blocks` (b = blocks[0] + k * n_prog; at most n_rep of them) on every one of `parts`
    partitions: [parts, n_rep, B] int32, one DMA (partition stride 0; each partition reads len(blocks) runs of B
    ids)."""
    rep_sb = nl.ndarray((parts, n_rep, block_size), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=rep_sb[:, 0:len(blocks), :], src=token_position_to_id.ap(
        pattern=[[0, parts], [n_prog * block_size, len(blocks)], [1, block_size]], offset=blocks[0] * block_size))
    return rep_sb


def _gather_xT(xT_all, ids_row, s0, n_tok, n_h):
    """x.T [parts, n_h, 128] of one block chunk (slots s0 .. s0 + n_tok) from the resident x.T: indices
    j * T + id (a padding slot's id -1 clamped to token 0) built per hidden chunk j (VectorE / ScalarE alternating,
    fp32 math: exact below 2^24), then one nc_n_gather. Each token's values stay in its column."""
    parts, _, n_cols = xT_all.shape
    # ids clamped to [0, T - 1] on device, so no index can leave the resident x.T (the wrapper validates host
    # mappings; this guards a device mapping it cannot read); a padding slot (id -1) collects token 0's x.T, which
    # reaches only that slot's own output row / column, never read back (as the DMA gather's stale padding rows)
    ids_sb = nl.ndarray((parts, TOK_TILE), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=ids_sb[:, 0:n_tok], data=ids_row[:, s0:s0 + n_tok], op0=nl.maximum, operand0=0,
                       op1=nl.minimum, operand1=n_cols - 1)
    idx_sb = nl.ndarray((parts, n_h, TOK_TILE), dtype=nl.uint32, buffer=nl.sbuf)
    for j in range(n_h):
        eng = nisa.engine.vector if j % 2 == 0 else nisa.engine.scalar
        nisa.tensor_scalar(dst=idx_sb[:, j, 0:n_tok], data=ids_sb[:, 0:n_tok], op0=nl.add,
                           operand0=float(j * n_cols), engine=eng)
    xT_sb = nl.ndarray((parts, n_h, TOK_TILE), dtype=xT_all.dtype, buffer=nl.sbuf)
    nisa.nc_n_gather(dst=xT_sb[:, :, 0:n_tok], data=xT_all, indices=idx_sb[:, :, 0:n_tok])
    return xT_sb


def _gather_token_tile(hidden, expert_affinities, top_k_index, ids_sb, e_sb, eg_sb, n_tok, n_local,
                       affinity=True):
    """One chunk of a block: its n_tok routed token rows of hidden [T, H] gathered by id into x [TOK_TILE, H]
    (pad ids are out of range and skipped: those rows keep stale values, which reach only the padding slot's own
    scratch row / Y column, never read back), and their affinities [n_tok, 1] for the block's expert (None when
    `affinity` is False: the caller applies the routing weights later)."""
    h_total = hidden.shape[1]
    x_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb[0:n_tok, :],
                  src=hidden.ap(pattern=[[h_total, n_tok], [1, h_total]], offset=0,
                                vector_offset=ids_sb[0:n_tok, :], indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    if not affinity:
        return x_sb, None
    return x_sb, slot_affinity(expert_affinities, top_k_index, ids_sb, e_sb, eg_sb, n_tok, n_local)


def slot_affinity(expert_affinities, top_k_index, ids_sb, e_sb, eg_sb, n_tok, n_local):
    """(n_tok, 1) fp32: each slot's routing weight for its block's expert, from the dense affinities
    (`_dense_affinity`) or the top-k routing table (`_topk_affinity`), one indirect DMA either way."""
    if top_k_index is None:
        return _dense_affinity(expert_affinities, ids_sb, e_sb, n_tok, n_local)
    return _topk_affinity(top_k_index, ids_sb, eg_sb, n_tok)


def _block_step(hidden, expert_affinities, gate_up, down, top_k_index, e_all_sb, eg_all_sb, ids_all, i_b, col,
                block_size, n_local, n_h, scratch, pending, xg=None):
    """Block i_b (column col of the tables) up to h = a * silu(x Wg) * (x Wu), interleaved chunk by chunk with the
    down projection and store of the previous block (`pending`). Returns what the next step needs to finish
    block i_b."""
    e_sb = e_all_sb[:, col:col + 1]
    wgu_sb = load_gate_up(gate_up, e_sb[0:1, :], parts=hidden.shape[1] // n_h)
    wd_sb = load_down(down, e_sb[0:1, :])
    inputs = []
    for i_c, s0 in enumerate(range(0, block_size, TOK_TILE)):   # every input DMA of the block first
        n_tok = min(TOK_TILE, block_size - s0)
        if xg is None:
            x_sb, aff_sb = _gather_token_tile(hidden, expert_affinities, top_k_index, ids_all[i_c][:, col:col + 1],
                                              e_sb, eg_all_sb[:, col:col + 1], n_tok, n_local,
                                              affinity=top_k_index is None)
        else:   # on-chip x gather: x.T comes from the resident tile (below); only the dense affinity is gathered
            x_sb = _gather_xT(xg[0], xg[1], s0, n_tok, n_h)
            aff_sb = None if top_k_index is not None else _dense_affinity(
                expert_affinities, ids_all[i_c][:, col:col + 1], e_sb, n_tok, n_local)
        inputs.append((i_b * block_size + s0, n_tok, x_sb, aff_sb))
    chunks = []
    for i_c, (pos0, n_tok, x_sb, aff_sb) in enumerate(inputs):
        prev = pending is not None and i_c < len(pending[1])
        if prev:
            hT_prev = _h_transpose_chunk(pending, i_c)
        # 64-partition x.T (twice the copies) with one chunk per block: every copy on ScalarE (VectorE's fast copies
        # share an SBUF port with GpSimd's descriptor work for the x gathers); with more chunks per block ScalarE
        # (also SiLU) would be the busier engine, so they alternate (docs/moe.md, "Talker gate/up on 64 partitions")
        if xg is None:
            xT_sb = transpose_tokens(x_sb, n_tok, n_h, evict_phase=i_b + i_c,
                                     scalar_only=n_h * P_MAX > hidden.shape[1] and block_size <= TOK_TILE)
        else:
            xT_sb = x_sb
        if prev:
            _down_store_chunk(scratch, hidden.dtype, pending, i_c, hT_prev)
        h_sb = swiglu(xT_sb, n_tok, wgu_sb, aff_sb)
        chunks.append((pos0, n_tok, h_sb))
    if pending is not None:
        for i_c in range(len(inputs), len(pending[1])):
            _down_store_chunk(scratch, hidden.dtype, pending, i_c, _h_transpose_chunk(pending, i_c))
    return wd_sb, chunks


def _h_transpose_chunk(staged, i_c):
    """hT [ic, n_i, 128] of chunk i_c of a staged block (TensorE transposes)."""
    wd_sb, chunks = staged
    _, n_tok, h_sb = chunks[i_c]
    ic, n_i, _ = wd_sb.shape
    return transpose_h(h_sb, n_tok, ic, n_i)


def _down_store_chunk(scratch, out_dtype, staged, i_c, hT_sb):
    """y = h Wd for chunk i_c of a staged block (hT_sb from `_h_transpose_chunk`), stored to the chunk's
    scratch rows (contiguous, no read-modify-write)."""
    wd_sb, chunks = staged
    pos0, n_tok, _ = chunks[i_c]
    h_total = wd_sb.shape[2]
    y_sb = nl.ndarray((TOK_TILE, h_total), dtype=out_dtype, buffer=nl.sbuf)
    for i_y, h0 in enumerate(range(0, h_total, _Y_TILE)):
        hw = min(_Y_TILE, h_total - h0)
        y_psum = nl.ndarray((TOK_TILE, _Y_TILE), dtype=nl.float32, buffer=nl.psum)
        down_piece(y_psum, hT_sb, n_tok, wd_sb, h0, hw)
        evict(y_sb[0:n_tok, h0:h0 + hw], y_psum[0:n_tok, 0:hw], i_y)
    nisa.dma_copy(dst=scratch[pos0:pos0 + n_tok, :], src=y_sb[0:n_tok, :])


def _finalize_phase(hidden, scratch, token_to_position, shared_gate_up, shared_down, shared_gate, routing, out,
                    pid, n_prog):
    """out[r] = shared(x[r]) + sum_j w[r, j] * scratch[token_to_position[r, j]] per row chunk r of this program
    (w = 1 in the dense form, whose slot rows are already scaled; in the top-k form token_to_position is in top-k
    order and w is the routing table's weight column j, 0 where the choice is not local): the gathered slot rows
    are added on VectorE / GpSimd in fp32 (element-wise, so each token's sum stays in its row), starting from the
    shared expert's down projection, and each output row is written exactly once. Slot rows are gathered `group`
    at a time, as many as the SBUF left by the rest of the pass allows (at least 1)."""
    n_tokens, h_total = hidden.shape
    kmax = token_to_position.shape[1]
    shared_w = None
    s_inter = 0
    if shared_gate_up is not None:
        shared_w = (load_gate_up(shared_gate_up), load_down(shared_down), load_gate_vector(shared_gate))
        s_inter = shared_down.shape[0]
    per_load, group = output_plan(h_total, s_inter, kmax, itemsize(hidden.dtype),
                                  0 if routing is None else routing.shape[1] // 2)
    mine = list(range(pid, (n_tokens + TOK_TILE - 1) // TOK_TILE, n_prog))
    for k0 in range(0, len(mine), per_load):
        rows = mine[k0:k0 + per_load]
        inv_all = _chunk_rows(token_to_position, nl.int32, rows, n_prog)
        rt_all = None if routing is None else _chunk_rows(routing, nl.float32, rows, n_prog)
        for i_k, i_r in enumerate(rows):
            n_tok = min(TOK_TILE, n_tokens - i_r * TOK_TILE)
            inv_sb = inv_all[:, i_k, :]
            w_sb = None if routing is None else _slot_weights(rt_all[:, i_k, :], inv_sb, scratch.shape[0] - 1, n_tok)
            _finalize_rows(hidden, scratch, inv_sb, w_sb, shared_w, out, group, i_r)


def _chunk_rows(table, dtype, rows, n_prog):
    """The rows of 128-token chunks `rows` (i_r = rows[0] + k * n_prog) of a [T, F] table -> SBUF [128, len(rows),
    F] (chunk k's token t0 + p on partition p): one DMA for the full chunks (each partition reads len(rows) pieces of
    F elements in one descriptor instead of one 24-64 B descriptor per chunk; cost model v3 charges every descriptor
    at least a 2.5 KiB packet time) plus one for a last, partial chunk."""
    n_tokens, n_f = table.shape
    t_sb = nl.ndarray((TOK_TILE, len(rows), n_f), dtype=dtype, buffer=nl.sbuf)
    n_full = sum(1 for i_r in rows if (i_r + 1) * TOK_TILE <= n_tokens)
    if n_full:
        nisa.dma_copy(dst=t_sb[:, 0:n_full, :], src=table.ap(
            pattern=[[n_f, TOK_TILE], [n_prog * TOK_TILE * n_f, n_full], [1, n_f]], offset=rows[0] * TOK_TILE * n_f))
    if n_full < len(rows):   # the last chunk of the table, shorter than 128 tokens
        t0 = rows[-1] * TOK_TILE
        nisa.dma_copy(dst=t_sb[0:n_tokens - t0, n_full, :], src=table[t0:n_tokens, :])
    return t_sb


def _slot_weights(rt_sb, inv_sb, zero_slot, n_tok):
    """[n_tok, TOPK] fp32 weights of a token chunk's slots in top-k order: the routing-table rows rt_sb [128, 2 TOPK]
    (ids then weights; `_chunk_rows`), selected to 0 where the slot is the all-zero row (a choice of a non-local
    expert: its weight, even NaN, plays no part)."""
    two_k = rt_sb.shape[1]
    top_k = two_k // 2
    local_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=local_sb[0:n_tok, :], data=inv_sb[0:n_tok, :], op0=nl.less, operand0=zero_slot)
    return nl.where(local_sb[0:n_tok, :], rt_sb[0:n_tok, top_k:two_k], 0.0)


def _finalize_rows(hidden, scratch, inv_sb, w_sb, shared_w, out, group, i_r):
    """Row chunk i_r: acc = shared down projection (fp32, from PSUM) or the first gathered
    slot row, then += each further gathered row (VectorE / GpSimd, fp32), each times its weight column of w_sb
    when given (VectorE: fused in one scalar_tensor_tensor; GpSimd's columns: scaled in place on ScalarE first);
    the last add writes the output dtype; one output DMA."""
    n_tokens, h_total = hidden.shape
    kmax = inv_sb.shape[1]
    t0 = i_r * TOK_TILE
    n_tok = min(TOK_TILE, n_tokens - t0)
    ranges = _add_ranges(h_total)
    n_ps = ranges[0][1] if ranges[0][3] else 0
    acc_sb = nl.ndarray((TOK_TILE, h_total), dtype=nl.float32, buffer=nl.sbuf)
    n_terms = kmax
    if shared_w is not None:
        s_wgu_sb, s_wd_sb, s_wsg_sb = shared_w
        _, hs_sb = _shared_h_rows(hidden, i_r, s_wgu_sb, s_wsg_sb)
        ic, n_i, _ = s_wd_sb.shape
        hsT_sb = transpose_h(hs_sb, n_tok, ic, n_i)
    acc_ps = nl.ndarray((TOK_TILE, n_ps), dtype=nl.float32, buffer=nl.psum) if n_ps else None
    if shared_w is not None:
        for i_y, h0 in enumerate(range(0, h_total, _Y_TILE)):
            hw = min(_Y_TILE, h_total - h0)
            a = max(0, min(hw, n_ps - h0))   # columns h0 .. h0 + a land in VectorE's PSUM accumulator directly
            if a:
                down_piece(acc_ps[:, h0:h0 + a], hsT_sb, n_tok, s_wd_sb, h0, a)
            if a < hw:
                y_psum = nl.ndarray((TOK_TILE, _Y_TILE), dtype=nl.float32, buffer=nl.psum)
                down_piece(y_psum, hsT_sb, n_tok, s_wd_sb, h0 + a, hw - a)
                evict(acc_sb[0:n_tok, h0 + a:h0 + hw], y_psum[0:n_tok, 0:hw - a], i_y)
        n_terms += 1
    o_sb = nl.ndarray((TOK_TILE, h_total), dtype=hidden.dtype, buffer=nl.sbuf)
    term = 0 if shared_w is None else 1
    for j0 in range(0, kmax, group):
        g_sz = min(group, kmax - j0)
        g_sb = nl.ndarray((TOK_TILE, min(group, kmax), h_total), dtype=hidden.dtype, buffer=nl.sbuf)
        for jj in range(g_sz):
            nisa.dma_copy(dst=g_sb[0:n_tok, jj, :],
                          src=scratch.ap(pattern=[[h_total, n_tok], [1, h_total]], offset=0,
                                         vector_offset=inv_sb[0:n_tok, j0 + jj:j0 + jj + 1], indirect_dim=0))
        for jj in range(g_sz):
            dst = o_sb if term == n_terms - 1 else acc_sb
            w_j = None if w_sb is None else w_sb[0:n_tok, j0 + jj:j0 + jj + 1]
            # columns split between VectorE and GpSimd (independent add chains, ~ their throughputs)
            for c0, c1, eng, in_psum in ranges:
                acc = acc_ps if in_psum else acc_sb
                out_t = dst if term == n_terms - 1 else acc
                _add_slot_row(out_t[0:n_tok, c0:c1], acc[0:n_tok, c0:c1] if term else None,
                              g_sb[0:n_tok, jj, c0:c1], w_j, eng)
            term += 1
    nisa.dma_copy(dst=out[t0:t0 + n_tok, :], src=o_sb[0:n_tok, :])


def _add_ranges(h_total):
    """Output-pass column ranges (c0, c1, engine, accumulator in PSUM): VectorE's from a PSUM accumulator (one
    pass per fp32 add), up to _ACC_PSUM_BANKS banks; beyond that, VectorE's further columns from SBUF (two
    passes); GpSimd's from SBUF (two passes). GpSimd also generates every slot-row gather's descriptors
    (software DGE, ~H cycles per gathered row), so per gathered row the ranges balance
    VectorE (n_ps + 2 (b - n_ps)) / r cycles at _DVE_GHZ (r: the target's VectorE elements per cycle,
    `hw.DVE_ELEMS_PER_CYCLE`: 2 on trn2 / trn3, where VectorE then takes every column) against GpSimd H + 2 (H - b)
    cycles at _GPSIMD_GHZ (boundaries on 128 columns)."""
    def on_128(x):
        return min(h_total, max(0, int(round(x / P_MAX)) * P_MAX))
    dve = _DVE_GHZ * for_target(DVE_ELEMS_PER_CYCLE)
    cap = _ACC_PSUM_BANKS * PSUM_FMAX_FP32
    n_ps = min(on_128(3 * h_total * dve / (_GPSIMD_GHZ + 2 * dve)), cap)
    b = n_ps if n_ps < cap else max(n_ps, on_128((3 * h_total * dve + n_ps * _GPSIMD_GHZ)
                                                 / (2 * (dve + _GPSIMD_GHZ))))
    ranges = [(0, n_ps, nisa.engine.vector, True), (n_ps, b, nisa.engine.vector, False),
              (b, h_total, nisa.engine.gpsimd, False)]
    return [r for r in ranges if r[1] > r[0]]


def _add_slot_row(dst, acc, g, w, eng):
    """dst = acc + w * g (acc None: dst = w * g; w None: weight 1) on engine eng (VectorE or GpSimd); a weighted
    row on GpSimd is scaled in place on ScalarE first (scalar_tensor_tensor runs on VectorE only)."""
    if w is not None and eng == nisa.engine.vector:
        if acc is None:
            nisa.tensor_scalar(dst=dst, data=g, op0=nl.multiply, operand0=w, engine=eng)
        else:
            nisa.scalar_tensor_tensor(dst=dst, data=g, op0=nl.multiply, operand0=w, op1=nl.add, operand1=acc)
        return
    if w is not None:
        if acc is None:
            nisa.activation(dst=dst, op=nl.copy, data=g, scale=w)
            return
        nisa.activation(dst=g, op=nl.copy, data=g, scale=w)
    if acc is None:
        nisa.tensor_copy(dst=dst, src=g, engine=eng)
    else:
        nisa.tensor_tensor(dst=dst, data1=acc, data2=g, op=nl.add, engine=eng)


def _dense_affinity(aff_flat, ids_sb, e_sb, n_tok, n_local):
    """(n_tok, 1) fp32: aff[id * E + e] gathered by DMA; -1 ids give a negative index and are skipped (their rows
    keep stale values, which stay in the padding slot's own row: every transpose of these rows is exact)."""
    flat_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=flat_sb[0:n_tok, :], data=ids_sb[0:n_tok, :], op0=nl.multiply, operand0=n_local)
    nisa.tensor_tensor(dst=flat_sb[0:n_tok, :], data1=flat_sb[0:n_tok, :], data2=e_sb[0:n_tok, :], op=nl.add)
    aff_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=aff_sb[0:n_tok, :],
                  src=aff_flat.ap(pattern=[[1, n_tok], [1, 1]], offset=0, vector_offset=flat_sb[0:n_tok, :],
                                  indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    return aff_sb


def _topk_affinity(routing, ids_sb, eg_sb, n_tok):
    """(n_tok, 1) fp32: sum_j w[id, j] * (idx[id, j] == e_global), from one gathered row per slot of the routing
    table [T, 2 TOPK] fp32 (the TOPK ids, exact below 2^24, then the TOPK weights): one indirect DMA."""
    two_k = routing.shape[1]
    top_k = two_k // 2
    row_sb = nl.ndarray((TOK_TILE, two_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=row_sb[0:n_tok, :],
                  src=routing.ap(pattern=[[two_k, n_tok], [1, two_k]], offset=0, vector_offset=ids_sb[0:n_tok, :],
                                 indirect_dim=0),
                  oob_mode=nisa.oob_mode.skip)
    sel_sb = nl.ndarray((TOK_TILE, top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=sel_sb[0:n_tok, :], data=row_sb[0:n_tok, 0:top_k], op0=nl.equal,
                       operand0=eg_sb[0:n_tok, :])
    w_sb = nl.where(sel_sb[0:n_tok, :], row_sb[0:n_tok, top_k:two_k], 0.0)   # a select: another expert's weight
    aff_sb = nl.ndarray((TOK_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)      # (even NaN) plays no part
    nisa.tensor_reduce(dst=aff_sb[0:n_tok, :], op=nl.add, data=w_sb, axis=1)
    return aff_sb


# ---------------------------------------------------------------------------------------------- host wrapper


def _np(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _shape(x):
    return tuple(int(s) for s in x.shape)


def check_weights(kname, hidden, gate_up, down, shared):
    """Shared validation of hidden / expert weights / shared expert (moe_blockwise and moe_decode)."""
    kernel_check(getattr(hidden, "ndim", 0) == 2 and hasattr(hidden, "dtype"),
                 f"{kname}: hidden must be a [T, H] array, got {_shape_of(hidden)}")
    n_tokens, h_total = _shape(hidden)
    kernel_check(n_tokens >= 1, f"{kname}: need at least one token, got T={n_tokens}")
    kernel_check(h_total % P_MAX == 0 and _MIN_H <= h_total <= _MAX_H,
                 f"{kname}: H must be a multiple of {P_MAX} in [{_MIN_H}, {_MAX_H}], got H={h_total}")
    kernel_check(_dtype_name(hidden) in _FLOAT_DTYPES,
                 f"{kname}: hidden dtype must be one of {_FLOAT_DTYPES}, got dtype={hidden.dtype}")
    hint = ("; transformers' gate_up_proj [E, 2I, H] / down_proj [E, H, I] convert with "
            "nki_kernels.moe.weights_from_transformers (or experts_from_transformers)")
    kernel_check(getattr(gate_up, "ndim", 0) == 4 and _shape(gate_up)[1:3] == (h_total, 2),
                 f"{kname}: gate_up must be [E, H={h_total}, 2, I], got shape={_shape_of(gate_up)}"
                 + (hint if getattr(gate_up, "ndim", 0) == 3 and _shape(gate_up)[2] == h_total else ""))
    n_local, _, _, n_inter = _shape(gate_up)
    kernel_check(1 <= n_local <= _MAX_EXPERTS, f"{kname}: E must be in [1, {_MAX_EXPERTS}], got E={n_local}")
    kernel_check(hasattr(down, "shape") and _shape(down) == (n_local, n_inter, h_total),
                 f"{kname}: down must be [E={n_local}, I={n_inter}, H={h_total}], got shape={_shape_of(down)}"
                 + (hint if _shape_of(down) == (n_local, h_total, n_inter) else ""))
    for name, w in (("gate_up", gate_up), ("down", down)):
        kernel_check(w.dtype == hidden.dtype, f"{kname}: {name} dtype must equal hidden's {hidden.dtype}, "
                     f"got {w.dtype}")
    _check_inter(kname, "I", n_inter, h_total, hidden)
    if shared is not None:
        kernel_check(isinstance(shared, (tuple, list)) and len(shared) == 3,
                     f"{kname}: shared must be (gate_up [H, 2, Is], down [Is, H], gate [H]), got {type(shared)}")
        s_gu, s_dn, s_g = shared
        kernel_check(getattr(s_gu, "ndim", 0) == 3 and _shape(s_gu)[:2] == (h_total, 2),
                     f"{kname}: shared gate_up must be [H={h_total}, 2, Is], got shape={_shape_of(s_gu)} "
                     "(transformers' shared expert converts with nki_kernels.moe.weights_from_transformers or "
                     "shared_from_transformers)")
        n_sh = _shape(s_gu)[2]
        kernel_check(_shape_of(s_dn) == (n_sh, h_total),
                     f"{kname}: shared down must be [Is={n_sh}, H={h_total}], got shape={_shape_of(s_dn)}")
        kernel_check(_shape_of(s_g) == (h_total,),
                     f"{kname}: shared gate must be [H={h_total}], got shape={_shape_of(s_g)}")
        for name, w in (("shared gate_up", s_gu), ("shared down", s_dn), ("shared gate", s_g)):
            kernel_check(w.dtype == hidden.dtype, f"{kname}: {name} dtype must equal hidden's {hidden.dtype}, "
                         f"got {w.dtype}")
        _check_inter(kname, "Is", n_sh, h_total, hidden)



def sbuf_budget(target=None) -> int:
    """SBUF bytes per partition the MoE plans may use on the target (default: the current one)."""
    return for_target(SBUF_BYTES_PER_PARTITION, target) - _SBUF_MARGIN


def gate_up_parts(h_total: int, n_inter: int, item: int, block_size: int, top_k: int, target=None) -> int:
    """Partitions the DMA-combine blocks phase loads an expert's gate/up weights on (shapes and target only): 64
    when the 128-partition run (n_h * 2I elements) is shorter than the target's DMA packet knee (`_dma_knee`: such
    a run moves at run / knee of the DMA peak, so twice the run on half the partitions moves the same bytes in up to
    half the time; the talker's 1.5 KiB -> 3 KiB on trn1, whose knee is 2560 B) and the 64-partition plan (x.T twice
    as long per partition) fits every target's SBUF, else 128. With 64, gate/up matmuls contract K = 64 rows, twice
    as many of them, and each token chunk needs twice the x.T copies: on trn2 / trn3 (512 B knee) a 1.5 KiB run
    already moves at the full rate, and that TensorE work would bound the blocks phase (docs/moe.md, "Round 35")."""
    run = h_total // P_MAX * 2 * n_inter * item
    if run >= _dma_knee(target):
        return P_MAX
    half_fits = _blocks_bytes(h_total, n_inter, block_size, top_k, item, P_MAX // 2) <= _SMALLEST_SBUF_BUDGET
    return P_MAX // 2 if half_fits else P_MAX


def blocks_phase_bytes(h_total: int, n_inter: int, block_size: int, top_k: int, item: int, target=None) -> int:
    """Upper bound of the SBUF bytes per partition of the blocks phase (every tile counted as live at once):
    block tables, one expert's weights + the previous block's down weights, the block's gathered rows (one
    [128, H] tile per 128-slot chunk, all issued first), one transpose, the h tiles of this and the previous
    block, hT, the output row tile, the all-zero row and the per-chunk affinity tiles."""
    parts = gate_up_parts(h_total, n_inter, item, block_size, top_k, target)
    return _blocks_bytes(h_total, n_inter, block_size, top_k, item, parts)


def _blocks_bytes(h_total, n_inter, block_size, top_k, item, parts):
    """`blocks_phase_bytes` with gate/up (and x.T) on `parts` partitions."""
    n_i, n_c = -(-n_inter // P_MAX), -(-block_size // TOK_TILE)
    n_h = h_total // parts
    tables = (2 + n_c) * 4 * _TABLE_BLOCKS + 8 * block_size     # + the block-major ids (int32, fp32)
    weights = (n_h * 2 * n_inter + 2 * n_i * h_total) * item
    rows = (n_c + 2) * h_total * item + n_h * TOK_TILE * item   # x per chunk, y, zero row; xT
    inter = 2 * n_c * n_inter * item + n_i * TOK_TILE * item + 1024    # h (2 blocks), hT, SiLU tile
    aff = n_c * (16 * top_k + 16)
    return tables + weights + rows + inter + aff


def table_chunks(kmax: int, top_k: int) -> int:
    """128-token chunks whose output-pass tables (KMAX slot ids, in the top-k form 2 TOPK routing values, 4 B
    each) one load brings: up to _TABLE_CHUNKS within _TABLE_BYTES_PP bytes per partition, at least 1."""
    return max(1, min(_TABLE_CHUNKS, _TABLE_BYTES_PP // (4 * (kmax + 2 * top_k))))


def output_pass_bytes(h_total: int, s_inter: int, kmax: int, item: int, group: int = 1, top_k: int = 0,
                      chunks: int = 1) -> int:
    """Upper bound of the SBUF bytes per partition of the output pass with `group` slot rows gathered at once:
    the shared expert's weights and its per-chunk tiles (x, xT, h, hT, SiLU tile), the fp32 accumulator, the
    output tile, the slot ids (and top-k routing rows; top_k = 0 in the dense form) of `chunks` 128-token chunks
    loaded at once and the gathered rows."""
    shared = 0
    if s_inter:
        n_h, n_is = h_total // P_MAX, -(-s_inter // P_MAX)
        shared = (n_h * 2 * s_inter + n_is * h_total + n_h) * item + 2 * h_total * item \
            + s_inter * item + n_is * TOK_TILE * item + 1024 + 8
    tables = chunks * 4 * (kmax + 2 * top_k)
    return shared + 4 * h_total + h_total * item + tables + group * h_total * item


def output_plan(h_total: int, s_inter: int, kmax: int, item: int, top_k: int, target=None) -> tuple:
    """(chunks, group) of the output pass (top_k = 0 in the dense form): the most 128-token chunks whose tables
    one load brings (up to `table_chunks`, fewer when SBUF is tight, at least 1) beside one gathered slot row, then
    the most slot rows gathered at once in the SBUF left (up to KMAX and _GATHER_BYTES_PP, at least 1)."""
    budget = sbuf_budget(target)
    row = h_total * item
    chunks = next((c for c in range(table_chunks(kmax, top_k), 1, -1)
                   if output_pass_bytes(h_total, s_inter, kmax, item, top_k=top_k, chunks=c) <= budget), 1)
    free = budget - output_pass_bytes(h_total, s_inter, kmax, item, group=0, top_k=top_k, chunks=chunks)
    return chunks, max(1, min(kmax, _GATHER_BYTES_PP // row, free // row))


def check_sbuf_plan(kname, h_total, n_inter, s_inter, block_size, kmax, top_k, item, target=None, dense=False):
    """Refuse a shape whose blocks phase or output pass (one chunk's tables, one gathered row) cannot fit SBUF.
    top_k is the blocks phase's (1 in the dense form); the dense output pass loads no routing rows."""
    budget = sbuf_budget(target)
    need = blocks_phase_bytes(h_total, n_inter, block_size, top_k, item, target)
    kernel_check(need <= budget, f"{kname}: the blocks phase needs {need} B of SBUF per partition (H={h_total}, "
                 f"I={n_inter}, block_size={block_size}, {item}-byte dtype), above the {budget} B available; use a "
                 f"smaller block_size or shard I further")
    need = output_pass_bytes(h_total, s_inter, kmax, item, top_k=0 if dense else top_k)
    kernel_check(need <= budget, f"{kname}: the output pass needs {need} B of SBUF per partition (H={h_total}, "
                 f"Is={s_inter}, KMAX={kmax}, {item}-byte dtype), above the {budget} B available; shard H or Is "
                 f"further")


_INT32_MIN, _INT32_MAX = -2 ** 31, 2 ** 31 - 1
_MAX_EXPERT_ID = 2 ** 24     # expert_offset + E: local ids are compared in fp32 on device, exact below 2^24


def _host_values(x):
    """NumPy values of a host array / CPU tensor for validation only (None for device or meta tensors)."""
    try:
        import torch
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                return None
            return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def check_top_k(kname, top_k_index, top_k_weights, n_tokens, hidden, weights_name="top_k_weights",
                read_values=True):
    """top_k_index [T, TOPK] integer (int64 ids must fit int32: checked on host values, never used to specialize;
    read_values=False leaves that to `check_top_k_ids`: torch_ops' fakes have no values),
    weights [T, TOPK] float (float64 is refused: cast to hidden's dtype or float32)."""
    kernel_check(getattr(top_k_index, "ndim", 0) == 2 and _shape(top_k_index)[0] == n_tokens,
                 f"{kname}: top_k_index must be [T={n_tokens}, TOPK], got shape={_shape_of(top_k_index)}")
    kernel_check(_shape(top_k_index)[1] >= 1, f"{kname}: top_k_index needs TOPK >= 1, got shape={_shape(top_k_index)}")
    kernel_check(is_int_dtype(top_k_index),
                 f"{kname}: top_k_index must be an integer array (int32 or int64), got dtype={top_k_index.dtype}")
    if read_values:
        check_top_k_ids(kname, top_k_index)
    kernel_check(getattr(top_k_weights, "ndim", 0) == 2 and _shape(top_k_weights) == _shape(top_k_index),
                 f"{kname}: {weights_name} must be [T, TOPK]={_shape(top_k_index)}, got "
                 f"shape={_shape_of(top_k_weights)}")
    kernel_check(_dtype_name(top_k_weights) in _FLOAT_DTYPES,
                 f"{kname}: {weights_name} dtype must be one of {_FLOAT_DTYPES} (cast float64 routing weights to "
                 f"float32), got dtype={top_k_weights.dtype}")


def check_top_k_ids(kname, top_k_index):
    """Host values of wider-than-int32 ids must fit int32 (validation only: the kernels read int32 ids)."""
    if _dtype_name(top_k_index) in ("int64", "uint64", "uint32"):
        vals = _host_values(top_k_index)
        if vals is not None and vals.size:
            lo, hi = int(vals.min()), int(vals.max())
            kernel_check(lo >= _INT32_MIN and hi <= _INT32_MAX,
                         f"{kname}: top_k_index ids must fit int32 (the kernel reads int32 ids), got min={lo}, "
                         f"max={hi}")


def check_expert_offset(kname, expert_offset, n_local):
    kernel_check(isinstance(expert_offset, (int, np.integer)) and not isinstance(expert_offset, bool)
                 and 0 <= expert_offset <= _MAX_EXPERT_ID - n_local,
                 f"{kname}: expert_offset must be an int in [0, 2^24 - E={_MAX_EXPERT_ID - n_local}], "
                 f"got expert_offset={expert_offset!r}")


def _shape_of(x):
    return _shape(x) if hasattr(x, "shape") else type(x).__name__


def _check_inter(kname, label, n_inter, h_total, hidden):
    ic, n_i = intermediate_split(n_inter)
    kernel_check(n_inter >= 1 and ic is not None,
                 f"{kname}: {label} must split into ceil({label}/128) equal chunks of <= 128 rows "
                 f"({label} % ceil({label}/128) == 0), got {label}={n_inter}")
    item = 4 if _dtype_name(hidden) == "float32" else 2
    per_pp = (h_total // P_MAX * 2 * n_inter + n_i * h_total) * item
    kernel_check(per_pp <= _MAX_WEIGHT_BYTES_PP,
                 f"{kname}: one expert's weights take {per_pp} B per partition (H={h_total}, {label}={n_inter}), "
                 f"above {_MAX_WEIGHT_BYTES_PP} B; shard {label} further (tensor parallelism)")


def moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                  shared=None, top_k_index=None, expert_offset: int = 0, max_experts_per_token=None, lnc=None,
                  combine: str = "auto"):
    """Blockwise MoE on NxDI's mapping, with the optional fused sigmoid-gated shared expert.

    Dimensions:
        T tokens, H hidden, E local experts, I expert intermediate, Is shared intermediate, TOPK, B = block_size,
        N blocks, KMAX = most local experts of one token (TOPK in the top-k form).
    Args:
        hidden: [T, H] @ HBM, bf16/fp16/fp32.
        expert_affinities: dense [T, E] (local expert columns), or the top-k weights [T, TOPK] when top_k_index
            is given; bf16/fp16/fp32 (float64 is refused: cast it).
        gate_up: [E, H, 2, I] @ HBM (NxDI per-rank layout; gate then up). down: [E, I, H] @ HBM
            (`nki_kernels.moe.weights_from_transformers` converts transformers' layout).
        token_position_to_id: [N * B] int32, -1 padding; block_to_expert: [N] int32 local ids
            (from `moe_block_mapping`).
        block_size: B, 1 <= B <= 512.
        shared: optional (gate_up [H, 2, Is], down [Is, H], gate vector [H]) of the shared expert, applied to
            every token: y += sigmoid(x . w_sg) * down_s(silu(gate_s x) * up_s x).
        top_k_index: [T, TOPK] int global expert ids (selects the top-k affinity form).
        expert_offset: expert parallelism; local expert l holds global expert expert_offset + l (the top-k ids
            are compared against expert_offset + l; the mapping must use the same offset).
        max_experts_per_token: KMAX for the dense form (trace-time option, default min(E, N)); the output pass
            gathers KMAX slot rows per token, so pass the router's TOPK. In the top-k form KMAX = TOPK: only None
            or TOPK is accepted there (any other value is refused: it would have no effect).
        lnc: None (NEURON_LOGICAL_NC_CONFIG, else the target's default: 2 on trn2), 1 or 2. At LNC=2 one
            launch, the cores meeting once at a `nisa.core_barrier`: DMA combine: the blocks alternate between
            the two cores (each writes its blocks' slot rows to a shared scratch), then the 128-token row chunks
            alternate (each core writes its rows of the output); on-chip combine: each core takes a contiguous
            half of the blocks (exchanging their h.T through shared HBM), then a contiguous half of the hidden
            columns (writing those columns of the output).
        combine: "auto" (default: the rule of `choose_combine`, on shapes only), "onchip" (error if its SBUF
            plan does not fit) or "dma" (trace-time option). Both give the same values up to rounding order.
    Returns:
        [T, H] in hidden's dtype (NumPy or torch like the inputs). No argument is written.
    Constraints:
        H % 128 == 0 and 128 <= H <= 8192; I and Is split into ceil(I/128) equal chunks; one expert's weights
        <= 96 KiB per partition; mapping ids in range, each (token, expert) pair at most once, every routed
        (token, local expert) of top_k_index (or nonzero dense affinity) in the mapping, at most KMAX slots
        per token. The mapping checks read host (NumPy / CPU) values; the host also builds the inverse mapping
        `token_to_position` [T, KMAX] from the mapping (and, in the top-k form with the DMA combine, from
        top_k_index: `token_slots_topk`), as NxDI builds its mapping outside the kernel. The kernel's instruction
        sequence depends only on the shapes (N, B, T, KMAX).
    Pseudocode:
        see moe_blockwise_kernel.
    """
    kname = "moe_blockwise"
    lnc, kmax, plan = check_moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id,
                                          block_to_expert, block_size, shared, top_k_index, expert_offset,
                                          max_experts_per_token, lnc, combine)
    n_tokens = _shape(hidden)[0]
    n_local = _shape(gate_up)[0]
    tpos, b2e = _np(token_position_to_id), _np(block_to_expert)
    kernel_check(bool(np.all((b2e >= 0) & (b2e < n_local))),
                 f"{kname}: block_to_expert ids must be local expert ids in [0, E={n_local}), got "
                 f"min={int(b2e.min())}, max={int(b2e.max())}")
    kernel_check(bool(np.all((tpos >= -1) & (tpos < n_tokens))),
                 f"{kname}: token_position_to_id entries must be -1 or token ids in [0, T={n_tokens}), got "
                 f"min={int(tpos.min())}, max={int(tpos.max())}")
    aff, idx = None, None
    if top_k_index is None:
        aff = expert_affinities.reshape(n_tokens * n_local, 1)
    else:
        check_top_k_ids(kname, top_k_index)
        idx = routing_table(top_k_index, expert_affinities)
    check_mapping(kname, tpos, b2e, block_size, n_tokens, n_local, kmax, top_k_index, expert_affinities,
                  expert_offset)
    tpos32 = _as_int32(token_position_to_id)
    b2e32 = _as_int32(block_to_expert)
    inv = token_slots(tpos, n_tokens, kmax)
    s_gu, s_dn, s_g = shared if shared is not None else (None, None, None)
    if plan is not None:
        from .combine import moe_blockwise_onchip_kernel
        inv_t = inv.astype(np.uint16 if plan.index_mode == "u16" else np.uint32)
        return call(moe_blockwise_onchip_kernel, hidden, aff, gate_up, down, tpos32, b2e32, inv_t, s_gu, s_dn, s_g,
                    idx, int(block_size), int(expert_offset), plan.group_tiles, plan.index_mode, plan.x_gather,
                    plan.down_ring, lnc=lnc)
    if top_k_index is not None:   # the DMA combine applies the routing weights per top-k choice (top-k order)
        inv = token_slots_topk(tpos, b2e, _np(top_k_index), block_size, n_local, expert_offset)
    return call(moe_blockwise_kernel, hidden, aff, gate_up, down, tpos32, b2e32, inv, s_gu, s_dn, s_g, idx,
                int(block_size), int(expert_offset), lnc=lnc)


def check_moe_blockwise(hidden, expert_affinities, gate_up, down, token_position_to_id, block_to_expert, block_size,
                        shared=None, top_k_index=None, expert_offset: int = 0, max_experts_per_token=None, lnc=None,
                        combine: str = "auto"):
    """`moe_blockwise`'s checks that read no tensor values (shapes, dtypes, options, N from block_to_expert's
    shape, the SBUF plans and the combine choice), so that torch_ops' fake runs them at trace time; the mapping's
    and the ids' values are checked by the wrapper. Returns (lnc, KMAX, the on-chip combine plan or None)."""
    kname = "moe_blockwise"
    check_weights(kname, hidden, gate_up, down, shared)
    n_tokens, h_total = _shape(hidden)
    n_local = _shape(gate_up)[0]
    kernel_check(isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
                 and 1 <= block_size <= _MAX_BLOCK,
                 f"{kname}: block_size must be an int in [1, {_MAX_BLOCK}], got block_size={block_size!r}")
    check_expert_offset(kname, expert_offset, n_local)
    lnc = resolve_lnc(lnc, kname)
    for name, m in (("token_position_to_id", token_position_to_id), ("block_to_expert", block_to_expert)):
        kernel_check(hasattr(m, "shape") and hasattr(m, "dtype") and getattr(m, "ndim", 0) == 1 and is_int_dtype(m),
                     f"{kname}: {name} must be a 1-D int array, got {_shape_of(m)} "
                     f"{getattr(m, 'dtype', type(m).__name__)}")
    check_host_values(kname, "token_position_to_id", token_position_to_id)
    check_host_values(kname, "block_to_expert", block_to_expert)
    n_blocks = _shape(block_to_expert)[0]
    kernel_check(n_blocks >= 1, f"{kname}: block_to_expert must be a non-empty 1-D int array, got "
                 f"shape={_shape(block_to_expert)}")
    n_slots = _shape(token_position_to_id)[0]
    kernel_check(n_slots == n_blocks * block_size,
                 f"{kname}: token_position_to_id must hold N*B = {n_blocks}*{block_size} = {n_blocks * block_size} "
                 f"slots, got {n_slots}")
    if top_k_index is None:
        kernel_check(hasattr(expert_affinities, "shape") and _shape(expert_affinities) == (n_tokens, n_local),
                     f"{kname}: dense expert_affinities must be [T={n_tokens}, E={n_local}], got "
                     f"shape={_shape_of(expert_affinities)} (pass top_k_index for the [T, TOPK] form)")
        kernel_check(_dtype_name(expert_affinities) in _FLOAT_DTYPES,
                     f"{kname}: expert_affinities dtype must be one of {_FLOAT_DTYPES} (cast float64 affinities to "
                     f"float32), got dtype={expert_affinities.dtype}")
        kmax = min(n_local, n_blocks)
        if max_experts_per_token is not None:
            kernel_check(isinstance(max_experts_per_token, (int, np.integer)) and not isinstance(
                max_experts_per_token, bool) and 1 <= max_experts_per_token <= n_local,
                f"{kname}: max_experts_per_token must be an int in [1, E={n_local}] or None, got "
                f"max_experts_per_token={max_experts_per_token!r}")
            kmax = min(kmax, int(max_experts_per_token))
    else:
        check_top_k(kname, top_k_index, expert_affinities, n_tokens, hidden, weights_name="expert_affinities",
                    read_values=False)
        kmax = _shape(top_k_index)[1]
        # the top-k form's KMAX is TOPK (its slot tables are [T, TOPK]): another bound would have no effect
        kernel_check(max_experts_per_token is None or (
            isinstance(max_experts_per_token, (int, np.integer)) and not isinstance(max_experts_per_token, bool)
            and max_experts_per_token == kmax),
            f"{kname}: max_experts_per_token is the dense form's KMAX; with top_k_index KMAX is "
            f"TOPK={kmax} (top_k_index.shape[1]), so pass None (or {kmax}), got "
            f"max_experts_per_token={max_experts_per_token!r}")
    s_inter = _shape(shared[1])[0] if shared is not None else 0
    top_k = _shape(top_k_index)[1] if top_k_index is not None else 1
    check_sbuf_plan(kname, h_total, _shape(gate_up)[3], s_inter, int(block_size), kmax, top_k,
                    4 if _dtype_name(hidden) == "float32" else 2, dense=top_k_index is None)
    kernel_check(combine in ("auto", "onchip", "dma"),
                 f"{kname}: combine must be 'auto', 'onchip' or 'dma', got combine={combine!r}")
    plan = choose_combine(n_tokens, h_total, _shape(gate_up)[3], s_inter, n_blocks, int(block_size), kmax,
                          4 if _dtype_name(hidden) == "float32" else 2, lnc, combine)
    kernel_check(combine != "onchip" or plan is not None,
                 f"{kname}: combine='onchip' does not fit SBUF for T={n_tokens}, H={h_total}, N*B="
                 f"{n_blocks * int(block_size)} slots, KMAX={kmax} (every slot's h.T and the slot outputs of one "
                 f"128-row hidden tile must fit beside one token chunk's slot indices); use combine='auto' or 'dma'")
    return lnc, kmax, plan


class OnchipPlan(NamedTuple):
    """The on-chip combine's trace-time grouping: GT hidden tiles of 128 rows per group, and where phase B keeps
    the slot indices (`combine.INDEX_MODES`: resident uint32, resident uint16 widened per chunk, or streamed per
    128-token chunk and group), and how phase A permutes x ("onchip": a resident x.T and nc_n_gather, when it
    fits beside the rest of phase A; else "dma" row gathers), and phase B's down slices in flight
    (`combine.DOWN_RINGS`: the most that fit)."""
    group_tiles: int
    index_mode: str
    x_gather: str = "dma"
    down_ring: int = 16


def choose_combine(n_tokens, h_total, n_inter, s_inter, n_blocks, block_size, kmax, item, lnc, combine="auto",
                   target=None):
    """Trace-time choice of the combine (shapes only): an `OnchipPlan` for the on-chip combine, or None for the
    DMA combine. For each index mode (resident uint32 or uint16 when T * KMAX fits one tile - uint16 only for
    N * B < 2^16 slots -, streamed) GT is the largest group
    whose SBUF plan fits (`combine.onchip_plan_bytes`), the groups of a core's ceil(n_h / lnc) tiles balanced;
    of the plans that fit, the one `_onchip_cost_us` estimates cheaper; "auto" takes it when GT >= _MIN_GROUP_TILES
    (or the core has one tile) and `_onchip_is_faster` (the on-chip estimate below 1 - _ONCHIP_MARGIN of the DMA
    combine's, with the target's packet knee; see docs/moe.md). Phase A gathers x on chip when the plan still fits
    with the resident x.T (as the DMA combine's `onchip_x_gather`), and phase B keeps the most down slices in
    flight that still fit."""
    from .combine import DOWN_RINGS, H_TILE, INDEX_MODES, U16_SLOTS, onchip_plan_bytes
    if combine == "dma":
        return None
    n_core = -(-(h_total // H_TILE) // lnc)
    budget = sbuf_budget(target)
    plans = []
    for mode in INDEX_MODES:
        if mode != "stream" and n_tokens * kmax > _MAX_GATHER_INDICES:
            continue
        if mode == "u16" and n_blocks * block_size >= U16_SLOTS:
            continue
        fits = [gt for gt in range(1, n_core + 1)
                if onchip_plan_bytes(n_tokens, h_total, n_inter, s_inter, n_blocks, block_size, kmax, gt, item,
                                     mode) <= budget]
        if fits:
            n_groups = -(-n_core // max(fits))
            plans.append(OnchipPlan(-(-n_core // n_groups), mode))
    if not plans:
        return None
    shape = (n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc)
    knee = _dma_knee(target)
    best = min(plans, key=lambda pl: _onchip_cost_us(*shape, *pl[:2], knee=knee, target=target))
    def fits(pl):
        return onchip_plan_bytes(n_tokens, h_total, n_inter, s_inter, n_blocks, block_size, kmax, pl.group_tiles,
                                 item, pl.index_mode, pl.x_gather, pl.down_ring) <= budget
    if fits(best._replace(x_gather="onchip")):
        best = best._replace(x_gather="onchip")
    best = next(pl for pl in (best._replace(down_ring=r) for r in DOWN_RINGS) if fits(pl))
    if combine == "auto" and (best.group_tiles < min(_MIN_GROUP_TILES, n_core)
                              or not _onchip_is_faster(*shape, *best[:3], knee=knee, target=target)):
        return None
    return best


def _dma_knee(target=None) -> int:
    """The DMA packet knee (bytes) on the target (default: the current one): cost model v11's,
    `hw.DMA_FULL_RATE_ROW_BYTES` (docs/cost-model.md "v11 round"); `gate_up_parts` and the combine estimate."""
    return for_target(DMA_FULL_RATE_ROW_BYTES, target)


def _dma_eff(run_bytes: int, knee=None) -> float:
    """Fraction of the DMA peak a transfer of `run_bytes` contiguous bytes per partition row reaches under a
    packet knee of `knee` bytes (default: the current target's; 2560: 1 KiB 40%, 2 KiB 80%, >= 2.5 KiB 100%)."""
    return min(1.0, run_bytes / (knee or _dma_knee()))


def _dma_combine_us(n_tokens, h_total, n_blocks, block_size, kmax, item, lnc, knee=None) -> float:
    """What the DMA combine adds to one core's time (µs at one core's HBM rate): every slot row written to the
    scratch and each token's KMAX rows read back, (N*B + T*KMAX) * H bytes at H-byte runs."""
    row = h_total * item
    return (n_blocks * block_size + n_tokens * kmax) * row / _dma_eff(row, knee) / lnc / _CORE_HBM_BYTES_PER_US


def _onchip_cost_us(n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc, gt,
                    index_mode="u32", knee=None, target=None) -> float:
    """What the on-chip combine adds to one core's time (µs, shapes only): the down weights read and the output
    written as column slices of GT*128 (shorter runs than whole rows), the slot indices replicated on 128
    partitions (once when resident, half the bytes as uint16 but then widened per group; per group, in runs of
    one 128-token chunk's TOK_TILE * KMAX indices, when streamed), the h.T exchange, and _GATHER_EXPOSED of phase
    B's GpSimd work: the nc_n_gather time (one element per cycle + ~150 cycles per 512) and the software-DGE
    descriptors of its small down slices (`_slice_descriptor_cycles`)."""
    row = h_total * item
    n_core = -(-(h_total // P_MAX) // lnc)
    down = n_blocks * n_inter * row
    slices = (down + n_tokens * row) * (1.0 / _dma_eff(gt * P_MAX * item, knee) - 1.0 / _dma_eff(row, knee)) / lnc
    index = P_MAX * n_tokens * kmax * (2 if index_mode == "u16" else 4)
    n_groups = -(-n_core // gt)
    if index_mode == "stream":
        index *= n_groups / _dma_eff(min(TOK_TILE, n_tokens) * kmax * 4, knee)
    # "u16": each group widens every token's indices (one element per cycle, VectorE / ScalarE alternating)
    widen = n_groups * n_tokens * kmax / _DVE_GHZ / 1e3 if index_mode == "u16" else 0.0
    other = index + n_blocks * block_size * n_inter * item
    gathers = n_core * n_tokens * kmax * (1.0 + 150.0 / 512.0) / _GPSIMD_GHZ / 1e3
    descriptors = _slice_descriptor_cycles(n_core, gt, n_inter, n_blocks, item, target) / _GPSIMD_GHZ / 1e3
    return (slices + other) / _CORE_HBM_BYTES_PER_US + _GATHER_EXPOSED * (gathers + descriptors) + widen


def _slice_descriptor_cycles(n_core, gt, n_inter, n_blocks, item, target=None) -> float:
    """GpSimd cycles one core spends writing the software-DGE descriptors of the on-chip combine's down slices: for
    each group of the core's n_core hidden tiles (GT tiles, the last group the rest), max(_SWDGE_MIN_CYCLES, the
    slice's elements per partition) per slice on software DGE (`combine.swdge_slice`: a few of every 8 slices under
    64 KiB; every slice on a target without hardware DGE, `hw.SOFTWARE_DGE_ONLY_TARGETS`)."""
    from .combine import H_TILE, swdge_slice
    n_i = intermediate_split(n_inter)[1]
    every = (target or current_target_name()) in SOFTWARE_DGE_ONLY_TARGETS
    cycles = 0
    for g0 in range(0, n_core, gt):
        n_t = min(gt, n_core - g0)
        n_sw = n_blocks if every else sum(swdge_slice(n_inter, n_t * H_TILE, item, i_b) for i_b in range(n_blocks))
        cycles += n_sw * max(_SWDGE_MIN_CYCLES, n_i * n_t * H_TILE)
    return float(cycles)


def _onchip_is_faster(n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc, gt,
                      index_mode="u32", x_gather="dma", knee=None, target=None) -> bool:
    """`_onchip_cost_us` < (1 - _ONCHIP_MARGIN) x `_dma_combine_us`: the shapes-only estimate of what each combine
    adds beyond the shared work (weights; the x gather when both kernels permute x the same way, else the DMA
    combine is credited with `_x_gather_saving_us`), checked against the modeled figures of both paths on the
    model shapes (docs/moe.md)."""
    # on targets whose TensorE transposes mix rows (trn1) the on-chip combine pays VectorE work the estimate
    # does not count; keeping the DMA side's credit there picks the faster path at the registered shapes
    saving = 0.0 if x_gather == "onchip" and not mixing_pe_transpose(target) else \
        _x_gather_saving_us(n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc, knee, target)
    dma = _dma_combine_us(n_tokens, h_total, n_blocks, block_size, kmax, item, lnc, knee)
    return _onchip_cost_us(n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc, gt, index_mode, knee,
                           target) \
        < (1.0 - _ONCHIP_MARGIN) * dma - saving


def _x_gather_saving_us(n_tokens, h_total, n_inter, n_blocks, block_size, kmax, item, lnc,
                        knee=None, target=None) -> float:
    """What the DMA-combine kernel's on-chip x gather (`onchip_x_gather`, when it fits) saves one core against
    an on-chip combine plan that gathers x by DMA (its resident x.T does not fit beside the rest; on trn1 credited
    whatever the plan, `_onchip_is_faster`): every slot's x row (N*B rows of H at H-byte runs, split over the
    cores) minus x loaded once per core."""
    if not onchip_x_gather(n_tokens, h_total, n_inter, block_size, kmax, item, target):
        return 0.0
    row = h_total * item
    moved = n_blocks * block_size * row / _dma_eff(row, knee) / lnc - n_tokens * row
    return max(0.0, moved) / _CORE_HBM_BYTES_PER_US


def check_mapping(kname, tpos, b2e, block_size, n_tokens, n_local, kmax, top_k_index, expert_affinities,
                  expert_offset):
    """Host validation of the mapping (never used to specialize the kernel): each (token, local expert) pair at
    most once, at most KMAX slots per token, and every routed pair present: in the top-k form the pairs equal
    top_k_index's local choices; in the dense form every nonzero affinity has a slot. Skipped for values that
    are not on the host (device tensors)."""
    tok = tpos.astype(np.int64).reshape(-1)
    exp = np.repeat(b2e.astype(np.int64), block_size)
    used = tok >= 0
    codes = tok[used] * n_local + exp[used]
    pairs, counts = np.unique(codes, return_counts=True)
    if np.any(counts > 1):
        c = int(pairs[np.argmax(counts > 1)])
        kernel_check(False, f"{kname}: the mapping lists token {c // n_local} more than once for local expert "
                     f"{c % n_local} (a token may take one slot per expert)")
    if top_k_index is not None:
        idx = _host_values(top_k_index)
        if idx is None:
            return
        loc = idx.astype(np.int64) - int(expert_offset)
        local = (loc >= 0) & (loc < n_local)
        t_ids = np.broadcast_to(np.arange(n_tokens)[:, None], loc.shape)
        want = np.unique(t_ids[local] * n_local + loc[local])
        if not np.array_equal(want, pairs):
            extra = np.setdiff1d(pairs, want)
            missing = np.setdiff1d(want, pairs)
            if missing.size:
                c = int(missing[0])
                what = f"token {c // n_local} routed to local expert {c % n_local} has no slot in the mapping"
            else:
                c = int(extra[0])
                what = f"the mapping puts token {c // n_local} in local expert {c % n_local}'s block, which its " \
                       f"top_k_index row does not select"
            kernel_check(False, f"{kname}: token_position_to_id / block_to_expert do not match top_k_index "
                         f"(expert_offset={expert_offset}): {what}")
    per_token = np.bincount(tok[used], minlength=n_tokens)
    if per_token.size and per_token.max() > kmax:
        t = int(np.argmax(per_token))
        kernel_check(False, f"{kname}: token {t} has {int(per_token[t])} slots in the mapping, above KMAX={kmax} "
                     f"(TOPK in the top-k form, else max_experts_per_token or min(E, N))")
    if top_k_index is not None:
        return
    aff = _host_values(expert_affinities)
    if aff is None:
        return
    t_nz, e_nz = np.nonzero(aff.reshape(n_tokens, n_local) != 0)
    missing = np.setdiff1d(t_nz.astype(np.int64) * n_local + e_nz, pairs)
    if missing.size:
        c = int(missing[0])
        kernel_check(False, f"{kname}: expert_affinities[{c // n_local}, {c % n_local}] is nonzero but the mapping "
                     f"has no slot for token {c // n_local} in local expert {c % n_local} (it would be dropped)")


def token_slots(token_position_to_id, n_tokens: int, kmax: int) -> np.ndarray:
    """Inverse of the mapping: [T, KMAX] int32, the slots holding each token in ascending slot order, padded with
    N * B (the kernel's all-zero scratch row). KMAX is static (a shape: TOPK, or the dense form's bound), so the
    kernel's instruction sequence does not depend on the routing. Host bookkeeping of the same kind as building
    the mapping (the counts are validated against KMAX by `check_mapping`)."""
    tpos = _np(token_position_to_id).astype(np.int64).reshape(-1)
    n_slots = tpos.size
    pos = np.nonzero(tpos >= 0)[0]
    toks = tpos[pos]
    counts = np.bincount(toks, minlength=n_tokens)
    order = np.argsort(toks, kind="stable")
    toks, pos = toks[order], pos[order]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(toks.size) - first[toks]
    inv = np.full((n_tokens, max(1, int(kmax))), n_slots, dtype=np.int64)
    inv[toks, rank] = pos
    return inv.astype(np.int32)


def token_slots_topk(token_position_to_id, block_to_expert, top_k_index, block_size: int, n_local: int,
                     expert_offset: int) -> np.ndarray:
    """Inverse of the mapping in top-k order: [T, TOPK] int32, entry (t, j) the slot holding token t for its j-th
    choice top_k_index[t, j] (N * B, the all-zero scratch row, where that expert is not local). Host bookkeeping
    of the same kind as `token_slots` (the pairs are validated by `check_mapping`), so the kernel weights slot
    (t, j) by top_k_weights[t, j] read in token order."""
    tpos = _np(token_position_to_id).astype(np.int64).reshape(-1)
    n_slots = tpos.size
    idx = np.asarray(top_k_index).astype(np.int64) - int(expert_offset)
    used = np.nonzero(tpos >= 0)[0]
    codes = tpos[used] * n_local + np.repeat(_np(block_to_expert).astype(np.int64), block_size)[used]
    order = np.argsort(codes, kind="stable")
    codes, used = codes[order], used[order]
    local = (idx >= 0) & (idx < n_local)
    want = np.arange(idx.shape[0])[:, None] * n_local + np.where(local, idx, 0)
    at = np.minimum(np.searchsorted(codes, want), max(0, codes.size - 1))
    found = local & (codes.size > 0) & (codes[at] == want) if codes.size else np.zeros_like(local)
    inv = np.where(found, used[at] if codes.size else 0, n_slots)
    return inv.astype(np.int32)


def routing_table(top_k_index, top_k_weights):
    """[T, 2 TOPK] float32: the top-k ids (as fp32: exact below 2^24, and an id above can never round onto a
    local expert's id, which is below 2^24) then the weights, so one indirect DMA gathers a slot's routing row.
    A concatenation and cast (torch.cat on device tensors), no value-dependent work. The inputs pass the checks
    `call` makes (forward-only, tensors with data), named as the wrapper's arguments."""
    from ..validation import check_forward_only
    for name, x in (("top_k_index", top_k_index), ("expert_affinities", top_k_weights)):
        check_forward_only("moe_blockwise", name, x)
        kernel_check(str(getattr(x, "device", "cpu")) != "meta",
                     f"moe_blockwise: {name} must hold data (a meta tensor has none), got a tensor on meta")
    try:
        import torch
        if isinstance(top_k_index, torch.Tensor) or isinstance(top_k_weights, torch.Tensor):
            return torch.cat((torch.as_tensor(top_k_index).to(torch.float32),
                              torch.as_tensor(top_k_weights).to(torch.float32)), dim=1).contiguous()
    except ImportError:  # pragma: no cover
        pass
    return np.ascontiguousarray(np.concatenate((np.asarray(top_k_index).astype(np.float32),
                                                np.asarray(top_k_weights).astype(np.float32)), axis=1))


def _as_int32(x):
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.to(torch.int32).contiguous()
    except ImportError:  # pragma: no cover
        pass
    return np.ascontiguousarray(np.asarray(x).astype(np.int32))
