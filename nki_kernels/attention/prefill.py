"""Flash attention prefill (context encoding) for head_dim up to 256, BHSD in and out, GQA without KV copies.

Loop nest (per program instance; docs/attention.md has the memory plan and the analysis):

    for each (b, kv head) this core owns:
        K^T [D, Skv] (DMA transpose on load) and V [Skv, D] -> SBUF once; shared by the group's query heads
        all (query head, 128-row query tile) streams of the group, longest first, flow through one software
        pipeline of _N_STREAMS slots; in pipeline step t each slot handles one 512-key block of its current stream:
            QK of block t (PSUM, D contracted in 128-row chunks)
            mask (runtime valid lengths: a select from an on-device validity tile, so a NaN/Inf score of a
            padded key is replaced, never added to; causal diagonal block: cached affine_select bias)
            running max (negated, scaled domain), P = exp(scale*S - scale*m) with row sums, alpha
            P^T of block t-1 on the PE (all four 128-key chunks; no DMA transposes of P)
            P V of block t-2 and O = alpha*O + PV (one PSUM bank, fp32)
        a stream's last PV writes out = O / l (padded query rows: 0), optionally * sigmoid(gate)
    Key blocks entirely above the causal diagonal are never generated (trace-time skip).

Padding (seq_lens): positions >= seq_lens[b] may hold anything (NaN, Inf, 1e30). V rows past the length are
zeroed in SBUF by a predicated copy, Q rows past it are zeroed before their transpose and the gate rows past
it before the sigmoid, and padded keys' scores are selected to MASK_BIAS; valid rows then see exactly the
values they would see with zeros in the padding (bit-identical outputs), and padded rows are 0.
"""
from __future__ import annotations

import functools
import math

from ..backend import call, nki, nisa, nl
from ..hw import NO_PE_TILE32_TARGETS, P_MAX
from ..lnc import current_target_name, for_target, resolve_lnc
from ..transpose import mixing_pe_transpose
from ..validation import check_same_kind, kernel_check
from ..validation import dtype_name as _dtype_name
from ._common import (D_CHUNK, FLOAT_DTYPES, K_CHUNK, KV_BLOCK, MASK_BIAS, MAX_HEAD_DIM, MAX_SOFTMAX_SCALE,
                      MM_KEYS, exact_transpose, is_two_byte, load_len_broadcast, load_t, load_transposed, n_tiles,
                      zero_rows_past_length)
from .short_tiles import tile_short_body, tile_short_path

_Q_TILE = P_MAX                   # query rows per tile (partitions of S, O)
_BLOCK_2BYTE = MM_KEYS            # keys per softmax block for bf16/fp16: S of one stream = 1 PSUM bank
_BLOCK_FP32 = MM_KEYS             # keys per softmax block for fp32
_N_STREAMS = 2                    # pipeline slots (query tiles in flight). PSUM, bf16: S 2 slots x 2 buffers x 1 bank
#                                   + PV 2 x 2 x 1 KiB (2 banks) + P^T 1 bank + Q^T 1 bank = 8 banks; fp32: S single-
#                                   buffered (2) + P^T (2) + PV (2) + Q^T (1) = 7 banks
_S_RING = 2                       # score PSUM buffers per slot (bf16/fp16)
_O_UPDATE_ON_POOL = False         # O = O*alpha + PV: one VectorE op (False), ScalarE eviction + GpSimd (True),
#                                   or "odd" (odd slots on ScalarE + GpSimd); False models fastest on trn2
_MAX_DIAG_TILES = 8               # distinct causal-diagonal bias tiles kept in SBUF (1 KiB per partition each)
_GENS = 3                         # per-slot stream state generations: PV lags QK by 2 steps
_RING = 3                         # pipeline depth of the P / P^T buffers (PV runs two blocks behind QK)
_IO_ROW_BYTES = 2048              # q, gate and out of a query tile move for up to this many bytes of consecutive heads
#                                   per partition in one DMA (bf16, D=256: 4 heads, 2 KiB packet rows instead of 512 B:
#                                   cost model v3, 80% of an engine's rate instead of 20%)
_KV_LOAD_KEYS = 2048              # keys per K^T / V load DMA: >= 2 KiB per partition for bf16 K^T pieces
_KT_FIRST_KEYS = 1024             # keys of the first K^T load DMA, before the first Q^T (then V and the rest)
_SHORT_SKV = MM_KEYS              # Skv up to one PSUM bank of fp32 scores: the partition-major short body (below)
_SHORT_LAG = 2                    # short body: P V of a query tile two tiles behind its scores (P in a ring of 3;
#                                   cost model v10: 13.85 us at S=512 with a lag of 3, 13.68 with 2, 13.74 with 4)
# bytes per partition for the resident K^T + V (+ length bias) of one KV head, per target: ~80 KiB of the partition
# (hw.SBUF_BYTES_PER_PARTITION) stay for the per-tile working tiles (trn2: 128 KiB of 208 KiB; trn1's 176 KiB
# partition leaves 96 KiB, where 128 KiB let fp32 D > 128 shapes fail the allocation; trn3 kept at trn2's)
_SBUF_KV_BUDGET = {"trn1": 96 * 1024, "trn2": 128 * 1024, "trn3": 128 * 1024}


def kv_resident_bytes(skv: int, d: int, itemsize: int, with_lens: bool) -> int:
    """Bytes per partition the kernel keeps resident for one KV head (K^T, V, key-length bias)."""
    kt = n_tiles(d, D_CHUNK) * skv * itemsize
    vv = n_tiles(skv, K_CHUNK) * d * itemsize
    bias = skv * 2 if with_lens else 0
    return kt + vv + bias


