"""Packed variable-length flash attention (flash-attn `flash_attn_varlen_func` layout), head_dim up to 256.

q [Tq, Hq, D] and k, v [Tk, Hkv, D] hold N sequences end to end; `cu_seqlens_q` / `cu_seqlens_k` [N+1] int32
give their boundaries. Query row r of sequence s sees the keys of sequence s only: all of them (causal=False, the
Qwen3-Omni vision / audio encoders' block-diagonal attention), or bottom-right aligned causal (sequence s may have
more keys than queries: chunked prefill after a cached prefix).

Traced once: the compiled program depends on Tq, Tk, N, Hq, Hkv, D, the dtype and the trace-time options, never
on the values of `cu_seqlens_*`. Which key blocks a query tile visits is data, and it is decided on the device:

    once:            cu_seqlens_q, cu_seqlens_k -> [128, N+1] fp32 on every partition (stride-0 DMA);
                     per-sequence key lengths lenk_i (and query lengths lenq_i for causal)
    per KV head:     K^T and V resident in SBUF (natural-layout loads, PE transposes), padded with zeros to whole
                     256-key blocks (B); non-finite V values are zeroed and their key's K row set to NaN, so a
                     non-finite k or v reaches exactly the rows that see that key (its own sequence)
    every query tile at once (one pass over [128, 3 x tiles] row columns):
                     row r -> lo_r = cu_k[s(r)] = sum_i [cu_q[i] <= r] lenk_i,  end_r = cu_k[s(r)+1],
                     hi_r = end_r (non-causal) or r + end_r - cu_q[s(r)+1] + 1 (causal); kept as
                     mid_r = (lo_r + hi_r - 1) / 2, half_r = (hi_r - lo_r) / 2 for the block masks.
                     lo_r and hi_r never decrease with r, so the tile's keys lie in [lo_first, hi_last): the key
                     blocks jb0 = floor(lo_first / B) .. jb1 = ceil(hi_last / B), clamped to the padded
                     K/V, go to two virtual registers (nisa.register_load)
    nl.fori_loop(jb0, jb1) over key blocks j (a compiled loop: one copy of the body, trip count from data):
                     K^T and V of block j -> rotating SBUF tiles by DMA at the register offset (scalar_offset=j)
                     visible = |k0 + col - mid_r| < half_r (k0 = B j, a loop-carried [128, 1] counter)
                     for each query head of the KV head's group (they share the block):
                         S = Q K^T; select(visible, S, MASK_BIAS) (not an additive bias: a NaN score of another
                         sequence's key is replaced, not added to); online softmax with loop-carried statistics
                         (m, l, O per head); P^T by PE transposes; O += P V
    after the loop:  out = O / l (rows that see no key: 0), optionally * sigmoid(gate)
    q^T, gate and out of a query tile move for all heads of the KV group in one DMA each

Fully masked key blocks (another sequence's keys) are never loaded into the working tiles nor multiplied: a query
tile costs the blocks its own sequences span. Rows that see no key at all (a sequence with queries and no keys,
causal=False) give 0; a query tile of such rows only runs no iteration.

Short packs (Tq, Tk <= 512, 2-byte, NeuronCore-v3+: `short_tiles.tile_short_varlen_path`, shapes only) take the
tile-major body instead (`short_tiles.tile_short_varlen_body`): every query tile over its static key chunks, each
row's [lo_r, hi_r) (`packed_row_bounds`) as the two bounds of one range_select; the wrapper keeps the per-sequence
windows for non-causal packs they fit (docs/attention.md, "Short packs, tile-major").
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..validation import check_same_kind, is_int_dtype, kernel_check
from ._common import (D_CHUNK, FLOAT_DTYPES, K_CHUNK, MASK_BIAS, MAX_HEAD_DIM, MM_KEYS,
                      exact_transpose, is_two_byte, load_transposed, n_tiles, pe_transpose_group, pe_transpose_keys)
from .prefill import (_IO_ROW_BYTES, _Q_TILE, _attend_pipeline, _check_array, _check_scale, _dtype_name,
                      _read_only, _shape)
from .short_tiles import tile_short_varlen_body, tile_short_varlen_path

MAX_SEQS = 512                    # N limit: cu_seqlens as [128, N+1] fp32 rows; the row-bounds test runs in pieces
MAX_PACKED_Q = 512 * 128          # Tq limit of the packed loop mode: the row bounds keep 24 B per query tile and
#                                   partition for the whole kernel (~92 B while computed), next to the largest K/V
_KV_PIECE = 2048                  # keys per K / V load and containment pass (16 chunks of 128)
_SBUF_KV_BUDGET = 112 * 1024      # bytes per partition for K^T + V of one KV head (the rest: loop tiles, staging)
_BLOCK = MM_KEYS                  # keys per block of the window mode (the prefill pipeline's block: one fp32 PSUM bank)
_LOOP_BLOCK = 256                 # keys per iteration of the packed loop: half of _BLOCK, so that a tile's first and
#                                   last blocks, partly another sequence's or above the diagonal, waste half as much
_BLOCK_SHIFT = _LOOP_BLOCK.bit_length() - 1   # log2(_LOOP_BLOCK): block index = key >> 8
_N_CH = _LOOP_BLOCK // K_CHUNK    # 128-key chunks per loop block (P^T transposes, PV matmuls)
_PE_T_CHUNKS = _N_CH              # chunks of P transposed on the PE (the rest by DMA transpose): all of them (an
#                                   SBUF -> SBUF DMA transpose of P is element-strided: with half of P^T by DMA the
#                                   Qwen3.5 8-packed case modeled 807 us instead of 418, DMA-bound)
_BOUNDS_ELEMS = 2048              # fp32 elements per partition of the row-bounds sequence test (8 KiB)
_STAT_INIT = 3.0e38               # initial -scale * running max: exp(-3e38 + x) = 0 wipes the first rescale
_MAX_GROUP = 16                   # query heads per KV head handled together (the O accumulators: 16 x 1 KiB)
_Q_STAGE_BYTES = 8 * 1024         # per partition: Q of a window's tiles staged for all heads of a KV-head batch
_WINDOW_TILE_RATIO = 1.25         # windows when they run at most 1.25x the packed query tiles (the rule: windows_plan)


def kv_resident_bytes(tk: int, d: int, itemsize: int) -> int:
    """Bytes per partition kept resident for one KV head (K^T and V, padded to whole loop blocks)."""
    keys = n_tiles(tk, _LOOP_BLOCK) * _LOOP_BLOCK
    return n_tiles(d, D_CHUNK) * keys * itemsize + (keys // K_CHUNK) * d * itemsize


@nki.jit
def flash_attention_varlen_kernel(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """Packed-sequence attention: out[r] = softmax(scale * q[r] K_s^T + mask) V_s for r in sequence s.

    Dimensions:
        Tq packed queries, Tk packed keys, N sequences, Hq query heads, Hkv KV heads (Hq % Hkv == 0), D head dim.
    Args:
        q: [Tq, Hq, D] @ HBM, bf16/fp16/fp32.   k, v: [Tk, Hkv, D] @ HBM, q's dtype.
        gate: [Tq, Hq, D] @ HBM or None: out * sigmoid(gate).
        cu_seqlens_q: [N+1] int32 @ HBM, 0 = cu[0] <= cu[1] <= ... <= cu[N] = Tq.  cu_seqlens_k: same for Tk.
        softmax_scale: float (trace-time).  causal: bool (trace-time), bottom-right aligned per sequence.
    Returns:
        out: [Tq, Hq, D] @ HBM, q's dtype; rows that see no key (a sequence with queries and no keys) are 0.
    """
    tq, n_hq, d = q.shape
    out = nl.ndarray((tq, n_hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    varlen_body(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, out, softmax_scale, causal)
    return out


def _work(n_kv, n_q_tiles, pid, n_prog):
    """(KV head, query tile) pairs this program instance computes: whole KV heads per core when they divide
    evenly (no duplicated K/V loads), else query tiles interleaved (each core loads every KV head)."""
    if n_prog == 1 or n_kv % n_prog == 0:
        return [(kvh, i_q) for kvh in range(n_kv) if kvh % n_prog == pid for i_q in range(n_q_tiles)]
    return [(kvh, i_q) for kvh in range(n_kv) for i_q in range(n_q_tiles) if i_q % n_prog == pid]


def varlen_body(q, k, v, gate, cu_q, cu_k, out, softmax_scale, causal):
    tq, n_hq, d = q.shape
    tk, n_kv, _ = k.shape
    if tile_short_varlen_path(tq, tk, d, q.dtype, causal):     # Tq, Tk <= 512, 2-byte, NeuronCore-v3+: tile-major
        tile_short_varlen_body(q, k, v, gate, cu_q, cu_k, out, softmax_scale, causal)
        return
    group = n_hq // n_kv
    dtype = q.dtype
    n_d = n_tiles(d, D_CHUNK)
    n_q_tiles = n_tiles(tq, _Q_TILE)
    work = _work(n_kv, n_q_tiles, nl.program_id(0), nl.num_programs(0))
    if not work:
        return
    q_h, out_h, k_h, v_h = heads_view(q), heads_view(out), heads_view(k), heads_view(v)
    gate_h = None if gate is None else heads_view(gate)
    rows = _PackedRows(cu_q, cu_k, tq, causal, sorted({i_q for _, i_q in work}), n_tiles(tk, _LOOP_BLOCK))
    for kvh in sorted({h for h, _ in work}):
        kT_sb, v_sb = _load_kv_blocks(k_h, v_h, kvh, tk, d, n_d, dtype)
        for i_q in [i for h, i in work if h == kvh]:
            _attend_tile(q, q_h, gate_h, out_h, kT_sb, v_sb, rows, kvh * group, group, i_q, tq, d, n_d, dtype,
                         softmax_scale)


def _load_kv_blocks(k_h, v_h, kvh, tk, d, n_d, dtype):
    """K^T [128(d), n_d, n_blk, B] and V [128(keys), n_blk, B/128, D] of one KV head in SBUF, keys beyond Tk zero
    (a loop iteration copies one whole block at a register offset)."""
    n_blk = n_tiles(tk, _LOOP_BLOCK)
    kT_sb = nl.ndarray((P_MAX, n_d, n_blk, _LOOP_BLOCK), dtype=dtype, buffer=nl.sbuf)
    v_sb = nl.ndarray((P_MAX, n_blk, _N_CH, d), dtype=dtype, buffer=nl.sbuf)
    keys = n_blk * _LOOP_BLOCK
    kT_flat = kT_sb.reshape((P_MAX, n_d, keys))
    v_flat = v_sb.reshape((P_MAX, keys // K_CHUNK, d))
    if tk < keys:                       # zero the padding first (the loads then overwrite the partial chunk)
        c_pad = tk // K_CHUNK
        nisa.memset(dst=v_flat[:, c_pad:keys // K_CHUNK, :], value=0.0, engine=nisa.engine.gpsimd)
        nisa.memset(dst=kT_flat[:, :, tk:keys], value=0.0, engine=nisa.engine.gpsimd)
    _load_kv_contained(k_h, v_h, kvh, tk, d, n_d, dtype, kT_flat, v_flat)
    return kT_sb, v_sb


class _PackedRows:
    """Per-row key intervals [lo_r, hi_r) of the packed sequences, computed on device once for every query tile
    of the kernel at the same time (shared by every head): (mid_r, half_r, valid_r) for the block masks, and each
    tile's key-block range for the loop.

    All tiles in one pass: the rows are a [128, 3, n_q_tiles] fp32 tile (row 128 t + p; the first row of tile t;
    its last row, on every partition), the sequence test [cu_q[i] <= r] a [128, 3 n_q_tiles, N+1] tile (the
    cu_seqlens row read with a stride-0 pattern over the rows), and the weighted sums below one multiply and one
    reduce each, in pieces of at most _BOUNDS_ELEMS / (N+1) row columns: about twenty small instructions while
    3 n_q_tiles <= 2048 / (N+1), about eight more per further piece."""

    def __init__(self, cu_q, cu_k, tq, causal, tiles, n_blk):
        n1 = cu_q.shape[0]
        self.n = n1 - 1
        self.causal = causal
        self.n_blk = n_blk
        # this core's query tiles: every tile, or every n_prog-th (_work): an arithmetic progression t0 + k step
        m = len(tiles)
        t0, t_step = tiles[0], (tiles[1] - tiles[0] if m > 1 else 1)
        if t_step <= 0 or list(tiles) != list(range(t0, t0 + m * t_step, t_step)):    # a schedule bug, not input
            raise RuntimeError(f"_PackedRows: the query tiles must be evenly spaced (the iota rows assume it), "
                               f"got {tiles}")
        self.local = {t: k for k, t in enumerate(tiles)}
        f32 = nl.float32
        seqs = _seq_tables(cu_q, cu_k, causal)
        # key offset of each score column within a block (0..511), shared by every block
        col_i = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(col_i, pattern=[[1, _LOOP_BLOCK]], offset=0, channel_multiplier=0)
        self.col = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=self.col, src=col_i, engine=nisa.engine.gpsimd)
        # rows of tile t: [:, 0, k] = 128 t + p, [:, 1, k] = 128 t (first row), [:, 2, k] = min(128 t + 127, Tq - 1)
        # (last row), t = t0 + k step
        r_i = nl.ndarray((P_MAX, 3, m), dtype=nl.int32, buffer=nl.sbuf)
        for c, (off, cm) in enumerate(((0, 1), (0, 0), (_Q_TILE - 1, 0))):
            nisa.iota(r_i[:, c, :], pattern=[[_Q_TILE * t_step, m]], offset=off + _Q_TILE * t0, channel_multiplier=cm)
        r = nl.ndarray((P_MAX, 3 * m), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=r, src=r_i.reshape((P_MAX, 3 * m)), engine=nisa.engine.gpsimd)
        nisa.tensor_scalar(dst=r[:, 2 * m:3 * m], data=r[:, 2 * m:3 * m], op0=nl.minimum, operand0=float(tq - 1))
        lo = nl.ndarray((P_MAX, 3 * m), dtype=f32, buffer=nl.sbuf)
        hi = nl.ndarray((P_MAX, 3 * m), dtype=f32, buffer=nl.sbuf)
        _row_intervals(seqs, r, 3 * m, lo, hi)
        # per query tile: mid_r, half_r, valid_r, and the first key of the first block (k0) on every partition
        self.bounds = nl.ndarray((P_MAX, m, 4), dtype=f32, buffer=nl.sbuf)
        b = self.bounds
        nisa.scalar_tensor_tensor(dst=b[:, :, 0], data=hi[:, 0:m], op0=nl.add, operand0=-1.0, op1=nl.add,
                                  operand1=lo[:, 0:m])
        nisa.tensor_scalar(dst=b[:, :, 0], data=b[:, :, 0], op0=nl.multiply, operand0=0.5)
        nisa.tensor_tensor(dst=b[:, :, 1], data1=hi[:, 0:m], data2=lo[:, 0:m], op=nl.subtract)
        nisa.tensor_scalar(dst=b[:, :, 1], data=b[:, :, 1], op0=nl.multiply, operand0=0.5)
        nisa.tensor_scalar(dst=b[:, :, 2], data=b[:, :, 1], op0=nl.greater, operand0=0.0)
        # key blocks of tile t: jb0 = floor(lo(first row) / B), jb1 = ceil(hi(last row) / B), both clamped
        # to [0, n_blk] (so no DMA offset can leave K^T / V whatever cu_seqlens hold); int32 on partition 0
        jb = nl.ndarray((P_MAX, 2, m), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=jb[:, 0, :], src=lo[:, m:2 * m])
        nisa.tensor_scalar(dst=jb[:, 1, :], data=hi[:, 2 * m:3 * m], op0=nl.add, operand0=float(_LOOP_BLOCK - 1))
        nisa.tensor_scalar(dst=jb, data=jb, op0=nl.maximum, operand0=0.0, op1=nl.minimum,
                           operand1=float(n_blk * _LOOP_BLOCK))
        # exact integers: floor(x / B) by an arithmetic shift on int32 (ceil for hi by the + B - 1 above)
        jb_i = nl.ndarray((P_MAX, 2, m), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=jb_i, src=jb)
        self.blocks = nl.ndarray((1, 2, m), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=self.blocks, data=jb_i[0:1], op0=nl.right_shift, operand0=_BLOCK_SHIFT)
        k0_i = nl.ndarray((P_MAX, m), dtype=nl.int32, buffer=nl.sbuf)                    # B * jb0
        nisa.tensor_scalar(dst=k0_i, data=jb_i[:, 0, :], op0=nl.right_shift, operand0=_BLOCK_SHIFT,
                           op1=nl.left_shift, operand1=_BLOCK_SHIFT)
        nisa.tensor_copy(dst=b[:, :, 3], src=k0_i)

    def block_range(self, i_q):
        """(jb0, jb1) as virtual registers (loaded from SBUF on the device)."""
        regs = []
        for c in range(2):
            r = nisa.register_alloc()
            k = self.local[i_q]
            nisa.register_load(r, self.blocks[0:1, c, k:k + 1])
            regs.append(r)
        return regs

    def visible(self, vis, k0_f, i_q, qn):
        """vis [qn, B] = 1.0 where key k0 + c lies in [lo_r, hi_r): |k0 + c - mid_r| < half_r (GpSimd)."""
        b = self.bounds[0:qn, self.local[i_q]]
        dist = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=dist[0:qn], data=self.col[0:qn], op0=nl.add, operand0=k0_f[0:qn],
                           op1=nl.subtract, operand1=b[:, 0:1], engine=nisa.engine.gpsimd)
        nisa.tensor_scalar(dst=vis[0:qn], data=dist[0:qn], op0=nl.abs_max, operand0=0.0, op1=nl.less,
                           operand1=b[:, 1:2], engine=nisa.engine.gpsimd)


def _attend_tile(q, q_h, gate_h, out_h, kT_sb, v_sb, rows, h0, group, i_q, tq, d, n_d, dtype, scale):
    """One query tile of the `group` query heads h0 .. h0 + group - 1 (one KV head) over its key blocks.

    q, gate and out of the tile move for all `gn` heads of a group in one DMA each (the heads of a KV group are
    adjacent in [T, H, D]: one gn * D run per row, 2 KiB for bf16, D=256, 4 heads, instead of 512 B per head);
    Q^T by one DMA transpose for 2-byte dtypes with D a multiple of 128, else per head and 128-row chunk."""
    q0 = i_q * _Q_TILE
    qn = min(_Q_TILE, tq - q0)
    for g0 in range(0, group, _MAX_GROUP):
        gn = min(_MAX_GROUP, group - g0)
        hs = h0 + g0
        qT = nl.ndarray((P_MAX, n_d, gn, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
        if is_two_byte(dtype) and d % D_CHUNK == 0:
            # reshape the contiguous [Tq, Hq, D] tensor first (a reshape of a permuted view is not portable NKI),
            # then slice and permute: [qn, n_d, gn, 128]
            src = q.reshape((tq, q.shape[1], n_d, D_CHUNK))[q0:q0 + qn, hs:hs + gn].permute((0, 2, 1, 3))
            nisa.dma_transpose(dst=qT[0:D_CHUNK, 0:n_d, 0:gn, 0:qn], src=src)
        else:
            for g in range(gn):
                for i_d in range(n_d):
                    d0 = i_d * D_CHUNK
                    dn = min(D_CHUNK, d - d0)
                    load_transposed(qT[0:dn, i_d, g, 0:qn], q_h[hs + g, q0:q0 + qn, d0:d0 + dn], qn, dn, dtype)
        # gate and out staged in runs of heads of at most _IO_ROW_BYTES per partition row (16 fp32 heads of D=256
        # at once would be 16 KiB each, beyond trn1's SBUF at the largest accepted Tk); the first run's gate
        # before the loop (its DMA overlaps the loop), the others' after it
        runs = _io_runs(gn, d, [dtype] + ([] if gate_h is None else [gate_h.dtype]))
        gate_sb = None if gate_h is None else _load_gate(gate_h, hs, runs[0], q0, qn, d)
        state = _LoopState(gn, qn, d)
        k0_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)        # first key of the current block
        nisa.tensor_copy(dst=k0_f[0:qn], src=rows.bounds[0:qn, rows.local[i_q], 3:4])
        jb0, jb1 = rows.block_range(i_q)

        def body(j):
            _block_step(j, kT_sb, v_sb, qT, state, rows, k0_f, i_q, qn, gn, d, n_d, dtype, scale)
        nl.fori_loop(jb0, jb1, body)
        for r0, rn in runs:
            if gate_h is not None and r0 > 0:
                gate_sb = _load_gate(gate_h, hs, (r0, rn), q0, qn, d)
            o_sb = nl.ndarray((P_MAX, rn, d), dtype=dtype, buffer=nl.sbuf)
            for g in range(rn):
                _finish(o_sb[0:qn, g, :], gate_sb, state, rows, r0 + g, g, i_q, qn, d)
            nisa.dma_copy(dst=out_h[hs + r0:hs + r0 + rn, q0:q0 + qn, 0:d].permute((1, 0, 2)), src=o_sb[0:qn])


def _io_runs(gn, d, dtypes):
    """[(first head, heads)] of a group of gn heads in runs of at most _IO_ROW_BYTES per partition row at the
    largest itemsize of `dtypes` (out's and gate's; at least one head per run): 4 heads of bf16 D=256, 2 of fp32."""
    itemsize = max(2 if is_two_byte(t) else 4 for t in dtypes)
    cap = max(1, _IO_ROW_BYTES // (d * itemsize))
    return [(r0, min(cap, gn - r0)) for r0 in range(0, gn, cap)]


def _load_gate(gate_h, hs, run, q0, qn, d):
    """gate of heads hs + r0 .. hs + r0 + rn - 1 of a query tile -> [qn, rn, D] in SBUF (one DMA)."""
    r0, rn = run
    gate_sb = nl.ndarray((P_MAX, rn, d), dtype=gate_h.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gate_sb[0:qn], src=gate_h[hs + r0:hs + r0 + rn, q0:q0 + qn, 0:d].permute((1, 0, 2)))
    return gate_sb


class _LoopState:
    """Loop-carried online-softmax state of `gn` heads: -scale * running max, row sums, fp32 output accumulators."""

    def __init__(self, gn, qn, d):
        self.neg_m = nl.ndarray((P_MAX, gn), dtype=nl.float32, buffer=nl.sbuf)
        self.l = nl.ndarray((P_MAX, gn), dtype=nl.float32, buffer=nl.sbuf)
        self.o = nl.ndarray((P_MAX, gn, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=self.neg_m[0:qn], value=_STAT_INIT, engine=nisa.engine.gpsimd)
        nisa.memset(dst=self.l[0:qn], value=0.0, engine=nisa.engine.gpsimd)
        nisa.memset(dst=self.o[0:qn], value=0.0, engine=nisa.engine.gpsimd)


def _block_step(j, kT_sb, v_sb, qT, state, rows, k0_f, i_q, qn, gn, d, n_d, dtype, scale):
    """Loop body for key block j (a register): fetch K^T / V of the block, mask, and update every head."""
    n_blk = kT_sb.shape[2]
    kT_blk = nl.ndarray((P_MAX, n_d, _LOOP_BLOCK), dtype=dtype, buffer=nl.sbuf)
    row = n_d * n_blk * _LOOP_BLOCK                          # elements per partition of kT_sb
    # one DMA for every d chunk when they have the same rows, else one per chunk (D = 129..255, D % 128 != 0)
    pieces = [(0, n_d, min(P_MAX, d))] if d % D_CHUNK == 0 or n_d == 1 else \
        [(i_d, 1, min(D_CHUNK, d - i_d * D_CHUNK)) for i_d in range(n_d)]
    for i_d, nd, dn in pieces:
        nisa.dma_copy(dst=kT_blk[0:dn, i_d:i_d + nd], src=kT_sb.ap(
            pattern=[[row, dn], [n_blk * _LOOP_BLOCK, nd], [1, _LOOP_BLOCK]], offset=i_d * n_blk * _LOOP_BLOCK,
            scalar_offset=j, indirect_dim=2))
    v_blk = nl.ndarray((P_MAX, _N_CH, d), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=v_blk.reshape((P_MAX, _N_CH * d)), src=v_sb.ap(   # one contiguous run per partition
        pattern=[[n_blk * _N_CH * d, P_MAX], [1, _N_CH * d]], offset=0, scalar_offset=j, indirect_dim=1))
    vis = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
    rows.visible(vis, k0_f, i_q, qn)
    nisa.tensor_scalar(dst=k0_f[0:qn], data=k0_f[0:qn], op0=nl.add, operand0=float(_LOOP_BLOCK))
    # the block's statistics of every head in one tile per iteration ([:, 0]: -rowmax, 1: new -scale * max,
    # 2: alpha, 3: row sum): a per-head tile would rotate through the loop's buffers once per head and hold the
    # next heads back until the O update at the end of each head's chain
    stats = nl.ndarray((P_MAX, 4, gn), dtype=nl.float32, buffer=nl.sbuf)
    # the heads run skewed in program order, as a software pipeline of four stages (QK; mask and softmax; P^T;
    # P V and the O update): each engine's next instruction is then from another head than the one it waits on
    live = {}
    for step in range(gn + _HEAD_STAGES - 1):
        for stage in range(_HEAD_STAGES):
            g = step - stage
            if 0 <= g < gn:
                _HEAD_STEPS[stage](live, g, kT_blk, v_blk, qT, state, vis, stats, qn, d, n_d, dtype, scale)
    l_ = state.l[0:qn]                                       # l = alpha l + row sum, every head at once
    nisa.tensor_tensor(dst=l_, data1=l_, data2=stats[0:qn, 2, :], op=nl.multiply)
    nisa.tensor_tensor(dst=l_, data1=l_, data2=stats[0:qn, 3, :], op=nl.add)


def _head_scores(live, g, kT_blk, v_blk, qT, state, vis, stats, qn, d, n_d, dtype, scale):
    """S = Q K^T of head g over the block (fp32 PSUM)."""
    s_psum = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=nl.float32, buffer=nl.psum)
    for i_d in range(n_d):
        dn = min(D_CHUNK, d - i_d * D_CHUNK)
        nisa.nc_matmul(s_psum[0:qn], qT[0:dn, i_d, g, 0:qn], kT_blk[0:dn, i_d, :], accumulate=i_d > 0)
    live[g] = s_psum


def _head_softmax(live, g, kT_blk, v_blk, qT, state, vis, stats, qn, d, n_d, dtype, scale):
    """Masked by select; running max, alpha, P = exp(scale S + neg_m) with its row sum."""
    masked = nl.where(vis[0:qn], live[g][0:qn], MASK_BIAS)
    m_blk, nm_new, alpha, row_sum = (stats[0:qn, i, g:g + 1] for i in range(4))
    nisa.tensor_reduce(dst=m_blk, op=nl.maximum, data=masked, axis=1, negate=True)
    nisa.tensor_scalar(dst=nm_new, data=m_blk, op0=nl.multiply, operand0=scale, op1=nl.minimum,     # min(neg_m,
                       operand1=state.neg_m[0:qn, g:g + 1], engine=nisa.engine.gpsimd)              # -scale max)
    nisa.activation(dst=alpha, op=nl.exp, data=state.neg_m[0:qn, g:g + 1], bias=nm_new, scale=-1.0)  # e^(new-old)
    nisa.tensor_copy(dst=state.neg_m[0:qn, g:g + 1], src=nm_new, engine=nisa.engine.gpsimd)
    p_sb = nl.ndarray((P_MAX, _LOOP_BLOCK), dtype=dtype, buffer=nl.sbuf)
    nisa.activation(dst=p_sb[0:qn], op=nl.exp, data=masked, bias=nm_new, scale=scale, reduce_op=nl.add,
                    reduce_res=row_sum, reduce_cmd=nisa.reduce_cmd.reset_reduce)
    live[g] = p_sb


def _head_transpose(live, g, kT_blk, v_blk, qT, state, vis, stats, qn, d, n_d, dtype, scale):
    live[g] = _probs_transposed(live[g], qn, dtype)


def _head_pv(live, g, kT_blk, v_blk, qT, state, vis, stats, qn, d, n_d, dtype, scale):
    """O = alpha O + P V."""
    pT = live.pop(g)
    pv_psum = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.psum)
    for c in range(_N_CH):
        nisa.nc_matmul(pv_psum[0:qn], pT[:, c, 0:qn], v_blk[:, c, :], accumulate=c > 0)
    o = state.o[0:qn, g, :]
    nisa.scalar_tensor_tensor(dst=o, data=o, op0=nl.multiply, operand0=stats[0:qn, 2, g:g + 1], op1=nl.add,
                              operand1=pv_psum[0:qn])


_HEAD_STEPS = (_head_scores, _head_softmax, _head_transpose, _head_pv)
_HEAD_STAGES = len(_HEAD_STEPS)


def _probs_transposed(p_sb, qn, dtype):
    """P^T [128(keys), 4, 128(rows)]: chunks 0.._PE_T_CHUNKS-1 on the PE (one PSUM bank, evicted by ScalarE), the
    rest (bf16/fp16 only) by one SBUF->SBUF DMA transpose."""
    pT = nl.ndarray((P_MAX, _N_CH, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
    n_pe = _PE_T_CHUNKS if is_two_byte(dtype) else _N_CH
    t_psum = nl.ndarray((P_MAX, n_pe, _Q_TILE), dtype=dtype, buffer=nl.psum)
    for c in range(n_pe):
        exact_transpose(t_psum[:, c, 0:qn], p_sb[0:qn, c * K_CHUNK:(c + 1) * K_CHUNK])
    nisa.activation(dst=pT[:, 0:n_pe, 0:qn], op=nl.copy, data=t_psum[:, :, 0:qn])
    if n_pe < _N_CH:
        src = p_sb[0:qn, n_pe * K_CHUNK:_LOOP_BLOCK].reshape((qn, _N_CH - n_pe, K_CHUNK))
        nisa.dma_transpose(dst=pT[:, n_pe:_N_CH, 0:qn], src=src)
    return pT


def _finish(o_sb, gate_sb, state, rows, g, g_run, i_q, qn, d):
    """o_sb [qn, D] = O / l of head g for rows that see a key, 0 for the others (l + 1 - valid keeps the
    reciprocal finite when a tile ran no block), optionally * sigmoid(gate) (head g is gate_sb's g_run)."""
    valid = rows.bounds[0:qn, rows.local[i_q], 2:3]
    inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=inv_l[0:qn], data=valid, op0=nl.multiply, operand0=-1.0, op1=nl.add,
                              operand1=state.l[0:qn, g:g + 1])
    nisa.tensor_scalar(dst=inv_l[0:qn], data=inv_l[0:qn], op0=nl.add, operand0=1.0)
    nisa.reciprocal(dst=inv_l[0:qn], data=inv_l[0:qn])
    nisa.tensor_tensor(dst=inv_l[0:qn], data1=inv_l[0:qn], data2=valid, op=nl.multiply, engine=nisa.engine.gpsimd)
    o = state.o[0:qn, g, :]
    if gate_sb is None:
        nisa.tensor_scalar(dst=o_sb, data=o, op0=nl.multiply, operand0=inv_l[0:qn], engine=nisa.engine.gpsimd)
    else:
        sig_sb = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sig_sb[0:qn], op=nl.sigmoid, data=gate_sb[0:qn, g_run, :])
        nisa.tensor_scalar(dst=sig_sb[0:qn], data=sig_sb[0:qn], op0=nl.multiply, operand0=inv_l[0:qn],
                           engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=o_sb, data1=o, data2=sig_sb[0:qn], op=nl.multiply, engine=nisa.engine.gpsimd)


