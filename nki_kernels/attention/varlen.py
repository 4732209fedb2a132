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
                     512-key blocks; non-finite V values are zeroed and their key's K row set to NaN, so a
                     non-finite k or v reaches exactly the rows that see that key (its own sequence)
    per query tile:  row r -> lo_r = cu_k[s(r)] = sum_i [cu_q[i] <= r] lenk_i,  end_r = cu_k[s(r)+1],
                     hi_r = end_r (non-causal) or r + end_r - cu_q[s(r)+1] + 1 (causal); kept as
                     mid_r = (lo_r + hi_r - 1) / 2, half_r = (hi_r - lo_r) / 2 for the block masks.
                     lo_r and hi_r never decrease with r, so the tile's keys lie in [lo_first, hi_last): the key
                     blocks jb0 = floor(lo_first / 512) .. jb1 = ceil(hi_last / 512), clamped to the padded
                     K/V, go to two virtual registers (nisa.register_load)
    nl.fori_loop(jb0, jb1) over key blocks j (a compiled loop: one copy of the body, trip count from data):
                     K^T and V of block j -> rotating SBUF tiles by DMA at the register offset (scalar_offset=j)
                     visible = |k0 + col - mid_r| < half_r (k0 = 512 j, a loop-carried [128, 1] counter)
                     for each query head of the KV head's group (they share the block):
                         S = Q K^T; select(visible, S, MASK_BIAS) (not an additive bias: a NaN score of another
                         sequence's key is replaced, not added to); online softmax with loop-carried statistics
                         (m, l, O per head); P^T by PE (2 chunks) and DMA (2 chunks) transposes; O += P V
    after the loop:  out = O / l (rows that see no key: 0), optionally * sigmoid(gate)

Fully masked key blocks (another sequence's keys) are never loaded into the working tiles nor multiplied: a query
tile costs the blocks its own sequences span. Rows that see no key at all (a sequence with queries and no keys,
causal=False) give 0; a query tile of such rows only runs no iteration.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..validation import kernel_check
from ._common import (D_CHUNK, FLOAT_DTYPES, K_CHUNK, MASK_BIAS, MAX_HEAD_DIM, MM_KEYS, is_two_byte,
                      load_transposed, n_tiles, pe_transpose_group)
from .prefill import _Q_TILE, _check_array, _check_scale, _dtype_name, _read_only, _shape

MAX_SEQS = 512                    # N limit: the per-row bounds use [128, N+1] fp32 tiles (5 of them, 10 KiB)
_KV_PIECE = 2048                  # keys per K / V load and containment pass (16 chunks of 128)
_SBUF_KV_BUDGET = 112 * 1024      # bytes per partition for K^T + V of one KV head (the rest: loop tiles, staging)
_BLOCK = MM_KEYS                  # keys per loop iteration: S of one query tile = one fp32 PSUM bank (512 x 4 B)
_BLOCK_SHIFT = _BLOCK.bit_length() - 1   # log2(_BLOCK): block index = key >> 9
_N_CH = _BLOCK // K_CHUNK         # 128-key chunks per block (P^T transposes, PV matmuls)
_PE_T_CHUNKS = _N_CH              # chunks of P transposed on the PE (the rest by DMA transpose): all of them; the
#                                   loop's DMA queues carry the block fetches, the PE has room (modeled)
_STAT_INIT = 3.0e38               # initial -scale * running max: exp(-3e38 + x) = 0 wipes the first rescale
_MAX_GROUP = 16                   # query heads per KV head handled together (the O accumulators: 16 x 1 KiB)


def kv_resident_bytes(tk: int, d: int, itemsize: int) -> int:
    """Bytes per partition kept resident for one KV head (K^T and V, padded to whole 512-key blocks)."""
    keys = n_tiles(tk, _BLOCK) * _BLOCK
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
    group = n_hq // n_kv
    dtype = q.dtype
    n_d = n_tiles(d, D_CHUNK)
    n_q_tiles = n_tiles(tq, _Q_TILE)
    work = _work(n_kv, n_q_tiles, nl.program_id(0), nl.num_programs(0))
    if not work:
        return
    heads = lambda t: t.permute((1, 0, 2))                  # noqa: E731  [T, H, D] -> [H, T, D] view
    q_h, out_h, k_h, v_h = heads(q), heads(out), heads(k), heads(v)
    gate_h = None if gate is None else heads(gate)
    rows = _PackedRows(cu_q, cu_k, tq, causal, sorted({i_q for _, i_q in work}), n_q_tiles, n_tiles(tk, _BLOCK))
    for kvh in sorted({h for h, _ in work}):
        kT_sb, v_sb = _load_kv_blocks(k_h, v_h, kvh, tk, d, n_d, dtype)
        for i_q in [i for h, i in work if h == kvh]:
            _attend_tile(q_h, gate_h, out_h, kT_sb, v_sb, rows, kvh * group, group, i_q, tq, d, n_d, dtype,
                         softmax_scale)


def _load_kv_blocks(k_h, v_h, kvh, tk, d, n_d, dtype):
    """K^T [128(d), n_d, n_blk, 512] and V [128(keys), n_blk, 4, D] of one KV head in SBUF, keys beyond Tk zero
    (a loop iteration copies one whole block at a register offset)."""
    n_blk = n_tiles(tk, _BLOCK)
    kT_sb = nl.ndarray((P_MAX, n_d, n_blk, _BLOCK), dtype=dtype, buffer=nl.sbuf)
    v_sb = nl.ndarray((P_MAX, n_blk, _N_CH, d), dtype=dtype, buffer=nl.sbuf)
    keys = n_blk * _BLOCK
    kT_flat = kT_sb.reshape((P_MAX, n_d, keys))
    v_flat = v_sb.reshape((P_MAX, keys // K_CHUNK, d))
    if tk < keys:                       # zero the padding first (the loads then overwrite the partial chunk)
        c_pad = tk // K_CHUNK
        nisa.memset(dst=v_flat[:, c_pad:keys // K_CHUNK, :], value=0.0, engine=nisa.engine.gpsimd)
        nisa.memset(dst=kT_flat[:, :, tk:keys], value=0.0, engine=nisa.engine.gpsimd)
    _load_kv_contained(k_h, v_h, kvh, tk, d, n_d, dtype, kT_flat, v_flat)
    return kT_sb, v_sb


class _PackedRows:
    """Per-row key intervals [lo_r, hi_r) of the packed sequences, computed on device once per query tile (shared
    by every head): (mid_r, half_r, valid_r) for the block masks, and the tile's key-block range for the loop."""

    def __init__(self, cu_q, cu_k, tq, causal, tiles, n_q_tiles, n_blk):
        n1 = cu_q.shape[0]
        self.n = n1 - 1
        self.causal = causal
        self.n_blk = n_blk
        self.cuq = _broadcast_f32(cu_q, n1)
        cuk = _broadcast_f32(cu_k, n1)
        self.lenk = nl.ndarray((P_MAX, self.n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=self.lenk, data1=cuk[:, 1:n1], data2=cuk[:, 0:self.n], op=nl.subtract)
        if causal:
            self.lenq = nl.ndarray((P_MAX, self.n), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=self.lenq, data1=self.cuq[:, 1:n1], data2=self.cuq[:, 0:self.n], op=nl.subtract)
        # key offset of each score column within a block (0..511), shared by every block
        col_i = nl.ndarray((P_MAX, _BLOCK), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(col_i, pattern=[[1, _BLOCK]], offset=0, channel_multiplier=0)
        self.col = nl.ndarray((P_MAX, _BLOCK), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=self.col, src=col_i, engine=nisa.engine.gpsimd)
        # per query tile: mid_r, half_r, valid_r; first key of the first block (k0) on every partition;
        # the block range [jb0, jb1) as int32 on partition 0
        self.bounds = nl.ndarray((P_MAX, n_q_tiles, 4), dtype=nl.float32, buffer=nl.sbuf)
        self.blocks = nl.ndarray((1, n_q_tiles, 2), dtype=nl.int32, buffer=nl.sbuf)
        for i_q in tiles:
            q0 = i_q * _Q_TILE
            qn = min(_Q_TILE, tq - q0)
            self._tile_bounds(self.bounds[0:qn, i_q], q0, qn)
            self._tile_blocks(i_q, q0, qn)

    def _weighted_count(self, dst, ge, lens, qn):
        """dst[r] = sum_i ge[r, i] * lens[i] (one multiply, one reduce)."""
        prod = nl.ndarray((P_MAX, self.n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=prod[0:qn], data1=ge, data2=lens[0:qn], op=nl.multiply)
        nisa.tensor_reduce(dst=dst, op=nl.add, data=prod[0:qn], axis=1)

    def _interval(self, r_op, qn):
        """(lo, hi) [qn, 1] fp32 tiles for rows r (r_op: a [qn, 1] tile or a trace-time number)."""
        n = self.n
        ge = nl.ndarray((P_MAX, n + 1), dtype=nl.float32, buffer=nl.sbuf)          # [cu_q[i] <= r]
        nisa.tensor_scalar(dst=ge[0:qn], data=self.cuq[0:qn], op0=nl.less_equal, operand0=r_op)
        lo = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)              # cu_k[s(r)]
        self._weighted_count(lo[0:qn], ge[0:qn, 1:n + 1], self.lenk, qn)
        hi = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)              # cu_k[s(r) + 1]
        self._weighted_count(hi[0:qn], ge[0:qn, 0:n], self.lenk, qn)
        if self.causal:
            end_q = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)       # cu_q[s(r) + 1]
            self._weighted_count(end_q[0:qn], ge[0:qn, 0:n], self.lenq, qn)
            nisa.tensor_tensor(dst=hi[0:qn], data1=hi[0:qn], data2=end_q[0:qn], op=nl.subtract)
            nisa.tensor_scalar(dst=hi[0:qn], data=hi[0:qn], op0=nl.add, operand0=r_op, op1=nl.add, operand1=1.0)
        return lo, hi

    def _tile_bounds(self, b, q0, qn):
        """b [qn, 4] = (mid_r, half_r, valid_r, -) for the query rows r = q0 .. q0 + qn - 1."""
        r_i = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(r_i[0:qn], pattern=[[1, 1]], offset=q0, channel_multiplier=1)
        r_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=r_f[0:qn], src=r_i[0:qn], engine=nisa.engine.gpsimd)
        lo, hi = self._interval(r_f[0:qn], qn)
        # mid = (lo + hi - 1) / 2, half = (hi - lo) / 2, valid = hi > lo
        nisa.scalar_tensor_tensor(dst=b[:, 0:1], data=hi[0:qn], op0=nl.add, operand0=-1.0, op1=nl.add,
                                  operand1=lo[0:qn])
        nisa.tensor_scalar(dst=b[:, 0:1], data=b[:, 0:1], op0=nl.multiply, operand0=0.5)
        nisa.tensor_tensor(dst=b[:, 1:2], data1=hi[0:qn], data2=lo[0:qn], op=nl.subtract)
        nisa.tensor_scalar(dst=b[:, 1:2], data=b[:, 1:2], op0=nl.multiply, operand0=0.5)
        nisa.tensor_scalar(dst=b[:, 2:3], data=b[:, 1:2], op0=nl.greater, operand0=0.0)

    def _tile_blocks(self, i_q, q0, qn):
        """Key blocks of the tile: jb0 = floor(lo(q0) / 512), jb1 = ceil(hi(q0 + qn - 1) / 512), both clamped to
        [0, n_blk] (so no DMA offset can leave K^T / V whatever cu_seqlens hold), and k0 = 512 jb0 on every
        partition (the first block's first key)."""
        lo, _ = self._interval(float(q0), P_MAX)
        _, hi = self._interval(float(q0 + qn - 1), P_MAX)
        jb = nl.ndarray((P_MAX, 2), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=jb[:, 0:1], src=lo)
        nisa.tensor_scalar(dst=jb[:, 1:2], data=hi, op0=nl.add, operand0=float(_BLOCK - 1))
        nisa.tensor_scalar(dst=jb, data=jb, op0=nl.maximum, operand0=0.0, op1=nl.minimum,
                           operand1=float(self.n_blk * _BLOCK))
        # exact integers: floor(x / 512) by an arithmetic shift on int32 (ceil for hi by the + 511 above)
        jb_i = nl.ndarray((P_MAX, 2), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=jb_i, src=jb)
        nisa.tensor_scalar(dst=self.blocks[0:1, i_q, :], data=jb_i[0:1], op0=nl.right_shift, operand0=_BLOCK_SHIFT)
        k0_i = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)                    # 512 * jb0
        nisa.tensor_scalar(dst=k0_i, data=jb_i[:, 0:1], op0=nl.right_shift, operand0=_BLOCK_SHIFT,
                           op1=nl.left_shift, operand1=_BLOCK_SHIFT)
        nisa.tensor_copy(dst=self.bounds[:, i_q, 3:4], src=k0_i)

    def block_range(self, i_q):
        """(jb0, jb1) as virtual registers (loaded from SBUF on the device)."""
        regs = []
        for c in range(2):
            r = nisa.register_alloc()
            nisa.register_load(r, self.blocks[0:1, i_q, c:c + 1])
            regs.append(r)
        return regs

    def visible(self, vis, k0_f, i_q, qn):
        """vis [qn, 512] = 1.0 where key k0 + c lies in [lo_r, hi_r): |k0 + c - mid_r| < half_r (GpSimd)."""
        b = self.bounds[0:qn, i_q]
        dist = nl.ndarray((P_MAX, _BLOCK), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=dist[0:qn], data=self.col[0:qn], op0=nl.add, operand0=k0_f[0:qn],
                           op1=nl.subtract, operand1=b[:, 0:1], engine=nisa.engine.gpsimd)
        nisa.tensor_scalar(dst=vis[0:qn], data=dist[0:qn], op0=nl.abs_max, operand0=0.0, op1=nl.less,
                           operand1=b[:, 1:2], engine=nisa.engine.gpsimd)


def _attend_tile(q_h, gate_h, out_h, kT_sb, v_sb, rows, h0, group, i_q, tq, d, n_d, dtype, scale):
    """One query tile of the `group` query heads h0 .. h0 + group - 1 (one KV head) over its key blocks."""
    q0 = i_q * _Q_TILE
    qn = min(_Q_TILE, tq - q0)
    for g0 in range(0, group, _MAX_GROUP):
        gn = min(_MAX_GROUP, group - g0)
        qT = nl.ndarray((P_MAX, gn, n_d, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
        for g in range(gn):
            for i_d in range(n_d):
                d0 = i_d * D_CHUNK
                dn = min(D_CHUNK, d - d0)
                load_transposed(qT[0:dn, g, i_d, 0:qn], q_h[h0 + g0 + g, q0:q0 + qn, d0:d0 + dn], qn, dn, dtype)
        state = _LoopState(gn, qn, d)
        k0_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)        # first key of the current block
        nisa.tensor_copy(dst=k0_f[0:qn], src=rows.bounds[0:qn, i_q, 3:4])
        jb0, jb1 = rows.block_range(i_q)

        def body(j):
            _block_step(j, kT_sb, v_sb, qT, state, rows, k0_f, i_q, qn, gn, d, n_d, dtype, scale)
        nl.fori_loop(jb0, jb1, body)
        for g in range(gn):
            _finish(out_h, gate_h, state, rows, h0 + g0 + g, g, i_q, q0, qn, d, dtype)


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
    kT_blk = nl.ndarray((P_MAX, n_d, _BLOCK), dtype=dtype, buffer=nl.sbuf)
    row = n_d * n_blk * _BLOCK                               # elements per partition of kT_sb
    # one DMA for every d chunk when they have the same rows, else one per chunk (D = 129..255, D % 128 != 0)
    pieces = [(0, n_d, min(P_MAX, d))] if d % D_CHUNK == 0 or n_d == 1 else \
        [(i_d, 1, min(D_CHUNK, d - i_d * D_CHUNK)) for i_d in range(n_d)]
    for i_d, nd, dn in pieces:
        nisa.dma_copy(dst=kT_blk[0:dn, i_d:i_d + nd], src=kT_sb.ap(
            pattern=[[row, dn], [n_blk * _BLOCK, nd], [1, _BLOCK]], offset=i_d * n_blk * _BLOCK, scalar_offset=j,
            indirect_dim=2))
    v_blk = nl.ndarray((P_MAX, _N_CH, d), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=v_blk.reshape((P_MAX, _N_CH * d)), src=v_sb.ap(   # one contiguous run per partition
        pattern=[[n_blk * _N_CH * d, P_MAX], [1, _N_CH * d]], offset=0, scalar_offset=j, indirect_dim=1))
    vis = nl.ndarray((P_MAX, _BLOCK), dtype=nl.bfloat16, buffer=nl.sbuf)
    rows.visible(vis, k0_f, i_q, qn)
    nisa.tensor_scalar(dst=k0_f[0:qn], data=k0_f[0:qn], op0=nl.add, operand0=float(_BLOCK))
    for g in range(gn):
        _head_step(kT_blk, v_blk, qT, state, vis, g, qn, d, n_d, dtype, scale)


def _head_step(kT_blk, v_blk, qT, state, vis, g, qn, d, n_d, dtype, scale):
    """S = Q K^T of one head over the block, masked by select; online softmax update; O = alpha O + P V."""
    s_psum = nl.ndarray((P_MAX, _BLOCK), dtype=nl.float32, buffer=nl.psum)
    for i_d in range(n_d):
        dn = min(D_CHUNK, d - i_d * D_CHUNK)
        nisa.nc_matmul(s_psum[0:qn], qT[0:dn, g, i_d, 0:qn], kT_blk[0:dn, i_d, :], accumulate=i_d > 0)
    masked = nl.where(vis[0:qn], s_psum[0:qn], MASK_BIAS)
    m_blk = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)                 # -rowmax of the block
    nisa.tensor_reduce(dst=m_blk[0:qn], op=nl.maximum, data=masked, axis=1, negate=True)
    nm_new = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)               # min(neg_m, -scale max)
    nisa.tensor_scalar(dst=nm_new[0:qn], data=m_blk[0:qn], op0=nl.multiply, operand0=scale, op1=nl.minimum,
                       operand1=state.neg_m[0:qn, g:g + 1], engine=nisa.engine.gpsimd)
    alpha = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)                # e^(neg_m_new - neg_m_old)
    nisa.activation(dst=alpha[0:qn], op=nl.exp, data=state.neg_m[0:qn, g:g + 1], bias=nm_new[0:qn], scale=-1.0)
    nisa.tensor_copy(dst=state.neg_m[0:qn, g:g + 1], src=nm_new[0:qn], engine=nisa.engine.gpsimd)
    p_sb = nl.ndarray((P_MAX, _BLOCK), dtype=dtype, buffer=nl.sbuf)
    row_sum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p_sb[0:qn], op=nl.exp, data=masked, bias=nm_new[0:qn], scale=scale, reduce_op=nl.add,
                    reduce_res=row_sum[0:qn], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    pT = _probs_transposed(p_sb, qn, dtype)
    pv_psum = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.psum)
    for c in range(_N_CH):
        nisa.nc_matmul(pv_psum[0:qn], pT[:, c, 0:qn], v_blk[:, c, :], accumulate=c > 0)
    o = state.o[0:qn, g, :]
    nisa.scalar_tensor_tensor(dst=o, data=o, op0=nl.multiply, operand0=alpha[0:qn], op1=nl.add,
                              operand1=pv_psum[0:qn])
    l_ = state.l[0:qn, g:g + 1]
    nisa.scalar_tensor_tensor(dst=l_, data=l_, op0=nl.multiply, operand0=alpha[0:qn], op1=nl.add,
                              operand1=row_sum[0:qn])


def _probs_transposed(p_sb, qn, dtype):
    """P^T [128(keys), 4, 128(rows)]: chunks 0.._PE_T_CHUNKS-1 on the PE (one PSUM bank, evicted by ScalarE), the
    rest (bf16/fp16 only) by one SBUF->SBUF DMA transpose."""
    pT = nl.ndarray((P_MAX, _N_CH, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
    n_pe = _PE_T_CHUNKS if is_two_byte(dtype) else _N_CH
    t_psum = nl.ndarray((P_MAX, n_pe, _Q_TILE), dtype=dtype, buffer=nl.psum)
    for c in range(n_pe):
        nisa.nc_transpose(dst=t_psum[:, c, 0:qn], data=p_sb[0:qn, c * K_CHUNK:(c + 1) * K_CHUNK])
    nisa.activation(dst=pT[:, 0:n_pe, 0:qn], op=nl.copy, data=t_psum[:, :, 0:qn])
    if n_pe < _N_CH:
        src = p_sb[0:qn, n_pe * K_CHUNK:_BLOCK].reshape((qn, _N_CH - n_pe, K_CHUNK))
        nisa.dma_transpose(dst=pT[:, n_pe:_N_CH, 0:qn], src=src)
    return pT


def _finish(out_h, gate_h, state, rows, h, g, i_q, q0, qn, d, dtype):
    """out = O / l for rows that see a key, 0 for the others (l + 1 - valid keeps the reciprocal finite when a
    tile ran no block), optionally * sigmoid(gate); one DMA to HBM."""
    valid = rows.bounds[0:qn, i_q, 2:3]
    inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=inv_l[0:qn], data=valid, op0=nl.multiply, operand0=-1.0, op1=nl.add,
                              operand1=state.l[0:qn, g:g + 1])
    nisa.tensor_scalar(dst=inv_l[0:qn], data=inv_l[0:qn], op0=nl.add, operand0=1.0)
    nisa.reciprocal(dst=inv_l[0:qn], data=inv_l[0:qn])
    nisa.tensor_tensor(dst=inv_l[0:qn], data1=inv_l[0:qn], data2=valid, op=nl.multiply, engine=nisa.engine.gpsimd)
    o = state.o[0:qn, g, :]
    o_sb = nl.ndarray((P_MAX, d), dtype=dtype, buffer=nl.sbuf)
    if gate_h is None:
        nisa.tensor_scalar(dst=o_sb[0:qn], data=o, op0=nl.multiply, operand0=inv_l[0:qn], engine=nisa.engine.gpsimd)
    else:
        gate_sb = nl.ndarray((P_MAX, d), dtype=gate_h.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=gate_sb[0:qn], src=gate_h[h, q0:q0 + qn, 0:d])
        sig_sb = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sig_sb[0:qn], op=nl.sigmoid, data=gate_sb[0:qn])
        nisa.tensor_scalar(dst=sig_sb[0:qn], data=sig_sb[0:qn], op0=nl.multiply, operand0=inv_l[0:qn],
                           engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=o_sb[0:qn], data1=o, data2=sig_sb[0:qn], op=nl.multiply, engine=nisa.engine.gpsimd)
    nisa.dma_copy(dst=out_h[h, q0:q0 + qn, 0:d], src=o_sb[0:qn])


def _broadcast_f32(cu, n1):
    """cu [N+1] int32 in HBM -> [128, N+1] fp32 in SBUF, the same on every partition (stride-0 DMA)."""
    cu_i = nl.ndarray((P_MAX, n1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=cu_i, src=cu.ap(pattern=[[0, P_MAX], [1, n1]], offset=0))
    cu_f = nl.ndarray((P_MAX, n1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cu_f, src=cu_i, engine=nisa.engine.gpsimd)
    return cu_f


def _load_kv_contained(k_h, v_h, kvh, tk, d, n_d, dtype, kT_sb, v_sb):
    """K^T -> kT_sb [128(d), n_d, >= Tk] and V -> v_sb [128(keys), >= ceil(Tk/128), D] of one KV head, with
    non-finite values contained.

    K and V are loaded in natural layout (key p of chunk c = key c*128 + p on partition p) in 2048-key pieces.
    A key whose V row holds a non-finite value gets V row := 0 and K row := NaN (the K row's own non-finite
    values stay): its score is then NaN exactly for the rows that see it (the row mask is a select), and the
    P V matmul never multiplies a non-finite V by another sequence's zero probability. K^T: PE transposes,
    `pe_transpose_group` chunks per PSUM bank, evicted by the Scalar engine.
    """
    per_bank = pe_transpose_group(dtype)
    t_psum = nl.ndarray((P_MAX, 2, per_bank, P_MAX), dtype=dtype, buffer=nl.psum)
    n_t = 0
    for s0 in range(0, tk, _KV_PIECE):
        sn = min(_KV_PIECE, tk - s0)
        c0 = s0 // K_CHUNK
        full = sn // K_CHUNK
        rem = sn - full * K_CHUNK
        pieces = ([(0, full, K_CHUNK)] if full else []) + ([(full, 1, rem)] if rem else [])
        k_nat = nl.ndarray((P_MAX, _KV_PIECE // K_CHUNK, d), dtype=dtype, buffer=nl.sbuf)
        v_nat = nl.ndarray((P_MAX, _KV_PIECE // K_CHUNK, d), dtype=dtype, buffer=nl.sbuf)
        for c_lo, nc, rows in pieces:
            a0 = s0 + c_lo * K_CHUNK
            for src, dst in ((k_h, k_nat), (v_h, v_nat)):
                view = src[kvh, a0:a0 + nc * rows, 0:d].reshape((nc, rows, d)).permute((1, 0, 2))
                nisa.dma_copy(dst=dst[0:rows, c_lo:c_lo + nc, 0:d], src=view)
            _contain(k_nat[0:rows, c_lo:c_lo + nc, 0:d], v_nat[0:rows, c_lo:c_lo + nc, 0:d],
                     v_sb[0:rows, c0 + c_lo:c0 + c_lo + nc, 0:d], rows, nc, d)
        # K^T of the piece on the PE
        n_c = full + (1 if rem else 0)
        for i_d in range(n_d):
            d0 = i_d * D_CHUNK
            dn = min(D_CHUNK, d - d0)
            for g0 in range(0, n_c, per_bank):
                gn = min(per_bank, n_c - g0)
                slot = n_t % 2
                n_t += 1
                for i_c in range(gn):
                    c = g0 + i_c
                    cn = min(K_CHUNK, sn - c * K_CHUNK)
                    nisa.nc_transpose(dst=t_psum[0:dn, slot, i_c, 0:cn], data=k_nat[0:cn, c, d0:d0 + dn])
                keys0 = s0 + g0 * K_CHUNK
                keys = min(gn * K_CHUNK, sn - g0 * K_CHUNK)
                nisa.activation(dst=kT_sb[0:dn, i_d, keys0:keys0 + keys], op=nl.copy,
                                data=t_psum[0:dn, slot, 0:gn, 0:P_MAX].reshape((dn, gn * P_MAX))[:, 0:keys])
    return kT_sb, v_sb


def _contain(k_nat, v_nat, v_dst, rows, nc, d):
    """v_dst = V with non-finite values zeroed; K rows of keys with a non-finite V value := NaN (in place)."""
    diff = nl.ndarray((P_MAX, nc, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=diff[0:rows], data1=v_nat, data2=v_nat, op=nl.subtract)       # 0, or NaN if not finite
    fin = nl.ndarray((P_MAX, nc, d), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=fin[0:rows], data=diff[0:rows], op0=nl.equal, operand0=0.0)
    clean = nl.where(fin[0:rows], v_nat, 0.0)
    nisa.tensor_copy(dst=v_dst, src=clean, engine=nisa.engine.gpsimd)
    row_ok = nl.ndarray((P_MAX, nc), dtype=nl.float32, buffer=nl.sbuf)                    # 1: the V row is finite
    nisa.tensor_reduce(dst=row_ok[0:rows], op=nl.minimum, data=fin[0:rows], axis=2)
    poison = nl.ndarray((P_MAX, nc), dtype=nl.float32, buffer=nl.sbuf)                    # 0, or NaN
    nisa.reciprocal(dst=poison[0:rows], data=row_ok[0:rows])                             # 1, or +inf
    nisa.tensor_tensor(dst=poison[0:rows], data1=poison[0:rows], data2=poison[0:rows], op=nl.subtract)
    for c in range(nc):
        nisa.tensor_scalar(dst=k_nat[:, c, :], data=k_nat[:, c, :], op0=nl.add, operand0=poison[0:rows, c:c + 1])


# ============================================================================ host wrapper


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
    kernel_check(arr.ndim == 1 and arr.shape[0] >= 2,
                 f"{name}: {arg} must be 1-D [N+1] with N >= 1, got {arg}.shape={arr.shape}")
    kernel_check(np.issubdtype(arr.dtype, np.integer), f"{name}: {arg} must be integers, got {arg}.dtype={arr.dtype}")
    n = arr.shape[0] - 1
    if n_expected is not None:
        kernel_check(n == n_expected, f"{name}: cu_seqlens_q and cu_seqlens_k must describe the same number of "
                     f"sequences, got N={n_expected} and {arg} N={n}")
    kernel_check(n <= MAX_SEQS, f"{name}: at most {MAX_SEQS} sequences, got {arg} N={n}")
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
    kernel_check(q.dtype == k.dtype == v.dtype, f"{name}: q, k, v dtypes differ, got {q.dtype}, {k.dtype}, "
                 f"{v.dtype}")
    if gate is not None:
        _check_array(name, "gate", gate, 3, "[Tq, Hq, D]")
        kernel_check(_shape(gate) == _shape(q), f"{name}: gate must have q's shape {_shape(q)}, got "
                     f"gate.shape={_shape(gate)}")
        kernel_check(_dtype_name(gate) in FLOAT_DTYPES, f"{name}: gate dtype must be one of {FLOAT_DTYPES}, "
                     f"got gate.dtype={gate.dtype}")
    kernel_check(isinstance(causal, bool), f"{name}: causal must be a bool, got causal={causal!r}")
    cu_q = _cu_values(name, "cu_seqlens_q", cu_seqlens_q, tq)
    cu_k = _cu_values(name, "cu_seqlens_k", cu_seqlens_k, tk, n_expected=len(cu_q) - 1)
    if causal:
        import numpy as np
        lq, lk = np.diff(cu_q), np.diff(cu_k)
        short = np.nonzero(lk < lq)[0]
        kernel_check(short.size == 0, f"{name}: with causal=True every sequence needs at least as many keys as "
                     f"queries (bottom-right aligned), got sequence {int(short[0]) if short.size else -1} with "
                     f"{int(lq[short[0]]) if short.size else 0} queries and "
                     f"{int(lk[short[0]]) if short.size else 0} keys (cu_seqlens_q, cu_seqlens_k)")
    _band(name, cu_q, cu_k, causal, max_seqlen_q, max_seqlen_k, tq, tk)
    scale = _check_scale(name, softmax_scale, d)
    lnc = resolve_lnc(lnc, name)
    itemsize = 4 if _dtype_name(q) == "float32" else 2
    need = kv_resident_bytes(tk, d, itemsize)
    kernel_check(need <= _SBUF_KV_BUDGET,
                 f"{name}: one KV head of the packed keys must fit SBUF (K^T + V resident): Tk={tk}, D={d}, "
                 f"{_dtype_name(q)} needs {need} B per partition > {_SBUF_KV_BUDGET}")
    q, k, v, gate = (_read_only(x) for x in (q, k, v, gate))
    return call(flash_attention_varlen_kernel, q, k, v, gate, cu_q, cu_k, scale, causal, lnc=lnc)


def _max_len(name, arg, value, lens):
    """A max_seqlen_* argument: None, or an int >= 1 that bounds every length (host check)."""
    import numpy as np
    if value is None:
        return None
    kernel_check(isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1,
                 f"{name}: {arg} must be an int >= 1 or None, got {arg}={value!r}")
    longest = int(np.max(lens)) if len(lens) else 0
    kernel_check(longest <= int(value), f"{name}: {arg} must bound every sequence length, got {arg}={int(value)} "
                 f"and a sequence of {longest}")
    return int(value)


def _band(name, cu_q, cu_k, causal, max_seqlen_q, max_seqlen_k, tq, tk):
    """(lo, hi): row r sees keys in [r - lo, r + hi) at most; None when no max_seqlen_q is given."""
    import numpy as np
    m_q = _max_len(name, "max_seqlen_q", max_seqlen_q, np.diff(cu_q))
    _max_len(name, "max_seqlen_k", max_seqlen_k, np.diff(cu_k))
    if m_q is None:
        return None
    if causal:                       # cu_k[s] >= cu_q[s] > r - m_q; key <= r + Tk - Tq
        return (m_q - 1, tk - tq + 1)
    kernel_check(tq == tk and bool(np.array_equal(cu_q, cu_k)),
                 f"{name}: with causal=False, max_seqlen_q bounds the key band only for self-attention packing "
                 f"(cu_seqlens_k equal to cu_seqlens_q); got different cu_seqlens_q and cu_seqlens_k (pass "
                 f"max_seqlen_q=None)")
    return (m_q - 1, m_q)
