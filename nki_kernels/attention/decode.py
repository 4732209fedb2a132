"""Flash attention decode (token generation) for head_dim up to 256 over a BHSD KV cache, GQA, Sq <= 8 new tokens.

Convention: `cache_lens[b]` counts the valid cache positions of sequence b *including* the Sq new tokens, which
the caller has already written to the cache at positions cache_lens[b] - Sq .. cache_lens[b] - 1 (as vLLM /
NxDI do before attention). New token i sits at position cache_lens[b] - Sq + i and, with causal=True, sees keys
j <= cache_lens[b] - Sq + i; keys >= cache_lens[b] are never attended, whatever the cache holds there.

Scores are computed transposed, keys on the partitions: S^T [128 keys, chunk, R] = K^T(chunk)^T Q^T for the
R = G * Sq rows of one KV-head group. With R small (decode: R = 4 for Qwen3.5 TP4) every elementwise softmax
step then costs R / 128 of an element per key instead of one, P^T comes out of the exp already in the layout the
P V matmul contracts over (no transposes of P), and the row statistics cross the partitions once per block
(a max over the free axis, one PE transpose, a max over 128 values, a one-row matmul broadcast back).

Loop nest (per program instance):

    for each part (b, KV head, key range) this core owns:           (parts: below)
        Q^T [D, R] by PE transposes; per-row key limit from cache_lens[b] (runtime data)
        for each piece of up to 2048 keys (K and V DMAs chunk-major: chunk c, partition p = key c * 128 + p;
                the core's last split part streams its last _K_PRELOAD K pieces before their V; V in groups):
            V rows past cache_lens[b] := 0 in the chunk groups that hold such rows (predicated copy in a
                register-bounded loop of 0 or 1 trips: 0 * NaN would poison P V); groups wholly past the
                length are skipped in P V
            K^T by PE transposes (split keys, 2-byte dtypes: DMA transposes on load); S^T = K^T.T Q^T (fp32
                PSUM); keys past the limit selected to MASK_BIAS
            m = max over keys (free-axis max, PE transpose, max); P^T = exp(scale S^T - scale m)
            O = alpha O + P^T.T V, l = alpha l + P^T.T 1  (online softmax; PV one piece behind the scores)
        partial state (O, l, -scale m) of the part
    out = O / l, after merging the two parts of a (b, KV head) when its keys were split

Parts. When B * Hkv is odd (B=1 with one KV head per rank is the common decode shape at TP4) every (b, KV head)'s
keys are split in two halves, flash-decoding style; otherwise each (b, KV head) is one part. At LNC=2 the halves
go to the two cores (else whole (b, KV head) pairs alternate); the cores swap their partial states SBUF to SBUF
(`nisa.sendrecv`, GpSimd's low-latency DMA) and each merges them and writes its columns of D (core 0 ceil(D/2)).
At LNC=1 the one core computes both halves and merges them with the same instructions, so the result is
bit-identical at both LNCs.
"""
from __future__ import annotations

from ..backend import call, nki, nisa, nl
from ..hw import P_MAX
from ..lnc import resolve_lnc
from ..transpose import mixing_pe_transpose, vector_transpose
from ..validation import check_same_kind, kernel_check
from ._common import (D_CHUNK, FLOAT_DTYPES, K_CHUNK, MASK_BIAS, MAX_HEAD_DIM, is_two_byte, n_tiles,
                      pe_transpose_group, pe_transpose_keys)
from .prefill import _as_int32_lens, _check_array, _check_scale, _dtype_name, _read_only, _shape

MAX_NEW_TOKENS = 8                # Sq limit (speculative decoding); G * Sq rows must fit the 128 partitions
_PIECE_KEYS = 2048                # keys per K / V DMA: partition-major, 16 x 512 B = 8 KiB runs per partition (bf16,
#                                   D=256), past the DMA packet knee (cost model v11: trn1 2560 B, trn2 512 B), so at
#                                   the engines' peak
_PSUM_BANK_F32 = 512              # fp32 elements per partition in one 2 KiB PSUM bank: S^T [128, chunks, R] of one
#                                   piece must fit one bank, so pieces shrink for R > 32 rows
_MAX_SPLIT_STATE_BYTES = 64 * 1024  # SBUF per partition core 0 may hold for the first halves' partial states
_MAX_PIPE, _L_PIPE = 2, 1         # sendrecv pipes of the early max and l exchanges (the O swap uses pipe 0)
_KT_DVE_LAST = 1                  # K^T PSUM banks of a piece evicted by the VectorE (its last ones; else ScalarE)
_KT_BANKS = 3                      # PSUM banks the K^T transposes rotate over (+ S^T, statistics, P V: 6 of 8)
_K_DMA_T_PIECES = 1               # last pieces of a split part whose K^T comes by DMA transposes (else PE transposes)
_K_PRELOAD = 2                    # K pieces the core's last split part streams ahead of its V (the last ones)
_V_BUFS = 3                       # rotating V piece tiles (each with its ones column, set once per launch)
_ZERO_CHUNKS = 2                  # 128-key chunks per V-zeroing group (each run only if it holds padded positions)
_V_TAIL_SPLITS = (4,)             # the core's last V piece arrives in two chunk groups, the second n_c/4 chunks: its
#                                   zeroing and P V follow the last byte; smaller groups' 1 KiB rows cost the stream
#                                   more (cost model v3, B=1 8K: (2, 4, 8) 18.20 us, (4, 8) 18.38, (4,) 18.07)
_STATS = 512                      # fp32 columns of the statistics PSUM tile (one bank): max^T, m^T, broadcast m
#                                   (l is column D of the P V tile: V's ones column)
_ST_MAXT, _ST_MT, _ST_BCAST, _ST_LT = 0, 128, 256, 384     # column offsets in it (l^T: `_row_sums`)
_WRITE_ROW_DMAS = 8               # output rows up to which each row is its own DMA: the rows of one DMA share one
#                                   engine (8 partitions per engine) and its packets run one after another


def _pow2_at_least(n):
    p = 1
    while p < n:
        p *= 2
    return p