def _owner(b, kvh, g, i_q, n_kv, n_q_tiles, n_b, n_prog):
    """Which program instance computes (b, kv head, q head of the group, q tile)."""
    if n_prog == 1:
        return 0
    if (n_b * n_kv) % n_prog == 0:                 # whole KV heads per core: no duplicated K/V loads
        return (b * n_kv + kvh) % n_prog
    # else deal the (query head, query tile) streams out in a snake (0, 1, 1, 0, 0, 1, ...): under causal masking
    # tile i has i + 1 key chunks, so alternating tiles gave the odd core 8 / 7 of the even core's work at 16 tiles
    u = g * n_q_tiles + i_q
    r = u % n_prog
    return r if (u // n_prog) % 2 == 0 else n_prog - 1 - r


@nki.jit
def flash_attention_kernel(q, k, v, gate, seq_lens, softmax_scale, causal):
    """Flash attention forward: out = softmax(scale * Q K^T + mask) V, optionally * sigmoid(gate).

    Dimensions:
        B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0), Sq queries, Skv keys (Skv >= Sq; the queries
        are the last Sq positions), D head dim (1..256).
    Args:
        q: [B, Hq, Sq, D] @ HBM, bf16/fp16/fp32.
        k: [B, Hkv, Skv, D] @ HBM, q's dtype.
        v: [B, Hkv, Skv, D] @ HBM, q's dtype.
        gate: [B, Hq, Sq, D] @ HBM or None: output gate, out * sigmoid(gate).
        seq_lens: [B] int32 @ HBM or None: valid length of each sequence in key positions (0..Skv); keys
            at positions >= seq_lens[b] are never attended, query rows at positions >= seq_lens[b] give 0.
        softmax_scale: float (trace-time).
        causal: bool (trace-time); bottom-right aligned: query i may see key j iff j <= Skv - Sq + i.
    Returns:
        out: [B, Hq, Sq, D] @ HBM, q's dtype.
    Constraints:
        D <= MAX_HEAD_DIM (256); resident K^T + V of one KV head <= _SBUF_KV_BUDGET[target] bytes per partition.
    Pseudocode:
        for b, kvh: load K^T, V; for waves of _N_STREAMS (q head, q tile) pairs, in lockstep over key blocks:
            S = Q K^T + bias; m' = max(m, rowmax S); P = exp(scale (S - m')); alpha = exp(scale (m - m'))
            l = l alpha + rowsum P; O = O alpha + P V          (PV two blocks behind the scores: pipelined)
            out = O / l * valid_q (* sigmoid(gate))
    """
    n_b, n_hq, sq, d = q.shape
    out = nl.ndarray((n_b, n_hq, sq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    prefill_body(q, k, v, gate, seq_lens, out, softmax_scale, causal)
    return out


def prefill_body(q, k, v, gate, seq_lens, out, softmax_scale, causal, bhds=False, short=None):
    """The kernel body. bhds=True is only for the microbench baseline: q and k arrive host-permuted as
    [B, H, D, S] (Q^T and K^T copied without transposes); out is always BHSD. short: None = the shape rule
    (`short_path`), False = the pipeline for every shape (the NxDI-style baseline)."""
    n_b, n_hq, sq, d = out.shape
    n_kv = k.shape[1]
    skv = k.shape[3] if bhds else k.shape[2]
    if short is not False and short_path(sq, skv, bhds):
        body = tile_short_body if tile_short_path(sq, skv, d, q.dtype, bhds) else short_prefill_body
        body(q, k, v, gate, seq_lens, out, softmax_scale, causal)
        return
    group = n_hq // n_kv
    dtype = q.dtype
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_q_tiles = n_tiles(sq, _Q_TILE)
    n_d = n_tiles(d, D_CHUNK)
    for b in range(n_b):
        views = (q[b], None if gate is None else gate[b], out[b])      # [H, S, D] of sequence b
        for kvh in range(n_kv):
            work = [(g, i_q) for i_q in range(n_q_tiles) for g in range(group)
                    if _owner(b, kvh, g, i_q, n_kv, n_q_tiles, n_b, n_prog) == pid]
            if not work:
                continue
            # trn1: K rows past the length are zeroed before their PE transposes (a NaN there would reach every
            # query through the identity matmul), so the length is loaded first there
            k_len = load_len_broadcast(seq_lens, b, P_MAX) if seq_lens is not None and mixing_pe_transpose() else None
            kT_sb = nl.ndarray((P_MAX, n_d, skv), dtype=dtype, buffer=nl.sbuf)
            pieces = _kT_pieces(skv)
            _load_kT(kT_sb, k[b], kvh, pieces[:1], d, n_d, dtype, bhds, k_len=k_len)
            v_sb = nl.ndarray((P_MAX, n_tiles(skv, K_CHUNK), d), dtype=dtype, buffer=nl.sbuf)
            len_f = None
            klen_valid = None
            if seq_lens is not None:
                len_f = k_len if k_len is not None else load_len_broadcast(seq_lens, b, P_MAX)
                klen_valid = _key_valid(len_f, skv)

            # the rest of K^T and V load behind the first streams' Q^T, one piece per pipeline step
            # (K^T keys, V keys loaded once it is issued, the load)
            first = sum(pieces[0])
            loads = [(first, 0, None),
                     (first, first, functools.partial(_load_v, v[b], kvh, pieces[0], d, v_sb, len_f))]
            if len(pieces) > 1:
                loads.append((skv, skv, functools.partial(_load_kv_rest, k[b], v[b], kvh, pieces[1:], d, n_d, dtype,
                                                          bhds, k_len, kT_sb, v_sb, len_f)))
            # the longest streams first: under causal masking the one-block streams (query tile 0) come last, so
            # the pipeline drains with little work behind the last scores (cost model v10, S=2048: 84.12 -> 83.37
            # us; with their finish from PSUM, below, 82.11)
            items = [(kvh * group + g, i_q * _Q_TILE, sq) for g, i_q in sorted(work, key=lambda w: (-w[1], w[0]))]
            _attend_pipeline(*views, kT_sb, v_sb, len_f, klen_valid, items, skv, d, n_d, dtype,
                             softmax_scale, causal, bhds, loads=loads)


class _Stream:
    """Trace-time bookkeeping of one (query head, 128-row query tile) in a wave."""

    def __init__(self, h, q0, sq, skv, causal, block, band=None):
        self.h = h
        self.q0 = q0
        self.qn = min(_Q_TILE, sq - q0)
        self.qa0 = skv - sq + q0                                    # absolute position of the first query
        self.k_end = min(skv, self.qa0 + self.qn) if causal else skv  # later keys: above the diagonal
        self.j0 = 0                                                 # first key block
        if band is not None:    # packed sequences (varlen.py): keys r - lo_off .. r + hi_off may be visible
            lo_off, hi_off = band
            self.j0 = max(0, q0 - lo_off) // block
            self.k_end = min(self.k_end, q0 + self.qn + hi_off)
        self.n_blk = n_tiles(self.k_end, block)
        self.qT = None                                              # Q^T view when not in the slot buffers
        self.o_src = None                                           # O when not in the slot accumulators (PSUM)

    def keys(self, j, block):
        return min(block, self.k_end - j * block)


class _DiagonalBias:
    """Causal bias tiles [128, block] bf16 (0 where query p may see key j, i.e. offset + p - j >= 0, else
    MASK_BIAS), built once per distinct offset on the GpSimd and reused by every diagonal block."""

    def __init__(self, block):
        self.block = block
        self.tiles = {}
        self.store = None

    def __call__(self, offset):
        if offset not in self.tiles:
            n = len(self.tiles)
            if self.store is None or n == self.store.shape[1]:
                self.store = nl.ndarray((P_MAX, _MAX_DIAG_TILES, self.block), dtype=nl.bfloat16, buffer=nl.sbuf)
                self.tiles = {}
                n = 0
            zeros = nl.ndarray((P_MAX, self.block), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.memset(dst=zeros, value=0.0, engine=nisa.engine.gpsimd)
            nisa.affine_select(dst=self.store[:, n, :], pattern=[[-1, self.block]], offset=offset,
                               channel_multiplier=1, on_true_tile=zeros, on_false_value=MASK_BIAS,
                               cmp_op=nl.greater_equal)
            self.tiles[offset] = self.store[:, n, :]
        return self.tiles[offset]


def _block_keys(dtype):
    return _BLOCK_2BYTE if is_two_byte(dtype) else _BLOCK_FP32


def _load_kT(kT_sb, k, kvh, pieces, d, n_d, dtype, bhds=False, k_len=None):
    """Keys s0 .. s0 + sn of K^T [128(d), n_d, Skv] of one KV head into kT_sb, for each (s0, sn) of pieces (k:
    [Hkv, Skv, D] view of one sequence). k_len (trn1, with a length): K rows past it are zeroed before any PE
    transpose."""
    for s0, sn in pieces:
        for i_d in range(n_d):
            d0 = i_d * D_CHUNK
            dn = min(D_CHUNK, d - d0)
            if bhds:
                nisa.dma_copy(dst=kT_sb[0:dn, i_d, s0:s0 + sn], src=k[kvh, d0:d0 + dn, s0:s0 + sn])
            else:
                load_transposed(kT_sb[0:dn, i_d, s0:s0 + sn], k[kvh, s0:s0 + sn, d0:d0 + dn], sn, dn, dtype,
                                row_len=k_len, row0=s0)


def _kT_pieces(skv):
    """(first key, keys) of the K^T load DMAs: the first _KT_FIRST_KEYS alone (the first streams' scores start
    when it is in), then pieces of _KV_LOAD_KEYS."""
    first = min(skv, _KT_FIRST_KEYS) if _KT_FIRST_KEYS else 0
    out = [(0, first)] if first else []
    for s0 in range(first, skv, _KV_LOAD_KEYS):
        out.append((s0, min(_KV_LOAD_KEYS, skv - s0)))
    return out


def _load_v(v, kvh, piece, d, v_sb, len_f=None):
    """Keys s0 .. s0 + sn (piece) of V [128(keys), n_chunks, D] of one KV head into v_sb (v: [Hkv, Skv, D] view of
    one sequence; s0 a multiple of 128); v_sb[p, c] holds key c*128 + p. With a length, rows past it are zeroed."""
    s0, sn = piece
    c0 = s0 // K_CHUNK
    full = sn // K_CHUNK
    if full:
        src = v[kvh, s0:s0 + full * K_CHUNK, 0:d].reshape((full, K_CHUNK, d)).permute((1, 0, 2))
        nisa.dma_copy(dst=v_sb[0:K_CHUNK, c0:c0 + full, 0:d], src=src)
    rem = sn - full * K_CHUNK
    if rem:
        nisa.dma_copy(dst=v_sb[0:rem, c0 + full, 0:d], src=v[kvh, s0 + full * K_CHUNK:s0 + sn, 0:d])
    if len_f is not None:
        zero_rows_past_length(v_sb[:, c0:c0 + n_tiles(sn, K_CHUNK), :], len_f, s0, K_CHUNK)


def _load_kv_rest(k, v, kvh, pieces, d, n_d, dtype, bhds, k_len, kT_sb, v_sb, len_f):
    """K^T, then V, of the keys in pieces."""
    _load_kT(kT_sb, k, kvh, pieces, d, n_d, dtype, bhds, k_len=k_len)
    for pc in pieces:
        _load_v(v, kvh, pc, d, v_sb, len_f)


def _key_valid(len_f, skv):
    """[128, Skv] bf16: 1.0 where key position < seq_len, 0.0 beyond (same on every partition). GpSimd."""
    valid_sb = nl.ndarray((P_MAX, skv), dtype=nl.bfloat16, buffer=nl.sbuf)
    for s0 in range(0, skv, KV_BLOCK):
        sn = min(KV_BLOCK, skv - s0)
        pos_sb = nl.ndarray((P_MAX, KV_BLOCK), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(pos_sb[:, 0:sn], pattern=[[1, sn]], offset=s0, channel_multiplier=0)
        nisa.tensor_scalar(dst=valid_sb[:, s0:s0 + sn], data=pos_sb[:, 0:sn], op0=nl.less, operand0=len_f,
                           engine=nisa.engine.gpsimd)
    return valid_sb


def _attend_pipeline(q, gate, out, kT_sb, v_sb, len_f, klen_valid, items, skv, d, n_d, dtype, softmax_scale,
                     causal, q_is_bhds=False, rows=None, band=None, loads=None):
    """All (query head, query tile) streams of one KV head through one software pipeline.

    q, gate, out: [H, S, D] HBM views of one sequence (gate may be None). rows: None, or a per-row mask
    provider (the packed-sequence kernel, varlen.py) with start(st), mask(scores, st, j, k0, kn) and
    finish_scale(inv_l, st) (optionally: store(out, o_sb, st), which then writes the output rows; q_rows(st), Q
    rows already in SBUF; out_tile(st), where to put the output rows); it
    replaces the length and causal biases. q and gate may be any object whose [h, r0:r1, 0:d] is a DMA source.
    band: None, or (lo, hi) such that query
    row r can only see keys r - lo .. r + hi - 1 (trace-time: blocks outside are never generated).

    _N_STREAMS slots each run a queue of streams back to back. In step t every slot computes the scores and
    softmax of its current block, the PE transposes P of step t-1 and
    multiplies P V of step t-2, so every engine always has independent work queued in program order and the
    pipeline never drains between query tiles. Per-stream state rotates over _GENS generations (a new
    stream may start while the PV of the stream two before it in the slot is still pending).
    """
    block = _block_keys(dtype)
    n_ch = block // K_CHUNK                              # 128-key chunks per block
    n_slot = min(_N_STREAMS, len(items))
    max_blk = n_tiles(skv, block)
    queues = [[_Stream(h, q0, sq_, skv, causal, block, band) for (h, q0, sq_) in items[s::n_slot]]
              for s in range(n_slot)]
    # ---- per-stream state, [slot, generation]: Q^T, statistics per block, accumulators
    qT_sb = nl.ndarray((P_MAX, n_slot, _GENS, n_d, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
    m_blk = nl.ndarray((P_MAX, n_slot, 1), dtype=nl.float32, buffer=nl.sbuf)            # -rowmax of a block
    neg_m = nl.ndarray((P_MAX, n_slot, _GENS, max_blk), dtype=nl.float32, buffer=nl.sbuf)    # -scale * running max
    alpha = nl.ndarray((P_MAX, n_slot, _GENS, max_blk), dtype=nl.float32, buffer=nl.sbuf)    # e^(neg_m_j - neg_m_{j-1})
    row_sum = nl.ndarray((P_MAX, n_slot, _GENS, max_blk), dtype=nl.float32, buffer=nl.sbuf)
    l_sb = nl.ndarray((P_MAX, n_slot, _GENS, 1), dtype=nl.float32, buffer=nl.sbuf)
    o_acc = nl.ndarray((P_MAX, n_slot, _GENS, d), dtype=nl.float32, buffer=nl.sbuf)
    # ---- pipeline buffers
    s_ring = _S_RING if is_two_byte(dtype) else 1        # S double-buffered: QK of block j+1 overlaps softmax j
    s_psum = nl.ndarray((P_MAX, s_ring, n_slot, block), dtype=nl.float32, buffer=nl.psum)
    pv_sb = nl.ndarray((P_MAX, n_slot, d), dtype=nl.float32, buffer=nl.sbuf)          # PV evicted for GpSimd
    s_sb = nl.ndarray((P_MAX, n_slot, block), dtype=nl.float32, buffer=nl.sbuf)       # masked scores
    p_ring = nl.ndarray((P_MAX, _RING, n_slot, block), dtype=dtype, buffer=nl.sbuf)
    pT_ring = nl.ndarray((P_MAX, _RING, n_slot, n_ch, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
    t_psum = nl.ndarray((P_MAX, 1, n_slot, n_ch, _Q_TILE), dtype=dtype, buffer=nl.psum)   # P^T: one bank (bf16)
    # PV accumulators: one region per (step parity, slot), 2 * _N_STREAMS of them; a region of D_CHUNK < d < 256
    # columns is padded to 256 fp32 (1 KiB) so that no region straddles a 2 KiB PSUM bank
    pv_cols = d if d <= D_CHUNK else 2 * D_CHUNK
    pv_psum = nl.ndarray((P_MAX, 2, n_slot, pv_cols), dtype=nl.float32, buffer=nl.psum)
    bufs = dict(qT=qT_sb, m_blk=m_blk, neg_m=neg_m, alpha=alpha, row_sum=row_sum, l=l_sb, o=o_acc, s_psum=s_psum,
                s_sb=s_sb, pv_sb=pv_sb, p=p_ring, pT=pT_ring, t_psum=t_psum, pv=pv_psum,
                # rows may ask "alternate"; so do runtime lengths (the key select puts the VectorE at its limit:
                # flash_attention B=8 S=2048 with seq_lens, the varlen case's padded baseline, 723.4 us with every
                # eviction on the VectorE, 665.9 alternating, 619.1 with the gated finish on GpSimd too; 616.1 before)
                pt_on_dve=is_two_byte(dtype) and getattr(rows, "pt_evict", True if klen_valid is None else "alternate"),
                io=_io_groups(items, d, dtype) if rows is None and not q_is_bhds else None, io_q={}, io_gate={},
                io_out={}, io_qT={})
    diag_bias = _DiagonalBias(block)
    cur = [None] * n_slot
    nxt = [0] * n_slot
    history = []
    step = 0
    while True:
        # start streams in free slots (Q^T of the slot's following stream is prefetched at the same time)
        for s in range(n_slot):
            if cur[s] is None and nxt[s] < len(queues[s]):
                st = queues[s][nxt[s]]
                st.slot, st.gen, st.j = s, nxt[s] % _GENS, st.j0
                if nxt[s] == 0:
                    _load_q(q, bufs, st, d, n_d, dtype, q_is_bhds, rows, len_f)
                if nxt[s] + 1 < len(queues[s]):
                    fol = queues[s][nxt[s] + 1]
                    fol.slot, fol.gen = s, (nxt[s] + 1) % _GENS
                    _load_q(q, bufs, fol, d, n_d, dtype, q_is_bhds, rows, len_f)
                nxt[s] += 1
                cur[s] = st
        if loads:                       # K^T / V pieces behind the streams' Q^T (PV runs two steps behind QK),
            need_k = max((min(st.k_end, (st.j + 1) * block) for st in cur if st is not None), default=0)
            need_v = max((min(st.k_end, (j + 1) * block) for st, j in history[-2]), default=0) if step >= 2 else 0
            _issue_loads(loads, 1, need_k, need_v)          # one per step, earlier when a block needs the keys
        live = [(st, st.j) for st in cur if st is not None]
        history.append(live)
        for st, j in live:
            _scores(bufs, kT_sb, st, j, step, block, d, n_d)
        scores = [_block_scores(bufs, klen_valid, diag_bias, st, j, step, block, causal, rows) for st, j in live]
        for (st, j), sc in zip(live, scores):
            _softmax_max(bufs, sc, st, j, softmax_scale)
        for (st, j), sc in zip(live, scores):
            _softmax_exp(bufs, sc, st, j, step, softmax_scale)
        if step >= 1:
            for st, j in history[step - 1]:
                _transpose_pe(bufs, st, j, step - 1, block)
        if step >= 2:
            for st, j in history[step - 2]:
                _pv_update(bufs, v_sb, st, j, step - 2, block, d)
                if j == st.n_blk - 1:
                    _finish(out, gate, bufs, len_f, st, d, dtype, rows)
        for s in range(n_slot):
            st = cur[s]
            if st is not None:
                st.j += 1
                if st.j == st.n_blk:
                    cur[s] = None
        step += 1
        if step >= 2 and not history[-1] and not history[-2]:
            break


def _issue_loads(loads, n, need_k, need_v):
    """Issue the first n of loads [(K^T keys, V keys covered once issued, fn or None (already issued))], then more
    until K^T covers need_k and V need_v keys. The issued entries are popped, except the last, which is kept
    (fn None) to tell what is covered."""
    i = 0
    while len(loads) > 1 and (i < n or loads[0][0] < need_k or loads[0][1] < need_v):
        loads.pop(0)
        if loads[0][2] is not None:
            loads[0][2]()
            loads[0] = (loads[0][0], loads[0][1], None)
        i += 1


def _io_groups(items, d, dtype):
    """(h, q0) -> (first head, heads, index) for plain BHSD q / gate / out: the heads of one query tile that this
    core owns, in runs of consecutive heads of at most _IO_ROW_BYTES per partition row. A run's q, gate and out
    each move in one DMA: partition p, slot i holds row q0 + p of head h0 + i (each packet row gathers one D-row
    per head; the cost model charges `dma_elem_ns` per extra run, and the row's bytes set its rate)."""
    cap = max(1, _IO_ROW_BYTES // (d * (2 if is_two_byte(dtype) else 4)))
    by_tile = {}
    for h, q0, _ in items:
        by_tile.setdefault(q0, []).append(h)
    groups = {}
    for q0, heads in by_tile.items():
        runs = []
        for h in sorted(heads):
            if runs and runs[-1][-1] == h - 1 and len(runs[-1]) < cap:
                runs[-1].append(h)
            else:
                runs.append([h])
        for run in runs:
            for i, h in enumerate(run):
                groups[(h, q0)] = (run[0], len(run), i)
    return groups


def _io_rows(src, bufs, cache, st, d):
    """The [qn, D] SBUF rows of stream st's head in its run's tile (loaded by one DMA for the run, first use)."""
    h0, nh, i = bufs["io"][(st.h, st.q0)]
    t = cache.get((h0, st.q0))
    if t is None:
        t = nl.ndarray((P_MAX, nh, d), dtype=src.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:st.qn, 0:nh, 0:d], src=src[h0:h0 + nh, st.q0:st.q0 + st.qn, 0:d].permute((1, 0, 2)))
        cache[(h0, st.q0)] = t
    return t[0:st.qn, i, 0:d]


def _io_q_transposed(q, bufs, st, d, n_d, dtype, len_f):
    """Q^T [128(d), n_d, qn] of stream st (2-byte dtypes, D a multiple of 128, plain BHSD q): the heads of the
    stream's query tile in its run (`_io_groups`) arrive in one DMA transpose, [qn, n_d, heads, 128] ->
    [128(d), n_d, heads, qn] (up to 2 KiB per partition row: 4 heads at 128 rows), on first use; no PE transposes
    and no PSUM eviction. With a length, the columns of padded rows are zeroed (a select)."""
    h0, nh, i = bufs["io"][(st.h, st.q0)]
    t = bufs["io_qT"].get((h0, st.q0))
    if t is None:
        t = nl.ndarray((P_MAX, n_d, nh, _Q_TILE), dtype=dtype, buffer=nl.sbuf)
        src = q[h0:h0 + nh, st.q0:st.q0 + st.qn, 0:d].reshape((nh, st.qn, n_d, D_CHUNK)).permute((1, 2, 0, 3))
        nisa.dma_transpose(dst=t[0:D_CHUNK, 0:n_d, 0:nh, 0:st.qn], src=src)
        if len_f is not None:
            _zero_cols_past_length(t[0:P_MAX, 0:n_d, 0:nh, 0:st.qn].reshape((P_MAX, n_d * nh, st.qn)), len_f,
                                   st.qa0, n_d * nh * D_CHUNK)
        bufs["io_qT"][(h0, st.q0)] = t
    return t[0:P_MAX, 0:n_d, i, 0:_Q_TILE]


def _load_q(q, bufs, st, d, n_d, dtype, q_is_bhds=False, rows=None, len_f=None):
    """Q^T of one stream: one natural-layout DMA of the [qn, D] tile, then PE transposes (a DMA transpose of
    256-byte rows would run at a fraction of the bandwidth). q_is_bhds=True: the host-permuted baseline layout,
    copied as is. len_f: rows at positions >= the length are zeroed first (whatever the padding holds)."""
    qT = bufs["qT"]
    if q_is_bhds:
        for i_d in range(n_d):
            d0 = i_d * D_CHUNK
            dn = min(D_CHUNK, d - d0)
            nisa.dma_copy(dst=qT[0:dn, st.slot, st.gen, i_d, 0:st.qn], src=q[st.h, d0:d0 + dn, st.q0:st.q0 + st.qn])
        return
    q_nat = None
    if rows is None and bufs["io"] is not None and is_two_byte(dtype) and d % D_CHUNK == 0:
        st.qT = _io_q_transposed(q, bufs, st, d, n_d, dtype, len_f)
        return
    if rows is not None:
        rows.start(st)
        q_nat = rows.q_rows(st) if hasattr(rows, "q_rows") else None    # varlen windows: [qn, D] already in SBUF
    if q_nat is None and bufs["io"] is not None:
        q_nat = _io_rows(q, bufs, bufs["io_q"], st, d)
    if q_nat is None:
        q_nat = nl.ndarray((P_MAX, d), dtype=dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=q_nat[0:st.qn, 0:d], src=q[st.h, st.q0:st.q0 + st.qn, 0:d])
    if len_f is not None:
        zero_rows_past_length(q_nat[0:st.qn, 0:d].reshape((st.qn, 1, d)), len_f, st.qa0, P_MAX)
    q_psum = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.psum)
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        exact_transpose(q_psum[0:dn, i_d, 0:st.qn], q_nat[0:st.qn, d0:d0 + dn])
    if d % D_CHUNK == 0:
        nisa.activation(dst=qT[0:D_CHUNK, st.slot, st.gen, 0:n_d, 0:st.qn], op=nl.copy,
                        data=q_psum[0:D_CHUNK, 0:n_d, 0:st.qn])
    else:
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            nisa.activation(dst=qT[0:dn, st.slot, st.gen, i_d, 0:st.qn], op=nl.copy, data=q_psum[0:dn, i_d, 0:st.qn])


def _scores(bufs, kT_sb, st, j, step, block, d, n_d):
    """S = Q^T.T @ K^T[:, block j] in fp32 PSUM; D contracted in 128-row chunks."""
    k0 = j * block
    kn = st.keys(j, block)
    for i_d in range(n_d):             # d outer: the stationary Q^T chunk stays loaded, and consecutive
        dn = min(D_CHUNK, d - i_d * D_CHUNK)  # matmuls write different PSUM banks (no accumulate stall)
        for j0 in range(0, kn, MM_KEYS):
            jn = min(MM_KEYS, kn - j0)
            s_psum = bufs["s_psum"]
            stat = st.qT[0:dn, i_d, 0:st.qn] if st.qT is not None else bufs["qT"][0:dn, st.slot, st.gen, i_d, 0:st.qn]
            nisa.nc_matmul(s_psum[0:st.qn, step % s_psum.shape[1], st.slot, j0:j0 + jn], stat,
                           kT_sb[0:dn, i_d, k0 + j0:k0 + j0 + jn], accumulate=i_d > 0)


def _block_scores(bufs, klen_valid, diag_bias, st, j, step, block, causal, rows=None):
    """The block's logits as an on-chip view: PSUM directly, or SBUF after the length select (padded keys ->
    MASK_BIAS, whatever their score) and the causal bias (or after the packed-sequence row mask)."""
    qn, s = st.qn, st.slot
    k0 = j * block
    kn = st.keys(j, block)
    s_psum = bufs["s_psum"]
    scores = s_psum[0:qn, step % s_psum.shape[1], s, 0:kn]
    if rows is not None:
        return rows.mask(scores, st, j, k0, kn)
    diagonal = causal and (k0 + kn - 1 > st.qa0)
    if not diagonal and klen_valid is None:
        return scores
    masked = bufs["s_sb"][0:qn, s, 0:kn]
    if klen_valid is not None:
        scores = nl.where(klen_valid[0:qn, k0:k0 + kn], scores, MASK_BIAS)
        if not diagonal:
            return scores
    nisa.tensor_tensor(dst=masked, data1=scores, data2=diag_bias(st.qa0 - k0)[0:qn, 0:kn], op=nl.add)
    return masked


def _softmax_max(bufs, scores, st, j, softmax_scale):
    """Running statistic in the negated, scaled domain: neg_m_j = min(neg_m_{j-1}, -scale * rowmax(S_j))."""
    qn, s, g = st.qn, st.slot, st.gen
    neg_m = bufs["neg_m"]
    nm_j = neg_m[0:qn, s, g, j:j + 1]
    if j == st.j0:
        nisa.tensor_reduce(dst=bufs["m_blk"][0:qn, s, 0:1], op=nl.maximum, data=scores, axis=1, negate=True)
        nisa.tensor_scalar(dst=nm_j, data=bufs["m_blk"][0:qn, s, 0:1], op0=nl.multiply, operand0=softmax_scale,
                           engine=nisa.engine.gpsimd)
    else:
        nisa.tensor_reduce(dst=bufs["m_blk"][0:qn, s, 0:1], op=nl.maximum, data=scores, axis=1, negate=True)
        nisa.tensor_scalar(dst=nm_j, data=bufs["m_blk"][0:qn, s, 0:1], op0=nl.multiply, operand0=softmax_scale,
                           op1=nl.minimum, operand1=neg_m[0:qn, s, g, j - 1:j], engine=nisa.engine.gpsimd)


def _softmax_exp(bufs, scores, st, j, step, softmax_scale):
    """P = exp(scale*S + neg_m) with its row sum; alpha = exp(neg_m_j - neg_m_{j-1}) for the rescale."""
    qn, s, g = st.qn, st.slot, st.gen
    kn = scores.shape[-1]
    nm_j = bufs["neg_m"][0:qn, s, g, j:j + 1]
    nisa.activation(dst=bufs["p"][0:qn, step % _RING, s, 0:kn], op=nl.exp, data=scores, bias=nm_j,
                    scale=softmax_scale, reduce_op=nl.add, reduce_res=bufs["row_sum"][0:qn, s, g, j:j + 1],
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    if j > st.j0:
        nisa.activation(dst=bufs["alpha"][0:qn, s, g, j:j + 1], op=nl.exp, data=bufs["neg_m"][0:qn, s, g, j - 1:j],
                        bias=nm_j, scale=-1.0)


def _transpose_pe(bufs, st, j, step, block):
    """P^T of the block's chunks on the TensorE (one PSUM bank), evicted PSUM -> SBUF by the VectorE for 2-byte
    dtypes (cost model v10: every eviction there, 85.5 -> 84.1 us at S=2048; alternating with the ScalarE was the
    v3 balance), else by the ScalarE. No P^T goes through a DMA transpose: an SBUF -> SBUF DMA transpose of P is
    element-strided (a 512 B row in 256 single-element pieces, cost model v3 `dma_elem_ns`), which made S=8192
    DMA-bound (docs/attention.md, "Prefill goals at LNC=2")."""
    kn = st.keys(j, block)
    n_c = n_tiles(kn, K_CHUNK)
    p_ring, pT_ring, t_psum = bufs["p"], bufs["pT"], bufs["t_psum"]
    r, s, t = step % _RING, st.slot, step % t_psum.shape[1]
    for c in range(n_c):
        cn = min(K_CHUNK, kn - c * K_CHUNK)
        exact_transpose(t_psum[0:cn, t, s, c, 0:st.qn], p_ring[0:st.qn, r, s, c * K_CHUNK:c * K_CHUNK + cn])
    full = min(n_c, kn // K_CHUNK)
    if full:
        dst, src = pT_ring[0:K_CHUNK, r, s, 0:full, 0:st.qn], t_psum[0:K_CHUNK, t, s, 0:full, 0:st.qn]
        # 2-byte: every full-chunk eviction on the VectorE (a bf16 copy); "alternate" (varlen windows): every other
        if bufs["pt_on_dve"] is True or (bufs["pt_on_dve"] == "alternate" and (step + s) % 2 == 1):
            nisa.tensor_copy(dst=dst, src=src)
        else:
            nisa.activation(dst=dst, op=nl.copy, data=src)
    if full < n_c:
        rem = kn - full * K_CHUNK
        nisa.activation(dst=pT_ring[0:rem, r, s, full, 0:st.qn], op=nl.copy, data=t_psum[0:rem, t, s, full, 0:st.qn])


def _pv_update(bufs, v_sb, st, j, step, block, d):
    """PV of block j (fp32 PSUM, one bank) and the online update O = O*alpha + PV, l = l*alpha + rowsum."""
    qn, s, g = st.qn, st.slot, st.gen
    kn = st.keys(j, block)
    pv = bufs["pv"][0:qn, step % 2, s, 0:d]
    pT_ring, o_acc, l_sb = bufs["pT"], bufs["o"], bufs["l"]
    row_sum = bufs["row_sum"]
    n_c = n_tiles(kn, K_CHUNK)
    c_base = (j * block) // K_CHUNK
    halves = [(0, d)] if d <= D_CHUNK else [(0, d // 2), (d // 2, d)]   # alternate PSUM regions per chunk
    for c in range(n_c):
        cn = min(K_CHUNK, kn - c * K_CHUNK)
        for h0, h1 in halves:
            nisa.nc_matmul(bufs["pv"][0:qn, step % 2, s, h0:h1], pT_ring[0:cn, step % _RING, s, c, 0:qn],
                           v_sb[0:cn, c_base + c, h0:h1], accumulate=c > 0)
    o = o_acc[0:qn, s, g, 0:d]
    l_ = l_sb[0:qn, s, g, 0:1]
    if j == st.j0 and j == st.n_blk - 1:
        st.o_src = pv                        # a one-block stream: the finish reads P V from PSUM (no O copy)
        nisa.tensor_copy(dst=l_, src=row_sum[0:qn, s, g, j:j + 1], engine=nisa.engine.gpsimd)
    elif j == st.j0:
        nisa.activation(dst=o, op=nl.copy, data=pv)
        nisa.tensor_copy(dst=l_, src=row_sum[0:qn, s, g, j:j + 1], engine=nisa.engine.gpsimd)
    elif not (_O_UPDATE_ON_POOL is True or (_O_UPDATE_ON_POOL == "odd" and s % 2 == 1)):
        a_j = bufs["alpha"][0:qn, s, g, j:j + 1]
        nisa.scalar_tensor_tensor(dst=o, data=o, op0=nl.multiply, operand0=a_j, op1=nl.add, operand1=pv)
        nisa.scalar_tensor_tensor(dst=l_, data=l_, op0=nl.multiply, operand0=a_j, op1=nl.add,
                                  operand1=row_sum[0:qn, s, g, j:j + 1])
    else:
        # ScalarE evicts PV; GpSimd rescales and accumulates (the VectorE is busy with the row max)
        a_j = bufs["alpha"][0:qn, s, g, j:j + 1]
        pv_sb = bufs["pv_sb"][0:qn, s, 0:d]
        nisa.activation(dst=pv_sb, op=nl.copy, data=pv)
        nisa.tensor_scalar(dst=o, data=o, op0=nl.multiply, operand0=a_j, engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=o, data1=o, data2=pv_sb, op=nl.add, engine=nisa.engine.gpsimd)
        nisa.scalar_tensor_tensor(dst=l_, data=l_, op0=nl.multiply, operand0=a_j, op1=nl.add,
                                  operand1=row_sum[0:qn, s, g, j:j + 1])


def _finish(out, gate, bufs, len_f, st, d, dtype, rows=None):
    """out = O / l (0 for padded query rows), optionally * sigmoid(gate); one DMA to HBM."""
    qn, s, g = st.qn, st.slot, st.gen
    o = bufs["o"][0:qn, s, g, 0:d] if st.o_src is None else st.o_src
    inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_l[0:qn], data=bufs["l"][0:qn, s, g, 0:1])
    if rows is not None:
        rows.finish_scale(inv_l, st)
    if len_f is not None:
        q_pos = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(q_pos[0:qn], pattern=[[1, 1]], offset=st.qa0, channel_multiplier=1)
        q_valid = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=q_valid[0:qn], data=q_pos[0:qn], op0=nl.less, operand0=len_f[0:qn],
                           engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=inv_l[0:qn], data1=inv_l[0:qn], data2=q_valid[0:qn], op=nl.multiply,
                           engine=nisa.engine.gpsimd)
    o_sb = rows.out_tile(st) if rows is not None and hasattr(rows, "out_tile") else None   # varlen: staged
    io = bufs.get("io")
    if io is not None:             # staged with the other heads of its run: one store when the run is complete
        h0, nh, i = io[(st.h, st.q0)]
        stage = bufs["io_out"].setdefault((h0, st.q0), [nl.ndarray((P_MAX, nh, d), dtype=dtype, buffer=nl.sbuf), nh])
        o_sb = stage[0][:, i, :]
    if o_sb is None:
        o_sb = nl.ndarray((P_MAX, d), dtype=dtype, buffer=nl.sbuf)
    if gate is None:                # GpSimd from SBUF; the VectorE when O is still in PSUM (a one-block stream)
        nisa.tensor_scalar(dst=o_sb[0:qn, 0:d], data=o, op0=nl.multiply, operand0=inv_l[0:qn],
                           engine=nisa.engine.gpsimd if st.o_src is None else nisa.engine.vector)
    else:
        if io is not None:
            gate_sb = _io_rows(gate, bufs, bufs["io_gate"], st, d)
        else:
            gate_sb = nl.ndarray((P_MAX, d), dtype=gate.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=gate_sb[0:qn, 0:d], src=gate[st.h, st.q0:st.q0 + qn, 0:d])
        if len_f is not None:      # padded rows: sigmoid(NaN) * 0 would be NaN
            zero_rows_past_length(gate_sb[0:qn, 0:d].reshape((qn, 1, d)), len_f, st.qa0, P_MAX)
        sig_sb = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sig_sb[0:qn, 0:d], op=nl.sigmoid, data=gate_sb[0:qn, 0:d])
        # one VectorE pass (O * 1/l) * sigmoid(gate) (cost model v10: the VectorE has the room; the GpSimd took two
        # passes at half the VectorE's rate)
        if len_f is not None and st.o_src is None:      # runtime lengths: the VectorE is the busy engine
            nisa.tensor_scalar(dst=sig_sb[0:qn, 0:d], data=sig_sb[0:qn, 0:d], op0=nl.multiply, operand0=inv_l[0:qn],
                               engine=nisa.engine.gpsimd)
            nisa.tensor_tensor(dst=o_sb[0:qn, 0:d], data1=o, data2=sig_sb[0:qn, 0:d], op=nl.multiply,
                               engine=nisa.engine.gpsimd)
        else:
            nisa.scalar_tensor_tensor(dst=o_sb[0:qn, 0:d], data=o, op0=nl.multiply, operand0=inv_l[0:qn],
                                      op1=nl.multiply, operand1=sig_sb[0:qn, 0:d])
    if rows is not None and hasattr(rows, "store"):     # varlen.py per-sequence windows: a scatter of the valid rows
        rows.store(out, o_sb[0:qn, 0:d], st)
    elif io is not None:
        stage[1] -= 1
        if stage[1] == 0:
            nisa.dma_copy(dst=out[h0:h0 + nh, st.q0:st.q0 + qn, 0:d].permute((1, 0, 2)), src=stage[0][0:qn, 0:nh, 0:d])
            del bufs["io_out"][(h0, st.q0)]
    else:
        nisa.dma_copy(dst=out[st.h, st.q0:st.q0 + qn, 0:d], src=o_sb[0:qn, 0:d])


# ============================================================================ short sequences (Skv <= 512)
#
# (bf16 / fp16 at D = 256 on trn2 / trn3 take the tile-major body in short_tiles.py instead: cost model v11 moves
# their 512 B rows at full rate; this partition-major body runs fp32, D < 256 and trn1. The cost notes below are
# from the cost models it was built under.)
# One softmax block covers every key, so there is no online rescaling; what limits the pipeline above at these
# sizes is DMA descriptors: a [128 rows, D] tile moves 512 B per row (bf16, D=256, 36% of the DMA engines' rate
# in the cost model) and K^T DMA-transposed on load 256 B. Here q, gate, out, K move partition-major, several
# consecutive rows per partition in one run (2 KiB at 4 rows), and the transposes run on the PE:
#   q, gate, out of one head: [128, R, D], partition p holds rows R*p .. R*p + R - 1 (one DMA each), R = 1, 2, 4;
#   query tile t = rows 128t .. 128t + 127 = partitions PPT*t .. PPT*t + PPT - 1 (PPT = 128 / R), all R slots;
#   its Q^T comes from R transposes of PPT partitions, so score row m = PPT*i + p' is row 128t + R*p' + i;
#   K: [128, C, D], partition p holds keys C*p .. C*p + C - 1; K^T by PE transposes of K[:, c, :] (column
#   c*128 + p = key C*p + c), read by the QK matmul through a (p, c) view, so score columns are keys in order and
#   a tile computes only the keys up to its last row (the causal triangle is skipped in 128-key chunks);
#   V: [128 keys, chunk, D] in key order (chunk j = keys 128j .. 128j + 127, the layout P^T chunks contract with);
#   P V and the row sums of slot i land on partitions PPT*t .. of the head's [128, R, D] PSUM tile (PE column
#   tile t, `tile_position`), which is the store layout: one normalisation per slot and one store per head.
#   The causal (and phantom-key) bias of tile t is R affine_selects (one per slot), built once, accumulated into
#   S on the PE (identity x bias) over the tile's diagonal columns only.


def short_path(sq, skv, bhds) -> bool:
    """Trace-time shape rule: the partition-major short-sequence body handles Skv <= 512 (one key block), with
    4 rows per partition (Sq > 256) only where the PE has 32-column tiles (NeuronCore-v3+: not trn1)."""
    if bhds or skv > _SHORT_SKV:
        return False
    return _rows_per_partition(sq) < 4 or current_target_name() not in NO_PE_TILE32_TARGETS


def _rows_per_partition(sq):
    """R: 1, 2 or 4 query rows per partition (a power of two, so that a 128-row tile is PPT = 128 / R whole
    partitions)."""
    r = 1
    while r * P_MAX < sq:
        r *= 2
    return r


def short_prefill_body(q, k, v, gate, seq_lens, out, softmax_scale, causal):
    """Skv <= 512: per (b, query head), ceil(Sq/128) query tiles of 128 contiguous rows against the keys up to
    each tile's last row; the cores take the (b, query head) pairs round robin. The tiles of all of a core's
    heads run as one software pipeline: the scores and softmax of tile t, then P^T and P V of tile
    t - _SHORT_LAG (so the TensorE, in program order, always has independent work while tile t's softmax runs)."""
    n_b, n_hq, sq, d = out.shape
    n_kv, skv = k.shape[1], k.shape[2]
    group = n_hq // n_kv
    dtype = q.dtype
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    rpp = _rows_per_partition(sq)
    geo = dict(sq=sq, skv=skv, d=d, n_d=n_tiles(d, D_CHUNK), rpp=rpp, ppt=P_MAX // rpp, n_t=n_tiles(sq, P_MAX),
               cpp=n_tiles(skv, P_MAX), dtype=dtype, scale=softmax_scale, qpos0=skv - sq, causal=causal,
               natural=is_two_byte(dtype))
    geo["nk"] = geo["cpp"] * P_MAX
    items = [(b, kvh, g) for b in range(n_b) for kvh in range(n_kv) for g in range(group)][pid::n_prog]
    if not items:
        return
    ident = _identity(_bias_dtype(dtype))
    ones = nl.ndarray((P_MAX, 1), dtype=dtype, buffer=nl.sbuf)          # row sums of P through the PE
    nisa.memset(dst=ones, value=1.0)
    cache = {}
    tiles = [_short_tile(geo, t, cache) for t in range(geo["n_t"])]
    ring = dict(p=nl.ndarray((P_MAX, _SHORT_LAG + 1, geo["nk"]), dtype=dtype, buffer=nl.sbuf), n=0)
    kv = {}
    pending = []
    q_next = {}
    prev = None
    for i_item, (b, kvh, g) in enumerate(items):
        # DMA order: K, q, the next head's q (same KV head), V, gate (the first scores need K and q; V only the
        # first P V, the gate the finish)
        if (b, kvh) not in kv:
            len_f = None if seq_lens is None else load_len_broadcast(seq_lens, b, P_MAX)
            kv = {(b, kvh): [*_short_k(k[b, kvh], len_f, geo), len_f, None]}
        cur = kv[(b, kvh)]
        h = kvh * group + g
        q_sb = q_next.pop(i_item, None)
        if q_sb is None:
            q_sb = _short_q(q[b, h], cur[2], geo)
        if i_item + 1 < len(items) and items[i_item + 1][:2] == (b, kvh):
            q_next[i_item + 1] = _short_q(q[b, kvh * group + items[i_item + 1][2]], cur[2], geo)
        head = _short_head_start(q_sb, out[b, h], cur[2], geo)
        if cur[3] is None:
            cur[3] = _short_v(v[b, kvh], cur[2], geo)
        head.update(v=cur[3], ones=ones)
        # the core's last head runs its tiles last to first: with causal masking the smallest tile is then the
        # last one through the pipeline, so less P V work follows the last scores (the kernel's tail)
        order = list(range(geo["n_t"]))
        if (b, kvh, g) == items[-1]:
            order.reverse()
        head["final_t"] = order[-1]
        # the core's second-to-last head is normalised after the last head's first P^T eviction in program order,
        # so that the last head's evictions (VectorE) come first (at most two heads' accumulators live, as before)
        head["defer"] = len(items) > 1 and (b, kvh, g) == items[-2]
        if head["defer"]:
            prev = head
        for i_t, t in enumerate(order):
            staged = _short_scores(head, tiles[t], cur[0], cur[1], ident, ring, geo)
            if i_t == 0:
                _short_gate(head, None if gate is None else gate[b, h], geo)
            pending.append((head, tiles[t], staged))
            if len(pending) > _SHORT_LAG:
                _short_pv(*pending.pop(0), geo)
    for item in pending:
        _short_pv(*item, geo)
        if prev is not None and prev.get("deferred") and item[0] is not prev:
            _short_finish(prev, geo)
            prev = None
    if prev is not None:
        _short_finish(prev, geo)


def _bias_dtype(dtype):
    """dtype of the short body's mask-bias tiles and of the identity that adds them into the scores: bf16 for
    2-byte inputs (MASK_BIAS = -1e30 is -inf in fp16, and the identity's 0 * -inf would make every score NaN;
    bf16 holds it), else `dtype` (fp32)."""
    return nl.bfloat16 if is_two_byte(dtype) else dtype


def _identity(dtype):
    """[128, 128] identity in `dtype` (GpSimd): the stationary that adds a bias tile into a PSUM score tile."""
    ones = nl.ndarray((P_MAX, P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0, engine=nisa.engine.gpsimd)
    ident = nl.ndarray((P_MAX, P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.affine_select(dst=ident, pattern=[[-1, P_MAX]], offset=0, channel_multiplier=1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ident


def _short_tile(geo, t, cache):
    """Query tile t: its key columns (the keys up to its last row, whole 128-key chunks, at most C*128) and its
    additive bias [128, columns] (0 visible, MASK_BIAS hidden) from column b0 on, or None: causal (key <= Skv - Sq
    + row, row 128t + R*p' + i on partition PPT*i + p') and the phantom keys >= Skv of the partial chunk."""
    sq, skv, rpp, ppt, qpos0 = geo["sq"], geo["skv"], geo["rpp"], geo["ppt"], geo["qpos0"]
    last = min(sq, P_MAX * (t + 1)) - 1                              # the tile's last row
    k_end = min(skv, qpos0 + last + 1) if geo["causal"] else skv
    ncols = min(geo["nk"], n_tiles(k_end, K_CHUNK) * K_CHUNK)
    b0 = max(0, min(qpos0 + P_MAX * t, skv)) if geo["causal"] else skv   # columns before b0: seen by every row
    b0 = (b0 // K_CHUNK) * K_CHUNK
    tile = dict(t=t, ncols=ncols, n_ch=ncols // K_CHUNK, b0=b0, bias=None)
    if b0 >= ncols:
        return tile
    key = (ncols - b0, qpos0 + P_MAX * t - b0)          # tiles with the same diagonal share one bias tile
    if key in cache:
        tile["bias"] = cache[key]
        return tile
    bias_dtype = _bias_dtype(geo["dtype"])
    zeros = nl.ndarray((P_MAX, ncols - b0), dtype=bias_dtype, buffer=nl.sbuf)
    nisa.memset(dst=zeros, value=0.0, engine=nisa.engine.gpsimd)
    bias = nl.ndarray((P_MAX, ncols - b0), dtype=bias_dtype, buffer=nl.sbuf)
    if geo["causal"] and geo["natural"]:    # score row p is query 128t + p: (Skv - Sq + 128t + p) - key >= 0
        nisa.affine_select(dst=bias, pattern=[[-1, ncols - b0]], offset=qpos0 + P_MAX * t - b0,
                           channel_multiplier=1, on_true_tile=zeros, on_false_value=MASK_BIAS,
                           cmp_op=nl.greater_equal)
    elif geo["causal"]:   # (Skv - Sq + 128t + i) + R*p' - key >= 0 on partitions PPT*i .. PPT*i + PPT - 1
        for i in range(rpp):
            nisa.affine_select(dst=bias[ppt * i:ppt * (i + 1)], pattern=[[-1, ncols - b0]],
                               offset=qpos0 + P_MAX * t + i - b0, channel_multiplier=rpp,
                               on_true_tile=zeros[ppt * i:ppt * (i + 1)], on_false_value=MASK_BIAS,
                               cmp_op=nl.greater_equal)
    else:               # Skv - 1 - key >= 0
        nisa.affine_select(dst=bias, pattern=[[-1, ncols - b0]], offset=skv - 1 - b0, channel_multiplier=0,
                           on_true_tile=zeros, on_false_value=MASK_BIAS, cmp_op=nl.greater_equal)
    tile["bias"] = cache[key] = bias
    return tile


def _load_pm(dst_sb, src, n, per, d):
    """dst_sb [128, per, D] <- src [n, D] partition-major (row per*p + i on partition p, slot i): one DMA of the
    full partitions (runs of per * D elements), one for a partial last partition; phantom rows := 0."""
    full = n // per
    if full * per < P_MAX * per:
        nisa.memset(dst=dst_sb, value=0.0, engine=nisa.engine.gpsimd)
    if full:
        nisa.dma_copy(dst=dst_sb[0:full, 0:per, 0:d], src=src[0:full * per, 0:d].reshape((full, per, d)))
    if n > full * per:
        rem = n - full * per
        nisa.dma_copy(dst=dst_sb[full:full + 1, 0:rem, 0:d], src=src[full * per:n, 0:d].reshape((1, rem, d)))


def _store_pm(dst, src_sb, n, per, d):
    """dst [n, D] <- src_sb [128, per, D] partition-major (the inverse of _load_pm)."""
    full = n // per
    if full:
        nisa.dma_copy(dst=dst[0:full * per, 0:d].reshape((full, per, d)), src=src_sb[0:full, 0:per, 0:d])
    if n > full * per:
        rem = n - full * per
        nisa.dma_copy(dst=dst[full * per:n, 0:d].reshape((1, rem, d)), src=src_sb[full:full + 1, 0:rem, 0:d])


def _zero_cols_past_length(x_sb, len_f, offset, d):
    """x_sb [128(d), n_d, F]: columns at sequence positions offset + j >= the length := 0 (a select through a
    uint8 predicate, so NaN / Inf there is replaced), in the head-dim rows each chunk uses."""
    f = x_sb.shape[2]
    pos_sb = nl.ndarray((P_MAX, f), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(pos_sb, pattern=[[1, f]], offset=offset, channel_multiplier=0)
    pad_sb = nl.ndarray((P_MAX, f), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=pad_sb, data=pos_sb, op0=nl.greater_equal, operand0=len_f, engine=nisa.engine.gpsimd)
    for i_d in range(x_sb.shape[1]):
        dn = min(D_CHUNK, d - i_d * D_CHUNK)
        nisa.tensor_copy_predicated(dst=x_sb[0:dn, i_d, 0:f], src=0.0, predicate=pad_sb[0:dn, 0:f])


def _short_k(k, len_f, geo):
    """K^T [128(d), n_d, C*128] of one KV head (k: [Skv, D] HBM view) and, with a length, the [128, C*128]
    key-validity tile (keys in order). 2-byte dtypes (`natural`): column j = key j, one DMA transpose. fp32:
    column c*128 + p = key C*p + c, PE transposes of the partition-major load."""
    skv, d, n_d, cpp, dtype = geo["skv"], geo["d"], geo["n_d"], geo["cpp"], geo["dtype"]
    if geo["natural"]:
        kT_sb = nl.ndarray((P_MAX, n_d, geo["nk"]), dtype=dtype, buffer=nl.sbuf)
        load_t(kT_sb, k, skv, d, geo["nk"])
        return kT_sb, _short_kvalid(len_f, geo)
    k_sb = nl.ndarray((P_MAX, cpp, d), dtype=dtype, buffer=nl.sbuf)
    _load_pm(k_sb, k, skv, cpp, d)
    if len_f is not None and mixing_pe_transpose():     # trn1: no NaN past the length enters the PE transposes
        zero_rows_past_length(k_sb, len_f, 0, 1, cpp)
    kT_sb = nl.ndarray((P_MAX, n_d, geo["nk"]), dtype=dtype, buffer=nl.sbuf)
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        t_psum = nl.ndarray((P_MAX, cpp, P_MAX), dtype=dtype, buffer=nl.psum)
        for c in range(cpp):
            exact_transpose(t_psum[0:dn, c, 0:P_MAX], k_sb[0:P_MAX, c, d0:d0 + dn])
        nisa.activation(dst=kT_sb[0:dn, i_d, 0:geo["nk"]], op=nl.copy,
                        data=t_psum[0:dn, 0:cpp, 0:P_MAX].reshape((dn, geo["nk"])))
    return kT_sb, _short_kvalid(len_f, geo)


def _short_kvalid(len_f, geo):
    """With a length: the [128, C*128] bf16 key-validity tile (1 where key < length; keys in order), else None."""
    if len_f is None:
        return None
    pos_sb = nl.ndarray((P_MAX, geo["nk"]), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(pos_sb, pattern=[[1, geo["nk"]]], offset=0, channel_multiplier=0)
    kvalid = nl.ndarray((P_MAX, geo["nk"]), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=kvalid, data=pos_sb, op0=nl.less, operand0=len_f, engine=nisa.engine.gpsimd)
    return kvalid


def _short_v(v, len_f, geo):
    """V [128 keys, chunk, D] of one KV head in key order (v: [Skv, D] HBM view; chunk j partition p = key
    128j + p; phantom rows of a partial chunk := 0), rows past the length zeroed (0 * NaN would poison P V)."""
    skv, d, cpp = geo["skv"], geo["d"], geo["cpp"]
    v_sb = nl.ndarray((P_MAX, cpp, d), dtype=geo["dtype"], buffer=nl.sbuf)
    full, rem = skv // K_CHUNK, skv % K_CHUNK
    if rem:
        nisa.memset(dst=v_sb[:, full, :], value=0.0, engine=nisa.engine.gpsimd)
    if full:
        nisa.dma_copy(dst=v_sb[0:K_CHUNK, 0:full, 0:d],
                      src=v[0:full * K_CHUNK, 0:d].reshape((full, K_CHUNK, d)).permute((1, 0, 2)))
    if rem:
        nisa.dma_copy(dst=v_sb[0:rem, full, 0:d], src=v[full * K_CHUNK:skv, 0:d])
    if len_f is not None:
        zero_rows_past_length(v_sb, len_f, 0, K_CHUNK)
    return v_sb


def _short_head_start(q_sb, out, len_f, geo):
    """Per (b, query head): the head's q in SBUF (`_short_q`), output tile and P V / row-sum PSUM accumulators in
    the store layout."""
    d, rpp, dtype = geo["d"], geo["rpp"], geo["dtype"]
    o_sb = nl.ndarray((P_MAX, rpp, d), dtype=dtype, buffer=nl.sbuf)
    # a slot's P V region: d columns, or 256 for 128 < d < 256, so that no region straddles a 2 KiB bank
    pv_psum = nl.ndarray((P_MAX, rpp, 2 * D_CHUNK if d > D_CHUNK else d), dtype=nl.float32, buffer=nl.psum)
    l_psum = nl.ndarray((P_MAX, rpp), dtype=nl.float32, buffer=nl.psum)
    return dict(q=q_sb, sig=None, o=o_sb, out=out, len=len_f, pv=pv_psum, l=l_psum)


def _short_q(q, len_f, geo):
    """q of one (b, query head) in SBUF, padded rows zeroed: Q^T (2-byte dtypes) or partition-major."""
    sq, d, rpp, dtype = geo["sq"], geo["d"], geo["rpp"], geo["dtype"]
    if geo["natural"]:      # Q^T [128(d), n_d, n_t*128], column j = query j: one DMA transpose, no PE work
        q_sb = nl.ndarray((P_MAX, geo["n_d"], geo["n_t"] * P_MAX), dtype=dtype, buffer=nl.sbuf)
        load_t(q_sb, q, sq, d, geo["n_t"] * P_MAX)
        if len_f is not None:
            _zero_cols_past_length(q_sb, len_f, geo["qpos0"], d)
    else:
        q_sb = nl.ndarray((P_MAX, rpp, d), dtype=dtype, buffer=nl.sbuf)
        _load_pm(q_sb, q, sq, rpp, d)
        if len_f is not None:
            zero_rows_past_length(q_sb, len_f, geo["qpos0"], 1, rpp)
    return q_sb


def _short_gate(head, gate, geo):
    """sigmoid(gate) of one head, partition-major like q (padded rows zeroed first: sigmoid(NaN) * 0 is NaN)."""
    if gate is None:
        return
    sq, d, rpp = geo["sq"], geo["d"], geo["rpp"]
    g_sb = nl.ndarray((P_MAX, rpp, d), dtype=gate.dtype, buffer=nl.sbuf)
    _load_pm(g_sb, gate, sq, rpp, d)
    if head["len"] is not None:
        zero_rows_past_length(g_sb, head["len"], geo["qpos0"], 1, rpp)
    sig_sb = nl.ndarray((P_MAX, rpp, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=sig_sb, op=nl.sigmoid, data=g_sb)
    head["sig"] = sig_sb


def _short_scores(head, tile, kT_sb, kvalid, ident, ring, geo):
    """Query tile t: Q^T (R PE transposes of PPT partitions), S = Q K^T over the tile's key columns (+ the bias
    through the identity), the length select, the row max and P = exp(scale S - scale max)."""
    d, n_d, rpp, ppt, cpp, dtype = geo["d"], geo["n_d"], geo["rpp"], geo["ppt"], geo["cpp"], geo["dtype"]
    t, ncols, b0 = tile["t"], tile["ncols"], tile["b0"]
    s_psum = nl.ndarray((P_MAX, geo["nk"]), dtype=nl.float32, buffer=nl.psum)
    if geo["natural"]:      # Q^T and K^T as loaded: score row p = query 128t + p, column j = key j
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            nisa.nc_matmul(s_psum[0:P_MAX, 0:ncols], head["q"][0:dn, i_d, P_MAX * t:P_MAX * (t + 1)],
                           kT_sb[0:dn, i_d, 0:ncols], accumulate=i_d > 0)
    else:
        qt_psum = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.psum)
        for i in range(rpp):
            for i_d in range(n_d):
                d0 = i_d * D_CHUNK
                dn = min(D_CHUNK, d - d0)
                exact_transpose(qt_psum[0:dn, i_d, ppt * i:ppt * (i + 1)],
                                head["q"][ppt * t:ppt * (t + 1), i, d0:d0 + dn])
        qT_sb = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.sbuf)
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            nisa.tensor_copy(dst=qT_sb[0:dn, i_d, 0:P_MAX], src=qt_psum[0:dn, i_d, 0:P_MAX])
        kp = n_tiles(ncols, cpp)                 # partitions of K^T's (p, c) view that cover columns [0, ncols)
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            k_view = kT_sb[0:dn, i_d, 0:geo["nk"]].reshape((dn, cpp, P_MAX)).permute((0, 2, 1))[:, 0:kp, :]
            nisa.nc_matmul(s_psum[0:P_MAX, 0:kp * cpp], qT_sb[0:dn, i_d, 0:P_MAX], k_view, accumulate=i_d > 0)
    if tile["bias"] is not None:
        nisa.nc_matmul(s_psum[0:P_MAX, b0:ncols], ident, tile["bias"], accumulate=True)
    scores = s_psum[0:P_MAX, 0:ncols]
    if kvalid is not None:            # a select: a NaN score of a padded key is replaced, not added to
        scores = nl.where(kvalid[:, 0:ncols], scores, MASK_BIAS)
    m_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=m_sb, op=nl.maximum, data=scores, axis=1, negate=True)
    nm_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=nm_sb, data=m_sb, op0=nl.multiply, operand0=geo["scale"], engine=nisa.engine.gpsimd)
    slot = ring["n"] % (_SHORT_LAG + 1)          # P lives until the tile's P V, _SHORT_LAG tiles later
    ring["n"] += 1
    p_sb = ring["p"][0:P_MAX, slot, 0:ncols]
    nisa.activation(dst=p_sb, op=nl.exp, data=scores, bias=nm_sb, scale=geo["scale"])
    return p_sb


def _short_pv(head, tile, p_sb, geo):
    """Query tile t: P^T (PE, 128-key chunks), then per slot i P V and the row sums into partitions PPT*t .. of
    the head's store-layout PSUM tiles (PE column tile t); after the head's last tile, out = O / l (0 for padded
    rows) (* sigmoid(gate)) per slot and one store."""
    d, rpp, ppt, dtype = geo["d"], geo["rpp"], geo["ppt"], geo["dtype"]
    t, n_ch = tile["t"], tile["n_ch"]
    pt_psum = nl.ndarray((P_MAX, geo["cpp"], P_MAX), dtype=dtype, buffer=nl.psum)
    for j in range(n_ch):
        exact_transpose(pt_psum[0:P_MAX, j, 0:P_MAX], p_sb[0:P_MAX, j * P_MAX:(j + 1) * P_MAX])
    pT_sb = nl.ndarray((P_MAX, geo["cpp"], P_MAX), dtype=dtype, buffer=nl.sbuf)
    # the eviction: VectorE (a bf16 copy from PSUM at twice the ScalarE's rate)
    nisa.tensor_copy(dst=pT_sb[0:P_MAX, 0:n_ch, 0:P_MAX], src=pt_psum[0:P_MAX, 0:n_ch, 0:P_MAX])
    halves = [(0, d)] if d <= D_CHUNK else [(0, d // 2), (d // 2, d)]
    tiling = dict(tile_position=(0, ppt * t), tile_size=(P_MAX, ppt)) if rpp > 1 else {}
    rows = slice(ppt * t, ppt * (t + 1))
    for i in range(rpp):
        for j in range(n_ch):
            if geo["natural"]:      # P^T column c = query 128t + c: slot i is columns i, i + R, ...
                p_t = pT_sb[0:P_MAX, j, 0:P_MAX].reshape((P_MAX, ppt, rpp)).permute((0, 2, 1))[:, i, :]
            else:                   # column PPT*i + p' = query 128t + R*p' + i
                p_t = pT_sb[0:P_MAX, j, ppt * i:ppt * (i + 1)]
            for h0, h1 in halves:
                nisa.nc_matmul(head["pv"][rows, i, h0:h1], p_t, head["v"][0:P_MAX, j, h0:h1], accumulate=j > 0,
                               **tiling)
            nisa.nc_matmul(head["l"][rows, i:i + 1], p_t, head["ones"][0:P_MAX, 0:1], accumulate=j > 0, **tiling)
    if t == head["final_t"]:
        if head.get("defer"):
            head["deferred"] = True
        else:
            _short_finish(head, geo)


def _short_finish(head, geo):
    """out = O / l (0 for padded query rows) (* sigmoid(gate)) per slot, then one store of the head."""
    d, rpp, np_ = geo["d"], geo["rpp"], geo["ppt"] * geo["n_t"]
    inv_l = nl.ndarray((P_MAX, rpp), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv_l[0:np_], data=head["l"][0:np_, 0:rpp])
    if head["len"] is not None:
        q_pos = nl.ndarray((P_MAX, rpp), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(q_pos[0:np_], pattern=[[1, rpp]], offset=geo["qpos0"], channel_multiplier=rpp)
        q_valid = nl.ndarray((P_MAX, rpp), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=q_valid[0:np_], data=q_pos[0:np_], op0=nl.less, operand0=head["len"][0:np_],
                           engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=inv_l[0:np_], data1=inv_l[0:np_], data2=q_valid[0:np_], op=nl.multiply,
                           engine=nisa.engine.gpsimd)
    o_sb, sig_sb = head["o"], head["sig"]
    for i in range(rpp):
        pv, inv = head["pv"][0:np_, i, 0:d], inv_l[0:np_, i:i + 1]
        if sig_sb is None:
            nisa.tensor_scalar(dst=o_sb[0:np_, i, 0:d], data=pv, op0=nl.multiply, operand0=inv)
        else:
            # one VectorE pass from PSUM per slot: (O * 1/l) * sigmoid(gate). Cost model v10 (VectorE at twice
            # the v3 rate): every slot here; the core's last head had its last slot on ScalarE (O * 1/l) +
            # GpSimd (* gate) in parallel, 14.09 -> 13.85 us at S=512 without that
            nisa.scalar_tensor_tensor(dst=o_sb[0:np_, i, 0:d], data=pv, op0=nl.multiply, operand0=inv,
                                      op1=nl.multiply, operand1=sig_sb[0:np_, i, 0:d])
    _store_pm(head["out"], o_sb, geo["sq"], rpp, d)


# ============================================================================ host wrapper


def _shape(x):
    return tuple(int(s) for s in x.shape) if hasattr(x, "shape") else type(x).__name__


def _read_only(x):
    """A torch view that is not contiguous (expand()ed K/V, a transposed gate) as a contiguous copy, so that
    nothing is ever written back into the caller's tensor: attention writes none of its inputs."""
    if x is not None and hasattr(x, "is_contiguous") and not x.is_contiguous():
        return x.contiguous()
    return x


def _check_array(name, arg, x, ndim, layout):
    """`x` must be a NumPy array or a CPU torch tensor of `ndim` dims (layout names them), with no zero dim."""
    kernel_check(hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (list, tuple)),
                 f"{name}: {arg} must be a NumPy array or torch tensor {layout}, got {arg}={type(x).__name__}")
    device = getattr(x, "device", None)
    kernel_check(device is None or isinstance(device, str) or getattr(device, "type", "cpu") == "cpu",
                 f"{name}: {arg} must be a CPU tensor here (the emulator runs on the host), got {arg}.device={device}")
    kernel_check(len(x.shape) == ndim, f"{name}: {arg} must be {ndim}-D {layout}, got {arg}.shape={_shape(x)}")
    kernel_check(all(int(s) >= 1 for s in x.shape),
                 f"{name}: every dimension of {arg} {layout} must be >= 1 (empty batches, heads or sequences are "
                 f"not supported), got {arg}.shape={_shape(x)}")


def flash_attention(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=None):
    """Flash attention prefill: BHSD q/k/v (GQA), optional causal mask, valid lengths and sigmoid output gate.

    Args:
        q: [B, Hq, Sq, D] bf16/fp16/fp32, NumPy array or torch CPU tensor.
        k, v: [B, Hkv, Skv, D], q's dtype; Hq % Hkv == 0, Skv >= Sq (queries = the last Sq positions).
        gate: optional [B, Hq, Sq, D] (any float dtype): returns out * sigmoid(gate).
        seq_lens: optional [B] integers in [0, Skv]: per-sequence valid length in key positions.
        causal: bottom-right aligned causal mask (query i sees keys j <= Skv - Sq + i).
        softmax_scale: default D ** -0.5; must be > 0.
        lnc: 1, 2 or None (default: NEURON_LOGICAL_NC_CONFIG, else the target's default, 2 on trn2). Two
            program instances split the (b, KV head) pairs, else the query tiles, in one launch.
    Returns:
        out: [B, Hq, Sq, D], q's dtype (and kind: NumPy or torch).
    """
    scale, lnc = check_flash_attention(q, k, v, gate, seq_lens, causal, softmax_scale, lnc)
    if seq_lens is not None:
        seq_lens = _as_int32_lens("flash_attention", "seq_lens", seq_lens, _shape(q)[0], 0, _shape(k)[2])
    q, k, v, gate = (_read_only(x) for x in (q, k, v, gate))
    return call(flash_attention_kernel, q, k, v, gate, seq_lens, scale, causal, lnc=lnc)


def check_flash_attention(q, k, v, gate=None, seq_lens=None, causal=True, softmax_scale=None, lnc=None):
    """`flash_attention`'s checks that read no tensor values (shapes, dtypes, options, the SBUF fit), so that
    torch_ops' fake runs them at trace time; seq_lens' values are checked by the wrapper. Returns (scale, lnc)."""
    name = "flash_attention"
    _check_array(name, "q", q, 4, "[B, Hq, Sq, D]")
    _check_array(name, "k", k, 4, "[B, Hkv, Skv, D]")
    _check_array(name, "v", v, 4, "[B, Hkv, Skv, D]")
    n_b, n_hq, sq, d = _shape(q)
    kernel_check(_shape(k) == _shape(v), f"{name}: k and v shapes differ, got k.shape={_shape(k)}, "
                 f"v.shape={_shape(v)}")
    kb, n_kv, skv, kd = _shape(k)
    kernel_check(kb == n_b, f"{name}: batch differs, got q B={n_b}, k B={kb}")
    kernel_check(kd == d, f"{name}: head dim differs, got q D={d}, k D={kd}")
    kernel_check(1 <= d <= MAX_HEAD_DIM, f"{name}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={d}")
    kernel_check(n_kv >= 1 and n_hq % n_kv == 0,
                 f"{name}: Hq must be a multiple of Hkv, got Hq={n_hq}, Hkv={n_kv}")
    kernel_check(sq >= 1 and skv >= 1, f"{name}: sequence lengths must be >= 1, got Sq={sq}, Skv={skv}")
    kernel_check(sq <= skv, f"{name}: Sq must be <= Skv (queries are the last Sq positions), got Sq={sq}, "
                 f"Skv={skv}")
    kernel_check(_dtype_name(q) in FLOAT_DTYPES, f"{name}: dtype must be one of {FLOAT_DTYPES}, got "
                 f"q.dtype={q.dtype}")
    check_same_kind(name, {"q": q, "k": k, "v": v})
    kernel_check(q.dtype == k.dtype == v.dtype, f"{name}: q, k, v dtypes differ, got {q.dtype}, {k.dtype}, "
                 f"{v.dtype}")
    if gate is not None:
        _check_array(name, "gate", gate, 4, "[B, Hq, Sq, D]")
        kernel_check(_shape(gate) == _shape(q), f"{name}: gate must have q's shape {_shape(q)}, got "
                     f"gate.shape={_shape(gate)}")
        kernel_check(_dtype_name(gate) in FLOAT_DTYPES, f"{name}: gate dtype must be one of {FLOAT_DTYPES}, "
                     f"got gate.dtype={gate.dtype}")
    scale = _check_scale(name, softmax_scale, d)
    kernel_check(isinstance(causal, bool), f"{name}: causal must be a bool, got causal={causal!r}")
    lnc = resolve_lnc(lnc, name)
    itemsize = 4 if _dtype_name(q) == "float32" else 2
    need = kv_resident_bytes(skv, d, itemsize, seq_lens is not None)
    budget = for_target(_SBUF_KV_BUDGET)
    kernel_check(need <= budget,
                 f"{name}: one KV head must fit SBUF (K^T + V resident): Skv={skv}, D={d}, "
                 f"{_dtype_name(q)} needs {need} B per partition > {budget} on {current_target_name()}")
    return scale, lnc


def _check_scale(name, softmax_scale, d):
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    import numpy as np
    is_number = isinstance(softmax_scale, (int, float, np.integer, np.floating)) and not isinstance(
        softmax_scale, (bool, np.bool_))
    kernel_check(is_number and math.isfinite(float(softmax_scale)) and float(softmax_scale) > 0,
                 f"{name}: softmax_scale must be a finite number > 0 (Python or NumPy scalar), got "
                 f"softmax_scale={softmax_scale!r}")
    kernel_check(float(softmax_scale) <= MAX_SOFTMAX_SCALE,
                 f"{name}: softmax_scale must be <= {MAX_SOFTMAX_SCALE:g} (scale * scores in fp32 would overflow: "
                 f"NaN rows), got softmax_scale={softmax_scale!r}")
    return float(softmax_scale)


def _as_int32_lens(name, arg, lens, n_b, lo, hi):
    """Validate per-sequence lengths (values must be known on the host to check them) and return int32 NumPy."""
    import numpy as np
    device_type = getattr(getattr(lens, "device", None), "type", "cpu")
    kernel_check(not isinstance(lens, (str, bytes)) and device_type != "meta",
                 f"{name}: {arg} must be integers with values (NumPy, list or tensor), got {arg}={lens!r}")
    try:
        import torch
        if isinstance(lens, torch.Tensor):
            lens = lens.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        arr = np.asarray(lens)
    except Exception:  # noqa: BLE001 - anything NumPy cannot turn into an array
        arr = np.asarray(None)
    kernel_check(arr.shape == (n_b,), f"{name}: {arg} must have shape [B]=({n_b},), got {arg}.shape={arr.shape}")
    kernel_check(np.issubdtype(arr.dtype, np.integer), f"{name}: {arg} must be integers, got dtype={arr.dtype}")
    kernel_check(bool(np.all((arr >= lo) & (arr <= hi))),
                 f"{name}: {arg} must be in [{lo}, {hi}], got {arg}={arr.tolist()}")
    return arr.astype(np.int32)
