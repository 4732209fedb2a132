"""Flash attention prefill for short sequences (Skv <= 512), tile-major: the 2-byte path at D = 256 on trn2 / trn3,
and short packed variable-length batches at any D (`tile_short_varlen_body`, for `flash_attention_varlen`).

Every (b, query head, 128-row query tile) is a unit with its own output tile in natural layout (row p of the tile
is query 128t + p on partition p). Per unit:

    S = Q K^T over the key chunks up to the tile's last row           (TensorE; D contracted in 128-row chunks)
    masked S and its row max in one VectorE `range_select`           (keys [0, visible end of the row): causal,
                                                                        phantom keys of a partial chunk, length)
    P = exp(scale S - scale max) with its row sums l                 (ScalarE, reduce into a register)
    P^T (TensorE, 128-key chunks), P V into a [128, D] PSUM tile      (VectorE eviction in between)
    out = O / l * sigmoid(gate), rows past the length := 0, store    (VectorE, one 64 KiB DMA per unit)

Why this layout (docs/attention.md, "Short prefill, tile-major"): cost model v11's 512 B DMA packet knee moves a
D = 256 bf16 row at the engines' full rate, so the partition-major body (`prefill.short_prefill_body`: 2 KiB rows,
P V through 32-wide PE tiles, one normalisation and store per head) no longer saves DMA time, while it pays
ones-column matmuls for the row sums and holds every store to the end of its head. Here the row sums come from
the exp, each unit's store leaves when the unit is done, and the kernel's tail is the last (smallest) unit.

The cores take the (b, query head) pairs round robin; the units of a core's heads run as one software pipeline
(scores of unit u, then P^T / P V / finish of unit u - _LAG). A load is issued just before the first
instruction that needs it (the DMA queues take them in program order): a unit's K^T chunks and Q^T before its
scores, V chunks before its P V, its gate rows before its finish.

Dimensions: B batch, Hq / Hkv query / KV heads, Sq <= Skv <= 512 queries / keys (queries are the last Sq
positions), D head dim, C = ceil(Skv / 128) key chunks, T = ceil(Sq / 128) query tiles.
"""
from __future__ import annotations

from ..backend import nisa, nl
from ..hw import DMA_FULL_RATE_ROW_BYTES, NO_RANGE_SELECT_TARGETS, P_MAX
from ..lnc import current_target_name, for_target
from ._common import D_CHUNK, K_CHUNK, MM_KEYS, exact_transpose, is_two_byte, load_len_broadcast, load_t, n_tiles, \
    zero_rows_past_length

_SKV_MAX = MM_KEYS            # keys per unit: one PSUM bank of fp32 scores
_LAG = 3                      # P^T / P V / finish of a unit three units behind its scores (P in a ring of 4).
#                               Cost model v11, Qwen3.5 TP4 S=512: 10.07 / 10.03 / 10.83 us at a lag of 2 / 3 / 4
_HALF_CHUNK = K_CHUNK // 2    # the diagonal chunk's quadrant the 64-wide PE tiles skip
_ITEMSIZE = 2                 # the path is for 2-byte dtypes
_CAP = 3.0e38                 # packed rows that see no key: exp bias -_CAP (every probability 0)
_L_FLOOR = 2.0 ** -42         # added to l before ScalarE's reciprocal (its input range starts at 2^-42)


def tile_short_path(sq: int, skv: int, d: int, dtype, bhds: bool = False) -> bool:
    """Trace-time rule (shapes, dtype and target only): Skv <= 512, 2-byte dtypes whose D-row is at least a full-rate
    DMA packet on the target (D * 2 >= 512 B on trn2 / trn3: D = 256; trn1's 2560 B knee: never), and a target
    with `range_select` (NeuronCore-v3+). Narrower rows keep the partition-major short body, whose 1-2 KiB rows
    still pay there (tile-major at D < 256: faster with few heads per core, up to 32% slower with many KV heads and
    a gate; docs/attention.md, "Short prefill, tile-major")."""
    if bhds or sq > skv or not _tile_target(skv, dtype):
        return False
    return d * _ITEMSIZE >= for_target(DMA_FULL_RATE_ROW_BYTES)