@nki.jit
def flash_attention_decode_kernel(q, k_cache, v_cache, cache_lens, softmax_scale, causal):
    """Decode attention: out = softmax(scale * Q K^T + mask) V over the valid part of a KV cache.

    Dimensions:
        B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0, (Hq / Hkv) * Sq <= 128), Sq new tokens (1..8),
        S cache capacity (S_max), D head dim (1..256), R = (Hq / Hkv) * Sq rows per KV head.
    Args:
        q: [B, Hq, Sq, D] @ HBM, bf16/fp16/fp32.
        k_cache: [B, Hkv, S, D] @ HBM, q's dtype (new tokens already written).
        v_cache: [B, Hkv, S, D] @ HBM, q's dtype.
        cache_lens: [B] int32 @ HBM, Sq <= cache_lens[b] <= S (runtime data: masks and the trip counts of
            register-bounded loops; the instruction stream does not depend on it).
        softmax_scale: float (trace-time). causal: bool (trace-time), causal among the new tokens.
    Returns:
        out: [B, Hq, Sq, D] @ HBM, q's dtype.
    Constraints:
        D <= MAX_HEAD_DIM; Sq <= MAX_NEW_TOKENS; R <= 128. Cache positions >= cache_lens[b] may hold anything
        (NaN, Inf): their scores are selected to MASK_BIAS and their V rows zeroed in SBUF, so the output equals
        the output with zeros there, bit for bit.
    Pseudocode:
        for part (b, kvh, keys): rows r = (g, i); limit_r = len_b - Sq + i (causal) or len_b - 1
            for piece: S^T = K^T.T Q^T, masked where key > limit_r; m' = max(m, max S); P^T = exp(scale (S^T - m'))
                       l = l e^(scale (m - m')) + P^T.T 1; O = O e^(scale (m - m')) + P^T.T V
        merge the halves of a split (b, kvh) like two pieces; out = O / l
    """
    out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    decode_body(q, k_cache, v_cache, cache_lens, out, softmax_scale, causal)
    return out