def _seq_tables(cu_q, cu_k, causal):
    """cu_seqlens on every partition as fp32 [128, N+1] rows, the key lengths (and for causal the query lengths)
    [128, N]: (n1, cuq, cuk, lenk, lenq or None, causal)."""
    n1 = cu_q.shape[0]
    n = n1 - 1
    cuq = _broadcast_f32(cu_q, n1)
    cuk = _broadcast_f32(cu_k, n1)
    lenk = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=lenk, data1=cuk[:, 1:n1], data2=cuk[:, 0:n], op=nl.subtract)
    lenq = None
    if causal:
        lenq = nl.ndarray((P_MAX, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=lenq, data1=cuq[:, 1:n1], data2=cuq[:, 0:n], op=nl.subtract)
    return n1, cuq, cuk, lenk, lenq, causal


def _row_intervals(seqs, r, ncols, lo, hi):
    """Key interval [lo, hi) of the query rows r [128, ncols] (fp32 row indices): lo = cu_k[s(r)], hi = cu_k[s(r) + 1]
    (causal: r + cu_k[s(r) + 1] - cu_q[s(r) + 1] + 1), s(r) the sequence of row r, by sums over the sequences
    ([cu_q[i] <= r] times the lengths), in pieces of at most _BOUNDS_ELEMS / (N+1) row columns (GpSimd)."""
    n1, cuq, _, lenk, lenq, causal = seqs
    n = n1 - 1
    f32, pool = nl.float32, nisa.engine.gpsimd
    step = max(1, _BOUNDS_ELEMS // n1)
    for c0 in range(0, ncols, step):
        cn = min(step, ncols - c0)
        ge = nl.ndarray((P_MAX, step, n1), dtype=f32, buffer=nl.sbuf)                # [cu_q[i] <= r]
        nisa.tensor_tensor(dst=ge[:, 0:cn], data1=cuq.ap(pattern=[[n1, P_MAX], [0, cn], [1, n1]], offset=0),
                           data2=r.ap(pattern=[[ncols, P_MAX], [1, cn], [0, n1]], offset=c0), op=nl.less_equal,
                           engine=pool)
        sums = [(lo, 1, lenk), (hi, 0, lenk)] + ([(None, 0, lenq)] if causal else [])
        end_q = None
        for dst, first, lens in sums:           # sum_i ge[:, :, first + i] * lens[i]
            prod = nl.ndarray((P_MAX, step, n), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=prod[:, 0:cn], data1=ge[:, 0:cn, first:first + n],
                               data2=lens.ap(pattern=[[n, P_MAX], [0, cn], [1, n]], offset=0), op=nl.multiply,
                               engine=pool)
            if dst is None:
                end_q = nl.ndarray((P_MAX, step), dtype=f32, buffer=nl.sbuf)
                dst = end_q
                c_lo = 0
            else:
                c_lo = c0
            nisa.tensor_reduce(dst=dst[:, c_lo:c_lo + cn], op=nl.add, data=prod[:, 0:cn], axis=2)
        if causal:
            h = hi[:, c0:c0 + cn]
            nisa.tensor_tensor(dst=h, data1=h, data2=end_q[:, 0:cn], op=nl.subtract, engine=pool)
            nisa.scalar_tensor_tensor(dst=h, data=h, op0=nl.add, operand0=1.0, op1=nl.add,
                                      operand1=r[:, c0:c0 + cn])


def heads_view(t):
    """[T, H, D] @ HBM -> its [H, T, D] view (no copy)."""
    return t.permute((1, 0, 2))


def packed_row_bounds(cu_q, cu_k, tq, causal, n_t):
    """(lo, hi): [128, n_t] fp32, the key interval [lo, hi) of query row 128 t + p at [p, t] (`_row_intervals`),
    for the first n_t query tiles; rows past Tq get an interval too (never stored)."""
    seqs = _seq_tables(cu_q, cu_k, causal)
    r_i = nl.ndarray((P_MAX, n_t), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(r_i, pattern=[[_Q_TILE, n_t]], offset=0, channel_multiplier=1)
    r = nl.ndarray((P_MAX, n_t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=r, src=r_i, engine=nisa.engine.gpsimd)
    lo = nl.ndarray((P_MAX, n_t), dtype=nl.float32, buffer=nl.sbuf)
    hi = nl.ndarray((P_MAX, n_t), dtype=nl.float32, buffer=nl.sbuf)
    _row_intervals(seqs, r, n_t, lo, hi)
    return lo, hi


def _broadcast_f32(cu, n1):
    """cu [N+1] int32 in HBM -> [128, N+1] fp32 in SBUF, the same on every partition (stride-0 DMA)."""
    cu_i = nl.ndarray((P_MAX, n1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=cu_i, src=cu.ap(pattern=[[0, P_MAX], [1, n1]], offset=0))
    cu_f = nl.ndarray((P_MAX, n1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cu_f, src=cu_i, engine=nisa.engine.gpsimd)
    return cu_f


def _load_kv_contained(k_h, v_h, kvh, tk, d, n_d, dtype, kT_sb, v_sb, view=None):
    """K^T -> kT_sb [128(d), n_d, >= Tk] and V -> v_sb [128(keys), >= ceil(Tk/128), D] of one KV head, with
    non-finite values contained.

    K and V are loaded in natural layout (key p of chunk c = key c*128 + p on partition p) in 2048-key pieces.
    A key whose V row holds a non-finite value gets V row := 0 and K row := NaN (the K row's own non-finite
    values stay): its score is then NaN exactly for the rows that see it (the row mask is a select), and the
    P V matmul never multiplies a non-finite V by another sequence's zero probability. K^T: PE transposes,
    `pe_transpose_group` chunks per PSUM bank, evicted by the Scalar engine. view(src, a0, nc, rows): the
    [rows, nc, D] source of keys a0 + c*128 + p (default: static slices of the [Hkv, T, D] views k_h, v_h).
    """
    per_bank = pe_transpose_group(dtype)
    t_psum = nl.ndarray((P_MAX, 2, per_bank, P_MAX), dtype=dtype, buffer=nl.psum)
    n_t = 0
    for s0 in range(0, tk, _KV_PIECE):
        sn = min(_KV_PIECE, tk - s0)
        c0 = s0 // K_CHUNK
        pieces = _chunk_pieces(sn)
        k_nat = nl.ndarray((P_MAX, _KV_PIECE // K_CHUNK, d), dtype=dtype, buffer=nl.sbuf)
        for c_lo, nc, rows in pieces:
            a0 = s0 + c_lo * K_CHUNK
            v_rows = v_sb[0:rows, c0 + c_lo:c0 + c_lo + nc, 0:d]
            for src, dst in ((k_h, k_nat[0:rows, c_lo:c_lo + nc, 0:d]), (v_h, v_rows)):
                if view is None:
                    src_v = src[kvh, a0:a0 + nc * rows, 0:d].reshape((nc, rows, d)).permute((1, 0, 2))
                else:
                    src_v = view(src, a0, nc, rows)
                nisa.dma_copy(dst=dst, src=src_v)
            _contain(k_nat[0:rows, c_lo:c_lo + nc, 0:d], v_rows, rows, nc, d, k_engine=nisa.engine.gpsimd)
        # K^T of the piece on the PE
        n_c = n_tiles(sn, K_CHUNK)
        n_t = pe_transpose_keys(kT_sb, lambda c, d0, dn, cn, k_nat=k_nat: k_nat[0:cn, c, d0:d0 + dn], sn, n_c, d,
                                n_d, t_psum, per_bank, key0=s0, n_t=n_t)
    return kT_sb, v_sb


def _contain(k_nat, v_rows, rows, nc, d, hb=1, k_engine=nisa.engine.unknown):
    """Keys whose V row holds a non-finite value: V row := 0 and K row := NaN, in place (k_nat, v_rows: [rows,
    nc, D], or [rows, nc, hb, D] for hb heads, natural layout, key on the partition). The test is the row sum
    (NaN or +-Inf propagate through a sum; a finite row whose sum overflows fp32 counts as non-finite, values
    that large are out of scope): s - s is 0 for a finite row, NaN otherwise, and is the K row's poison. Three
    passes over the data (one reduce, one predicated copy, one add per (128-key chunk, head)), the rest small.
    k_nat None: V only (the caller applies the poison). Returns the poison s - s, [128, nc * hb] fp32."""
    m = nc * hb
    s = nl.ndarray((P_MAX, m), dtype=nl.float32, buffer=nl.sbuf)
    s_rows = s[0:rows] if hb == 1 else s[0:rows].reshape((rows, nc, hb))
    nisa.tensor_reduce(dst=s_rows, op=nl.add, data=v_rows, axis=len(v_rows.shape) - 1)
    nisa.tensor_tensor(dst=s[0:rows], data1=s[0:rows], data2=s[0:rows], op=nl.subtract)      # 0, or NaN
    fin = nl.ndarray((P_MAX, m), dtype=nl.uint8, buffer=nl.sbuf)                            # 1: finite row
    nisa.tensor_scalar(dst=fin[0:rows], data=s[0:rows], op0=nl.equal, operand0=0.0)
    per_row = [[m, rows], [1, m], [0, d]] if hb == 1 else [[m, rows], [hb, nc], [1, hb], [0, d]]
    nisa.tensor_copy_predicated(dst=v_rows, src=0.0, predicate=fin.ap(pattern=per_row, offset=0),
                                reverse_pred=True)
    for c in range(nc if k_nat is not None else 0):   # per-partition scalar adds: cheaper than a broadcast add
        for h in range(hb):
            k_row = k_nat[:, c, :] if hb == 1 else k_nat[:, c, h, :]
            nisa.tensor_scalar(dst=k_row, data=k_row, op0=nl.add, operand0=s[0:rows, c * hb + h:c * hb + h + 1],
                               engine=k_engine)
    return s


# ============================================================================ per-sequence windows (max_seqlen_*)


@nki.jit
def flash_attention_varlen_windows_kernel(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                                          max_q, max_k):
    """Packed-sequence attention, one fixed-size window per sequence (the per-sequence mode).

    Dimensions: as flash_attention_varlen_kernel; max_q <= Tq and max_k <= Tk (trace-time ints) bound every
    sequence's query and key count.
    The program is the padded flash_attention pipeline over a batch of N sequences of max_q queries and max_k
    keys: the window of sequence i ends where the sequence ends (cu[i+1] - max, clamped into the tensor) and its
    start is an int32 in SBUF, read by the DMAs as a dynamic row offset; rows and keys of the window outside the
    sequence are masked, and the output rows of the sequence are written by a scatter whose other indices are
    out of bounds and skipped (oob_mode.skip). Work is N * ceil(max_q/128) query tiles of ceil(max_k/512)
    blocks (causal: the blocks below the diagonal), whatever the lengths.
    """
    tq, n_hq, d = q.shape
    out = nl.ndarray((tq, n_hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    windows_body(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, out, softmax_scale, causal, max_q, max_k)
    return out


def windows_body(q, k, v, gate, cu_q, cu_k, out, softmax_scale, causal, mq, mk):
    tq, n_hq, d = q.shape
    tk, n_kv, _ = k.shape
    group = n_hq // n_kv
    n = cu_q.shape[0] - 1
    pid, n_prog = nl.program_id(0), nl.num_programs(0)
    work = [(i, kvh) for i in range(n) for kvh in range(n_kv) if _window_owner(i, kvh, n_kv, n_prog) == pid]
    if not work:
        return
    dtype = q.dtype
    n_d = n_tiles(d, D_CHUNK)
    n_qt = n_tiles(mq, _Q_TILE)
    win = _SeqWindows(cu_q, cu_k, tq, tk, mq, mk, causal)
    band = (mk, window_diagonal_bound(tq, tk, mq, mk)) if causal else None
    itemsize = 4 if nl.float32 == dtype else 2
    # K natural + K^T + V per head (masks overcounted), two units live at once (the next one is prefetched)
    per_head = 4 * window_sbuf_bytes(mq, mk, d, itemsize, causal)
    hb = max(1, _SBUF_KV_BUDGET // per_head)
    win.max_batch = hb
    units = []                                          # (sequence, batch of KV heads): an arithmetic progression
    for i in sorted({i for i, _ in work}):
        heads = [h for s, h in work if s == i]
        first = 1 if not units else 0                   # the first unit alone: its pipeline starts sooner
        units += [(i, heads[0:first])] if first else []
        units += [(i, heads[b0:b0 + hb]) for b0 in range(first, len(heads), hb)]
    if len(units[-1][1]) > 1:                           # the last head alone: its rows are written as they finish
        i, batch = units.pop()
        units += [(i, batch[:-1]), (i, batch[-1:])]
    seq_rows = {}

    def prepare(unit):
        """Masks of the sequence (once), K^T / V of the batch, its staged Q: issued one unit ahead, in the middle
        of the previous unit's heads, so that the loads and the containment overlap its pipelines."""
        i, batch = unit
        if i not in seq_rows:
            seq_rows[i] = win.sequence(i)
        if causal or not is_two_byte(dtype):
            kv, poison = _load_window_kv(k, v, batch, win.k_start(i), mk, d, n_d, dtype), None
        else:
            kv, poison = _load_window_kv_flagged(k, v, batch, win.k_start(i), mk, d, n_d, dtype, seq_rows[i])
        return kv, _BatchRows(seq_rows[i], q, batch, group, win.q_start(i), poison)

    ready = prepare(units[0])
    for u, (i, batch) in enumerate(units):
        kv, rows = ready
        nxt = units[u + 1] if u + 1 < len(units) else None
        q_w = _WindowRows(q, win.q_start(i))
        gate_w = None if gate is None else _WindowRows(gate, win.q_start(i))
        for b, (kvh, (kT_sb, v_sb)) in enumerate(zip(batch, kv)):
            if b == 1 and nxt is not None:          # after the first head's pipeline
                ready, nxt = prepare(nxt), None
            items = [(kvh * group + g, t * _Q_TILE, mq) for t in range(n_qt) for g in range(group)]
            _attend_pipeline(q_w, gate_w, out, kT_sb, v_sb, None, None, items, mk, d, n_d, dtype,
                             softmax_scale, False, rows=rows, band=band)
        rows.flush(out)
        if nxt is not None:
            ready = prepare(nxt)


def _chunk_pieces(n_keys):
    """DMA pieces [(first chunk, chunks, rows)] of n_keys keys in 128-key chunks: the full chunks, then the partial
    last chunk when n_keys % 128 != 0."""
    full, rem = divmod(n_keys, K_CHUNK)
    return ([(0, full, K_CHUNK)] if full else []) + ([(full, 1, rem)] if rem else [])


def _window_geometry(k, heads, mk):
    """Layout of one window's mk keys for the KV heads `heads` (an arithmetic progression): (KV heads of k, heads
    loaded, head stride, 128-key chunks, DMA pieces: _chunk_pieces)."""
    n_kv = k.shape[1]
    hb = len(heads)
    step = heads[1] - heads[0] if hb > 1 else 1
    return n_kv, hb, step, n_tiles(mk, K_CHUNK), _chunk_pieces(mk)


def _load_window_kv(k, v, heads, k_start, mk, d, n_d, dtype):
    """K^T [128(d), n_d, mk] and V [128(keys), ceil(mk/128), D] of the window (keys k_start .. k_start + mk - 1)
    for each KV head in `heads` (an arithmetic progression): one natural-layout DMA per tensor for all of them
    (two when mk % 128 != 0: the full chunks, the last partial chunk), non-finite values contained (_contain),
    K^T by PE transposes (`pe_transpose_group` chunks per PSUM bank, evicted by the Scalar engine)."""
    n_kv, hb, step, n_c, pieces = _window_geometry(k, heads, mk)
    k_nat = nl.ndarray((P_MAX, n_c, hb, d), dtype=dtype, buffer=nl.sbuf)
    v_all = nl.ndarray((P_MAX, n_c, hb, d), dtype=dtype, buffer=nl.sbuf)
    for c0, nc, rows in pieces:
        for src, dst in ((k, k_nat), (v, v_all)):
            view = src.ap(pattern=[[n_kv * d, rows], [K_CHUNK * n_kv * d, nc], [step * d, hb], [1, d]],
                          offset=(c0 * K_CHUNK * n_kv + heads[0]) * d, scalar_offset=k_start, indirect_dim=0)
            nisa.dma_copy(dst=dst[0:rows, c0:c0 + nc], src=view)
        _contain(k_nat[0:rows, c0:c0 + nc], v_all[0:rows, c0:c0 + nc], rows, nc, d, hb)
    per_bank = pe_transpose_group(dtype)
    out = []
    for h in range(hb):
        kT_sb = nl.ndarray((P_MAX, n_d, mk), dtype=dtype, buffer=nl.sbuf)
        t_psum = nl.ndarray((P_MAX, 2, per_bank, P_MAX), dtype=dtype, buffer=nl.psum)
        pe_transpose_keys(kT_sb, lambda c, d0, dn, cn, h=h: k_nat[0:cn, c, h, d0:d0 + dn], mk, n_c, d, n_d, t_psum,
                          per_bank)
        out.append((kT_sb, v_all[:, :, h, :]))
    return out


def _load_window_kv_flagged(k, v, heads, k_start, mk, d, n_d, dtype, seq):
    """Non-causal, 2-byte dtypes: K^T of the window by DMA transpose (no PE / ScalarE work), V in natural layout
    for all of `heads` in one DMA (two with a partial last chunk), and instead of poisoning K rows (causal: a
    row that does not see a key must not see its V), one flag per head: every query row of a non-causal
    sequence sees all its keys, so a non-finite V row of the sequence makes all its rows NaN (the flag is added
    to 1/l at the end), while V rows with a non-finite value are zeroed (other sequences' rows multiply them by
    0). A non-finite K value reaches exactly the rows that see it through its score (the mask is a select).
    Returns ([(K^T, V) per head], poison [128, hb] fp32: 0, or NaN on every partition)."""
    n_kv, hb, step, n_c, pieces = _window_geometry(k, heads, mk)
    out = []
    for h, kvh in enumerate(heads):
        kT_sb = nl.ndarray((P_MAX, n_d, mk), dtype=dtype, buffer=nl.sbuf)
        for s0 in range(0, mk, _KV_PIECE):
            sn = min(_KV_PIECE, mk - s0)
            for i_d in range(n_d):
                d0 = i_d * D_CHUNK
                dn = min(D_CHUNK, d - d0)
                src = k.ap(pattern=[[n_kv * d, sn], [1, dn]], offset=(s0 * n_kv + kvh) * d + d0,
                           scalar_offset=k_start, indirect_dim=0)
                nisa.dma_transpose(dst=kT_sb[0:dn, i_d, s0:s0 + sn], src=src)
        out.append(kT_sb)
    v_all = nl.ndarray((P_MAX, n_c, hb, d), dtype=dtype, buffer=nl.sbuf)
    flags = nl.ndarray((P_MAX, n_c, hb), dtype=nl.float32, buffer=nl.sbuf)     # per key row: 0, or NaN
    key_in = seq.keys_inside()                                                  # [128, n_c, hb] uint8
    ones = seq.win.ones()
    col_sum = nl.ndarray((P_MAX, n_c, hb), dtype=nl.float32, buffer=nl.psum)
    for c0, nc, rows in pieces:
        view = v.ap(pattern=[[n_kv * d, rows], [K_CHUNK * n_kv * d, nc], [step * d, hb], [1, d]],
                    offset=(c0 * K_CHUNK * n_kv + heads[0]) * d, scalar_offset=k_start, indirect_dim=0)
        v_rows = v_all[0:rows, c0:c0 + nc]
        nisa.dma_copy(dst=v_rows, src=view)
        f = flags[0:rows, c0:c0 + nc]
        nisa.tensor_reduce(dst=f, op=nl.add, data=v_rows, axis=3)
        nisa.tensor_tensor(dst=f, data1=f, data2=f, op=nl.subtract)                       # 0, or NaN
        fin = nl.ndarray((P_MAX, n_c, hb), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=fin[0:rows, c0:c0 + nc], data=f, op0=nl.equal, operand0=0.0)
        nisa.tensor_copy_predicated(dst=v_rows, src=0.0, reverse_pred=True, predicate=fin[0:rows, c0:c0 + nc].ap(
            pattern=[[n_c * hb, rows], [hb, nc], [1, hb], [0, d]], offset=c0 * hb))
        # keys of other sequences do not flag this one (a select: 0 * NaN would stay NaN)
        inside = nl.where(key_in[0:rows, c0:c0 + nc, 0:hb], f, 0.0)
        # column sums on every partition: ones[rows, 128]^T @ flags[rows, nc*hb] (NaN propagates)
        nisa.nc_matmul(col_sum[:, c0:c0 + nc], ones[0:rows, :], inside)
    poison = nl.ndarray((P_MAX, hb), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=poison, op=nl.add, data=col_sum.permute((0, 2, 1)), axis=2)
    return [(kT, v_all[:, :, h, :]) for h, kT in enumerate(out)], poison


def _window_owner(i, kvh, n_kv, n_prog):
    """Program instance of (sequence i, KV head): a contiguous block of KV heads per core when they divide evenly
    (the heads of one DMA are then adjacent in [T, H, D]: longer contiguous runs), else alternating (sequence,
    head) pairs (Hkv = 1: alternate sequences)."""
    if n_kv % n_prog == 0:
        return kvh // (n_kv // n_prog)
    return (i * n_kv + kvh) % n_prog


def window_diagonal_bound(tq, tk, mq, mk):
    """B such that, in window coordinates, query row r of any sequence sees key columns <= r + B (causal).

    Row r is query r - (e_q - Lq) of its sequence and column c key c - (e_k - Lk), with e = min(cu[i+1], max)
    the sequence end in its window; bottom-right causal: c <= r + e_k - e_q. With Lk_j >= Lq_j for every j,
    0 <= cu_k[i+1] - cu_q[i+1] <= Tk - Tq, so e_k - e_q <= max(mk - mq, Tk - Tq)."""
    return max(mk - mq, tk - tq, 0)


class _WindowRows:
    """q or gate [T, H, D] seen from one sequence's window: view[h, r0:r1, 0:d] is rows start + r0 .. start + r1
    - 1 of head h, `start` an int32 (1, 1) SBUF tile (a DMA with a dynamic offset, hardware DGE)."""

    def __init__(self, t, start):
        self.t = t
        self.start = start
        self.dtype = t.dtype

    def __getitem__(self, idx):
        h, rows, cols = idx
        _, n_h, d = self.t.shape
        return self.t.ap(pattern=[[n_h * d, rows.stop - rows.start], [1, cols.stop - cols.start]],
                         offset=(rows.start * n_h + h) * d + cols.start, scalar_offset=self.start, indirect_dim=0)


class _SeqWindows:
    """Per-sequence window bounds, computed on device from cu_seqlens once for all N sequences.

    Window of sequence i: queries w_q .. w_q + mq - 1 with w_q = clamp(cu_q[i+1] - mq, 0, Tq - mq) (in the
    tensor whatever cu_seqlens hold), keys likewise. In window coordinates the sequence's queries are rows
    [s_q, e_q) and its keys columns [s_k, e_k), e = cu[i+1] - w, s = e - L. Per sequence, on every partition
    ([128, N] fp32): mid/half of both intervals (a value x is inside iff |x - mid| < half), e_k - e_q (the
    causal offset), w_q - Tq (scatter indices) and [L_k > 0]; the starts w_q, w_k as int32 on partition 0."""

    def __init__(self, cu_q, cu_k, tq, tk, mq, mk, causal):
        n1 = cu_q.shape[0]
        self.n = n = n1 - 1
        self.tq, self.mq, self.mk, self.causal = tq, mq, mk, causal
        self.n_blk = n_tiles(mk, _BLOCK)
        self.n_qt = n_tiles(mq, _Q_TILE)
        f32, pool = nl.float32, nisa.engine.gpsimd      # small [128, N] tiles: on the GpSimd, off the VectorE
        self.stats = nl.ndarray((P_MAX, 8, n), dtype=f32, buffer=nl.sbuf)
        st = self.stats
        for c, (cu, t_all, m) in enumerate(((cu_q, tq, mq), (cu_k, tk, mk))):
            cu_f = _broadcast_f32(cu, n1)
            w = nl.ndarray((P_MAX, n), dtype=f32, buffer=nl.sbuf)                      # clamp(cu[i+1] - m, 0, T - m)
            nisa.tensor_scalar(dst=w, data=cu_f[:, 1:n1], op0=nl.add, operand0=float(-m), op1=nl.maximum,
                               operand1=0.0, engine=pool)
            nisa.tensor_scalar(dst=w, data=w, op0=nl.minimum, operand0=float(t_all - m), engine=pool)
            e = nl.ndarray((P_MAX, n), dtype=f32, buffer=nl.sbuf)                      # e = cu[i+1] - w
            nisa.tensor_tensor(dst=e, data1=cu_f[:, 1:n1], data2=w, op=nl.subtract, engine=pool)
            s = nl.ndarray((P_MAX, n), dtype=f32, buffer=nl.sbuf)                      # s = e - L = cu[i] - w
            nisa.tensor_tensor(dst=s, data1=cu_f[:, 0:n], data2=w, op=nl.subtract, engine=pool)
            # mid = (s + e - 1) / 2, half = (e - s) / 2
            nisa.scalar_tensor_tensor(dst=st[:, 2 * c], data=e, op0=nl.add, operand0=-1.0, op1=nl.add, operand1=s)
            nisa.tensor_scalar(dst=st[:, 2 * c], data=st[:, 2 * c], op0=nl.multiply, operand0=0.5, engine=pool)
            nisa.tensor_tensor(dst=st[:, 2 * c + 1], data1=e, data2=s, op=nl.subtract, engine=pool)
            nisa.tensor_scalar(dst=st[:, 2 * c + 1], data=st[:, 2 * c + 1], op0=nl.multiply, operand0=0.5,
                               engine=pool)
            nisa.tensor_copy(dst=st[:, 6 + c], src=e, engine=pool)                        # e_q, e_k
            start = nl.ndarray((1, n), dtype=nl.int32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=start, src=w[0:1])
            if c == 0:
                nisa.tensor_scalar(dst=st[:, 4], data=w, op0=nl.add, operand0=float(-tq), engine=pool)
                self.w_q = start
            else:
                nisa.tensor_scalar(dst=st[:, 5], data=st[:, 3], op0=nl.greater, operand0=0.0, engine=pool)  # L_k > 0
                self.w_k = start
        nisa.tensor_tensor(dst=st[:, 6], data1=st[:, 7], data2=st[:, 6], op=nl.subtract, engine=pool)  # e_k - e_q
        # static index tiles: key column within a block, query row of each window tile
        col_i = nl.ndarray((P_MAX, _BLOCK), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(col_i, pattern=[[1, _BLOCK]], offset=0, channel_multiplier=0)
        self.col = nl.ndarray((P_MAX, _BLOCK), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=self.col, src=col_i, engine=nisa.engine.gpsimd)
        row_i = nl.ndarray((P_MAX, self.n_qt), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(row_i, pattern=[[_Q_TILE, self.n_qt]], offset=0, channel_multiplier=1)
        self.row = nl.ndarray((P_MAX, self.n_qt), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=self.row, src=row_i, engine=nisa.engine.gpsimd)
        self.diag_pos = {}

    def ones(self):
        """[128, 128] fp32 of ones (column sums on the PE), built once."""
        if getattr(self, "_ones", None) is None:
            self._ones = nl.ndarray((P_MAX, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=self._ones, value=1.0, engine=nisa.engine.gpsimd)
        return self._ones

    def q_start(self, i):
        return self.w_q[0:1, i:i + 1]

    def k_start(self, i):
        return self.w_k[0:1, i:i + 1]

    def col_minus_row(self, o):
        """[128, 512] fp32: c - p + o (key column minus query row of a block whose first key is o columns past
        the tile's first row), static, built once per distinct o."""
        if o not in self.diag_pos:
            t_i = nl.ndarray((P_MAX, _BLOCK), dtype=nl.int32, buffer=nl.sbuf)
            nisa.iota(t_i, pattern=[[1, _BLOCK]], offset=o, channel_multiplier=-1)
            t_f = nl.ndarray((P_MAX, _BLOCK), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=t_f, src=t_i, engine=nisa.engine.gpsimd)
            self.diag_pos[o] = t_f
        return self.diag_pos[o]

    def sequence(self, i):
        return _SeqRows(self, i)


class _BatchRows:
    """The row hooks of one (sequence, batch of KV heads): those of the sequence (_SeqRows: masks, scatter), and
    Q rows of every window tile for the batch's query heads staged in SBUF, one DMA per tile for all of them (a
    dynamic offset costs a hardware DGE slot per DMA) when they fit _Q_STAGE_BYTES per partition; the pipeline
    then transposes Q from there (q_rows) instead of loading it per head."""

    # 2-byte P^T evictions alternate VectorE / ScalarE in the pipeline (prefill's v3 balance): the vision windows
    # are VectorE-bound, and every eviction on the VectorE (prefill's default since 9fb268d) modeled 463.1 us
    # instead of 427.8 (audio 124.6 either way)
    pt_evict = "alternate"

    def __init__(self, seq, q, kv_heads, group, q_start, poison=None):
        self.seq = seq
        self.poison = poison
        self.h0, self.kv_step, self.group = kv_heads[0] * group, (kv_heads[1] - kv_heads[0] if len(kv_heads) > 1
                                                                   else 1) * group, group
        tq, n_hq, d = q.shape
        hb = len(kv_heads)
        n_qt, mq = seq.win.n_qt, seq.win.mq
        self.stage = None
        if n_qt * hb * group * d * q.dtype.itemsize > _Q_STAGE_BYTES or hb * group == 1:
            return
        step = kv_heads[1] - kv_heads[0] if hb > 1 else 1
        stage = nl.ndarray((P_MAX, n_qt, hb, group, d), dtype=q.dtype, buffer=nl.sbuf)
        for t in range(n_qt):
            qn = min(_Q_TILE, mq - t * _Q_TILE)
            src = q.ap(pattern=[[n_hq * d, qn], [step * group * d, hb], [d, group], [1, d]],
                       offset=(t * _Q_TILE * n_hq + kv_heads[0] * group) * d, scalar_offset=q_start, indirect_dim=0)
            nisa.dma_copy(dst=stage[0:qn, t], src=src)
        self.stage = (stage, kv_heads[0] * group, step * group, group)
        self.out_stage = nl.ndarray((P_MAX, n_qt, hb, group, d), dtype=q.dtype, buffer=nl.sbuf)

    def out_tile(self, st):
        """The pipeline writes the stream's output rows here; flush() scatters each tile for every head."""
        if self.stage is None:
            return None
        rel = st.h - self.h0
        return self.out_stage[:, st.q0 // _Q_TILE, rel // self.kv_step, rel % self.group]

    def store(self, out, o_sb, st):
        if self.stage is None:
            self.seq.store(out, o_sb, st)

    def flush(self, out):
        """One scatter per window tile for all heads of the batch (software DGE: one GpSimd descriptor job per
        DMA, instead of one per head)."""
        if self.stage is None:
            return
        _, n_hq, d = out.shape
        win = self.seq.win
        hb = self.out_stage.shape[2]
        for t in range(win.n_qt):
            qn = min(_Q_TILE, win.mq - t * _Q_TILE)
            dst = out.ap(pattern=[[n_hq * d, qn], [self.kv_step * d, hb], [d, self.group], [1, d]],
                         offset=self.h0 * d, vector_offset=self.seq.idx[0:qn, t:t + 1], indirect_dim=0)
            nisa.dma_copy(dst=dst, src=self.out_stage[0:qn, t], oob_mode=nisa.oob_mode.skip)

    def __getattr__(self, name):            # start, mask: the sequence's
        return getattr(self.seq, name)

    def finish_scale(self, inv_l, st):
        """The sequence's (rows without keys: 0), plus the batch's non-finite V flag of the head (windows of
        _load_window_kv_flagged)."""
        self.seq.finish_scale(inv_l, st)
        if self.poison is not None:
            hl = (st.h - self.h0) // self.kv_step
            nisa.tensor_tensor(dst=inv_l[0:st.qn], data1=inv_l[0:st.qn], data2=self.poison[0:st.qn, hl:hl + 1],
                               op=nl.add, engine=nisa.engine.gpsimd)

    def q_rows(self, st):
        if self.stage is None:
            return None
        stage, h0, kv_step, group = self.stage
        rel = st.h - h0
        return stage[:, st.q0 // _Q_TILE, rel // kv_step, rel % group]


class _SeqRows:
    """The pipeline's row hooks for sequence i (varlen per-sequence mode): key masks (built once per sequence,
    shared by every head and query tile), zero rows that see no key, scatter of the sequence's rows."""

    def __init__(self, win, i):
        self.win, self.i = win, i
        st, pool = win.stats, nisa.engine.gpsimd
        self.col_mask = nl.ndarray((P_MAX, win.n_blk, _BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
        for j in range(win.n_blk):
            kn = min(_BLOCK, win.mk - j * _BLOCK)
            dist = nl.ndarray((P_MAX, _BLOCK), dtype=nl.float32, buffer=nl.sbuf)      # k0 + c - mid_k
            nisa.tensor_scalar(dst=dist[:, 0:kn], data=win.col[:, 0:kn], op0=nl.subtract, operand0=st[:, 2, i:i + 1],
                               op1=nl.add, operand1=float(j * _BLOCK), engine=pool)
            nisa.tensor_scalar(dst=self.col_mask[:, j, 0:kn], data=dist[:, 0:kn], op0=nl.abs_max, operand0=0.0,
                               op1=nl.less, operand1=st[:, 3, i:i + 1], engine=pool)
        # scatter rows: window row r -> w_q + r inside the sequence, Tq (out of bounds: skipped) outside
        n_qt = win.n_qt
        inside = nl.ndarray((P_MAX, n_qt), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=inside, data=win.row, op0=nl.subtract, operand0=st[:, 0, i:i + 1], op1=nl.abs_max,
                           operand1=0.0, engine=pool)
        nisa.tensor_scalar(dst=inside, data=inside, op0=nl.less, operand0=st[:, 1, i:i + 1], engine=pool)
        rel = nl.ndarray((P_MAX, n_qt), dtype=nl.float32, buffer=nl.sbuf)              # (w_q + r - Tq) inside
        nisa.tensor_scalar(dst=rel, data=win.row, op0=nl.add, operand0=st[:, 4, i:i + 1], engine=pool)
        nisa.tensor_tensor(dst=rel, data1=rel, data2=inside, op=nl.multiply, engine=pool)
        self.idx = nl.ndarray((P_MAX, n_qt), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=self.idx, data=rel, op0=nl.add, operand0=float(win.tq), engine=pool)
        self.diag = {}

    def start(self, st):
        pass

    def keys_inside(self):
        """[128, ceil(mk/128), hb_max] uint8: window key c*128 + p lies in the sequence (s_k <= key < e_k)."""
        win, i = self.win, self.i
        if getattr(self, "_keys_inside", None) is None:
            n_c = n_tiles(win.mk, K_CHUNK)
            hb = win.max_batch
            pos_i = nl.ndarray((P_MAX, n_c, hb), dtype=nl.int32, buffer=nl.sbuf)
            nisa.iota(pos_i, pattern=[[K_CHUNK, n_c], [0, hb]], offset=0, channel_multiplier=1)
            dist = nl.ndarray((P_MAX, n_c, hb), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=dist, data=pos_i, op0=nl.subtract, operand0=win.stats[:, 2, i:i + 1],
                               op1=nl.abs_max, operand1=0.0, engine=nisa.engine.gpsimd)
            self._keys_inside = nl.ndarray((P_MAX, n_c, hb), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=self._keys_inside, data=dist, op0=nl.less, operand0=win.stats[:, 3, i:i + 1],
                               engine=nisa.engine.gpsimd)
        return self._keys_inside

    def _diag_mask(self, j, o):
        """Column mask of block j and the causal bound c - p + o <= e_k - e_q, for blocks on the diagonal."""
        if (j, o) not in self.diag:
            win, i = self.win, self.i
            kn = min(_BLOCK, win.mk - j * _BLOCK)
            m = nl.ndarray((P_MAX, _BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=m[:, 0:kn], data=win.col_minus_row(o)[:, 0:kn], op0=nl.less_equal,
                               operand0=win.stats[:, 6, i:i + 1], engine=nisa.engine.gpsimd)
            nisa.tensor_tensor(dst=m[:, 0:kn], data1=m[:, 0:kn], data2=self.col_mask[:, j, 0:kn], op=nl.multiply,
                               engine=nisa.engine.gpsimd)
            self.diag[(j, o)] = m
        return self.diag[(j, o)]

    def mask(self, scores, st, j, k0, kn):
        qn = st.qn
        if self.win.causal and k0 + kn - 1 > st.q0:
            vis = self._diag_mask(j, k0 - st.q0)
        else:
            vis = self.col_mask[:, j]
        return nl.where(vis[0:qn, 0:kn], scores, MASK_BIAS)

    def finish_scale(self, inv_l, st):
        """Rows of a sequence without keys give 0 (their scores were all masked)."""
        qn = st.qn
        nisa.tensor_tensor(dst=inv_l[0:qn], data1=inv_l[0:qn], data2=self.win.stats[0:qn, 5, self.i:self.i + 1],
                           op=nl.multiply, engine=nisa.engine.gpsimd)

    def store(self, out, o_sb, st):
        """The tile's rows of this sequence -> out (scatter; rows outside the sequence have index Tq, skipped)."""
        qn = st.qn
        t = st.q0 // _Q_TILE
        _, n_h, d = out.shape
        dst = out.ap(pattern=[[n_h * d, qn], [1, d]], offset=st.h * d, vector_offset=self.idx[0:qn, t:t + 1],
                     indirect_dim=0)
        nisa.dma_copy(dst=dst, src=o_sb, oob_mode=nisa.oob_mode.skip)


# ============================================================================ host wrapper


def _cu_count(name, arg, cu, n_expected=None) -> int:
    """The number of sequences N of a cu_seqlens argument from its metadata (1-D [N+1], N >= 1, integers, the
    same N for q and k, N <= MAX_SEQS): no values are read, so torch_ops' fake runs it on fake tensors."""
    import numpy as np
    kernel_check(not isinstance(cu, (str, bytes)),
                 f"{name}: {arg} must be integers with values (NumPy, list or tensor), got {arg}={cu!r}")
    if not (hasattr(cu, "shape") and hasattr(cu, "dtype")):
        try:
            cu = np.asarray(cu)
        except Exception:  # noqa: BLE001 - anything NumPy cannot turn into an array
            cu = np.asarray(None)
    shape = tuple(int(s) for s in cu.shape)
    kernel_check(len(shape) == 1 and shape[0] >= 2,
                 f"{name}: {arg} must be 1-D [N+1] with N >= 1, got {arg}.shape={shape}")
    kernel_check(is_int_dtype(cu), f"{name}: {arg} must be integers, got {arg}.dtype={_dtype_name(cu)}")
    n = shape[0] - 1
    if n_expected is not None:
        kernel_check(n == n_expected, f"{name}: cu_seqlens_q and cu_seqlens_k must describe the same number of "
                     f"sequences, got N={n_expected} and {arg} N={n}")
    kernel_check(n <= MAX_SEQS, f"{name}: at most {MAX_SEQS} sequences, got {arg} N={n}")
    return n


def _cu_values(name, arg, cu, total, n_expected=None):
    """Host check of cu_seqlens (validation, not specialization): integers, [N+1], 0 .. total, non-decreasing."""
    import numpy as np
    device_type = getattr(getattr(cu, "device", None), "type", "cpu")
    kernel_check(not isinstance(cu, (str, bytes)) and device_type != "meta",
                 f"{name}: {arg} must be integers with values (NumPy, list or tensor), got {arg}={cu!r}")
    try:
        import torch
        if isinstance(cu, torch.Tensor):
            cu = cu.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        arr = np.asarray(cu)
    except Exception:  # noqa: BLE001 - anything NumPy cannot turn into an array
        arr = np.asarray(None)
    _cu_count(name, arg, arr, n_expected)
    vals = arr.astype(np.int64)
    kernel_check(vals[0] == 0, f"{name}: {arg} must start at 0, got {arg}[0]={int(vals[0])}")
    steps = np.diff(vals)
    kernel_check(bool(np.all(steps >= 0)), f"{name}: {arg} must be non-decreasing, got {arg}={vals.tolist()}")
    kernel_check(vals[-1] == total, f"{name}: {arg} must end at the packed length {total}, got "
                 f"{arg}[-1]={int(vals[-1])}")
    return vals.astype(np.int32)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None,
                           lnc=None, max_seqlen_q=None, max_seqlen_k=None):
    """Packed variable-length attention in the flash-attn varlen layout (GQA, D <= 256, optional sigmoid gate).

    Args:
        q: [Tq, Hq, D] bf16/fp16/fp32 (NumPy or CPU torch): N sequences' queries end to end.
        k, v: [Tk, Hkv, D], q's dtype; Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: [N+1] integers, starting at 0, non-decreasing, ending at Tq / Tk
            (zero-length sequences allowed). Their values are checked here on the host (validation only: the
            kernel reads them on device and its instructions do not depend on them; a caller that passes device
            tensors in a compiled graph skips these checks).
        causal: bottom-right aligned per sequence (query i of a sequence with Lq queries and Lk >= Lq keys sees
            keys j <= Lk - Lq + i); False: every query sees all keys of its sequence (encoders).
        softmax_scale: default D ** -0.5; a finite number > 0 (Python or NumPy scalar).
        gate: optional [Tq, Hq, D] float: returns out * sigmoid(gate).
        lnc: 1, 2 or None (NEURON_LOGICAL_NC_CONFIG, else the target's default: 2 on trn2).
        max_seqlen_q, max_seqlen_k: optional ints (flash-attn's trace-time bounds): no sequence has more
            queries / keys. max_seqlen_q lets the kernel skip key blocks outside the band each query row can
            see (causal; or causal=False with cu_seqlens_k equal to cu_seqlens_q, the encoders' self-attention);
            each value is a separate trace. Checked against the lengths here.
    Returns:
        out: [Tq, Hq, D], q's dtype and kind. Query rows of a sequence without keys (causal=False) are 0.
    """
    name = "flash_attention_varlen"
    scale, lnc, plan = check_flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                                                    gate, lnc, max_seqlen_q, max_seqlen_k)
    cu_q = _cu_values(name, "cu_seqlens_q", cu_seqlens_q, _shape(q)[0])
    cu_k = _cu_values(name, "cu_seqlens_k", cu_seqlens_k, _shape(k)[0], n_expected=len(cu_q) - 1)
    import numpy as np
    lq, lk = np.diff(cu_q), np.diff(cu_k)
    if causal:
        short = np.nonzero(lk < lq)[0]
        kernel_check(short.size == 0, f"{name}: with causal=True every sequence needs at least as many keys as "
                     f"queries (bottom-right aligned), got sequence {int(short[0]) if short.size else -1} with "
                     f"{int(lq[short[0]]) if short.size else 0} queries and "
                     f"{int(lk[short[0]]) if short.size else 0} keys (cu_seqlens_q, cu_seqlens_k)")
    for arg, bound, lens in (("max_seqlen_q", max_seqlen_q, lq), ("max_seqlen_k", max_seqlen_k, lk)):
        longest = int(np.max(lens)) if bound is not None and len(lens) else 0
        kernel_check(bound is None or longest <= int(bound), f"{name}: {arg} must bound every sequence length, "
                     f"got {arg}={bound} and a sequence of {longest}")
    q, k, v, gate = (_read_only(x) for x in (q, k, v, gate))
    if plan is not None:
        return call(flash_attention_varlen_windows_kernel, q, k, v, gate, cu_q, cu_k, scale, causal, *plan, lnc=lnc)
    return call(flash_attention_varlen_kernel, q, k, v, gate, cu_q, cu_k, scale, causal, lnc=lnc)


def check_flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, gate=None,
                                 lnc=None, max_seqlen_q=None, max_seqlen_k=None):
    """`flash_attention_varlen`'s checks that read no tensor values (shapes, dtypes, options, N from the
    cu_seqlens shapes, the mode and its on-chip fit), so that torch_ops' fake runs them at trace time; the
    cu_seqlens values (and the max_seqlen bounds against them) are checked by the wrapper. Returns (scale, lnc,
    the window plan or None)."""
    name = "flash_attention_varlen"
    _check_array(name, "q", q, 3, "[Tq, Hq, D]")
    _check_array(name, "k", k, 3, "[Tk, Hkv, D]")
    _check_array(name, "v", v, 3, "[Tk, Hkv, D]")
    tq, n_hq, d = _shape(q)
    kernel_check(_shape(k) == _shape(v), f"{name}: k and v shapes differ, got k.shape={_shape(k)}, "
                 f"v.shape={_shape(v)}")
    tk, n_kv, kd = _shape(k)
    kernel_check(kd == d, f"{name}: head dim differs, got q D={d}, k D={kd}")
    kernel_check(d <= MAX_HEAD_DIM, f"{name}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={d}")
    kernel_check(n_hq % n_kv == 0, f"{name}: Hq must be a multiple of Hkv, got Hq={n_hq}, Hkv={n_kv}")
    kernel_check(_dtype_name(q) in FLOAT_DTYPES, f"{name}: dtype must be one of {FLOAT_DTYPES}, got "
                 f"q.dtype={q.dtype}")
    check_same_kind(name, {"q": q, "k": k, "v": v})
    kernel_check(q.dtype == k.dtype == v.dtype, f"{name}: q, k, v dtypes differ, got {q.dtype}, {k.dtype}, "
                 f"{v.dtype}")
    if gate is not None:
        _check_array(name, "gate", gate, 3, "[Tq, Hq, D]")
        kernel_check(_shape(gate) == _shape(q), f"{name}: gate must have q's shape {_shape(q)}, got "
                     f"gate.shape={_shape(gate)}")
        kernel_check(_dtype_name(gate) in FLOAT_DTYPES, f"{name}: gate dtype must be one of {FLOAT_DTYPES}, "
                     f"got gate.dtype={gate.dtype}")
    kernel_check(isinstance(causal, bool), f"{name}: causal must be a bool, got causal={causal!r}")
    n_seqs = _cu_count(name, "cu_seqlens_q", cu_seqlens_q)
    _cu_count(name, "cu_seqlens_k", cu_seqlens_k, n_expected=n_seqs)
    m_q = _max_len(name, "max_seqlen_q", max_seqlen_q)
    m_k = _max_len(name, "max_seqlen_k", max_seqlen_k)
    scale = _check_scale(name, softmax_scale, d)
    lnc = resolve_lnc(lnc, name)
    itemsize = 4 if _dtype_name(q) == "float32" else 2
    plan = windows_plan(tq, tk, n_seqs, d, itemsize, causal, m_q, m_k)
    two_byte = nl.bfloat16 if itemsize == 2 else nl.float32    # the rule's dtype test for NumPy and torch inputs alike
    if (causal or n_seqs == 1) and tile_short_varlen_path(tq, tk, d, two_byte, causal):
        plan = None     # the packed kernel's tile-major body; non-causal windows of several sequences stay (faster)
    if plan is not None:
        return scale, lnc, plan
    kernel_check(tq <= MAX_PACKED_Q,
                 f"{name}: at most {MAX_PACKED_Q} packed queries (Tq, the row bounds of every query tile stay in "
                 f"SBUF) without a per-sequence window plan (max_seqlen_q / max_seqlen_k), got Tq={tq}")
    need = kv_resident_bytes(tk, d, itemsize)
    kernel_check(need <= _SBUF_KV_BUDGET,
                 f"{name}: one KV head of the packed keys must fit SBUF (K^T + V resident): Tk={tk}, D={d}, "
                 f"{_dtype_name(q)} needs {need} B per partition > {_SBUF_KV_BUDGET}")
    return scale, lnc, None


def _max_len(name, arg, value):
    """A max_seqlen_* argument: None, or an int >= 1 (the wrapper checks that it bounds every length)."""
    import numpy as np
    if value is None:
        return None
    kernel_check(isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1,
                 f"{name}: {arg} must be an int >= 1 or None, got {arg}={value!r}")
    return int(value)


def windows_plan(tq, tk, n, d, itemsize, causal, max_q, max_k):
    """The mode rule (trace-time: shapes and the max_seqlen_* options only, never cu_seqlens values).

    Per-sequence windows (flash_attention_varlen_windows_kernel) when both max_seqlen_q and max_seqlen_k are
    given and the window schedule, N sequences of ceil(mq/128) query tiles, has no more query tiles than the
    packed schedule (ceil(Tq/128)) times _WINDOW_TILE_RATIO, and one window's K^T + V fit the SBUF budget;
    else the packed query tiles with the register-bounded key-block loop. Returns (mq, mk) or None."""
    if max_q is None or max_k is None:
        return None
    mq, mk = min(max_q, tq), min(max_k, tk)
    if causal:
        mk = min(tk, max(mk, mq))
    if n * n_tiles(mq, _Q_TILE) > _WINDOW_TILE_RATIO * n_tiles(tq, _Q_TILE):
        return None
    if window_sbuf_bytes(mq, mk, d, itemsize, causal) > _SBUF_KV_BUDGET:
        return None
    return mq, mk


def window_sbuf_bytes(mq, mk, d, itemsize, causal):
    """Bytes per partition the per-sequence mode keeps for one window: K^T + V, the key masks (bf16, one per
    block) and the causal diagonal masks (at most two per query tile)."""
    keys = n_tiles(mk, K_CHUNK) * K_CHUNK
    kv = n_tiles(d, D_CHUNK) * keys * itemsize + (keys // K_CHUNK) * d * itemsize
    masks = n_tiles(mk, _BLOCK) * _BLOCK * 2
    if causal:
        masks += 2 * n_tiles(mq, _Q_TILE) * _BLOCK * 2
    return kv + masks