def tile_short_varlen_path(tq: int, tk: int, d: int, dtype, causal: bool) -> bool:
    """The rule for packed sequences (`tile_short_varlen_body`), on shapes, dtype and target only: Tq, Tk <= 512
    (causal: Tq <= Tk, which the wrapper's per-sequence check Lk >= Lq implies), 2-byte, `range_select` on the
    target, any D <= 256 (the alternative here is the register-bounded key-block loop, which the tile-major body
    beats at every D measured; the wrapper keeps the per-sequence windows for non-causal packs they fit:
    docs/attention.md, "Short packs, tile-major")."""
    return tq <= _SKV_MAX and (tq <= tk or not causal) and d <= 2 * D_CHUNK and _tile_target(tk, dtype)


def _tile_target(skv, dtype) -> bool:
    return skv <= _SKV_MAX and is_two_byte(dtype) and current_target_name() not in NO_RANGE_SELECT_TARGETS


def tile_short_body(q, k, v, gate, seq_lens, out, softmax_scale, causal):
    """q, gate, out: [B, Hq, Sq, D] @ HBM; k, v: [B, Hkv, Skv, D] @ HBM (2-byte); seq_lens: [B] int32 @ HBM or
    None; softmax_scale, causal: trace-time. Writes out (see the module docstring)."""
    n_b, n_hq, sq, d = out.shape
    n_kv, skv = k.shape[1], k.shape[2]
    geo = _geometry(sq, skv, d, q.dtype, softmax_scale, causal, lens=seq_lens is not None)
    rows = {}

    def open_kv(b, kvh):
        if rows.get("b") != b:
            rows.update(b=b, ends=_row_ends(seq_lens, b, geo["tiles"], geo))
        return _kv_start(k[b, kvh], v[b, kvh], rows["ends"], geo)

    def open_head(b, h, kv):
        return dict(q=q[b, h], gate=None if gate is None else gate[b, h], out=out[b, h], kv=kv)

    _run_units(n_b, n_kv, n_hq // n_kv, geo, open_kv, open_head)


def tile_short_varlen_body(q, k, v, gate, cu_q, cu_k, out, softmax_scale, causal):
    """Packed sequences (`varlen.flash_attention_varlen_kernel`'s layout): q, gate, out [Tq, Hq, D] @ HBM; k, v
    [Tk, Hkv, D] @ HBM (2-byte); cu_q / cu_k [N+1] int32 @ HBM. The same units as `tile_short_body` with one
    sequence of Tq queries and Tk keys; each row's visible keys are its own sequence's, [lo_r, hi_r) from
    `varlen.packed_row_bounds` (computed on device once, shared by every head), the range_select's two bounds.
    K^T by DMA transposes as the units need them; V loaded whole after the first unit's QK, with the non-finite
    containment (`_packed_poison`: a key whose V row is not finite gets V row 0 and a NaN added to its score column
    by a K = 1 matmul, so only the rows that see it are touched). A row that sees no key
    (a sequence with queries and no keys) gives 0: its exp bias is capped so every probability is 0, and its
    1 / l is finite."""
    from .varlen import heads_view, packed_row_bounds
    tq, n_hq, d = q.shape
    tk, n_kv, _ = k.shape
    geo = _geometry(tq, tk, d, q.dtype, softmax_scale, causal, lens=False, packed=True)
    if nl.program_id(0) >= n_hq:        # no (query head) unit for this core: `_run_units` deals them round robin
        return
    lo, hi = packed_row_bounds(cu_q, cu_k, tq, causal, geo["n_t"])
    # per row: +inf where the row sees a key (no cap), else -3e38 (the exp bias then makes every probability 0)
    empty = nl.ndarray((P_MAX, geo["n_t"]), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=empty, data1=hi, data2=lo, op=nl.less_equal, engine=nisa.engine.gpsimd)
    cap = nl.ndarray((P_MAX, geo["n_t"]), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=cap, value=float("inf"), engine=nisa.engine.gpsimd)
    nisa.tensor_copy_predicated(dst=cap, src=-_CAP, predicate=empty)
    out_h = heads_view(out)
    gate_h = None if gate is None else heads_view(gate)

    def open_kv(_b, kvh):
        kv = _kv_start(None, None, (None, hi), geo)
        kv.update(k_packed=(k, kvh), v_packed=(v, kvh), lo=lo, cap=cap, v_chunks=geo["cpp"], poison=None)
        return kv

    def open_head(_b, h, kv):
        return dict(q_packed=(q, h), gate=None if gate_h is None else gate_h[h], out=out_h[h], kv=kv)

    _run_units(1, n_kv, n_hq // n_kv, geo, open_kv, open_head)


def _geometry(sq, skv, d, dtype, softmax_scale, causal, lens, packed=False):
    """The trace-time geometry every unit shares (queries are the last sq of skv positions: the causal diagonal)."""
    n_t, cpp = n_tiles(sq, P_MAX), n_tiles(skv, K_CHUNK)
    geo = dict(sq=sq, skv=skv, d=d, n_d=n_tiles(d, D_CHUNK), n_t=n_t, cpp=cpp, nk=cpp * K_CHUNK, dtype=dtype,
               scale=softmax_scale, qpos0=skv - sq, causal=causal, lens=lens, packed=packed)
    geo["tiles"] = [_tile_geometry(geo, t) for t in range(n_t)]
    return geo


def _run_units(n_b, n_kv, group, geo, open_kv, open_head):
    """The software pipeline over this core's units: the cores take the (b, query head) pairs round robin;
    open_kv(b, kvh) / open_head(b, h, kv) give a KV head's and a query head's state when the pipeline reaches
    them (`_kv_start` / `tile_short_varlen_body`)."""
    pid = nl.program_id(0)
    n_prog = nl.num_programs(0)
    n_t = geo["n_t"]
    items = [(b, kvh, g) for b in range(n_b) for kvh in range(n_kv) for g in range(group)][pid::n_prog]
    if not items:
        return
    tiles = geo["tiles"]
    if not geo["packed"]:          # range_select's lower bound key >= 0 (packed rows have their own)
        geo["zero"] = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=geo["zero"], value=0.0, engine=nisa.engine.gpsimd)
    ring = nl.ndarray((P_MAX, _LAG + 1, geo["nk"]), dtype=geo["dtype"], buffer=nl.sbuf)    # P of the units in flight
    head, kv = None, None
    pending = []                   # units whose P^T / P V / finish are still to come: (head, tile, (P, l))
    for n_u, (i, t) in enumerate(_unit_order(len(items), n_t)):
        b, kvh, g = items[i]
        if head is None or head["item"] != i:
            if kv is None or kv["key"] != (b, kvh):
                kv = open_kv(b, kvh)
                kv["key"] = (b, kvh)
            head = open_head(b, kvh * group + g, kv)
            head.update(item=i, qT=nl.ndarray((P_MAX, n_t, geo["n_d"], P_MAX), dtype=geo["dtype"], buffer=nl.sbuf))
        _load_kT(kv, tiles[t]["n_ch"], geo)
        _load_qT(head, t, geo)
        pending.append((head, tiles[t], _scores_exp(head, tiles[t], ring[0:P_MAX, n_u % (_LAG + 1), :], geo)))
        if len(pending) > _LAG:
            _pv_finish(*pending.pop(0), geo)
    for item in pending:
        _pv_finish(*item, geo)


def _unit_order(n_items, n_t):
    """(core item, query tile) in pipeline order: every head's tiles first to last, the core's last head's last to
    first (under causal masking its smallest tile, one key chunk, is then the last unit: the kernel's tail)."""
    return [(i, t) for i in range(n_items) for t in (range(n_t) if i + 1 < n_items else reversed(range(n_t)))]


def _tile_geometry(geo, t):
    """Query tile t: its key chunks (up to its last row's visible end), whether any of its columns needs the mask
    (a causal diagonal, phantom keys past Skv, or runtime lengths), and whether the 64-wide PE tiles skip the
    diagonal chunk's hidden quadrant (a full tile whose diagonal is exactly its last chunk: keys 64..127 of that
    chunk are hidden from rows 0..63)."""
    sq, skv, qpos0 = geo["sq"], geo["skv"], geo["qpos0"]
    qn = min(P_MAX, sq - P_MAX * t)
    k_end = min(skv, qpos0 + P_MAX * t + qn) if geo["causal"] else skv
    n_ch = n_tiles(k_end, K_CHUNK)
    ncols = n_ch * K_CHUNK
    first_end = min(skv, qpos0 + P_MAX * t + 1) if geo["causal"] else skv      # row 0's visible end
    quad = geo["causal"] and qpos0 % K_CHUNK == 0 and qn == P_MAX and k_end == ncols
    return dict(t=t, qn=qn, n_ch=n_ch, ncols=ncols, masked=geo["lens"] or geo["packed"] or first_end < ncols,
                quad=quad)


def _row_ends(seq_lens, b, tiles, geo):
    """Sequence b: (the length on every partition or None, `ends`): per masked tile t its rows' visible end
    `ends[:, t]` (fp32, GpSimd): key j is visible to row p iff j < min(Skv - Sq + 128t + p + 1 (causal) or Skv,
    length)."""
    len_f = None if seq_lens is None else load_len_broadcast(seq_lens, b, P_MAX)
    ends = nl.ndarray((P_MAX, geo["n_t"]), dtype=nl.float32, buffer=nl.sbuf)
    for tile in tiles:
        t = tile["t"]
        if not tile["masked"]:
            continue
        if geo["causal"]:
            pos = nl.ndarray((P_MAX, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.iota(pos, pattern=[[1, 1]], offset=geo["qpos0"] + P_MAX * t + 1, channel_multiplier=1)
            nisa.tensor_copy(dst=ends[:, t:t + 1], src=pos, engine=nisa.engine.gpsimd)
            nisa.tensor_scalar(dst=ends[:, t:t + 1], data=ends[:, t:t + 1], op0=nl.minimum,
                               operand0=float(geo["skv"]), engine=nisa.engine.gpsimd)
        else:
            nisa.memset(dst=ends[:, t:t + 1], value=float(geo["skv"]), engine=nisa.engine.gpsimd)
        if len_f is not None:
            nisa.tensor_tensor(dst=ends[:, t:t + 1], data1=ends[:, t:t + 1], data2=len_f, op=nl.minimum,
                               engine=nisa.engine.gpsimd)
    return len_f, ends


def _kv_start(k, v, row_ends, geo):
    """One KV head (k, v: [Skv, D] HBM views; row_ends: its sequence's `_row_ends`): K^T [128(d), C, n_d, 128]
    (chunk-major: each chunk's DMA transpose writes one dense window) and V [128 keys, C, D], both filled chunk by
    chunk as the units need them."""
    len_f, ends = row_ends
    kT = nl.ndarray((P_MAX, geo["cpp"], geo["n_d"], K_CHUNK), dtype=geo["dtype"], buffer=nl.sbuf)
    return dict(k=k, v=v, len=len_f, lo=None, ends=ends, cap=None, k_chunks=0, v_chunks=0, kT=kT,
                kT_at=lambda dn, i_d, c0, c1, a=0, z=K_CHUNK: kT[0:dn, c0:c1, i_d, a:z],
                v_sb=nl.ndarray((P_MAX, geo["cpp"], geo["d"]), dtype=geo["dtype"], buffer=nl.sbuf))


def _load_kT(kv, n_ch, geo):
    """K^T chunks (128 keys each, one DMA transpose; phantom keys := 0) up to chunk n_ch not loaded yet."""
    skv, d = geo["skv"], geo["d"]
    for c in range(kv["k_chunks"], n_ch):
        kn = min(K_CHUNK, skv - c * K_CHUNK)
        if "k_packed" in kv:
            _load_rows_t(kv["kT"][:, c, :, :], *kv["k_packed"], c * K_CHUNK, kn, geo)
        else:
            load_t(kv["kT"][:, c, :, :], kv["k"][c * K_CHUNK:c * K_CHUNK + kn, 0:d], kn, d, K_CHUNK)
    kv["k_chunks"] = max(kv["k_chunks"], n_ch)


def _load_rows_t(dst, x, h, r0, n, geo):
    """dst [128(d), n_d, 128] <- rows r0 .. r0 + n of head h of a packed [T, H, D] tensor, transposed (one DMA
    transpose when D is a multiple of 128, else one per head-dim chunk; x is reshaped before it is sliced: no
    reshape of a permuted view); phantom columns n .. 128 := 0."""
    d, n_d = geo["d"], geo["n_d"]
    if n < P_MAX:
        nisa.memset(dst=dst[:, :, n:P_MAX], value=0.0, engine=nisa.engine.gpsimd)
    if d == n_d * D_CHUNK:
        src = x.reshape((x.shape[0], x.shape[1], n_d, D_CHUNK))[r0:r0 + n, h]
        nisa.dma_transpose(dst=dst[0:D_CHUNK, 0:n_d, 0:n], src=src)
        return
    for i_d in range(n_d):
        d0 = i_d * D_CHUNK
        dn = min(D_CHUNK, d - d0)
        nisa.dma_transpose(dst=dst[0:dn, i_d, 0:n], src=x[r0:r0 + n, h, d0:d0 + dn])


def _packed_poison(kv, geo):
    """V of a packed KV head, whole ([128 keys, C, D], phantom rows 0), and its non-finite containment
    (`varlen._contain` without K: a key whose V row is not finite gets V row := 0); the per-key poison (0, or NaN
    for such a key) as a row [1, C * 128] (PE transposes of the [128, 1] columns) with a ones row [1, 128], for
    the K = 1 matmul that adds it to every score row (`_scores_exp`): the same effect as a NaN K row. The row is in
    q's dtype (bf16 or fp16: NaN and 0 exactly)."""
    from .varlen import _contain
    v, kvh = kv["v_packed"]
    skv, d, cpp, dtype = geo["skv"], geo["d"], geo["cpp"], geo["dtype"]
    v_sb = kv["v_sb"]
    if skv < cpp * K_CHUNK:
        nisa.memset(dst=v_sb[:, cpp - 1, :], value=0.0, engine=nisa.engine.gpsimd)
    for c in range(cpp):
        kn = min(K_CHUNK, skv - c * K_CHUNK)
        nisa.dma_copy(dst=v_sb[0:kn, c, 0:d], src=v[c * K_CHUNK:c * K_CHUNK + kn, kvh, 0:d])
    s = _contain(None, v_sb[:, 0:cpp, 0:d], P_MAX, cpp, d)          # V rows zeroed; s: 0, or NaN per key
    col = nl.ndarray((P_MAX, cpp), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=col, src=s, engine=nisa.engine.gpsimd)
    row_psum = nl.ndarray((1, cpp, P_MAX), dtype=dtype, buffer=nl.psum)
    for c in range(cpp):
        nisa.nc_transpose(dst=row_psum[0:1, c, 0:P_MAX], data=col[0:P_MAX, c:c + 1])
    row = nl.ndarray((1, geo["nk"]), dtype=dtype, buffer=nl.sbuf)     # ScalarE: the VectorE zeroes V meanwhile
    nisa.activation(dst=row, op=nl.copy, data=row_psum.reshape((1, geo["nk"])))
    ones = nl.ndarray((1, P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0, engine=nisa.engine.gpsimd)
    kv["poison"] = (ones, row)


def _load_v(kv, n_ch, geo):
    """V chunks (128 keys each, one DMA) up to chunk n_ch not loaded yet; phantom rows := 0 and rows past the
    length := 0 (their probabilities are exactly 0, but 0 * NaN would poison the P V sums)."""
    skv, d = geo["skv"], geo["d"]
    for c in range(kv["v_chunks"], n_ch):
        kn = min(K_CHUNK, skv - c * K_CHUNK)
        if kn < K_CHUNK:
            nisa.memset(dst=kv["v_sb"][:, c, :], value=0.0, engine=nisa.engine.gpsimd)
        nisa.dma_copy(dst=kv["v_sb"][0:kn, c, 0:d], src=kv["v"][c * K_CHUNK:c * K_CHUNK + kn, 0:d])
        if kv["len"] is not None:
            zero_rows_past_length(kv["v_sb"][:, c:c + 1, :], kv["len"], c * K_CHUNK, K_CHUNK)
    kv["v_chunks"] = max(kv["v_chunks"], n_ch)


def _load_qT(head, t, geo):
    """Q^T [128(d), n_d, 128] of query tile t (one DMA transpose; phantom rows' columns := 0). A padded row
    (position >= the length) may hold anything: it stays in its own score row and output row, which the finish
    zeroes. Packed sequences (`q_packed` = (q [Tq, Hq, D], h)): the rows of head h read from the contiguous q,
    reshaped before it is sliced (no reshape of a permuted view)."""
    sq, d = geo["sq"], geo["d"]
    qn = min(P_MAX, sq - P_MAX * t)
    if "q_packed" not in head:
        load_t(head["qT"][:, t, :, :], head["q"][P_MAX * t:P_MAX * t + qn, 0:d], qn, d, P_MAX)
        return
    _load_rows_t(head["qT"][:, t, :, :], *head["q_packed"], P_MAX * t, qn, geo)


def _scores_exp(head, tile, p_ring, geo):
    """Unit (head, tile t): S = Q K^T over the tile's key chunks (the diagonal chunk as a 128 x 64 matmul and a
    64 x 64 one on a PE column tile when `quad`); masked tiles: the visible keys' scores and their row max by one
    range_select (hidden keys read FP32_MIN: exp gives exactly 0, and a non-finite score there is replaced, never
    added to; the quadrant the PE skipped is hidden); then P = exp(scale S - scale max) into p_ring with its row
    sums l. Returns (P, l)."""
    d, n_d = geo["d"], geo["n_d"]
    t, ncols, n_ch = tile["t"], tile["ncols"], tile["n_ch"]
    kv = head["kv"]
    s_psum = nl.ndarray((P_MAX, geo["nk"]), dtype=nl.float32, buffer=nl.psum)
    n_full = n_ch - 1 if tile["quad"] else n_ch          # chunks every row sees in full
    h, j = _HALF_CHUNK, n_ch - 1
    for i_d in range(n_d):
        dn = min(D_CHUNK, d - i_d * D_CHUNK)
        q_t = head["qT"][0:dn, t, i_d, 0:P_MAX]
        if n_full:
            nisa.nc_matmul(s_psum[0:P_MAX, 0:n_full * K_CHUNK], q_t, kv["kT_at"](dn, i_d, 0, n_full),
                           accumulate=i_d > 0)
        if tile["quad"]:
            nisa.nc_matmul(s_psum[0:P_MAX, j * K_CHUNK:j * K_CHUNK + h], q_t, kv["kT_at"](dn, i_d, j, j + 1, 0, h),
                           accumulate=i_d > 0)
            nisa.nc_matmul(s_psum[h:P_MAX, j * K_CHUNK + h:ncols], head["qT"][0:dn, t, i_d, h:P_MAX],
                           kv["kT_at"](dn, i_d, j, j + 1, h, K_CHUNK), accumulate=i_d > 0,
                           tile_position=(0, h), tile_size=(P_MAX, h))
    if "v_packed" in kv:            # packed: the keys' poison (0, or NaN for a non-finite V row) on every row
        if kv["poison"] is None:
            _packed_poison(kv, geo)
        ones, row = kv["poison"]
        n_all = ncols - h if tile["quad"] else ncols          # columns every row's QK wrote
        nisa.nc_matmul(s_psum[0:P_MAX, 0:n_all], ones[0:1, 0:P_MAX], row[0:1, 0:n_all], accumulate=True)
        if tile["quad"]:
            nisa.nc_matmul(s_psum[h:P_MAX, n_all:ncols], ones[0:1, h:P_MAX], row[0:1, n_all:ncols], accumulate=True,
                           tile_position=(0, h), tile_size=(P_MAX, h))
    scores = s_psum[0:P_MAX, 0:ncols]
    m_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    if tile["masked"]:
        sel = nl.ndarray((P_MAX, geo["nk"]), dtype=nl.float32, buffer=nl.sbuf)
        lo = geo["zero"] if kv["lo"] is None else kv["lo"][:, t:t + 1]
        nisa.range_select(dst=sel[0:P_MAX, 0:ncols], on_true_tile=scores, comp_op0=nl.greater_equal,
                          comp_op1=nl.less, bound0=lo, bound1=kv["ends"][:, t:t + 1], reduce_res=m_sb,
                          reduce_cmd=nisa.reduce_cmd.reset_reduce, reduce_op=nl.maximum, range_start=0)
        scores = sel[0:P_MAX, 0:ncols]
    else:
        nisa.tensor_reduce(dst=m_sb, op=nl.maximum, data=scores, axis=1)
    nm_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    if kv["cap"] is None:
        nisa.tensor_scalar(dst=nm_sb, data=m_sb, op0=nl.multiply, operand0=-geo["scale"], engine=nisa.engine.gpsimd)
    else:   # a row that sees no key: bias -3e38, so every probability is 0 (not exp(0) of the fill)
        nisa.tensor_scalar(dst=nm_sb, data=m_sb, op0=nl.multiply, operand0=-geo["scale"], op1=nl.minimum,
                           operand1=kv["cap"][:, t:t + 1], engine=nisa.engine.gpsimd)
    l_sb = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=p_ring[0:P_MAX, 0:ncols], op=nl.exp, data=scores, bias=nm_sb, scale=geo["scale"],
                    reduce_op=nl.add, reduce_res=l_sb, reduce_cmd=nisa.reduce_cmd.reset_reduce)
    return p_ring[0:P_MAX, 0:ncols], l_sb


def _pv_finish(head, tile, staged, geo):
    """Unit (head, tile t): its V chunks (loads), P V (`_pv`), then the finish (`_finish`)."""
    p_sb, l_sb = staged
    _load_v(head["kv"], tile["n_ch"], geo)
    _finish(head, tile, _pv(head, tile, p_sb, geo), l_sb, geo)


def _pv(head, tile, p_sb, geo):
    """P^T (PE, 128-key chunks; one VectorE eviction), then P V into a [128, D] fp32 PSUM tile (the diagonal chunk
    as a 64 x 128 and a 64 x 64 PE tile when `quad`). Returns the PSUM tile."""
    d, dtype, n_ch = geo["d"], geo["dtype"], tile["n_ch"]
    v_sb = head["kv"]["v_sb"]
    pt_psum = nl.ndarray((P_MAX, geo["cpp"], P_MAX), dtype=dtype, buffer=nl.psum)
    for c in range(n_ch):
        exact_transpose(pt_psum[0:P_MAX, c, 0:P_MAX], p_sb[0:P_MAX, c * K_CHUNK:(c + 1) * K_CHUNK])
    pT_sb = nl.ndarray((P_MAX, geo["cpp"], P_MAX), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=pT_sb[0:P_MAX, 0:n_ch, 0:P_MAX], src=pt_psum[0:P_MAX, 0:n_ch, 0:P_MAX])
    pv_psum = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.psum)
    n_full = n_ch - 1 if tile["quad"] else n_ch
    for c in range(n_full):
        nisa.nc_matmul(pv_psum[0:P_MAX, 0:d], pT_sb[0:P_MAX, c, 0:P_MAX], v_sb[0:P_MAX, c, 0:d], accumulate=c > 0)
    if tile["quad"]:
        j, h = n_ch - 1, _HALF_CHUNK
        nisa.nc_matmul(pv_psum[0:P_MAX, 0:d], pT_sb[0:h, j, 0:P_MAX], v_sb[0:h, j, 0:d], accumulate=j > 0,
                       tile_position=(0, 0), tile_size=(h, P_MAX))
        nisa.nc_matmul(pv_psum[h:P_MAX, 0:d], pT_sb[h:P_MAX, j, h:P_MAX], v_sb[h:P_MAX, j, 0:d], accumulate=True,
                       tile_position=(h, h), tile_size=(h, h))
    return pv_psum


def _finish(head, tile, pv_psum, l_sb, geo):
    """out = O / l (* sigmoid(gate): the tile's gate rows loaded here), rows past the length := 0 (a select:
    whatever they hold), and the tile's store (one 64 KiB DMA at D = 256)."""
    d, t, qn = geo["d"], tile["t"], tile["qn"]
    sig = None
    if head["gate"] is not None:
        g_sb = nl.ndarray((P_MAX, d), dtype=head["gate"].dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=g_sb[0:qn], src=head["gate"][P_MAX * t:P_MAX * t + qn, 0:d])
        sig = nl.ndarray((P_MAX, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=sig[0:qn], op=nl.sigmoid, data=g_sb[0:qn])
    inv_l = nl.ndarray((P_MAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    if head["kv"]["cap"] is None:
        nisa.reciprocal(dst=inv_l[0:qn], data=l_sb[0:qn])
    else:   # 1 / (l + 2^-42): 1 / l where a key is seen (l >= 1), finite (the row's output 0) where none is
        nisa.activation(dst=inv_l[0:qn], op=nl.reciprocal, data=l_sb[0:qn], bias=_L_FLOOR)
    o_sb = nl.ndarray((P_MAX, d), dtype=geo["dtype"], buffer=nl.sbuf)
    if sig is None:
        nisa.tensor_scalar(dst=o_sb[0:qn], data=pv_psum[0:qn, 0:d], op0=nl.multiply, operand0=inv_l[0:qn])
    else:
        nisa.scalar_tensor_tensor(dst=o_sb[0:qn], data=pv_psum[0:qn, 0:d], op0=nl.multiply, operand0=inv_l[0:qn],
                                  op1=nl.multiply, operand1=sig[0:qn])
    len_f = head["kv"]["len"]
    if len_f is not None:
        zero_rows_past_length(o_sb[0:qn, 0:d].reshape((qn, 1, d)), len_f, geo["qpos0"] + P_MAX * t, P_MAX)
    nisa.dma_copy(dst=head["out"][P_MAX * t:P_MAX * t + qn, 0:d], src=o_sb[0:qn, 0:d])