def plan_parts(n_b, n_kv, s_max, d, n_prog):
    """Trace-time work split: [(pid, b, kvh, half, key0, key1)] and whether keys are split in halves."""
    pairs = [(b, kvh) for b in range(n_b) for kvh in range(n_kv)]
    split = (len(pairs) % 2 == 1 and s_max >= 2 * K_CHUNK
             and len(pairs) * (d + 2) * 4 <= _MAX_SPLIT_STATE_BYTES)
    parts = []
    for i, (b, kvh) in enumerate(pairs):
        if split:
            mid = n_tiles(s_max // 2, K_CHUNK) * K_CHUNK
            parts.append((0, b, kvh, 0, 0, mid))
            parts.append((1 % n_prog, b, kvh, 1, mid, s_max))
        else:
            parts.append((i % n_prog, b, kvh, 0, 0, s_max))
    return parts, split


def decode_body(q, k_cache, v_cache, cache_lens, out, softmax_scale, causal):
    """The kernel body: this core's parts, piece by piece through a two-stage software pipeline (the scores and
    P^T of piece u, then V and P V of piece u-1, so K streams one piece ahead of V), then the merge of split
    (b, KV head) pairs."""
    n_b, n_hq, sq, d = q.shape
    n_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = n_hq // n_kv
    rows = group * sq
    dtype = q.dtype
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    parts, split = plan_parts(n_b, n_kv, s_max, d, n_prog)
    ones_row = nl.ndarray((1, P_MAX), dtype=nl.float32, buffer=nl.sbuf)      # broadcast of m to the partitions
    nisa.memset(dst=ones_row, value=1.0)
    ones_col = nl.ndarray((P_MAX, 1), dtype=q.dtype, buffer=nl.sbuf)           # row sums of P^T (`_row_sums`)
    nisa.memset(dst=ones_col, value=1.0)
    ctx = dict(q=q, k=k_cache, v=v_cache, lens=cache_lens, rows=rows, sq=sq, group=group, d=d, dtype=dtype,
               n_d=n_tiles(d, D_CHUNK), scale=softmax_scale, causal=causal, ones_row=ones_row, ones_col=ones_col,
               piece=min(_PIECE_KEYS, K_CHUNK * (_PSUM_BANK_F32 // rows)), vpos={}, v_first=split,
               zero_k=mixing_pe_transpose())
    ctx["v_bufs"] = _v_buffers(ctx)
    # split keys (latency-bound): K^T by DMA transposes, so the last piece's score chain does not queue behind the
    # K^T evictions; whole pairs (stream-bound): PE transposes, the DMA transpose costs the stream 1/0.9 of K
    ctx["k_dma_t"] = split and is_two_byte(dtype)
    held = {}                                        # (b, kvh) -> packed partial state of its first half
    mine = [pt for pt in parts if pt[0] == pid]

    def pv_stage(part, staged, last):
        _piece_pv(ctx, part, staged)
        if not last:
            return
        b, kvh, half = part["id"]
        packed = part["packed"]
        if not split:
            _write_out(ctx, out, packed, None, b, kvh, (0, d))
        elif half == 0 and n_prog == 1:
            held[(b, kvh)] = packed
        elif n_prog == 1:
            first = held.pop((b, kvh))
            a1, a2 = _merge_weights(ctx, first[0:rows, d + 1:d + 2], packed[0:rows, d + 1:d + 2])
            f1, f2 = _merge_factors(ctx, a1, a2, first[0:rows, d:d + 1], packed[0:rows, d:d + 1], True)
            _merge_out(ctx, out, first, f1, packed, f2, b, kvh, (0, d))
        else:
            # the two cores swap the O columns of their halves' states (SBUF to SBUF); each merges and writes
            # half of D. The merge factors are ready (early max and l exchanges) and the own columns are scaled
            # while the swap travels: after it, one instruction and the write
            other_sb = _exchange(ctx, packed, pid)
            cols = _own_cols(d, pid)
            if cols[1] > cols[0]:           # (D = 1: core 1 writes nothing)
                # (after the swap in GpSimd's program order: the swap's trigger does not wait for them)
                f_own, f_other = _own_other_factors(ctx, part)
                _merge_out(ctx, out, packed, f_own, other_sb, f_other, b, kvh, cols)

    pending = None
    for i_part, (_, b, kvh, half, key0, key1) in enumerate(mine):
        pieces = [(k0, min(ctx["piece"], key1 - k0)) for k0 in range(key0, key1, ctx["piece"])]
        part = _start_part(ctx, b, kvh, half, len(pieces))
        core_last = i_part == len(mine) - 1
        # split keys (latency-bound): the core's last part streams all its K pieces before its V pieces, so that
        # the K chain of its last piece (K^T evictions, S^T, the max across partitions, exp) runs under V's stream
        # (its last _K_PRELOAD pieces only: a fixed SBUF budget whatever S; the earlier pieces stream as usual)
        pre0 = max(0, len(pieces) - _K_PRELOAD) if split and core_last else None
        k_pre = {}
        for j, (k0, kn) in enumerate(pieces):
            last = j == len(pieces) - 1
            if j == pre0:
                k_pre = {i: _load_k(ctx, part, i, *pieces[i]) for i in range(pre0, len(pieces))}
            staged = _piece_scores(ctx, part, j, k0, kn, last and core_last, k_pre.pop(j, None),
                                   row_sums=last and split)
            if last and split:
                # the last piece of a half: its row sums come from P^T alone (before V arrives), and P V runs
                # the O columns the other core merges first, each half of D updated as soon as it is summed, so
                # the swap starts before this core's own columns are done (the same order at LNC=1)
                w = _swap_width(d)
                halves = [(d - w, d), (0, d - w)] if half == 0 else [(0, w), (w, d)]
                staged["halves"] = [(c0, c1) for c0, c1 in halves if c1 > c0]
            if last and split and n_prog > 1:
                if pending is not None and pending[0] is not part:
                    # the previous part's l exchange and O swap first: with halves of different piece counts the
                    # two cores must still issue their sendrecvs in the same order
                    pv_stage(*pending)
                    pending = None
                _early_max_exchange(ctx, part, j, pid)
                staged["after_l"] = lambda part=part: _early_l_exchange(ctx, part, pid)
            if pending is not None:
                pv_stage(*pending)
            pending = (part, staged, last)
    if pending is not None:
        pv_stage(*pending)


def _swap_width(d):
    """Columns of O each core sends in the state swap: ceil(D / 2), the same on both cores (a sendrecv's source and
    destination shapes are equal). Core 0 writes columns [0, w) of the output, core 1 [w, D) (`_own_cols`); core 0
    sends [D - w, D), which holds core 1's columns (one more for odd D), core 1 sends [0, w)."""
    return d - d // 2


def _own_cols(d, pid):
    """Columns of the output this core merges and writes after the state swap (empty on core 1 when D = 1)."""
    w = _swap_width(d)
    return (0, w) if pid == 0 else (w, d)


def _exchange(ctx, packed, pid):
    """Swap partial states with the other core (`nisa.sendrecv`, GpSimd's low-latency SBUF-to-SBUF DMA, fp32):
    this core sends the w = ceil(D/2) columns of O that hold the other core's (`_swap_width`) and l, and receives
    its own columns and l into the same columns of the returned tile (<= 128 fp32 columns per exchange, within the
    1024 B per partition of a gpsimd_dma sendrecv). (The maxes and l went earlier: `_early_max_exchange`,
    `_early_l_exchange`.)"""
    rows, d = ctx["rows"], ctx["d"]
    w = _swap_width(d)
    mine, theirs = ((0, w), (d - w, d)) if pid == 0 else ((d - w, d), (0, w))
    other_sb = nl.ndarray((P_MAX, d + 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.sendrecv(src=packed[0:rows, theirs[0]:theirs[1]], dst=other_sb[0:rows, mine[0]:mine[1]],
                  send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0, dma_engine=nisa.dma_engine.gpsimd_dma)
    return other_sb


def _start_part(ctx, b, kvh, half, n_pieces):
    """Per part: Q^T [D, R] of the KV head's rows, the per-row key limit, the online-softmax state."""
    sq, d = ctx["sq"], ctx["d"]
    len_i, len_f = _load_len(ctx, b)           # len_f on every partition: keys are on the partitions
    limit = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    # causal: row (g, i) sees key j iff j - i <= len - Sq (the iota below subtracts i); else iff j <= len - 1
    nisa.tensor_scalar(dst=limit, data=len_f, op0=nl.add, operand0=float(-sq if ctx["causal"] else -1),
                       engine=nisa.engine.gpsimd)
    return dict(id=(b, kvh, half), b=b, kvh=kvh, n_pieces=n_pieces, len=len_f, len_i=len_i, limit=limit,
                qT=_load_qT(ctx, b, kvh),
                neg_m=nl.ndarray((P_MAX, n_pieces), dtype=nl.float32, buffer=nl.sbuf),   # -scale * running max
                alpha=nl.ndarray((P_MAX, n_pieces), dtype=nl.float32, buffer=nl.sbuf),
                packed=nl.ndarray((P_MAX, d + 2), dtype=nl.float32, buffer=nl.sbuf))      # O | l | -scale m


def _load_len(ctx, b):
    """cache_lens[b] as int32 [1, 1] (partition 0) and as fp32 on every partition [128, 1]: one 4-byte DMA and
    a one-row fp32 matmul (ones[1, 128]^T x len, exact below 2^24). A partition-stride-0 DMA of 4 bytes to 128
    partitions would be 128 packets of 4 B on the DMA queues that stream the cache."""
    len_i = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=len_i, src=ctx["lens"].ap(pattern=[[1, 1], [1, 1]], offset=b))
    len_1 = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=len_1, src=len_i, engine=nisa.engine.gpsimd)
    len_psum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(len_psum, ctx["ones_row"][0:1, 0:P_MAX], len_1)
    len_f = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=len_f, src=len_psum)
    return len_i, len_f


def _load_qT(ctx, b, kvh):
    """Q^T [128(d), n_d, R] of the KV head's R rows: one natural-layout DMA of [R, D] (R rows of D contiguous
    elements), then PE transposes. (A DMA transpose of q is element-strided: 2 us of the DMA queues at R=4, D=256,
    cost model v3, ahead of the cache stream.)"""
    rows, sq, group, d, n_d, dtype = ctx["rows"], ctx["sq"], ctx["group"], ctx["d"], ctx["n_d"], ctx["dtype"]
    h0 = kvh * group
    q_nat = nl.ndarray((P_MAX, d), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=q_nat[0:rows, 0:d], src=ctx["q"][b, h0:h0 + group, 0:sq, 0:d].reshape((rows, d)))
    q_psum = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.psum)
    qT_sb = nl.ndarray((P_MAX, n_d, P_MAX), dtype=dtype, buffer=nl.sbuf)
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        if ctx["zero_k"]:       # trn1: a TensorE transpose would spread one query row's NaN over the others
            vector_transpose(q_psum[0:dn, i_d, 0:rows], q_nat[0:rows, d0:d0 + dn])
        else:
            nisa.nc_transpose(dst=q_psum[0:dn, i_d, 0:rows], data=q_nat[0:rows, d0:d0 + dn])
        nisa.tensor_copy(dst=qT_sb[0:dn, i_d, 0:rows], src=q_psum[0:dn, i_d, 0:rows])
    return qT_sb


def _k_dma_t(ctx, part, j):
    """K^T of piece j by DMA transposes: split keys, 2-byte dtypes, the part's last _K_DMA_T_PIECES pieces."""
    return ctx["k_dma_t"] and j >= part["n_pieces"] - _K_DMA_T_PIECES


def _load_k(ctx, part, j, key0, kn):
    """K of one piece: K^T [128(d), n_d, keys] by DMA transposes (2-byte dtypes, one per 128 head-dim rows), else
    chunk-major [128, chunk, D] (one DMA; transposed on the PE by `_transpose_keys`)."""
    if _k_dma_t(ctx, part, j):
        d, n_d = ctx["d"], ctx["n_d"]
        kT_sb = nl.ndarray((P_MAX, n_d, ctx["piece"]), dtype=ctx["dtype"], buffer=nl.sbuf)
        src = ctx["k"][part["b"], part["kvh"]]
        for i_d in range(n_d):
            d0 = i_d * D_CHUNK
            dn = min(D_CHUNK, d - d0)
            nisa.dma_transpose(dst=kT_sb[0:dn, i_d, 0:kn], src=src[key0:key0 + kn, d0:d0 + dn])
        return kT_sb
    k_sb = nl.ndarray((P_MAX, ctx["piece"] // K_CHUNK, ctx["d"]), dtype=ctx["dtype"], buffer=nl.sbuf)
    _load_keys_rows(ctx["k"][part["b"], part["kvh"]], k_sb, key0, kn, ctx["d"], (0, n_tiles(kn, K_CHUNK)))
    return k_sb


def _piece_scores(ctx, part, j, key0, kn, tail=False, k_sb=None, row_sums=False):
    """Stage 1 of one piece [key0, key0 + kn): the K load, K^T on the PE, S^T = K^T.T Q^T, the select mask, the
    running max across the partitions, P^T = exp(scale S^T - scale m)."""
    rows, d, n_d, dtype, scale = ctx["rows"], ctx["d"], ctx["n_d"], ctx["dtype"], ctx["scale"]
    b, kvh = part["b"], part["kvh"]
    max_c = ctx["piece"] // K_CHUNK
    n_c = n_tiles(kn, K_CHUNK)
    chan, step = 1, K_CHUNK                # chunk-major: key of (partition p, chunk c) = key0 + p*chan + c*step
    staged = dict(j=j, key0=key0, kn=kn, n_c=n_c, chan=chan, step=step)
    # split keys (one or few pairs, latency-bound): V before K, so its zeroing starts early, except for the core's
    # last piece: K first, so its longer dependency chain (K^T, S^T, max, exp) overlaps V's stream and only V's
    # last group's work follows the stream. Whole pairs (throughput-bound): K first.
    # (k_sb given: already streamed, before every V piece of the part)
    k_first = tail or not ctx["v_first"]
    if k_sb is None and k_first:
        k_sb = _load_k(ctx, part, j, key0, kn)
    v_bufs = ctx["v_bufs"]
    v_sb = v_bufs["tiles"][v_bufs["n"] % len(v_bufs["tiles"])]        # [128, chunk, D | 1]
    v_bufs["n"] += 1
    groups = _v_groups(n_c, tail)
    for chunks in groups:
        _load_keys_rows(ctx["v"][b, kvh], v_sb, key0, kn, d, chunks)
    # zeroed in groups of at most _ZERO_CHUNKS chunks, each only when it holds positions past the length; their
    # predicates are built on GpSimd and ScalarE in turn
    zero_groups = [(c, min(c1, c + _ZERO_CHUNKS)) for c0, c1 in groups for c in range(c0, c1, _ZERO_CHUNKS)]

    def zero_v(cols=(0, d)):
        for i_g, chunks in enumerate(zero_groups):
            _zero_v_past_length(ctx, part, v_sb, staged, chunks,
                                nisa.engine.scalar if i_g % 2 else nisa.engine.gpsimd, cols)
    if not tail:
        zero_v()
    pv_groups = [(g, None if g[0] == 0 else _flag_register(part, nl.greater, key0 + g[0] * K_CHUNK))
                 for g in zero_groups]      # (chunks, register [len > first key]: any valid key, else skipped)
    staged.update(v=v_sb, groups=pv_groups)
    if k_sb is None:
        k_sb = _load_k(ctx, part, j, key0, kn)
    dma_t = _k_dma_t(ctx, part, j)
    if ctx["zero_k"] and not dma_t:    # trn1: the PE transpose of K mixes a NaN cache row past the
        for i_g, chunks in enumerate(zero_groups):  # length into the valid keys (a DMA transpose does not)
            _zero_v_past_length(ctx, part, k_sb, staged, chunks, nisa.engine.scalar if i_g % 2 else nisa.engine.gpsimd,
                                (0, d))
    kT_sb = k_sb if dma_t else _transpose_keys(ctx, k_sb, kn, n_c)
    # ---- S^T [keys, chunk, R] in one PSUM bank
    st_psum = nl.ndarray((P_MAX, max_c, rows), dtype=nl.float32, buffer=nl.psum)
    for c in range(n_c):
        cn = min(K_CHUNK, kn - c * K_CHUNK)
        for i_d in range(n_d):
            dn = min(D_CHUNK, d - i_d * D_CHUNK)
            nisa.nc_matmul(st_psum[0:cn, c, 0:rows], kT_sb[0:dn, i_d, c * K_CHUNK:c * K_CHUNK + cn],
                           part["qT"][0:dn, i_d, 0:rows], accumulate=i_d > 0)
    # ---- mask: key - i(r) <= limit (causal) or key <= limit, as a select (a NaN score of a padded key goes)
    pos_sb = nl.ndarray((P_MAX, max_c, rows), dtype=nl.int32, buffer=nl.sbuf)
    pattern = [[step, n_c], [0, ctx["group"]], [-1, ctx["sq"]]] if ctx["causal"] else [[step, n_c], [0, rows]]
    nisa.iota(pos_sb[:, 0:n_c, 0:rows], pattern=pattern, offset=key0, channel_multiplier=chan)
    vis_sb = nl.ndarray((P_MAX, max_c, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=vis_sb[:, 0:n_c, 0:rows], data=pos_sb[:, 0:n_c, 0:rows], op0=nl.less_equal,
                       operand0=part["limit"], engine=nisa.engine.gpsimd)
    masked = nl.where(vis_sb[:, 0:n_c, 0:rows], st_psum[:, 0:n_c, 0:rows], MASK_BIAS)     # [128, n_c, R] fp32
    # ---- running max over all keys of the piece: free-axis max, PE transpose, max over the 128 partitions
    mx_sb = nl.ndarray((P_MAX, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=mx_sb, op=nl.maximum, data=masked.permute((0, 2, 1)), axis=2)
    stats = nl.ndarray((P_MAX, _STATS), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=stats[0:rows, _ST_MAXT:_ST_MAXT + P_MAX], data=mx_sb)
    m_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=m_sb[0:rows], op=nl.maximum, data=stats[0:rows, _ST_MAXT:_ST_MAXT + P_MAX], axis=1,
                       negate=True)
    neg_m = part["neg_m"]
    nm = neg_m[0:rows, j:j + 1]
    if j == 0:
        nisa.tensor_scalar(dst=nm, data=m_sb[0:rows], op0=nl.multiply, operand0=scale, engine=nisa.engine.gpsimd)
    else:
        nisa.tensor_scalar(dst=nm, data=m_sb[0:rows], op0=nl.multiply, operand0=scale, op1=nl.minimum,
                           operand1=neg_m[0:rows, j - 1:j], engine=nisa.engine.gpsimd)
        nisa.activation(dst=part["alpha"][0:rows, j:j + 1], op=nl.exp, data=neg_m[0:rows, j - 1:j], bias=nm,
                        scale=-1.0)
    # -scale m as a row, then on every partition: ones[1, 128]^T x m^T[1, R] (exact: one product per element)
    if ctx["zero_k"]:           # trn1: rows -> one row; the TensorE would spread one row's NaN max over all
        vector_transpose(stats[0:1, _ST_MT:_ST_MT + rows], nm)
    else:
        nisa.nc_transpose(dst=stats[0:1, _ST_MT:_ST_MT + rows], data=nm)
    mT_sb = nl.ndarray((1, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=mT_sb[0:1, 0:rows], src=stats[0:1, _ST_MT:_ST_MT + rows])
    nisa.nc_matmul(stats[0:P_MAX, _ST_BCAST:_ST_BCAST + rows], ctx["ones_row"][0:1, 0:P_MAX], mT_sb[0:1, 0:rows])
    bcast = stats.ap(pattern=[[_STATS, P_MAX], [0, n_c], [1, rows]], offset=_ST_BCAST)
    pre_sb = nl.ndarray((P_MAX, max_c, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=pre_sb[:, 0:n_c, 0:rows], data=masked, op0=nl.multiply, operand0=scale,
                              op1=nl.add, operand1=bcast)
    pT_sb = nl.ndarray((P_MAX, max_c, rows), dtype=dtype, buffer=nl.sbuf)
    nisa.activation(dst=pT_sb[:, 0:n_c, 0:rows], op=nl.exp, data=pre_sb[:, 0:n_c, 0:rows])
    if row_sums:    # sum_k P^T[k, r] as a column [R, 1] (PSUM), before V: `_piece_pv` skips V's ones column
        staged["lT"] = _row_sums(ctx, pT_sb, kn, n_c, stats)
    if tail and row_sums:   # zeroed per half of D by `_piece_pv`, after the state's l (the VectorE's order)
        staged["zero_v"] = zero_v
    elif tail:      # the core's last piece: the VectorE runs the score chain first, V's zeroing after
        zero_v()
    staged.update(pT=pT_sb)
    return staged


def _row_sums(ctx, pT_sb, kn, n_c, stats):
    """Row sums of one piece's P^T [128 keys, chunk, R] without V: a ones column as the stationary (one matmul,
    moving P^T of every full chunk: [1, chunk * R] per (chunk, row)), a sum over the chunks on the VectorE, and a
    PE transpose to [R, 1] (column _ST_LT of the statistics PSUM tile)."""
    rows = ctx["rows"]
    n_full = kn // K_CHUNK
    ls_psum = nl.ndarray((P_MAX, _STATS), dtype=nl.float32, buffer=nl.psum)
    ones = ctx["ones_col"]
    if n_full:
        nisa.nc_matmul(ls_psum[0:1, 0:n_full * rows], ones[0:K_CHUNK, 0:1], pT_sb[0:K_CHUNK, 0:n_full, 0:rows])
    if n_c > n_full:
        cn = kn - n_full * K_CHUNK
        nisa.nc_matmul(ls_psum[0:1, n_full * rows:n_c * rows], ones[0:cn, 0:1], pT_sb[0:cn, n_full, 0:rows])
    l_row = nl.ndarray((1, P_MAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=l_row[0:1, 0:rows], op=nl.add, axis=2,
                       data=ls_psum.ap(pattern=[[_STATS, 1], [1, rows], [rows, n_c]], offset=0))
    nisa.nc_transpose(dst=stats[0:rows, _ST_LT:_ST_LT + 1], data=l_row[0:1, 0:rows])
    return stats[0:rows, _ST_LT:_ST_LT + 1]


def _v_buffers(ctx):
    """_V_BUFS rotating V tiles [128, chunk, D + 1] whose last column is 1.0 (set once, before any V DMA): P V and
    the row sums of P are then the same matmuls (columns 0:D and D of the moving V)."""
    tiles = []
    for _ in range(_V_BUFS):
        v_sb = nl.ndarray((P_MAX, ctx["piece"] // K_CHUNK, ctx["d"] + 1), dtype=ctx["dtype"], buffer=nl.sbuf)
        d, n_c = ctx["d"], ctx["piece"] // K_CHUNK
        # the last chunk's column first: one element per partition, which tells the scheduler the tile's row size
        # (cost model: without it the strided column and the V DMAs' chunk groups count as overlapping writes)
        nisa.memset(dst=v_sb[:, n_c - 1, d:d + 1], value=1.0, engine=nisa.engine.gpsimd)
        if n_c > 1:
            nisa.memset(dst=v_sb[:, 0:n_c - 1, d:d + 1], value=1.0, engine=nisa.engine.gpsimd)
        tiles.append(v_sb)
    return dict(tiles=tiles, n=0)


def _load_keys_rows(src, dst, key0, kn, d, chunks):
    """Chunks [c0, c1) of a piece of K or V (`src` [S, D] of one (b, KV head)) into `dst` [128, chunk, D],
    chunk-major: chunk c partition p = key key0 + c * 128 + p. One DMA for the full chunks (each partition row
    gathers c1 - c0 runs of D elements; the cost model charges a gathered row `dma_elem_ns` per extra piece, so
    a 16-chunk row of 8 KiB streams within 3% of a contiguous one), one more for a partial last chunk. Chunk-major
    makes the positions past the length whole chunks (plus one straddling chunk), so the zeroing can skip the
    chunks before it."""
    c0, c1 = chunks
    full = min(c1, kn // K_CHUNK)
    if full > c0:
        view = src[key0 + c0 * K_CHUNK:key0 + full * K_CHUNK, 0:d].reshape((full - c0, K_CHUNK, d))
        nisa.dma_copy(dst=dst[0:K_CHUNK, c0:full, 0:d], src=view.permute((1, 0, 2)))
    if c1 > full:
        nisa.dma_copy(dst=dst[0:kn - full * K_CHUNK, full, 0:d], src=src[key0 + full * K_CHUNK:key0 + kn, 0:d])


def _v_groups(n_c, tail):
    """Chunk groups in which a piece's V is loaded, zeroed and multiplied: one, or for the core's last piece
    groups ending n_c / k chunks before the end (k in _V_TAIL_SPLITS), so only the last group's work follows the
    last byte of the stream."""
    if not tail:
        return [(0, n_c)]
    cuts = sorted({0, n_c} | {n_c - n_c // k for k in _V_TAIL_SPLITS if n_c // k >= 1})
    return list(zip(cuts[:-1], cuts[1:]))


def _flag_register(part, op, value):
    """A virtual register holding [cache_len `op` value] (0 or 1), computed on the device (GpSimd)."""
    flag = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=flag, data=part["len_i"], op0=op, operand0=float(value), engine=nisa.engine.gpsimd)
    reg = nisa.register_alloc()
    nisa.register_load(reg, flag)
    return reg


def _zero_v_past_length(ctx, part, v_sb, staged, chunks, engine, cols):
    """V rows of chunks [c0, c1) of a piece at positions >= the cache length := 0 (a predicated copy; 0 * NaN
    would poison P V), run only when it is needed: a register-bounded `nl.fori_loop` of 0 or 1 iterations whose
    flag is computed on the device (the instructions are the same whatever the length, only their trip count is
    data). The piece's first group (c0 = 0) is zeroed whenever it holds a position past the length; a later group
    only when the length falls inside it (start < len < end): a group entirely past the length is left as it is,
    and its P V matmuls are skipped (`_piece_pv`; its probabilities are exactly 0).

    The relative key position of every element, p * chan + c * step, is one GpSimd iota per piece geometry,
    made once per launch; per group only the compare with len - key0 runs (`engine`), then the VectorE copy. (A
    [128, chunks] predicate read with stride 0 along D would save the GpSimd work but makes the copy strided.)"""
    d, n_c, chan, step = ctx["d"], staged["n_c"], staged["chan"], staged["step"]
    key0, kn = staged["key0"], staged["kn"]
    c0, c1 = chunks
    v0, v1 = cols
    key = (n_c, chan, step)
    if key not in ctx["vpos"]:
        pos_sb = nl.ndarray((P_MAX, n_c, d), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(pos_sb, pattern=[[step, n_c], [0, d]], offset=0, channel_multiplier=chan)
        ctx["vpos"][key] = pos_sb
    pos_sb = ctx["vpos"][key]
    start, end = key0 + c0 * K_CHUNK, key0 + min(kn, c1 * K_CHUNK)
    if c0 == 0:         # the piece's first group always enters P V: zeroed whenever it holds a padded position
        pad_reg = _flag_register(part, nl.less, end)
    else:               # later groups: zeroed only when the length falls inside (entirely past: P V skips them)
        dist = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=dist, data=part["len_i"], op0=nl.subtract, operand0=(start + end) / 2,
                           op1=nl.abs_max, operand1=0.0, engine=nisa.engine.gpsimd)
        flag = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=flag, data=dist, op0=nl.less, operand0=(end - start) / 2, engine=nisa.engine.gpsimd)
        pad_reg = nisa.register_alloc()
        nisa.register_load(pad_reg, flag)

    def body(_):
        rel = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=rel, data=part["len"], op0=nl.add, operand0=float(-key0), engine=nisa.engine.gpsimd)
        pad_sb = nl.ndarray((P_MAX, n_c, d), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=pad_sb[:, c0:c1, v0:v1], data=pos_sb[:, c0:c1, v0:v1], op0=nl.greater_equal,
                           operand0=rel, engine=engine)
        nisa.tensor_copy_predicated(dst=v_sb[0:K_CHUNK, c0:c1, v0:v1], src=0.0, predicate=pad_sb[:, c0:c1, v0:v1])
    nl.fori_loop(0, pad_reg, body)


def _transpose_keys(ctx, k_sb, kn, n_c):
    """K^T [128(d), n_d, chunk * 128 keys] of one piece: PE transposes, `pe_transpose_group` chunks per PSUM bank,
    evicted by the Scalar engine, the piece's last _KT_DVE_LAST banks by the Vector engine (the end of the chain
    that gates the piece's scores; the ScalarE also runs every exp)."""
    d, n_d, dtype = ctx["d"], ctx["n_d"], ctx["dtype"]
    per_bank = pe_transpose_group(dtype)
    kT_sb = nl.ndarray((P_MAX, n_d, ctx["piece"]), dtype=dtype, buffer=nl.sbuf)
    t_psum = nl.ndarray((P_MAX, _KT_BANKS, per_bank, P_MAX), dtype=dtype, buffer=nl.psum)
    pe_transpose_keys(kT_sb, lambda c, d0, dn, cn: k_sb[0:cn, c, d0:d0 + dn], kn, n_c, d, n_d, t_psum, per_bank,
                      dve_last=_KT_DVE_LAST, exact=False)
    return kT_sb


def _piece_pv(ctx, part, staged):
    """Stage 2 of a piece: P^T.T V and the row sums P^T.T 1 (fp32 PSUM) over the chunk groups that hold a key
    before the length (a later group entirely past it is skipped by a register-bounded loop), merged into the
    part's running state. A split part's last piece (`staged["lT"]`, `staged["halves"]`): l from the early row
    sums first (and the early l exchange), then P V half of D at a time in the given order, each half's state
    columns updated as soon as it is summed."""
    rows, d, j = ctx["rows"], ctx["d"], staged["j"]
    pT_sb, kn = staged["pT"], staged["kn"]
    v_sb = staged["v"]
    packed = part["packed"]
    pv_psum = nl.ndarray((P_MAX, _STATS), dtype=nl.float32, buffer=nl.psum)     # O at 0:D, row sums at D
    if "lT" in staged:
        halves = staged["halves"]
        _update_state(part, packed, staged["lT"], j, rows, (d, d + 1), lT=True)
        if "after_l" in staged:
            staged["after_l"]()
    else:
        halves = [(0, d + 1)] if d <= D_CHUNK else [(0, d // 2), (d // 2, d + 1)]  # V's ones column: row sums
    per_half = "lT" in staged
    for halves_now in ([[h] for h in halves] if per_half else [halves]):
        if "zero_v" in staged:
            staged["zero_v"](halves_now[0])
        for chunks, valid in staged["groups"]:
            def body(_, chunks=chunks, halves_now=halves_now):
                for c in range(*chunks):
                    cn = min(K_CHUNK, kn - c * K_CHUNK)
                    for h0, h1 in halves_now:
                        nisa.nc_matmul(pv_psum[0:rows, h0:h1], pT_sb[0:cn, c, 0:rows], v_sb[0:cn, c, h0:h1],
                                       accumulate=c > 0)
            if valid is None:
                body(0)
            else:       # a group entirely past the length: P^T is exactly 0 there and V is never read
                nl.fori_loop(0, valid, body)
        if per_half:
            _update_state(part, packed, pv_psum, j, rows, halves_now[0])
    if not per_half:
        _update_state(part, packed, pv_psum, j, rows, (0, d + 1))      # O and l in one pass
    nisa.tensor_copy(dst=packed[0:rows, d + 1:d + 2], src=part["neg_m"][0:rows, j:j + 1], engine=nisa.engine.gpsimd)


def _update_state(part, packed, new_psum, j, rows, cols, lT=False):
    """packed[:, cols] = alpha_j packed[:, cols] + new (the piece's P V columns, or with lT its row sums [R, 1])."""
    c0, c1 = cols
    src = new_psum if lT else new_psum[0:rows, c0:c1]
    if j == 0:
        nisa.tensor_copy(dst=packed[0:rows, c0:c1], src=src)
    else:
        nisa.scalar_tensor_tensor(dst=packed[0:rows, c0:c1], data=packed[0:rows, c0:c1], op0=nl.multiply,
                                  operand0=part["alpha"][0:rows, j:j + 1], op1=nl.add, operand1=src)


def _early_max_exchange(ctx, part, j, pid):
    """Split keys at LNC=2: right after its part's last running max (-scale m, [R, 1]) each core swaps it with the
    other core's (`nisa.sendrecv`, its own pipe) and computes both merge weights, while P V of its last piece
    runs: the merge after the state swap is then two dependent steps shorter."""
    rows = ctx["rows"]
    nm_own = part["neg_m"][0:rows, j:j + 1]
    nm_other = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.sendrecv(src=nm_own, dst=nm_other[0:rows], send_to_rank=1 - pid, recv_from_rank=1 - pid,
                  pipe_id=_MAX_PIPE, dma_engine=nisa.dma_engine.gpsimd_dma)
    first, second = (nm_own, nm_other[0:rows]) if part["id"][2] == 0 else (nm_other[0:rows], nm_own)
    a1, a2 = _merge_weights(ctx, first, second)
    part["weights"] = (a1, a2) if part["id"][2] == 0 else (a2, a1)      # (own, other)


def _merge_weights(ctx, nm1, nm2):
    """a_side = e^(scale (m_side - m)), m = max(m1, m2), from the halves' -scale m ([R, 1] each)."""
    rows = ctx["rows"]
    nm = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=nm[0:rows], data1=nm1, data2=nm2, op=nl.minimum)
    a1 = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    a2 = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=a1[0:rows], op=nl.exp, data=nm1, bias=nm[0:rows], scale=-1.0)
    nisa.activation(dst=a2[0:rows], op=nl.exp, data=nm2, bias=nm[0:rows], scale=-1.0)
    return a1, a2


def _early_l_exchange(ctx, part, pid):
    """Split keys at LNC=2: right after its part's l is final (the last piece's row sums come before its P V,
    `_row_sums`) each core swaps it with the other core's ([R, 1], its own pipe), so both merge factors are ready
    before the O swap arrives; after it the merge is one instruction."""
    rows, d = ctx["rows"], ctx["d"]
    l_own = part["packed"][0:rows, d:d + 1]
    l_other = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.sendrecv(src=l_own, dst=l_other[0:rows], send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=_L_PIPE,
                  dma_engine=nisa.dma_engine.gpsimd_dma)
    part["l_other"] = l_other[0:rows]


def _own_other_factors(ctx, part):
    """(f_own, f_other) of `_merge_factors` for this core's half (after the early max and l exchanges)."""
    rows, d = ctx["rows"], ctx["d"]
    l_own, l_other = part["packed"][0:rows, d:d + 1], part["l_other"]
    a_own, a_other = part["weights"]
    return _merge_factors(ctx, a_own, a_other, l_own, l_other, part["id"][2] == 0)


def _merge_factors(ctx, a_own, a_other, l_own, l_other, own_first):
    """(f_own, f_other), f_h = a_h / (a1 l1 + a2 l2) ([R, 1] each; l >= 1: the larger max's side has weight 1 and at
    least one exp(0) term). Off the VectorE (it zeroes and updates V and the state meanwhile): a_own l_own on GpSimd
    before the other side's l arrives, then one GpSimd instruction for the sum, the reciprocal on the ScalarE, f of
    the first half on GpSimd and of the second on the ScalarE. Each product is rounded once and the sum of two is
    the same whichever side is "own", so both cores and LNC=1 get the same factors bit for bit."""
    rows = ctx["rows"]
    l_sc = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=l_sc[0:rows], data=l_own, op0=nl.multiply, operand0=a_own[0:rows],
                       engine=nisa.engine.gpsimd)
    l_sum = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=l_sum[0:rows], data=l_other, op0=nl.multiply, operand0=a_other[0:rows], op1=nl.add,
                       operand1=l_sc[0:rows], engine=nisa.engine.gpsimd)
    inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=inv_l[0:rows], op=nl.reciprocal, data=l_sum[0:rows])
    (a1, f1), (a2, f2) = [(a, nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf))
                          for a in ((a_own, a_other) if own_first else (a_other, a_own))]
    nisa.tensor_scalar(dst=f1[0:rows], data=a1[0:rows], op0=nl.multiply, operand0=inv_l[0:rows],
                       engine=nisa.engine.gpsimd)
    nisa.activation(dst=f2[0:rows], op=nl.copy, data=a2[0:rows], scale=inv_l[0:rows])
    return (f1, f2) if own_first else (f2, f1)


def _merge_out(ctx, out, own, f_own, other, f_other, b, kvh, cols):
    """out[b, KV head's rows, cols] = O_own f_own + O_other f_other from two partial states [R, O | ...] (fp32) of
    the same rows and their factors (`_merge_factors`): the own side scaled on GpSimd (during the swap at LNC=2),
    then one VectorE instruction writing q's dtype, and the write. The sum of the two rounded products is the
    same whichever side is "own", so LNC=1 (both halves local, all of D) and LNC=2 (each core its half of D) give
    bit-identical outputs."""
    rows, d = ctx["rows"], ctx["d"]
    c0, c1 = cols
    own_sc = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=own_sc[0:rows, c0:c1], data=own[0:rows, c0:c1], op0=nl.multiply,
                       operand0=f_own[0:rows], engine=nisa.engine.gpsimd)
    o_sb = nl.ndarray((P_MAX, d), dtype=ctx["dtype"], buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=o_sb[0:rows, c0:c1], data=other[0:rows, c0:c1], op0=nl.multiply,
                              operand0=f_other[0:rows], op1=nl.add, operand1=own_sc[0:rows, c0:c1])
    _store_rows(ctx, out, o_sb, b, kvh, cols)


def _write_out(ctx, out, packed, l_sb, b, kvh, cols, inv_l=None):
    """out[b, KV head's query heads, :, cols] = O / l in q's dtype (l: `l_sb`, else packed's column D; or its
    reciprocal `inv_l` given)."""
    rows, d = ctx["rows"], ctx["d"]
    c0, c1 = cols
    if inv_l is None:
        inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(dst=inv_l[0:rows], data=packed[0:rows, d:d + 1] if l_sb is None else l_sb)
    o_sb = nl.ndarray((P_MAX, d), dtype=ctx["dtype"], buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o_sb[0:rows, c0:c1], data=packed[0:rows, c0:c1], op0=nl.multiply,
                       operand0=inv_l[0:rows], engine=nisa.engine.gpsimd)
    _store_rows(ctx, out, o_sb, b, kvh, cols)


def _store_rows(ctx, out, o_sb, b, kvh, cols):
    """out[b, KV head's query heads, :, cols] = o_sb[0:R, cols] (q's dtype): one DMA per row up to
    _WRITE_ROW_DMAS rows, else one DMA."""
    rows, sq, group = ctx["rows"], ctx["sq"], ctx["group"]
    c0, c1 = cols
    h0 = kvh * group
    dst = out[b, h0:h0 + group, 0:sq, c0:c1].reshape((rows, c1 - c0))
    if rows <= _WRITE_ROW_DMAS:     # one DMA per row: each its own queue, the rows' packets in parallel
        for r in range(rows):
            nisa.dma_copy(dst=dst[r:r + 1], src=o_sb[r:r + 1, c0:c1])
    else:
        nisa.dma_copy(dst=dst, src=o_sb[0:rows, c0:c1])


# ============================================================================ host wrapper


def flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    """Decode attention over a BHSD KV cache (GQA, 1..8 new tokens, D <= 256).

    Args:
        q: [B, Hq, Sq, D] bf16/fp16/fp32 (Sq <= 8), NumPy or torch CPU.
        k_cache, v_cache: [B, Hkv, S, D], q's dtype; the Sq new tokens already written at
            positions cache_lens[b] - Sq .. cache_lens[b] - 1.
        cache_lens: [B] integers in [Sq, S]: valid positions per sequence, new tokens included.
        causal: new token i sees keys <= cache_lens[b] - Sq + i (else all keys < cache_lens[b]).
        softmax_scale: default D ** -0.5, must be > 0.
        lnc: 1, 2 or None (default: NEURON_LOGICAL_NC_CONFIG, else the target's default, 2 on trn2). At LNC=2
            the two cores split the (b, KV head) pairs, or, when B * Hkv is odd, every pair's keys in halves
            (partial states swapped with nisa.sendrecv, merged on both cores); the output is bit-identical at
            LNC=1 and 2.
    Returns:
        out: [B, Hq, Sq, D], q's dtype.
    """
    scale, lnc = check_flash_attention_decode(q, k_cache, v_cache, cache_lens, causal, softmax_scale, lnc)
    n_b, _, sq, _ = _shape(q)
    lens = _as_int32_lens("flash_attention_decode", "cache_lens", cache_lens, n_b, sq, _shape(k_cache)[2])
    q, k_cache, v_cache = (_read_only(x) for x in (q, k_cache, v_cache))
    return call(flash_attention_decode_kernel, q, k_cache, v_cache, lens, scale, causal, lnc=lnc)


def check_flash_attention_decode(q, k_cache, v_cache, cache_lens, causal=True, softmax_scale=None, lnc=None):
    """`flash_attention_decode`'s checks that read no tensor values (shapes, dtypes, options), so that torch_ops'
    fake runs them at trace time; cache_lens' values are checked by the wrapper. Returns (scale, lnc)."""
    name = "flash_attention_decode"
    _check_array(name, "q", q, 4, "[B, Hq, Sq, D]")
    _check_array(name, "k_cache", k_cache, 4, "[B, Hkv, S, D]")
    _check_array(name, "v_cache", v_cache, 4, "[B, Hkv, S, D]")
    n_b, n_hq, sq, d = _shape(q)
    kernel_check(_shape(k_cache) == _shape(v_cache), f"{name}: k_cache and v_cache shapes differ, got "
                 f"{_shape(k_cache)} and {_shape(v_cache)}")
    kb, n_kv, s_max, kd = _shape(k_cache)
    kernel_check(kb == n_b, f"{name}: batch differs, got q B={n_b}, k_cache B={kb}")
    kernel_check(kd == d, f"{name}: head dim differs, got q D={d}, k_cache D={kd}")
    kernel_check(1 <= d <= MAX_HEAD_DIM, f"{name}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={d}")
    kernel_check(n_kv >= 1 and n_hq % n_kv == 0,
                 f"{name}: Hq must be a multiple of Hkv, got Hq={n_hq}, Hkv={n_kv}")
    kernel_check(1 <= sq <= MAX_NEW_TOKENS, f"{name}: Sq (new tokens) must be in [1, {MAX_NEW_TOKENS}], got Sq={sq}")
    kernel_check((n_hq // max(n_kv, 1)) * sq <= P_MAX,
                 f"{name}: (Hq / Hkv) * Sq rows must be <= {P_MAX}, got {n_hq // max(n_kv, 1)} * {sq}")
    kernel_check(sq <= s_max, f"{name}: Sq must be <= the cache length S, got Sq={sq}, S={s_max}")
    kernel_check(_dtype_name(q) in FLOAT_DTYPES, f"{name}: dtype must be one of {FLOAT_DTYPES}, got "
                 f"q.dtype={q.dtype}")
    check_same_kind(name, {"q": q, "k_cache": k_cache, "v_cache": v_cache})
    kernel_check(q.dtype == k_cache.dtype == v_cache.dtype,
                 f"{name}: q, k_cache, v_cache dtypes differ, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    scale = _check_scale(name, softmax_scale, d)
    kernel_check(isinstance(causal, bool), f"{name}: causal must be a bool, got causal={causal!r}")
    return scale, resolve_lnc(lnc, name)
